"""Bad input gets a clear error naming the problem (and the fix), never a silent truncation or a crash deep inside."""

import math

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
