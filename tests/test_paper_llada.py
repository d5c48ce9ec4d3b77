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
    """One bf16 sample [T, d], entry by entry: sort |v| descending (ties: original order); running sum kept as
    bf16 prefix sums (what a bf16 cumsum stores: a float32 running sum rounded to bf16 at every prefix); share =
    prefix / total rounded to bf16; keep while share <= p / 100 (rounded to bf16, as the bf16 comparison does);
    the largest entry when that keeps none."""
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
    if not any(keep) and total > 0:
        keep[order[0]] = True  # nothing within p: the largest entry is kept
    return torch.tensor(keep).reshape(sample.shape)


def _paper_top_p(tensor: torch.Tensor, p_percent: float) -> torch.Tensor:
    """The paper's LLaDA hook's top-p, written from its definition: per sample, |v| flattened over tokens x
    features in the tensor's own dtype, ``torch.sort`` descending (not stable), ``torch.cumsum``, divided by the
    total when it is positive, kept where the share is <= p / 100, the largest kept when none is. Returns the
    sparsified tensor (the entries outside the mask zeroed)."""
    flat = tensor.reshape(tensor.shape[0], -1)
    out = torch.zeros_like(flat)
    for i in range(flat.shape[0]):
        vals, idx = torch.sort(flat[i].abs(), descending=True)
        csum = torch.cumsum(vals, dim=0)
        if csum[-1] > 0:
            csum = csum / csum[-1]
        keep_sorted = csum <= p_percent / 100
        if not keep_sorted.any():
            keep_sorted[0] = True
        mask = torch.zeros_like(flat[i], dtype=torch.bool)
        mask[idx[keep_sorted]] = True
        out[i][mask] = flat[i][mask]
    return out.reshape(tensor.shape)


def _tie_free(shape, dtype, g):
    """Magnitudes that are all distinct in ``dtype`` (so any sort gives the same order), random signs: a
    permutation of 1..n (exact in bf16 up to 256) scaled by 2^-3, plus, above bf16, a fraction below 1/2."""
    n = shape[-2] * shape[-1]
    rows = []
    for _ in range(shape[0]):
        mag = torch.randperm(n, generator=g).double() + 1
        if dtype != torch.bfloat16:
            mag = mag + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        rows.append((mag * sign / 8).reshape(shape[1:]))
    x = torch.stack(rows).to(dtype)
    assert all(len(set(r.abs().flatten().tolist())) == n for r in x)  # the construction: no ties
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("p", [90.0, 50.0, 99.5, 5.0])
def test_paper_top_p_equals_the_papers_function_on_tie_free_inputs(dtype, p):
    g = torch.Generator().manual_seed(int(p * 10))
    x = _tie_free((3, 6, 20), dtype, g)
    assert torch.equal(PaperTopP(p)(x), _paper_top_p(x, p))  # in the input's dtype, float32 included


def test_paper_top_p_keeps_the_largest_entry_when_nothing_is_within_p():
    x = torch.tensor([[[100.0, 1.0, -2.0], [0.5, 3.0, 0.25]]])  # the largest entry alone holds 94 % of the mass
    for dtype in (torch.float32, torch.bfloat16):
        keep = PaperTopP(50)(x.to(dtype))
        assert torch.equal(keep, _paper_top_p(x.to(dtype), 50)) and int((keep != 0).sum()) == 1 and keep[0, 0, 0] == 100
    zeros = torch.zeros(1, 2, 3)  # nothing to keep: the paper keeps its zeros, the output is the same
    assert torch.equal(PaperTopP(50)(zeros), _paper_top_p(zeros, 50)) and not PaperTopP(50).mask(zeros).any()


def test_paper_top_p_ties_at_the_cut_keep_the_lowest_indices_and_the_papers_count():
    # |v| = 4, 2, 2, 2, 2 (total 12): shares 1/3, 1/2, 2/3, 5/6, 1. p = 70 % keeps the 4 and two of the four 2s;
    # which two the paper keeps depends on its unstable sort, so only the count and the untied entry are compared.
    x = torch.tensor([[[2.0, -2.0, 4.0, 2.0, -2.0]]])
    keep = PaperTopP(70).mask(x)
    paper = _paper_top_p(x, 70) != 0
    assert int(keep.sum()) == int(paper.sum()) == 3 and keep[0, 0, 2] and paper[0, 0, 2]
    assert keep[0, 0].tolist() == [True, True, True, False, False]  # the lowest-index 2s


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


def test_paper_input_and_intermediate_script_is_the_two_configs_together():
    """docs/sparsification.md: the paper's input + intermediate script = input:paper_top_p and
    intermediate:paper_top_p attached together (up_proj's input and ff_out's input sparsified, ff_proj dense)."""
    from byte_tokenizer import ByteTokenizer

    from dllm_sparse.eval.scoring.scorer import Scorer

    model = build_tiny_model("llada")
    block = model.model.transformer.blocks[0]
    configs = [SparsityConfig.paper_llada(60), SparsityConfig.parse("intermediate:paper_top_p:60:sequence")]
    scorer = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, sparsity=configs)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def run():  # what ff_proj, up_proj and ff_out of layer 0 receive (registered last: after sparsify's hooks)
        seen = {}
        hooks = [getattr(block, n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
                 for n in ("ff_proj", "up_proj", "ff_out")]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
        return seen

    dense = run()
    with scorer.attached():
        seen = run()
    assert torch.equal(seen["ff_proj"], dense["ff_proj"])
    assert torch.equal(seen["up_proj"], PaperTopP(60)(dense["up_proj"]))
    # ff_out reads the intermediate computed from the sparse up input, then its own paper top-p
    with torch.no_grad():
        act = block.act(block.ff_proj(dense["ff_proj"])) * block.up_proj(seen["up_proj"])
    assert torch.equal(seen["ff_out"], PaperTopP(60)(act))
