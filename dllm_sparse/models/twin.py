"""The embedded masked-diffusion twin of SmolLM2-135M: ``load_model("smollm2-135m-mdm")``.

The package ships only a small peft adapter (``data/smollm2-135m-mdm/``: LoRA factors + the mask token's
embedding row, ~20 MB, see its README for how it was trained and how good it is). At load time the cached
SmolLM2-135M weights are converted to the native LLaDA architecture (bidirectional attention, Dream logit shift),
the mask token is added, and peft merges the adapter into plain ``nn.Linear`` weights, so FFN hooks and kernels see the
same module layout as for LLaDA. The merged model is cached as a Hugging Face directory
(``<cache>/smollm2/mdm-<adapter hash>``) so later loads are a plain ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dllm_sparse.cache import cache_dir
from dllm_sparse.models.adapt import ADAPTER_META, adapter_hash, load_adapted_model
from dllm_sparse.models.cache_entries import build_lock, save_to_cache, share_cache_entry, smollm2_hf_dir
from dllm_sparse.models.llada import LLaDAModelLM
from dllm_sparse.models.loaded import LoadedModel

__all__ = ["SMOLLM2_MDM_ADAPTER", "build_adapted_model", "smollm2_mdm_dir", "untrained_twin", "adapted_twin"]

#: The shipped adapter directory.
SMOLLM2_MDM_ADAPTER = Path(__file__).resolve().parents[1] / "data" / "smollm2-135m-mdm"


def build_adapted_model(base_dir: str | Path, adapter_dir: str | Path) -> tuple[LLaDAModelLM, Any]:
    """Base causal LM (HF dir) + peft adapter -> (merged float32 ``LLaDAModelLM``, tokenizer with the mask token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    return load_adapted_model(base, adapter_dir, tok), tok


def smollm2_mdm_dir(adapter_dir: str | Path = SMOLLM2_MDM_ADAPTER, **_: Any) -> Path:
    """The merged model as a cached HF directory (built on first use, atomically)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_META).is_file():
        raise FileNotFoundError(f"the smollm2-135m-mdm adapter is missing from {adapter_dir}; reinstall dllm-sparse "
                                "or retrain it with experiments/adapt_ar_to_diffusion.py --export")
    target = cache_dir() / "smollm2" / f"mdm-{adapter_hash(adapter_dir)}"
    if (target / "config.json").is_file():
        share_cache_entry(target)  # an entry built before files were made readable (0600 weights) is fixed
        return target
    base = smollm2_hf_dir()  # takes its own lock: never while holding ours
    with build_lock(target):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        model, tok = build_adapted_model(base, adapter_dir)
        save_to_cache(model, tok, target)
    return target


# load_model("smollm2-135m-mdm") -> the directory above, loaded as model_type "llada" (kind "diffusion").


# ---------------------------------------------------------------------------------------------------------
# Points of the twin's training trajectory (experiments/advantage_study.py)
# ---------------------------------------------------------------------------------------------------------


def _fresh_base(parent):
    """A float32 deep copy of the AR parent's model and tokenizer (the conversion consumes its base)."""
    import copy

    return copy.deepcopy(parent.model).float(), copy.deepcopy(parent.tokenizer)


def untrained_twin(parent, name: str | None = None):
    """The twin before any training: the AR ``parent`` (a LoadedModel) converted to the LLaDA architecture with
    the shipped adapter's settings (Dream logit shift, the mask token appended at the mean embedding), no adapter.
    A :class:`~dllm_sparse.models.loaded.LoadedModel` of kind ``diffusion`` named ``<parent>-mdm@untrained``."""
    from dllm_sparse.models.adapt import add_mask_token, convert_causal_lm, read_adapter_meta

    meta = read_adapter_meta(SMOLLM2_MDM_ADAPTER)
    base, tok = _fresh_base(parent)
    model = convert_causal_lm(base, logit_shift=bool(meta.get("logit_shift", True))).eval()
    mask_id = add_mask_token(model, tok)
    return LoadedModel(model, tok, "diffusion", name or f"{parent.name}-mdm@untrained", mask_id, "llada")


def adapted_twin(parent, adapter_dir: str | Path, name: str):
    """The AR ``parent`` converted and merged with the adapter in ``adapter_dir`` (a checkpoint of the twin's
    training, e.g. ``adapt_ar_to_diffusion.py --save-adapter-every``). Refused, naming both, when the adapter
    was trained on another base model than ``parent``."""
    from dllm_sparse.models.adapt import read_adapter_meta

    meta = read_adapter_meta(adapter_dir)
    if meta.get("base") != parent.name:
        raise ValueError(f"{adapter_dir} is an adapter of base model {meta.get('base')!r}, not of {parent.name!r}: "
                         "a trajectory point must be a checkpoint of the twin's own parent")
    base, tok = _fresh_base(parent)
    model = load_adapted_model(base, adapter_dir, tok)
    return LoadedModel(model, tok, "diffusion", name, tok.mask_token_id, "llada")
