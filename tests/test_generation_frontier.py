"""The whole-generation frontier (dllm_sparse.eval.studies.generation_frontier): strategy names, the row arithmetic
against hand-computed numbers, the script's smoke run end to end (a tiny random LLaDA), and resume: a stopped,
extended or torn run computes only its missing units (counted generate calls), a changed setting is refused."""

import importlib.util
import json
from pathlib import Path

import pytest

from dllm_sparse.eval import identity
from dllm_sparse.eval.rows import read_rows
from dllm_sparse.eval.studies import generation_frontier as gf
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
    assert 2.0 <= row["speedup_ci"][0] <= row["speedup_ci"][1] <= 4.0  # a bootstrap median of {2, 4} stays inside
    assert row["tokens_per_s"] == pytest.approx(4.0) and row["forwards_per_token"] == pytest.approx(3 / 8)
    assert row["agreement"] == pytest.approx(7 / 8)
    assert row["probe_score"] == 2 and row["probe_items"] == 2 and row["ffn_work"] == pytest.approx(0.6)
    assert summarise_strategy("exact", exact, exact)["speedup"] == 1.0


def test_base_of_is_the_strategy_one_lever_shorter():
    names = ["exact", "t0.9", "cache-dual", "t0.9+cache-dual", "t0.9+cache-dual+delta-intermediate:0.15",
             "cache-dual+step-intermediate:0.9", "t0.5+cache-dual"]
    assert gf.base_of("t0.9+cache-dual+delta-intermediate:0.15", names) == "t0.9+cache-dual"  # longest, not t0.9
    assert gf.base_of("t0.9+cache-dual", names) == "t0.9"
    assert gf.base_of("cache-dual+step-intermediate:0.9", names) == "cache-dual"
    assert gf.base_of("t0.5+cache-dual", names) is None  # t0.5 is not in the run
    assert gf.base_of("cache-dual", names) is None and gf.base_of("exact", names) is None


def test_median_interval():
    assert gf.median_interval([3.0] * 5) == [3.0, 3.0]
    lo, hi = gf.median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    assert 1.0 <= lo < 5.0 < hi <= 9.0  # brackets the median, inside the data


def test_over_base_pairs_by_prompt():
    base = [{"wall_s": w, "probe_hit": h, "session": "a"} for w, h in ((2.0, True), (3.0, False), (4.0, True))]
    top = [{"wall_s": w, "probe_hit": h, "session": s} for w, h, s in ((1.0, False, "a"), (3.0, True, "a"),
                                                                        (1.0, True, "b"))]
    o = gf.over_base("top", "base", top, base)
    assert o["speedup"] == pytest.approx(2.0)  # median of 2/1, 3/3, 4/1
    assert o["speedup_range"] == pytest.approx([1.0, 4.0])
    assert 1.0 <= o["speedup_ci"][0] <= o["speedup"] <= o["speedup_ci"][1] <= 4.0
    assert (o["probe_gained"], o["probe_lost"], o["same_session"], o["prompts"]) == (1, 1, 2, 3)
    same = gf.over_base("top", "base", base, base)
    assert same["speedup"] == 1.0 and same["speedup_ci"] == [1.0, 1.0]


def _script():
    spec = importlib.util.spec_from_file_location(
        "generation_frontier_script", Path(__file__).resolve().parents[1] / "experiments" / "generation_frontier.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_smoke_run_writes_every_row(tmp_path):
    script = _script()
    names = ["exact", "t0.1", "cache-dual", "t0.1+cache-dual", "t0.1+cache-dual+token-intermediate:0.9"]
    script.main(["--smoke", "--prompts", "2", "--output-dir", str(tmp_path), "--strategies", *names])
    res = json.loads((tmp_path / "generation_frontier.json").read_text())
    rows = res["runs"][0]["rows"]
    assert [r["strategy"] for r in rows] == names and res["runs"][0]["prompts"] == 2
    for r in rows:
        assert {"strategy", "speedup", "probe_score", "probe_items", "agreement", "forwards_per_token"} <= set(r)
    by = {r["strategy"]: r for r in rows}
    assert by["exact"]["forwards_per_token"] == 1.0 and by["exact"]["agreement"] == 1.0
    assert by["t0.1"]["forwards_per_token"] < 1.0  # the threshold took fewer forwards than tokens
    steps = {o["strategy"]: o["base"] for o in res["runs"][0]["over_base"]}
    assert steps == {"t0.1+cache-dual": "t0.1", "t0.1+cache-dual+token-intermediate:0.9": "t0.1+cache-dual"}
    assert "on top of" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "generation_frontier.png").is_file() and (tmp_path / "summary.md").is_file()
    with pytest.raises(SystemExit):
        script.main(["--smoke", "--strategies", "t-1"])


NAMES = ["exact", "t0.1", "t0.1+cache-dual"]


class _Counter:
    """Counts the generate calls of the study (and raises after ``stop_after`` of them: a kill)."""

    def __init__(self, monkeypatch, stop_after=None):
        self.calls, self.stop_after, real = 0, stop_after, gf.generate

        def counted(*a, **kw):
            if self.stop_after is not None and self.calls >= self.stop_after:
                raise KeyboardInterrupt("stopped by the test")
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(gf, "generate", counted)


def _smoke(out, prompts, *extra):
    return _script().main(["--smoke", "--prompts", str(prompts), "--output-dir", str(out), "--strategies", *NAMES,
                           *extra])


def _rows(res):
    """The summary numbers that do not depend on the clock."""
    return [{k: r[k] for k in ("strategy", "prompts", "forwards_per_token", "agreement", "probe_items")}
            for r in res["runs"][0]["rows"]]


def test_a_rerun_computes_nothing_and_gives_the_same_rows(tmp_path, monkeypatch):
    first = _smoke(tmp_path, 2)
    units = read_rows(tmp_path / gf.UNITS_FILE)
    assert len(units) == 2 * len(NAMES) and {u["strategy"] for u in units} == set(NAMES)
    assert all({"ids", "wall_s", "nfe", "tokens", "identity", "session", "load_avg"} <= set(u) for u in units)
    count = _Counter(monkeypatch)
    again = _smoke(tmp_path, 2)
    assert count.calls == 0  # no warm-up either: nothing left to time
    assert again["units_computed"] == 0 and _rows(again) == _rows(first)
    assert [r["speedup"] for r in again["runs"][0]["rows"]] == [r["speedup"] for r in first["runs"][0]["rows"]]
    assert len(read_rows(tmp_path / gf.UNITS_FILE)) == len(units)  # nothing appended


def test_an_extended_run_reuses_the_finished_prompts(tmp_path, monkeypatch):
    _smoke(tmp_path, 1)
    count = _Counter(monkeypatch)
    res = _smoke(tmp_path, 3)
    assert count.calls == 1 + 2 * len(NAMES)  # the warm-up, then prompts 1 and 2 only
    assert res["runs"][0]["prompts"] == 3 and all(r["prompts"] == 3 for r in res["runs"][0]["rows"])
    sessions = res["runs"][0]["sessions"]
    assert len(sessions) == 2 and [s["units"] for s in sessions] == [len(NAMES), 2 * len(NAMES)]
    assert "2 session(s)" in (tmp_path / "summary.md").read_text()
    # the same numbers as a run of all three prompts at once (greedy: the answers do not depend on the session)
    whole = _smoke(tmp_path / "whole", 3)
    assert _rows(res) == _rows(whole)


def test_a_run_stopped_mid_prompt_resumes_with_the_missing_units(tmp_path, monkeypatch):
    count = _Counter(monkeypatch, stop_after=1 + len(NAMES) + 1)  # warm-up, prompt 0, one unit of prompt 1
    with pytest.raises(KeyboardInterrupt):
        _smoke(tmp_path, 2)
    assert len(read_rows(tmp_path / gf.UNITS_FILE)) == len(NAMES) + 1
    kept = json.loads((tmp_path / "generation_frontier.json").read_text())
    assert kept["runs"][0]["prompts"] == 1  # the JSON written after prompt 0 survives the stop
    count.calls, count.stop_after = 0, None
    res = _smoke(tmp_path, 2)
    assert count.calls == 1 + len(NAMES) - 1 and res["runs"][0]["prompts"] == 2


def test_a_torn_last_line_is_recomputed_and_repaired(tmp_path, monkeypatch):
    _smoke(tmp_path, 1)
    path = tmp_path / gf.UNITS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a kill in the middle of writing the last unit
    assert len(read_rows(path)) == len(NAMES) - 1
    count = _Counter(monkeypatch)
    res = _smoke(tmp_path, 1)
    assert count.calls == 1 + 1 and res["runs"][0]["prompts"] == 1
    lines = path.read_text().splitlines()
    assert len(lines) == len(NAMES) and all(json.loads(line) for line in lines)  # the torn line was dropped


def test_a_changed_setting_is_refused_naming_it(tmp_path, monkeypatch):
    import torch

    _smoke(tmp_path, 1)
    count, threads = _Counter(monkeypatch), torch.get_num_threads()
    with pytest.raises(SystemExit, match=r"(?s)threads: 1 -> 2.*--output-dir"):
        _smoke(tmp_path, 1, "--threads", "2")
    assert count.calls == 0 and torch.get_num_threads() == threads  # refused before anything ran
    # other weights (the same name): refused too, naming the weights hash
    monkeypatch.setattr(gf, "run_identity", lambda lm, **kw: identity.run_identity(lm, weights="sha256:other", **kw))
    with pytest.raises(SystemExit, match=r"weights: \"sha256:[0-9a-f]+\" -> \"sha256:other\""):
        _smoke(tmp_path, 1)


def _tiny_study(tmp_path):
    import argparse

    import torch

    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
    from dllm_sparse.models.loading import LoadedModel

    torch.manual_seed(0)
    lm = LoadedModel(model=LLaDAModelLM(tiny_llada_config(init_std=0.2)).eval(), tokenizer=None, kind="diffusion",
                     name="tiny", mask_id=99, family="llada")
    args = argparse.Namespace(strategies=["exact"], model="tiny", dtype="fp32", threads=torch.get_num_threads(),
                              gen_lengths=[8], block_length=8, output_dir=tmp_path)
    return lm, args


def test_a_changed_prompt_is_refused_naming_it(tmp_path):
    lm, args = _tiny_study(tmp_path)
    gf.run_study(args, "test", lm=lm, prompts=[[5, 17, 3]], keywords=None, chat=False)
    with pytest.raises(identity.IdentityMismatch, match="prompt: "):
        gf.run_study(args, "test", lm=lm, prompts=[[5, 17, 4]], keywords=None, chat=False)


def test_units_of_other_settings_are_refused_even_when_no_key_is_shared(tmp_path, monkeypatch):
    lm, args = _tiny_study(tmp_path)
    gf.run_study(args, "test", lm=lm, prompts=[[5, 17, 3]], keywords=None, chat=False)
    args.gen_lengths = [16]  # other units entirely, but the folder's are of another dtype: refused
    monkeypatch.setattr(gf, "run_identity", lambda lm, **kw: identity.run_identity(lm, dtype="bfloat16", **kw))
    with pytest.raises(identity.IdentityMismatch, match='dtype: "float32" -> "bfloat16"'):
        gf.run_study(args, "test", lm=lm, prompts=[[5, 17, 3]], keywords=None, chat=False)


def test_a_folder_of_a_run_made_before_resume_is_refused(tmp_path):
    lm, args = _tiny_study(tmp_path)
    old = '{"runs": []}\n'  # a results file without units.jsonl beside it
    (tmp_path / "generation_frontier.json").write_text(old)
    with pytest.raises(identity.IdentityMismatch, match="before resume existed.*another --output-dir"):
        gf.run_study(args, "test", lm=lm, prompts=[[5, 17, 3]], keywords=None, chat=False)
    assert (tmp_path / "generation_frontier.json").read_text() == old and not (tmp_path / gf.UNITS_FILE).exists()


def test_more_prompts_than_the_probe_has_are_refused(tmp_path):
    import argparse

    args = argparse.Namespace(strategies=["exact"], model="smollm2-135m-mdm", dtype="fp32", threads=1, prompts=21,
                              gen_lengths=[32], block_length=32, output_dir=tmp_path)
    with pytest.raises(ValueError, match="--prompts 21: the capability probe has only 20 prompts"):
        gf.run_study(args, "test")  # before any model loads
