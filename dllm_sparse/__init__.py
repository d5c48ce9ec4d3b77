"""dllm-sparse: FFN activation sparsity in diffusion LLMs, side by side with the matched AR model.

The core API::

    from dllm_sparse import TopP, sparsify, load_model
    lm = load_model("smollm2-135m")
    with sparsify(lm.model, site="input", rule=TopP(0.9)) as stats:
        lm.model(**lm.tokenizer("Hello there", return_tensors="pt"))
    print(stats.mean())

Layers (each imports only the ones above it in this list; ``docs/architecture.md`` draws them):

* ``dllm_sparse.sparsity`` — sites, rules, the sparsity hooks, statistics; ``dllm_sparse.steps`` — the step
  protocol generators and callbacks share; ``dllm_sparse.models`` — family profiles, loading, native LLaDA;
* ``dllm_sparse.samplers`` (generation, per-step sparsity, tracking, mask reuse) and ``dllm_sparse.kernels``;
* ``dllm_sparse.eval`` — likelihood scorers, tasks, the lm-eval model, sweeps, critical sparsity, plots;
* ``experiments/`` — command lines over the above.

The names below are imported lazily, so ``import dllm_sparse`` (and every ``--help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "dllm_sparse.models.families": ["PROFILES", "FamilyProfile", "FFNModules", "detect_family", "family_named",
                                    "find_ffns", "register_family", "without_lm_head"],
    "dllm_sparse.models.loading": ["LoadedModel", "load_model"],
    "dllm_sparse.sparsity.rules": ["SparsityRule", "TopP", "TopK", "MaxP", "make_rule", "top_p_mask",
                                   "top_p_mask_reference", "top_p_mask_histogram", "top_p_mask_row_sort",
                                   "top_p_threshold"],
    "dllm_sparse.sparsity.sites": ["FFNSite", "ALL_SITES"],
    "dllm_sparse.sparsity.config": ["SparsityConfig"],
    "dllm_sparse.sparsity.hooks": ["sparsify", "Sparsifier", "MaskEvent"],
    "dllm_sparse.sparsity.stats": ["SparsityStats"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


# Saved native LLaDA checkpoints load through transformers' Auto classes without trust_remote_code once
# dllm_sparse is imported (registered when transformers' Auto model classes are imported; no cost here).
importlib.import_module("dllm_sparse.autoclasses").install()


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dllm_sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
