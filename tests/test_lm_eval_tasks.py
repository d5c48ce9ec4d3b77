"""The built-in suite as lm-eval tasks (dllm_sparse_mc / dllm_sparse_ppl): one scoring for the sweep, the CLI
(console script and stock lm_eval), chat templates, progress bars, measured sparsity in the results file."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[eval]'")

from byte_tokenizer import ByteTokenizer  # noqa: E402
from conftest import build_byte_hf_tokenizer, build_tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from dllm_sparse.eval.scoring.scorer import Scorer  # noqa: E402
from dllm_sparse.eval.sweep.config import SweepConfig  # noqa: E402
from dllm_sparse.eval.sweep.run import run_sweep  # noqa: E402
from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM, _with_task_dir  # noqa: E402
from dllm_sparse.eval.tasks.lm_eval_tasks import TASK_DIR, BuiltinLmEvalTask, evaluate_builtin, task_manager  # noqa: E402
from dllm_sparse.eval.tasks.registry import get_task  # noqa: E402
from dllm_sparse.models.loading import LoadedModel  # noqa: E402
from dllm_sparse.sparsity.config import SparsityConfig  # noqa: E402
from dllm_sparse.sparsity.rules import TopP  # noqa: E402
from dllm_sparse.sparsity.stats import SparsityStats  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tiny(kind: str, seed: int = 3):
    if kind == "ar":
        return build_tiny_model("llama", vocab_size=260, seed=seed)
    return build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, eos_token_id=2,
                            pad_token_id=0, seed=seed)


def _scorer(kind: str, tokenizer=None, **kw):
    extra = {} if kind == "ar" else dict(mask_id=3, mc_num=4, mc_batch=2)
    return Scorer(_tiny(kind), tokenizer or ByteTokenizer(), kind, name=f"tiny-{kind}", batch_size=4, **extra, **kw)


# ---- one scoring -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_lm_eval_and_builtin_scoring_agree(kind):
    """Per-item log-likelihoods, metrics (acc, acc_norm, perplexities) and measured sparsity are the same whether
    lm-eval's task objects or the dependency-free code score the built-in tasks."""
    scorer = _scorer(kind)
    assert isinstance(get_task("builtin_mc"), BuiltinLmEvalTask)  # lm-eval installed: it scores the sweep
    sparse = SparsityConfig("input", TopP(0.8))
    for name, limit in (("builtin_mc", 6), ("builtin_ppl", 3)):
        results = {}
        for scoring in ("lm_eval", "builtin"):
            with scorer.sparsified(sparse) as stats:
                res = get_task(name, scoring=scoring).evaluate(scorer, limit)
            results[scoring] = (res, stats)
        (lm, lm_stats), (own, own_stats) = results["lm_eval"], results["builtin"]
        assert lm.n == own.n == limit and lm.metric == own.metric and lm.value == own.value
        assert lm.details == own.details  # ids, per-choice / per-passage log-likelihoods (exact), tokens
        assert set(lm.metrics) == set(own.metrics)
        for m in own.metrics:
            assert lm.metrics[m] == pytest.approx(own.metrics[m], rel=1e-12), m
        assert lm.higher_is_better == own.higher_is_better
        assert lm_stats.per_layer("input") == own_stats.per_layer("input")
        assert lm_stats.forward_passes("input") == own_stats.forward_passes("input") > 0
    ppl_metrics = set(lm.metrics)
    assert {"ppl", "nll_per_token", "word_perplexity", "byte_perplexity", "bits_per_byte"} == ppl_metrics


def test_sweep_numbers_are_the_same_with_either_scoring(tmp_path):
    """The sweep's builtin_mc accuracy and builtin_ppl values (and the measured sparsity) do not depend on whether
    lm-eval is there to score them."""
    def models():
        return [LoadedModel(_tiny("ar", 1), ByteTokenizer(), "ar", "tiny-ar", None, "llama"),
                LoadedModel(_tiny("diffusion", 2), ByteTokenizer(), "diffusion", "tiny-mdm", 3, "llada")]

    rows = {}
    for scoring in ("lm_eval", "builtin"):
        cfg = SweepConfig(models=models(), output_dir=tmp_path / scoring, sites=["input"], thresholds=[1.0, 0.7],
                          tasks=["builtin_mc", "builtin_ppl"], limit={"builtin_mc": 4, "builtin_ppl": 2}, mc_num=4,
                          mc_batch=2, batch_size=8, progress=False)
        out = run_sweep(cfg, task_factory=lambda name, s=scoring: get_task(name, scoring=s))
        rows[scoring] = {r["key"]: r for r in out}
    assert rows["lm_eval"].keys() == rows["builtin"].keys() and len(rows["builtin"]) == 2 * 2 * 3
    for key, own in rows["builtin"].items():
        lm = rows["lm_eval"][key]
        assert (lm["metric"], lm["value"], lm["sparsity"]) == (own["metric"], own["value"], own["sparsity"]), key
        assert lm["metrics"] == pytest.approx(own["metrics"], rel=1e-12)
    metrics = {r["task"]: r["metric"] for r in rows["builtin"].values()}
    assert metrics == {"builtin_mc": "acc", "builtin_ppl": "ppl"}


def test_tasks_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data path must not depend on the current directory
    loaded = task_manager().load(["dllm_sparse_mc", "dllm_sparse_ppl"])["tasks"]
    docs = {name.split(":")[-1] if isinstance(name, str) else name: list(t.test_docs())
            for name, t in loaded.items()}
    sizes = sorted(len(d) for d in docs.values())
    assert sizes == [48, 64]
    mc = next(d for d in docs.values() if len(d) == 64)
    first = json.loads((REPO / "dllm_sparse" / "data" / "builtin_mc.jsonl").read_text().splitlines()[0])
    assert {k: mc[0][k] for k in first} == first


def test_builtin_requests_are_named_like_the_builtin_scoring():
    req = Instance("loglikelihood", {"id": "x-1", "context": "c"}, ("c", " a"), 2, ("dllm_sparse_mc", 0, 1))
    roll = Instance("loglikelihood_rolling", {"id": "p-3", "text": "t"}, ("t",), 0, ("dllm_sparse_ppl", 5, 1))
    other = Instance("loglikelihood", {"id": "x-1"}, ("c", " a"), 2, ("arc_easy", 0, 1))
    assert DllmSparseLM._key(req) == "builtin_mc/x-1/2"
    assert DllmSparseLM._key(roll) == "builtin_ppl/p-3"
    assert DllmSparseLM._key(other) == ("arc_easy", 0, 2)


# ---- command line -----------------------------------------------------------------------------------------------

def test_console_script_adds_the_task_folder():
    assert _with_task_dir(["--model", "dllm_sparse", "--tasks", "dllm_sparse_mc"]) == [
        "--include_path", TASK_DIR, "--model", "dllm_sparse", "--tasks", "dllm_sparse_mc"]
    assert _with_task_dir(["run", "--tasks", "x"]) == ["run", "--include_path", TASK_DIR, "--tasks", "x"]
    assert _with_task_dir(["ls", "tasks"]) == ["ls", "tasks"]
    assert _with_task_dir(["run", "--include_path", "mine", "--tasks", "t"]) == [
        "run", "--include_path", "mine", "--tasks", "t"]
    with pytest.raises(SystemExit, match="dllm_sparse_mc.yaml"):
        _with_task_dir(["run", "--include_path", "mine", "--tasks", "t,dllm_sparse_mc"])
    with pytest.raises(SystemExit, match="dllm_sparse_ppl.yaml"):
        _with_task_dir(["--include_path=mine", "--tasks=dllm_sparse_ppl"])


def _model_dir(tmp_path) -> Path:
    """A tiny AR model with a real Hugging Face tokenizer, saved as a local `pretrained` directory."""
    path = tmp_path / "tiny-llama"
    _tiny("ar").save_pretrained(path)
    build_byte_hf_tokenizer().save_pretrained(path)
    return path


def _results_file(out: Path) -> dict:
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())


def _reference(model_dir: Path, limit: int) -> tuple[float, SparsityStats]:
    from dllm_sparse.models.loading import load_model

    scorer = Scorer.from_loaded(load_model(model_dir), batch_size=4)
    with scorer.sparsified(SparsityConfig("input", TopP(0.9))) as stats:
        res = evaluate_builtin("builtin_mc", scorer, limit)
    return res.metrics["acc"], stats


def test_results_file_has_the_measured_sparsity(tmp_path):
    """The results file lm-eval writes for --output_path (its EvaluationTracker, as the CLI uses it) holds the
    measured sparsity of the finished run."""
    from lm_eval.loggers import EvaluationTracker

    model_dir = _model_dir(tmp_path)
    results = lm_eval.simple_evaluate(
        model="dllm_sparse", model_args=f"pretrained={model_dir},sparsity=input:top_p:0.9", tasks=["dllm_sparse_mc"],
        limit=5, batch_size=4, device="cpu", task_manager=task_manager(), bootstrap_iters=0)
    EvaluationTracker(output_path=str(tmp_path / "out")).save_results_aggregated(results=results, samples=None)
    out = _results_file(tmp_path / "out")
    acc, stats = _reference(model_dir, 5)
    assert out["results"]["dllm_sparse_mc"]["acc,none"] == pytest.approx(acc)
    measured = out["config"]["measured_sparsity"]
    assert measured["ranks"] == 1
    assert measured["sites"]["input"]["mean"] == pytest.approx(stats.mean("input"), rel=1e-9)
    assert [measured["sites"]["input"]["per_layer"][str(k)] for k in range(2)] == pytest.approx(
        list(stats.per_layer("input").values()), rel=1e-9)
    # 5 items x 4 choices, batches of 4: the 5 shared contexts in 2 passes, then the 20 continuations in 5
    assert measured["sites"]["input"]["forward_passes"] == stats.forward_passes("input") == 2 + 5
    assert 0.0 < measured["sites"]["input"]["mean"] < 1.0


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stock_lm_eval_and_the_console_script_run_the_task(tmp_path):
    """Subprocesses: the stock ``lm_eval`` given the task YAML file, the console script and ``python -m`` give the
    same results (every process imports the package only through the CLI)."""
    model_dir = _model_dir(tmp_path)
    bin_dir = Path(sys.executable).parent
    common = ["--model", "dllm_sparse", "--model_args", f"pretrained={model_dir},sparsity=input:top_p:0.9",
              "--limit", "3", "--batch_size", "4", "--device", "cpu"]
    runs = {
        "stock": [str(bin_dir / "lm_eval"), *common, "--tasks", f"{TASK_DIR}/dllm_sparse_mc.yaml"],
        "script": [str(bin_dir / "dllm-sparse-lm-eval"), *common, "--tasks", "dllm_sparse_mc"],
        "module": [sys.executable, "-m", "dllm_sparse.eval.tasks.lm_eval_model", "run", *common, "--tasks",
                   "dllm_sparse_mc"],
    }
    acc, _ = _reference(model_dir, 3)
    for name, args in runs.items():
        proc = _cli([*args, "--output_path", str(tmp_path / name)], cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        out = _results_file(tmp_path / name)
        assert out["results"]["dllm_sparse_mc"]["acc,none"] == pytest.approx(acc), name
        # the 3 shared contexts in one pass, then at most 12 continuations / 4 (how lm-eval splits its calls
        # differs between the entry points; one-token continuations need no pass of their own)
        assert 2 <= out["config"]["measured_sparsity"]["sites"]["input"]["forward_passes"] <= 1 + 3, name


# ---- chat template ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_apply_chat_template(kind):
    tok = build_byte_hf_tokenizer(TEMPLATE)
    lm = DllmSparseLM.from_scorer(_scorer(kind, tok))
    assert lm.chat_template(True) == TEMPLATE and lm.tokenizer_name == tok.name_or_path.replace("/", "__")
    out = lm_eval.simple_evaluate(model=lm, tasks=["dllm_sparse_mc"], task_manager=task_manager(), limit=2,
                                  apply_chat_template=True, log_samples=True, bootstrap_iters=0)
    for sample in out["samples"]["dllm_sparse_mc"]:
        rendered = tok.apply_chat_template([{"role": "user", "content": sample["doc"]["context"]}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered.startswith("<|user|>") and rendered.endswith("<|assistant|>")
        assert {args[0] for args in sample["arguments"]} == {rendered}
    with pytest.raises(ValueError, match="no chat template"):
        DllmSparseLM.from_scorer(_scorer(kind)).apply_chat_template([{"role": "user", "content": "hi"}])


def test_templated_bos_is_not_doubled():
    tok = build_byte_hf_tokenizer(TEMPLATE)
    scorer = _scorer("ar", tok, add_bos_token=True)
    assert scorer.encode("<s>hi") == scorer.encode("hi") == [tok.bos_token_id, *tok.encode("hi")]


# ---- progress bars ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, desc", [("ar", "loglikelihood (AR)"), ("diffusion", "ELBO forward passes")])
def test_progress_bars_follow_disable_tqdm(kind, desc, capsys):
    lm = DllmSparseLM.from_scorer(_scorer(kind, greedy_check="off"))
    pair = [Instance("loglikelihood", {}, ("ab", " c"), 0, ("t", 0, 1))]
    roll = [Instance("loglikelihood_rolling", {}, ("some text",), 0, ("t", 0, 1))]
    for call, reqs in ((lm.loglikelihood, pair), (lm.loglikelihood_rolling, roll)):
        call(reqs)
        assert desc in capsys.readouterr().err
        call(reqs, disable_tqdm=True)
        assert desc not in capsys.readouterr().err
    assert lm.scorer.progress is False  # the scorer's own setting is left as it was
    quiet = DllmSparseLM.from_scorer(_scorer(kind), progress=False)
    quiet.loglikelihood(pair)
    assert desc not in capsys.readouterr().err


# ---- data parallel ------------------------------------------------------------------------------------------------

class _FakeLauncher:
    """What DllmSparseLM reads from accelerate's PartialState on rank 1 of 2."""

    process_index, num_processes, device = 1, 2, "cpu"


def test_rank_and_world_size_come_from_the_launcher(monkeypatch):
    import dllm_sparse.eval.tasks.lm_eval_model as module

    monkeypatch.setattr(module, "launcher_state", lambda: _FakeLauncher())
    lm = DllmSparseLM.from_scorer(_scorer("ar"), data_parallel=True)
    assert (lm.rank, lm.world_size) == (1, 2)
    assert not lm._show_progress(False)  # bars on rank 0 only
    task = task_manager().load(["dllm_sparse_mc"])["tasks"]
    (task,) = task.values()
    task.build_all_requests(limit=6, rank=lm.rank, world_size=lm.world_size)
    assert sorted({r.doc_id for r in task.instances}) == [1, 3, 5]  # lm-eval hands this rank its share
    # A model around an existing scorer stays one process unless asked (the sweep splits cells itself).
    single = DllmSparseLM.from_scorer(_scorer("ar"))
    assert (single.rank, single.world_size) == (0, 1)


def test_padding_copies_are_scored_once():
    scorer = _scorer("ar")
    stats, config = SparsityStats(), SparsityConfig("input", TopP(0.9))
    lm = DllmSparseLM.from_scorer(scorer, sparsity=config, stats=stats)
    a = Instance("loglikelihood", {}, ("ab", " c"), 0, ("t", 0, 1))
    b = Instance("loglikelihood", {}, ("xy", " zz"), 0, ("t", 1, 1))
    out = lm.loglikelihood([a, b, b, b])  # lm-eval pads a rank's share with copies of its last request
    assert out[1] == out[2] == out[3] and len(out) == 4
    with scorer.sparsified(config):
        assert out == [*scorer.loglikelihood([("ab", " c"), ("xy", " zz")]), out[1], out[1]]
    assert stats.forward_passes("input") == 1  # one batch of the 2 distinct requests


@pytest.mark.slow
def test_two_process_torchrun_splits_requests(tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank scores only its share; rank 0's results and pooled measured
    sparsity equal a one-process run's."""
    worker = Path(__file__).with_name("lm_eval_data_parallel_worker.py")
    proc = _cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(worker), str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    sys.path.insert(0, str(worker.parent))
    import lm_eval_data_parallel_worker as w

    w.CountingLM.requests = 0
    lm, one = w.run(data_parallel=False)
    total = w.CountingLM.requests
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert 0 < ranks[0]["requests"] < total and ranks[0]["requests"] + ranks[1]["requests"] == total
    assert ranks[1]["results"] is None  # only rank 0 aggregates
    for m in ("acc,none", "acc_norm,none"):
        assert ranks[0]["results"][m] == pytest.approx(one["results"]["dllm_sparse_mc"][m])
    pooled, single = ranks[0]["measured"], one["config"]["measured_sparsity"]
    assert pooled["ranks"] == 2 and single["ranks"] == 1
    assert pooled["sites"]["input"]["mean"] == pytest.approx(single["sites"]["input"]["mean"], rel=1e-9)
    assert [pooled["sites"]["input"]["per_layer"][str(k)] for k in (0, 1)] == pytest.approx(
        list(single["sites"]["input"]["per_layer"].values()), rel=1e-9)
