"""Shared tiny-model factories for the test suite.

Every factory builds a randomly initialised model (seeded, float32, eval mode) small enough for a shared 2-core
CPU: hidden size 32, FFN width 64, 2 layers, vocabulary 128.

    def test_something(tiny_model):
        model = tiny_model("qwen2")          # one of FAMILIES
        model = tiny_model("llama", num_hidden_layers=3, seed=1)

    def test_other(tiny_llama):              # the same as tiny_model("llama")
        ...

``build_tiny_model`` is the plain function behind the fixtures (tests can also import it with
``from conftest import build_tiny_model``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HIDDEN = 32
FFN = 64
LAYERS = 2

# Family profile names -> what detect_family must answer for the model the factory builds.
FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "dream", "llada")


class DreamLikeConfig(Qwen2Config):
    """Dream-7B keeps Qwen2.5's module names; only ``model_type`` tells it apart (the real model is remote code)."""

    model_type = "dream"


def _common(**overrides) -> dict:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        hidden_act="silu",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return fields


def build_tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``family`` (see FAMILIES); config fields can be overridden by keyword."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common(**overrides)))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(**overrides)))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(sliding_window=None, **overrides)))
    elif family == "dream":
        model = Qwen2ForCausalLM(DreamLikeConfig(**_common(**overrides)))
    elif family == "gemma3":
        fields = _common(head_dim=8, sliding_window=16, query_pre_attn_scalar=8, **overrides)
        fields.pop("hidden_act")
        fields.setdefault("hidden_activation", "gelu_pytorch_tanh")
        model = Gemma3ForCausalLM(Gemma3TextConfig(**fields))
    elif family == "llada":
        from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

        fields = dict(d_model=HIDDEN, n_heads=4, n_kv_heads=2, mlp_hidden_size=FFN, n_layers=LAYERS,
                      vocab_size=VOCAB, embedding_size=VOCAB, mask_token_id=VOCAB - 1, eos_token_id=VOCAB - 2,
                      pad_token_id=VOCAB - 2)
        fields.update(overrides)
        model = LLaDAModelLM(tiny_llada_config(**fields))
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    return model.float().eval()


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model(family, seed=0, **config_overrides)``."""
    return build_tiny_model


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A tiny random LlamaForCausalLM (2 layers, hidden 32, FFN 64)."""
    return build_tiny_model("llama")


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A seeded [2, 7] batch of token ids (no special tokens)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB - 3, (2, 7), generator=g)


@pytest.fixture(scope="module")
def llada() -> torch.nn.Module:
    """Tiny native LLaDA for sampler tests (one per test module). A larger init spread than the default makes
    the random model's predictions peaked and varied, so samplers make distinct, checkable choices."""
    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

    torch.manual_seed(0)
    return LLaDAModelLM(tiny_llada_config(init_std=0.2)).eval()


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """Tiny causal Llama for generator tests (pad 0, bos 1, eos 2; one per test module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def build_byte_hf_tokenizer(chat_template: str | None = None):
    """A real Hugging Face tokenizer (``PreTrainedTokenizerFast``) over UTF-8 bytes with the ids of
    :class:`byte_tokenizer.ByteTokenizer`'s layout: 0 pad, 1 bos, 2 eos, 3 mask, then the 256 bytes
    (vocabulary 260, for tiny models built with ``vocab_size=260``). ``chat_template``: a Jinja chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<mask>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   mask_token="<mask>")
    fast.chat_template = chat_template
    return fast


# Wrapped models: a wrapper must work wherever the plain model does.
def lora_model(model, seed=0):
    """``model`` (a copy) under a peft LoRA on every projection, with random B so the adapter changes outputs;
    and the same adapter merged into a plain copy, the reference."""
    import copy

    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if hasattr(model, "dllm_sparse_native_llada"):
        targets = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    return wrapped.eval(), merged.eval()


def wrapped_model(model, how):
    """(wrapped model, the plain model whose output it must give)."""
    import copy

    if how == "peft":
        return lora_model(model)
    if how == "compile":
        return torch.compile(model, backend="eager"), model  # the wrapper is the point, not inductor's code
    accelerate = pytest.importorskip("accelerate")
    inner = copy.deepcopy(model)
    if how == "dispatch_model":
        return accelerate.dispatch_model(inner, device_map={"": "cpu"}), model
    if how == "cpu_offload":  # weights on the meta device between calls, loaded by the hooks
        accelerate.cpu_offload(inner, execution_device="cpu")
        return inner, model
    raise ValueError(how)


WRAPPERS = ["peft", "compile", "dispatch_model", "cpu_offload"]
