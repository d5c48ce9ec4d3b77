"""LLaDA-8B and LLaMA-3.1-8B at their published shapes, with random weights, and checkpoints in the official layout.

No machine of this project can fetch the 8B weights, yet every 8B command of the README has to work the first time
a user with a GPU runs it. Speed and memory do not depend on the weights, and neither do most failures (a tensor
of the wrong shape, a vocabulary-sized buffer that does not fit, a loader that misreads a config), so a model of
the published shape with random weights, truncated to a few layers, exercises the same code::

    model, kind = build_random("llada-8b", layers=1, dtype=torch.bfloat16)
    save_checkpoint(model, "ckpt/llada-8b-1l")           # config.json as released, shards + index, tokenizer
    lm = load_model("ckpt/llada-8b-1l")                   # the native LLaDA, no remote code

Shapes (:data:`SHAPES`): the published ``config.json`` of ``GSAI-ML/LLaDA-8B-Base`` (d_model 4096, FFN 12288,
32 query and 32 key/value heads, vocabulary 126464, rope_theta 500000, mask id 126336) and of
``meta-llama/Llama-3.1-8B`` (hidden 4096, FFN 14336, 32 query heads over 8 key/value heads, vocabulary 128256,
rope_theta 500000 with the ``llama3`` rope scaling), plus ``-mini`` versions of both with every size scaled down
(same field set, same head ratio, same code path; what the default tests use).

:func:`save_checkpoint` writes what the Hub repositories hold: ``config.json`` with the released field names
(for LLaDA its ``auto_map`` names ``configuration_llada.py`` / ``modeling_llada.py``, the checkpoint's own
remote code, which is *not* written: it is not at hand on this machine), sharded safetensors with
``model.safetensors.index.json``, and a tokenizer stand-in (:func:`standin_tokenizer`: byte-level, one token per
byte, the special tokens at their published ids, filler tokens up to the vocabulary size). ``load_model`` reads
it natively; with ``trust_remote_code=True`` it refuses, naming the missing modelling file (see
``dllm_sparse.models.loading``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from dllm_sparse.models import gemma_shapes
from dllm_sparse.models.gemma_shapes import MOE_SHAPES

__all__ = ["LLADA_8B_CONFIG", "LLAMA_31_8B_CONFIG", "SHAPES", "shape_config", "build_random", "save_checkpoint",
           "standin_tokenizer", "weight_bytes", "shape_family", "published_layers", "MOE_SHAPES"]

#: ``config.json`` of ``GSAI-ML/LLaDA-8B-Base`` as released (field set and values). ``auto_map`` names the
#: checkpoint's own remote code.
LLADA_8B_CONFIG: dict[str, Any] = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}

#: ``config.json`` of ``meta-llama/Llama-3.1-8B`` as released.
LLAMA_31_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}

# The special tokens of each tokenizer (id -> text) that the stand-in places at their published ids.
_LLADA_SPECIAL = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>"}
_LLAMA_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128009: "<|eot_id|>"}

# Scaled-down versions: the same field set, every size divided; special ids moved into the small vocabulary.
_LLADA_MINI = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 192, "vocab_size": 512,
               "embedding_size": 512, "max_sequence_length": 4096, "eos_token_id": 501, "pad_token_id": 501,
               "mask_token_id": 511}
_LLAMA_MINI = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 224,
               "vocab_size": 512, "bos_token_id": 500, "eos_token_id": 501}

#: name -> (family, published config, overrides, special tokens {id: text}, bos id or None).
SHAPES: dict[str, tuple[str, dict, dict, dict[int, str], int | None]] = {
    "llada-8b": ("llada", LLADA_8B_CONFIG, {}, _LLADA_SPECIAL, 126080),
    "llama-3.1-8b": ("llama", LLAMA_31_8B_CONFIG, {}, _LLAMA_SPECIAL, 128000),
    "llada-8b-mini": ("llada", LLADA_8B_CONFIG, _LLADA_MINI, {500: "<|startoftext|>", 501: "<|endoftext|>",
                                                               511: "<|mdm_mask|>"}, 500),
    "llama-3.1-8b-mini": ("llama", LLAMA_31_8B_CONFIG, _LLAMA_MINI, {500: "<|begin_of_text|>",
                                                                     501: "<|end_of_text|>", 509: "<|eot_id|>"}, 500),
}


def _shape(name: str):
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {sorted(SHAPES) + sorted(MOE_SHAPES)}")
    return SHAPES[name]


# The MoE pair (DiffusionGemma 26B-A4B, Gemma 4 26B-A4B) lives in dllm_sparse.models.gemma_shapes; every function
# below hands its names there, so the shape checks and the memory plan take them like the 8B shapes.


def shape_family(name: str) -> str:
    """The family profile name of a shape's model (llada, llama, diffusion_gemma, gemma4)."""
    return MOE_SHAPES[name][0] if name in MOE_SHAPES else _shape(name)[0]


def published_layers(name: str) -> int:
    """The number of transformer blocks of the published model (the memory plan's extrapolation target)."""
    fields = shape_fields(name)
    if name in MOE_SHAPES:
        return fields["text_config"]["num_hidden_layers"]
    return fields["n_layers" if _shape(name)[0] == "llada" else "num_hidden_layers"]


def shape_fields(name: str, layers: int | None = None) -> dict[str, Any]:
    """The ``config.json`` fields of a shape (published values, ``-mini`` overrides), ``layers`` blocks."""
    if name in MOE_SHAPES:
        return gemma_shapes.moe_fields(name, layers)
    family, published, overrides, _, _ = _shape(name)
    fields = {**copy.deepcopy(published), **overrides}
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers must be a whole number >= 1, got {layers!r}")
        fields["n_layers" if family == "llada" else "num_hidden_layers"] = layers
    return fields


def shape_config(name: str, layers: int | None = None):
    """The transformers config of a shape, truncated to ``layers`` blocks (None: the published 32)."""
    if name in MOE_SHAPES:
        return gemma_shapes.moe_config(name, layers)
    family = _shape(name)[0]
    fields = shape_fields(name, layers)
    for key in ("architectures", "auto_map", "transformers_version", "torch_dtype", "model_type"):
        fields.pop(key, None)
    if family == "llada":
        from dllm_sparse.models.llada import LLaDAConfig

        return LLaDAConfig(**fields)
    from transformers import LlamaConfig

    return LlamaConfig(**fields)


def build_random(name: str, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A randomly initialised model of a shape (``kind``: ``"diffusion"`` for LLaDA, ``"ar"`` for LLaMA), built
    directly in ``dtype`` on ``device`` (no float32 copy first: an 8B-vocabulary fp32 model is 4 GB of embedding
    and head alone)."""
    if name in MOE_SHAPES:
        return gemma_shapes.build_moe_random(name, layers, dtype, device, seed)
    family = _shape(name)[0]
    config = shape_config(name, layers)
    torch.manual_seed(seed)
    if family == "llada":
        from dllm_sparse.models.llada import LLaDAModelLM as cls
    else:
        from transformers import LlamaForCausalLM as cls
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval(), "diffusion" if family == "llada" else "ar"


def weight_bytes(name: str, layers: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the weights of a shape, split into the per-layer part and the rest (embedding, head, final norm),
    counted on the meta device: the basis of the memory plan's extrapolation to 32 layers."""
    if name in MOE_SHAPES:
        return gemma_shapes.moe_weight_bytes(name, layers, dtype)
    config_1, config_2 = shape_config(name, 1), shape_config(name, 2)
    family = _shape(name)[0]
    from transformers import LlamaForCausalLM

    from dllm_sparse.models.llada import LLaDAModelLM

    cls = LLaDAModelLM if family == "llada" else LlamaForCausalLM
    with torch.device("meta"):
        n1 = sum(p.numel() for p in cls._from_config(config_1).parameters())
        n2 = sum(p.numel() for p in cls._from_config(config_2).parameters())
    size = torch.empty(0, dtype=dtype).element_size()
    per_layer = (n2 - n1) * size
    fixed = n1 * size - per_layer
    return {"per_layer": per_layer, "fixed": fixed, "total": fixed + layers * per_layer}


def standin_tokenizer(name: str):
    """A byte-level tokenizer with a shape's vocabulary size: ids 0-255 are the bytes (every text encodes), the
    published special tokens sit at their published ids, every other id is an unreachable filler token.
    Not the real tokenizer (its merges are not at hand): a text's token count is its byte count."""
    if name in MOE_SHAPES:
        return gemma_shapes.moe_standin_tokenizer(name)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    family, _, _, special, bos = _shape(name)
    vocab_size = shape_fields(name)["vocab_size"]
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order them by byte value so id == byte.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert set(table.values()) == set(byte_chars)
    vocab = {table[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        vocab[special.get(i, f"<|filler_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    ids = sorted(special)
    eos = next(i for i in ids if "end" in special[i])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[bos] if bos is not None else None, eos_token=special[eos],
        pad_token=special[eos], additional_special_tokens=[special[i] for i in ids if i not in (bos, eos)],
        # A minimal chat template (the real ones are longer): enough for --apply_chat_template and the demos.
        chat_template=("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    )
    fast.model_max_length = 131072
    return fast


def save_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, name: str,
                    max_shard_size: str | int = "1GB", tokenizer: bool = True) -> Path:
    """Save ``model`` (built by :func:`build_random` for shape ``name``) in the official layout: ``config.json``
    with the published field names and values (the model's layer count), sharded safetensors with
    ``model.safetensors.index.json``, and the tokenizer stand-in. For LLaDA, ``auto_map`` names the released
    remote code (``configuration_llada.py``, ``modeling_llada.py``), which is not written. Returns the directory."""
    if name in MOE_SHAPES:
        return gemma_shapes.save_moe_checkpoint(model, directory, name, max_shard_size, tokenizer)
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = _shape(name)[0]
    layers = model.config.n_layers if family == "llada" else model.config.num_hidden_layers
    # Shards written by hand (not save_pretrained): the released layout and names, nothing the native class adds.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    limit = _bytes(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = directory / (file + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / file)
        for key, t in shard.items():
            weight_map[key] = file
            total += t.numel() * t.element_size()
    from dllm_sparse.atomic import atomic_write_json

    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    fields = shape_fields(name, layers)
    fields["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    atomic_write_json(directory / "config.json", fields)
    if tokenizer:
        standin_tokenizer(name).save_pretrained(directory)
    return directory


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be > 0 bytes, got {size}")
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if size.upper().endswith(unit):
            return int(float(size[:-2]) * factor)
    raise ValueError(f"max_shard_size {size!r}: give bytes (an int) or a string like '1GB', '500MB'")


def published_json(name: str) -> str:
    """The published config of a shape as JSON text (for docs and reports)."""
    return json.dumps(shape_fields(name), indent=1, sort_keys=True)
