"""The paper's LLaDA variant (docs/sparsification.md, "Paper-code compatibility"): PaperTopP on up_proj only."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.hooks import sparsify
from dllm_sparse.sparsity.rules import PaperTopP, TopP


def _bf16(v: float) -> float:
    return torch.tensor(v, dtype=torch.bfloat16).item()


def _reference_keep(sample: torch.Tensor, p_percent: float) -> torch.Tensor:
    """One sample [T, d], entry by entry: sort |v| descending (ties: original order); running sum kept as bf16
    prefix sums (what a bf16 cumsum stores: a float32 running sum rounded to bf16 at every prefix); share =
    prefix / total rounded to bf16; keep while share <= p / 100 (rounded to bf16, as the bf16 comparison does)."""
    flat = sample.reshape(-1).abs().to(torch.bfloat16).float().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    prefixes, running = [], 0.0
    for i in order:
        running = float(torch.tensor(running, dtype=torch.float32) + torch.tensor(flat[i], dtype=torch.float32))
        prefixes.append(_bf16(running))
    total = prefixes[-1]
    limit = _bf16(p_percent / 100.0)
    keep = [False] * len(flat)
    for i, prefix in zip(order, prefixes, strict=True):
        keep[i] = total > 0 and _bf16(prefix / total) <= limit and flat[i] != 0
    return torch.tensor(keep).reshape(sample.shape)


@pytest.mark.parametrize("p", [90.0, 50.0, 99.5])
def test_paper_top_p_equals_the_entry_by_entry_reference(p):
    g = torch.Generator().manual_seed(int(p))
    x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)
    x[0, 1, :3] = 0
    keep = PaperTopP(p).mask(x)
    for b in range(x.shape[0]):
        assert torch.equal(keep[b], _reference_keep(x[b], p))
    # Not the spec's rule: strict <= and bf16 shares (p = 99.5 % rounds to 99.6 % in bf16) keep other entries.
    assert not torch.equal(keep, TopP(p / 100, scope="sequence").mask(x))


def test_paper_top_p_validates_and_round_trips():
    with pytest.raises(ValueError, match="percent"):
        PaperTopP(0.0)
    with pytest.raises(ValueError, match="scope must be 'sequence'"):
        PaperTopP(90, scope="token")
    cfg = SparsityConfig.paper_llada(90)
    assert cfg.id == "input:paper_top_p:90.0:sequence"
    assert SparsityConfig.parse(cfg.id) == cfg and SparsityConfig.parse("input:paper_top_p:90") == cfg
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_llada_hooks_up_proj_only():
    model = build_tiny_model("llada")
    ffn0 = model.model.transformer.blocks[0]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def run():  # the inputs ff_proj and up_proj of layer 0 receive (capture hooks run after sparsify's)
        seen = {}
        hooks = [ffn0.ff_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("gate", a[0].clone())),
                 ffn0.up_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("up", a[0].clone()))]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
        return seen

    dense = run()
    with sparsify(model, SparsityConfig.paper_llada(60)) as stats:
        sparse = run()
    assert torch.equal(sparse["gate"], dense["gate"])  # ff_proj (the gate) reads the dense input
    assert torch.equal(sparse["up"], dense["up"].masked_fill(~PaperTopP(60).mask(dense["up"]), 0))
    assert not torch.equal(sparse["up"], dense["up"]) and stats.mean("input") > 0.2
