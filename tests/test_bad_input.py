"""Bad input gets a clear error naming the problem (and the fix), never a silent truncation or a crash deep inside."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dllm_sparse.samplers import GenerationConfig, MaskOverlapTracker, StepSparsity, generate
from dllm_sparse.sparsity.rules import TopP


@pytest.mark.parametrize("value", [7.9, 0, -3, True, math.nan, "8"])
def test_gen_length_must_be_a_whole_number(value):
    with pytest.raises(ValueError, match="gen_length must be a positive integer"):
        GenerationConfig(gen_length=value)


@pytest.mark.parametrize("name", ["steps", "block_length"])
def test_steps_and_blocks_must_be_whole_numbers(name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        GenerationConfig(gen_length=8, **{name: 2.5})


def test_whole_floats_and_numpy_ints_are_accepted():
    cfg = GenerationConfig(gen_length=np.int64(8), steps=8.0)
    assert (cfg.max_new_tokens, cfg.steps) == (8, 8) and type(cfg.max_new_tokens) is int


@pytest.mark.parametrize("t", [math.nan, -0.5, math.inf, "warm", True])
def test_temperature_nan_negative_or_infinite(t):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 = greedy"):
        GenerationConfig(temperature=t)


@pytest.mark.parametrize("w", [math.nan, math.inf, -1.0])
def test_cfg_scale_nan_infinite_or_negative(w):
    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number >= 0 \(0 disables guidance"):
        GenerationConfig(cfg_scale=w)


# Each GenerationConfig field, a value its check refuses, and the message (the table must name every field).
FIELD_CHECKS = [
    ("max_new_tokens", 7.9, r"max_new_tokens / gen_length must be a positive integer, got 7.9"),
    ("temperature", math.nan, r"temperature must be a finite number >= 0 \(0 = greedy, T > 0 samples\), got nan"),
    ("stop_token_ids", (2, 7.9), r"stop_token_ids \(eos_token_id\) must be a token id \(an integer >= 0\), got 7.9"),
    ("stop_strings", ("ok", 5), r"stop_strings must be strings, got 5 in \('ok', 5\)"),
    ("seed", 1.5, r"seed must be None, an int, or a sequence of one int per row, got 1.5"),
    ("pad_id", -1, r"pad_id \(pad_token_id\) must be a token id \(an integer >= 0\), got -1"),
    ("steps", 2.5, r"steps must be a positive integer, got 2.5"),
    ("block_length", 0, r"block_length must be a positive integer, got 0"),
    ("cfg_scale", -1.0, r"cfg_scale must be a finite number >= 0 \(0 disables guidance\), got -1.0"),
    ("remasking", "lowest", r"remasking must be one of \('low_confidence', 'random'\), got 'lowest'"),
    ("mask_id", True, r"mask_id must be a token id \(an integer >= 0\), got True"),
    ("logit_shift", "yes", r"logit_shift must be True, False or None \(None = the model family's convention\)"),
    ("confidence", "float32", r"confidence must be one of \('float64', 'official'\) .*got 'float32'"),
    ("block_cache", "suffix", r"block_cache must be one of \(None, 'prefix', 'dual'\) .*got 'suffix'"),
    ("confidence_threshold", 0.0, r"confidence_threshold must be None or a finite number > 0 .*got 0.0"),
    ("confidence_factor", float("nan"), r"confidence_factor must be None or a finite number > 0 .*got nan"),
]


def test_the_field_table_names_every_field():
    import dataclasses

    assert [f for f, _, _ in FIELD_CHECKS] == [f.name for f in dataclasses.fields(GenerationConfig)]


@pytest.mark.parametrize("name, bad, message", FIELD_CHECKS, ids=[f for f, _, _ in FIELD_CHECKS])
def test_every_field_is_checked_on_assignment_as_in_the_constructor(name, bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{name: bad})
    cfg = GenerationConfig(gen_length=8, steps=8, stop_token_ids=(1,), seed=3)
    before = cfg.to_dict()
    with pytest.raises(ValueError, match=message):
        setattr(cfg, name, bad)
    assert cfg.to_dict() == before  # the refused value is not stored


def test_assignment_normalises_like_the_constructor():
    cfg = GenerationConfig(gen_length=8)
    with pytest.raises(ValueError, match="gen_length must be a positive integer, got 7.9"):
        cfg.gen_length = 7.9
    cfg.gen_length = 16.0
    cfg.steps = np.int64(4)
    cfg.stop_token_ids = np.int64(2)
    cfg.stop_strings = "###"
    assert (cfg.max_new_tokens, cfg.steps, cfg.stop_token_ids, cfg.stop_strings) == (16, 4, (2,), ("###",))
    assert type(cfg.max_new_tokens) is int and type(cfg.steps) is int and type(cfg.stop_token_ids[0]) is int
    assert cfg == GenerationConfig(gen_length=16, steps=4, stop_token_ids=2, stop_strings="###")
    cfg.seed = np.array([5, 6])  # one seed per row, from any integer sequence
    cfg.stop_token_ids = torch.tensor([2, 3])
    assert cfg.seed == (5, 6) and cfg.stop_token_ids == (2, 3) and type(cfg.seed[0]) is int
    for name, bad in (("seed", []), ("seed", "7"), ("seed", [1, 2.5]), ("stop_token_ids", 7.9), ("stop_strings", 5)):
        with pytest.raises(ValueError, match=f"{name}.* must be"):
            setattr(cfg, name, bad)
    with pytest.raises(AttributeError, match=r"no setting 'gen_lenght'; its settings are \['block_cache'"):
        cfg.gen_lenght = 8  # a typo would otherwise be an ignored attribute
    with pytest.raises(AttributeError):
        cfg.do_sample = True  # transformers' spellings are read-only: set the canonical field


DIFFUSION_SETTINGS = {"steps": 4, "block_length": 2, "cfg_scale": 0.5, "remasking": "random", "mask_id": 3,
                      "logit_shift": False, "confidence": "official", "block_cache": "prefix",
                      "confidence_threshold": 0.9, "confidence_factor": 1.0}


def test_every_diffusion_only_setting_is_listed():
    from dllm_sparse.samplers.config import DIFFUSION_ONLY

    assert set(DIFFUSION_SETTINGS) == set(DIFFUSION_ONLY)
    assert all(DIFFUSION_ONLY[k] == getattr(GenerationConfig(), k) for k in DIFFUSION_ONLY)  # the defaults


@pytest.mark.parametrize("name", list(DIFFUSION_SETTINGS))
def test_diffusion_only_settings_are_refused_for_an_ar_model(llama, name):
    value = DIFFUSION_SETTINGS[name]
    cfg = GenerationConfig(gen_length=4, stop_token_ids=(), **{name: value})
    message = (rf"{name}={value!r}: diffusion-only setting\(s\) of GenerationConfig, which autoregressive generation "
               rf"\(LlamaForCausalLM\) would ignore.*config.replace\({name}=")
    with pytest.raises(ValueError, match=message):
        generate(llama, None, [[5, 6]], cfg)
    with pytest.raises(ValueError, match=message):  # as a keyword override too
        generate(llama, None, [[5, 6]], GenerationConfig(gen_length=4, stop_token_ids=()), **{name: value})


def test_diffusion_settings_at_their_defaults_are_fine_for_an_ar_model(llama):
    cfg = GenerationConfig(gen_length=4, stop_token_ids=(), steps=4, cfg_scale=0.5, block_cache="prefix")
    with pytest.raises(ValueError, match=r"steps=4, cfg_scale=0.5, block_cache='prefix': diffusion-only"):
        generate(llama, None, [[5, 6]], cfg)
    out = generate(llama, None, [[5, 6]], cfg.replace(steps=None, cfg_scale=0.0, block_cache=None))
    assert out.nfe == 4 and out.kind == "ar"


def test_steps_beyond_one_token_per_step_are_refused(llada):
    # 4 blocks of 8: at most 8 steps per block, 32 in all; 64 steps would make 32 forward passes commit nothing.
    with pytest.raises(ValueError, match=r"steps \(64\) gives 16 steps per block \(64 / 4 blocks\), more than the "
                                         r"block's 8 positions.*8 steps of every block.*Fix: steps <= 32"):
        generate(llada, None, [[5, 6, 7]], GenerationConfig(gen_length=32, steps=64, block_length=8,
                                                            stop_token_ids=()))
    with pytest.raises(ValueError, match=r"steps \(32\) gives 32 steps per block.*8 positions"):
        generate(llada, None, [[5, 6, 7]], GenerationConfig(gen_length=8, steps=32, stop_token_ids=()))
    # The most steps allowed commit exactly one token each: every step of the trace writes one position.
    out = generate(llada, None, [[5, 6, 7]], GenerationConfig(gen_length=8, steps=8, block_length=4,
                                                            stop_token_ids=()))
    assert out.nfe == 8 and [len(s.committed[0]) for s in out.trace] == [1] * 8


def test_prompt_holding_the_mask_id_is_refused(llada):
    mask = llada.config.mask_token_id
    with pytest.raises(ValueError, match=rf"prompt holds the mask id {mask} at row 1 position 2.*treat it as a "
                                         "masked position"):
        generate(llada, None, [[5, 6, 7], [5, 6, mask, 8]], GenerationConfig(gen_length=4, steps=4,
                                                                           stop_token_ids=()))
    # Counted from the row's first real token, also in a left-padded tensor.
    with pytest.raises(ValueError, match=rf"mask id {mask} at row 0 position 0"):
        generate(llada, None, torch.tensor([[0, mask, 6]]), GenerationConfig(gen_length=4, steps=4, pad_id=0),
                 attention_mask=torch.tensor([[0, 1, 1]]))


@pytest.mark.parametrize("prompts, hint", [(42, "got int 42"), ([1, 2, 3], r"got a list of int \(one prompt of ids"),
                                           ({"a": 1}, "got dict"), ([["a"], 3.5], "got a list of float, list")])
@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_prompts_of_the_wrong_type(kind, prompts, hint, llada, llama):
    with pytest.raises(TypeError, match=rf"prompts must be a string, a list of strings, a list of token-id lists.*"
                                        rf"{hint}"):
        generate(llada if kind == "diffusion" else llama, None, prompts,
                 GenerationConfig(gen_length=4, steps=4 if kind == "diffusion" else None, stop_token_ids=()))


@pytest.mark.parametrize("layers", [[], [0.7], [True]])
def test_tracker_layers_must_be_indices(layers):
    with pytest.raises(ValueError, match="layers must be a non-empty list of layer indices"):
        MaskOverlapTracker(layers=layers)


def test_tracker_layer_the_model_does_not_have(llada):
    tracker = MaskOverlapTracker(layers=[42])
    sp = StepSparsity("input", TopP(0.9), mask_observers=[tracker])
    with pytest.raises(ValueError, match=r"layers \[42\].*sparsified layers are \[0, 1\]"):
        generate(llada, None, [[5, 6, 7]], GenerationConfig(gen_length=4, steps=4, stop_token_ids=()),
                 sparsity=sp, callbacks=[tracker])


# ---- loading -----------------------------------------------------------------------------------------------


def test_load_model_unknown_kind():
    from dllm_sparse import load_model

    with pytest.raises(ValueError, match="kind must be 'ar', 'diffusion' or None"):
        load_model("smollm2-135m", kind="banana")


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a gguf file at all"])
def test_empty_or_foreign_gguf_names_the_file(tmp_path, content):
    from dllm_sparse import load_model

    f = tmp_path / "model.gguf"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file.*download it again"):
        load_model(f)


def test_truncated_gguf_names_the_file(tmp_path):
    from dllm_sparse import load_model
    from dllm_sparse.models.loading import cache_dir

    real = cache_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not real.is_file():
        pytest.skip("the embedded GGUF is not cached here")
    f = tmp_path / "cut.gguf"
    with open(real, "rb") as src:
        f.write_bytes(src.read(4096))  # the header survives, the tensors and most metadata do not
    with pytest.raises(ValueError, match=r"could not read the GGUF file .*cut\.gguf.*truncated"):
        load_model(f)


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    import time

    from dllm_sparse import load_model
    from dllm_sparse.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="cannot be reached from this machine.*local directory"):
        load_model("some-org/not-a-cached-model")
    assert time.perf_counter() - t0 < 10  # no minute of retries


def test_read_only_cache_names_the_variable(tmp_path, monkeypatch):
    import os

    from dllm_sparse.models.loading import build_lock

    if os.geteuid() == 0:
        # root ignores permission bits: make the cache path unusable another way (a file where a folder goes)
        (tmp_path / "cache").write_text("")
        entry = tmp_path / "cache" / "smollm2" / "hf"
    else:
        (tmp_path / "cache").mkdir(mode=0o500)
        entry = tmp_path / "cache" / "smollm2" / "hf"
    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="not writable.*DLLM_SPARSE_CACHE"):
        with build_lock(entry):
            pass


def test_published_cache_directories_are_readable_by_others(tmp_path):
    import os
    import stat
    import tempfile

    from dllm_sparse.models.loading import publish_dir

    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    (tmp / "config.json").write_text("{}")
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # what mkdtemp gives
    old = os.umask(0o022)
    try:
        publish_dir(tmp, tmp_path / "entry")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o755
    assert (tmp_path / "entry" / "config.json").read_text() == "{}"


# ---- token ids and context ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llada", "llama"])
def test_prompt_ids_outside_the_vocabulary(kind, llada, llama):
    model = llada if kind == "llada" else llama
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"prompt token ids \[{vocab}\] are outside the model.s vocabulary"):
        generate(model, None, [[5, vocab, 7]], GenerationConfig(gen_length=4, stop_token_ids=()))


@pytest.mark.parametrize("field", ["pad_id", "mask_id"])
def test_special_ids_outside_the_vocabulary(llada, field):
    vocab = llada.get_input_embeddings().num_embeddings
    cfg = GenerationConfig(gen_length=4, steps=4, stop_token_ids=(), **{field: vocab + 3})
    with pytest.raises(ValueError, match=f"{field} {vocab + 3} is outside the model's vocabulary"):
        generate(llada, None, [[5, 6], [7]], cfg)


@pytest.mark.parametrize("kind", ["llada", "llama"])
def test_prompt_longer_than_the_context(kind, llada, llama):
    model = llada if kind == "llada" else llama
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than the model's context of {context}"):
        generate(model, None, [[5] * (context - 2)], GenerationConfig(gen_length=4, stop_token_ids=()))


@pytest.mark.parametrize("w", [math.inf, math.nan, -0.5])
def test_scorer_cfg_scale_must_be_finite(w, llada):
    from byte_tokenizer import ByteTokenizer

    from dllm_sparse.eval.scoring.scorer import Scorer

    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number >= 0"):
        Scorer(llada, ByteTokenizer(), "diffusion", mask_id=llada.config.mask_token_id, cfg_scale=w)
    scorer = Scorer(llada, ByteTokenizer(), "diffusion", mask_id=llada.config.mask_token_id, mc_num=2, mc_batch=2)
    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number >= 0"):
        scorer.loglikelihood_tokens([([5, 6], [7])], cfg_scale=w)
