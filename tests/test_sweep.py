"""Sweep runner: tidy rows, p = 1 equals dense, resume after a finished run and after a kill, rank shards."""

from __future__ import annotations

import json
import math
import os

import pytest
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model

from dllm_sparse.eval.rows import read_rows
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.sweep.config import SweepConfig, grid
from dllm_sparse.eval.sweep.run import run_sweep
from dllm_sparse.eval.sweep.store import load_rows
from dllm_sparse.eval.tasks.builtin import MCItem, MultipleChoiceTask, PerplexityTask
from dllm_sparse.models.loading import LoadedModel
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.rules import TopP

ITEMS = [MCItem("a", "one two", ["three", "four"], 0), MCItem("b", "x y", ["z", "zz", "w"], 2),
         MCItem("c", "12", ["3", "4"], 0)]
PASSAGES = [{"id": "p0", "text": "a small passage"}, {"id": "p1", "text": "another one here"}]


def _models():
    ar = build_tiny_model("llama", vocab_size=260, seed=1)
    dm = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, seed=2)
    return [LoadedModel(ar, ByteTokenizer(), "ar", "tiny-ar", None, "llama"),
            LoadedModel(dm, ByteTokenizer(), "diffusion", "tiny-mdm", 3, "llada")]


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, name):
        counter = self

        class Counted:
            def __init__(self, task):
                self.task, self.name, self.metric = task, task.name, task.metric

            def evaluate(self, scorer, limit=None):  # with the sparsity the sweep opened on the scorer
                counter.calls += 1
                return self.task.evaluate(scorer, limit)

        return Counted(MultipleChoiceTask("mc", ITEMS) if name == "mc" else PerplexityTask("ppl", PASSAGES))


def _cfg(out, **kw):
    base = dict(models=_models(), output_dir=out, sites=["input", "intermediate"], thresholds=[1.0, 0.8, 0.5],
                tasks=["mc", "ppl"], mc_num=4, mc_batch=2, batch_size=8, progress=False)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    counter = Counter()
    rows = run_sweep(_cfg(out), task_factory=counter)
    return out, rows, counter.calls


def _table(rows):
    return {r["key"]: (r["value"], r["sparsity"]) for r in rows}


def test_rows_are_tidy_and_p1_equals_dense(full_run):
    out, rows, calls = full_run
    # per model and task: 1 dense row + 2 sites x 3 thresholds
    assert len(rows) == 2 * 2 * 7 and len({r["key"] for r in rows}) == len(rows)
    assert calls == 2 * 2 * (1 + 2 * 2)  # the p = 1 cells come from the dense pass
    assert read_rows(out / "rows.jsonl") == rows
    for r in rows:
        for field in ("model", "kind", "site", "rule", "p", "task", "metric", "value", "dense_value",
                      "relative_performance", "n_items", "seconds"):
            assert field in r, field
        if r["site"] == DENSE:
            assert set(r["sparsity_by_site"]) == {"input", "intermediate"}
            continue
        assert len(r["per_layer_sparsity"]) == 2 and 0 <= r["sparsity"] <= 1
        dense = next(d for d in rows if d["site"] == DENSE and d["model"] == r["model"] and d["task"] == r["task"])
        if r["p"] == 1.0:
            assert r["value"] == dense["value"] and r["relative_performance"] == 1.0
        else:
            assert r["sparsity"] > 0.1
    # A p = 1 cell computed on its own, one site attached, gives the dense value too.
    lm = _models()[1]
    task = PerplexityTask("ppl", PASSAGES)
    alone = task.evaluate(Scorer.from_loaded(lm, mc_num=4, mc_batch=2, seed=1234,
                                             sparsity=SparsityConfig("input", TopP(1.0))))
    dense = next(d for d in rows if d["site"] == DENSE and d["model"] == "tiny-mdm" and d["task"] == "ppl")
    assert alone.value == dense["value"]
    # relative performance: perplexity is lower-is-better
    r = next(r for r in rows if r["model"] == "tiny-ar" and r["task"] == "ppl" and r["p"] == 0.5
             and r["site"] == "intermediate")
    assert r["relative_performance"] == pytest.approx(r["dense_value"] / r["value"])
    mdm = [r for r in rows if r["kind"] == "diffusion" and r["site"] == "input" and r["p"] == 0.8]
    assert any(g.startswith("ratio") for g in mdm[0]["sparsity_groups"])
    # Per-item scores (what the bootstrap resamples) recompute the row's value.
    for r in rows:
        items = r["items"]
        assert len(items["ids"]) == r["n_items"]
        if r["metric"] == "ppl":
            assert math.exp(-sum(items["ll"]) / sum(items["tokens"])) == pytest.approx(r["value"], rel=1e-9)


def test_rerun_skips_finished_cells(full_run):
    out, rows, _ = full_run
    counter = Counter()
    again = run_sweep(_cfg(out), task_factory=counter)
    assert counter.calls == 0
    assert _table(again) == _table(rows) and len(read_rows(out / "rows.jsonl")) == len(rows)
    # Other settings are other cells: nothing reused.
    counter = Counter()
    more = run_sweep(_cfg(out, models=_models()[:1], tasks=["mc"], limit=2, thresholds=[1.0, 0.8]),
                     task_factory=counter)
    assert counter.calls == 1 + 2 and len(more) == len(rows) + 1 + 2 * 2


def test_kill_midway_then_resume(tmp_path, full_run):
    _, rows, _ = full_run
    written = []

    def killer(row):
        written.append(row["key"])
        if len(written) == 11:
            raise KeyboardInterrupt  # a kill right after a row was written

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(tmp_path), task_factory=Counter(), on_row=killer)
    assert len(read_rows(tmp_path / "rows.jsonl")) == 11
    with open(tmp_path / "rows.jsonl", "a") as f:  # and a torn half line from a kill during a write
        f.write('{"key": "half a ro')
    counter = Counter()
    final = run_sweep(_cfg(tmp_path), task_factory=counter)
    assert _table(final) == _table(rows)  # the same final set, bit for bit
    # 11 rows = 2 dense passes (3 rows each) + 5 sparse cells: 7 of the 20 units finished before the kill
    assert counter.calls == 20 - 7
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and all(json.loads(line) for line in lines)


def test_rank_shards_merge_without_duplicates(tmp_path, full_run):
    _, rows, _ = full_run
    c1, c0 = Counter(), Counter()
    run_sweep(_cfg(tmp_path), task_factory=c1, rank=1, world_size=2)
    assert (tmp_path / "shards" / "rows.rank1.jsonl").is_file()
    merged = run_sweep(_cfg(tmp_path), task_factory=c0, rank=0, world_size=2)
    assert c0.calls + c1.calls == 20 and c0.calls and c1.calls
    assert _table(merged) == _table(rows)
    assert all(r["relative_performance"] is not None for r in merged)  # filled in at the merge
    assert not list((tmp_path / "shards").glob("*.jsonl")) and load_rows(tmp_path) == merged


def test_grids():
    assert len(grid("standard")) == 25 and grid("standard")[0] == 1.0 and grid("standard")[-1] == 0.1
    assert grid("quick") == [1.0, 0.995, 0.99, 0.98, 0.95, 0.9]
    with pytest.raises(ValueError):
        grid("nope")


def test_guided_elbo_cells_have_their_own_keys_and_scores(tmp_path):
    plain = run_sweep(_cfg(tmp_path / "plain", sites=["input"], thresholds=[1.0]), task_factory=Counter())
    guided = run_sweep(_cfg(tmp_path / "guided", sites=["input"], thresholds=[1.0], cfg_scale={"mc": 0.5}),
                       task_factory=Counter())
    by_key = {r["key"]: r for r in plain}
    for r in guided:
        if r["task"] == "mc":  # guided: a new key (the cfg is part of it); the diffusion score changes
            assert r["key"] not in by_key and json.loads(r["key"])[-1] == {"cfg": 0.5}
            if r["kind"] == "diffusion":
                assert r["cfg_scale"] == 0.5
        else:  # no guidance for this task: the very same cell as an unguided sweep
            assert by_key[r["key"]]["value"] == r["value"]
    dense = [r for r in guided if r["kind"] == "diffusion" and r["task"] == "mc" and r["site"] == DENSE][0]
    scorer = Scorer(_models()[1].model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=4, mc_batch=2,
                    batch_size=8, seed=1234, cfg_scale=0.5)
    assert dense["value"] == pytest.approx(MultipleChoiceTask("mc", ITEMS).evaluate(scorer).value)


def test_the_papers_llada_variant_runs_as_a_sweep(tmp_path):
    """rule="paper_top_p" (p in percent, one selection per sample) sweeps like any other rule, and its cells
    equal the scorer run by hand with the same configuration."""
    assert grid("quick", "paper_top_p")[:3] == [100.0, 99.5, 99.0] and len(grid("standard", "paper_top_p")) == 25
    rows = run_sweep(_cfg(tmp_path, sites=["input"], thresholds=[90.0], rule="paper_top_p", scope="sequence",
                          tasks=["ppl"]), task_factory=Counter())
    cell = [r for r in rows if r["kind"] == "diffusion" and r["site"] == "input"][0]
    assert json.loads(cell["key"])[2] == "input:paper_top_p:90.0:sequence"
    lm = _models()[1]
    scorer = Scorer(lm.model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=4, mc_batch=2, batch_size=8, seed=1234)
    with scorer.sparsified(SparsityConfig.paper_llada(90)):
        ref = PerplexityTask("ppl", PASSAGES).evaluate(scorer)
    assert cell["value"] == pytest.approx(ref.value) and 0 < cell["sparsity"] < 1


# ---- two sweeps into one fresh folder at once ---------------------------------------------------------------

CONCURRENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_sweep import Counter, _cfg
from dllm_sparse.eval.sweep.run import run_sweep

out, me = Path({out!r}), {me}
cfg = _cfg(out)
(out.parent / f"ready{{me}}").touch()
while not (out.parent / "go").exists():  # both processes start their sweep at the same moment
    time.sleep(0.01)
run_sweep(cfg, task_factory=Counter())
"""


def test_two_identical_sweeps_at_once_into_a_fresh_folder(tmp_path):
    """Two processes run the same sweep into one folder that does not exist yet: both finish (one used to exit
    with FileNotFoundError on a temporary name the two shared), and rows.jsonl holds every cell once, with
    the single run's values."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch

    from dllm_sparse.eval.sweep.config import planned_keys

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference at the workers' one thread: a reduction split over two may round
    try:                      # another way (a tiny model's perplexity moved in the 8th digit)
        rows = run_sweep(_cfg(tmp_path / "reference"), task_factory=Counter())
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "shared"
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT.format(tests=tests, out=str(out), me=i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    lines = (out / "rows.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == len(planned_keys(_cfg(out)))  # every cell once: none lost, none twice
    assert _table(load_rows(out)) == _table(rows)
    assert not list(out.glob("*.tmp")) and not list(out.glob("shards/*.jsonl"))


# ---- a corrupt row is not an old folder --------------------------------------------------------------------


def _garble(key: str, how: str) -> object:
    k = json.loads(key)
    if how == "not_json":
        return key[:-7]
    if how == "bad_field":
        k[4] = "four"  # mc_num
        return json.dumps(k)
    if how == "old_length_bad_sparsity":
        k[2] = "inptu:top_p:0.8"
        return json.dumps(k[:-1])  # 8 fields: the length of an old key, but its sparsity id does not read
    if how == "not_a_string":
        return k
    raise AssertionError(how)


@pytest.mark.parametrize("how, why", [
    ("not_json", "is not JSON"), ("bad_field", "its key's mc_num field is 'four'"),
    ("old_length_bad_sparsity", r"its key's sparsity field is 'inptu:top_p:0.8'.*old 8-field form"),
    ("not_a_string", "its key is list"), ("array_row", "it is a JSON list, not an object"),
    ("no_site", "it has no site field"),
])
def test_a_corrupt_row_is_named_by_line_not_taken_for_an_old_folder(tmp_path, full_run, how, why):
    _, rows, _ = full_run
    lines = [json.dumps(r) for r in rows]
    bad = dict(rows[2])
    if how == "array_row":
        lines[2] = json.dumps([1, 2])
    elif how == "no_site":
        del bad["site"]
        lines[2] = json.dumps(bad)
    else:
        lines[2] = json.dumps({**bad, "key": _garble(bad["key"], how)})
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    counter = Counter()
    with pytest.raises(RuntimeError, match=rf"holds 1 corrupt row\(s\): .*rows.jsonl line 3: .*{why}.*delete those "
                                           "lines") as err:
        run_sweep(_cfg(tmp_path), task_factory=counter)
    assert "old way" not in str(err.value) and "upgrade_cell_keys" not in str(err.value) and counter.calls == 0


@pytest.mark.parametrize("field, value, why", [
    ("value", "abc", r"its value field is 'abc', not a finite number"),
    ("value", float("nan"), r"its value field is nan, not a finite number"),
    ("value", None, r"its value field is None, not a finite number"),
    ("sparsity", 1.5, r"its sparsity field is 1.5, not a number in \[0, 1\]"),
    ("sparsity", "0.3", r"its sparsity field is '0.3', not a number in \[0, 1\]"),
    ("relative_performance", "high", r"its relative_performance field is 'high', not a number"),
    ("kind", "transformer", r"its kind field is 'transformer', not 'ar' or 'diffusion'"),
    ("p", True, r"its p field is True, not a finite number"),
    ("metrics", {"acc": "0.5"}, r"its metrics field is \{'acc': '0.5'\}, not an object of metric name -> number"),
    ("n_items", -1, r"its n_items field is -1, not a whole number >= 0"),
    ("value", "<missing>", r"it has no value field"),
])
def test_a_row_with_a_bad_field_is_refused_naming_file_line_and_field(tmp_path, full_run, field, value, why):
    _, rows, _ = full_run
    bad = dict(next(r for r in rows if r["site"] != DENSE))  # a sparse row: sparsity is a number there
    if value == "<missing>":
        del bad[field]
    else:
        bad[field] = value
    lines = [json.dumps(r) for r in rows]
    lines[4] = json.dumps(bad)
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    pattern = rf"holds 1 corrupt row\(s\): .*rows.jsonl line 5: {why}.*delete those lines"
    with pytest.raises(RuntimeError, match=pattern):
        load_rows(tmp_path)  # every reader of a sweep folder
    counter = Counter()
    with pytest.raises(RuntimeError, match=pattern):
        run_sweep(_cfg(tmp_path), task_factory=counter)
    assert counter.calls == 0


def test_the_documented_nulls_and_nan_are_kept(tmp_path, full_run):
    """A dense row's null sparsity, a sparse row's null relative performance (its dense row not in yet) and a NaN
    relative performance (dense score 0) are rows as the sweep writes them."""
    _, rows, _ = full_run
    sparse = dict(next(r for r in rows if r["site"] != DENSE))
    sparse.update(relative_performance=None, dense_value=None)
    other = dict(next(r for r in rows if r["site"] != DENSE and r["key"] != sparse["key"]))
    other["relative_performance"] = float("nan")
    edited = {sparse["key"]: sparse, other["key"]: other}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(edited.get(r["key"], r)) + "\n" for r in rows))
    assert len(load_rows(tmp_path)) == len(rows)


def test_a_computed_row_that_is_not_valid_is_not_written(tmp_path):
    """A forward pass giving NaN scores stops the sweep naming the cell, rather than writing a row that every later
    read would refuse."""
    class NanTask:
        name, metric = "mc", "acc"

        def evaluate(self, scorer, limit=None, **per_call):
            res = MultipleChoiceTask("mc", ITEMS).evaluate(scorer, limit, **per_call)
            res.value = float("nan")
            return res

    with pytest.raises(RuntimeError, match=r"cell .*: the computed row is not valid \(its value field is nan"):
        run_sweep(_cfg(tmp_path, tasks=["mc"]), task_factory=lambda name: NanTask())
    assert load_rows(tmp_path) == []


def test_head_chunk_cells_have_their_own_keys_and_the_unchunked_scores(tmp_path):
    """head_chunk is part of the key (another row count per head product may round differently), and the
    scores equal the unchunked sweep's up to that rounding; a combined {"cfg", "head_chunk"} key is valid."""
    from dllm_sparse.eval.sweep.validate import key_problem as _key_problem

    plain = run_sweep(_cfg(tmp_path / "plain", sites=["input"], thresholds=[1.0, 0.5]), task_factory=Counter())
    chunked = run_sweep(_cfg(tmp_path / "chunked", sites=["input"], thresholds=[1.0, 0.5], head_chunk=2,
                             cfg_scale={"mc": 0.5}), task_factory=Counter())
    plain_by = {(r["model"], r["task"], r["site"], r["p"]): r for r in plain}
    for r in chunked:
        opts = json.loads(r["key"])[-1]
        assert opts == ({"cfg": 0.5, "head_chunk": 2} if r["task"] == "mc" else {"head_chunk": 2})
        assert _key_problem(r["key"]) is None
        if r["task"] == "ppl":  # unguided: the plain sweep's cell, chunked
            assert r["value"] == pytest.approx(plain_by[(r["model"], r["task"], r["site"], r["p"])]["value"],
                                               rel=1e-5)
    assert _key_problem(json.dumps(json.loads(chunked[0]["key"])[:-1] + [{"head_chunk": 0.5}])) is not None
    with pytest.raises(ValueError, match="head_chunk must be a whole number of rows >= 1"):
        _cfg(tmp_path / "bad", head_chunk=0)


# ---- workers: processes sharing the units of one sweep ------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny AR model and a tiny native LLaDA saved as checkpoints (workers load models by path)."""
    import torch
    from conftest import build_byte_hf_tokenizer

    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

    root = tmp_path_factory.mktemp("pair")
    build_tiny_model("llama", vocab_size=260, seed=1).save_pretrained(root / "ar")
    torch.manual_seed(2)
    LLaDAModelLM(tiny_llada_config(vocab_size=260, embedding_size=260, mask_token_id=3)).eval().save_pretrained(
        root / "mdm")
    for d in ("ar", "mdm"):
        build_byte_hf_tokenizer().save_pretrained(root / d)
    return [str(root / "ar"), str(root / "mdm")]


def _saved_cfg(out, models):
    return SweepConfig(models=models, output_dir=out, sites=["input", "intermediate"], thresholds=[1.0, 0.9, 0.5],
                       tasks=["builtin_mc", "builtin_ppl"], limit=3, mc_num=2, mc_batch=2, batch_size=4,
                       progress=False)


def test_workers_compute_every_cell_once_with_the_single_process_values(tmp_path, saved_pair):
    """Three processes (this one and two workers, one thread each) share one sweep: every cell is written once,
    each by one process (the claims), with the values a single process computes, and no claim is left."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_sweep(_saved_cfg(tmp_path / "one", saved_pair))
        shared = run_sweep(_saved_cfg(tmp_path / "three", saved_pair), workers=3, worker_threads=1)
    finally:
        torch.set_num_threads(threads)
    lines = (tmp_path / "three" / "rows.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == len(single)
    assert _table(shared) == _table(single)
    assert {json.loads(line)["rank"] for line in lines} == {0}
    assert json.loads((tmp_path / "three" / ".claims.json").read_text()) == {}


def test_a_claimed_unit_waits_for_its_process_and_a_dead_claim_is_taken_over(tmp_path, saved_pair):
    """A unit claimed by a live process is left to it (this run computes the rest and waits); once that process
    is gone (a killed sweep) its claim is stale and the unit is computed here. A claim of a pid that does not run
    is taken over at once."""
    import socket
    import subprocess
    import sys
    import time

    from dllm_sparse.eval.sweep.claims import CLAIMS_NAME, process_start
    from dllm_sparse.eval.sweep.config import plan as _plan

    cfg = _saved_cfg(tmp_path, saved_pair)
    plan = _plan(cfg)
    held, dead_claim, reused = plan[1].keys[0], plan[2].keys[0], plan[3].keys[0]
    import threading

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    gone: list[float] = []

    def reap():  # reaped when it ends (no zombie keeps its pid), and when
        sleeper.wait()
        gone.append(time.time())

    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    host = socket.gethostname()
    (tmp_path / CLAIMS_NAME).write_text(json.dumps({
        held: {"pid": sleeper.pid, "host": host, "start": process_start(sleeper.pid)},
        dead_claim: {"pid": 2 ** 22 + 12345, "host": host, "start": "boot:1"},
        # a live process that is not the claimer (the pid was reused): its start time differs
        reused: {"pid": os.getppid(), "host": host, "start": "another-boot:1"}}))
    started = time.time()

    def wait(keys):  # called only while every unit left is claimed by a process judged alive
        assert reused not in keys, "a claim of a reused pid was taken for its claimer's"
        time.sleep(0.5)

    try:
        rows = {r["key"]: r for r in run_sweep(cfg, claim_wait=wait)}
    finally:
        reaper.join()
    assert set(rows) == {k for u in plan for k in u.keys}
    assert gone and rows[held]["finished_at"] >= gone[0]  # left to the live claim until its process ended
    assert rows[dead_claim]["finished_at"] >= started  # the dead pid's claim was taken over in this run
    assert rows[reused]["finished_at"] >= started  # taken over although a process runs under that pid


def test_stat_start_time_counts_fields_from_the_last_parenthesis():
    from dllm_sparse.eval.sweep.claims import stat_start_time

    fields = ["4242", "(a ) (b) c)", "S"] + [f"f{i}" for i in range(4, 53)]  # fields 1, 2, 3, then f4 .. f52
    assert stat_start_time(" ".join(fields) + "\n") == "f22"


@pytest.mark.parametrize("claim, alive", [
    ({"pid": 100, "host": "<here>", "start": "boot:500"}, True),  # the claimer itself, still running
    ({"pid": 100, "host": "<here>", "start": "boot:400"}, False),  # pid 100 now runs another process
    ({"pid": 100, "host": "<here>", "start": "old-boot:500"}, False),  # ... after a restart
    ({"pid": 100, "host": "<here>"}, False),  # an older version's claim: cannot be told from a reused pid
    ({"pid": 101, "host": "<here>", "start": "boot:500"}, False),  # pid 101 does not run
    ({"pid": 101, "host": "elsewhere", "start": "boot:500"}, True),  # another machine: cannot be checked
    ({"pid": "100", "host": "<here>", "start": "boot:500"}, False),  # not a claim
    ("garbage", False),
])
def test_a_claim_is_alive_only_while_its_own_process_runs(claim, alive):
    import os
    import socket

    from dllm_sparse.eval.sweep.claims import _claim_alive

    running = {os.getpid(): "boot:1", 100: "boot:500"}  # pid -> process_start of what runs there now
    if isinstance(claim, dict) and claim.get("host") == "<here>":
        claim = {**claim, "host": socket.gethostname()}
    assert _claim_alive(claim, start_of=running.get) is alive


def test_a_wait_for_claims_says_what_it_waits_for_and_how_to_release_it(tmp_path):
    """A claim made on another machine cannot be checked: the waiting run names the claim file, the holder's host
    and pid and that deleting the file releases it, after a minute and then every ten (an injected clock)."""
    import socket

    from dllm_sparse.eval.sweep.claims import CLAIMS_NAME, ClaimWait, process_start

    (tmp_path / CLAIMS_NAME).write_text(json.dumps({"k1": {"pid": 7, "host": "node-b", "start": "x:1"},
                                                    "k2": {"pid": 7, "host": "node-b", "start": "x:1"},
                                                    "k3": {"pid": 9, "host": "node-c", "start": "x:1"}}))
    now, said, slept = [0.0], [], []
    wait = ClaimWait(tmp_path, clock=lambda: now[0], sleep=slept.append, say=said.append)
    for t in (0.0, 30.0, 61.0, 300.0, 660.0, 662.0):
        now[0] = t
        wait(["k1", "k2", "k3"])
    assert len(slept) == 6 and len(said) == 2  # at 61 s and at 662 s (>= 61 + 600)
    path = str(tmp_path / CLAIMS_NAME)
    assert "waiting 1 min for 3 unit(s)" in said[0] and "waiting 11 min" in said[1]
    for text in said:
        assert f"claimed in {path}: pid 7 on host 'node-b' (2 unit(s); another machine" in text
        assert "pid 9 on host 'node-c' (1 unit(s)" in text and f"deleting {path}" in text
    assert socket.gethostname() not in ("node-b", "node-c")
    # Claims of this host are checked alive (the usual wait for workers' last units): waited for without a message.
    mine = {"pid": os.getppid(), "host": socket.gethostname(), "start": process_start(os.getppid())}
    (tmp_path / CLAIMS_NAME).write_text(json.dumps({"k1": mine}))
    said.clear()
    quiet = ClaimWait(tmp_path, clock=lambda: now[0], sleep=slept.append, say=said.append)
    for t in (1000.0, 1100.0, 2000.0):
        now[0] = t
        quiet(["k1"])
    assert said == []


def test_a_sweep_waiting_on_another_machines_claims_computes_them_once_released(tmp_path, full_run):
    """Every unit claimed by another host: the run waits (the injected wait sees every unit), and computes them once
    the claim file is deleted, the release the wait's message names."""
    from dllm_sparse.eval.sweep.claims import CLAIMS_NAME
    from dllm_sparse.eval.sweep.config import plan as _plan

    cfg = _cfg(tmp_path, tasks=["mc"], sites=["input"], thresholds=[1.0, 0.5])
    tmp_path.mkdir(exist_ok=True)
    claims = {u.keys[0]: {"pid": 7, "host": "node-b", "start": "x:1"} for u in _plan(cfg)}
    (tmp_path / CLAIMS_NAME).write_text(json.dumps(claims))
    waited = []

    def release(keys):
        waited.append(list(keys))
        (tmp_path / CLAIMS_NAME).unlink()

    rows = run_sweep(cfg, task_factory=Counter(), claim_wait=release)
    assert len(waited) == 1 and set(waited[0]) == set(claims)  # it waited for every unit, nothing computed
    assert {r["key"] for r in rows} >= set(claims)


def test_workers_refuse_loaded_models_and_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="by name or path"):
        run_sweep(_cfg(tmp_path / "a"), workers=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a whole number"):
            run_sweep(_cfg(tmp_path / "b"), workers=bad)
    with pytest.raises(ValueError, match="under a launcher"):
        run_sweep(_cfg(tmp_path / "c"), workers=2, rank=0, world_size=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before anything is written


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws its bars only on one) and keeps what was written."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


@pytest.mark.parametrize("terminal", [True, False])
def test_the_sweep_shows_a_bar_over_its_cells_on_a_terminal_only(tmp_path, monkeypatch, capsys, terminal):
    # one model, one site, thresholds 1.0 and 0.8: two units (the dense pass with its p = 1 cell, the 0.8 cell)
    cfg = _cfg(tmp_path, models=_models()[:1], sites=["input"], tasks=["mc"], limit=2, thresholds=[1.0, 0.8],
               progress=True)
    err = _Terminal()
    if terminal:
        monkeypatch.setattr("sys.stderr", err)
    rows = run_sweep(cfg, task_factory=Counter())
    assert len(rows) == 3  # dense, p = 1, p = 0.8
    if terminal:
        assert "sweep: 100%" in err.text and "2/2" in err.text and "cell" in err.text
    else:  # stderr captured by pytest: not a terminal, so no bar at all
        assert "sweep" not in capsys.readouterr().err
    monkeypatch.undo()
