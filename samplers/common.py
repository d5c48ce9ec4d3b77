"""Pieces both generators share: prompt encoding and left padding, callbacks, stop ids, seeds, output cutting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dllm_sparse.models.families import family_named

from .config import GenerationConfig

__all__ = [
    "encode_prompts",
    "left_pad",
    "resolve_pad_id",
    "resolve_stop_ids",
    "row_generators",
    "cut_output",
]

# Strings of end-of-sequence / end-of-turn tokens of common chat vocabularies (LLaMA-3 / LLaDA, ChatML
# (Qwen, SmolLM2), GPT-2 style, Gemma). Added to the stop ids when the tokenizer knows them.
_END_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>")


_PROMPT_FORMS = ("a string, a list of strings, a list of token-id lists (e.g. [[5, 17, 3]]), or an id tensor "
                 "[B, P]")


def _as_id_lists(prompts: Any, tokenizer: Any, apply_chat_template: bool) -> list[list[int]] | None:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        return None
    if not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, dict)):
        raise TypeError(f"prompts must be {_PROMPT_FORMS}; got {type(prompts).__name__} {prompts!r:.80}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass tokenizer=... or token ids")
        out = []
        for p in prompts:
            if apply_chat_template:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(p, add_special_tokens=True)["input_ids"]
            out.append([int(i) for i in ids])
        return out
    if all(isinstance(p, (list, tuple)) for p in prompts):
        return [[int(i) for i in p] for p in prompts]
    hint = " (one prompt of ids is a list inside a list: [[5, 17, 3]])" if all(
        isinstance(p, int) for p in prompts) else ""
    raise TypeError(f"prompts must be {_PROMPT_FORMS}; got a list of "
                    f"{', '.join(sorted({type(p).__name__ for p in prompts}))}{hint}")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: (input_ids [B, P], attention_mask [B, P])."""
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), int(pad_id), dtype=torch.long)
    am = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        am[i, P - len(r):] = 1
    return ids, am


def encode_prompts(
    prompts: Any,
    tokenizer: Any = None,
    pad_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    apply_chat_template: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (text, id lists or an id tensor) -> left-padded (input_ids, attention_mask) on the CPU."""
    rows = _as_id_lists(prompts, tokenizer, apply_chat_template)
    if rows is None:  # a tensor
        ids = prompts if prompts.dim() == 2 else prompts[None]
        ids = ids.long()
        if attention_mask is None:
            am = torch.ones_like(ids)
        else:
            am = attention_mask.reshape(ids.shape).long().to(ids.device)
            # Left padding only: once a row has started, every later position is real.
            if bool((am[:, 1:] < am[:, :-1]).any()):
                raise ValueError("attention_mask must describe left padding (zeros only before the first real "
                                 "token of each row); re-pad the batch on the left")
        if bool((am.sum(dim=1) == 0).any()):
            raise ValueError("empty prompt: every prompt needs at least one real token")
        return ids, am
    if pad_id is None:
        pad_id = 0
    return left_pad(rows, pad_id)


def check_ids_fit(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, total_length: int,
                  **special_ids: int | None) -> None:
    """Raise a clear error when a prompt id or a special id (``pad_id=``, ``mask_id=``) lies outside the model's
    vocabulary, or when prompt + generated tokens (``total_length``) outgrow the model's context.

    Both would otherwise fail deep inside the embedding (``index out of range in self``) or run silently past
    the positions the model was trained on."""
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        for name, value in special_ids.items():
            if value is not None and not 0 <= int(value) < vocab:
                raise ValueError(f"{name} {value} is outside the model's vocabulary (0..{vocab - 1}); pass "
                                 f"GenerationConfig({name}=...) with an id of this model")
        real = ids[attention_mask.bool()]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
            bad = real[(real < 0) | (real >= vocab)].unique().tolist()[:5]
            raise ValueError(f"prompt token ids {bad} are outside the model's vocabulary (0..{vocab - 1}); were the "
                             "prompts encoded with this model's tokenizer?")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and total_length > context:
        raise ValueError(f"prompt ({ids.shape[-1]} tokens, padded) + generated tokens = {total_length} positions, "
                         f"more than the model's context of {context}; shorten the prompt or generate fewer tokens")


def resolve_pad_id(config: GenerationConfig, model: Any, tokenizer: Any, eos_ids: Sequence[int] = ()) -> int:
    if config.pad_id is not None:
        return int(config.pad_id)
    for source in (tokenizer, getattr(model, "config", None)):
        pid = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pid, int):
            return pid
    if eos_ids:
        return int(eos_ids[0])
    return 0


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def resolve_stop_ids(config: GenerationConfig, model: Any, tokenizer: Any, family: str = "") -> tuple[int, ...]:
    """``config.stop_token_ids`` or, when None, the end-of-sequence / end-of-turn ids of model and tokenizer,
    plus the ``end_ids`` of the family profile named ``family`` that fit in the vocabulary."""
    if config.stop_token_ids is not None:
        return tuple(config.stop_token_ids)
    ids: list[int] = []
    mcfg = getattr(model, "config", None)
    ids += _ids(getattr(mcfg, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None)
    ids += _ids(getattr(gen_cfg, "eos_token_id", None))
    if tokenizer is not None:
        ids += _ids(getattr(tokenizer, "eos_token_id", None))
        try:
            vocab = tokenizer.get_vocab()
        except Exception:  # noqa: BLE001 - some tokenizers have no vocab dict
            vocab = {}
        ids += [vocab[t] for t in _END_TOKENS if t in vocab]
    profile = family_named(family)
    if profile is not None and profile.end_ids:
        n_vocab = getattr(mcfg, "vocab_size", 0) or 0
        ids += [i for i in profile.end_ids if i < n_vocab]
    return tuple(dict.fromkeys(ids))


def row_seeds(config: GenerationConfig, batch: int) -> list[int]:
    seed = config.seed
    if seed is None:
        base = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: torch.manual_seed governs it
        return [base + r for r in range(batch)]
    if isinstance(seed, int):
        return [seed + r for r in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries for a batch of {batch} prompts; give one per row or an int")
    return seeds


def row_generators(config: GenerationConfig, batch: int, device: torch.device) -> list[torch.Generator]:
    """One ``torch.Generator`` per row (seeded ``seed + r``), on the model's device."""
    gens = []
    for s in row_seeds(config, batch):
        g = torch.Generator(device=device)
        g.manual_seed(s)
        gens.append(g)
    return gens


def cut_output(ids: list[int], stop_ids: Iterable[int], text_fn: Callable[[list[int]], str] | None,
               stop_strings: Sequence[str]) -> tuple[list[int], str, bool]:
    """Cut ``ids`` before the first stop id; decode; cut the text before the first stop string.
    Returns (ids, text, stopped)."""
    stop = set(stop_ids)
    stopped = False
    for i, t in enumerate(ids):
        if t in stop:
            ids, stopped = ids[:i], True
            break
    text = text_fn(ids) if text_fn is not None else ""
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    if cut >= 0:
        text, stopped = text[:cut], True
    return ids, text, stopped


class Timer:
    """Wall clock that waits for the device before reading (CUDA kernels are asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def elapsed(self) -> float:
        return self._now() - self.t0
