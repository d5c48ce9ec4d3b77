"""Routed experts as FFNs: the masking path for mixture-of-experts layers (definitions: docs/moe.md).

An expert is a gated FFN  y_e = W_down,e( act(W_gate,e x) * (W_up,e x) )  applied to the tokens the router sends to
it. Each (token, expert) pair is one FFN evaluation with the four sites of a dense FFN, sparsified per pair:

- ``input``: x, the token's hidden state as routed to the expert (what the model's experts module receives; the
  same vector for every expert of a token, so its mask is the same too);
- ``gate`` / ``up`` / ``intermediate``: that expert's act(W_gate,e x), W_up,e x and their product.

The router is never sparsified: routing, and the weights the experts' outputs are mixed with, stay exact.

How it plugs in. transformers dispatches every experts module decorated with ``use_experts_implementation``
through ``ExpertsInterface`` by the name in ``module.config._experts_implementation`` ("eager", "grouped_mm",
"batched_mm", ...). This module registers one more implementation, ``"dllm_sparse"``; :func:`attach_experts` points
the sparsified modules' configs at it for the duration of a ``sparsify`` block and restores the previous name on
exit. Experts of layers left out of the block keep running the previous implementation. The sparse
implementation evaluates each expert on the tokens routed to it (gathered products, one expert at a time) and
combines the weighted outputs the way the previous implementation does: ``index_add_`` in expert order in the
model's dtype for "eager", a float sum over each token's top-k slots for the others. So at p = 1 (every mask
keeps every non-zero entry) the output equals "eager" and "grouped_mm" bit for bit (tests/test_experts.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dllm_sparse.models.families import ExpertsModules
from dllm_sparse.sparsity.sites import FFNSite

__all__ = ["IMPLEMENTATION", "SUPPORTED_IMPLEMENTATIONS", "TESTED_CLASSES", "check_experts", "attach_experts",
           "expert_ffn", "run_experts", "is_attached",
           "check_every_experts_module_found"]

IMPLEMENTATION = "dllm_sparse"
#: The implementations whose numbers the sparse one reproduces at p = 1 (others run fused GPU kernels or change
#: the weights' layout at load).
SUPPORTED_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
#: Experts classes the tests run (any class dispatched through ExpertsInterface with the same layout works).
TESTED_CLASSES = ("Gemma4TextExperts", "Qwen3MoeExperts", "MixtralExperts")

# id(experts module) -> the function that runs it sparsified (set by attach_experts, removed on exit)
_ACTIVE: dict[int, Callable] = {}
# id(config) -> [config, the implementation name it had, how many attached experts modules share it]
_SAVED: dict[int, list] = {}
_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(IMPLEMENTATION, _dispatch)
        _REGISTERED = True


def _dispatch(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The registered implementation: the sparsified run of an attached module, else the previous one."""
    run = _ACTIVE.get(id(module))
    if run is not None:
        return run(module, hidden_states, top_k_index, top_k_weights)
    return _previous(module)(module, hidden_states, top_k_index, top_k_weights)


def _previous_name(module: nn.Module) -> str:
    saved = _SAVED.get(id(module.config))
    return saved[1] if saved is not None else module.config._experts_implementation


def _previous(module: nn.Module) -> Callable:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    eager = type(module).forward.__wrapped__  # the class's own loop, kept by use_experts_implementation
    return ALL_EXPERTS_FUNCTIONS.get_interface(_previous_name(module), eager)


def check_experts(found: ExpertsModules) -> None:
    """Refuse, naming the class and what is supported, an experts module the sparse implementation cannot run."""
    from transformers.integrations.moe import _default_apply_gate

    module = found.experts
    name = type(module).__name__
    where = f"layer {found.layer}: experts module {name}"
    supported = (f"supported: experts classes dispatched through transformers' ExpertsInterface "
                 f"(@use_experts_implementation) with one concatenated [gate; up] weight per expert and the default "
                 f"gating, e.g. {', '.join(TESTED_CLASSES)}")
    config = getattr(module, "config", None)
    if not hasattr(type(module).forward, "__wrapped__") or not hasattr(config, "_experts_implementation"):
        raise ValueError(f"{where} does not dispatch through transformers' ExpertsInterface, so dllm-sparse cannot "
                         f"sparsify its experts; {supported}")
    problems = []
    if not getattr(module, "has_gate", False):
        problems.append("it has no gate projection (has_gate=False)")
    if not getattr(module, "is_concatenated", False):
        problems.append("its gate and up weights are interleaved (is_concatenated=False)")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("it normalises each expert's output (has_post_expert_norm=True)")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("it is sharded by expert parallelism")
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        problems.append("it overrides _apply_gate (custom gating: the gate and up sites are not act(g) and u)")
    if problems:
        raise ValueError(f"{where} cannot be sparsified: {'; '.join(problems)}. {supported}")
    current = _previous_name(module)
    if id(module) in _ACTIVE:
        raise ValueError(f"{where} is already sparsified (by an active sparsify block, or accelerate_ffn); "
                         "sparsify different layers, or end the first block (restore_ffn(model))")
    if current not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(f"{where} runs experts_implementation={current!r}, which sparsify does not reproduce; "
                         f"supported: {', '.join(SUPPORTED_IMPLEMENTATIONS)}. Switch first, e.g. "
                         "model.set_experts_implementation('grouped_mm')")


def _dispatches_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module run through transformers' ExpertsInterface."""
    return hasattr(type(module).forward, "__wrapped__") and hasattr(module, "has_gate") and hasattr(module,
                                                                                                    "num_experts")


def check_every_experts_module_found(model: nn.Module, found: list[ExpertsModules]) -> None:
    """Refuse a model holding ExpertsInterface modules that its family profile does not name: they would run dense
    while the statistics report the rest as sparse."""
    known = {id(f.experts) for f in found}
    missed = [(name, type(m).__name__) for name, m in model.named_modules()
              if _dispatches_experts(m) and id(m) not in known]
    if missed:
        from dllm_sparse.models.families import detect_family

        family = found[0].profile.family if found else detect_family(model).family
        raise ValueError(f"{type(model).__name__} has routed experts the family profile {family!r} does not name ({', '.join(f'{n} ({c})' for n, c in missed[:3])}"
                         f"{', ...' if len(missed) > 3 else ''}), so sparsify would leave them dense. Name them in "
                         "the profile: register_family(FamilyProfile(..., experts='<path inside a block>'))")


def attach_experts(found: list[ExpertsModules], run_for_layer: Callable[[int], Callable]) -> Callable[[], None]:
    """Run the experts of ``found`` through ``run_for_layer(layer)`` (a function (module, hidden_states,
    top_k_index, top_k_weights) -> output) until the returned ``detach()`` is called."""
    _register()
    for f in found:
        check_experts(f)
    attached = []
    try:
        for f in found:
            config = f.experts.config
            saved = _SAVED.setdefault(id(config), [config, config._experts_implementation, 0])
            saved[2] += 1
            config._experts_implementation_internal = IMPLEMENTATION  # this config only, not its sub-configs
            _ACTIVE[id(f.experts)] = run_for_layer(f.layer)
            attached.append(f)
    except BaseException:
        _detach(attached)
        raise
    return lambda: _detach(attached)


def is_attached(module: nn.Module) -> bool:
    """Whether ``module``'s experts run sparsified now."""
    return id(module) in _ACTIVE


def _detach(attached: list[ExpertsModules]) -> None:
    for f in attached:
        _ACTIVE.pop(id(f.experts), None)
        saved = _SAVED.get(id(f.experts.config))
        if saved is None:
            continue
        saved[2] -= 1
        if saved[2] == 0:
            saved[0]._experts_implementation_internal = saved[1]
            del _SAVED[id(saved[0])]
    attached.clear()


def expert_ffn(module: nn.Module, e: int, x: torch.Tensor, site: FFNSite | None,
               apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Expert ``e`` of ``module`` on its tokens x [n, d_model], with ``apply`` (the rule) at ``site`` (None:
    dense). The products are the ones the eager implementation computes (F.linear on the expert's slice)."""
    gate_up, down = module.gate_up_proj[e], module.down_proj[e]
    if module.is_transposed:  # stored [d_in, d_out]
        gate_up, down = gate_up.t(), down.t()
    gate_up_bias = module.gate_up_proj_bias[e] if module.has_bias else None
    down_bias = module.down_proj_bias[e] if module.has_bias else None
    if site is FFNSite.INPUT:
        x = apply(x)
    gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    if site is FFNSite.GATE:
        h = apply(module.act_fn(gate)) * up
    elif site is FFNSite.UP:
        h = module.act_fn(gate) * apply(up)
    else:
        h = module.act_fn(gate) * up
        if site is FFNSite.INTERMEDIATE:
            h = apply(h)
    return F.linear(h, down, down_bias)


def run_experts(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor,
                ffn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Every expert on the tokens routed to it: ``ffn(expert, x, tokens)`` computes expert ``expert`` on x [n, d]
    (the hidden states of the tokens routed to it; ``tokens`` [n] their flat indices into hidden_states); the
    output combined as the model's previous implementation combines it (see the module docstring)."""
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=module.num_experts).tolist()  # one host sync per layer
    if len(counts) > module.num_experts:
        raise ValueError(f"{type(module).__name__}: the router chose expert ids up to {len(counts) - 1}, but the "
                         f"module holds {module.num_experts} experts")
    weights = top_k_weights.reshape(-1)
    eager = _previous_name(module) == "eager"
    out = torch.zeros_like(hidden_states) if eager else None
    weighted = None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // top_k
        y = ffn(e, hidden_states[tokens], tokens) * weights[pairs, None]
        if eager:  # the eager loop: add each expert's share in the model's dtype, in expert order
            out.index_add_(0, tokens, y.to(out.dtype))
        else:  # grouped_mm / batched_mm: keep each (token, slot) product, then one sum over the slots
            if weighted is None:
                weighted = y.new_zeros(num_tokens * top_k, y.shape[-1])
            weighted[pairs] = y
    if eager:
        return out
    if weighted is None:
        return torch.zeros_like(hidden_states)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
