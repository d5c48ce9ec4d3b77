"""``GenerationConfig(confidence="official")`` reproduces the official LLaDA sampler bit for bit, in bf16."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dllm_sparse.samplers import GenerationConfig, MaskedDiffusionGenerator


def _official_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """The official ``generate`` at temperature 0, low-confidence remasking, written from its definition: the
    softmax of the model's logits in their own dtype, the k most confident masked positions by torch.topk over
    the whole row."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        lo = prompt.shape[1] + nb * block_length
        n = int((x[:, lo:lo + block_length] == mask_id).sum())
        ks = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(input_ids=x).logits
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))
            _, idx = torch.topk(confidence[0], k=ks[i])
            x[0, idx] = x0[0, idx]
    return x


@pytest.fixture(scope="module")
def bf16_llada():
    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

    torch.manual_seed(0)
    return LLaDAModelLM(tiny_llada_config(init_std=0.2)).eval().to(torch.bfloat16)


@torch.no_grad()
def test_official_confidence_reproduces_the_official_loop_in_bf16(bf16_llada):
    model = bf16_llada
    mask_id = model.config.mask_token_id
    gen = MaskedDiffusionGenerator(model, mask_id=mask_id)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(5, 100, (1, 4), generator=g)
        for steps, gl, bl in ((8, 8, 8), (8, 8, 4), (4, 8, 4)):
            ref = _official_generate(model, prompt, steps, gl, bl, mask_id)
            cfg = GenerationConfig(gen_length=gl, steps=steps, block_length=bl, mask_id=mask_id, stop_token_ids=())
            official = gen.generate(prompt, cfg.replace(confidence="official")).sequences
            assert torch.equal(official, ref), (seed, steps, gl, bl)


# Two generated positions whose bf16 confidences tie exactly while their float64 confidences differ: built from
# the logits, so the tie does not depend on the CPU's bf16 kernels. Vocabulary 0..6, mask id 7.
TIE_MASK_ID = 7
# p(x0) = e^a / (e^a + 6): a = 1.7890625 gives 0.49932, a = 1.796875 gives 0.50128 in float64. Both lie well
# inside bf16's rounding interval of 0.5 ([0.49902, 0.50195]), so both round to 0.5 in any bf16 softmax.
TIE_LOGITS = (1.7890625, 1.796875)


class TiedConfidenceLM(torch.nn.Module):
    """A bf16 masked LM over a canvas [prompt, g0, g1]. While both g0 and g1 are masked, position gj predicts
    token 1 + j with logit ``a[j]`` (all other tokens 0, the mask token -30); once one is committed, the other
    predicts token 3 + j with certainty. So the final sequence records which position was committed first."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))  # gives the model a dtype/device

    def forward(self, input_ids, attention_mask=None):
        B, S = input_ids.shape
        logits = torch.zeros((B, S, TIE_MASK_ID + 1), dtype=torch.bfloat16)
        logits[..., TIE_MASK_ID] = -30
        gen = input_ids[:, S - 2:] == TIE_MASK_ID
        for r in range(B):
            for j in range(2):
                if gen[r].all():
                    logits[r, S - 2 + j, 1 + j] = self.a[j]
                else:
                    logits[r, S - 2 + j, 3 + j] = 30
        return SimpleNamespace(logits=logits)


@torch.no_grad()
def test_a_bf16_confidence_tie_separates_the_official_loop_from_the_float64_default():
    """On a bf16 tie the official loop takes topk's choice and the float64 default the truly more confident
    position. Built twice with the two logits swapped: topk sees the same bf16 confidences both times, so it
    picks the same position, and the float64 default (which follows the larger logit) disagrees on exactly one."""
    prompt = torch.tensor([[0]])
    cfg = GenerationConfig(gen_length=2, steps=2, block_length=2, mask_id=TIE_MASK_ID, stop_token_ids=())
    differs = 0
    for a in (TIE_LOGITS, TIE_LOGITS[::-1]):
        model = TiedConfidenceLM(a)
        logits = model(torch.tensor([[0, TIE_MASK_ID, TIE_MASK_ID]])).logits[0, 1:]
        bf16_p = F.softmax(logits, dim=-1)
        f64_p = F.softmax(logits.to(torch.float64), dim=-1)
        assert bf16_p[0, 1] == bf16_p[1, 2] == 0.5  # the construction: a tie in bf16 ...
        assert abs(f64_p[0, 1] - f64_p[1, 2]) > 1e-3  # ... that float64 resolves
        ref = _official_generate(model, prompt, 2, 2, 2, TIE_MASK_ID)
        gen = MaskedDiffusionGenerator(model, mask_id=TIE_MASK_ID, family="")
        assert torch.equal(gen.generate(prompt, cfg.replace(confidence="official")).sequences, ref)
        default = gen.generate(prompt, cfg).sequences
        first = 0 if a[0] > a[1] else 1  # the float64 default commits the larger logit's position first
        assert default[0, 1:].tolist() == ([1, 4] if first == 0 else [3, 2])
        differs += not torch.equal(default, ref)
    assert differs == 1


def test_confidence_must_be_named():
    with pytest.raises(ValueError, match="confidence must be one of"):
        GenerationConfig(confidence="bf16")
