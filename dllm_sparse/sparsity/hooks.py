"""The masking path: sparsify one FFN site of a model with a rule, through forward hooks.

    with sparsify(model, SparsityConfig("input", TopP(0.9))) as stats:   # or site="input", rule=TopP(0.9)
        model(input_ids, attention_mask=attention_mask)
    print(stats.mean())

Masks are computed afresh from the current activations at every forward call (every denoising step, every
decoded token): no state is carried between calls. The hooks are always removed on exit, also when the body
raises, so the model is bit-identical to the untouched one afterwards. This path defines what sparsity
*does*; :mod:`dllm_sparse.kernels` makes it save time.

torch.compile. Both orders work: ``sparsify(torch.compile(model), ...)`` (the hooks go on the compiled model's
original module, ``_orig_mod``) and ``torch.compile`` of a model inside a ``sparsify`` block. By default dynamo
does not guard on module hooks: a graph compiled without hooks would run on, dense, after hooks were added (and
one traced with them would go on sparsifying after they are removed). So attaching turns those guards on
(``torch._dynamo.config.skip_nnmodule_hook_guards = False``) and, when it was off, once clears the graphs
compiled before (``torch.compiler.reset()``), which lack the guards. Then a compiled model recompiles when a
``sparsify`` block starts or ends, and every graph matches the hooks present. Each block's hooks are new
functions, so each block costs one recompilation; past ``torch._dynamo.config.recompile_limit`` dynamo runs
that code uncompiled (same numbers, eager speed). The statistics, mask observers and mask selectors run outside
the graph (``torch.compiler.disable``), so they count exactly as without compilation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from dllm_sparse.models.families import FFNModules, count_layers, find_experts, find_ffns
from dllm_sparse.sparsity.config import SparsityConfig, as_config
from dllm_sparse.sparsity.rules import SHARED_SCOPES, SharedSelection, SparsityRule
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["sparsify", "Sparsifier", "MaskEvent", "MaskSelector", "uncompiled", "column_norms", "align_positions"]


def uncompiled(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(module, was_compiled)``: the original module of a ``torch.compile``-d model (an ``OptimizedModule``,
    whose submodules are ``_orig_mod``'s own), else the model itself."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        return model._orig_mod, True
    return model, False


@dataclass
class MaskEvent:
    """What a mask observer sees at every selection."""

    layer: int
    site: FFNSite
    keep: torch.Tensor  # bool [..., d], True = kept
    tag: object  # the statistics' current tag (step index, "prefill", ...)
    valid: torch.Tensor | None  # [batch, S] attention mask of real tokens, if the model was given one
    # Routed experts (docs/moe.md): the expert, and the flat indices [n] of the tokens routed to it (rows of the
    # layer's [batch * tokens] activations); keep is then [n, d]. None for a dense FFN.
    expert: int | None = None
    tokens: torch.Tensor | None = None


# A mask selector replaces "apply the rule" with anything that returns a keep-mask, e.g. a mask-reuse
# policy: selector(layer, site, x, rule) -> bool keep-mask shaped like x.
MaskSelector = Callable[[int, FFNSite, torch.Tensor, SparsityRule], torch.Tensor]


class Sparsifier:
    """Attaches (and detaches) the hooks of one :class:`SparsityConfig` (site, rule, layers). Prefer
    :func:`sparsify`. ``Sparsifier(model, config)``; ``Sparsifier(model, site, rule, layers)`` builds the config."""

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig | FFNSite | str | None = None,
        rule: SparsityRule | None = None,
        layers: Iterable[int] | None = None,
        stats: SparsityStats | None = None,
        mask_observers: Iterable[Callable[[MaskEvent], None]] = (),
        select_mask: MaskSelector | None = None,
        *,
        site: FFNSite | str | None = None,
    ):
        self.config = as_config(config, rule, layers, site=site, caller="Sparsifier")
        self.model, _ = uncompiled(model)
        model = self.model
        self.site = self.config.site
        self.rule = self.config.rule
        self.stats = stats if stats is not None else SparsityStats()
        self.observers = list(mask_observers)
        self.select_mask = select_mask
        all_ffns = find_ffns(model)
        n_layers = count_layers(model)
        self.ffns = select_layers(all_ffns, self.config.layers, n_layers)
        all_experts = find_experts(model)
        _check_every_experts_module_found(model, all_experts)
        self.experts = select_layers(all_experts, self.config.layers, n_layers)
        if self.experts:
            self._check_experts_supported()
        self._detach_experts = None
        self._token_shape: dict[int, tuple[int, ...]] = {}  # layer -> [batch, tokens] of the block in flight
        if self.site is FFNSite.GATE:
            acts = [id(f.act) for f in all_ffns]
            if len(set(acts)) != len(acts):
                raise ValueError(f"{type(model).__name__} shares one activation module between layers; the gate "
                                 "site needs one activation module per layer (hooks identify layers by module)")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._valid: torch.Tensor | None = None  # attention mask of the forward call in flight
        # Shared scopes: which tokens vote. None = the default (see _shared_rule); a [batch, tokens] bool mask
        # set from outside (StepSparsity(voters=...) sets it at every step) overrides it.
        self.voters: torch.Tensor | None = None
        self._column_norms = {f.layer: None for f in self.ffns}
        self._ffn_by_layer = {f.layer: f for f in self.ffns}
        self._input_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the one operation every hook performs -----------------------------------------------------------
    def _apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.rule.scope in SHARED_SCOPES:
            rule = self._shared_rule(layer, x)
        elif self.rule.scope == "sequence" and self._valid is not None:
            # One selection over a sample's real tokens x features: padding holds no mass and keeps nothing.
            rule = SharedSelection(self.rule, voters=align_positions(self._valid, x, "the attention mask"))
        else:
            rule = self.rule
        # A rule with a fused kernel (top-p on CPU) returns x * keep and each row's zero count in one pass; the
        # keep-mask is then out != 0, made only when someone observes it.
        fused = rule.apply_fused(x) if rule is self.rule and self.select_mask is None else None
        if fused is not None:
            out, zeros = fused
            self._observe(layer, out, None, self._valid, zeros)
            return out
        if self.select_mask is not None:
            keep = self._select_outside_graph(layer, x, rule)
        else:
            keep = rule.mask(x)
        # One pass; on CPU about 3x faster than torch.where(keep, x, 0) (measured at 1024 x 1536 fp32). A dropped
        # negative entry becomes -0.0, which equals 0 (statistics, matmuls); kept entries are unchanged.
        out = x * keep
        self._observe(layer, out, keep, self._valid, None)
        return out

    # Python state (counters, recorded masks, observers, a mask-reuse policy's memory) is kept out of compiled
    # graphs: dynamo would specialise on it (recompiling at every new statistics tag) or replay stale state.
    # attach() binds _select_outside_graph / _observe to torch.compiler.disable'd versions of these two (there,
    # not as decorators: torch.compiler.disable imports dynamo, seconds every `import dllm_sparse` would pay).
    def _select_now(self, layer: int, x: torch.Tensor, rule) -> torch.Tensor:
        return self.select_mask(layer, self.site, x, rule)

    def _shared_rule(self, layer: int, x: torch.Tensor) -> SharedSelection:
        """The rule bound to this call's voting tokens (docs/sparsification.md, "Shared keep-sets"):

        1. ``self.voters`` when set (StepSparsity sets the still-masked positions, or the current block);
        2. an AR likelihood pass (token groups ``context`` / ``continuation`` in the statistics): the real
           context tokens vote and share the keep-set; the continuation tokens take per-token masks, so no
           later token chooses the mask of an earlier one;
        3. otherwise the real tokens of the call (the model's ``attention_mask``; every token without one).
        """
        voters = token_positions = None
        groups = self.stats.groups
        if self.voters is not None:
            voters = align_positions(self.voters, x, "Sparsifier.voters")
        elif "continuation" in groups and "context" in groups:
            voters = align_positions(groups["context"], x, "the 'context' token group")
            token_positions = align_positions(groups["continuation"], x, "the 'continuation' token group")
        elif self._valid is not None:
            voters = align_positions(self._valid, x, "the attention mask")
        norm = None
        if self.rule.scope == "step_wina":
            norm = self._column_norms[layer]
            if norm is None or norm.device != x.device:
                norm = self._column_norms[layer] = column_norms(self._ffn_by_layer[layer], self.site).to(x.device)
        return SharedSelection(self.rule, voters, token_positions, norm)

    def _observe_now(self, layer: int, out: torch.Tensor, keep: torch.Tensor | None, valid: torch.Tensor | None,
                     zeros: torch.Tensor | None) -> None:
        self.stats.add(layer, self.site, out, valid, zeros=zeros)
        if keep is None and (self.stats.record_masks or self.observers):
            keep = out != 0  # a fused rule's keep-mask (SparsityRule.apply_fused)
        if self.stats.record_masks:
            self.stats.add_mask(layer, self.site, keep)
        for observer in self.observers:
            observer(MaskEvent(layer, self.site, keep, self.stats.tag, valid))

    # ---- routed experts (docs/moe.md) ---------------------------------------------------------------------------
    def _check_experts_supported(self) -> None:
        from dllm_sparse.sparsity.experts import check_experts

        where = f"{type(self.model).__name__} has routed experts (layers {[e.layer for e in self.experts]})"
        if self.rule.scope != "token":
            raise ValueError(f"{where}; scope {self.rule.scope!r} is not defined for them (the tokens routed to an "
                             "expert change from call to call): use scope='token', or sparsify only layers "
                             "without experts (layers=...)")
        if self.select_mask is not None:
            raise ValueError(f"{where}; mask selectors (mask reuse) are not defined for experts: the tokens routed "
                             "to an expert change between steps. Use fresh masks, or layers without experts")
        for found in self.experts:
            check_experts(found)
        dense_acts = {id(f.act) for f in self.ffns}
        if self.site is FFNSite.GATE and any(id(found.experts.act_fn) in dense_acts for found in self.experts):
            raise ValueError(f"{where}; their activation module is the dense FFN's, so the gate site's hook on it "
                             "would also mask the experts' activations a second time; give the experts their own "
                             "activation module")

    def _experts_runner(self, layer: int):
        from dllm_sparse.sparsity.experts import expert_ffn, run_experts

        def run(module, hidden_states, top_k_index, top_k_weights):
            self.stats.add_expert_call(layer, self.site)
            shape = self._token_shape.get(layer)
            if shape is None or math.prod(shape) != hidden_states.shape[0]:
                shape = (hidden_states.shape[0],)  # not [batch, tokens]: every token counted, as for the dense FFN
            return run_experts(module, hidden_states, top_k_index, top_k_weights, lambda e, x, tokens: expert_ffn(
                module, e, x, self.site, lambda v: self._apply_expert(layer, e, tokens, shape, v)))

        return run

    def _apply_expert(self, layer: int, expert: int, tokens: torch.Tensor, shape: tuple[int, ...],
                      x: torch.Tensor) -> torch.Tensor:
        """The rule on expert ``expert``'s vectors x [n, d] (one per routed token; per-token scope)."""
        fused = self.rule.apply_fused(x)
        out, zeros, keep = (fused[0], fused[1], None) if fused is not None else (None, None, self.rule.mask(x))
        if out is None:
            out = x * keep
        self._observe_expert(layer, expert, tokens, shape, out, keep, zeros)
        return out

    def _observe_expert_now(self, layer, expert, tokens, shape, out, keep, zeros) -> None:
        valid = self._valid if len(shape) == 2 else None
        self.stats.add_routed(layer, self.site, expert, out, tokens, shape, valid, zeros=zeros)
        if keep is None and (self.stats.record_masks or self.observers):
            keep = out != 0
        if self.stats.record_masks:
            self.stats.add_mask(layer, self.site, keep, expert=expert, tokens=tokens)
        for observer in self.observers:
            observer(MaskEvent(layer, self.site, keep, self.stats.tag, valid, expert, tokens))

    def _capture_token_shape(self, layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                self._token_shape[layer] = tuple(x.shape[:2])
            else:
                self._token_shape.pop(layer, None)

        return hook

    # ---- hooks -----------------------------------------------------------------------------------------------
    def attach(self) -> Sparsifier:
        if self._handles:
            raise RuntimeError("this Sparsifier is already attached")
        guard_module_hooks()
        self._select_outside_graph = torch.compiler.disable(self._select_now)
        self._observe = torch.compiler.disable(self._observe_now)
        self._observe_expert = torch.compiler.disable(self._observe_expert_now)
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._release_mask))
            for ffn in self.ffns:
                self._attach_one(ffn)
            if self.experts:
                from dllm_sparse.sparsity.experts import attach_experts

                for found in self.experts:
                    # Every block that runs this experts module (DiffusionGemma's encoder layer runs its decoder
                    # layer's, dllm_sparse.models.diffusion_gemma) tells the [batch, tokens] of its call.
                    path = found.profile.experts
                    blocks = [m for m in self.model.modules() if m is found.block or (
                        m is not found.experts and _module_at(m, path) is found.experts)]
                    for block in blocks:
                        self._handles.append(block.register_forward_pre_hook(
                            self._capture_token_shape(found.layer), with_kwargs=True))
                self._detach_experts = attach_experts(self.experts, self._experts_runner)
        except BaseException:
            self.detach()
            raise
        return self

    def _attach_one(self, ffn: FFNModules) -> None:
        layer, add = ffn.layer, self._handles.append
        if self.site is FFNSite.INPUT:
            # gate and up receive the same tensor x: select once, serve the sparse x to both projections
            # (or to the one fused gate_up projection).
            hook = self._input_pre_hook(layer)
            projections = (ffn.gate_up,) if ffn.gate_up is not None else (ffn.gate, ffn.up)
            if getattr(self.rule, "input_projections", "gate_up") == "up":
                # The paper's LLaDA variant: only the up projection reads the sparse input.
                if ffn.gate_up is not None:
                    raise ValueError(f"{self.rule.name} sparsifies the input of the up projection only, but this "
                                     "model computes gate and up in one fused projection; use TopP instead")
                projections = (ffn.up,)
            for projection in projections:
                add(projection.register_forward_pre_hook(hook))
        elif self.site is FFNSite.GATE:
            add(ffn.act.register_forward_hook(lambda m, args, out: self._apply(layer, out)))
        elif self.site is FFNSite.UP:
            if ffn.gate_up is not None:
                add(ffn.gate_up.register_forward_hook(self._fused_up_hook(layer)))
            else:
                add(ffn.up.register_forward_hook(lambda m, args, out: self._apply(layer, out)))
        else:  # INTERMEDIATE: the input of the down projection
            add(ffn.down.register_forward_pre_hook(lambda m, args: (self._apply(layer, args[0]), *args[1:])))

    def _fused_up_hook(self, layer: int):
        """The up site of a fused projection: its output is [gate; up], so the rule acts on the second half."""

        def hook(module, args, out):
            d_ff = out.shape[-1] // 2
            return torch.cat([out[..., :d_ff], self._apply(layer, out[..., d_ff:])], dim=-1)

        return hook

    def _input_pre_hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            cached = self._input_cache.pop(layer, None)
            if cached is not None and cached[0] is x:
                return (cached[1], *args[1:])  # second projection of the same x
            sparse_x = self._apply(layer, x)
            self._input_cache[layer] = (x, sparse_x)
            return (sparse_x, *args[1:])

        return hook

    def _capture_mask(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1:  # model(input_ids, attention_mask) given positionally
            try:
                am = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except (TypeError, ValueError):
                am = None
        self._valid = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None

    def _release_mask(self, module, args, output):
        self._valid = None
        self._input_cache.clear()

    def detach(self) -> None:
        if self._detach_experts is not None:
            self._detach_experts()
            self._detach_experts = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._token_shape.clear()
        self._input_cache.clear()
        self._valid = None


def _check_every_experts_module_found(model: nn.Module, found) -> None:
    if any(hasattr(m, "num_experts") for m in model.modules()):  # only MoE models pay for the import
        from dllm_sparse.sparsity.experts import check_every_experts_module_found

        check_every_experts_module_found(model, found)


def _module_at(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def column_norms(ffn: FFNModules, site: FFNSite | str) -> torch.Tensor:
    """float64 [d]: the L2 norm of the weight column each feature of ``site`` multiplies (the weight-aware score
    of scope ``step_wina``, after WINA). The input x multiplies W_gate and W_up: the norm of the column of the
    stacked [W_gate; W_up]. The gate, up and intermediate vectors reach the output through W_down: its
    column norms."""
    site = FFNSite.parse(site)
    with torch.no_grad():
        if site is FFNSite.INPUT:
            mats = (ffn.gate_up.weight,) if ffn.gate_up is not None else (ffn.gate.weight, ffn.up.weight)
            sq = sum(w.detach().to(torch.float64).pow(2).sum(dim=0) for w in mats)
        else:
            sq = ffn.down.weight.detach().to(torch.float64).pow(2).sum(dim=0)
    return sq.sqrt()


def align_positions(mask: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """A [batch, S] token mask as [batch_x, T] for activations x [batch_x, T, d]: right-aligned in the token
    dimension (the convention of SparsityStats' groups) and repeated when x stacks copies of the batch
    (classifier-free guidance: [cond; uncond]). None for activations that are not [batch, tokens, d]."""
    if x.dim() != 3:
        return None
    m = mask.to(device=x.device, dtype=torch.bool)
    if m.dim() == 1:
        m = m[None]
    B, T = x.shape[:2]
    if m.shape[0] != B and m.shape[0] and B % m.shape[0] == 0:
        m = m.repeat(B // m.shape[0], 1)
    if m.dim() != 2 or m.shape[0] != B or m.shape[1] < T:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the FFN activations are {tuple(x.shape)}: give "
                         f"one bool per token, [batch, tokens] (right-aligned to the {T} tokens of this call)")
    return m[:, m.shape[1] - T:]


def guard_module_hooks() -> None:
    """Make torch.compile notice added and removed module hooks (see the module docstring): turn dynamo's hook
    guards on and, if they were off, clear the graphs compiled without them (once per process, unless someone
    turns them off again)."""
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch.compiler.reset()


def select_layers(ffns: list, layers: Iterable[int] | None, n_layers: int | None = None) -> list:
    """The entries of ``ffns`` (FFNModules / ExpertsModules, in layer order) whose layer is in ``layers`` (None:
    all). ``n_layers``: the model's number of blocks (default ``len(ffns)``, one FFN per block); negative
    indices count from it."""
    if layers is None:
        return ffns
    n = len(ffns) if n_layers is None else n_layers
    chosen = set()
    for i in layers:
        if not -n <= int(i) < n:
            raise ValueError(f"layer {i} out of range: the model has {n} FFN layers (0..{n - 1})")
        chosen.add(int(i) % n)
    return [f for f in ffns if f.layer in chosen]


@contextmanager
def sparsify(
    model: nn.Module,
    config: SparsityConfig | FFNSite | str | None = None,
    rule: SparsityRule | None = None,
    layers: Iterable[int] | None = None,
    stats: SparsityStats | None = None,
    record_masks: bool = False,
    mask_observers: Iterable[Callable[[MaskEvent], None]] = (),
    select_mask: MaskSelector | None = None,
    *,
    site: FFNSite | str | None = None,
    on_attach: Callable[[Sparsifier], None] | None = None,
) -> Iterator[SparsityStats]:
    """Sparsify the FFNs of ``model`` as ``config`` says (site, rule, layers) inside the block; yields the
    statistics.

    ``sparsify(model, SparsityConfig("input", TopP(0.9)))``, or the convenience forms
    ``sparsify(model, site="input", rule=TopP(0.9), layers=None)`` and ``sparsify(model, "input", TopP(0.9))``,
    which build that config. ``layers``: indices (all by default). ``stats``: an existing
    :class:`SparsityStats` to add to (e.g. one per run across several ``sparsify`` blocks). ``record_masks``:
    keep every keep-mask (memory!). ``mask_observers``: callables receiving a :class:`MaskEvent` at each
    selection. ``select_mask``: replaces the rule's selection (mask-reuse policies). ``on_attach``: called with
    the attached :class:`Sparsifier` (e.g. to set its ``voters`` for a shared scope at every step).
    """
    config = as_config(config, rule, layers, site=site, caller="sparsify")
    if stats is None:
        stats = SparsityStats(record_masks=record_masks)
    elif record_masks:
        stats.record_masks = True
    sp = Sparsifier(model, config, stats=stats, mask_observers=mask_observers, select_mask=select_mask).attach()
    try:
        if on_attach is not None:
            on_attach(sp)
        yield sp.stats
    finally:
        sp.detach()
