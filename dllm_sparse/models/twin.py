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

from dllm_sparse.models.adapt import ADAPTER_META, adapter_hash, load_adapted_model
from dllm_sparse.models.llada import LLaDAModelLM
from dllm_sparse.models.loading import _smollm2_hf_dir, build_lock, cache_dir, save_to_cache, share_cache_entry

__all__ = ["SMOLLM2_MDM_ADAPTER", "build_adapted_model", "smollm2_mdm_dir"]

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
    base = _smollm2_hf_dir()  # takes its own lock: never while holding ours
    with build_lock(target):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        model, tok = build_adapted_model(base, adapter_dir)
        save_to_cache(model, tok, target)
    return target


# load_model("smollm2-135m-mdm") -> the directory above, loaded as model_type "llada" (kind "diffusion").
