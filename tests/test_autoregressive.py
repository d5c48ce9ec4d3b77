"""The KV-cached autoregressive loop against transformers' own greedy `generate`, on a tiny random Llama."""

import pytest
import torch
from conftest import WRAPPERS, lora_model, wrapped_model

from dllm_sparse.samplers import AutoregressiveGenerator, GenerationCallback, GenerationConfig, generate

PAD = 0



PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1], [60, 2, 33, 4, 5, 6, 9]]


def hf_greedy(model, prompts, n, eos):
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False,
                             pad_token_id=PAD, eos_token_id=eos)
    return [row[P:].tolist() for row in out]


def _until(row, stop):
    return row[: row.index(stop) + 1] if stop in row else row


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_equals_transformers_generate(llama, batched):
    n = 12
    prompts = PROMPTS if batched else PROMPTS[:1]
    # An eos the model actually produces, so that rows stop at different steps.
    free = AutoregressiveGenerator(llama).generate(prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=()))
    eos = free.generated[0, 3].item()
    ref = hf_greedy(llama, prompts, n, eos)
    out = AutoregressiveGenerator(llama).generate(prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=[eos],
                                                                            pad_id=PAD))
    P = out.prompt_length
    for r in range(len(prompts)):
        mine = _until(out.sequences[r, P:].tolist(), eos)
        assert mine == _until(ref[r], eos)
        assert out.ids[r] == [t for t in mine if t != eos]
        assert out.finish_reasons[r] == ("stop" if eos in mine else "length")
    assert out.nfe == max(len(_until(ref[r], eos)) for r in range(len(prompts)))
    assert out.num_tokens == sum(len(_until(ref[r], eos)) for r in range(len(prompts)))
    assert len(set(free.generated[0].tolist())) > 1


def test_rows_equal_unbatched_and_tensor_input(llama):
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    batch = generate(llama, None, PROMPTS, cfg, kind="ar")
    for r, p in enumerate(PROMPTS):
        assert batch.ids[r] == generate(llama, None, [p], cfg).ids[0]
    ids = torch.tensor([[PAD] * 2 + PROMPTS[0], PROMPTS[2]])
    am = (torch.arange(7)[None] >= torch.tensor([[2], [0]])).long()
    assert generate(llama, None, ids, cfg, attention_mask=am).ids == [batch.ids[0], batch.ids[2]]


def test_sampling_seeded_per_row(llama):
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=4, stop_token_ids=())
    a = generate(llama, None, PROMPTS, cfg)
    assert a.ids == generate(llama, None, PROMPTS, cfg).ids
    assert a.ids != generate(llama, None, PROMPTS, cfg.replace(seed=5)).ids
    for r, p in enumerate(PROMPTS):  # row r of a batch = the prompt alone with seed + r
        assert generate(llama, None, [p], cfg.replace(seed=4 + r)).ids[0] == a.ids[r]
    greedy = generate(llama, None, PROMPTS, cfg.replace(temperature=0.0)).ids
    assert a.ids != greedy


class Recorder(GenerationCallback):
    def __init__(self):
        self.events = []

    def on_generation_begin(self, state):
        self.events.append(("begin_gen", state.kind))

    def on_step_begin(self, state):
        self.events.append(("begin", state.step, state.tag, state.canvas.shape[1],
                            {k: int(v[:, -1].sum()) for k, v in state.groups.items()}))

    def on_step_end(self, state):
        self.events.append(("end", state.step, state.new_tokens.tolist(), int(state.committed[:, -1].sum())))

    def on_generation_end(self, state):
        self.events.append(("end_gen", state.nfe))


def test_callbacks_tags_and_stop(llama):
    rec = Recorder()
    out = generate(llama, None, PROMPTS[:2], GenerationConfig(max_new_tokens=5, stop_token_ids=()), callbacks=[rec])
    assert rec.events[0] == ("begin_gen", "ar") and rec.events[-1] == ("end_gen", 5)
    begins = [e for e in rec.events if e[0] == "begin"]
    assert [b[2] for b in begins] == ["prefill", 1, 2, 3, 4]
    assert [b[3] for b in begins] == [5, 6, 7, 8, 9]  # canvas grows by one token per step
    assert begins[0][4] == {"prompt": 2} and begins[1][4] == {"decoded": 2}
    ends = [e for e in rec.events if e[0] == "end"]
    assert [e[2] for e in ends] == out.generated.T.tolist()
    assert [len(s.tokens[0]) for s in out.trace] == [1] * 5

    def stop(state):
        return state.step == 2

    out = generate(llama, None, PROMPTS[:2], GenerationConfig(max_new_tokens=5, stop_token_ids=()), callbacks=[stop])
    assert out.nfe == 3 and out.generated.shape[1] == 3 and out.finish_reasons == ["callback", "callback"]


class WordTokenizer:
    pad_token_id = PAD
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)

    def get_vocab(self):
        return {f"w{i}": i for i in range(100)}


def test_stop_strings_and_texts(llama):
    tok = WordTokenizer()
    free = generate(llama, tok, ["w5 w17 w3"], GenerationConfig(max_new_tokens=8, stop_token_ids=()))
    assert free.texts[0] == " ".join(f"w{i}" for i in free.ids[0])
    target = f"w{free.ids[0][2]}"
    first = next(i for i, t in enumerate(free.ids[0]) if f"w{t}" == target)
    out = generate(llama, tok, ["w5 w17 w3"], GenerationConfig(max_new_tokens=8, stop_token_ids=(),
                                                                stop_strings=[target]))
    assert out.nfe == first + 1 and out.finish_reasons == ["stop"]
    assert target not in out.texts[0]


def test_stops_only_finished_rows_and_pads(llama):
    free = generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=10, stop_token_ids=()))
    eos = free.generated[1, 1].item()
    out = generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=10, stop_token_ids=[eos], pad_id=PAD))
    row = out.sequences[1, out.prompt_length:].tolist()
    k = row.index(eos)
    assert all(t == PAD for t in row[k + 1:])
    assert out.ids[1] == row[:k]


# ---- the KV cache is really used (transformers renamed its keyword in 5.24) ---------------------------------


def _fed_lengths(model, fn):
    """Run ``fn()`` and return the token count of every input the model's forward received."""
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    try:
        result = fn()
    finally:
        handle.remove()
    return seen, result


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_cached_steps_feed_one_token_per_row(llama, prompts):
    n = 6
    seen, out = _fed_lengths(llama, lambda: AutoregressiveGenerator(llama).generate(
        prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=())))
    P = max(map(len, prompts))
    assert seen[0] == (len(prompts), P)  # the prefill: the whole padded prompt
    assert seen[1:] == [(len(prompts), 1)] * (n - 1)  # every later step: one new token per row
    assert out.kv_cache is True and out.summary()["kv_cache"] is True


def test_cache_keyword_is_the_installed_transformers_one(llama):
    import inspect

    from transformers.generation.utils import ALL_CACHE_NAMES

    from dllm_sparse.samplers.kv_cache import cache_keyword

    key = cache_keyword(llama)
    assert key == ALL_CACHE_NAMES[0]  # transformers' default name ("cache" from 5.24, "past_key_values" before)
    assert key in inspect.signature(llama.forward).parameters


def test_uncached_decoding_only_when_asked_and_recorded(llama):
    cfg = GenerationConfig(max_new_tokens=5, stop_token_ids=())
    cached = AutoregressiveGenerator(llama).generate(PROMPTS, cfg)
    seen, full = _fed_lengths(llama, lambda: AutoregressiveGenerator(llama, kv_cache=False).generate(PROMPTS, cfg))
    assert full.kv_cache is False and full.summary()["kv_cache"] is False
    P = max(map(len, PROMPTS))
    assert [s[1] for s in seen] == [P + t for t in range(5)]  # whole sequence each step
    assert full.ids == cached.ids  # same greedy tokens either way


class _NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes no cache keyword."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _CacheIgnoringLM(_NoCacheLM):
    """Accepts the cache keyword (via **kwargs, as a renamed argument would be) and never fills the cache."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from dllm_sparse.samplers.kv_cache import cache_keyword

        kwargs.pop(cache_keyword(self.inner), None)
        return super().forward(input_ids, attention_mask, position_ids)


def test_model_without_cache_keyword_raises_clearly(llama):
    from dllm_sparse.samplers.kv_cache import KVCacheError

    with pytest.raises(KVCacheError, match="kv_cache=False"):
        AutoregressiveGenerator(_NoCacheLM(llama))
    out = AutoregressiveGenerator(_NoCacheLM(llama), kv_cache=False).generate(
        PROMPTS, GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    assert out.kv_cache is False


def test_cache_that_does_not_grow_raises(llama):
    import inspect

    from dllm_sparse.samplers.kv_cache import KVCacheError, cache_keyword

    wrapped = _CacheIgnoringLM(llama)
    key = cache_keyword(llama)
    # Give the wrapper the keyword in its signature, as a model with a swallowed renamed argument has.
    params = [*inspect.signature(_CacheIgnoringLM.forward).parameters.values()]
    params.insert(-1, inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None))
    wrapped.forward.__func__.__signature__ = inspect.Signature(params)
    try:
        with pytest.raises(KVCacheError, match="KV cache holds 0"):
            AutoregressiveGenerator(wrapped).generate(PROMPTS, GenerationConfig(max_new_tokens=3,
                                                                                stop_token_ids=()))
    finally:
        del _CacheIgnoringLM.forward.__signature__


# --------------------------------------------------------------------------------------------------------------
# Wrapped models: peft (LoRA not merged), torch.compile, accelerate's hooks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", WRAPPERS)
def test_wrapped_model_decodes_with_the_cache_like_the_plain_one(llama, how):
    from dllm_sparse.samplers.kv_cache import cache_keyword

    wrapped, reference = wrapped_model(llama, how)
    gen = AutoregressiveGenerator(wrapped)
    assert gen._cache_keyword == cache_keyword(reference)
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=(), pad_id=PAD)
    out = gen.generate(PROMPTS, cfg)
    ref = AutoregressiveGenerator(reference).generate(PROMPTS, cfg)
    assert out.kv_cache is True
    assert out.ids == ref.ids
    assert out.ids == [r[:6] for r in hf_greedy(reference, PROMPTS, 6, eos=-1)]  # transformers' own loop
    if how == "peft":  # the adapter is really applied: the base model decodes something else
        assert out.ids != AutoregressiveGenerator(llama).generate(PROMPTS, cfg).ids


class _KeywordDroppingWrapper(torch.nn.Module):
    """A wrapper (``__wrapped__``) whose forward silently drops the cache keyword before calling the model."""

    def __init__(self, inner):
        super().__init__()
        self.__wrapped__ = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.__wrapped__.get_input_embeddings()

    def forward(self, **kwargs):
        from dllm_sparse.samplers.kv_cache import cache_keyword

        kwargs.pop(cache_keyword(self.__wrapped__))
        return self.__wrapped__(**kwargs)


def test_wrapper_that_drops_the_cache_keyword_is_caught(llama):
    from dllm_sparse.samplers.kv_cache import KVCacheError

    with pytest.raises(KVCacheError, match="KV cache holds 0"):
        AutoregressiveGenerator(_KeywordDroppingWrapper(llama)).generate(
            PROMPTS, GenerationConfig(max_new_tokens=3, stop_token_ids=()))


def test_unwrap_model_looks_through_stacked_wrappers(llama):
    from dllm_sparse.models.wrappers import forward_parameters, unwrap_model

    wrapped, _ = lora_model(llama)
    stacked = torch.compile(_KeywordDroppingWrapper(wrapped), backend="eager")
    assert unwrap_model(stacked) is wrapped.get_base_model()
    assert unwrap_model(llama) is llama
    assert "position_ids" in forward_parameters(stacked)
    assert "position_ids" not in forward_parameters(torch.nn.Linear(2, 2))


def test_prompt_learning_adapter_is_refused_for_cached_decoding(llama):
    """Prefix tuning feeds its virtual tokens through the KV cache: a loop-owned cache would drop them (the bare
    model's tokens, silently). Refused, naming kv_cache=False, which decodes through the adapter."""
    import copy

    peft = pytest.importorskip("peft")
    from dllm_sparse.samplers.kv_cache import KVCacheError

    prefix = peft.get_peft_model(copy.deepcopy(llama), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=3)).eval()
    with pytest.raises(KVCacheError, match=r"PrefixTuningConfig.*kv_cache=False"):
        AutoregressiveGenerator(torch.compile(prefix, backend="eager"))
    prompt = [5, 17, 3, 42, 8]
    out = AutoregressiveGenerator(prefix, kv_cache=False).generate([prompt], GenerationConfig(max_new_tokens=4,
                                                                                            stop_token_ids=()))
    seq = torch.tensor([prompt])
    with torch.no_grad():  # reference: greedy through the adapter's own full forward
        for _ in range(4):
            seq = torch.cat([seq, prefix(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.ids == [seq[0, len(prompt):].tolist()]
    bare = AutoregressiveGenerator(llama).generate([prompt], GenerationConfig(max_new_tokens=4, stop_token_ids=()))
    assert out.ids != bare.ids  # the prefix changes the tokens: what a dropped prefix would lose


# ---- stop handling without a host sync per step ---------------------------------------------------------------


def _fields(out):
    return (out.sequences.tolist(), out.ids, out.nfe, out.num_tokens, out.finish_reasons,
            [(s.step, s.tag, s.nfe, s.committed, s.tokens) for s in out.trace])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stop_checks_every_k_steps_give_the_per_step_result(llama, monkeypatch, temperature):
    """Without callbacks the loop reads "every row stopped" every STOP_CHECK_EVERY steps (one host sync each) and
    cuts the steps run past the last stop: the result equals reading it after every step, for any k, with rows
    stopping at different steps (greedy and seeded sampling)."""
    from dllm_sparse.samplers import autoregressive

    free = generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=12, stop_token_ids=(),
                                                          temperature=temperature, seed=3))
    eos = free.generated[1, 1].item()  # row 1 stops at step 1; the others later or never
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=[eos], pad_id=PAD, temperature=temperature, seed=3)
    reads = []
    real = autoregressive._first_done
    monkeypatch.setattr(autoregressive, "_first_done", lambda flags, first: reads.append(first) or real(flags, first))
    results = {}
    for k in (1, 3, 8, 64):
        monkeypatch.setattr(autoregressive, "STOP_CHECK_EVERY", k)
        reads.clear()
        results[k] = _fields(generate(llama, None, PROMPTS, cfg))
        assert len(reads) == (results[k][2] if k == 1 else min(-(-results[1][2] // k), 1 + 11 // k))  # per k steps
    assert results[3] == results[1] and results[8] == results[1] and results[64] == results[1]
    assert results[1][4][1] == "stop" and results[1][2] > 2  # the rows did stop at different steps
    # With a callback every step is read (it sees last_step_of_block), and the result is the same again.
    seen = []
    with_cb = generate(llama, None, PROMPTS, cfg, callbacks=[lambda state: seen.append(state.last_step_of_block)])
    assert _fields(with_cb) == results[1] and seen == [False] * (len(seen) - 1) + [True]
    # A module hook sees every forward: no padding-only step may run past the last stop (k = 64 still set).
    forwards = []
    handle = llama.model.embed_tokens.register_forward_hook(lambda *a: forwards.append(1))
    try:
        reads.clear()
        assert _fields(generate(llama, None, PROMPTS, cfg)) == results[1]
    finally:
        handle.remove()
    assert len(forwards) == len(reads) == results[1][2]
