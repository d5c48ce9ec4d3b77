"""sparsify and accelerate_ffn with torch.compile, in both orders (docs/sparsification.md, docs/kernels.md).

Compiling with inductor on a CPU needs a C compiler and takes tens of seconds per graph: those tests are slow; the
detection and attachment logic is tested fast, without compiling anything. The samplers' model calls with the sparse
kernels swapped in are traced whole (fullgraph=True) with aot_eager: fake-tensor tracing and functionalization
without code generation, seconds each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import build_tiny_model

from dllm_sparse import SparsityConfig, SparsityStats, TopP, sparsify
from dllm_sparse.kernels import accelerate_ffn, restore_ffn
from dllm_sparse.samplers import AutoregressiveGenerator, MaskedDiffusionGenerator
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


# --------------------------------------------------------------------------------------------------------
# The samplers' model calls with the sparse kernels swapped in: one graph each (fullgraph=True)
# --------------------------------------------------------------------------------------------------------


def _recording_aot_eager(graphs: list):
    """aot_eager (fake-tensor tracing and functionalization, no code generation: seconds on a CPU), keeping the
    traced FX code so a test can see which ops the graph runs."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return backend


def _sparse_model(family: str, site: str):
    init = {"init_std": 0.2} if family == "llada" else {"initializer_range": 0.2}  # activations worth sparsifying
    model = build_tiny_model(family, **init)
    return accelerate_ffn(model, site=site, rule=TopP(0.5), backend="torch")


# The custom op each site's sparse FFN runs at one token (decode) and at several (a denoising canvas).
_DECODE_OPS = {"input": "colsparse_gemv", "intermediate": "colsparse_gemv", "gate": "rowsparse_matmul",
               "up": "rowsparse_matmul"}
_CANVAS_OPS = {"input": "colsparse_gemm", "intermediate": "colsparse_gemm", "gate": "rowsparse_matmul",
               "up": "rowsparse_matmul"}


@pytest.mark.parametrize("site", ["input", "intermediate", "gate", "up"])
def test_sparse_decode_step_compiles_whole(site):
    """The AR sampler's model call at decode shape (one new token, KV cache of the prompt) with per-token top-p at
    ``site`` compiles with fullgraph=True: no graph break, hence no .item() / .tolist() / data-dependent shape (each
    would break the graph: scalar outputs are not captured). The kernels are custom ops with fake implementations,
    traced as single nodes; the compiled step equals eager, and so does the next step (the cache grown by one)."""
    assert torch._dynamo.config.capture_scalar_outputs is False
    model = _sparse_model("llama", site)
    gen = AutoregressiveGenerator(model)
    ids = torch.randint(3, 120, (1, 8), generator=torch.Generator().manual_seed(0))
    graphs = []
    torch._dynamo.reset()
    step = torch.compile(gen._forward, fullgraph=True, backend=_recording_aot_eager(graphs))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values
        cache_eager = copy.deepcopy(cache)
        for t in (6, 7):
            tok, am, pos = ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]])
            ref = gen._forward(tok, am, pos, cache_eager)
            got = step(tok, am, pos, cache)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert graphs and all(f"dllm_sparse.{_DECODE_OPS[site]}" in code for code in graphs)


@pytest.mark.parametrize("site", ["input", "intermediate", "gate", "up"])
def test_sparse_denoising_forward_compiles_whole(site):
    """The diffusion sampler's model call on a full canvas (prompt + masked positions, a batch of 2) with per-token
    top-p at ``site``: fullgraph=True, equal to eager."""
    model = _sparse_model("llada", site)
    mask_id = 126
    gen = MaskedDiffusionGenerator(model, mask_id=mask_id)
    canvas = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    canvas[:, 5:] = mask_id
    canvas[1, 9] = 17  # a committed token among the masked ones
    read = slice(5, 12)
    graphs = []
    torch._dynamo.reset()
    step = torch.compile(gen._forward, fullgraph=True, backend=_recording_aot_eager(graphs))
    with torch.no_grad():
        ref = gen._forward(canvas, None, read)
        got = step(canvas, None, read)
    assert got.shape == (2, 7, 128)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert len(graphs) == 1 and f"dllm_sparse.{_CANVAS_OPS[site]}" in graphs[0]
