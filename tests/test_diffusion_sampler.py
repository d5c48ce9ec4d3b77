"""The masked-diffusion sampler against a plain reference written from the spec (docs/generation.md).

Tiny native LLaDA (2 layers, d_model 64, vocab 100, mask 99) built from a config; CPU, float32.

RNG protocol shared by the reference and the library (documented in samplers/diffusion.py): row r owns a
torch.Generator seeded seed + r; at every step it draws, in this order, rand((block_length, V), float64) for
the Gumbel-max of the current block when T > 0, then rand((block_length,), float64) for the confidences with
random remasking.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import WRAPPERS, wrapped_model

from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
from dllm_sparse.samplers import (
    GenerationCallback,
    GenerationConfig,
    MaskedDiffusionGenerator,
    generate,
    num_transfer_tokens,
    validate_geometry,
)

MASK = 99
EOS = 98



# --------------------------------------------------------------------------------------------------------------
# The reference: one row, python loops, straight from the spec.
# --------------------------------------------------------------------------------------------------------------


def _logits(model, ids, shift):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    if shift:  # Dream: position i is predicted from the output at i - 1
        out = torch.cat([out[:1], out[:-1]], dim=0)
    return out


def reference_generate(model, prompt, gen_length, steps, block_length, temperature=0.0, cfg_scale=0.0,
                       remasking="low_confidence", mask_id=MASK, seed=0, shift=False):
    g = torch.Generator().manual_seed(seed)
    P = len(prompt)
    x = list(prompt) + [mask_id] * gen_length
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    s = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n = sum(1 for j in range(lo, hi) if x[j] == mask_id)
        counts = [n // s + (1 if i < n % s else 0) for i in range(s)]
        for i in range(s):
            logits = _logits(model, x, shift)
            if cfg_scale > 0:
                uncond = [mask_id if j < P else t for j, t in enumerate(x)]
                un = _logits(model, uncond, shift)
                logits = un + (cfg_scale + 1) * (logits - un)
            V = logits.shape[-1]
            u = torch.rand((block_length, V), generator=g, dtype=torch.float64) if temperature > 0 else None
            r = torch.rand((block_length,), generator=g, dtype=torch.float64) if remasking == "random" else None
            candidates = []  # (confidence, position, token) of the masked positions of the current block
            for j in range(lo, hi):
                if x[j] != mask_id:
                    continue
                row = logits[j]
                if temperature == 0:
                    tok = int(torch.argmax(row))
                else:
                    tok = int(torch.argmax(row.double().exp() / (-torch.log(u[j - lo])) ** temperature))
                if remasking == "low_confidence":
                    conf = float(F.softmax(row.double(), dim=-1)[tok])
                else:
                    conf = float(r[j - lo])
                candidates.append((conf, j, tok))
            candidates.sort(key=lambda c: -c[0])  # stable: ties keep the lowest position first
            for _, j, tok in candidates[: counts[i]]:
                x[j] = tok
    return x


PROMPT = [5, 17, 3, 42, 8]


def lib(model, prompts, **kw):
    return generate(model, None, prompts, GenerationConfig(**kw), kind="diffusion")


# --------------------------------------------------------------------------------------------------------------
# Equality with the reference
# --------------------------------------------------------------------------------------------------------------

GEOMETRIES = [
    dict(gen_length=16, steps=16, block_length=16),  # pure diffusion, one token per step
    dict(gen_length=16, steps=6, block_length=16),  # 16 over 6 steps: 3,3,3,3,2,2 (remainder first)
    dict(gen_length=16, steps=8, block_length=4),  # semi-autoregressive: 4 blocks x 2 steps
    dict(gen_length=12, steps=9, block_length=4),  # 3 blocks x 3 steps, unequal counts 2,1,1
    dict(gen_length=8, steps=8, block_length=1),  # strict left to right
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "g{gen_length}-s{steps}-b{block_length}".format(**g))
def test_matches_reference_greedy(llada, geom):
    out = lib(llada, [PROMPT], **geom)
    ref = reference_generate(llada, PROMPT, **geom)
    assert out.sequences[0].tolist() == ref
    assert MASK not in out.sequences[0].tolist()
    assert len(set(ref[len(PROMPT):])) > 1  # the tiny model is not degenerate


@pytest.mark.parametrize("kw", [
    dict(cfg_scale=1.5),
    dict(temperature=0.8, seed=11),
    dict(remasking="random", seed=5),
    dict(temperature=1.3, remasking="random", cfg_scale=0.5, seed=7),
], ids=["cfg", "gumbel", "random-remask", "all"])
def test_matches_reference_cfg_and_sampling(llada, kw):
    geom = dict(gen_length=12, steps=6, block_length=4)
    out = lib(llada, [PROMPT], **geom, **kw)
    ref = reference_generate(llada, PROMPT, **geom, **kw)
    assert out.sequences[0].tolist() == ref


def test_seed_changes_samples_and_is_reproducible(llada):
    kw = dict(gen_length=12, steps=12, block_length=12, temperature=1.0, remasking="random")
    a = lib(llada, [PROMPT], seed=1, **kw).ids
    b = lib(llada, [PROMPT], seed=1, **kw).ids
    c = lib(llada, [PROMPT], seed=2, **kw).ids
    assert a == b and a != c
    torch.manual_seed(3)
    d = lib(llada, [PROMPT], **kw).ids  # seed=None draws the base seed from torch's global RNG
    torch.manual_seed(3)
    assert lib(llada, [PROMPT], **kw).ids == d


@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=1.0), dict(temperature=0.9, remasking="random", seed=21)],
                         ids=["greedy", "cfg", "sampling"])
def test_batched_left_padded_rows_equal_unbatched(llada, kw):
    prompts = [PROMPT, [7, 7, 1], [60, 2, 33, 4, 5, 6, 9]]
    geom = dict(gen_length=8, steps=4, block_length=4)
    batch = lib(llada, prompts, **geom, **kw)
    P = max(map(len, prompts))
    assert batch.sequences.shape == (3, P + 8)
    for r, p in enumerate(prompts):
        row_kw = dict(kw, seed=kw["seed"] + r) if "seed" in kw else kw
        alone = lib(llada, [p], **geom, **row_kw)
        assert batch.sequences[r, P:].tolist() == alone.sequences[0, len(p):].tolist()
        assert batch.sequences[r, : P - len(p)].tolist() == [EOS] * (P - len(p))  # left padding (pad id 98)


def test_tensor_prompt_with_attention_mask(llada):
    prompts = [PROMPT, [7, 7, 1]]
    geom = dict(gen_length=8, steps=8, block_length=8)
    by_lists = lib(llada, prompts, **geom)
    ids = torch.tensor([PROMPT, [0, 0, 7, 7, 1]])
    am = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    by_tensor = generate(llada, None, ids, GenerationConfig(**geom), attention_mask=am)
    assert by_tensor.generated.tolist() == by_lists.generated.tolist()


# --------------------------------------------------------------------------------------------------------------
# Schedule, NFE, never remasked
# --------------------------------------------------------------------------------------------------------------


def test_num_transfer_tokens():
    t = num_transfer_tokens(torch.tensor([10, 4, 0]), 4)
    assert t.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert t.sum(1).tolist() == [10, 4, 0]


class Recorder(GenerationCallback):
    def __init__(self):
        self.begin, self.end = [], []

    def on_step_begin(self, state):
        self.begin.append(dict(step=state.step, block=state.block, sib=state.step_in_block, tag=state.tag,
                               canvas=state.canvas.clone(), groups={k: v.clone() for k, v in state.groups.items()},
                               fwd=state.forward_batch))

    def on_step_end(self, state):
        self.end.append(dict(step=state.step, canvas=state.canvas.clone(), committed=state.committed.clone(),
                             nfe=state.nfe))


@pytest.mark.parametrize("geom,cfg", [
    (dict(gen_length=16, steps=6, block_length=16), 0.0),
    (dict(gen_length=12, steps=9, block_length=4), 0.0),
    (dict(gen_length=12, steps=6, block_length=4), 2.0),
])
def test_schedule_commits_and_nfe(llada, geom, cfg):
    rec = Recorder()
    prompts = [PROMPT, [1, 2]]
    out = generate(llada, None, prompts, GenerationConfig(cfg_scale=cfg, **geom), callbacks=[rec])
    steps, gen, bl = geom["steps"], geom["gen_length"], geom["block_length"]
    spb = steps // (gen // bl)
    P = out.prompt_length
    assert out.nfe == steps * (2 if cfg else 1)
    assert len(out.trace) == len(rec.end) == steps
    prev = rec.begin[0]["canvas"]
    for i, (b, e) in enumerate(zip(rec.begin, rec.end, strict=True)):
        assert b["step"] == i and b["tag"] == i and b["block"] == i // spb and b["sib"] == i % spb
        assert b["fwd"] == (4 if cfg else 2)
        k = bl // spb + (1 if b["sib"] < bl % spb else 0)
        assert e["committed"].sum(1).tolist() == [k, k]  # exactly n // s (+1) per row
        # committed positions lie in the current block, were masked, and nothing else changed
        lo = P + b["block"] * bl
        assert not e["committed"][:, :lo].any() and not e["committed"][:, lo + bl:].any()
        assert (prev[e["committed"]] == MASK).all()
        assert torch.equal(e["canvas"][~e["committed"]], prev[~e["committed"]])
        assert (e["canvas"][e["committed"]] != MASK).all()
        # token groups of the forward batch: disjoint, and they cover the real tokens
        g = b["groups"]
        assert g["masked"].shape[0] == b["fwd"]
        cover = g["prompt"].int() + g["masked"].int() + g["decoded"].int()
        assert cover.max() == 1
        prev = e["canvas"]
        assert [len(c) for c in out.trace[i].committed] == [k, k]
    assert not (out.sequences[:, P:] == MASK).any()
    assert out.num_tokens == 2 * gen
    assert out.tokens_per_second > 0


def test_callback_can_stop(llada):
    seen = []

    def stop_after_two(state):
        seen.append(state.step)
        return {"stop": True} if state.step == 1 else None

    out = generate(llada, None, [PROMPT], GenerationConfig(gen_length=8, steps=8, block_length=8),
                   callbacks=[stop_after_two])
    assert seen == [0, 1] and out.nfe == 2
    assert (out.generated == MASK).sum() == 6
    assert out.finish_reasons == ["callback"]
    assert MASK not in out.ids[0]


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_progress_bar_counts_the_steps(llada, llama, kind):
    """One tick per forward: the denoising steps (diffusion) or the tokens decoded (AR, which may stop early); the
    bar is closed at the end, also when a callback stops the generation."""
    import io

    from dllm_sparse.samplers import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(desc="demo", file=stream, disable=False)
    model = llada if kind == "diffusion" else llama
    cfg = GenerationConfig(gen_length=8, steps=4, block_length=8) if kind == "diffusion" else GenerationConfig(
        gen_length=8, stop_token_ids=())
    out = generate(model, None, [PROMPT], cfg, callbacks=[bar])
    assert (bar.bar.total, bar.bar.n) == ((4, 4) if kind == "diffusion" else (8, 8)) and out.nfe == bar.bar.n
    assert "demo" in stream.getvalue() and bar.bar.disable  # tqdm marks a closed bar disabled
    out = generate(model, None, [PROMPT], cfg, callbacks=[bar, lambda state: state.step == 1])
    assert bar.bar.n == 2 == out.nfe and bar.bar.disable


# --------------------------------------------------------------------------------------------------------------
# Outputs: stop ids, texts
# --------------------------------------------------------------------------------------------------------------


class WordTokenizer:
    """A toy tokenizer: word i <-> id i."""

    pad_token_id = EOS
    eos_token_id = EOS
    mask_token_id = MASK

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in (EOS, MASK)))

    def get_vocab(self):
        return {f"w{i}": i for i in range(100)}


def test_stop_ids_and_strings_cut_the_output(llada):
    geom = dict(gen_length=12, steps=12, block_length=12)
    full = lib(llada, [PROMPT], **geom)
    gen = full.generated[0].tolist()
    stop = gen[4]
    cut = gen[: gen.index(stop)]
    out = generate(llada, WordTokenizer(), ["w5 w17 w3 w42 w8"], GenerationConfig(stop_token_ids=[stop], **geom))
    assert out.sequences[0].tolist() == full.sequences[0].tolist()  # the canvas is always filled
    assert out.ids == [cut] and out.finish_reasons == ["stop"]
    assert out.texts == [" ".join(f"w{i}" for i in cut)]
    s = f"w{gen[2]}"
    out = generate(llada, WordTokenizer(), ["w5 w17 w3 w42 w8"],
                   GenerationConfig(stop_token_ids=(), stop_strings=[s], **geom))
    assert s not in out.texts[0] and out.finish_reasons == ["stop"]
    # default stop ids: the model's / tokenizer's eos (98)
    g = lib(llada, [[1]], **geom).generated[0].tolist()
    expected = g[: g.index(EOS)] if EOS in g else g
    out = MaskedDiffusionGenerator(llada, WordTokenizer()).generate(["w1"], GenerationConfig(**geom))
    assert out.ids[0] == expected


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geom,match", [
    (dict(gen_length=10, steps=10, block_length=4), r"multiple of block_length.*block_length that divides 10"),
    (dict(gen_length=16, steps=6, block_length=4), r"steps \(6\) must be a multiple of the number of blocks.*steps=4"),
    (dict(gen_length=8, steps=8, block_length=16), r"larger than gen_length.*block_length=8"),
    (dict(gen_length=8, steps=0, block_length=8), r"steps must be a positive integer"),
])
def test_bad_geometry(llada, geom, match):
    with pytest.raises(ValueError, match=match):
        lib(llada, [PROMPT], **geom)


def test_validate_geometry():
    assert validate_geometry(128, 128, 32) == (4, 32)
    assert validate_geometry(8, 8, 1) == (8, 1)


def test_pad_equal_to_mask_is_an_error(llada):
    with pytest.raises(ValueError, match="padding id equals the mask id"):
        lib(llada, [PROMPT, [1]], gen_length=4, steps=4, pad_id=MASK)
    lib(llada, [PROMPT], gen_length=4, steps=4, pad_id=MASK)  # no padding needed: fine
    with pytest.raises(ValueError, match="padded positions hold the mask id"):
        generate(llada, None, torch.tensor([[MASK, 1, 2]]), GenerationConfig(gen_length=4, steps=4),
                 attention_mask=torch.tensor([[0, 1, 1]]))


def test_other_errors(llada):
    with pytest.raises(ValueError, match="remasking"):
        GenerationConfig(remasking="entropy")
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="left padding"):
        generate(llada, None, torch.tensor([[1, 2, 3]]), GenerationConfig(gen_length=4, steps=4),
                 attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="tokenizer"):
        lib(llada, ["text without tokenizer"], gen_length=4, steps=4)
    with pytest.raises(ValueError, match="mask token id"):
        MaskedDiffusionGenerator(torch.nn.Linear(2, 2), family="").generate([[1]], GenerationConfig(gen_length=2))
    assert GenerationConfig(gen_length=7).max_new_tokens == 7
    with pytest.raises(ValueError, match="same setting"):
        GenerationConfig(gen_length=7, max_new_tokens=8)


class RemoteStyleLLaDA(torch.nn.Module):
    """Stands in for a LLaDA loaded with trust_remote_code (not the native class)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_remote_code_llada(llada):
    remote = RemoteStyleLLaDA(llada)
    gen = MaskedDiffusionGenerator(remote, family="llada")
    geom = dict(gen_length=8, steps=8, block_length=4)
    assert gen.generate([PROMPT], GenerationConfig(**geom)).sequences.tolist() == lib(llada, [PROMPT], **geom
                                                                                          ).sequences.tolist()
    with pytest.raises(ValueError, match="ignores attention_mask.*differ from the same prompt"):
        gen.generate([PROMPT, [1]], GenerationConfig(**geom))


# --------------------------------------------------------------------------------------------------------------
# Any bidirectional masked LM, and Dream's logit shift
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0, initializer_range=0.3)
    return BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("shift", [False, True])
def test_generic_masked_lm_and_logit_shift(bert, shift):
    geom = dict(gen_length=8, steps=4, block_length=4)
    out = generate(bert, None, [PROMPT], GenerationConfig(mask_id=MASK, logit_shift=shift, **geom), kind="diffusion")
    ref = reference_generate(bert, PROMPT, shift=shift, **geom)
    assert out.sequences[0].tolist() == ref


def test_model_that_shifts_itself(llada):
    torch.manual_seed(0)
    shifted = LLaDAModelLM(tiny_llada_config(init_std=0.2, logit_shift=True)).eval()
    geom = dict(gen_length=8, steps=4, block_length=4)
    out = lib(shifted, [PROMPT], **geom)  # the model shifts in its forward: the sampler must not shift again
    assert out.sequences[0].tolist() == reference_generate(shifted, PROMPT, **geom)
    with pytest.raises(ValueError, match="already shifts"):
        lib(shifted, [PROMPT], logit_shift=True, **geom)


def test_loaded_model_is_accepted(llada):
    from dllm_sparse.models.loading import LoadedModel

    lm = LoadedModel(llada, WordTokenizer(), "diffusion", "tiny", mask_id=MASK, family="llada")
    geom = dict(gen_length=8, steps=8, block_length=8)
    out = generate(lm, prompts=["w5 w17 w3 w42 w8"], config=GenerationConfig(stop_token_ids=(), **geom))
    assert out.kind == "diffusion" and out.sequences[0].tolist() == reference_generate(llada, PROMPT, **geom)
    assert out.texts[0] == " ".join(f"w{i}" for i in out.ids[0])


@pytest.mark.parametrize("how", WRAPPERS)
def test_wrapped_model_generates_like_the_plain_one(llada, how):
    """A LoRA not merged, torch.compile and accelerate's hooks: the same tokens as the plain (or merged) model,
    on a left-padded batch (the native model's attention mask is honoured through the wrapper)."""
    wrapped, reference = wrapped_model(llada, how)
    prompts = [PROMPT, [7, 7, 1]]
    geom = dict(gen_length=8, steps=4, block_length=4)
    out = lib(wrapped, prompts, **geom)
    assert out.sequences.tolist() == lib(reference, prompts, **geom).sequences.tolist()
    if how == "peft":
        assert out.sequences.tolist() != lib(llada, prompts, **geom).sequences.tolist()
