"""experiments/trajectory_frontier.py: strategy names, the smoke run end to end, and its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_sparse.eval.studies.trajectory_frontier import _ratio_interval, parse_strategy, summarise
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
    assert summarise([*items, {**items[0], "hits": None, "commits": None}])["replay_agreement"] == 39 / 40
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
                        "delta-input:0.25/0.5@block_start", "delta-input:1/1@block_start", "--profile",
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
    for row in res["rows"]:  # --profile: a step's time split by op group, the groups within the wall time
        pr = row["timing"]["1"]["profile"]
        assert pr["matmul_ms"] > 0 and pr["attention_ms"] > 0 and pr["other_ops_ms"] > 0
        assert pr["unattributed_ms"] == pytest.approx(pr["wall_ms"] - pr["matmul_ms"] - pr["attention_ms"]
                                                      - pr["other_ops_ms"])
        assert pr["unattributed_ms"] > -0.05 * pr["wall_ms"]  # op self times on one thread never exceed the wall
    assert "Where a step's time goes" in (out / "summary.md").read_text()


def _item(i, hits, commits=10, same=5, probe=True, sha=None):
    from dllm_sparse.eval.studies.trajectory_frontier import prompt_fingerprint

    return {"prompt": i, "prompt_sha": sha or prompt_fingerprint(f"p{i}"), "hits": hits, "commits": commits if hits
            is not None else None, "same_tokens": same, "tokens": 10, "probe_hit": probe, "ffn_work": None}


def test_quality_from_earlier_runs_is_checked_and_merged_prompt_by_prompt(tmp_path):
    """--quality-from takes the per-prompt items of runs with the same settings, merges them over prompts and
    summarises afresh; another setting, a missing prompt, another prompt under the same index are refused."""
    from dllm_sparse.eval.studies.trajectory_frontier import prompt_fingerprint, reused_quality

    res = {"model": "m", "dtype": "fp32", "gen_length": 64, "block_length": 32, "first_prompt": 0}
    shas = [prompt_fingerprint(f"p{i}") for i in range(4)]
    head = tmp_path / "head.json"  # prompts 0-1 with replay
    head.write_text(json.dumps({**res, "rows": [
        {"strategy": "dense", "quality": summarise([_item(0, 10), _item(1, 10)])},
        {"strategy": "s", "quality": summarise([_item(0, 9), _item(1, 7)]),
         "quality_vs_cache": summarise([_item(0, 10), _item(1, 8)])}]}))
    tail = tmp_path / "tail.json"  # prompts 2-3 free-running only (and a repeat of prompt 1, which head gives)
    tail.write_text(json.dumps({**res, "first_prompt": 2, "rows": [
        {"strategy": "dense", "quality": summarise([_item(2, None), _item(3, None)])},
        {"strategy": "s", "quality": summarise([_item(1, 0, probe=False), _item(2, None, same=1, probe=False),
                                                _item(3, None, same=3)]),
         "quality_vs_cache": summarise([_item(2, None), _item(3, None)])}]}))
    got = reused_quality([head, tail], res, ["dense", "s"], shas)
    q = got["s"]["quality"]
    # an independent count: replay on prompts 0-1 (9 + 7 of 20), free on all four (5 + 5 + 1 + 3 of 40)
    assert q["replay_agreement"] == 16 / 20 and q["replay_prompts"] == 2 and q["prompts"] == 4
    assert q["free_agreement"] == 14 / 40 and (q["probe_score"], q["probe_items"]) == (3, 4)
    assert got["s"]["quality_vs_cache"]["replay_agreement"] == 18 / 20
    assert got["dense"]["quality"]["replay_agreement"] == 1.0
    # a table over the first two prompts needs only head
    two = reused_quality(head, res, ["s"], shas[:2])["s"]["quality"]
    assert two["replay_agreement"] == 16 / 20 and two["prompts"] == 2
    with pytest.raises(ValueError, match="gen_length: 64 there, 32 here"):
        reused_quality(head, {**res, "gen_length": 32}, ["dense"], shas[:2])
    with pytest.raises(ValueError, match=r"no item for prompt\(s\) \[2, 3\]; measure them \(--first-prompt 2"):
        reused_quality(head, res, ["dense"], shas)
    with pytest.raises(ValueError, match=r"no quality for 'token-input:0.9'"):
        reused_quality(head, res, ["token-input:0.9"], shas[:2])
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] were other prompts there"):
        reused_quality(head, res, ["dense"], [shas[0], prompt_fingerprint("another prompt")])
    old = tmp_path / "old.json"  # written before items carried fingerprints
    old.write_text(json.dumps({**res, "rows": [{"strategy": "dense", "quality": {"items": [
        {k: v for k, v in _item(0, 10).items() if k != "prompt_sha"}]}}]}))
    with pytest.raises(ValueError, match="no prompt fingerprint"):
        reused_quality(old, res, ["dense"], shas[:1])


def test_a_free_running_only_run_merges_with_a_replayed_one(tmp_path):
    """The smoke twin: prompt 0 replayed, prompts 1-2 free-running only, merged into one 3-prompt table whose
    numbers equal one run over the three prompts with replay where it was replayed."""
    script = [sys.executable, str(ROOT / "experiments" / "trajectory_frontier.py"), "--smoke", "--threads", "1",
              "--strategies", "delta-input:0.25/0.5@block_start"]

    def run(*extra):
        r = subprocess.run([*script, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]

    run("--skip-timing", "--output-dir", str(tmp_path / "a"))  # smoke: prompts 0-1, replayed
    run("--skip-timing", "--skip-replay", "--first-prompt", "1", "--output-dir", str(tmp_path / "b"))  # 1-2
    b = json.loads((tmp_path / "b" / "trajectory_frontier.json").read_text())
    assert all(it["hits"] is None for r in b["rows"] for it in r["quality"]["items"])
    assert [it["prompt"] for it in b["rows"][1]["quality"]["items"]] == [1, 2]
    assert 0.0 < b["rows"][1]["quality"]["ffn_work"] < 1.0  # without a replay: the free run's FFN work
    a = json.loads((tmp_path / "a" / "trajectory_frontier.json").read_text())
    from dllm_sparse.eval.studies.trajectory_frontier import prompt_fingerprint, reused_quality

    res = {k: a[k] for k in ("model", "dtype", "gen_length", "block_length")} | {"first_prompt": 0}
    shas = [it["prompt_sha"] for it in a["rows"][0]["quality"]["items"]] + [
        b["rows"][0]["quality"]["items"][1]["prompt_sha"]]
    assert shas[0] == prompt_fingerprint([5, 17, 3, 9, 40, 2])
    got = reused_quality([tmp_path / "a" / "trajectory_frontier.json", tmp_path / "b" / "trajectory_frontier.json"],
                         res, ["dense", "delta-input:0.25/0.5@block_start"], shas)
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        merged, replayed = got[row_a["strategy"]]["quality"], row_a["quality"]
        assert merged["prompts"] == 3 and merged["replay_prompts"] == 2
        assert merged["replay_agreement"] == replayed["replay_agreement"]
        # prompt 1 ran free in both runs (greedy): head's item is kept, and it equals the tail's
        assert merged["items"][1] == replayed["items"][1]
        assert merged["items"][1]["same_tokens"] == row_b["quality"]["items"][0]["same_tokens"]
        assert merged["items"][2] == row_b["quality"]["items"][1]


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


def test_timing_from_an_earlier_run_is_checked(tmp_path):
    """--timing-from takes the timing rows of a run timed with the same settings and carries its conditions;
    another setting or an untimed strategy is refused, naming it."""
    from dllm_sparse.eval.studies.trajectory_frontier import reused_timing

    res = {"model": "m", "dtype": "fp32", "threads": 2, "canvas": 128, "timing_steps": 32, "repeats": 5,
           "batches": [1, 4], "block_length": 32}
    t = {"1": {"speedup": 1.3}, "4": {"speedup": 1.4}}
    path = tmp_path / "timed.json"
    path.write_text(json.dumps({**res, "command": "python x", "machine": {"cpu": "c"}, "load_before": 0.1,
                                "load_after": 2.0, "noisy": False,
                                "rows": [{"strategy": "dense", "timing": t}, {"strategy": "s", "timing": t}]}))
    got = dict(res)
    assert reused_timing(path, got, ["dense", "s"]) == {"dense": t, "s": t}
    assert got["timing_source"]["command"] == "python x" and got["timing_source"]["load_after"] == 2.0
    with pytest.raises(ValueError, match="threads: 2 there, 1 here"):
        reused_timing(path, {**res, "threads": 1}, ["dense"])
    with pytest.raises(ValueError, match=r"no timing for \['other'\]"):
        reused_timing(path, dict(res), ["dense", "other"])
