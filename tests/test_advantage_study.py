"""experiments/advantage_study.py end to end on tiny models (every stage: calibration, trajectory, sweep, tables,
verdicts, figures), its resume and its refusals; the real --smoke run on the embedded pair is marked slow."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_tiny_model

from dllm_sparse.eval.studies.advantage import VERDICTS

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "advantage_study.py"
CHAT = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}> {% endif %}"


def _script():
    spec = importlib.util.spec_from_file_location("advantage_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny AR parent (fitted a little to the held-out answers, so that degrading it raises its perplexity)
    and its converted, untrained twin, saved as local model directories."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dllm_sparse.eval.studies.heldout import heldout_answers
    from dllm_sparse.models.loading import LoadedModel
    from dllm_sparse.models.twin import untrained_twin

    root = tmp_path_factory.mktemp("pair")
    # Character level: the held-out answers are English, which a word vocabulary of 128 would map to <unk> (a
    # trivially predictable text no degradation makes hard).
    chars = sorted(set(string.printable) - set(string.whitespace) | {" "})[: VOCAB - 4]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    vocab |= {f"<x{i}>": i for i in range(len(vocab), VOCAB)}  # the model's vocabulary size
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT
    model = build_tiny_model("llama", tie_word_embeddings=True, max_position_embeddings=1024)
    rows = heldout_answers(tok, limit=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for p, a in rows:
            ids = torch.tensor([p + a])
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    parent_dir, twin_dir = root / "parent", root / "twin"
    model.eval().save_pretrained(parent_dir)
    tok.save_pretrained(parent_dir)
    twin = untrained_twin(LoadedModel(model, tok, "ar", "tiny", None, "llama"))
    twin.model.save_pretrained(twin_dir)
    twin.tokenizer.save_pretrained(twin_dir)
    return parent_dir, twin_dir


def _args(pair, out, *extra):
    parent, twin = pair
    return ["--smoke", "--ar-model", str(parent), "--twin", str(twin), "--output-dir", str(out), "--threads", "1",
            "--no-progress", "--n-boot", "50", "--sigma-max", "30", *extra]


def _target(pair) -> float:
    from dllm_sparse.eval.studies.heldout import heldout_answers, heldout_perplexity
    from dllm_sparse.models.loading import load_model

    lm = load_model(str(pair[0]), dtype="fp32")
    return 1.3 * heldout_perplexity(lm, heldout_answers(lm.tokenizer, limit=4))


def test_study_runs_every_stage_resumes_and_refuses_other_settings(tiny_pair, tmp_path, capsys):
    out = tmp_path / "study"
    target = _target(tiny_pair)
    assert _script().main(_args(tiny_pair, out, "--target-ppl", str(target), "--controls", "noise")) == 0
    for f in ("calibration.json", "trajectory.json", "rows.jsonl", "advantage.md", "advantage.json",
              "comparison.csv", "critical_sparsity.md", "critical_sparsity_margin.md", "summary.json",
              "figures/critical_vs_perplexity.png"):
        assert (out / f).is_file(), f
    cal = json.loads((out / "calibration.json").read_text())
    noise = cal["entries"]["noise"]
    assert noise["within"] and abs(noise["ppl"] / target - 1) <= 0.15
    assert cal["identity"]["target"] == target and cal["identity"]["tolerance"] == 0.15
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    control = f"{tiny_pair[0]}+{noise['degradation']['id']}"
    models = {r["model"] for r in rows}
    assert control in models and str(tiny_pair[1]) in models and any(m.endswith("@untrained") for m in models)
    assert all(json.loads(r["key"])[0] == r["model"] for r in rows)  # the degradation keys its rows
    res = json.loads((out / "advantage.json").read_text())
    for variant in ("primary", "first_crossing", "margin"):
        assert all(r["verdict"] in VERDICTS for r in res["comparisons"][variant])
    # one control is fewer than the rule needs: every verdict says undetermined, and why
    assert all("valid control" in r["why"] for r in res["comparisons"]["primary"])
    mc = [r for r in rows if r["task"] == "builtin_mc" and r["site"] == "dense"]
    assert all("margin" in r["metrics"] and len(r["items"]["margin"]) == 2 for r in mc)

    # a rerun resumes: no row or calibration is computed again
    before = (out / "rows.jsonl").read_bytes(), (out / "calibration.json").read_text()
    capsys.readouterr()
    assert _script().main(_args(tiny_pair, out, "--target-ppl", str(target), "--controls", "noise")) == 0
    assert "calibrating" not in capsys.readouterr().out
    assert (out / "rows.jsonl").read_bytes() == before[0]
    assert json.loads((out / "calibration.json").read_text())["entries"] == json.loads(before[1])["entries"]
    # other calibration settings into the same folder: refused, naming what differs
    with pytest.raises(SystemExit, match=r"tolerance: 0\.15 -> 0\.1"):
        _script().main(_args(tiny_pair, out, "--target-ppl", str(target), "--controls", "noise",
                             "--tolerance", "0.1"))


def test_an_unreachable_target_stops_the_study_and_leaves_no_folder(tiny_pair, tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="control 'noise' cannot be calibrated: noise range exhausted"):
        _script().main(_args(tiny_pair, out, "--target-ppl", "1e30", "--controls", "noise"))
    assert not out.exists()


def test_a_failing_second_control_keeps_the_first_and_writes_nothing_of_itself(tiny_pair, tmp_path, monkeypatch):
    import dllm_sparse.eval.studies.heldout as heldout

    real = heldout.calibrate

    def calibrate(lm, method, *a, **k):
        if method == "quant":
            raise heldout.CalibrationError("quantisation too mild (forced by the test)")
        return real(lm, method, *a, **k)

    monkeypatch.setattr(heldout, "calibrate", calibrate)
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match="control 'quant' cannot be calibrated: quantisation too mild"):
        _script().main(_args(tiny_pair, out, "--target-ppl", str(_target(tiny_pair))))
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json"]
    assert set(json.loads((out / "calibration.json").read_text())["entries"]) == {"noise"}


@pytest.mark.parametrize("flag, value, match", [("--target-ppl", "0", "--target-ppl must be > 0"),
                                                ("--target-ppl", "-2", "--target-ppl must be > 0"),
                                                ("--heldout-rows", "0", "--heldout-rows must be"),
                                                ("--trajectory", "noequals", "LABEL=ADAPTER_DIR"),
                                                ("--n-boot", "0", "--n-boot must be a whole number >= 1 (got 0)"),
                                                ("--n-boot", "-5", "--n-boot must be a whole number >= 1"),
                                                ("--limit", "0", "--limit must be a whole number >= 1 (got 0)")])
@pytest.mark.parametrize("smoke", [[], ["--smoke"]])
def test_bad_arguments_are_refused(flag, value, match, smoke, capsys):
    with pytest.raises(SystemExit):
        _script().parse_args([*smoke, flag, value])  # --smoke fills in defaults, never over a given value
    assert match in capsys.readouterr().err


def test_an_ar_twin_or_a_diffusion_parent_is_refused_before_any_work(tiny_pair, tmp_path):
    parent, twin = tiny_pair
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=rf"--twin '{parent}' is an ar model; the twin must be a masked-diffusion"):
        _script().main(_args((parent, parent), out, "--target-ppl", "50"))
    with pytest.raises(SystemExit, match=rf"--ar-model '{twin}' is a diffusion model; the parent must be "
                                         "autoregressive"):
        _script().main(_args((twin, twin), out, "--target-ppl", "50"))
    assert not out.exists()  # nothing calibrated, nothing written


def test_a_trajectory_adapter_of_another_base_is_refused_before_the_sweep(tiny_pair, tmp_path):
    import shutil

    from dllm_sparse.models.adapt import ADAPTER_META, write_adapter_meta
    from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

    d = tmp_path / "adapter"
    d.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(SMOLLM2_MDM_ADAPTER / f, d / f)
    meta = json.loads((SMOLLM2_MDM_ADAPTER / ADAPTER_META).read_text())
    meta.pop("files")
    write_adapter_meta(d, meta)  # an adapter of smollm2-135m, not of the tiny parent
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=r"--trajectory s1=.*adapter of base model 'smollm2-135m'"):
        _script().main(_args(tiny_pair, out, "--target-ppl", str(_target(tiny_pair)), "--controls", "noise",
                             "--trajectory", f"s1={d}"))
    assert not (out / "rows.jsonl").exists()


def test_the_embedded_twin_with_another_parent_is_refused(tiny_pair, tmp_path):
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match="was trained from 'smollm2-135m', not from --ar-model"):
        _script().main(["--smoke", "--ar-model", str(tiny_pair[0]), "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_smoke_run_on_the_embedded_pair(tmp_path):
    out = tmp_path / "smoke"
    assert _script().main(["--smoke", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    res = json.loads((out / "advantage.json").read_text())
    assert all(c["within"] for c in res["calibration"].values())
    assert set(res["comparisons"]) == {"primary", "first_crossing", "margin"}
