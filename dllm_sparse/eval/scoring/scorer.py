"""Likelihood scorers: exact autoregressive log-likelihood and the masked-diffusion Monte-Carlo ELBO.

The contract is ``docs/generation.md`` (section "Likelihood")::

    scorer = Scorer.from_loaded(load_model("smollm2-135m"), batch_size=16)
    scorer.loglikelihood([("The capital of France is", " Paris")])          # [(ll, is_greedy)]
    with scorer.sparsified(SparsityConfig("input", TopP(0.9))) as stats:    # every forward pass of every
        scorer.loglikelihood([("The capital of France is", " Paris")])      # call inside is sparsified
    stats.mean("input")                                                     # measured sparsity of those passes

The pieces live beside this module: :mod:`~dllm_sparse.eval.scoring.autoregressive` (exact AR),
:mod:`~dllm_sparse.eval.scoring.elbo` (the ELBO), :mod:`~dllm_sparse.eval.scoring.greedy` (the greedy check),
:mod:`~dllm_sparse.eval.scoring.masked_forward` (the guided forward pass they share) and
:mod:`~dllm_sparse.eval.scoring.defaults` (``mc_num`` / ``mc_batch`` / ``seed`` defaults).

* Autoregressive (``kind="ar"``): exact sum of log p(continuation | context); batched with left (default) or
  right padding, explicit position ids, and only the continuation's logits computed when the model supports
  ``logits_to_keep`` (looked up through a PeftModel or ``torch.compile`` wrapper); requests sharing a context
  (the choices of a multiple-choice item) share one forward pass of it, whose KV cache feeds each continuation
  (``share_context``, per-token rules only). ``is_greedy``: the continuation is the argmax at every position.
* Masked diffusion (``kind="diffusion"``): for each of ``mc_num / mc_batch`` iterations draw k uniformly from
  {1..L}; row j of the mini-batch masks ((k + j·L/b − 1) mod L) + 1 answer positions (rounded as in LLaDA's
  reference code) chosen by a random permutation; the prompt is never masked; the loss of a row is the sum of
  cross-entropies over its masked positions × L / (#masked); log-likelihood = −(mean over rows, then over
  iterations). The masks of an item come from a private generator seeded by (seed, item key), so the dense
  model and every sparse configuration see exactly the same masks (common random numbers): a difference
  between two configurations is never sampling noise.

Performance details that do not change any result:

* identical masked rows of one item (an answer of L tokens has only 2^L − 1 distinct masks, so short answers
  repeat them constantly) are computed once and weighted by their multiplicity (``dedupe=True``), in the
  log-likelihood and in the sparsity statistics alike (each row counts as often as it was drawn);
* rows of different items with the same total length are packed into one forward pass (no padding, so any
  bidirectional model works without an attention mask), at most ``batch_size`` rows per pass.
* the LM head projects the masked positions only (the scored ones), where the family profile names a head that
  can be split off the forward (:func:`~dllm_sparse.models.families.without_lm_head`; also through a PeftModel);
  other models run their full forward.

Guided ELBO (``cfg_scale`` w > 0, the official ``get_log_likelihood``): every masked row is also run with each
prompt position replaced by the mask id, in the same forward pass, and logits = uncond + (w + 1)(cond − uncond)
before the cross-entropy. The masks are the unguided estimate's (common random numbers); w = 0 is the plain ELBO.

Precision (``precision``): ``"float32"`` (the default) takes the model's logits to float32 before the guidance and
the cross-entropy, and sums the losses in float64. ``"official"`` reproduces the official evaluation bit for bit
(as ``GenerationConfig(confidence="official")`` does for the sampler): the guidance and the cross-entropy run in
the model's dtype (bf16 for LLaDA-8B), each loss is divided by its row's masked fraction in float32 and summed per
mini-batch in float32 (one ``.item()`` per mini-batch, averaged over the mini-batches), and the official layout is
used: one forward pass per item and mini-batch (the ``mc_batch`` rows of one item, every drawn row: no
de-duplication, ``batch_size`` and ``dedupe`` are not used), the LM head over every position (never split off),
and the iterative greedy check one item per forward pass with the softmax of its confidence in float32. In float32
models the two differ by float rounding only; in bf16 the guided ELBO differs between them and, occasionally, a
greedy check's verdict. Ties of the greedy check's confidence: the lowest
position in both (the official ``torch.sort`` is not stable, so its order among exact ties is its kernel's).

``is_greedy`` for diffusion (``greedy_check``):

* ``"iterative"`` (the official LLaDA check, :func:`iterative_greedy_check`): from prompt + fully masked answer,
  unmask one position per forward pass (the most confident masked one, T = 0, the whole answer as one block);
  greedy iff every answer token is reproduced. L extra forward passes per item.
* ``"one_pass"``: one extra row per item masks the whole answer; greedy when the one-shot argmax of every answer
  position equals it. A weaker, different definition (it accepts far fewer targets), kept by name.
* ``"off"`` (the scorer's default, no extra cost): always ``False``.

Sparsification applies to every forward pass of a scorer (each Monte-Carlo forward is a separate call, so
masks are computed afresh for each, like every denoising step of a sampler). Statistics are tagged ``"ar"``
or ``"elbo"`` with token groups ``context``/``continuation`` (AR) and ``prompt``/``answer``/``masked``
(diffusion), plus optional mask-ratio bins ``ratio_bins`` (diffusion rows grouped by their fraction of
masked answer tokens: the likelihood-side stand-in for "denoising step").
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from dllm_sparse.eval.scoring.autoregressive import ar_loglikelihood_tokens
from dllm_sparse.eval.scoring.common import as_configs, check_head_chunk, content_key, item_generator
from dllm_sparse.eval.scoring.defaults import MC_BATCH, MC_NUM, SEED
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens, elbo_masks
from dllm_sparse.eval.scoring.masked_forward import check_cfg_scale, check_precision, greedy_check_mode
from dllm_sparse.models.families import family_named
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.hooks import sparsify
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["Scorer", "rolling_windows"]

# ---------------------------------------------------------------------------------------------------------
# Rolling (whole-text) windows
# ---------------------------------------------------------------------------------------------------------


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Split a text into (context, continuation) requests predicting every token exactly once.

    Each window predicts up to ``max_length`` new tokens, conditioned on as many preceding tokens as fit in an
    input of ``max_length`` (the first window is conditioned on ``prefix_id`` alone)."""
    full = [prefix_id] + list(tokens)
    out = []
    for s in range(0, len(tokens), max_length):
        e = min(s + max_length, len(tokens))
        a = max(0, e - max_length)
        out.append((full[a:1 + s], full[1 + s:1 + e]))
    return out


# ---------------------------------------------------------------------------------------------------------
# The scorer: tokenisation, sparsity, dispatch by model kind
# ---------------------------------------------------------------------------------------------------------


class Scorer:
    """Score text with an AR or masked-diffusion model, optionally sparsified (see the module docstring).

    Sparsity is a context: every scoring call inside ``with scorer.sparsified(config) as stats:`` is sparsified
    with ``config`` (None: dense; a :class:`SparsityConfig`; or a list of them on distinct sites, all attached
    at once: with identity rules this measures the natural sparsity of every site in one dense pass) and
    measured into ``stats``. Outside every block the constructor's ``sparsity`` holds (default: dense), measured
    into ``stats`` (created on first use when a call is sparsified). Tokenisation follows
    lm-evaluation-harness: trailing spaces of the context move to the continuation, the pair is encoded whole
    and split, and an empty context becomes the prefix token (BOS, else EOS). ``family`` names a family profile
    (:mod:`dllm_sparse.models.families`, as in ``LoadedModel.family``); a diffusion scorer takes its
    ``mask_id`` (when neither the argument, the model config nor the tokenizer gives one) and its
    ``logit_shift`` (the ``shift_logits`` default) from it. Diffusion only: ``cfg_scale`` (guided ELBO, the default
    of every call; each verb takes ``cfg_scale=`` for that call alone) and ``greedy_check`` (``"iterative"``,
    ``"one_pass"`` or ``"off"``; ``True`` = ``"iterative"``) and ``precision`` (``"float32"`` or ``"official"``,
    the official computation bit for bit), see the module docstring, and ``head_chunk`` (the LM head on that many
    scored rows at a time, :func:`diffusion_elbo_tokens` and, for an AR scorer, :func:`ar_loglikelihood_tokens`;
    part of the identity when set). AR only:
    ``share_context`` (default True) scores the requests sharing a context (multiple-choice items) from one
    forward pass of it when every rule of the call acts per token (``scope="token"``; other scopes and
    ``share_context=False`` take one pass per request; see :func:`ar_loglikelihood_tokens`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        kind: str = "ar",
        mask_id: int | None = None,
        *,
        name: str = "",
        family: str = "",
        batch_size: int = 16,
        mc_num: int = MC_NUM,
        mc_batch: int = MC_BATCH,
        seed: int = SEED,
        shift_logits: bool | None = None,
        padding_side: str = "left",
        add_bos_token: bool = False,
        max_length: int | None = None,
        greedy_check: bool | str = "off",
        cfg_scale: float = 0.0,
        dedupe: bool = True,
        ratio_bins: int = 0,
        sparsity: SparsityConfig | Sequence[SparsityConfig] | None = None,
        stats: SparsityStats | None = None,
        progress: bool = False,
        precision: str = "float32",
        share_context: bool = True,
        head_chunk: int | None = None,
    ):
        if kind not in ("ar", "diffusion"):
            raise ValueError(f"kind must be 'ar' or 'diffusion', got {kind!r}")
        uniform = getattr(family_named(family), "noise", "mask") == "uniform"  # DiffusionGemma: no mask token
        if kind == "diffusion" and mask_id is None and not uniform:
            from dllm_sparse.samplers.diffusion import resolve_mask_id  # the samplers' order: config, tokenizer, family

            try:
                mask_id = resolve_mask_id(model, tokenizer, None, family)
            except ValueError:
                raise ValueError("a diffusion scorer needs mask_id: the model config and the tokenizer name no "
                                 f"mask_token_id and the family {family!r} has no profile mask_id; pass "
                                 "mask_id=...") from None
        self.model, self.tokenizer, self.kind, self.mask_id = model, tokenizer, kind, mask_id
        self.name, self.family = name or type(model).__name__, family
        self.batch_size, self.mc_num, self.mc_batch, self.seed = int(batch_size), int(mc_num), int(mc_batch), seed
        if self.mc_num % self.mc_batch:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of mc_batch ({mc_batch})")
        # Dream shifts outside the model (its profile's logit_shift); a native LLaDAModelLM with
        # config.logit_shift shifts inside its forward.
        shifts_itself = bool(getattr(getattr(model, "config", None), "logit_shift", False))
        if shift_logits and shifts_itself:
            raise ValueError("this model already shifts its logits (config.logit_shift=True); shifting again would "
                             "misalign every prediction. Leave shift_logits at None/False.")
        profile = family_named(family)
        family_shift = profile is not None and profile.logit_shift
        self.shift_logits = (family_shift and not shifts_itself) if shift_logits is None else bool(shift_logits)
        self.padding_side, self.add_bos_token = padding_side, add_bos_token
        self.max_length = max_length or self._default_max_length()
        self.greedy_check = greedy_check_mode(greedy_check)
        self.cfg_scale = check_cfg_scale(cfg_scale)
        self.precision = check_precision(precision)
        if self.precision != "float32" and kind != "diffusion":
            raise ValueError(f"precision={precision!r} is a diffusion-ELBO setting; an autoregressive scorer "
                             "computes the exact log-likelihood (leave precision at 'float32')")
        self.dedupe, self.ratio_bins, self.progress = dedupe, ratio_bins, progress
        self.share_context = bool(share_context)
        self.head_chunk = check_head_chunk(head_chunk)
        if self.head_chunk is not None and self.precision == "official":
            raise ValueError(f"head_chunk={head_chunk} with precision='official': the official evaluation runs the "
                             "LM head over every position at once; leave head_chunk at None (or use precision "
                             "'float32')")
        self._sparsity = as_configs(sparsity)
        self.stats = stats
        self._block: tuple[list[SparsityConfig], SparsityStats | None] | None = None  # innermost sparsified()

    @classmethod
    def from_loaded(cls, lm, **kwargs) -> Scorer:
        """From a :class:`dllm_sparse.models.loading.LoadedModel`."""
        return cls(lm.model, lm.tokenizer, lm.kind, lm.mask_id, name=lm.name, family=lm.family, **kwargs)

    # ---- configuration -----------------------------------------------------------------------------------
    @property
    def sparsity(self) -> list[SparsityConfig]:
        """The sparsity in force: the innermost :meth:`sparsified` block's, else the constructor's."""
        return list(self._in_force()[0])

    @sparsity.setter
    def sparsity(self, value) -> None:
        """The sparsity outside every :meth:`sparsified` block (the constructor's ``sparsity``)."""
        self._sparsity = as_configs(value)

    def identity(self, cfg_scale: float | None = None) -> str:
        """Everything that changes the scores of a call made now (the sparsity in force) with ``cfg_scale``
        (default: the scorer's): model, kind, sparsity ids and the ELBO settings (guidance and the greedy check
        appear only when used, so the identities of unguided, unchecked runs are unchanged)."""
        sp = "+".join(s.id for s in self.sparsity) or DENSE
        est = "exact"
        if self.kind == "diffusion":
            w = self.cfg_scale if cfg_scale is None else check_cfg_scale(cfg_scale)
            est = f"mc{self.mc_num}/b{self.mc_batch}/seed{self.seed}/shift{int(self.shift_logits)}"
            est += f"/cfg{w!r}" if w > 0 else ""
            est += f"/greedy-{self.greedy_check}" if self.greedy_check != "off" else ""
            est += f"/precision-{self.precision}" if self.precision != "float32" else ""
        if self.kind == "ar" and not self.share_context:
            est += "/ctx-per-request"  # other float rounding than the shared context pass (the default)
        # Row-chunked head products may round differently on some BLAS (kernel choice depends on the row count).
        est += f"/head-chunk{self.head_chunk}" if self.head_chunk is not None else ""
        return f"{self.name}|{self.kind}|{sp}|{est}|bos{int(self.add_bos_token)}"

    @property
    def config_id(self) -> str:
        """:meth:`identity` of a call made now (the sparsity in force)."""
        return self.identity()

    def _default_max_length(self) -> int:
        cfg = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 1_000_000 else 2048

    @contextmanager
    def sparsified(self, sparsity, stats: SparsityStats | None = None) -> Iterator[SparsityStats | None]:
        """Every scoring call inside the block is sparsified with ``sparsity`` (None: dense; a
        :class:`SparsityConfig` or a list of them on distinct sites) and measured into ``stats`` (default: a fresh
        :class:`SparsityStats` when sparsified, None when dense), which the block yields. Blocks nest (the
        innermost wins); the hooks are attached by each call for its own forward passes (:meth:`attached`)."""
        configs = as_configs(sparsity)
        if configs and stats is None:
            stats = SparsityStats()
        outer, self._block = self._block, (configs, stats)
        try:
            yield stats
        finally:
            self._block = outer

    def _in_force(self) -> tuple[list[SparsityConfig], SparsityStats | None]:
        """(configs, statistics) of a call made now: the innermost :meth:`sparsified` block's, else the
        constructor's (its statistics created on first use)."""
        if self._block is not None:
            return self._block
        if self._sparsity and self.stats is None:
            self.stats = SparsityStats()
        return self._sparsity, self.stats

    @property
    def measured_into(self) -> SparsityStats | None:
        """Where a call made now measures its sparsity (None: dense, nothing measured)."""
        return self._in_force()[1]

    @contextmanager
    def attached(self) -> Iterator[SparsityStats | None]:
        """The sparsity in force attached to the model for the block (what every scoring call does around its
        forward passes; also for a caller's own forward passes); yields the statistics it records into."""
        configs, stats = self._in_force()
        with ExitStack() as stack:
            for cfg in configs:
                stack.enter_context(sparsify(self.model, cfg, stats=stats))
            yield stats

    # ---- tokenisation ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        # A chat-templated text may begin with the BOS token already (e.g. Llama 3's template): not a second one.
        if self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    @property
    def prefix_id(self) -> int:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                return int(v)
        raise ValueError("the tokenizer has no BOS/EOS/PAD token to stand for an empty context")

    @property
    def pad_id(self) -> int:
        v = getattr(self.tokenizer, "pad_token_id", None)
        if v is None:
            v = getattr(self.tokenizer, "eos_token_id", None)
        return int(v) if v is not None else 0

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            return ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring -----------------------------------------------------------------------------------------
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             keys: Sequence[Hashable] | None = None, *,
                             cfg_scale: float | None = None) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of token-id (context, continuation) requests, every forward pass
        sparsified with the sparsity in force (:meth:`sparsified`) and measured into its statistics.
        ``cfg_scale``: the guidance of this call (diffusion; default: the scorer's)."""
        cfg_scale = self.cfg_scale if cfg_scale is None else check_cfg_scale(cfg_scale)
        if cfg_scale > 0 and self.kind != "diffusion":
            raise ValueError(f"cfg_scale={cfg_scale} is a diffusion-ELBO setting; an autoregressive scorer computes "
                             "the exact log-likelihood (leave cfg_scale at 0)")
        # A shared context pass sparsifies its tokens as one pass per request does only when every rule acts
        # per token; an outside sparsify() block is not seen here (pass share_context=False for one of those).
        share = self.share_context and all(c.rule.scope == "token" for c in self.sparsity)
        with self.attached() as stats:
            if self.kind == "ar":
                return ar_loglikelihood_tokens(
                    self.model, requests, batch_size=self.batch_size, padding_side=self.padding_side,
                    pad_id=self.pad_id, max_length=self.max_length, stats=stats, progress=self.progress,
                    share_context=share, head_chunk=self.head_chunk)
            if self.mask_id is None:  # uniform-noise block diffusion (DiffusionGemma)
                return self._block_diffusion_tokens(requests, keys, cfg_scale, stats)
            return diffusion_elbo_tokens(
                self.model, requests, mask_id=self.mask_id, mc_num=self.mc_num, mc_batch=self.mc_batch,
                batch_size=max(self.batch_size, 1), seed=self.seed, keys=keys, shift_logits=self.shift_logits,
                dedupe=self.dedupe, cfg_scale=cfg_scale, greedy_check=self.greedy_check, stats=stats,
                ratio_bins=self.ratio_bins, progress=self.progress, precision=self.precision,
                head_chunk=self.head_chunk)

    def _block_diffusion_tokens(self, requests, keys, cfg_scale: float, stats) -> list[tuple[float, bool]]:
        """The block-diffusion score of a uniform-noise model (:mod:`.block_diffusion`), with the ELBO's draws."""
        from dllm_sparse.eval.scoring.block_diffusion import block_diffusion_loglikelihood

        unsupported = {k: v for k, v in (("cfg_scale", cfg_scale), ("greedy_check", self.greedy_check),
                                         ("precision", self.precision), ("head_chunk", self.head_chunk))
                       if v not in (0.0, "off", "float32", None)}
        if unsupported:
            raise ValueError(f"{unsupported}: settings of the masked-diffusion ELBO that the block-diffusion "
                             "score of this uniform-noise model does not have; leave them at their defaults")

        def draw(L: int, key: Hashable):  # the ELBO's draws (common random numbers)
            g = item_generator(self.seed, key)
            return elbo_masks(L, self.mc_num, self.mc_batch, g), g

        keys = keys if keys is not None else [content_key(c, a) for c, a in requests]
        return block_diffusion_loglikelihood(self.model, requests, draw=draw, keys=keys, mc_batch=self.mc_batch,
                                             stats=stats, ratio_bins=self.ratio_bins)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], keys: Sequence[Hashable] | None = None, *,
                      cfg_scale: float | None = None) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood`` on text pairs; ``keys`` name the items (for the ELBO's masks);
        ``cfg_scale`` as in :meth:`loglikelihood_tokens`."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], keys, cfg_scale=cfg_scale)

    def loglikelihood_rolling(self, texts: Sequence[str], keys: Sequence[Hashable] | None = None, *,
                              cfg_scale: float | None = None) -> list[tuple[float, int]]:
        """``(log-likelihood of the whole text, number of tokens)`` per text (AR exact, diffusion ELBO).

        Texts longer than the model's context are split into windows (:func:`rolling_windows`). ``cfg_scale`` as in
        :meth:`loglikelihood_tokens`."""
        windows, owner, wkeys = [], [], []
        for t, text in enumerate(texts):
            tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
            for w, win in enumerate(rolling_windows(tokens, self.prefix_id, self.max_length)):
                windows.append(win)
                owner.append(t)
                wkeys.append((keys[t] if keys is not None else content_key(*win), w))
        scores = self.loglikelihood_tokens(windows, wkeys, cfg_scale=cfg_scale)
        out = [[0.0, 0] for _ in texts]
        for t, (ll, _), win in zip(owner, scores, windows, strict=True):
            out[t][0] += ll
            out[t][1] += len(win[1])
        return [(ll, n) for ll, n in out]
