"""dllm-sparse: FFN activation sparsity in diffusion LLMs, side by side with the matched AR model.

The core API::

    from dllm_sparse import TopP, sparsify, load_model
    lm = load_model("smollm2-135m")
    with sparsify(lm.model, site="input", rule=TopP(0.9)) as stats:
        lm.model(**lm.tokenizer("Hello there", return_tensors="pt"))
    print(stats.mean())
"""

from . import llada as _llada  # noqa: F401  (registers model_type "llada" with the transformers Auto classes)
from .adapters import ADAPTERS, FFNAdapter, FFNModules, detect_adapter, find_ffns, register_adapter
from .loading import LoadedModel, load_model
from .rules import MaxP, SparsityRule, TopK, TopP, make_rule, top_p_mask, top_p_mask_reference, top_p_threshold
from .sites import ALL_SITES, FFNSite
from .sparsify import MaskEvent, Sparsifier, sparsify
from .stats import SparsityStats

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS", "FFNAdapter", "FFNModules", "detect_adapter", "find_ffns", "register_adapter",
    "SparsityRule", "TopP", "TopK", "MaxP", "make_rule", "top_p_mask", "top_p_mask_reference", "top_p_threshold",
    "FFNSite", "ALL_SITES", "sparsify", "Sparsifier", "MaskEvent", "SparsityStats",
    "LoadedModel", "load_model",
]
from . import mdm as _mdm  # noqa: E402,F401  (registers the embedded "smollm2-135m-mdm" diffusion twin)
