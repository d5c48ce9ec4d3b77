"""The four FFN sites of a gated FFN  y = W_down( act(W_gate x) * (W_up x) )  (definitions: docs/sparsification.md)."""

from __future__ import annotations

import argparse
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


def parse_sites(values) -> list[str]:
    """Site names from a command line: ``["input", "gate"]`` (space-separated, the scripts' convention) or
    ``"input,gate"`` (one comma-separated string); each checked, duplicates refused."""
    if isinstance(values, str):
        values = [values]
    names = [str(FFNSite.parse(part.strip())) for v in values for part in str(v).split(",") if part.strip()]
    if not names:
        raise ValueError("no FFN site given; choose from: " + ", ".join(s.value for s in FFNSite))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"FFN site(s) {', '.join(dup)} given twice; name each site once")
    return names


class SitesAction(argparse.Action):
    """``ap.add_argument("--sites", nargs="+", action=SitesAction)``: :func:`parse_sites` with argparse's error."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_sites(values))
        except ValueError as e:
            parser.error(f"{option_string}: {e}")
