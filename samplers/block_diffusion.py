"""Generation for DiffusionGemma (uniform-noise block diffusion) through the model's own ``generate``, with steps.

transformers' ``DiffusionGemmaForBlockDiffusion.generate`` is the released sampler (random canvas, entropy-bound
acceptance, renoising, temperature schedule, adaptive stopping, self-conditioning). It is run as it is; forward
hooks on its encoder and decoder turn every forward into a step of the project's step protocol
(:class:`~dllm_sparse.steps.StepState`), so :class:`StepSparsity`, :class:`MaskOverlapTracker` and any other
callback work unchanged:

* every **decoder** forward (one denoising step of the current canvas) is a step tagged by its index
  (0, 1, ... across canvases); groups ``masked`` = positions holding noise at the forward input (every position at
  a canvas's first step, then those the previous step did not accept), ``decoded`` = those it accepted;
* every **encoder** forward (the prompt's prefill, then each finished canvas written into the KV cache) is a step
  tagged ``"prefill"`` with the group ``prompt`` (its real tokens); its ``block`` is the canvas that follows.

The encoder runs through the decoder's FFN modules (:func:`~dllm_sparse.models.diffusion_gemma.share_encoder_ffns`),
so both are sparsified and told apart by tag. Settings: ``max_new_tokens`` (rounded up to whole canvases of the
model's ``canvas_length``), ``steps`` (the most denoising steps of the generation, split evenly over the canvases;
default: the model's ``max_denoising_steps`` per canvas), ``seed`` (seeds the sampler's random canvas and draws),
``stop_token_ids`` / ``stop_strings``. The released sampler has its own temperature schedule, canvas length and no
mask token, so ``temperature``, a ``block_length`` other than the canvas length or ``gen_length``, and the masked
sampler's settings (``cfg_scale``, ``remasking``, ``mask_id``, ``confidence``, ``block_cache``) are refused.
A callback asking to stop is refused too (the released loop has no way to stop between steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from dllm_sparse.models.diffusion_gemma import share_encoder_ffns
from dllm_sparse.models.loading import model_device
from dllm_sparse.models.wrappers import unwrap_model
from dllm_sparse.steps import CallbackList, Geometry, StepState

from .common import Timer, cut_output, encode_prompts, resolve_stop_ids
from .config import GenerationConfig, GenerationResult

__all__ = ["BlockDiffusionGenerator"]

_ALLOWED = {"steps", "block_length"}


class BlockDiffusionGenerator:
    """``generate`` for a DiffusionGemma model, with the step protocol (see the module docstring)."""

    kind = "diffusion"

    def __init__(self, model: Any, tokenizer: Any = None):
        self.model, self.tokenizer = model, tokenizer
        self.inner = share_encoder_ffns(unwrap_model(model))
        if any(p.device.type == "meta" for p in self.inner.parameters()):
            # Measured: the offloaded model's generations differ from run to run with the same seed.
            raise ValueError("this DiffusionGemma model has offloaded weights (accelerate's cpu_offload, or a "
                             "device_map with cpu/disk entries); its decoder reads embed_tokens.weight for "
                             "self-conditioning outside that module's own forward, which the offload hooks do not "
                             "load, so its generations are not reproducible. Load it without offloading "
                             "(device='cpu' / 'cuda', or a device_map onto devices only)")

    def _plan(self, cfg: GenerationConfig) -> Geometry:
        canvas = int(self.inner.config.canvas_length)
        bad = {k: v for k, v in cfg.diffusion_settings().items()
               if k not in _ALLOWED and not (k == "logit_shift" and v is False)}  # it does not shift: False is true
        if bad or cfg.temperature != 0:
            bad.update({"temperature": cfg.temperature} if cfg.temperature != 0 else {})
            raise ValueError(f"DiffusionGemma generates with its released sampler (its own temperature schedule, no "
                             f"mask token), which has no counterpart of {bad}; leave them at their defaults")
        if cfg.block_length not in (None, canvas, cfg.gen_length):
            raise ValueError(f"block_length={cfg.block_length}: DiffusionGemma's block is its canvas of "
                             f"{canvas} tokens (config.canvas_length); leave block_length unset or give {canvas}")
        blocks = math.ceil(cfg.gen_length / canvas)
        default = getattr(self.inner.generation_config, "max_denoising_steps", None) or 48
        steps = cfg.steps if cfg.steps is not None else blocks * default
        if steps % blocks:
            raise ValueError(f"steps={steps} must be a multiple of the {blocks} canvases of this generation")
        return Geometry(gen_length=blocks * canvas, block_length=canvas, num_blocks=blocks, steps=steps,
                        steps_per_block=steps // blocks)

    @torch.no_grad()
    def generate(self, prompts: Any, config: GenerationConfig | None = None, *,
                 attention_mask: torch.Tensor | None = None, callbacks: Iterable[Any] = (),
                 apply_chat_template: bool = False, **overrides) -> GenerationResult:
        cfg = config if config is not None else GenerationConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        geo = self._plan(cfg)
        tok = self.tokenizer
        pad = cfg.pad_id if cfg.pad_id is not None else getattr(tok, "pad_token_id", None) or 0
        ids, attn = encode_prompts(prompts, tok, pad, attention_mask, apply_chat_template)
        device = model_device(self.inner)
        ids, attn = ids.to(device), attn.to(device)
        B, P = ids.shape
        stop_ids = resolve_stop_ids(cfg, self.inner, tok)
        state = StepState(kind="diffusion", model=self.model, config=cfg, batch_size=B, prompt_length=P,
                          num_steps=geo.steps, geometry=geo, forward_batch=B)
        watch = _StepWatch(state, CallbackList(callbacks, model=self.model), geo)
        watch.prompt_attn = attn.bool()
        timer = Timer(device)
        encoder, decoder = self.inner.model.encoder, self.inner.model.decoder
        handles = [encoder.register_forward_pre_hook(watch.encoder_begin, with_kwargs=True),
                   decoder.register_forward_pre_hook(watch.decoder_begin, with_kwargs=True)]
        real_sampler = self.inner._prepare_sampler
        self.inner._prepare_sampler = lambda gc: watch.keep_sampler(real_sampler(gc))  # its acceptance masks
        seeds = [cfg.seed] if isinstance(cfg.seed, int) else list(cfg.seed or [])
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seeds:
                    torch.manual_seed(seeds[0])
                watch.callbacks.generation_begin(state)
                out = self.inner.generate(
                    ids, attention_mask=attn, max_new_tokens=geo.gen_length,
                    max_denoising_steps=geo.steps_per_block, eos_token_id=list(stop_ids) or None,
                    pad_token_id=pad, return_dict_in_generate=True)
                watch.close_step()
        finally:
            del self.inner._prepare_sampler
            for h in handles:
                h.remove()
            watch.callbacks.generation_end(state)
        sequences = out.sequences.cpu()
        text_fn = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None
        rows, texts, reasons = [], [], []
        for r in range(B):
            row, text, hit = cut_output(sequences[r, P:].tolist()[:cfg.gen_length], stop_ids, text_fn,
                                        cfg.stop_strings)
            rows.append(row)
            texts.append(text)
            reasons.append("stop" if hit else "length")
        return GenerationResult(sequences=sequences, prompt_length=P, ids=rows, texts=texts, nfe=watch.nfe,
                                wall_time=timer.elapsed(), num_tokens=sum(len(r) for r in rows), finish_reasons=reasons,
                                kind="diffusion", config=cfg)


class _StepWatch:
    """The forward hooks: a step begins at each encoder / decoder forward and ends when the next one begins (by
    then the sampler has accepted this step's tokens) or when generation returns."""

    def __init__(self, state: StepState, callbacks: CallbackList, geo: Geometry):
        self.state, self.callbacks, self.geo = state, callbacks, geo
        self.sampler = None
        self.open = False
        self.nfe = self.step = 0
        self.block = -1
        self.step_in_block = 0
        self.prompt_attn: torch.Tensor | None = None  # [B, P] real prompt tokens

    def keep_sampler(self, sampler):
        self.sampler = sampler
        return sampler

    def close_step(self) -> None:
        if not self.open:
            return
        self.open = False
        s = self.state
        if s.tag != "prefill" and self.sampler is not None and self.sampler.accepted_token_mask is not None:
            s.committed = self.sampler.accepted_token_mask.clone()
        if self.callbacks.step_end(s):
            raise RuntimeError("a callback asked DiffusionGemma's generation to stop; the released sampler cannot "
                               "stop between steps (run fewer steps or tokens instead)")

    def encoder_begin(self, module, args, kwargs):
        self.close_step()
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.block += 1
        self.step_in_block = 0
        s = self.state
        s.tag, s.block, s.step_in_block = "prefill", self.block, 0
        s.canvas, s.committed, s.masked, s.rows = ids, None, None, None
        s.block_slice = slice(0, ids.shape[1])
        s.first_step_of_block = s.last_step_of_block = False
        real = self.prompt_attn if self.block == 0 else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        s.attention_mask = s.prompt_mask = real
        s.groups = {"prompt": real}
        self.open = True
        self.callbacks.step_begin(s)

    def decoder_begin(self, module, args, kwargs):
        self.close_step()
        canvas = kwargs.get("decoder_input_ids", args[0] if args else None)
        first = self.step_in_block == 0
        if first:
            noisy = torch.ones(canvas.shape, dtype=torch.bool, device=canvas.device)
        else:
            noisy = ~self.sampler.accepted_token_mask
        s = self.state
        s.step, s.tag, s.block, s.step_in_block = self.step, self.step, self.block, self.step_in_block
        s.canvas, s.masked, s.committed, s.rows = canvas, noisy, None, None
        s.block_slice = slice(0, canvas.shape[1])
        s.first_step_of_block = first
        s.last_step_of_block = self.step_in_block == self.geo.steps_per_block - 1
        s.attention_mask = torch.ones(canvas.shape, dtype=torch.bool, device=canvas.device)
        s.prompt_mask = torch.zeros_like(s.attention_mask)
        s.groups = {"masked": noisy, "decoded": ~noisy}
        self.step += 1
        self.step_in_block += 1
        self.nfe += 1
        s.nfe = self.nfe
        self.open = True
        self.callbacks.step_begin(s)
