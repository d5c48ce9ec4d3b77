"""Wrapped models are models: a LoRA not merged (peft), torch.compile and accelerate's hooks give the plain
model's numbers in the likelihood scorers and the masking path, and the kernels refuse what they cannot run.

The generators are tested with the same wrappers in test_autoregressive.py and test_diffusion_sampler.py."""

import pytest
import torch
from conftest import WRAPPERS, wrapped_model

from dllm_sparse import TopP, sparsify
from dllm_sparse.eval.scoring.scorer import Scorer

REQUESTS = [([5, 17, 3], [42, 8]), ([7, 7, 1, 9], [60]), ([60, 2], [33, 4, 5])]


@pytest.mark.parametrize("how", WRAPPERS)
@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_scorer_on_a_wrapped_model_equals_the_plain_one(llama, llada, kind, how):
    model = llama if kind == "ar" else llada
    wrapped, reference = wrapped_model(model, how)
    kw = dict(mask_id=llada.config.mask_token_id, mc_num=4, mc_batch=2) if kind == "diffusion" else {}
    got = Scorer(wrapped, None, kind, **kw).loglikelihood_tokens(REQUESTS)
    want = Scorer(reference, None, kind, **kw).loglikelihood_tokens(REQUESTS)
    assert [g[1] for g in got] == [w[1] for w in want]
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", WRAPPERS)
def test_sparsify_on_a_wrapped_model_equals_the_plain_one(llama, how):
    wrapped, reference = wrapped_model(llama, how)
    ids = torch.tensor([[5, 17, 3, 42, 8, 9]])
    results = []
    for model in (wrapped, reference):
        with sparsify(model, "input", TopP(0.5)) as stats, torch.no_grad():
            results.append((model(ids).logits, stats.mean()))
    (got, got_sparsity), (want, want_sparsity) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_sparsity == want_sparsity > 0


def test_accelerate_ffn_refuses_an_unmerged_lora_naming_the_fix(llama):
    from dllm_sparse.kernels import accelerate_ffn, is_accelerated

    wrapped, _ = wrapped_model(llama, "peft")
    with pytest.raises(ValueError, match=r"unmerged peft LoRA adapter.*merge_and_unload"):
        accelerate_ffn(wrapped, "input", TopP(0.5), backend="torch")
    assert not is_accelerated(wrapped)  # refused before any module was swapped
