"""Measured sparsity, kept apart per tag (a step, "prefill"...), token group, layer and site.

Sparsity of one vector = fraction of its entries that are exactly zero after the rule. Counts stay on the
activations' device as running tensors (no host sync inside a forward pass); they are read only when a
report is asked for. Per hook call the zeros of every token group are counted in one matrix-vector product
(the groups' token weights, built once per forward pass and shared by every layer and site) and added to one
running vector per (tag, layer, site); :attr:`SparsityStats.counts` spreads those vectors into per-group
counts when read.

Routed experts (docs/moe.md) are counted per (tag, group, layer, site, expert) in :attr:`SparsityStats.expert_counts`:
one vector per (token, expert) pair routed, so an expert's ``tokens`` is how many tokens it saw. A layer's sparsity
at a site (:meth:`SparsityStats.per_layer`, hence :meth:`SparsityStats.mean`) pools every vector computed at that
site in that layer, the dense FFN's (one per token) and the experts' (one per routed pair), weighted by their
entries: the fraction of zero entries among all entries the layer computed there.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dllm_sparse.atomic import atomic_write_text

ALL = "all"  # the group of every real (non-padding) token; always counted


@dataclass
class _Count:
    zeros: torch.Tensor  # sum over counted tokens of the number of zero entries (float64 scalar tensor)
    tokens: torch.Tensor  # number of counted tokens
    width: int  # entries per token (d_model or d_ff)
    calls: int = 1  # forward calls of this layer's site counted (a plain int: no device sync)


@dataclass
class SparsityStats:
    """Running sparsity statistics. A forward call is counted under the current :attr:`tag` and for every
    token group: ``"all"`` (real tokens, from the model's attention mask) plus the groups set by the caller
    with :meth:`tagged` (boolean [batch, tokens] masks such as ``prompt`` / ``masked`` / ``decoded``)."""

    record_masks: bool = False
    tag: Hashable = "default"
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: list[dict] = field(default_factory=list)  # only with record_masks=True
    # Per-row weights [batch] of the forward calls in flight (see :meth:`tagged`); None = every row counts once.
    row_weights: torch.Tensor | None = None
    _counts: dict[tuple, _Count] = field(default_factory=dict, init=False, repr=False)
    _expert_counts: dict[tuple, _Count] = field(default_factory=dict, init=False, repr=False)
    _expert_calls: dict[tuple, int] = field(default_factory=dict, init=False, repr=False)  # (tag, layer, site)
    # (tag, layer, site, group names, expert or None) -> [zeros per group, tokens per group, calls, width], not yet
    # in _counts / _expert_counts
    _pending: dict[tuple, list] = field(default_factory=dict, init=False, repr=False)
    # The token weights of the forward pass in flight: (what they were built from, names, weights [G, N], tokens)
    _weights: tuple | None = field(default=None, init=False, repr=False)

    @property
    def counts(self) -> dict[tuple, _Count]:
        """{(tag, group, layer, site): counts}: every hook call so far."""
        self._flush()
        return self._counts

    @property
    def expert_counts(self) -> dict[tuple, _Count]:
        """{(tag, group, layer, site, expert): counts} of routed experts; ``tokens`` = (token, expert) pairs."""
        self._flush()
        return self._expert_counts

    # ---- tagging ---------------------------------------------------------------------------------------
    @contextmanager
    def tagged(self, tag: Hashable, groups: dict[str, torch.Tensor] | None = None,
               row_weights: torch.Tensor | None = None) -> Iterator[SparsityStats]:
        """Count the forward calls made inside under ``tag`` (and the extra token ``groups``).

        ``row_weights`` ([batch], non-negative): row b of those calls counts ``row_weights[b]`` times. A caller
        that computes one row in place of several identical ones (the ELBO's de-duplicated masks) passes their
        multiplicity, so the statistics equal those of computing every copy."""
        old = (self.tag, self.groups, self.row_weights)
        self.tag, self.groups = tag, dict(groups or {})
        self.row_weights = None if row_weights is None else row_weights.detach().to(torch.float64)
        try:
            yield self
        finally:
            self.tag, self.groups, self.row_weights = old

    # ---- accumulation (called from the hooks) ------------------------------------------------------------
    def add(self, layer: int, site: str, out: torch.Tensor, valid: torch.Tensor | None,
            zeros: torch.Tensor | None = None) -> None:
        """Count the zeros of ``out`` [..., d]; ``valid`` is a [batch, tokens] mask of real tokens or None.
        ``zeros``: the zero entries of each token of ``out`` (shape ``out.shape[:-1]``) where the caller has
        them already (a fused kernel counts them as it writes ``out``)."""
        if zeros is None:
            zeros = (out == 0).sum(dim=-1)  # [...]: zero entries per token
        elif zeros.shape != out.shape[:-1]:
            raise ValueError(f"zeros has shape {tuple(zeros.shape)}; one count per token of out {tuple(out.shape)} "
                             f"is {tuple(out.shape[:-1])}")
        names, weights, tokens = self._group_weights(valid, zeros)
        z = torch.mv(weights, zeros.reshape(-1).to(torch.float64))  # [G]: zeros of each group's tokens
        self._add_pending((self.tag, layer, str(site), names, None), z, tokens, out.shape[-1])

    def add_expert_call(self, layer: int, site: str) -> None:
        """One forward call of a layer's experts (every call, whichever experts it reached)."""
        key = (self.tag, layer, str(site))
        self._expert_calls[key] = self._expert_calls.get(key, 0) + 1

    def add_routed(self, layer: int, site: str, expert: int, out: torch.Tensor, tokens: torch.Tensor,
                   token_shape: tuple[int, ...], valid: torch.Tensor | None, zeros: torch.Tensor | None = None) -> None:
        """Count the zeros of expert ``expert``'s vectors ``out`` [n, d], one per routed token: ``tokens`` [n] are
        the tokens' flat indices into the layer's activations of shape ``token_shape`` ([batch, tokens]), so
        padding, token groups and row weights apply to them as to the dense FFN's."""
        if zeros is None:
            zeros = (out == 0).sum(dim=-1)
        shaped = torch.empty(token_shape, dtype=torch.bool, device=out.device)  # only its shape and device are read
        names, weights, _ = self._group_weights(valid, shaped)
        routed = weights[:, tokens.to(weights.device)]  # [G, n]: each routed token's weight in each group
        z = torch.mv(routed, zeros.to(torch.float64))
        self._add_pending((self.tag, layer, str(site), names, int(expert)), z, routed.sum(dim=-1), out.shape[-1])

    def _add_pending(self, key: tuple, z: torch.Tensor, tokens: torch.Tensor, width: int) -> None:
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = [z, tokens, 1, width]
        else:
            pending[0] = pending[0] + z
            pending[1] = pending[1] + tokens
            pending[2] += 1

    def _group_weights(self, valid: torch.Tensor | None, zeros: torch.Tensor) -> tuple:
        """(group names, token weights [G, N] float64, tokens per group [G]) for the tokens of ``zeros`` (N of
        them): group ``all`` (real tokens) and the caller's groups, each AND the padding mask, times the row
        weights. Built once per forward pass: every layer and site of it sees the same masks."""
        source = (valid, tuple(self.groups.items()), self.row_weights, zeros.shape, zeros.device)
        if self._weights is not None and _same(self._weights[0], source):
            return self._weights[1:]
        # Caller masks move to the activations' device once, not at every call (a copy that waits).
        for name, g in self.groups.items():
            if g.device != zeros.device:
                self.groups[name] = g.to(zeros.device)
        source = (valid, tuple(self.groups.items()), self.row_weights, zeros.shape, zeros.device)
        token_weights = self._token_weights(zeros)
        rows = []
        names = (ALL, *self.groups)
        for name in names:
            m = _combine(valid, None if name == ALL else self.groups[name], zeros)
            if token_weights is not None:
                m = token_weights if m is None else m * token_weights
            rows.append(torch.ones(zeros.shape, dtype=torch.float64, device=zeros.device) if m is None
                        else m.to(torch.float64))
        weights = torch.stack(rows).reshape(len(names), -1)
        self._weights = (source, names, weights, weights.sum(dim=-1))
        return self._weights[1:]

    def _flush(self) -> None:
        """Spread the pending per-(tag, layer, site) vectors into the per-group counts."""
        for (tag, layer, site, names, expert), (z, n, calls, width) in self._pending.items():
            for g, name in enumerate(names):
                if expert is None:
                    key, counts = (tag, name, layer, site), self._counts
                else:
                    key, counts = (tag, name, layer, site, expert), self._expert_counts
                c = counts.get(key)
                if c is None:
                    counts[key] = _Count(z[g], n[g], width, calls)
                else:
                    c.zeros = c.zeros + z[g]
                    c.tokens = c.tokens + n[g]
                    c.calls += calls
        self._pending.clear()

    def _token_weights(self, zeros: torch.Tensor) -> torch.Tensor | None:
        """The row weights broadcast over the tokens of ``zeros`` [batch, tokens] (None when unweighted)."""
        w = self.row_weights
        if w is None:
            return None
        if zeros.dim() != 2 or zeros.shape[0] != w.shape[0]:
            raise ValueError(f"row weights of shape {tuple(w.shape)} do not fit activations {tuple(zeros.shape)} "
                             "(one weight per batch row of [batch, tokens, features] activations)")
        if w.device != zeros.device:
            self.row_weights = w = w.to(zeros.device)  # once, not at every call
        return w[:, None].expand_as(zeros)

    def add_mask(self, layer: int, site: str, keep: torch.Tensor, expert: int | None = None,
                 tokens: torch.Tensor | None = None) -> None:
        """Record a keep-mask; an expert's mask [n, d] comes with its expert index and the flat indices [n] of the
        tokens routed to it (rows of the layer's [batch * tokens] activations)."""
        record = {"tag": self.tag, "layer": layer, "site": str(site), "keep": keep.detach().cpu()}
        if expert is not None:
            record.update(expert=int(expert), tokens=tokens.detach().cpu())
        self.masks.append(record)

    # ---- reports -------------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """One tidy row per (tag, group, layer, site): sparsity, tokens, width."""
        rows = []
        for (tag, group, layer, site), c in sorted(self.counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
            tokens = float(c.tokens)
            rows.append({
                "tag": tag, "group": group, "layer": layer, "site": site, "tokens": int(tokens), "width": c.width,
                "sparsity": float(c.zeros) / (tokens * c.width) if tokens else float("nan"),
            })
        for (tag, group, layer, site, expert), c in self.expert_counts.items():
            tokens = float(c.tokens)
            rows.append({
                "tag": tag, "group": group, "layer": layer, "site": site, "expert": expert, "tokens": int(tokens),
                "width": c.width, "sparsity": float(c.zeros) / (tokens * c.width) if tokens else float("nan"),
            })
        rows.sort(key=lambda r: (str(r["tag"]), r["group"], r["site"], r["layer"], r.get("expert", -1)))
        return rows

    def expert_fields(self, site: str) -> dict:
        """What a sweep row adds for routed experts (nothing for a model without them): ``sparsity_dense`` and
        ``sparsity_experts`` (the two parts of the pooled ``sparsity``, each a mean over its layers) and
        ``per_expert_sparsity`` {"layer/expert": [sparsity, tokens seen]}."""
        if not any(k[3] == str(site) for k in self.expert_counts):
            return {}
        return {"sparsity_dense": self.mean(site, part="dense"), "sparsity_experts": self.mean(site, part="experts"),
                "per_expert_sparsity": {f"{layer}/{e}": [v["sparsity"], v["tokens"]]
                                        for (layer, e), v in self.per_expert(site).items()}}

    def per_expert(self, site: str | None = None, tag: Hashable | None = None,
                   group: str = ALL) -> dict[tuple[int, int], dict]:
        """{(layer, expert): {"sparsity", "tokens"}} of routed experts, pooled over tags (or for one ``tag``);
        ``tokens`` = how many tokens the expert saw (an expert never routed to has no entry)."""
        site = self._one_site(site)
        zeros: dict[tuple[int, int], float] = {}
        entries: dict[tuple[int, int], float] = {}
        tokens: dict[tuple[int, int], float] = {}
        for (t, g, layer, s, expert), c in self.expert_counts.items():
            if s == site and g == group and (tag is None or t == tag):
                k = (layer, expert)
                zeros[k] = zeros.get(k, 0.0) + float(c.zeros)
                entries[k] = entries.get(k, 0.0) + float(c.tokens) * c.width
                tokens[k] = tokens.get(k, 0.0) + float(c.tokens)
        return {k: {"sparsity": zeros[k] / entries[k] if entries[k] else float("nan"), "tokens": int(tokens[k])}
                for k in sorted(zeros)}

    @property
    def tags(self) -> list:
        return list(dict.fromkeys(k[0] for k in self.counts))

    def per_layer(self, site: str | None = None, tag: Hashable | None = None, group: str = ALL,
                  part: str = "all") -> dict[int, float]:
        """Sparsity per layer, pooled over tags (or for one ``tag``); ``site`` may be omitted when only one
        site was measured. ``part``: ``"all"`` pools the dense FFN's vectors and the routed experts' (see the
        module docstring), ``"dense"`` / ``"experts"`` counts one of them."""
        if part not in ("all", "dense", "experts"):
            raise ValueError(f"part must be 'all', 'dense' or 'experts', got {part!r}")
        site = self._one_site(site)
        zeros: dict[int, float] = {}
        entries: dict[int, float] = {}
        counts = [] if part == "experts" else [(k, c) for k, c in self.counts.items()]
        if part != "dense":
            counts += [(k[:4], c) for k, c in self.expert_counts.items()]
        for (t, g, layer, s), c in counts:
            if s == site and g == group and (tag is None or t == tag):
                zeros[layer] = zeros.get(layer, 0.0) + float(c.zeros)
                entries[layer] = entries.get(layer, 0.0) + float(c.tokens) * c.width
        return {k: (zeros[k] / entries[k] if entries[k] else float("nan")) for k in sorted(zeros)}

    def mean(self, site: str | None = None, tag: Hashable | None = None, group: str = ALL, part: str = "all") -> float:
        """Mean over layers of the per-layer sparsity (the figure every curve uses as its x-axis)."""
        per = [v for v in self.per_layer(site, tag, group, part).values() if v == v]
        return sum(per) / len(per) if per else float("nan")

    def sites(self) -> list[str]:
        return sorted({k[3] for k in self.counts} | {k[3] for k in self.expert_counts})

    def forward_passes(self, site: str | None = None, tag: Hashable | None = None, group: str = ALL) -> int:
        """Forward passes of the model counted at ``site`` (pooled over tags, or for one ``tag``): every pass
        reaches each sparsified layer once, so this is the largest per-layer count of hook calls."""
        site = self._one_site(site)
        calls: dict[int, int] = {}
        for (t, g, layer, s), c in self.counts.items():
            if s == site and g == group and (tag is None or t == tag):
                calls[layer] = calls.get(layer, 0) + c.calls
        for (t, layer, s), n in self._expert_calls.items():
            if s == site and (tag is None or t == tag):
                calls[layer] = max(calls.get(layer, 0), n)  # a layer's dense FFN and experts run once per pass each
        return max(calls.values(), default=0)

    # ---- moving counts between processes ------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The counts as plain Python numbers, keyed like :attr:`counts`: picklable and device-free, so another
        process can send them (``torch.distributed.gather_object``) to be added with :meth:`merge`."""
        out = {k: (float(c.zeros), float(c.tokens), c.width, c.calls) for k, c in self.counts.items()}
        out.update({k: (float(c.zeros), float(c.tokens), c.width, c.calls) for k, c in self.expert_counts.items()})
        out.update({("expert_calls", *k): n for k, n in self._expert_calls.items()})
        return out

    def merge(self, snapshot: dict) -> None:
        """Add the counts of a :meth:`snapshot` (e.g. another rank's) to these statistics."""
        for key, value in snapshot.items():
            if key[0] == "expert_calls":
                self._expert_calls[key[1:]] = self._expert_calls.get(key[1:], 0) + int(value)
                continue
            zeros, tokens, width, calls = value
            counts = self.expert_counts if len(key) == 5 else self.counts
            c = counts.get(key)
            if c is None:
                counts[key] = _Count(torch.tensor(zeros, dtype=torch.float64),
                                          torch.tensor(tokens, dtype=torch.float64), int(width), int(calls))
                continue
            if c.width != width:
                raise ValueError(f"cannot merge counts of {key}: width {width} here vs {c.width} (another model?)")
            c.zeros = c.zeros + torch.tensor(zeros, dtype=torch.float64, device=c.zeros.device)
            c.tokens = c.tokens + torch.tensor(tokens, dtype=torch.float64, device=c.tokens.device)
            c.calls += int(calls)

    def _one_site(self, site: str | None) -> str:
        if site is not None:
            return str(site)
        sites = self.sites()
        if len(sites) != 1:
            raise ValueError(f"these statistics hold sites {sites}; name one with site=...")
        return sites[0]

    def to_dict(self) -> dict:
        return {
            "mean": {s: self.mean(s) for s in self.sites()},
            "per_layer": {s: self.per_layer(s) for s in self.sites()},
            "forward_passes": {s: self.forward_passes(s) for s in self.sites()},
            "records": self.records(),
            **({"per_expert": {s: {f"{layer}/{e}": v for (layer, e), v in self.per_expert(s).items()}
                               for s in self.sites()}} if self.expert_counts else {}),
        }

    def to_json(self, path=None, **kw) -> str:
        text = json.dumps(self.to_dict(), default=str, **kw)
        if path is not None:
            atomic_write_text(path, text)
        return text


def _same(a: tuple, b: tuple) -> bool:
    """Whether two (valid, groups, row weights, shape, device) sources name the very same objects: tensors by
    identity (a cached entry holds them, so their ids cannot be reused), the rest by value."""
    va, ga, wa, *rest_a = a
    vb, gb, wb, *rest_b = b
    return (va is vb and wa is wb and rest_a == rest_b and len(ga) == len(gb)
            and all(na == nb and ta is tb for (na, ta), (nb, tb) in zip(ga, gb, strict=True)))


def _combine(valid: torch.Tensor | None, group: torch.Tensor | None, zeros: torch.Tensor) -> torch.Tensor | None:
    """AND of the padding mask and a caller's group mask, aligned to the activations' token dims.

    Masks are [batch, S] with S >= tokens (a KV-cached decode step sees only the last tokens of the mask),
    so they are right-aligned. Activations that are not [batch, tokens, d] are counted whole.
    """
    shape, out = zeros.shape, None
    for m in (valid, group):
        if m is None:
            continue
        if len(shape) != 2 or m.dim() != 2 or m.shape[0] != shape[0] or m.shape[1] < shape[1]:
            if m is group:
                raise ValueError(f"token group mask of shape {tuple(m.shape)} does not fit activations {tuple(shape)}")
            continue
        m = m[:, m.shape[1] - shape[1]:].to(device=zeros.device, dtype=torch.bool)
        out = m if out is None else out & m
    return out
