"""experiments/decode_bench.py's captured AR step: one decode step over a StaticCache at a fixed position gives the
token a full forward pass over prompt + first token gives, and gives it again when replayed (the cache rewinds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("decode_bench", ROOT / "experiments" / "decode_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_ar_step_matches_a_full_forward_and_replays(llama):
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 9):
        prompt = torch.randint(3, 100, (1, n), generator=g)
        step = bench.ar_step(llama, prompt)
        with torch.no_grad():
            first = llama(input_ids=prompt).logits[:, -1:].argmax(-1)
            full = llama(input_ids=torch.cat([prompt, first], 1)).logits[:, -1:]
        got = [step() for _ in range(3)]  # replays rewrite the same slot: the same answer each time
        for tok in got:
            assert torch.equal(tok, full.argmax(-1)), (n, tok, full.argmax(-1))
