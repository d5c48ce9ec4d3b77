"""The diffusion sampler applies the LM head to the rows each step reads only (the current block, one row to the
left under Dream's shift): same tokens and block logits as the full head over every canvas position."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import VOCAB, build_tiny_model

import dllm_sparse.samplers.diffusion as diffusion_module
from dllm_sparse.samplers import GenerationConfig, generate

PROMPTS = [[5, 17, 3, 42, 8], [7, 9, 11, 4, 6]]
CFG = GenerationConfig(gen_length=12, steps=6, block_length=4, stop_token_ids=(), mask_id=VOCAB - 1)


@contextmanager
def _full_head():
    """The reference: the forward computes logits at every position (no head split)."""

    @contextmanager
    def keep_head(model, profile=None):
        yield None

    saved = diffusion_module.without_lm_head
    diffusion_module.without_lm_head = keep_head
    try:
        yield
    finally:
        diffusion_module.without_lm_head = saved


class _Log:
    def __init__(self):
        self.logits = []

    def on_step_end(self, state):
        self.logits.append(state.logits.clone())


def _run(model, cfg, head_calls):
    log = _Log()
    handle = None
    head = getattr(getattr(getattr(model, "model", None), "transformer", None), "ff_out", None)
    if head is not None:
        handle = head.register_forward_hook(lambda m, a, out: head_calls.append(a[0].shape[1]))
    try:
        out = generate(model, None, PROMPTS, cfg, callbacks=[log])
    finally:
        if handle is not None:
            handle.remove()
    return out, log.logits


CASES = {
    "llada": ({"init_std": 0.2}, {}),
    "llada_self_shift": ({"init_std": 0.2, "logit_shift": True}, {}),  # a converted AR twin
    "llada_dream_shift": ({"init_std": 0.2}, {"logit_shift": True}),  # Dream's shift applied by the sampler
    "llada_cfg": ({"init_std": 0.2}, {"cfg_scale": 1.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_head_on_read_rows_equals_full_head(case):
    model_kw, cfg_kw = CASES[case]
    model = build_tiny_model("llada", **model_kw)
    cfg = CFG.replace(**cfg_kw)
    split_calls, full_calls = [], []
    out, logits = _run(model, cfg, split_calls)
    with _full_head():
        ref, ref_logits = _run(model, cfg, full_calls)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert split_calls == []  # the head module never ran over the canvas
    assert full_calls and set(full_calls) == {len(PROMPTS[0]) + CFG.gen_length}


def test_family_without_a_splittable_head_keeps_the_full_forward():
    model = build_tiny_model("dream", initializer_range=0.2)
    cfg = CFG.replace(mask_id=VOCAB - 1)
    out, logits = _run(model, cfg, [])
    with _full_head():
        ref, ref_logits = _run(model, cfg, [])
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(logits, ref_logits, strict=True):
        assert torch.equal(a, b)
