"""SparsityStats (dllm_sparse/stats.py) on hand-made tensors with hand-counted answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dllm_sparse import SparsityStats


def _acts(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# [batch 2, tokens 3, width 4]; zeros per token: row 0 -> 1, 2, 4; row 1 -> 0, 3, 1
X = _acts([
    [[1, 0, 2, 3], [0, 0, 5, 6], [0, 0, 0, 0]],
    [[1, 2, 3, 4], [0, 0, 0, 7], [0, 8, 9, 1]],
])


def test_known_sparsity_without_mask():
    s = SparsityStats()
    s.add(0, "input", X, None)
    (rec,) = s.records()
    assert rec == {"tag": "default", "group": "all", "layer": 0, "site": "input", "tokens": 6, "width": 4,
                   "sparsity": 11 / 24}
    assert s.per_layer() == {0: 11 / 24}
    assert s.mean() == 11 / 24 and s.mean("input") == 11 / 24


def test_padding_is_excluded():
    s = SparsityStats()
    valid = torch.tensor([[0, 1, 1], [1, 1, 0]])  # left-padded row 0, right-padded row 1
    s.add(0, "gate", X, valid)
    (rec,) = s.records()
    assert rec["tokens"] == 4
    assert rec["sparsity"] == (2 + 4 + 0 + 3) / 16
    # bool and float masks count the same
    s2 = SparsityStats()
    s2.add(0, "gate", X, valid.float())
    assert s2.records() == s.records()


def test_groups_and_tags_are_kept_apart():
    s = SparsityStats()
    masked = torch.tensor([[True, False, True], [False, False, True]])
    with s.tagged(3, groups={"masked": masked}) as same:
        assert same is s and s.tag == 3
        s.add(1, "up", X, None)
    assert s.tag == "default" and s.groups == {}  # restored
    s.add(1, "up", X[:, :1], None)  # untagged call: rows' first tokens, zeros 1 and 0
    recs = {(r["tag"], r["group"]): r for r in s.records()}
    assert set(recs) == {(3, "all"), (3, "masked"), ("default", "all")}
    assert recs[(3, "all")]["sparsity"] == 11 / 24
    assert recs[(3, "masked")]["tokens"] == 3
    assert recs[(3, "masked")]["sparsity"] == (1 + 4 + 1) / 12
    assert recs[("default", "all")]["sparsity"] == 1 / 8
    assert s.tags == [3, "default"]
    assert s.per_layer(tag=3) == {1: 11 / 24}
    assert s.per_layer(tag=3, group="masked") == {1: 0.5}
    assert s.per_layer(tag="default") == {1: 1 / 8}


def test_group_and_padding_combine():
    s = SparsityStats()
    valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with s.tagged("step", groups={"g": torch.tensor([[True, True, False], [True, False, False]])}):
        s.add(0, "input", X, valid)
    recs = {r["group"]: r for r in s.records()}
    assert recs["g"]["tokens"] == 2  # (0,1) and (1,0): (0,0) is padding
    assert recs["g"]["sparsity"] == (2 + 0) / 8
    assert recs["all"]["tokens"] == 5


def test_decode_step_masks_are_right_aligned():
    # a KV-cached decode step: activations [B, 1, d], masks [B, S] over the whole sequence so far
    step = _acts([[[0, 0, 1, 1]], [[0, 0, 0, 1]]])
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # row 1's newest position is padding
    s = SparsityStats()
    with s.tagged("decode", groups={"late": torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]).bool()}):
        s.add(0, "input", step, valid)
    recs = {r["group"]: r for r in s.records()}
    assert recs["all"]["tokens"] == 1 and recs["all"]["sparsity"] == 0.5
    assert recs["late"]["tokens"] == 1 and recs["late"]["sparsity"] == 0.5
    # two new tokens at once: the last two mask columns
    s2 = SparsityStats()
    s2.add(0, "input", torch.cat([step, step], dim=1), torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]]))
    (rec,) = s2.records()
    assert rec["tokens"] == 2 and rec["sparsity"] == (2 + 3) / 8


def test_masks_that_do_not_fit():
    s = SparsityStats()
    flat = X.reshape(6, 4)  # not [batch, tokens, d]: counted whole, the padding mask is ignored
    s.add(0, "input", flat, torch.tensor([[1, 0, 0], [1, 1, 1]]))
    assert s.records()[0]["tokens"] == 6
    with s.tagged("t", groups={"bad": torch.ones(3, 3, dtype=torch.bool)}):
        with pytest.raises(ValueError, match="token group mask"):
            s.add(0, "input", X, None)


def test_all_padding_gives_nan_and_mean_skips_it():
    s = SparsityStats()
    s.add(0, "input", X, torch.zeros(2, 3))
    s.add(1, "input", X, None)
    assert math.isnan(s.records()[0]["sparsity"])
    assert math.isnan(s.per_layer()[0])
    assert s.mean() == 11 / 24


def test_pooling_across_tags_and_mean_over_layers():
    s = SparsityStats()
    a = _acts([[[0, 1, 1, 1]]])  # 1 token, 1 zero
    b = _acts([[[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]]])  # 3 tokens, 6 zeros
    with s.tagged("A"):
        s.add(0, "input", a, None)
        s.add(1, "input", b, None)
    with s.tagged("B"):
        s.add(0, "input", b, None)
    # pooled over tags: entries, not tags, are averaged
    assert s.per_layer() == {0: (1 + 6) / 16, 1: 6 / 12}
    assert s.per_layer(tag="A") == {0: 1 / 4, 1: 1 / 2}
    assert s.per_layer(tag="B") == {0: 6 / 12}
    # the mean is over layers (each layer weighs the same)
    assert s.mean() == pytest.approx(((7 / 16) + 0.5) / 2, abs=1e-15)
    assert s.mean(tag="A") == pytest.approx(0.375, abs=1e-15)
    assert math.isnan(s.mean(tag="nope"))


def test_several_sites_need_a_name():
    s = SparsityStats()
    s.add(0, "input", X, None)
    s.add(0, "gate", X[:, :1], None)
    assert s.sites() == ["gate", "input"]
    with pytest.raises(ValueError, match="site="):
        s.per_layer()
    assert s.per_layer("gate") == {0: 1 / 8}
    assert s.mean(site="input") == 11 / 24


def test_records_and_json_round_trip(tmp_path):
    s = SparsityStats()
    for tag in ("prefill", 0, 1):
        with s.tagged(tag, groups={"first": torch.tensor([[True, False, False], [True, False, False]])}):
            for layer in (0, 1):
                s.add(layer, "intermediate", X * (layer + 1), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    recs = s.records()
    assert len(recs) == 3 * 2 * 2
    assert all(set(r) == {"tag", "group", "layer", "site", "tokens", "width", "sparsity"} for r in recs)
    assert all(isinstance(r["sparsity"], float) and isinstance(r["tokens"], int) for r in recs)
    text = s.to_json()
    back = json.loads(text)
    assert back["records"] == recs  # str and int tags survive json as they are
    d = s.to_dict()
    assert back["mean"] == d["mean"] == {"intermediate": s.mean("intermediate")}
    # json object keys are strings
    assert back["per_layer"] == {"intermediate": {str(k): v for k, v in d["per_layer"]["intermediate"].items()}}
    path = tmp_path / "stats.json"
    assert s.to_json(path, indent=1) == path.read_text()
    assert json.loads(path.read_text()) == back


def test_counts_accumulate_over_calls():
    s = SparsityStats()
    s.add(0, "up", X[:1], None)
    s.add(0, "up", X[1:], None)
    one = SparsityStats()
    one.add(0, "up", X, None)
    assert s.records() == one.records()


def test_record_masks_storage():
    s = SparsityStats(record_masks=True)
    keep = X != 0
    with s.tagged(5):
        s.add_mask(2, "gate", keep)
    (m,) = s.masks
    assert m["tag"] == 5 and m["layer"] == 2 and m["site"] == "gate"
    assert torch.equal(m["keep"], keep)


def test_forward_passes_and_merging_snapshots():
    """Counts split over two processes (snapshots merged) equal the counts of one process; forward passes are
    the calls that reached every layer."""
    whole, first, second = SparsityStats(), SparsityStats(), SparsityStats()
    for layer in (0, 1):
        for part, acts in ((first, X), (second, X[:, :2])):
            part.add(layer, "input", acts, None)
            whole.add(layer, "input", acts, None)
    whole.add(0, "input", X, None)  # a third call that reached layer 0 only (a layers= subset elsewhere)
    first.add(0, "input", X, None)
    assert whole.forward_passes("input") == 3 and first.forward_passes() == 2 and second.forward_passes() == 1
    snap = json.loads(json.dumps(list(second.snapshot().items())))  # plain numbers: survives any pickling
    merged = SparsityStats()
    merged.merge(first.snapshot())
    merged.merge({tuple(k): tuple(v) for k, v in snap})
    assert merged.records() == whole.records()
    # hand-counted: X has 11 zeros in 24 entries, X[:, :2] 6 in 16; layer 0 saw X, X[:, :2], X; layer 1 X, X[:, :2]
    assert merged.per_layer("input") == pytest.approx({0: 28 / 64, 1: 17 / 40})
    assert merged.forward_passes("input") == 3
    assert merged.to_dict()["forward_passes"] == {"input": 3}
    with pytest.raises(ValueError, match="width"):
        merged.merge({("default", "all", 0, "input"): (1.0, 1.0, 8, 1)})


# Tensor -> Python conversions that wait for the device (a host sync per call on a GPU).
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("site", ["input", "gate", "up", "intermediate"])
def test_a_sparsified_forward_reads_nothing_back_from_the_device(site, tiny_llama, token_ids, monkeypatch):
    """Counting stays on the device: no statistics or hook code converts a tensor to a Python value during the
    forward (every call would stall a GPU), with padding, token groups and row weights all in play; the counts
    are read once, by the report. The model's own code is not counted, only calls made from dllm_sparse."""
    import sys
    from pathlib import Path

    from dllm_sparse import TopP, sparsify

    package = str(Path(sys.modules["dllm_sparse"].__file__).parent)
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        return wrapper

    valid = torch.ones_like(token_ids)
    valid[0, :2] = 0  # left padding
    group = torch.zeros_like(token_ids, dtype=torch.bool)
    group[:, -3:] = True
    weights = torch.tensor([1.0, 3.0])
    # The bisection selection has no Python reads either (the CPU histogram reads one bucket size per call).
    with sparsify(tiny_llama, site, TopP(0.8, method="bisect")) as stats, torch.no_grad():
        for name in _HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        with stats.tagged("step", groups={"late": group}, row_weights=weights):
            tiny_llama(token_ids, attention_mask=valid)
            tiny_llama(token_ids, attention_mask=valid)
        monkeypatch.undo()
    assert calls == []
    # ... and the counts are right: an independent count of the zeros the hooks produced.
    recs = {(r["group"], r["layer"]): r for r in stats.records()}
    assert {g for g, _ in recs} == {"all", "late"}
    assert recs[("all", 0)]["tokens"] == 2 * (5 * 1 + 7 * 3)  # two calls, real tokens x row weight
    assert recs[("late", 1)]["tokens"] == 2 * (3 * 1 + 3 * 3)


def test_counts_follow_every_change_of_masks_groups_and_weights_between_calls():
    """The token weights are built once per forward pass and reused while the masks are the same objects: a new
    attention mask, group mask or row weight (same shapes) must be picked up at once. Reference: the
    definition, token by token."""
    g = torch.Generator().manual_seed(0)
    s = SparsityStats()
    ref: dict[tuple, list[float]] = {}

    def expect(tag, layer, out, valid, groups, weights):
        zeros = (out == 0).sum(-1).double()
        w = torch.ones(zeros.shape, dtype=torch.float64) if weights is None else weights[:, None].expand_as(zeros)
        v = torch.ones(zeros.shape, dtype=torch.bool) if valid is None else valid.bool()
        for name, m in {"all": v, **{k: gm & v for k, gm in groups.items()}}.items():
            acc = ref.setdefault((tag, name, layer), [0.0, 0.0])
            acc[0] += float((zeros * w * m).sum())
            acc[1] += float((w * m).sum())

    for step in range(6):
        valid = (torch.rand(2, 5, generator=g) > 0.3).long()
        groups = {"a": torch.rand(2, 5, generator=g) > 0.5, "b": torch.rand(2, 5, generator=g) > 0.5}
        weights = None if step % 2 else torch.tensor([1.0, float(step + 1)])
        with s.tagged(f"t{step % 3}", groups, weights):
            for call in range(3):  # three layers of one forward pass share the masks; then they change
                out = torch.randn(2, 5, 8, generator=g).masked_fill(torch.rand(2, 5, 8, generator=g) > 0.6, 0)
                s.add(call, "up", out, valid)
                expect(f"t{step % 3}", call, out, valid, groups, weights)
                if call == 1:  # the same group dict, one mask replaced in place between two calls
                    groups["a"] = ~groups["a"]
                    s.groups["a"] = groups["a"]
    got = {(tag, group, layer): [float(c.zeros), float(c.tokens)] for (tag, group, layer, _), c in s.counts.items()}
    assert got.keys() == ref.keys()
    for key, (zeros, tokens) in ref.items():
        assert got[key] == pytest.approx([zeros, tokens], abs=1e-9), key
    assert s.forward_passes("up") == 6
