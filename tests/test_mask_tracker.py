"""MaskOverlapTracker: bit-packed storage and step-to-step overlaps checked against a direct computation on the
masks recorded by `sparsify(record_masks=True)`."""

import csv
import json

import numpy as np
import pytest
import torch

from dllm_sparse import TopP
from dllm_sparse.samplers import GenerationConfig, MaskOverlapTracker, PackedMask, StepSparsity, generate, mask_overlap

PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1]]




def test_mask_overlap_and_packing():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    jac, rec = mask_overlap(a, b)
    assert jac.tolist() == [1 / 3, 1.0, 1.0] and rec.tolist() == [0.5, 1.0, 1.0]
    x = torch.rand(3, 5, 13) > 0.5
    p = PackedMask.pack(x)
    assert p.bits.shape == (3, 5, 2) and p.bits.dtype == np.uint8 and p.nbytes == 30
    assert torch.equal(p.unpack(), x)


def _run(model, cfg, site="input", p=0.7, layers=None, prompts=PROMPTS, **tracker_kw):
    tracker = MaskOverlapTracker(layers=layers, **tracker_kw)
    sp = StepSparsity(site, TopP(p), record_masks=True, mask_observers=[tracker])
    out = generate(model, None, prompts, cfg, sparsity=sp, callbacks=[tracker])
    return out, sp, tracker


def _masks_by_step(sp, batch):
    """{(step, layer): keep [B, T, d]} from the statistics' recorded masks (conditional rows)."""
    return {(m["tag"], m["layer"]): m["keep"][:batch] for m in sp.stats.masks}


def _mean(values, sel):
    sel = sel.bool()
    return float(values[sel].double().mean()) if sel.any() else float("nan")


def _close(a, b):
    return (a != a and b != b) or abs(a - b) < 1e-12


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_diffusion_overlaps_match_direct_computation(llada, cfg_scale):
    geom = dict(gen_length=8, steps=8, block_length=4)  # 2 blocks x 4 steps
    out, sp, tracker = _run(llada, GenerationConfig(cfg_scale=cfg_scale, **geom))
    B, P, S = 2, out.prompt_length, out.sequences.shape[1]
    keeps = _masks_by_step(sp, B)
    # Token groups rebuilt independently from the trace: real positions, prompt, decoded before the step.
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, : P - len(PROMPTS[1])] = False
    prompt = torch.zeros(B, S, dtype=torch.bool)
    prompt[:, :P] = valid[:, :P]
    decoded = torch.zeros(B, S, dtype=torch.bool)
    rows = tracker.records()
    assert {r["step"] for r in rows} == set(range(8))
    for step in range(8):
        blk, sib = divmod(step, 4)
        groups = {"all": valid, "prompt": prompt, "decoded": decoded.clone(),
                  "masked": valid & ~prompt & ~decoded}
        for layer in range(2):
            fresh = keeps[(step, layer)]
            refs = {"block_start": keeps[(blk * 4, layer)]}
            if step > 0:
                refs["previous"] = keeps[(step - 1, layer)]
            for ref_name, ref in refs.items():
                jac, rec = mask_overlap(fresh, ref)
                for g, sel in groups.items():
                    got = [r for r in rows if r["step"] == step and r["layer"] == layer
                           and r["reference"] == ref_name and r["group"] == g]
                    assert len(got) == 1
                    assert got[0]["positions"] == int(sel.sum())
                    assert _close(got[0]["jaccard"], _mean(jac, sel)), (step, layer, ref_name, g)
                    assert _close(got[0]["recall"], _mean(rec, sel))
                    if ref_name == "block_start" and sib == 0:
                        assert got[0]["jaccard"] in (1.0,) or sel.sum() == 0  # a step against itself
            assert not [r for r in rows if r["step"] == 0 and r["reference"] == "previous"]
        for r, cols in enumerate(out.trace[step].committed):
            for c in cols:
                decoded[r, P + c] = True
    # overlaps are informative: consecutive steps are similar but not identical
    prev = tracker.per_step("jaccard", "previous")
    assert all(0.0 < v <= 1.0 for v in prev.values()) and min(prev.values()) < 1.0
    assert all(v == 1.0 for s, v in tracker.per_step("jaccard", "block_start").items() if s % 4 == 0)
    assert all(v == 1.0 for s, v in tracker.per_step("recall", "block_start").items() if s % 4 == 0)
    # bit-packed storage holds every step's mask
    for (step, layer), keep in keeps.items():
        assert torch.equal(tracker.mask(step, layer, "input"), keep)
    assert tracker.nbytes == 8 * 2 * B * S * (64 // 8)


def test_ar_overlaps_match_direct_computation(llama):
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    out, sp, tracker = _run(llama, cfg, site="intermediate", p=0.8, layers=[1])
    keeps = {}
    for m in sp.stats.masks:
        keeps[(0 if m["tag"] == "prefill" else m["tag"], m["layer"])] = m["keep"]
    assert keeps[(0, 1)].shape[1] == 5 and keeps[(3, 1)].shape[1] == 1
    rows = tracker.records()
    assert {r["layer"] for r in rows} == {1}
    for step in range(1, 6):
        fresh = keeps[(step, 1)][:, -1]
        for ref_name, ref in (("previous", keeps[(step - 1, 1)][:, -1]), ("block_start", keeps[(0, 1)][:, -1])):
            jac, rec = mask_overlap(fresh, ref)
            for g in ("all", "decoded"):
                got = [r for r in rows if r["step"] == step and r["reference"] == ref_name and r["group"] == g]
                assert len(got) == 1 and got[0]["positions"] == 2
                assert _close(got[0]["jaccard"], float(jac.double().mean()))
                assert _close(got[0]["recall"], float(rec.double().mean()))
    prefill = [r for r in rows if r["step"] == 0]
    assert {r["reference"] for r in prefill} == {"block_start"} and all(r["jaccard"] == 1.0 for r in prefill)


def test_exports(llada, tmp_path):
    out, sp, tracker = _run(llada, GenerationConfig(gen_length=8, steps=4, block_length=8), site="gate",
                            layers=[0, 1], store=False)
    assert tracker.masks == {} and tracker.nbytes == 0
    tracker.to_csv(tmp_path / "o.csv")
    with open(tmp_path / "o.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tracker.records()) > 0
    assert {"step", "layer", "site", "reference", "group", "jaccard", "recall"} <= set(rows[0])
    data = json.loads(tracker.to_json(tmp_path / "o.json"))
    assert len(data["records"]) == len(rows) and len(data["steps"]) == 4
    tracker.heatmap(tmp_path / "o.png", group="masked")
    assert (tmp_path / "o.png").stat().st_size > 1000
    layers, steps, values = tracker.matrix()
    assert layers == [0, 1] and steps == [1, 2, 3] and values.shape == (2, 3)
    with pytest.raises(KeyError, match="store=False"):
        tracker.mask(0, 0, "gate")


def test_tracker_follows_layer_and_site_filters(llada):
    tracker = MaskOverlapTracker(layers=[1], sites=["up"])
    sp = StepSparsity("input", TopP(0.7), mask_observers=[tracker])
    generate(llada, None, PROMPTS, GenerationConfig(gen_length=4, steps=4), sparsity=sp, callbacks=[tracker])
    assert tracker.records() == []  # site "input" is not tracked
    tracker = MaskOverlapTracker(layers=[1])
    sp = StepSparsity("input", TopP(0.7), mask_observers=[tracker])
    generate(llada, None, PROMPTS, GenerationConfig(gen_length=4, steps=4), sparsity=sp, callbacks=[tracker])
    assert {r["layer"] for r in tracker.records()} == {1}
    # a second generation is a new run; reports default to the latest
    generate(llada, None, PROMPTS, GenerationConfig(gen_length=4, steps=4), sparsity=sp, callbacks=[tracker])
    assert tracker.run == 1 and {r["run"] for r in tracker.records()} == {0, 1}
    assert tracker.per_step(run=0) == tracker.per_step(run=1)
