"""A native, dependency-free implementation of the LLaDA architecture.

LLaDA (Nie et al. 2025, ``GSAI-ML/LLaDA-8B-Base`` / ``-Instruct``) is a masked-diffusion language model. Its
transformer is a LLaMA block (RMSNorm -> attention with rotary embeddings -> RMSNorm -> SwiGLU MLP) with one
difference that matters: attention is *bidirectional*. Every position sees every other position; the model
predicts the tokens hidden behind the mask token (id 126336) from the whole noisy sequence.

The checkpoints on the Hub ship their own ``modeling_llada.py`` (an OLMo fork) and need
``trust_remote_code=True``. This file is a small, readable replacement in the style of nanoGPT / gpt-fast:

* module and parameter names match a real checkpoint exactly (``model.transformer.blocks.0.ff_proj.weight``
  ...), so the original safetensors shards load as they are;
* the numerics follow the original code path of the LLaMA-style block: RMSNorm computed in float32 and cast
  back before the weight multiply, "rotate-half" RoPE over the full head dimension computed in float32,
  grouped-query heads repeated with ``repeat_interleave``, ``F.scaled_dot_product_attention`` without a causal
  mask;
* the FFN is written as ``ff_out(act(ff_proj(x)) * up_proj(x))`` with one module per op, because the
  activation-sparsity tooling in this package attaches forward hooks / pre-hooks to ``ff_proj``, ``up_proj``,
  ``act`` and ``ff_out``.

Importing this module registers the ``"llada"`` model type with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` (the Auto classes the released checkpoints' ``auto_map`` names) and
``AutoModelForMaskedLM``, so ``AutoModel.from_pretrained(local_llada_dir)`` builds this class without
``trust_remote_code``.

This file imports only ``torch``, ``transformers`` and its config module (``llada_config.py``, imported
relatively): :meth:`LLaDAModelLM.save_pretrained` copies both into the saved directory and writes an
``auto_map`` naming them (:func:`add_remote_code`), so plain transformers, without dllm_sparse installed, loads
a saved model with ``AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)``. Keep both free of
imports from the rest of the package.

Attention runs through ``F.scaled_dot_product_attention`` (``attn_implementation="sdpa"``, the default) or, with
``attn_implementation="eager"``, as an explicit float32 softmax(QK^T / sqrt(d)) V (a reference for the fused
kernel; slower).

One deliberate difference from the original code: the original forward ignores ``attention_mask`` entirely
(its attention calls ``F.scaled_dot_product_attention`` with ``attn_mask=None``), so in a left-padded batch every
query also attends to the padded keys and a padded row differs from the same prompt run alone. Here a padding
mask hides padded keys (attention stays bidirectional), so a padded row equals the same prompt alone. Without
padding (LLaDA's own sampling and evaluation code passes no mask) the two agree exactly.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedModel,
)
from transformers.modeling_outputs import MaskedLMOutput

# Relative, so that the saved modelling code (llada.py + llada_config.py, see add_remote_code) imports it too.
from .llada_config import (  # noqa: F401  (re-exported: their home before the split)
    IGNORED_FIELDS,
    LLADA_MASK_TOKEN_ID,
    LLaDAConfig,
    check_supported,
    tiny_llada_config,
    unread_fields,
)

__all__ = [
    "LLADA_MASK_TOKEN_ID",
    "CanvasKVCache",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "IGNORED_FIELDS",
    "RMSNorm",
    "add_remote_code",
    "apply_rotary",
    "rotary_cos_sin",
    "tiny_llada_config",
    "unread_fields",
]


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm as in the original ``RMSLayerNorm``.

    The normalisation runs in float32 and is cast back to the input dtype *before* the weight multiply, so
    in bfloat16 the rounding matches the reference checkpoint's own code.
    """

    def __init__(self, dim: int, eps: float, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is not None:
            x = self.weight * x
        if self.bias is not None:
            x = x + self.bias
        return x


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``[seq_len, head_dim]`` (float32) for positions ``0 .. seq_len-1``.

    LLaDA uses the LLaMA / GPT-NeoX convention: frequency ``i`` rotates the pair (``i``, ``i + head_dim/2``), so
    the table is the half-size frequency table repeated twice along the last axis.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool = True
) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, H, T, head_dim]`` by the tables from :func:`rotary_cos_sin`.

    With ``full_precision`` (LLaDA's ``rope_full_precision=True``) the rotation is done in float32 and the result
    cast back, as the original code does.
    """
    dtype = x.dtype
    if full_precision:
        x = x.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return (x * cos + _rotate_half(x) * sin).to(dtype)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v with the softmax in float32; ``attn_mask`` boolean (True = may attend),
    broadcastable to ``[B, H, T, T]``. What ``F.scaled_dot_product_attention`` computes, written out."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), dropout, training=dropout > 0)
    return (probs @ v.float()).to(v.dtype)


class CanvasKVCache:
    """Keys and values of every canvas position, per layer: the approximate block caches of Fast-dLLM.

    A masked-diffusion sampler runs one forward over the whole canvas at the start of each block (a *write*:
    ``canvas_start=0`` and every position), which stores every layer's keys and values (after RoPE, before the
    grouped-query repeat) and the keys' padding mask. The block's later steps then pass only some rows
    ``input_ids = canvas[:, a:b]`` with ``canvas_start=a`` (a *read*): those rows get fresh keys and values,
    written into the store in place, and attend over all the canvas' keys, the other positions' keys coming from
    the store. What is approximate is only that: the keys and values of the rows not recomputed are those of the
    last write (Fast-dLLM: the *prefix* cache recomputes the current block and everything after it, the *dual*
    cache only the current block). Which rows a step recomputes is the sampler's choice
    (:mod:`dllm_sparse.samplers.block_cache`).

    One cache belongs to one canvas: a read whose batch, canvas length, dtype or device differs from the write,
    or whose rows run past the canvas, is refused.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.key_mask: torch.Tensor | None = None  # [B, S] bool, True = a real key; None = no padding
        self.shape: tuple[int, int] | None = None  # (B, S) of the last write

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.key_mask, self.shape = None, None

    def begin(self, B: int, T: int, start: int,
              attention_mask: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        """Check a forward of T rows from ``start`` against the store; returns (is a write, the key mask [B, S]
        or None)."""
        if start == 0 and (self.shape is None or T == self.shape[1]):
            self.clear()
            self.shape = (B, T)
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                self.key_mask = attention_mask.bool()
            return True, self.key_mask
        if self.shape is None:
            raise ValueError(f"CanvasKVCache: a read of canvas rows {start}..{start + T - 1} before any write; the "
                             "first forward of a canvas must pass every position with canvas_start=0")
        if B != self.shape[0] or start < 0 or start + T > self.shape[1]:
            raise ValueError(f"CanvasKVCache: rows {start}..{start + T - 1} of a batch of {B} do not fit the cached "
                             f"canvas (batch {self.shape[0]}, {self.shape[1]} positions); start a new canvas with a "
                             "write (canvas_start=0, every position)")
        if attention_mask is not None:
            cached = (self.key_mask[:, start:start + T] if self.key_mask is not None
                      else torch.ones((B, T), dtype=torch.bool, device=attention_mask.device))
            same = torch.equal(attention_mask.bool(), cached.to(attention_mask.device))
            if attention_mask.shape != (B, T) or not same:
                raise ValueError("CanvasKVCache: the attention_mask of a read must be the written canvas' mask over "
                                 "the rows read (padding cannot change inside one canvas)")
        return False, self.key_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int,
               write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (write) or overwrite rows ``start:`` (read) of layer ``layer``; returns every canvas key/value."""
        if write:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        K, V = self.keys[layer], self.values[layer]
        if K.dtype != k.dtype or K.device != k.device:
            raise ValueError(f"CanvasKVCache, layer {layer}: keys in {k.dtype} on {k.device} against a store in "
                             f"{K.dtype} on {K.device}; one cache holds one model in one dtype")
        K[:, :, start:start + k.shape[2]] = k
        V[:, :, start:start + v.shape[2]] = v
        return K, V


class LLaDABlock(nn.Module):
    """One LLaMA-style transformer block with bidirectional attention (the original ``LLaDALlamaBlock``)."""

    def __init__(self, config: LLaDAConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        # The model's config object itself (not a copy), so that attn_implementation is read at call time and
        # PreTrainedModel.set_attn_implementation() takes effect. A plain attribute, not a submodule.
        self.config = config
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.d_model // config.n_heads
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = config.residual_dropout
        d, hidden = config.d_model, config.mlp_hidden_size
        bias = config.include_bias
        qkv_bias = config.include_bias or config.include_qkv_bias
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        affine = config.layer_norm_with_affine

        self.attn_norm = RMSNorm(d, config.rms_norm_eps, affine, norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.attn_out._is_residual = True  # read by LLaDAModelLM._init_weights

        self.ff_norm = RMSNorm(d, config.rms_norm_eps, affine, norm_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)  # gate projection (the SiLU input)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.act = nn.SiLU()  # its own module so hooks can see the gate activation
        self.ff_out = nn.Linear(hidden, d, bias=bias)  # down projection
        self.ff_out._is_residual = True

    def attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        cache: tuple | None = None,
    ) -> torch.Tensor:
        """``cache``: (:class:`CanvasKVCache`, first canvas row of x, is a write) or None."""
        B, T, C = x.shape
        # [B, T, H*hd] -> [B, H, T, hd]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        cos, sin = rope
        q = apply_rotary(q, cos, sin, self.rope_full_precision)
        k = apply_rotary(k, cos, sin, self.rope_full_precision)
        if cache is not None:  # every canvas position's keys: the fresh rows written into the store
            store, start, write = cache
            k, v = store.update(self.layer_id, k, v, start, write)

        # Grouped-query attention: query head h reads kv head h // (n_heads // n_kv_heads), i.e. each kv head is
        # repeated in place (repeat_interleave, not tile), the layout the original code and checkpoints use.
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)

        # is_causal=False is the whole point of a masked-diffusion LM: every position attends everywhere.
        dropout = self.attention_dropout if self.training else 0.0
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=False)
        elif impl == "eager":
            y = eager_attention(q, k, v, attn_mask, dropout)
        else:
            raise ValueError(f"the native LLaDA implements attn_implementation 'sdpa' and 'eager', not {impl!r}; "
                             "load it with attn_implementation='sdpa' (the default)")
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.attn_out(y)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        # SwiGLU, kept as separate module calls for the sparsity hooks:
        # ff_out( act(ff_proj(x)) * up_proj(x) ).
        return self.ff_out(self.act(self.ff_proj(x)) * self.up_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        cache: tuple | None = None,
    ) -> torch.Tensor:
        """``x``: ``[B, T, d_model]``; ``rope``: ``(cos, sin)`` of shape ``[T, head_dim]``; ``attn_mask``: boolean,
        broadcastable to ``[B, H, T, T]`` (``[B, H, T, S]`` with a cache), True where attention is allowed (or None
        for full attention); ``cache``: see :meth:`attention`."""
        p = self.residual_dropout if self.training else 0.0
        x = x + F.dropout(self.attention(self.attn_norm(x), rope, attn_mask, cache), p, self.training)
        x = x + F.dropout(self.mlp(self.ff_norm(x)), p, self.training)
        return x


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


class LLaDAModel(nn.Module):
    """Embedding, blocks, final norm and LM head, under the original ``transformer`` ModuleDict names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        n_emb = config.embedding_size or config.vocab_size
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(n_emb, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": RMSNorm(
                    config.d_model, config.rms_norm_eps, config.layer_norm_with_affine, norm_bias
                ),
                # With weight tying this Linear's weight is replaced by wte.weight (PreTrainedModel.tie_weights);
                # the original code has no ff_out then and uses F.linear(x, wte.weight) without bias.
                "ff_out": nn.Linear(
                    config.d_model, n_emb, bias=config.include_bias and not config.weight_tying
                ),
            }
        )
        # Set by PreTrainedModel.activation_checkpointing_enable() / gradient_checkpointing_enable().
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        canvas_cache: CanvasKVCache | None = None,
        canvas_start: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        cfg = self.config
        tr = self.transformer
        x = tr.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if cfg.input_emb_norm:
            x = x * (cfg.d_model**0.5)
        x = F.dropout(x, cfg.embedding_dropout if self.training else 0.0, self.training)
        B, T, _ = x.shape

        # RoPE tables are cheap ([T, head_dim]); computing them per call avoids buffers that would need special
        # care when the model is built on the meta device and dispatched by accelerate.
        rope = rotary_cos_sin(canvas_start + T, cfg.d_model // cfg.n_heads, cfg.rope_theta, x.device)
        cache = None
        if canvas_cache is not None:
            if cfg.causal:
                raise ValueError("a CanvasKVCache is for bidirectional (masked-diffusion) attention; this model's "
                                 "config has causal=True")
            if attention_mask is not None and attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must have shape [batch, seq] = {(B, T)}, got "
                                 f"{tuple(attention_mask.shape)}")
            write, key_mask = canvas_cache.begin(B, T, int(canvas_start), attention_mask)
            rope = (rope[0][canvas_start:], rope[1][canvas_start:])  # the rows' own positions
            cache = (canvas_cache, int(canvas_start), write)
            attn_mask = None if key_mask is None else _padding_mask(key_mask.to(x.device), *key_mask.shape)
        elif canvas_start:
            raise ValueError("canvas_start is the first canvas row of input_ids under a CanvasKVCache; pass "
                             "canvas_cache= too (without a cache every forward starts at position 0)")
        else:
            attn_mask = _padding_mask(attention_mask, B, T)
        if cfg.causal:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            # Keep the diagonal: a left-padded first query would otherwise have no key at all (NaN in SDPA).
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            attn_mask = causal if attn_mask is None else (attn_mask & causal) | eye

        hidden_states = [] if output_hidden_states else None
        for block in tr.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, rope, attn_mask, cache)
            else:
                x = block(x, rope, attn_mask, cache)

        x = tr.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)  # post-norm last state, following the original code / HF convention
        logits = tr.ff_out(x)
        if cfg.scale_logits:
            logits = logits * (1 / math.sqrt(cfg.d_model))
        return logits, tuple(hidden_states) if hidden_states is not None else None


def _padding_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Turn a ``[B, T]`` 0/1 padding mask into a boolean SDPA mask ``[B, 1, 1, T]`` (True = may attend).

    Only *keys* are masked: padded query positions still attend to the real tokens, so their (ignored)
    outputs stay finite. A row that is padding everywhere would have no key left and SDPA would return NaN
    for it; such rows attend to everything instead.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape != (B, T):
        raise ValueError(
            f"attention_mask must have shape [batch, seq] = {(B, T)}, got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None  # no padding: leave SDPA free to pick its fastest (mask-less) kernel
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM; ``forward`` returns per-position logits over ``embedding_size`` tokens.

    Parameter names are those of the released checkpoints (``model.transformer.blocks.{i}.q_proj.weight`` ...).
    Logits come back in the model dtype; upcast them yourself when you need float32 softmax.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["LLaDABlock"]
    # Used only when config.tie_word_embeddings (= weight_tying) is true.
    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "model.transformer.ff_out.weight": "model.transformer.wte.weight"
    }
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Read by dllm_sparse's diffusion sampler: this class hides padded keys (the released remote code ignores
    # attention_mask) and applies logit_shift itself. A class attribute, so a saved copy of this file loaded as
    # remote code (another class object) says the same.
    dllm_sparse_native_llada: ClassVar[bool] = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only used for freshly built models (tests, training from scratch) and for weights missing from a
        # checkpoint; transformers leaves loaded weights alone. N(0, init_std), with the residual output
        # projections (attn_out, block ff_out) shrunk by 1/sqrt(2 * n_layers) as in GPT-2 / OLMo "normal" init.
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_residual", False):
                std = std / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def is_gradient_checkpointing(self) -> bool:
        # peft (0.21, the newest) reads this name from every model it wraps (PeftModel.__init__, so each adapter
        # load and merge), and transformers 5.24 made it a deprecated alias of is_activation_checkpointing that
        # warns at each read. Answered here with transformers' own test, which every supported version agrees on.
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained``, plus this modelling file and an ``auto_map`` naming it
        (:func:`add_remote_code`), so that transformers alone loads the directory with
        ``AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        add_remote_code(save_directory)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        # The modules are sized by embedding_size, which the base class does not know about.
        self.config.embedding_size = emb.weight.shape[0]
        return emb

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        canvas_cache: CanvasKVCache | None = None,
        canvas_start: int = 0,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """Bidirectional forward pass.

        Args:
            input_ids: ``[B, T]`` token ids (mask positions carry ``config.mask_token_id``).
            attention_mask: optional ``[B, T]`` padding mask, 1 for real tokens and 0 for padding. Padded keys
                are hidden from every query; attention stays bidirectional.
            inputs_embeds: ``[B, T, d_model]`` instead of ``input_ids``.
            labels: optional ``[B, T]`` targets; positions set to -100 are ignored. The loss is the plain mean
                cross-entropy over the other positions (the diffusion ELBO weighting is the caller's business).
            output_hidden_states: also return the input of every block plus the final normed state.
            canvas_cache: a :class:`CanvasKVCache` (Fast-dLLM's approximate block caches): with ``canvas_start=0``
                and the whole canvas, every layer's keys and values are stored; with ``canvas_start=a`` and rows
                ``a:b`` of the canvas only, those rows attend over every stored key (their own fresh ones written
                in). ``attention_mask`` is then that of the rows passed. Logit shift (``config.logit_shift``) runs
                over the rows passed: row 0 of a read has no left neighbour, so pass one row more on the left.
            canvas_start: the canvas position of ``input_ids[:, 0]`` under a ``canvas_cache`` (RoPE positions).
            kwargs: accepted and ignored (e.g. ``use_cache`` from generic callers): the KV cache of an
                autoregressive loop has no meaning for bidirectional attention.

        Returns:
            ``MaskedLMOutput`` with ``logits`` ``[B, T, embedding_size]`` in the model dtype (already shifted
            one position right when ``config.logit_shift``; hidden states are never shifted).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        logits, hidden_states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            canvas_cache=canvas_cache,
            canvas_start=canvas_start,
        )
        if self.config.logit_shift:
            # Position i is predicted from the hidden state at i - 1 (Dream); position 0 has no left neighbour.
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# --------------------------------------------------------------------------------------------------------------
# Auto-class registration and the saved modelling code
# --------------------------------------------------------------------------------------------------------------

#: The Auto classes that build :class:`LLaDAModelLM`: those of the released checkpoints' ``auto_map``
#: (``AutoModel``, ``AutoModelForCausalLM``) and ``AutoModelForMaskedLM`` (what the model is).
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM")


def add_remote_code(directory: str | os.PathLike) -> None:
    """Make a saved LLaDA directory loadable by transformers alone: copy this file into it as ``llada.py``, with
    the config module it imports (``llada_config.py``), and point its ``config.json`` ``auto_map`` at it
    (replacing an ``auto_map`` of the original checkpoint, whose ``modeling_llada.py`` is not in the directory).
    Then, without dllm_sparse, ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` builds
    this class.

    transformers' own ``register_for_auto_class`` would copy the file too, but writes one Auto class per model
    class; the released checkpoints list two, and this writes all of :data:`AUTO_CLASSES`. The config is written
    to a temporary file and renamed, so a reader never sees half a config."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    module = "llada"
    # The imported module first: a directory holding llada.py always holds what it imports.
    shutil.copyfile(Path(__file__).with_name("llada_config.py"), directory / "llada_config.py")
    shutil.copyfile(__file__, directory / f"{module}.py")
    config["auto_map"] = {"AutoConfig": f"{module}.LLaDAConfig",
                          **{name: f"{module}.LLaDAModelLM" for name in AUTO_CLASSES}}
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)


# exist_ok: a re-import (importlib.reload, two copies of the package on sys.path) must not raise. The mapping
# is keyed by class, so the newest registration of "llada" wins.
AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
