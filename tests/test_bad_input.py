"""Bad input gets a clear error naming the problem (and the fix), never a silent truncation or a crash deep inside."""

import math
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.parametrize("t", [math.nan, -0.5])
def test_temperature_nan_or_negative(t):
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        GenerationConfig(temperature=t)


def test_cfg_scale_nan():
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        GenerationConfig(cfg_scale=math.nan)


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
        generate(model, None, [[5, vocab, 7]], GenerationConfig(gen_length=4, steps=4, stop_token_ids=()))


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
        generate(model, None, [[5] * (context - 2)], GenerationConfig(gen_length=4, steps=4, stop_token_ids=()))
