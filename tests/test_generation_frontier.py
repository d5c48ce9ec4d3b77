"""The whole-generation frontier (dllm_sparse.eval.studies.generation_frontier): strategy names, the row arithmetic
against hand-computed numbers, and the script's smoke run end to end (a tiny random LLaDA)."""

import importlib.util
import json
from pathlib import Path

import pytest

from dllm_sparse.eval.studies.generation_frontier import parse_generation_strategy, summarise_strategy
from dllm_sparse.samplers import GenerationConfig


def test_strategy_names():
    s = parse_generation_strategy("t0.5+cache-dual+token-intermediate:0.9")
    assert s.threshold == 0.5 and s.inner.block_cache == "dual" and s.inner.kind == "token"
    assert parse_generation_strategy("exact").threshold is None
    assert parse_generation_strategy("t0.7").inner.kind == "dense"
    cfg = parse_generation_strategy("t0.7+cache-prefix").config(GenerationConfig())
    assert cfg.confidence_threshold == 0.7 and cfg.block_cache == "prefix"
    for bad in ("t0+cache-dual", "cache-triple", "t0.5+nonsense"):
        with pytest.raises(ValueError, match="strategy"):
            parse_generation_strategy(bad)


def test_row_arithmetic():
    exact = [{"ids": [1, 2, 3, 4], "tokens": 4, "nfe": 4, "wall_s": 2.0, "probe_hit": True, "ffn_work": None},
             {"ids": [5, 6, 7, 8], "tokens": 4, "nfe": 4, "wall_s": 4.0, "probe_hit": False, "ffn_work": None}]
    fast = [{"ids": [1, 2, 0, 4], "tokens": 4, "nfe": 2, "wall_s": 1.0, "probe_hit": True, "ffn_work": 0.5},
            {"ids": [5, 6, 7, 8], "tokens": 4, "nfe": 1, "wall_s": 1.0, "probe_hit": True, "ffn_work": 0.7}]
    row = summarise_strategy("fast", fast, exact)
    assert row["speedup"] == pytest.approx(3.0)  # median of 2 / 1 and 4 / 1
    assert row["speedup_range"] == [2.0, 4.0]
    assert row["tokens_per_s"] == pytest.approx(4.0) and row["forwards_per_token"] == pytest.approx(3 / 8)
    assert row["agreement"] == pytest.approx(7 / 8)
    assert row["probe_score"] == 2 and row["probe_items"] == 2 and row["ffn_work"] == pytest.approx(0.6)
    assert summarise_strategy("exact", exact, exact)["speedup"] == 1.0


def test_the_smoke_run_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "generation_frontier_script", Path(__file__).resolve().parents[1] / "experiments" / "generation_frontier.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = ["exact", "t0.1", "cache-dual", "t0.1+cache-dual", "t0.1+cache-dual+token-intermediate:0.9"]
    script.main(["--smoke", "--output-dir", str(tmp_path), "--strategies", *names])
    res = json.loads((tmp_path / "generation_frontier.json").read_text())
    rows = res["runs"][0]["rows"]
    assert [r["strategy"] for r in rows] == names and res["runs"][0]["prompts"] == 2
    for r in rows:
        assert {"strategy", "speedup", "probe_score", "probe_items", "agreement", "forwards_per_token"} <= set(r)
    by = {r["strategy"]: r for r in rows}
    assert by["exact"]["forwards_per_token"] == 1.0 and by["exact"]["agreement"] == 1.0
    assert by["t0.1"]["forwards_per_token"] < 1.0  # the threshold took fewer forwards than tokens
    assert (tmp_path / "generation_frontier.png").is_file() and (tmp_path / "summary.md").is_file()
    with pytest.raises(SystemExit):
        script.main(["--smoke", "--strategies", "t-1"])
