"""One run identity (dllm_sparse.eval.identity) and every cache / resume key built from it: the lm-eval response
cache, the sweep cells (configuration changes between a kill and a resume), the step profile of
llada_vs_llama.py and the mask-reuse cells; atomic summaries; limits; unknown lm-eval arguments; d = 0 rules."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model

from dllm_sparse.eval.identity import IdentityMismatch, RunIdentity, run_identity, weights_hash
from dllm_sparse.eval.rows import atomic_write_json, read_json_or_none, read_rows
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.sweep.config import SweepConfig
from dllm_sparse.eval.sweep.run import run_sweep
from dllm_sparse.eval.tasks.base import apply_limit
from dllm_sparse.eval.tasks.builtin import PerplexityTask
from dllm_sparse.models.loading import LoadedModel
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.rules import MaxP, TopK, TopP

ROOT = Path(__file__).resolve().parents[1]


def _tiny_ar(seed=1):
    return LoadedModel(build_tiny_model("llama", vocab_size=260, seed=seed), ByteTokenizer(), "ar", "tiny-ar", None,
                       "llama")


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---- the identity itself ---------------------------------------------------------------------------------------


def test_weights_hash_follows_the_weights_and_their_dtype():
    a, b = _tiny_ar(seed=1).model, _tiny_ar(seed=1).model
    assert weights_hash(a) == weights_hash(b)  # same weights, other objects
    # An independent reference for what the hash covers: the name, shape and dtype of every tensor and a sample
    # of its bytes. Every element of a small tensor is sampled, so changing any element of it moves the hash.
    small = min((t for t in a.state_dict().values() if 0 < t.numel() <= 256), key=lambda t: t.numel())
    with torch.no_grad():
        small.view(-1)[-1] += 1.0
    assert weights_hash(a) != weights_hash(b)
    assert weights_hash(b.to(torch.bfloat16)) != weights_hash(_tiny_ar(seed=1).model)
    assert weights_hash(_tiny_ar(seed=2).model) != weights_hash(_tiny_ar(seed=1).model)


def test_run_identity_reads_the_model_and_names_what_differs():
    lm = _tiny_ar()
    ident = run_identity(lm, sparsity=SparsityConfig("input", TopP(0.9)), batch_size=4, mc_num=None)
    assert ident["model"] == "tiny-ar" and ident["kind"] == "ar" and ident["dtype"] == "float32"
    assert ident["device_type"] == "cpu" and ident["weights"] == weights_hash(lm.model)
    assert ident["sparsity"] == "input:top_p:0.9:token" and ident["batch_size"] == 4 and ident["mc_num"] is None
    assert RunIdentity.from_json(ident.to_json()) == ident and ident.digest == RunIdentity(dict(ident)).digest
    other = ident.updated(batch_size=1, dtype="bfloat16")
    with pytest.raises(IdentityMismatch) as err:
        other.require_same(ident, what="folder F", fix="Start a fresh folder.")
    msg = str(err.value)
    assert "folder F" in msg and "batch_size: 4 -> 1" in msg and 'dtype: "float32" -> "bfloat16"' in msg
    assert "Start a fresh folder." in msg and "weights" not in msg  # only the fields that differ
    ident.require_same(dict(ident), what="x", fix="y")  # equal: no error
    # Full-precision thresholds: values that ':g' formatting merged are other identities.
    ids = {run_identity(model="m", sparsity=SparsityConfig("input", TopP(p))).to_json()
           for p in (0.12345671, 0.12345674, 0.9999999, 1.0)}
    assert len(ids) == 4


# ---- lm-eval response cache -------------------------------------------------------------------------------------

lm_eval_needed = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval optional extra")


def _lm(dtype=torch.float32, **kw):
    from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM

    model = build_tiny_model("llama", vocab_size=260, seed=3).to(dtype)
    scorer_kw = {k: kw.pop(k) for k in ("batch_size", "sparsity", "greedy_check") if k in kw}
    return DllmSparseLM.from_scorer(Scorer(model, ByteTokenizer(), "ar", name="tiny-llama",
                                           **{"batch_size": 4, **scorer_kw}), **kw)


@lm_eval_needed
@pytest.mark.parametrize("change, field", [
    ({"dtype": torch.bfloat16}, "dtype"), ({"gen_steps": 2}, "gen_steps"), ({"block_length": 4}, "block_length"),
    ({"max_gen_toks": 32}, "max_gen_toks"), ({"batch_size": 1}, "batch_size"), ({"greedy_check": True}, "greedy_check"),
    ({"sparsity": SparsityConfig("input", TopP(0.12345674))}, "sparsity"),
])
def test_lm_eval_cache_refuses_every_other_setting(tmp_path, change, field):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM

    db = str(tmp_path / "cache.db")
    base = {"gen_steps": 8, "sparsity": SparsityConfig("input", TopP(0.12345671))}
    reqs = [Instance("loglikelihood", {}, ("ab", " c"), 0, ("t", 0, 1))]
    first = CachingLM(_lm(**base), db).loglikelihood(reqs)
    assert CachingLM(_lm(**base), db).loglikelihood(reqs) == first  # the same configuration reuses its answers
    with pytest.raises(IdentityMismatch, match=rf"(?s)What differs.*\b{field}: .* -> .*one cache path"):
        CachingLM(_lm(**{**base, **change}), db)


@lm_eval_needed
def test_lm_eval_cache_of_an_older_version_is_refused(tmp_path):
    from lm_eval.api.model import CachingLM

    from dllm_sparse.eval.tasks.lm_eval_model import IDENTITY_KEY

    db = str(tmp_path / "cache.db")
    CachingLM(_lm(), db)
    from sqlitedict import SqliteDict

    with SqliteDict(db, autocommit=True) as d:
        d[IDENTITY_KEY] = "tiny-llama|ar|dense|exact|bos0"  # the identity an older release wrote
    with pytest.raises(RuntimeError, match="older dllm_sparse.*left out the dtype.*--use_cache cache/"):
        CachingLM(_lm(), db)


@lm_eval_needed
@pytest.mark.parametrize("args", ["sitee=input", "threshhold=0.9", "sparsity=input:top_p:0.9,batchsize=4"])
def test_lm_eval_unknown_model_args_are_refused(args):
    from dllm_sparse.eval.tasks.lm_eval_model import MODEL_ARGS, DllmSparseLM

    with pytest.raises(TypeError, match=r"unknown model argument.*valid ones: pretrained, sparsity, site") as err:
        DllmSparseLM.create_from_arg_string(args, {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    assert all(k in str(err.value) for k in MODEL_ARGS)
    # threshold and p are valid keys (the pieces form of the sparsity), but alone they would give a dense run
    assert {"threshold", "p", "site", "rule"} <= set(MODEL_ARGS)
    for alone in ("threshold=0.9", "p=0.9"):
        with pytest.raises(ValueError, match="without a site, so it would be ignored and the run dense"):
            DllmSparseLM.create_from_arg_string(alone, {"batch_size": 4, "device": "cpu"})


# ---- sweep: configuration changes between a kill and a resume ---------------------------------------------------

PASSAGES = [{"id": "p0", "text": "a small passage"}, {"id": "p1", "text": "another one here, longer"},
            {"id": "p2", "text": "x"}]


def _sweep_cfg(out, **kw):
    base = dict(models=[_tiny_ar()], output_dir=out, sites=["input"], thresholds=[1.0, 0.7], tasks=["ppl"],
                batch_size=4, progress=False)
    base.update(kw)
    return SweepConfig(**base)


def _ppl(name):
    return PerplexityTask("ppl", PASSAGES)


def test_sweep_batch_size_is_part_of_the_key(tmp_path):
    rows = run_sweep(_sweep_cfg(tmp_path), task_factory=_ppl)
    assert all(json.loads(r["key"])[-1] == 4 and r["batch_size"] == 4 for r in rows)
    calls = []
    more = run_sweep(_sweep_cfg(tmp_path, batch_size=1), task_factory=lambda n: calls.append(n) or _ppl(n))
    assert calls and len(more) == 2 * len(rows)  # batch 1 computed its own cells, none of batch 4 reused
    by_key = {r["key"]: r for r in more}
    assert len(by_key) == len(more)


def test_sweep_kill_then_resume_with_other_weights_is_refused(tmp_path):
    def killer(row):
        raise KeyboardInterrupt  # killed right after the first row

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_sweep_cfg(tmp_path), task_factory=_ppl, on_row=killer)
    assert len(read_rows(tmp_path / "rows.jsonl")) >= 1
    other = LoadedModel(build_tiny_model("llama", vocab_size=260, seed=9), ByteTokenizer(), "ar", "tiny-ar", None,
                        "llama")  # same name, other weights (a re-converted checkpoint)
    with pytest.raises(IdentityMismatch, match=r"(?s)rows of model 'tiny-ar'.*weights: \"sha256:.*\" -> "
                                               r"\"sha256:.*fresh --output-dir"):
        run_sweep(_sweep_cfg(tmp_path, models=[other]), task_factory=_ppl)
    on_gpu_like = _tiny_ar()
    rows = read_rows(tmp_path / "rows.jsonl")
    rows[0]["model_identity"]["device_type"] = "cuda"  # as if the first rows were computed on a GPU
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(IdentityMismatch, match=r'device_type: "cuda" -> "cpu"'):
        run_sweep(_sweep_cfg(tmp_path, models=[on_gpu_like]), task_factory=_ppl)
    rows[0]["model_identity"]["device_type"] = "cpu"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = run_sweep(_sweep_cfg(tmp_path), task_factory=_ppl)  # the right model resumes
    clean = run_sweep(_sweep_cfg(tmp_path / "clean"), task_factory=_ppl)
    assert {r["key"]: r["value"] for r in final} == {r["key"]: r["value"] for r in clean}


@pytest.mark.parametrize("limit", [0, -1, 2.5, float("nan"), "3", True, {"ppl": 0}])
def test_bad_limits_are_refused(tmp_path, limit):
    with pytest.raises(ValueError, match="limit"):
        _sweep_cfg(tmp_path, limit=limit)
    if not isinstance(limit, dict):
        with pytest.raises(ValueError, match="limit"):
            apply_limit(PASSAGES, limit)


def test_good_limits_keep_their_meaning():
    assert apply_limit(PASSAGES, None) == PASSAGES and apply_limit(PASSAGES, 2) == PASSAGES[:2]
    assert apply_limit(PASSAGES, 2.0) == PASSAGES[:2] and apply_limit(PASSAGES, 0.5) == PASSAGES[:2]
    assert apply_limit(PASSAGES, 10) == PASSAGES


def test_sweep_leaves_no_folder_when_a_model_cannot_be_found(tmp_path, monkeypatch):
    from dllm_sparse.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="cannot be reached"):
        run_sweep(_sweep_cfg(out, models=["some-org/not-a-cached-model"]), task_factory=_ppl)
    assert not out.exists()


# ---- experiments: folders only after the models load; the step profile's identity --------------------------------


def test_llada_vs_llama_hub_id_without_network_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from dllm_sparse.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    exp = _script("llada_vs_llama")
    out = tmp_path / "run"
    with pytest.raises(OSError, match="cannot be reached"):
        exp.main(["--diffusion-model", "none", "--ar-model", "some-org/not-a-cached-model", "--output-dir", str(out),
                  "--no-progress", "--threads", "1"])
    assert not out.exists()
    for limit in ("0", "-1"):  # refused while the arguments are read
        with pytest.raises(SystemExit):
            exp.main(["--diffusion-model", "none", "--limit", limit, "--output-dir", str(out)])
        assert f"--limit must be a whole number >= 1 (got {limit})" in capsys.readouterr().err
    assert not out.exists()


def test_mask_reuse_hub_id_without_network_leaves_no_folder(tmp_path, monkeypatch):
    from dllm_sparse.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    exp = _script("mask_reuse")
    out = tmp_path / "run"
    with pytest.raises(OSError, match="cannot be reached"):
        exp.main(["--model", "some-org/not-a-cached-model", "--no-fallback", "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("name", ["/ckpt/LLaDA-8B", "./model", "runs/a/b", "~/nowhere"])
def test_a_missing_path_is_named_without_asking_the_hub(name, monkeypatch):
    """A name that cannot be a hub id is a missing path: said at once, without waiting for the hub."""
    from dllm_sparse.models import loading

    def hub(*_a, **_k):
        raise AssertionError("the hub was asked about a path")

    monkeypatch.setattr(loading, "hub_reachable", hub)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(repr(name))}: no such file or directory \(it is not a "
                                                 r"hub id either"):
        loading.check_available(name)
    with pytest.raises(AssertionError, match="the hub was asked"):  # a hub id is still asked about
        loading.check_available("some-org/some-model")


def test_generate_demo_hub_id_without_network_writes_no_trace(tmp_path, monkeypatch, capsys):
    from dllm_sparse.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    exp = _script("generate_demo")
    trace = tmp_path / "out" / "trace.json"
    with pytest.raises(SystemExit):  # a one-line usage error, before anything is loaded
        exp.main(["--ar-model", "some-org/not-a-cached-model", "--no-diffusion", "--trace-out", str(trace)])
    err = capsys.readouterr().err
    assert "--ar-model: 'some-org/not-a-cached-model' is not a local path" in err and "cannot be reached" in err
    assert not trace.parent.exists()


class _Args:
    sites, rule, step_p, seed, scope = ["input", "up"], "top_p", 0.9, 1234, "token"


def test_step_profile_is_keyed_and_recomputed_on_change_or_damage(tmp_path, capsys):
    exp = _script("llada_vs_llama")
    rows = [{"model": "m", "model_identity": {"weights": "sha256:abc"}}]
    ident = exp.step_profile_identity("m", _Args(), "cpu", "fp32", rows)
    assert ident["weights"] == "sha256:abc" and ident["sparsity"] == "input:top_p:0.9:token+up:top_p:0.9:token"
    path = tmp_path / "step_profile.json"
    stored_rows = [{"model": "m", "site": "input", "x": 0, "sparsity": 0.5}]
    atomic_write_json(path, {"identity": ident, "rows": stored_rows})
    assert exp.stored_step_profile(path, ident) == stored_rows  # same settings: reused
    other_sites = type("A", (_Args,), {"sites": ["input"]})()
    other = exp.step_profile_identity("m", other_sites, "cpu", "fp32", rows)
    assert exp.stored_step_profile(path, other) is None
    assert "sparsity: " in capsys.readouterr().out
    other_p = type("A", (_Args,), {"step_p": 0.8})()
    assert exp.stored_step_profile(path, exp.step_profile_identity("m", other_p, "cpu", "fp32", rows)) is None
    new_weights = [{"model": "m", "model_identity": {"weights": "sha256:def"}}]
    assert exp.stored_step_profile(path, exp.step_profile_identity("m", _Args(), "cpu", "fp32", new_weights)) is None
    path.write_text(json.dumps(stored_rows))  # the old format: a bare list, no identity
    assert exp.stored_step_profile(path, ident) is None
    assert "without its configuration" in capsys.readouterr().out
    path.write_text('[{"model": "m", "si')  # truncated by a kill: recomputed, not a crash
    with pytest.warns(UserWarning, match="unreadable"):
        assert exp.stored_step_profile(path, ident) is None


# ---- atomic writes ------------------------------------------------------------------------------------------------


def test_atomic_json_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1})

    class Boom:  # json_default writes unknown objects as their str(): this one fails half-way through the write
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_json(path, {"a": 2, "b": Boom()})
    assert json.loads(path.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [path]
    assert read_json_or_none(tmp_path / "missing.json") is None


# ---- rules on a tensor without entries --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [TopP(0.9), TopP(0.9, method="bisect"), TopP(0.9, method="sort"), TopK(0.5),
                                  MaxP(0.1), TopP(0.9, scope="sequence")])
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4), (2, 4, 0)])
def test_rules_on_empty_tensors_give_the_empty_mask(rule, shape):
    x = torch.randn(shape)
    m = rule.mask(x)
    assert m.shape == x.shape and m.dtype == torch.bool and m.numel() == 0
    assert rule(x).shape == x.shape


def test_weights_hash_is_a_sha256_of_names_shapes_and_samples():
    # Independent recomputation of the documented recipe on a two-tensor module.
    m = torch.nn.Linear(3, 2)
    h = hashlib.sha256()
    for name, t in sorted(m.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.detach().reshape(-1).numpy().tobytes())  # small tensors: every element is sampled
    assert weights_hash(m) == "sha256:" + h.hexdigest()[:16]


# ---- mask-reuse cells ---------------------------------------------------------------------------------------------


def test_mask_reuse_cells_are_keyed_by_dtype_and_weights_and_old_folders_refused(tmp_path):
    from dllm_sparse.eval.studies.reuse_study import cell_key, check_cell_keys, model_fields

    fp32, bf16 = _tiny_ar(), _tiny_ar()
    bf16.model.to(torch.bfloat16)
    f32, f16 = model_fields(fp32), model_fields(bf16)
    assert f32["dtype"] == "float32" and f16["dtype"] == "bfloat16" and f32["weights"] != f16["weights"]
    same = {"model": "tiny-ar", "site": "input", "policy": "fresh"}
    assert cell_key(**same, **f32) != cell_key(**same, **f16)  # a bf16 rerun computes its own cells
    check_cell_keys({cell_key(**same, **f32): {}}, tmp_path / "cells.jsonl")
    with pytest.raises(RuntimeError, match=r"1 cells keyed without the model's weights hash, dtype.*fresh"):
        check_cell_keys({cell_key(**same): {}}, tmp_path / "cells.jsonl")
