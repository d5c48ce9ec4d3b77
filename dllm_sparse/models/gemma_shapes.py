"""DiffusionGemma 26B-A4B and Gemma 4 26B-A4B at their published shapes, random weights, any number of layers.

The MoE pair of the main experiment (``gemma4`` vs ``diffusion_gemma``), built like the 8B shapes of
:mod:`dllm_sparse.models.shapes` (which registers these names and dispatches here)::

    model, kind = build_random("diffusion-gemma-26b-a4b", layers=1, dtype=torch.bfloat16)

Where each number comes from (no machine of this project can read the Hub's ``config.json``):

* text model, both checkpoints (they share the layer design; DiffusionGemma's docstring says its encoder "is very
  similar to Gemma4Model" and its ``base_model_ep_plan`` names ``google/gemma-4-26B-A4B-it``): the GGUF metadata of
  ``gemma4:26b-a4b`` on ollama.com (block_count 30, embedding_length 2816, feed_forward_length 2112, expert_count
  128, expert_feed_forward_length 704, expert_used_count 8, head_count 16, head_count_kv 8, key_length 512,
  key_length_swa 256, sliding_window 1024, context_length 262144, rope freq_base 1e6 / swa 1e4,
  final_logit_softcapping 30); 2 key/value heads and K = V on the global layers from NVIDIA Megatron-Bridge's
  Gemma 4 provider docs ("global layers use global_head_dim=512 / 2 KV heads", "K=V sharing on global attention
  layers"); the vocabulary (262144) and the 5:1 sliding / full pattern from transformers 5.25's
  ``Gemma4TextConfig`` defaults (the GGUF's sliding_window_pattern starts [true x5, ...]);
* vision tower: 27 blocks and 16 heads from the same GGUF metadata (gemma4.vision.block_count / head_count); the
  width (1152) and MLP (4304) are the SigLIP-So400m sizes, an assumption (the card gives "~550M" vision
  parameters, which these sizes reproduce to within the embedder);
* DiffusionGemma's own fields: ``canvas_length`` 256 and the special ids from transformers 5.25's
  ``DiffusionGemmaConfig`` defaults; total ~25.8 B parameters, ~3.8 B active (model card), which these sizes give.

``-mini`` versions scale every size down (same field set, same code path; what the tests use).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["GEMMA4_26B_A4B_TEXT", "GEMMA4_VISION_26B", "MOE_SHAPES", "moe_fields", "moe_config", "build_moe_random",
           "moe_weight_bytes", "save_moe_checkpoint", "moe_standin_tokenizer"]

#: The text model of both checkpoints (Gemma 4 adds ``enable_moe_block``; DiffusionGemma always has the experts).
GEMMA4_26B_A4B_TEXT: dict[str, Any] = {
    "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
    "num_global_key_value_heads": 2, "attention_k_eq_v": True, "num_experts": 128, "top_k_experts": 8,
    "moe_intermediate_size": 704, "sliding_window": 1024, "max_position_embeddings": 262144,
    "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
}
GEMMA4_VISION_26B: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 72, "patch_size": 16,
}
_TEXT_MINI = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1,
              "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 16, "sliding_window": 32,
              "max_position_embeddings": 4096}
_VISION_MINI = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "position_embedding_size": 64}

#: name -> (family, top-level fields, text overrides, vision overrides)
MOE_SHAPES: dict[str, tuple[str, dict, dict, dict]] = {
    "diffusion-gemma-26b-a4b": ("diffusion_gemma", {"model_type": "diffusion_gemma", "canvas_length": 256}, {}, {}),
    "gemma4-26b-a4b": ("gemma4", {"model_type": "gemma4"}, {"enable_moe_block": True,
                                                             "hidden_size_per_layer_input": 0}, {}),
    "diffusion-gemma-26b-a4b-mini": ("diffusion_gemma", {"model_type": "diffusion_gemma", "canvas_length": 16},
                                     _TEXT_MINI, _VISION_MINI),
    "gemma4-26b-a4b-mini": ("gemma4", {"model_type": "gemma4"}, {**_TEXT_MINI, "enable_moe_block": True,
                                                                  "hidden_size_per_layer_input": 0}, _VISION_MINI),
}


def _moe(name: str):
    if name not in MOE_SHAPES:
        raise ValueError(f"unknown MoE shape {name!r}; choose one of {sorted(MOE_SHAPES)}")
    return MOE_SHAPES[name]


def moe_fields(name: str, layers: int | None = None) -> dict[str, Any]:
    """The ``config.json`` fields of a shape (nested ``text_config`` / ``vision_config``), ``layers`` text blocks."""
    _, top, text, vision = _moe(name)
    fields = copy.deepcopy(top)
    fields["text_config"] = {**copy.deepcopy(GEMMA4_26B_A4B_TEXT), **text}
    fields["vision_config"] = {**copy.deepcopy(GEMMA4_VISION_26B), **vision, "model_type": "gemma4_vision"}
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers must be a whole number >= 1, got {layers!r}")
        fields["text_config"]["num_hidden_layers"] = layers
    return fields


def moe_config(name: str, layers: int | None = None):
    """The transformers config of a shape, ``layers`` text blocks (the last is always full attention)."""
    from transformers import DiffusionGemmaConfig, Gemma4Config

    fields = moe_fields(name, layers)
    cls = DiffusionGemmaConfig if fields.pop("model_type") == "diffusion_gemma" else Gemma4Config
    return cls(**fields)


def _model_class(name: str):
    import transformers

    family = _moe(name)[0]
    return transformers.DiffusionGemmaForBlockDiffusion if family == "diffusion_gemma" \
        else transformers.Gemma4ForConditionalGeneration


def build_moe_random(name: str, layers: int | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A randomly initialised model of a shape (``kind``: ``"diffusion"`` for DiffusionGemma, ``"ar"`` for Gemma 4),
    built directly in ``dtype`` on ``device``; DiffusionGemma's encoder runs through the decoder's FFN modules.

    DiffusionGemma is built with one copy of each layer: its parameters start on the meta device, are tied
    (encoder -> decoder, as the checkpoint loader ties them), and only then get storage and their random values
    (:func:`_materialise_tied`), so building never holds the encoder's copy that tying would throw away."""
    from dllm_sparse.models.diffusion_gemma import share_encoder_ffns

    family = _moe(name)[0]
    cls, config = _model_class(name), moe_config(name, layers)
    torch.manual_seed(seed)
    if family != "diffusion_gemma" or torch.device(device).type == "meta":
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
    else:
        from accelerate import init_empty_weights

        # Parameters on meta, buffers built for real: some (the encoder layers' layer_scalar) get their values only
        # from their constructor, not from _init_weights.
        with torch.device(device), init_empty_weights(include_buffers=False):
            model = cls._from_config(config, dtype=dtype)
        model.tie_weights()  # again: under init_empty_weights, tying re-registers each parameter as a new object
        _materialise_tied(model, device)
    if family == "diffusion_gemma":
        share_encoder_ffns(model)
    return model.eval(), "diffusion" if family == "diffusion_gemma" else "ar"


@torch.no_grad()
def _materialise_tied(model: torch.nn.Module, device: str | torch.device) -> None:
    """Give a model's meta parameters storage on ``device``, one tensor per ``Parameter`` object (tied parameters
    stay one tensor; ``nn.Module.to_empty`` allocates each occurrence and unties them), then run transformers'
    weight init over the whole model. The random values differ from a build made directly on ``device`` (the
    random stream is drawn in another order)."""
    real: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # id -> (meta, real); keeps ids unique
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in real:
                real[id(param)] = (param, torch.nn.Parameter(torch.empty_like(param, device=device),
                                                             requires_grad=param.requires_grad))
            module._parameters[key] = real[id(param)][1]
        module.__dict__.pop("_is_hf_initialized", None)  # post_init "initialised" the meta tensors: do it again
    model.initialize_weights()


def moe_weight_bytes(name: str, layers: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the weights, split into per-layer and the rest, counted on the meta device (tied weights once),
    plus ``experts_per_layer``: the routed experts' share of a layer."""
    cls = _model_class(name)

    def count(n: int) -> tuple[int, int]:
        with torch.device("meta"):
            model = cls._from_config(moe_config(name, n))
        params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
        experts = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
        return sum(p.numel() for p in params), experts

    (n1, e1), (n2, e2) = count(1), count(2)
    size = torch.empty(0, dtype=dtype).element_size()
    per_layer, fixed = (n2 - n1) * size, (2 * n1 - n2) * size
    return {"per_layer": per_layer, "fixed": fixed, "total": fixed + layers * per_layer,
            "experts_per_layer": (e2 - e1) * size}


def save_moe_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, name: str,
                        max_shard_size: str | int = "1GB", tokenizer: bool = True) -> Path:
    """Save ``model`` with ``save_pretrained`` (transformers' own layout for these classes, sharded) and the
    byte-level stand-in tokenizer of the shape's vocabulary. Returns the directory."""
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer:
        moe_standin_tokenizer(name).save_pretrained(directory)
    return directory


def moe_standin_tokenizer(name: str):
    """A byte-level tokenizer of the shape's vocabulary at Gemma's special ids (0 pad, 1 eos, 2 bos), the 256 bytes
    at ids 4-259, unreachable filler tokens up to the vocabulary size. Not the real tokenizer (not at hand)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab_size = moe_fields(name)["text_config"]["vocab_size"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({ch: 4 + b for b, ch in bytes_to_unicode().items()})
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        chat_template=("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<model>\n{% endif %}"))
    fast.model_max_length = 131072
    return fast
