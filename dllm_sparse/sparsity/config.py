"""One sparsity setting as one value: which FFN site, which rule, which layers (definitions: docs/sparsification.md).

    cfg = SparsityConfig("input", TopP(0.9))                    # every layer
    cfg = SparsityConfig.parse("input:top_p:0.9")               # the same, from a command line or model_args
    cfg.id                                                      # 'input:top_p:0.9:token'
    SparsityConfig.from_dict(cfg.to_dict()) == cfg              # True (JSON-able)

    with sparsify(model, cfg) as stats: ...                     # every entry point takes it:
    StepSparsity(cfg); accelerate_ffn(model, cfg)               # hooks, samplers, kernels,
    with scorer.sparsified(cfg): scorer.loglikelihood(pairs)    # likelihood scorers, sweeps, lm-eval

The id is ``site:rule:threshold:scope`` plus ``:layers=i/j/...`` when only some layers are sparsified. The
threshold is written with ``repr(float)``, the shortest text that reads back to the same float, so two
configurations share an id only when they compute the same thing (p = 0.12345671 and p = 0.12345674 differ,
so do 0.9999999 and 1). :meth:`SparsityConfig.parse` reads an id back. ``TopP(method=...)`` is not part of the
id: every method gives the same masks (tests/test_rules.py), so it is an implementation choice, kept by
:meth:`~SparsityConfig.to_dict` but not by the id.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dllm_sparse.sparsity.rules import SCOPES, SparsityRule, TopP, make_rule
from dllm_sparse.sparsity.sites import FFNSite

__all__ = ["SparsityConfig", "DENSE", "as_config", "slug"]

DENSE = "dense"
"""The label of the unsparsified model wherever a configuration id would go (sweep rows, cell keys, ids)."""

_LAYERS_PREFIX = "layers="
_DICT_KEYS = {"site", "rule", "threshold", "scope", "layers", "method"}


def _check_layers(layers: Any) -> tuple[int, ...] | None:
    """Layer indices as a sorted tuple of distinct ints (the hooks select each layer once, in order, so
    (2, 0) and (0, 2, 2) sparsify the same layers and get one id). Negative indices count from the end."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a sequence of layer indices such as (0, 3) (or None for every layer), "
                        f"got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold ints only, got {i!r} ({type(i).__name__}) in {layers!r}")
        out.append(int(i))
    if not out:
        raise ValueError("layers is empty: give at least one layer index, or layers=None for every layer")
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class SparsityConfig:
    """Sparsify ``site`` of the FFNs in ``layers`` (None: every layer) with ``rule``.

    ``site``: an :class:`FFNSite` or its name (``"input"``, ``"gate"``, ``"up"``, ``"intermediate"``).
    ``rule``: a :class:`~dllm_sparse.sparsity.rules.SparsityRule` such as ``TopP(0.9)``; build one from a name
    with :func:`~dllm_sparse.sparsity.rules.make_rule`, or a whole config from text with :meth:`parse`.
    """

    site: FFNSite
    rule: SparsityRule
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", FFNSite.parse(self.site))
        if not isinstance(self.rule, SparsityRule):
            raise TypeError(f"rule must be a SparsityRule such as TopP(0.9) (or use make_rule('top_p', 0.9), or "
                            f"SparsityConfig.parse('{self.site.value}:top_p:0.9')), got {self.rule!r}")
        object.__setattr__(self, "layers", _check_layers(self.layers))

    # ---- constructors ------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, site: FFNSite | str, scope: str = "token") -> SparsityConfig:
        """Top-p at p = 1 on ``site``: keeps every non-zero entry, so it changes no output; attaching it
        measures the site's natural sparsity (the dense baseline of a sweep does this)."""
        return cls(site, TopP(1.0, scope=scope))

    @classmethod
    def paper_llada(cls, p_percent: float) -> SparsityConfig:
        """The paper's LLaDA variant (docs/sparsification.md, "Paper-code compatibility"): the input site of
        ``up_proj`` only, with :class:`~dllm_sparse.sparsity.rules.PaperTopP` (p in percent, one selection per
        sample, strict <=, bf16 cumulative sum). For reproducing the paper's LLaDA figure only: comparisons
        between models use the spec's rule (``SparsityConfig("input", TopP(p))``) for both."""
        from dllm_sparse.sparsity.rules import PaperTopP

        return cls("input", PaperTopP(p_percent))

    @classmethod
    def parse(cls, text: str) -> SparsityConfig:
        """``"site:rule:threshold[:scope][:layers=i/j/...]"``, e.g. ``"input:top_p:0.9"``,
        ``"up:top_k:0.5:sequence"``, ``"gate:max_p:0.1:token:layers=0/1"``, ``"input:top_p:0.5:step"`` (one keep-set
        shared by the tokens of a call; ``step_wina`` weighs it by weight-column norms); the inverse of :attr:`id`."""
        if isinstance(text, SparsityConfig):
            return text
        if not isinstance(text, str):
            raise TypeError(f"SparsityConfig.parse takes a string such as 'input:top_p:0.9', got {text!r}")
        example = "expected site:rule:threshold[:scope][:layers=i/j/...], e.g. 'input:top_p:0.9'"
        parts = [p.strip() for p in text.strip().split(":")]
        layers = None
        if parts and parts[-1].startswith(_LAYERS_PREFIX):
            layers = _parse_layers(parts.pop()[len(_LAYERS_PREFIX):], text)
        if len(parts) not in (3, 4) or not all(parts):
            raise ValueError(f"cannot read sparsity config {text!r}: {example}")
        site, rule, threshold = parts[:3]
        scope = parts[3] if len(parts) == 4 else None  # None: the rule's default scope
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"cannot read sparsity config {text!r}: scope {scope!r} is not one of {SCOPES} "
                             f"({example})")
        try:
            value = float(threshold)
        except ValueError:
            raise ValueError(f"cannot read sparsity config {text!r}: threshold {threshold!r} is not a number "
                             f"({example})") from None
        try:
            return cls(site, make_rule(rule, value, scope=scope), layers)
        except ValueError as e:  # name the whole text: the bad part may come from a long command line
            raise ValueError(f"cannot read sparsity config {text!r}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> SparsityConfig:
        """The inverse of :meth:`to_dict`."""
        if not isinstance(d, dict):
            raise TypeError(f"SparsityConfig.from_dict takes a dict, got {d!r}")
        unknown = set(d) - _DICT_KEYS
        missing = {"site", "rule", "threshold"} - set(d)
        if unknown or missing:
            raise ValueError(f"not a sparsity config dict: {d!r} (missing {sorted(missing)}, unknown "
                             f"{sorted(unknown)}; keys are {sorted(_DICT_KEYS)})")
        rule = make_rule(d["rule"], d["threshold"], scope=d.get("scope", "token"))
        if "method" in d:
            if not isinstance(rule, TopP):
                raise ValueError(f"'method' applies to top_p only, got it for {rule.name}: {d!r}")
            rule = TopP(rule.p, scope=rule.scope, method=d["method"])
        return cls(d["site"], rule, d.get("layers"))

    # ---- descriptions ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able: ``{"site", "rule", "threshold", "scope", "layers"}`` (+ ``"method"`` for a top-p rule
        with a non-default method); :meth:`from_dict` gives back an equal config."""
        d = {"site": self.site.value, **self.rule.to_dict(),
             "layers": None if self.layers is None else list(self.layers)}
        if isinstance(self.rule, TopP) and self.rule.method != "auto":
            d["method"] = self.rule.method
        return d

    @property
    def id(self) -> str:
        """``site:rule:threshold:scope`` (+ ``:layers=i/j``), thresholds at full precision; see the module
        docstring. Used in cell keys, cache identities and file names."""
        text = f"{self.site.value}:{self.rule.name}:{float(self.rule.threshold)!r}:{self.rule.scope}"
        if self.layers is not None:
            text += f":{_LAYERS_PREFIX}{'/'.join(map(str, self.layers))}"
        return text

    @property
    def is_identity(self) -> bool:
        """True when the rule keeps every non-zero entry, so the config cannot change any output."""
        return self.rule.is_identity

    def __str__(self) -> str:
        return self.id


def _parse_layers(text: str, whole: str) -> tuple[int, ...]:
    if not re.fullmatch(r"-?\d+(/-?\d+)*", text):
        raise ValueError(f"cannot read sparsity config {whole!r}: layers {text!r} should be indices joined by "
                         f"'/', e.g. layers=0/1/5")
    return tuple(int(i) for i in text.split("/"))


def as_config(
    config: SparsityConfig | FFNSite | str | None,
    rule: SparsityRule | None = None,
    layers: Iterable[int] | None = None,
    *,
    site: FFNSite | str | None = None,
    caller: str = "sparsify",
) -> SparsityConfig:
    """The one config behind every entry point's two call forms: ``f(config)`` or the keyword convenience
    ``f(site=..., rule=..., layers=...)`` (also positionally: ``f("input", TopP(0.9))``)."""
    if isinstance(config, SparsityConfig):
        if rule is not None or layers is not None or site is not None:
            raise TypeError(f"{caller}: give either a SparsityConfig or site/rule/layers, not both "
                            f"(got {config!r} and site={site!r}, rule={rule!r}, layers={layers!r})")
        return config
    if config is not None and site is not None:
        raise TypeError(f"{caller}: the site is given twice ({config!r} and site={site!r})")
    site = config if config is not None else site
    if site is None or rule is None:
        raise TypeError(f"{caller} needs a SparsityConfig, e.g. {caller}(..., SparsityConfig('input', TopP(0.9))), "
                        f"or both a site and a rule, e.g. {caller}(..., site='input', rule=TopP(0.9)); "
                        f"got site={site!r}, rule={rule!r}")
    return SparsityConfig(site, rule, layers)


def slug(text: str) -> str:
    """A file-name-safe form of ``text``: lower case, runs of anything but letters and digits become ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
