"""sparsify and accelerate_ffn with torch.compile, in both orders (docs/sparsification.md, docs/kernels.md).

Compiling on a CPU needs a C compiler and takes tens of seconds per graph: those tests are slow; the detection
and attachment logic is tested fast, without compiling anything."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import build_tiny_model

from dllm_sparse import SparsityConfig, SparsityStats, TopP, sparsify
from dllm_sparse.kernels import accelerate_ffn, restore_ffn
from dllm_sparse.sparsity.hooks import uncompiled

IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 90, 7, 64], [1, 9, 27, 4, 60, 2, 33, 120, 15]])
CONFIG = SparsityConfig("input", TopP(0.5))


def _counts(stats: SparsityStats) -> dict:
    return {k: (float(c.zeros), float(c.tokens)) for k, c in stats.counts.items()}


def _eager_reference(model):
    """(dense logits, sparsified logits, sparsified statistics' counts) without compilation."""
    with torch.no_grad():
        dense = model(IDS).logits
        with sparsify(model, CONFIG) as stats:
            sparse = model(IDS).logits
    return dense, sparse, _counts(stats)


def test_sparsify_on_a_compiled_model_hooks_its_original_module():
    model = build_tiny_model("llama")
    compiled = torch.compile(model)  # nothing is compiled before the first call
    assert uncompiled(compiled) == (model, True) and uncompiled(model) == (model, False)
    gate = model.model.layers[0].mlp.gate_proj
    with sparsify(compiled, CONFIG) as stats:
        assert len(gate._forward_pre_hooks) == 1  # on the original module, the one the compiled graph runs
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False  # dynamo now notices hook changes
        with torch.no_grad():
            model(IDS)  # the original module, eager: the hooks count
    assert not gate._forward_pre_hooks and stats.mean() > 0.4


@pytest.mark.slow
def test_sparsify_and_torch_compile_in_both_orders():
    model = build_tiny_model("llama")
    dense, sparse, counts = _eager_reference(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, dense, atol=1e-5, rtol=1e-5)
        # compile, then sparsify: the graph compiled without hooks is not reused
        with sparsify(compiled, CONFIG) as stats:
            torch.testing.assert_close(compiled(IDS).logits, sparse, atol=1e-5, rtol=1e-5)
        assert _counts(stats) == counts
        torch.testing.assert_close(compiled(IDS).logits, dense, atol=1e-5, rtol=1e-5)  # dense again
        # sparsify, then compile (another instance of the same class: no graph of the first one is reused)
        other = build_tiny_model("llama")
        with sparsify(other, CONFIG) as stats:
            compiled_other = torch.compile(other)
            torch.testing.assert_close(compiled_other(IDS).logits, sparse, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled_other(IDS).logits, sparse, atol=1e-5, rtol=1e-5)
        assert _counts(stats) == {k: (2 * z, 2 * n) for k, (z, n) in counts.items()}  # two calls counted
        torch.testing.assert_close(compiled_other(IDS).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_accelerate_ffn_before_and_after_torch_compile():
    model = build_tiny_model("llama")
    dense, sparse, counts = _eager_reference(model)
    with torch.no_grad():
        compiled = torch.compile(model)
        compiled(IDS)
        stats = SparsityStats()
        accelerate_ffn(compiled, CONFIG, stats=stats, backend="torch")  # after compile
        torch.testing.assert_close(compiled(IDS).logits, sparse, atol=1e-5, rtol=1e-5)
        # the swapped modules see no attention mask, the batch has no padding: same counts as the hooks
        assert _counts(stats) == counts
        restore_ffn(compiled)
        torch.testing.assert_close(compiled(IDS).logits, dense, atol=1e-5, rtol=1e-5)
        other = build_tiny_model("llama")
        accelerate_ffn(other, CONFIG, backend="torch")  # before compile
        compiled_other = torch.compile(other)
        torch.testing.assert_close(compiled_other(IDS).logits, sparse, atol=1e-5, rtol=1e-5)
        restore_ffn(other)
        torch.testing.assert_close(compiled_other(IDS).logits, dense, atol=1e-5, rtol=1e-5)
