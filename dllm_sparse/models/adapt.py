"""Turn a LLaMA-family causal LM into a masked-diffusion LM (the "AR -> MDM adaptation" of Dream / DiffuLLaMA).

The pieces, in the order a training script uses them:

1. :func:`convert_causal_lm` copies the weights of a Hugging Face ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``)
   into the native :class:`~dllm_sparse.models.llada.LLaDAModelLM`. The block math is identical (RMSNorm, rotate-half
   RoPE, GQA, SwiGLU); only the attention becomes bidirectional. ``logit_shift=True`` keeps Dream's convention
   (logits at position i come from the hidden state at i - 1), so the AR head's next-token prediction is
   reused for the masked token and adaptation starts from a sensible model.
2. :func:`add_mask_token` grows the vocabulary by one mask token (new row = mean embedding) and records its id in
   ``config.mask_token_id``.
3. :func:`add_lora` puts peft LoRA adapters on every linear layer of the blocks and makes the mask token's
   embedding row trainable with peft's ``trainable_token_indices`` (one row instead of the 49k-row matrix; with
   tied embeddings peft ties the head's row to it).
4. :func:`masked_diffusion_loss` is the LLaDA SFT objective: t ~ U(eps, 1) per row, each answer token masked
   with probability t, cross-entropy on masked positions weighted by 1/t and divided by the answer length.
   Prompt tokens are never masked.
5. :func:`save_adapter` writes a standard peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
   plus ``dllm_sparse_adapter.json`` (how to rebuild the base: conversion settings, mask token, file hashes);
   :func:`load_adapted_model` rebuilds the base and merges the adapter with peft's own
   ``PeftModel.from_pretrained(...).merge_and_unload()``, so sparsity hooks see plain ``nn.Linear`` modules.

:mod:`dllm_sparse.models.twin` uses these to serve the embedded ``smollm2-135m-mdm`` model; the training entry point is
``experiments/adapt_ar_to_diffusion.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.models.llada import LLaDAConfig, LLaDAModelLM

__all__ = [
    "MASK_TOKEN",
    "LORA_TARGET_REGEX",
    "LORA_MODULES",
    "SFTBatch",
    "llada_config_from_causal",
    "convert_state_dict",
    "convert_causal_lm",
    "add_mask_token",
    "add_lora",
    "lora_param_count",
    "adapter_bytes",
    "collate_sft",
    "forward_mask",
    "mdm_loss",
    "masked_diffusion_loss",
    "mask_row_parameter",
    "save_adapter",
    "read_adapter_meta",
    "write_adapter_meta",
    "seal_adapter_meta",
    "ADAPTER_META_SHA256",
    "load_adapted_model",
    "adapter_hash",
    "ADAPTER_META",
]

MASK_TOKEN = "<|mdm_mask|>"
#: Linear layers of a LLaDA block that get LoRA. The block's ``ff_out`` is the FFN down projection; the LM head
#: (``transformer.ff_out``) shares the name, so targets are matched by a regex anchored at ``blocks.<i>``.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
LORA_TARGET_REGEX = r".*\.blocks\.\d+\.(" + "|".join(LORA_MODULES) + r")"

_SUPPORTED = ("llama", "qwen2")
#: The project's note next to peft's two files: what base the adapter applies to and how to rebuild it.
ADAPTER_META = "dllm_sparse_adapter.json"
#: The sha256 of :data:`ADAPTER_META`'s bytes, beside it (inside the metadata it would change the bytes it hashes).
ADAPTER_META_SHA256 = "dllm_sparse_adapter.json.sha256"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# 1. Conversion
# --------------------------------------------------------------------------------------------------------------


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} (rope scaling) is not implemented by the native LLaDA blocks; "
                         "only plain RoPE converts exactly")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("the causal LM config has no rope_theta")
    return float(theta)


def llada_config_from_causal(cfg, *, logit_shift: bool = True, causal: bool = False) -> LLaDAConfig:
    """A :class:`LLaDAConfig` with the same shapes as a Llama / Qwen2 config (no mask token yet)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(f"cannot convert model_type {model_type!r}; supported: {_SUPPORTED}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r}: the LLaDA block is SwiGLU (silu) only")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError(f"head_dim {head_dim} x {cfg.num_attention_heads} heads != hidden_size {cfg.hidden_size}; "
                         "the LLaDA block derives head_dim = d_model / n_heads")
    if model_type == "llama" and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        raise ValueError("Llama attention_bias / mlp_bias are not supported (LLaDA has no o_proj-only bias)")
    if model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise ValueError("Qwen2 sliding-window attention does not convert to full bidirectional attention")
    return LLaDAConfig(
        d_model=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        mlp_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(cfg.rms_norm_eps),
        weight_tying=bool(cfg.tie_word_embeddings),
        include_qkv_bias=model_type == "qwen2",  # Qwen2: bias on q/k/v only, exactly LLaDA's include_qkv_bias
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id,
        mask_token_id=None,
        logit_shift=logit_shift,
        causal=causal,
    )


_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}


def convert_state_dict(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a HF Llama/Qwen2 causal-LM state dict to LLaDA parameter names (tensors are not copied)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "model.embed_tokens.weight":
            out["model.transformer.wte.weight"] = value
        elif key == "model.norm.weight":
            out["model.transformer.ln_f.weight"] = value
        elif key == "lm_head.weight":
            if not tied:
                out["model.transformer.ff_out.weight"] = value
        elif key.startswith("model.layers."):
            _, _, idx, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            if module not in _LAYER_NAMES:
                raise KeyError(f"unexpected parameter {key!r} in the causal LM")
            out[f"model.transformer.blocks.{idx}.{_LAYER_NAMES[module]}.{param}"] = value
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        else:
            raise KeyError(f"unexpected parameter {key!r} in the causal LM")
    return out


def convert_causal_lm(model: nn.Module, *, logit_shift: bool = True, causal: bool = False) -> LLaDAModelLM:
    """A :class:`LLaDAModelLM` with the weights of ``model`` (a HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``).

    With ``causal=True`` and ``logit_shift=False`` it computes exactly what ``model`` computes; the defaults give
    the bidirectional, shifted starting point of a masked-diffusion adaptation.
    """
    cfg = llada_config_from_causal(model.config, logit_shift=logit_shift, causal=causal)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        out = LLaDAModelLM(cfg)
    state = convert_state_dict(model.state_dict(), tied=cfg.weight_tying)
    # assign=True adopts the given tensors; tie afterwards so the head shares the (converted) embedding.
    missing, unexpected = out.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.weight_tying and k == "model.transformer.ff_out.weight")]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.weight_tying:
        out.model.transformer.ff_out.weight = out.model.transformer.wte.weight
    return out.to(dtype).eval()


# --------------------------------------------------------------------------------------------------------------
# 2. Mask token
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def add_mask_token(model: LLaDAModelLM, tokenizer=None, token: str = MASK_TOKEN) -> int:
    """Append a mask token to the vocabulary (and ``tokenizer``, when given); returns its id.

    The new embedding row is the mean embedding: a neutral input that does not look like any particular token.
    With tied embeddings the same row is the mask token's output embedding (its logit is then pushed down by
    training, since the mask is never a target).
    """
    tr = model.model.transformer
    old = tr.wte.weight
    n, d = old.shape
    mask_id = n
    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": token})
        if tokenizer.mask_token_id != mask_id:
            raise ValueError(f"tokenizer gave the mask token id {tokenizer.mask_token_id}, but the embedding has {n} "
                             "rows; the tokenizer and model vocabularies must have the same size before adding it")
    wte = nn.Embedding(n + 1, d, dtype=old.dtype, device=old.device)
    wte.weight[:n] = old
    wte.weight[n] = old.float().mean(0).to(old.dtype)
    tr.wte = wte
    if model.config.weight_tying:
        head = nn.Linear(d, n + 1, bias=False, dtype=old.dtype, device=old.device)
        head.weight = wte.weight
    else:
        old_head = tr.ff_out
        head = nn.Linear(d, n + 1, bias=old_head.bias is not None, dtype=old.dtype, device=old.device)
        head.weight[:n] = old_head.weight
        head.weight[n] = old_head.weight.float().mean(0).to(old.dtype)
        if old_head.bias is not None:
            head.bias[:n] = old_head.bias
            head.bias[n] = old_head.bias.min()  # a bias that never favours predicting the mask
    tr.ff_out = head
    model.config.vocab_size = n + 1
    model.config.embedding_size = n + 1
    model.config.mask_token_id = mask_id
    return mask_id


# --------------------------------------------------------------------------------------------------------------
# 3. LoRA
# --------------------------------------------------------------------------------------------------------------


def add_lora(model: LLaDAModelLM, r: int = 16, alpha: int = 32, dropout: float = 0.0, train_mask_row: bool = True):
    """Wrap ``model`` in a peft LoRA model on every linear layer of the blocks (head and embeddings frozen).

    ``train_mask_row`` also trains the mask token's embedding row (``config.mask_token_id``) through peft's
    ``trainable_token_indices``; with tied embeddings peft applies the same row to the head.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA training needs peft: pip install peft") from e
    tokens = None
    if train_mask_row:
        mask_id = getattr(model.config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("train_mask_row=True needs config.mask_token_id: call add_mask_token(model) first")
        tokens = [int(mask_id)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_REGEX, bias="none",
                        trainable_token_indices=tokens)
    return get_peft_model(model, config)


def mask_row_parameter(peft_model: nn.Module) -> nn.Parameter | None:
    """The trainable mask-row values of :func:`add_lora` (for its own learning rate), or None."""
    for name, param in peft_model.named_parameters():
        if "trainable_tokens_delta" in name:
            return param
    return None


def lora_param_count(config: LLaDAConfig, r: int) -> int:
    """LoRA parameters on all block linears: r * (in + out) per matrix."""
    d, f = config.d_model, config.mlp_hidden_size
    kv = config.n_kv_heads * (config.d_model // config.n_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return config.n_layers * sum(r * (i + o) for i, o in shapes)


def adapter_bytes(config: LLaDAConfig, r: int, bytes_per_param: int = 4) -> int:
    """Size of the stored adapter: LoRA factors plus the mask row delta (safetensors headers not counted)."""
    return (lora_param_count(config, r) + config.d_model) * bytes_per_param


# --------------------------------------------------------------------------------------------------------------
# 4. The masked-diffusion objective
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SFTBatch:
    """Prompt + answer rows. ``answer`` marks the positions that may be masked and are scored (answer tokens and
    their end-of-sequence padding); ``attention_mask`` is 0 only on padding that is not part of the answer."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    answer: torch.Tensor  # [B, T] bool
    answer_length: torch.Tensor  # [B] float, number of answer positions


def collate_sft(rows: Sequence[tuple[Sequence[int], Sequence[int], bool]], eos_id: int,
                pad_id: int | None = None) -> SFTBatch:
    """Rows of (prompt ids, answer ids, finished) -> one right-padded batch, LLaDA SFT style.

    A *finished* answer (it ended with end-of-sequence) is padded with more end-of-sequence tokens that count as
    answer: the model learns to fill the rest of a canvas with them, as LLaDA's SFT does. An unfinished
    (truncated) answer is padded with ``pad_id`` under attention mask 0 and those positions are not scored, so the
    model is never taught to stop where a sample was merely cut.
    """
    pad_id = eos_id if pad_id is None else pad_id
    T = max(len(p) + len(a) for p, a, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    answer = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (p, a, finished) in enumerate(rows):
        n = len(p) + len(a)
        ids[b, :n] = torch.tensor(list(p) + list(a), dtype=torch.long)
        answer[b, len(p):n] = True
        if finished:
            ids[b, n:] = eos_id
            answer[b, n:] = True
            attn[b] = 1
        else:
            attn[b, :n] = 1
    return SFTBatch(ids, attn, answer, answer.sum(1).float())


def forward_mask(batch: SFTBatch, mask_id: int, eps: float = 1e-3,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward (noising) process: t ~ U(eps, 1) per row, each answer position masked with probability t.

    Returns ``(noisy_ids, masked, t)``; prompt positions are never masked.
    """
    B, T = batch.input_ids.shape
    t = eps + (1 - eps) * torch.rand(B, generator=generator)
    masked = (torch.rand(B, T, generator=generator) < t[:, None]) & batch.answer
    return batch.input_ids.masked_fill(masked, mask_id), masked, t


def mdm_loss(token_ce: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, answer_length: torch.Tensor
             ) -> torch.Tensor:
    """LLaDA SFT loss: sum over masked tokens of CE / t / answer_length, averaged over rows.

    ``token_ce`` is ``[B, T]`` (values at unmasked positions are ignored); dividing by the answer length instead
    of the masked count keeps the 1/t weighting an unbiased ELBO estimate.
    """
    per_token = torch.where(masked, token_ce / t[:, None], torch.zeros_like(token_ce))
    return (per_token.sum(1) / answer_length.clamp(min=1)).mean()


def masked_diffusion_loss(model: nn.Module, batch: SFTBatch, mask_id: int, eps: float = 1e-3,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """One Monte-Carlo sample of the masked-diffusion loss of ``batch`` under ``model``.

    ``model`` is a :class:`LLaDAModelLM` or a peft model wrapping one. Returns ``(loss, info)`` with the number of
    masked and answer tokens in ``info``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.scale_logits:
        raise ValueError("masked_diffusion_loss does not handle scale_logits models")
    noisy, masked, t = forward_mask(batch, mask_id, eps, generator)
    device = next(base.parameters()).device
    noisy, masked, attn = noisy.to(device), masked.to(device), batch.attention_mask.to(device)
    attn = None if bool(attn.all()) else attn
    # The loss only needs logits at masked positions; projecting ~1/3 of the positions onto the 49k vocabulary
    # instead of all of them saves a sizeable part of a CPU training step. The head is taken off the forward by
    # hand (not with the family profile's splitter) because under peft it may be a trainable-tokens wrapper.
    if not isinstance(base, LLaDAModelLM):
        raise ValueError(f"masked_diffusion_loss trains the native LLaDAModelLM, not {type(base).__name__}")
    head = base.get_output_embeddings()
    base.set_output_embeddings(nn.Identity())
    try:
        hidden = model(input_ids=noisy, attention_mask=attn).logits  # [B, T, d], already shifted
    finally:
        base.set_output_embeddings(head)
    logits = head(hidden[masked]).float()
    targets = batch.input_ids.to(device)[masked]
    token_ce = torch.zeros(masked.shape, dtype=torch.float32, device=device)
    token_ce[masked] = F.cross_entropy(logits, targets, reduction="none")
    loss = mdm_loss(token_ce, masked, t.to(device), batch.answer_length.to(device))
    return loss, {"masked_tokens": int(masked.sum()), "answer_tokens": int(batch.answer.sum()),
                  "tokens": int(batch.attention_mask.sum())}


# --------------------------------------------------------------------------------------------------------------
# 5. Saving, loading and merging the adapter
# --------------------------------------------------------------------------------------------------------------


def save_adapter(out_dir: str | Path, peft_model: nn.Module, meta: dict) -> dict:
    """Write ``peft_model``'s adapter the peft way (``save_pretrained``) plus :data:`ADAPTER_META`.

    ``meta`` says how to rebuild the base the adapter applies to (``base``, ``logit_shift``, ``mask_token``,
    ``mask_token_id``, ...); the sha256 and size of peft's files are added, and the sha256 of the metadata file
    itself goes next to it (:data:`ADAPTER_META_SHA256`, see :func:`read_adapter_meta`). Returns the metadata
    written.
    """
    import os
    import tempfile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # peft also writes a README.md template: save aside and move only its two files in (each move atomic), so a
    # model card already in out_dir survives.
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        peft_model.save_pretrained(tmp)
        for fname in _ADAPTER_FILES:
            os.chmod(Path(tmp) / fname, 0o644)
            os.replace(Path(tmp) / fname, out / fname)
    return write_adapter_meta(out, meta)


def write_adapter_meta(adapter_dir: str | Path, meta: dict) -> dict:
    """Write :data:`ADAPTER_META` for the adapter files already in ``adapter_dir`` (``meta`` plus the size and
    sha256 of each of peft's files), then :data:`ADAPTER_META_SHA256`, the sha256 of the metadata file's bytes.
    Returns the metadata written."""
    adapter_dir = Path(adapter_dir)
    files = {}
    for fname in _ADAPTER_FILES:
        data = (adapter_dir / fname).read_bytes()
        files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta = dict(meta, files=files)
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write_text(adapter_dir / ADAPTER_META, text)
    atomic_write_text(adapter_dir / ADAPTER_META_SHA256, hashlib.sha256(text.encode()).hexdigest() + "\n")
    return meta


def seal_adapter_meta(adapter_dir: str | Path) -> str:
    """Write :data:`ADAPTER_META_SHA256` for an adapter whose metadata predates it (the bytes as they are, so
    :func:`adapter_hash` does not change); only for metadata you trust. Returns the sha256."""
    digest = hashlib.sha256((Path(adapter_dir) / ADAPTER_META).read_bytes()).hexdigest()
    atomic_write_text(Path(adapter_dir) / ADAPTER_META_SHA256, digest + "\n")
    return digest


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """The :data:`ADAPTER_META` of an adapter directory, checked: the metadata file's bytes against the sha256
    in :data:`ADAPTER_META_SHA256` (so an edited ``logit_shift`` or mask token cannot rebuild another model
    silently), each of peft's files (``adapter_config.json``, ``adapter_model.safetensors``: exactly these,
    by fixed name in the directory, never a path the metadata gives) against its recorded size and sha256, and
    the fields rebuilding the base needs (``mask_token_id``, a whole number; ``logit_shift``, a boolean;
    ``mask_token``, a string when present). Anything else raises ``ValueError`` naming the file (and the
    field)."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_META
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_META} in {adapter_dir}: not an adapter written by save_adapter")
    fix = "reinstall the adapter, or re-export it (experiments/adapt_ar_to_diffusion.py --export)"
    raw = path.read_bytes()
    seal = adapter_dir / ADAPTER_META_SHA256
    if not seal.is_file():
        raise ValueError(f"{adapter_dir} has no {ADAPTER_META_SHA256} (the sha256 of {ADAPTER_META}): written "
                         f"before the metadata was hashed, or incomplete; {fix} (or, for metadata you trust, "
                         "dllm_sparse.models.adapt.seal_adapter_meta(dir))")
    if hashlib.sha256(raw).hexdigest() != seal.read_text().strip():
        raise ValueError(f"{path} does not match the sha256 in {seal.name}: the metadata (how the base is rebuilt: "
                         f"logit_shift, the mask token, the files' hashes) was edited or is corrupt; {fix}")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter's metadata is damaged: {fix}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}, not the metadata object save_adapter writes: {fix}")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(_ADAPTER_FILES):
        listed = sorted(files) if isinstance(files, dict) else files
        raise ValueError(f"{path} lists the files {listed}, but an adapter is exactly {list(_ADAPTER_FILES)}, "
                         f"each checked by its sha256; {fix}")
    for fname in _ADAPTER_FILES:
        rec, file = files[fname], adapter_dir / fname
        if not file.is_file():
            raise ValueError(f"{file} is missing: {fix}")
        data = file.read_bytes()
        if not isinstance(rec, dict) or len(data) != rec.get("bytes") or \
                hashlib.sha256(data).hexdigest() != rec.get("sha256"):
            raise ValueError(f"{file} does not match the size and sha256 in {ADAPTER_META}: the adapter is "
                             f"corrupt or was edited; {fix}")
    for name, (what, ok, required) in _REBUILD_META.items():
        if (name in meta or required) and (name not in meta or not ok(meta[name])):
            found = "has no" if name not in meta else f"has {meta[name]!r:.40} as"
            raise ValueError(f"{path} {found} {name!r}, {what}, which rebuilding the base needs; {fix} (or, for "
                             f"metadata you trust, write the right \"{name}\" into it and re-seal it with "
                             "dllm_sparse.models.adapt.seal_adapter_meta(dir))")
    return meta


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


#: Fields of :data:`ADAPTER_META` that rebuilding the adapter's base reads: (what it is, check, required).
_REBUILD_META = {
    "mask_token_id": ("the id of the mask token the adapter was trained with (a whole number >= 0)", _whole, True),
    "logit_shift": ("whether the converted base shifts its logits Dream-style (true or false)",
                    lambda v: isinstance(v, bool), True),
    "mask_token": (f"the mask token's text (default {MASK_TOKEN!r} when absent)",
                   lambda v: isinstance(v, str) and v != "", False),
}


def load_adapted_model(base: nn.Module, adapter_dir: str | Path, tokenizer=None) -> LLaDAModelLM:
    """Causal LM ``base`` + adapter directory -> the merged float32 :class:`LLaDAModelLM` (plain Linear layers).

    Converts ``base`` as the adapter's metadata says, adds the mask token (to ``tokenizer`` too), then applies the
    adapter with ``PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()``. ``base`` is consumed: the
    converted model shares its weight tensors (no copy of an 8B model), so the merge changes them too.
    """
    from peft import PeftModel

    meta = read_adapter_meta(adapter_dir)  # checks that mask_token_id and logit_shift are there
    model = convert_causal_lm(base, logit_shift=meta["logit_shift"])
    mask_id = add_mask_token(model, tokenizer, meta.get("mask_token", MASK_TOKEN))
    if mask_id != meta["mask_token_id"]:
        raise ValueError(f"adapter was trained with mask id {meta['mask_token_id']}, the base gives {mask_id}: "
                         "wrong base model for this adapter")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def adapter_hash(adapter_dir: str | Path) -> str:
    """Short content hash of an adapter directory (names the merged-model cache)."""
    h = hashlib.sha256()
    for fname in (*_ADAPTER_FILES, ADAPTER_META):
        h.update((Path(adapter_dir) / fname).read_bytes())
    return h.hexdigest()[:12]
