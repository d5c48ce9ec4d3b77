"""experiments/trajectory_frontier.py: strategy names, the smoke run end to end, and its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_sparse.eval.trajectory_frontier import _ratio_interval, parse_strategy, summarise
from dllm_sparse.samplers.step_delta import StepDelta

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["dense", "token-intermediate:0.9", "step-input:0.95", "step-intermediate:0.9@every4",
                                  "delta-input:0.25/0.5@block_start", "delta-intermediate:0.3+block@every8",
                                  "delta-intermediate:0.3,oracle@block_start", "cache-dual", "cache-prefix",
                                  "cache-dual+delta-intermediate:0.3+block@block_start", "cache-prefix+step-input:0.9"])
def test_strategy_names_round_trip(name):
    s = parse_strategy(name)
    assert s.name == name
    if s.kind == "delta":
        assert isinstance(s.delta, StepDelta)
        assert s.delta.name == name.split("+", 1)[1] if name.startswith("cache-") else s.delta.name == name
    assert s.block_cache == ({"cache-dual": "dual", "cache-prefix": "prefix"}.get(name.split("+")[0]))


@pytest.mark.parametrize("name,match", [
    ("token-intermediate:0.9@every4", "not reused across steps"),
    ("step-input:1.5", "p must be in"),
    ("step-input:0.9@sometimes", "unknown reuse policy"),
    ("delta-input:0.25", "needs both fractions"),
    ("delta-intermediate:0.3/0.5", "takes one fraction"),
    ("delta-input:0/0.5", "fraction must be a number in"),
    ("fast", "unknown strategy"),
    ("cache-suffix", "unknown strategy"),
    ("cache-dual+cache-prefix", "one block cache"),
    ("cache-dual+delta-input:0.25", "needs both fractions"),
])
def test_bad_strategy_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        parse_strategy(name)


def test_agreement_is_the_ratio_of_sums_with_a_bootstrap_interval():
    items = [{"hits": 9, "commits": 10, "same_tokens": 5, "tokens": 10, "probe_hit": True, "ffn_work": 0.3},
             {"hits": 30, "commits": 30, "same_tokens": 10, "tokens": 10, "probe_hit": False, "ffn_work": 0.5}]
    out = summarise(items)
    assert out["replay_agreement"] == 39 / 40 and out["free_agreement"] == 15 / 20
    assert out["probe_score"] == 1 and out["probe_items"] == 2 and out["ffn_work"] == 0.4
    lo, hi = out["replay_ci"]
    assert 0.9 <= lo <= 39 / 40 <= hi <= 1.0  # resampling two prompts: 0.9 (first twice) .. 1.0 (second twice)
    assert _ratio_interval([1.0] * 5, [1.0] * 5) == (1.0, 1.0)


def test_the_smoke_run_writes_every_output(tmp_path):
    out = tmp_path / "tf"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "trajectory_frontier.py"), "--smoke",
                        "--threads", "1", "--strategies", "step-intermediate:0.9@block_start",
                        "delta-input:0.25/0.5@block_start", "delta-input:1/1@block_start",
                        "--output-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "trajectory_frontier.json").read_text())
    rows = {row["strategy"]: row for row in res["rows"]}
    assert set(rows) == {"dense", "step-intermediate:0.9@block_start", "delta-input:0.25/0.5@block_start",
                         "delta-input:1/1@block_start"}
    assert rows["dense"]["quality"]["replay_agreement"] == 1.0
    exact = rows["delta-input:1/1@block_start"]["quality"]  # every feature recomputed: the dense trajectory
    assert exact["replay_agreement"] == 1.0 and exact["free_agreement"] == 1.0
    assert 0.3 < rows["delta-input:0.25/0.5@block_start"]["quality"]["ffn_work"] < 0.6
    for row in res["rows"]:
        assert set(row["timing"]) == {"1", "2"} and row["timing"]["1"]["step_s"] > 0
    timed = rows["delta-input:0.25/0.5@block_start"]["timing"]["1"]
    assert 0.2 < timed["ffn_share"] < 0.9  # the tiny model: 3 FFN matrices of 64x128 against attention and head
    assert timed["flop_bound"] == pytest.approx(1 / (1 - timed["ffn_share"] * (1 - timed["ffn_work"])))
    assert rows["delta-input:1/1@block_start"]["timing"]["1"]["flop_bound"] <= 1.0
    assert (out / "trajectory_frontier.png").stat().st_size > 1000
    assert "| delta-input:0.25/0.5@block_start |" in (out / "summary.md").read_text()


def test_quality_from_an_earlier_run_is_checked(tmp_path):
    """--quality-from takes the quality rows of a run with the same settings, and refuses another's, naming it."""
    from dllm_sparse.eval.trajectory_frontier import reused_quality

    res = {"model": "m", "dtype": "fp32", "gen_length": 64, "block_length": 32, "quality_prompts": 6}
    q = {"replay_agreement": 0.99}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**res, "rows": [{"strategy": "dense", "quality": q},
                                                {"strategy": "delta-input:0.25/0.5@block_start", "quality": q}]}))
    assert reused_quality(path, res, ["dense"]) == {"dense": {"quality": q}}
    with pytest.raises(ValueError, match="gen_length: 64 there, 32 here"):
        reused_quality(path, {**res, "gen_length": 32}, ["dense"])
    with pytest.raises(ValueError, match=r"no quality for \['token-input:0.9'\]"):
        reused_quality(path, res, ["dense", "token-input:0.9"])
    # several files: each strategy from the first that has it, the judgement against a cache carried with it
    q2, vs = {"replay_agreement": 0.5}, {"replay_agreement": 0.97}
    more = tmp_path / "more.json"
    more.write_text(json.dumps({**res, "rows": [{"strategy": "dense", "quality": q2},
                                                {"strategy": "cache-dual+token-input:0.9", "quality": q2,
                                                 "quality_vs_cache": vs}]}))
    got = reused_quality([path, more], res, ["dense", "cache-dual+token-input:0.9"])
    assert got == {"dense": {"quality": q}, "cache-dual+token-input:0.9": {"quality": q2, "quality_vs_cache": vs}}
    with pytest.raises(ValueError, match="quality_prompts: 6 there, 8 here"):
        reused_quality([path, more], {**res, "quality_prompts": 8}, ["dense"])


def test_the_smoke_run_with_a_block_cache(tmp_path):
    """A strategy on a cache is judged against dense and against the cache alone; a delta recomputing every feature
    on the cache is the cache alone (agreement 1 with it)."""
    out = tmp_path / "tfc"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "trajectory_frontier.py"), "--smoke",
                        "--threads", "1", "--batches", "1", "--strategies", "cache-dual",
                        "cache-dual+delta-input:1/1@block_start", "cache-dual+delta-intermediate:0.25@block_start",
                        "--output-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["strategy"]: row for row in json.loads((out / "trajectory_frontier.json").read_text())["rows"]}
    exact = rows["cache-dual+delta-input:1/1@block_start"]
    assert exact["quality_vs_cache"]["replay_agreement"] == 1.0 and exact["quality_vs_cache"]["free_agreement"] == 1.0
    assert exact["quality"]["free_agreement"] == rows["cache-dual"]["quality"]["free_agreement"]
    assert "quality_vs_cache" not in rows["cache-dual"] and "vs_cache" not in rows["cache-dual"]["timing"]["1"]
    vs = rows["cache-dual+delta-intermediate:0.25@block_start"]["timing"]["1"]["vs_cache"]
    assert vs["speedup"] > 0 and vs["speedup_range"][0] <= vs["speedup_range"][1]
    assert "against the cache alone" in (out / "summary.md").read_text()
