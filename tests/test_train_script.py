"""experiments/adapt_ar_to_diffusion.py end to end on a tiny causal LM: accelerate loop, peft export, resume keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_tiny_model

peft = pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "adapt_ar_to_diffusion.py"


def _script():
    spec = importlib.util.spec_from_file_location("adapt_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny tied-embedding Llama with a word-level tokenizer, saved as a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-base")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    build_tiny_model("llama", tie_word_embeddings=True).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_rows(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    with path.open("w") as f:
        for _ in range(12):
            words = torch.randint(4, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"text": " ".join(f"w{int(w)}" for w in words)}) + "\n")
    return path


def _args(base, data, run_dir, *extra):
    return ["--base", str(base), "--data", str(data), "--heldout", "4", "--batch-size", "2", "--r", "4",
            "--alpha", "8", "--threads", "1", "--run-dir", str(run_dir), "--ckpt-minutes", "0", *extra]


def test_train_export_is_a_peft_adapter_that_merges_to_the_trained_model(tiny_base, text_rows, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dllm_sparse.models.adapt import add_mask_token, convert_causal_lm, load_adapted_model

    out = tmp_path / "adapter"
    _script().main(_args(tiny_base, text_rows, tmp_path / "run", "--max-steps", "3", "--export", str(out)))
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and len(log["loss"]) == 3 and log["heldout"][0]["step"] == 0
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in log["loss"])

    # plain peft, as a user would: PeftModel.from_pretrained(converted base).merge_and_unload()
    base = convert_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_base))
    mask_id = add_mask_token(base)
    stock = peft.PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    ours = load_adapted_model(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    untrained = convert_causal_lm(AutoModelForCausalLM.from_pretrained(tiny_base))
    add_mask_token(untrained)
    ids = torch.tensor([[5, 6, mask_id, mask_id, 9]])
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits)
        assert not torch.allclose(ours(ids).logits, untrained(ids).logits), "training changed nothing"
        # the mask row was trained (it starts at the mean embedding)
        assert not torch.allclose(ours.get_input_embeddings().weight[mask_id],
                                  untrained.get_input_embeddings().weight[mask_id])


def test_save_adapter_every_writes_the_trajectory_and_its_last_point_is_the_export(tiny_base, text_rows, tmp_path):
    from safetensors.torch import load_file

    from dllm_sparse.models.adapt import read_adapter_meta

    run, out = tmp_path / "run", tmp_path / "adapter"
    _script().main(_args(tiny_base, text_rows, run, "--max-steps", "4", "--save-adapter-every", "2",
                         "--export", str(out)))
    saved = sorted(p.name for p in (run / "adapters").iterdir())
    assert saved == ["step-2", "step-4"]  # no temporary folder left behind
    metas = [read_adapter_meta(run / "adapters" / n) for n in saved]
    assert [m["step"] for m in metas] == [2, 4] and metas[0]["tokens"] < metas[1]["tokens"]
    last, first = (load_file(run / "adapters" / n / "adapter_model.safetensors") for n in ("step-4", "step-2"))
    exported = load_file(out / "adapter_model.safetensors")
    assert set(last) == set(exported)
    for k in exported:
        torch.testing.assert_close(last[k], exported[k], rtol=0, atol=0)
    assert any(not torch.equal(first[k], last[k]) for k in last), "step 2 and step 4 adapters are the same"
    assert "tokens_total" not in metas[0]  # trained from the base: its tokens are all it has seen

    # A next stage from the step-2 adapter counts the tokens of both stages (the trajectory's x-axis).
    run2 = tmp_path / "run2"
    _script().main(_args(tiny_base, text_rows, run2, "--max-steps", "2", "--save-adapter-every", "2",
                         "--init-adapter", str(run / "adapters" / "step-2"), "--export", str(tmp_path / "a2")))
    meta2 = read_adapter_meta(run2 / "adapters" / "step-2")
    assert meta2["tokens_total"] == metas[0]["tokens"] + meta2["tokens"]
    assert read_adapter_meta(tmp_path / "a2")["tokens_total"] == meta2["tokens_total"]


def test_max_steps_alone_takes_every_step_however_slow(tiny_base, text_rows, tmp_path, monkeypatch):
    """--max-steps without --minutes is not cut by the 30-minute default budget (a re-created stage once stopped
    at 109 of 205 steps on a busy machine): here every clock reading is 31 minutes after the last."""
    import itertools
    import time

    clock = itertools.count(0, 31 * 60)
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    out = tmp_path / "adapter"
    _script().main(_args(tiny_base, text_rows, tmp_path / "run", "--max-steps", "3", "--export", str(out)))
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and log["hyperparameters"]["minutes"] is None


def test_resume_continues_and_refuses_other_settings(tiny_base, text_rows, tmp_path):
    run = tmp_path / "run"
    _script().main(_args(tiny_base, text_rows, run, "--max-steps", "2"))
    _script().main(_args(tiny_base, text_rows, run, "--max-steps", "3"))  # a larger budget resumes
    resumed = torch.load(run / "ckpt.pt", weights_only=True)  # tensors and plain types only
    state = resumed["state"]
    assert state["step"] == 3 and [r["step"] for r in state["log"]] == [1, 2, 3]
    assert resumed["params"] and resumed["opt"]["state"]  # the trainable tensors and AdamW's moments
    with pytest.raises(SystemExit, match=r"lr: checkpoint 0\.0005 vs now 0\.001"):
        _script().main(_args(tiny_base, text_rows, run, "--max-steps", "4", "--lr", "1e-3"))


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-steps", "0"), ("--minutes", "0"),
                                         ("--lr", "nan")])
def test_impossible_settings_are_refused(tiny_base, text_rows, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        _script().main(_args(tiny_base, text_rows, tmp_path / "run", flag, value))
    assert flag in capsys.readouterr().err


def test_a_checkpoint_holding_code_objects_is_refused(tiny_base, text_rows, tmp_path):
    """Resuming reads with weights_only=True: a pickled object (which could run code) is refused, naming the fix."""
    run = tmp_path / "run"
    _script().main(_args(tiny_base, text_rows, run, "--max-steps", "1"))
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    ck["state"]["settings"]["when"] = __import__("datetime").datetime(2026, 1, 1)  # not a plain type
    torch.save(ck, run / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"weights_only=True.*another --run-dir"):
        _script().main(_args(tiny_base, text_rows, run, "--max-steps", "2"))
