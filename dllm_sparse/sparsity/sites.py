"""The four FFN sites of a gated FFN  y = W_down( act(W_gate x) * (W_up x) )  (definitions: docs/sparsification.md)."""

from __future__ import annotations

from enum import Enum


class FFNSite(str, Enum):
    INPUT = "input"  # x, shared input of gate and up projections (d_model)
    GATE = "gate"  # act(W_gate x) (d_ff)
    UP = "up"  # W_up x (d_ff)
    INTERMEDIATE = "intermediate"  # act(W_gate x) * (W_up x), input of W_down (d_ff)

    @classmethod
    def parse(cls, site: FFNSite | str) -> FFNSite:
        if isinstance(site, FFNSite):
            return site
        try:
            return cls(str(site).lower())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown FFN site {site!r}; choose one of: {names}") from None

    def __str__(self) -> str:
        return self.value


ALL_SITES = tuple(FFNSite)
