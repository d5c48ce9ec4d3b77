"""The approximate block KV caches (Fast-dLLM's prefix and dual caches, ``GenerationConfig(block_cache=...)``).

References, written here from the definition (``samplers/block_cache.py``):
* a cached read = the model's forward of canvas rows ``a:b`` in which every layer's keys and values of the other
  positions are those of the canvas at the last write (the block's first step): ``reference_read`` computes
  exactly that, layer by layer, with its own float64 attention;
* with ONE layer the keys and values of a position depend only on its token, and the rows a cache does not
  recompute keep their tokens within a block (prefix: the prompt and decoded blocks; dual: also the still-masked
  later blocks), so a cached sampler must give the exact sampler's tokens;
* a greedy reference loop built on ``reference_read`` for the multi-layer case.
"""

import math

import pytest
import torch
from conftest import WRAPPERS, wrapped_model

from dllm_sparse.models.llada import CanvasKVCache, LLaDAModelLM, rotary_cos_sin, tiny_llada_config
from dllm_sparse.samplers import GenerationCallback, GenerationConfig, MaskOverlapTracker, generate
from dllm_sparse.samplers.block_cache import rows_to_compute

MASK = 99


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_llada_config(**overrides)).eval()


@pytest.fixture(scope="module")
def llada():
    return _model(0)


@pytest.fixture(scope="module")
def llada1():  # one layer: a cache is exact
    return _model(1, n_layers=1)


def _rope_rows(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _kv(block, h, cos, sin):
    B, T, _ = h.shape
    k = block.k_proj(h).view(B, T, block.n_kv_heads, block.head_dim).transpose(1, 2).double()
    v = block.v_proj(h).view(B, T, block.n_kv_heads, block.head_dim).transpose(1, 2).double()
    return _rope_rows(k, cos, sin), v


def reference_read(model, old_ids, new_ids, rows, key_mask=None):
    """Logits [B, len(rows), V] of canvas rows ``rows`` of ``new_ids`` when every other position's keys and values
    are those of ``old_ids`` (float64, the model's weights)."""
    cfg, tr = model.config, model.model.transformer
    S = old_ids.shape[1]
    cos, sin = (t.double() for t in rotary_cos_sin(S, cfg.d_model // cfg.n_heads, cfg.rope_theta))
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    with torch.no_grad():
        x_old, x_new = tr.wte(old_ids), tr.wte(new_ids[:, rows])
        for blk in tr.blocks:
            h_old, h_new = blk.attn_norm(x_old), blk.attn_norm(x_new)
            K, V = _kv(blk, h_old, cos, sin)
            k_new, v_new = _kv(blk, h_new, cos[rows], sin[rows])
            K, V = K.clone(), V.clone()
            K[:, :, rows], V[:, :, rows] = k_new, v_new
            B, T, C = h_new.shape
            q = blk.q_proj(h_new).view(B, T, blk.n_heads, blk.head_dim).transpose(1, 2).double()
            q = _rope_rows(q, cos[rows], sin[rows])
            rep = blk.n_heads // blk.n_kv_heads
            K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
            scores = q @ K.transpose(-2, -1) / math.sqrt(blk.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = (scores.softmax(-1) @ V).transpose(1, 2).reshape(B, T, C).to(x_new.dtype)
            x_new = x_new + blk.attn_out(y)
            x_new = x_new + blk.mlp(blk.ff_norm(x_new))
            x_old = blk(x_old, rotary_cos_sin(S, cfg.d_model // cfg.n_heads, cfg.rope_theta),
                        None if mask is None else mask)  # the written canvas moves on with the model's own block
        logits = tr.ff_out(tr.ln_f(x_new))
    if cfg.logit_shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def _canvas(B=2, P=6, G=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (B, P + G), generator=g)
    ids[:, P:] = MASK
    return ids


# --------------------------------------------------------------------------------------------------------------
# The model's side: CanvasKVCache
# --------------------------------------------------------------------------------------------------------------


def test_a_write_is_the_plain_forward(llada):
    ids = _canvas()
    am = torch.ones_like(ids)
    am[1, :2] = 0
    with torch.no_grad():
        plain = llada(input_ids=ids, attention_mask=am).logits
        cache = CanvasKVCache()
        written = llada(input_ids=ids, attention_mask=am, canvas_cache=cache, canvas_start=0).logits
    assert torch.equal(plain, written)
    assert sorted(cache.keys) == [0, 1] and cache.keys[0].shape == (2, 2, ids.shape[1], 16)  # pre-GQA: 2 kv heads
    assert torch.equal(cache.key_mask, am.bool())


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "logit_shift"])
@pytest.mark.parametrize("rows", [slice(6, 22), slice(10, 14), slice(5, 14)], ids=["prefix", "dual", "from_s-1"])
def test_a_read_is_the_forward_with_the_written_keys_elsewhere(shift, rows):
    model = _model(2, logit_shift=shift)
    old = _canvas()
    new = old.clone()
    new[:, 10:13] = torch.tensor([[5, 6, 7], [8, 9, 10]])  # three positions of the "block" decoded since the write
    am = torch.ones_like(old)
    am[0, :3] = 0  # left padding in row 0
    cache = CanvasKVCache()
    with torch.no_grad():
        model(input_ids=old, attention_mask=am, canvas_cache=cache, canvas_start=0)
        got = model(input_ids=new[:, rows], attention_mask=am[:, rows], canvas_cache=cache,
                    canvas_start=rows.start).logits
    want = reference_read(model, old, new, rows, key_mask=am)
    torch.testing.assert_close(got.double(), want.double(), atol=2e-5, rtol=1e-4)
    # and the read really used stale keys: the full forward of the new canvas differs (2 layers)
    with torch.no_grad():
        full = model(input_ids=new, attention_mask=am).logits[:, rows]
    assert (full - got).abs().max() > 1e-4


def test_a_read_of_an_unchanged_canvas_is_the_full_forward(llada):
    ids = _canvas()
    cache = CanvasKVCache()
    with torch.no_grad():
        full = llada(input_ids=ids, canvas_cache=cache, canvas_start=0).logits
        part = llada(input_ids=ids[:, 8:14], canvas_cache=cache, canvas_start=8).logits
    torch.testing.assert_close(part, full[:, 8:14], atol=1e-5, rtol=1e-5)


def test_bad_cache_calls_are_refused(llada):
    ids = _canvas()
    with pytest.raises(ValueError, match="before any write"):
        llada(input_ids=ids[:, 4:8], canvas_cache=CanvasKVCache(), canvas_start=4)
    cache = CanvasKVCache()
    with torch.no_grad():
        llada(input_ids=ids, canvas_cache=cache, canvas_start=0)
        with pytest.raises(ValueError, match="do not fit the cached canvas"):
            llada(input_ids=ids[:, 4:8], canvas_cache=cache, canvas_start=20)
        with pytest.raises(ValueError, match="do not fit the cached canvas"):
            llada(input_ids=ids[:1, 4:8], canvas_cache=cache, canvas_start=4)
        with pytest.raises(ValueError, match="padding cannot change"):
            am = torch.ones((2, 4), dtype=torch.long)
            am[0, 0] = 0
            llada(input_ids=ids[:, 4:8], attention_mask=am, canvas_cache=cache, canvas_start=4)
        with pytest.raises(ValueError, match="pass canvas_cache"):
            llada(input_ids=ids[:, 4:8], canvas_start=4)
        causal = _model(0, causal=True)
        with pytest.raises(ValueError, match="causal=True"):
            causal(input_ids=ids, canvas_cache=CanvasKVCache(), canvas_start=0)


# --------------------------------------------------------------------------------------------------------------
# The sampler's side
# --------------------------------------------------------------------------------------------------------------


def test_rows_to_compute():
    block = slice(10, 14)
    assert rows_to_compute(None, block, 30, 2, False) == slice(0, 30)
    assert rows_to_compute("prefix", block, 30, 0, False) == slice(0, 30)  # a block's first step writes
    assert rows_to_compute("prefix", block, 30, 1, False) == slice(10, 30)
    assert rows_to_compute("dual", block, 30, 1, False) == slice(10, 14)
    assert rows_to_compute("dual", block, 30, 1, True) == slice(9, 14)  # the model shifts: one row more


GEOM = dict(gen_length=16, steps=8, block_length=4)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=1.0), dict(temperature=0.8, remasking="random", seed=5)],
                         ids=["greedy", "cfg", "sampling"])
def test_with_one_layer_a_cache_is_exact(llada1, mode, kw):
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]  # left-padded batch
    exact = generate(llada1, prompts=prompts, config=GenerationConfig(**GEOM, **kw))
    cached = generate(llada1, prompts=prompts, config=GenerationConfig(**GEOM, **kw, block_cache=mode))
    assert cached.sequences.tolist() == exact.sequences.tolist()
    assert cached.nfe == exact.nfe


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_with_one_layer_a_cache_is_exact_for_a_shifting_model(mode):
    model = _model(4, n_layers=1, logit_shift=True)
    exact = generate(model, prompts=[[3, 4, 5, 6]], config=GenerationConfig(**GEOM))
    cached = generate(model, prompts=[[3, 4, 5, 6]], config=GenerationConfig(**GEOM, block_cache=mode))
    assert cached.sequences.tolist() == exact.sequences.tolist()


def reference_cached_greedy(model, prompt, mode, gen_length, steps, block_length):
    """One row, greedy, low confidence: step 0 of a block sees the plain forward and is the write; later steps
    read rows_to_compute(...) through reference_read against the canvas of the block's first step."""
    x = torch.tensor([list(prompt) + [MASK] * gen_length])
    P, nb = len(prompt), gen_length // block_length
    spb = steps // nb
    shifts = bool(model.config.logit_shift)
    for b in range(nb):
        block = slice(P + b * block_length, P + (b + 1) * block_length)
        n = int((x[0, block] == MASK).sum())
        counts = [n // spb + (1 if i < n % spb else 0) for i in range(spb)]
        written = x.clone()
        for i in range(spb):
            rows = rows_to_compute(mode, block, x.shape[1], i, shifts)
            if i == 0:
                with torch.no_grad():
                    logits = model(input_ids=x).logits[0, block]
            else:
                logits = reference_read(model, written, x, rows)[0, block.start - rows.start:block.stop - rows.start]
            p = torch.softmax(logits.double(), -1)
            x0 = p.argmax(-1)
            conf = p.gather(-1, x0[:, None])[:, 0]
            conf[x[0, block] != MASK] = -math.inf
            order = sorted(range(block_length), key=lambda j: (-float(conf[j]), j))[:counts[i]]
            for j in order:
                x[0, block.start + j] = x0[j]
    return x[0].tolist()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("shift", [False, True], ids=["plain", "logit_shift"])
def test_a_cached_sampler_follows_the_reference(mode, shift):
    model = _model(5, logit_shift=shift)
    prompt = [3, 14, 15, 9, 2, 6]
    want = reference_cached_greedy(model, prompt, mode, **GEOM)
    got = generate(model, prompts=[prompt], config=GenerationConfig(**GEOM, block_cache=mode))
    assert got.sequences[0].tolist() == want


def test_one_step_per_block_is_exact(llada):
    geom = dict(gen_length=16, steps=4, block_length=4)  # every step starts a block: a write
    exact = generate(llada, prompts=[[3, 4, 5]], config=GenerationConfig(**geom))
    for mode in ("prefix", "dual"):
        assert generate(llada, prompts=[[3, 4, 5]], config=GenerationConfig(**geom, block_cache=mode)).sequences \
            .tolist() == exact.sequences.tolist()


class _SeeRows(GenerationCallback):
    def __init__(self):
        self.seen = []

    def on_step_begin(self, state):
        self.seen.append((state.step_in_block, state.rows, {k: tuple(v.shape) for k, v in state.groups.items()}))


def test_callbacks_see_the_rows_and_groups_cut_to_them(llada):
    see = _SeeRows()
    generate(llada, prompts=[[3, 4, 5, 6]], config=GenerationConfig(**GEOM, cfg_scale=0.5, block_cache="dual"),
             callbacks=[see])
    for i, rows, shapes in see.seen:
        if i == 0:
            assert rows is None and shapes["masked"] == (2, 20)
        else:
            assert rows.stop - rows.start == 4 and all(s == (2, 4) for s in shapes.values())


def test_step_sparsity_counts_the_rows_computed(llada):
    from dllm_sparse import TopP
    from dllm_sparse.samplers import StepSparsity

    sp = StepSparsity("intermediate", TopP(0.9))
    out = generate(llada, prompts=[[3, 4, 5, 6]], config=GenerationConfig(**GEOM, block_cache="dual"), sparsity=sp)
    assert len(sp.per_step()) == out.nfe == 8
    tokens = {(r["tag"], r["group"]): r["tokens"] for r in sp.records() if r["layer"] == 0}
    for step in range(8):  # two steps per block: the write over the 4 + 16 canvas rows, then the block's 4
        assert tokens[(step, "all")] == (20 if step % 2 == 0 else 4)
    assert tokens[(1, "masked")] == 2  # the block's 4 positions, 2 committed at its first step
    assert all(0 < v < 1 for v in sp.per_step().values())


def test_mask_reuse_and_tracking_refuse_a_cache(llada):
    from dllm_sparse import TopP
    from dllm_sparse.samplers import StepSparsity
    from dllm_sparse.samplers.reuse import Every, reuse_sparsity

    tracker = MaskOverlapTracker()
    with pytest.raises(ValueError, match="block cache"):
        generate(llada, prompts=[[3, 4]], config=GenerationConfig(**GEOM, block_cache="prefix"),
                 sparsity=StepSparsity("input", TopP(0.9), mask_observers=[tracker]), callbacks=[tracker])
    sp, policy = reuse_sparsity("input", TopP(0.9), Every(2))
    with pytest.raises(ValueError, match="block cache"):
        generate(llada, prompts=[[3, 4]], config=GenerationConfig(**GEOM, block_cache="prefix"), sparsity=sp,
                 callbacks=[policy])


def test_bad_block_cache_settings_are_refused(llada):
    with pytest.raises(ValueError, match="block_cache must be"):
        GenerationConfig(block_cache="suffix")
    with pytest.raises(ValueError, match="logit_shift"):
        generate(llada, prompts=[[3]], config=GenerationConfig(**GEOM, block_cache="dual", logit_shift=True))

    class Other(torch.nn.Module):  # any masked LM with .logits: fine without a cache, refused with one
        config = llada.config

        def forward(self, input_ids, attention_mask=None):
            return llada(input_ids=input_ids)

    with pytest.raises(ValueError, match="native LLaDA"):
        generate(Other(), prompts=[[3]], config=GenerationConfig(**GEOM, block_cache="dual"), kind="diffusion")


@pytest.mark.parametrize("how", WRAPPERS)
def test_wrapped_models_run_the_cache(llada, how):
    wrapped, plain = wrapped_model(llada, how)
    cfg = GenerationConfig(**GEOM, block_cache="dual")
    want = generate(plain, prompts=[[3, 4, 5]], config=cfg).sequences
    assert generate(wrapped, prompts=[[3, 4, 5]], config=cfg).sequences.tolist() == want.tolist()


# --------------------------------------------------------------------------------------------------------------
# The step-delta FFN on top of a cache
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", ["block_start", "every2"])
def test_a_step_delta_recomputing_everything_is_the_cache_alone(llada, mode, refresh):
    from dllm_sparse.samplers.step_delta import StepDelta, step_delta

    cfg = GenerationConfig(**GEOM, block_cache=mode, cfg_scale=0.5)
    alone = generate(llada, prompts=[[3, 4, 5], [7, 8]], config=cfg)
    for variant in ("input", "intermediate"):
        sd = StepDelta(variant, fraction=1.0, down_fraction=1.0, refresh=refresh)
        with step_delta(llada, sd) as delta:
            out = generate(llada, prompts=[[3, 4, 5], [7, 8]], config=cfg, callbacks=[delta])
        assert out.sequences.tolist() == alone.sequences.tolist(), variant
        rep = delta.report()
        assert rep["ffn_work_delta_steps"] is None or rep["ffn_work_delta_steps"] > 0.99


def test_a_partial_step_delta_on_a_cache_does_less_work_and_runs_every_row(llada):
    from dllm_sparse.samplers.step_delta import StepDelta, step_delta

    with step_delta(llada, StepDelta("intermediate", fraction=0.25, exact_block=True), measure=True) as delta:
        out = generate(llada, prompts=[[3, 4, 5]], config=GenerationConfig(**GEOM, block_cache="prefix"),
                       callbacks=[delta])
    rep = delta.report()
    assert out.nfe == 8 and rep["steps"] == 8
    assert 0 < rep["ffn_work_delta_steps"] < 1
    assert rep["drift_max"] < 1.0
