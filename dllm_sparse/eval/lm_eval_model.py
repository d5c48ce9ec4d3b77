"""lm-evaluation-harness model ``dllm_sparse``: an AR or masked-diffusion model plus one sparsity configuration.

Python API (the supported path; lm-eval >= 0.4.9, tested with 0.4.13)::

    import lm_eval
    from dllm_sparse.eval.lm_eval_model import DllmSparseLM
    lm = DllmSparseLM(pretrained="smollm2-135m", sparsity="input:top_p:0.9")   # or a SparsityConfig
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    lm.stats.mean("input")                       # measured sparsity of every forward pass of the run

Command line: lm-eval 0.4.13 finds models only in its registry, which an outside package fills by being
imported (there is no entry-point discovery, and ``--include_path`` is for tasks). Importing this module
registers ``dllm_sparse``; its ``__main__`` does that and then runs lm-eval's own CLI, so every lm-eval flag
works unchanged::

    python -m dllm_sparse.eval.lm_eval_model run --model dllm_sparse \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,sparsity=input:top_p:0.9,dtype=bf16,device=auto,mc_num=128 \\
        --tasks arc_easy --batch_size 16

Model arguments: ``pretrained`` (hub id, local dir, .gguf or embedded name), ``kind`` (ar/diffusion, detected),
``dtype``, ``device`` (``auto`` = accelerate placement), ``sparsity`` (a
:class:`~dllm_sparse.sparsity.config.SparsityConfig` id ``site:rule:threshold[:scope][:layers=i/j]``, e.g.
``input:top_p:0.9``; ``dense``/none = dense), or the same in pieces: ``site``, ``rule`` (top_p, top_k, max_p),
``threshold`` (alias ``p``; p for top-p / max-p, the target sparsity for top-k), ``scope``; ``batch_size``,
``mc_num``, ``mc_batch``, ``seed``, ``shift_logits`` (Dream-style; default by family), ``greedy_check``
(``iterative``/true, ``one_pass``, ``off``/false), ``cfg`` (alias ``cfg_scale``: guided ELBO w, as the official
LLaDA evaluation's ``cfg``), ``preset`` (``llada-official``: the official per-task cfg, mc_num 128, mc_batch 8,
greedy check off, generation 1024/1024/1024; see :mod:`dllm_sparse.eval.presets`; explicit arguments win),
``max_gen_toks``, ``gen_steps``, ``block_length``, ``trust_remote_code``, ``add_bos_token``.

Semantics:

* ``loglikelihood`` returns ``(ll, is_greedy)``. AR: exact. Diffusion: the Monte-Carlo ELBO of
  ``dllm_sparse.eval.likelihood`` with masks drawn per request from (seed, task, doc_id, request index), so
  dense and sparse runs use identical masks; with ``cfg`` > 0 the guided ELBO on the same masks. ``is_greedy``
  for diffusion: ``greedy_check=iterative`` (default here; ``True``) is the official check (unmask one answer
  position per forward pass, the most confident one; greedy iff the answer is reproduced, L extra passes per
  request); ``one_pass`` checks the one-shot argmax of the fully masked answer (a weaker definition); ``off``
  (``False``) always answers False.
* ``loglikelihood_rolling``: AR exact (windows of the model's context length); diffusion: the ELBO of the
  whole text given the prefix token (BOS, else EOS).
* ``generate_until``: through ``dllm_sparse.samplers.generate`` (LLaDA sampler or AR loop), sparsified with
  per-step statistics.

Response cache: lm-eval's ``--use_cache PATH`` keys responses by the request alone, not by the model, so a
sparse run reading a dense run's cache would silently return dense answers. This class therefore writes its
identity (:attr:`identity`, a :class:`~dllm_sparse.eval.identity.RunIdentity`: model name and weights hash, kind,
parameter dtype, device type, sparsity, batch size, ELBO settings, ``greedy_check``, ``max_gen_toks``,
``gen_steps``, ``block_length``, ``max_length``) into the cache database and refuses, with a message naming each
field that differs, a database made by any other configuration (or by an older version, whose identity left
fields out). Use one cache path per configuration, e.g. ``--use_cache cache/{lm.cache_slug}``.

Unknown model arguments (a typo such as ``sitee=input``) are refused with the list of valid ones: a misspelt
sparsity argument would otherwise give a dense run.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dllm_sparse.eval.lm_eval_model needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install lm-eval)"
    ) from e

import logging

from tqdm.auto import tqdm

from dllm_sparse.eval.identity import RunIdentity, run_identity, weights_hash
from dllm_sparse.eval.likelihood import SCORER_DEFAULT, Scorer, greedy_check_mode
from dllm_sparse.eval.presets import get_preset
from dllm_sparse.sparsity.config import DENSE, SparsityConfig, slug
from dllm_sparse.sparsity.rules import make_rule
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["DllmSparseLM", "IDENTITY_KEY", "MODEL_ARGS", "sparsity_from_args"]

eval_logger = logging.getLogger("lm_eval")

IDENTITY_KEY = "__dllm_sparse_identity__"  # lm-eval's own keys are sha256 hex digests, so no collision


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


_NO_SPARSITY = (None, "", "none", DENSE)


def sparsity_from_args(sparsity: SparsityConfig | str | None = None, site: str | None = None,
                       rule: str = "top_p", threshold: float | None = None, p: float | None = None,
                       scope: str = "token") -> SparsityConfig | None:
    """The model's one :class:`SparsityConfig` from its model arguments: ``sparsity=input:top_p:0.9`` (or a
    config object), or the pieces ``site``, ``rule``, ``threshold`` (alias ``p``; default 1.0) and ``scope``.
    None means dense."""
    if isinstance(sparsity, str) and sparsity.strip().lower() in _NO_SPARSITY:
        sparsity = None
    if p is not None and threshold is not None and float(p) != float(threshold):
        raise ValueError(f"threshold={threshold} and p={p} disagree: give one of them (p is an alias of threshold)")
    threshold = threshold if threshold is not None else p
    if isinstance(site, str) and site.strip().lower() in _NO_SPARSITY:
        site = None
    if sparsity is not None:
        if site is not None or threshold is not None:
            raise ValueError(f"give either sparsity={sparsity!r} or site/rule/threshold, not both "
                             f"(got site={site!r}, threshold={threshold!r})")
        return SparsityConfig.parse(sparsity)
    if site is None:
        if threshold is not None:  # without a site the threshold would be dropped and the run silently dense
            raise ValueError(f"threshold={threshold} is given without a site, so it would be ignored and the run "
                             "dense: give site=... too (e.g. site=input,threshold=0.9), or "
                             "sparsity=input:top_p:0.9")
        return None
    return SparsityConfig(site, make_rule(rule, 1.0 if threshold is None else float(threshold), scope=scope))


#: The model arguments DllmSparseLM accepts (``--model_args k=v,...``); anything else is refused.
MODEL_ARGS = ("pretrained", "sparsity", "site", "rule", "threshold", "p", "scope", "kind", "dtype", "device",
              "batch_size", "mc_num", "mc_batch", "seed", "shift_logits", "greedy_check", "max_gen_toks",
              "gen_steps", "block_length", "trust_remote_code", "add_bos_token", "cfg", "cfg_scale", "preset")


@register_model("dllm_sparse", "dllm-sparse")
class DllmSparseLM(LM):
    """lm-eval model wrapping a :class:`dllm_sparse.eval.likelihood.Scorer` (see the module docstring)."""

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        sparsity: SparsityConfig | str | None = None,
        site: str | None = None,
        rule: str = "top_p",
        threshold: float | None = None,
        p: float | None = None,
        scope: str = "token",
        kind: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 16,
        mc_num: int | None = None,
        mc_batch: int | None = None,
        seed: int = 1234,
        shift_logits: bool | None = None,
        greedy_check: bool | str | None = None,
        cfg: float | None = None,
        cfg_scale: float | None = None,
        preset: str | None = None,
        max_gen_toks: int | None = None,
        gen_steps: int | None = None,
        block_length: int | None = None,
        trust_remote_code: bool = False,
        add_bos_token: bool = False,
        scorer: Scorer | None = None,
        stats: SparsityStats | None = None,
        **unknown: Any,
    ):
        super().__init__()
        unknown.pop("max_batch_size", None)  # lm-eval passes it to every model; this one sizes its own batches
        if unknown:
            raise TypeError(
                f"DllmSparseLM: unknown model argument(s) {sorted(unknown)}; valid ones: {', '.join(MODEL_ARGS)}. "
                "(A misspelt sparsity argument would silently give a dense run.)")
        if cfg is not None and cfg_scale is not None and float(cfg) != float(cfg_scale):
            raise ValueError(f"cfg={cfg} and cfg_scale={cfg_scale} disagree: give one of them (cfg is the official "
                             "evaluation's name, cfg_scale an alias)")
        cfg = cfg if cfg is not None else cfg_scale
        self.preset = None if preset in (None, "", "none") else get_preset(preset)
        if self.preset is not None:
            if cfg is not None:
                raise ValueError(f"preset={self.preset.name} sets the guidance per task; drop cfg={cfg} (or the "
                                 "preset)")
            mc_num = self.preset.mc_num if mc_num is None else mc_num
            mc_batch = self.preset.mc_batch if mc_batch is None else mc_batch
            greedy_check = self.preset.greedy_check if greedy_check is None else greedy_check
            max_gen_toks = self.preset.gen_length if max_gen_toks is None else max_gen_toks
            gen_steps = self.preset.steps if gen_steps is None else gen_steps
            block_length = self.preset.block_length if block_length is None else block_length
        mc_num = 128 if mc_num is None else mc_num
        mc_batch = 16 if mc_batch is None else mc_batch
        greedy_check = "iterative" if greedy_check is None else greedy_check
        max_gen_toks = 256 if max_gen_toks is None else max_gen_toks
        # What this model's calls pass to the scorer: its own defaults unless from_scorer is given others.
        self._sparsity, self._stats = SCORER_DEFAULT, SCORER_DEFAULT
        if scorer is not None:
            if sparsity is not None or site is not None or stats is not None:
                raise TypeError("DllmSparseLM(scorer=...) takes the scorer's sparsity; to score with another one "
                                "use DllmSparseLM.from_scorer(scorer, sparsity=..., stats=...)")
            if cfg is not None:
                raise TypeError("DllmSparseLM(scorer=...) takes the scorer's cfg_scale; build the scorer with "
                                f"Scorer(..., cfg_scale={cfg})")
        else:
            import torch

            from dllm_sparse.models.loading import load_model

            sparsity = sparsity_from_args(sparsity, site, rule, threshold, p, scope)  # fails before a long load
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                eval_logger.warning(f"device {device!r} requested (lm-eval's CLI default) but CUDA is not available; "
                                    "using the CPU")
                device = "cpu"

            lm = load_model(pretrained, dtype=dtype, device=device, kind=kind,
                            trust_remote_code=_bool(trust_remote_code))
            bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
            scorer = Scorer.from_loaded(
                lm, batch_size=bs, mc_num=int(mc_num), mc_batch=int(mc_batch), seed=int(seed),
                shift_logits=None if shift_logits is None else _bool(shift_logits),
                greedy_check=greedy_check_mode(greedy_check), cfg_scale=float(cfg or 0.0),
                add_bos_token=_bool(add_bos_token), sparsity=sparsity,
                stats=stats if stats is not None else SparsityStats() if sparsity is not None else None)
        self.scorer = scorer
        self.max_gen_toks, self.gen_steps, self.block_length = int(max_gen_toks), gen_steps, block_length
        self._device = getattr(getattr(scorer.model, "device", None), "type", None)
        self._weights = weights_hash(scorer.model)  # once: the identity is read for every cache check

    @classmethod
    def from_scorer(cls, scorer: Scorer, *, sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT,
                    **kwargs: Any) -> DllmSparseLM:
        """Wrap an existing scorer (its model and statistics are shared, not copied). ``sparsity``: a
        :class:`SparsityConfig`, a list of them or None (dense) for every call of this model, leaving the
        scorer as it is; ``stats``: where those calls measure. Defaults: the scorer's own (as in
        :meth:`Scorer.loglikelihood`)."""
        lm = cls(scorer=scorer, **kwargs)
        scorer.configs_for(sparsity)  # a bad value fails here, not at the first request
        lm._sparsity, lm._stats = sparsity, stats
        return lm

    @property
    def sparsity(self) -> list[SparsityConfig]:
        """The sparsity of every call of this model."""
        return self.scorer.configs_for(self._sparsity)

    # ---- identity and cache safety ------------------------------------------------------------------------
    @property
    def run_identity(self) -> RunIdentity:
        """Everything that changes the answers (see :mod:`dllm_sparse.eval.identity`): model and weights hash,
        kind, dtype, device type, sparsity (site, rule, full-precision threshold, scope, layers), batch size,
        ELBO and generation settings."""
        sc = self.scorer
        diffusion = sc.kind == "diffusion"
        return run_identity(
            sc, model=sc.name, weights=self._weights, sparsity=self.sparsity, batch_size=sc.batch_size,
            max_length=sc.max_length, add_bos_token=sc.add_bos_token, greedy_check=sc.greedy_check,
            max_gen_toks=self.max_gen_toks, gen_steps=self.gen_steps, block_length=self.block_length,
            mc_num=sc.mc_num if diffusion else None, mc_batch=sc.mc_batch if diffusion else None,
            seed=sc.seed, shift_logits=bool(sc.shift_logits) if diffusion else None,
            mask_id=sc.mask_id if diffusion else None, cfg_scale=sc.cfg_scale if diffusion else None,
            preset=self.preset.name if self.preset is not None else None)

    @property
    def identity(self) -> str:
        """:attr:`run_identity` as canonical JSON (what the response cache stores)."""
        return self.run_identity.to_json()

    @property
    def cache_slug(self) -> str:
        """A file-name-safe, configuration-specific name for ``--use_cache``."""
        ident = self.run_identity
        return f"{slug(ident['model'] + '-' + ident['sparsity'])[:80]}-{ident.digest[:10]}"

    def set_cache_hook(self, cache_hook) -> None:
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            where = f"lm-eval response cache {getattr(db, 'filename', '')!r}"
            fresh = f"Use one cache path per configuration, e.g. --use_cache cache/{self.cache_slug}"
            stored = db.get(IDENTITY_KEY)
            if stored is None:
                if len(db) > 0:
                    raise RuntimeError(
                        f"{where} holds answers of an unknown model configuration; it cannot be reused by a "
                        f"dllm_sparse run (the cache key ignores the sparsity). {fresh}")
                db[IDENTITY_KEY] = self.identity
                db.commit()
            else:
                try:
                    stored_identity = RunIdentity.from_json(stored)
                except ValueError:
                    raise RuntimeError(
                        f"{where} was written by an older dllm_sparse whose identity ({stored!r}) left out the "
                        f"dtype, batch size, weights and generation settings, so it cannot be checked against "
                        f"this run. {fresh}") from None
                self.run_identity.require_same(stored_identity, what=where, fix=fresh)
        super().set_cache_hook(cache_hook)

    def get_model_info(self) -> dict:
        return {"dllm_sparse_identity": self.identity, "model_kind": self.scorer.kind,
                "sparsity": [s.to_dict() for s in self.sparsity] or DENSE, "mc_num": self.scorer.mc_num,
                "cfg_scale": self.scorer.cfg_scale, "greedy_check": self.scorer.greedy_check,
                "preset": None if self.preset is None else self.preset.name}

    # ---- lm-eval properties --------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.scorer.tokenizer, "name_or_path", type(self.scorer.tokenizer).__name__)).replace(
            "/", "__")

    @property
    def stats(self) -> SparsityStats | None:
        """The measured sparsity of every forward pass made through this model (None when dense)."""
        return self.scorer.stats if self._stats is SCORER_DEFAULT else self._stats

    @staticmethod
    def _key(req) -> tuple:
        """Names a request for the ELBO's per-item generator: (task, document, choice index), independent of
        which other requests are in the batch (a partly cached run draws the same masks as a fresh one)."""
        if req.doc_id is None:
            return ("args", repr(req.args))
        return (req.task_name, req.doc_id, req.idx)

    # ---- requests ------------------------------------------------------------------------------------------
    def _cfg_groups(self, requests) -> dict[float | None, list[int]]:
        """Request indices by the guidance they are scored with: the preset's per-task value, else the scorer's."""
        groups: dict[float | None, list[int]] = {}
        for i, req in enumerate(requests):
            w = None if self.preset is None else self.preset.cfg_for(req.task_name or "")
            groups.setdefault(w, []).append(i)
        return groups

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out: list = [None] * len(requests)
        for w, idx in self._cfg_groups(requests).items():
            pairs = [requests[i].args[:2] for i in idx]
            keys = [self._key(requests[i]) for i in idx]
            res = self.scorer.loglikelihood(pairs, keys=keys, sparsity=self._sparsity, stats=self._stats,
                                            cfg_scale=w if self.scorer.kind == "diffusion" else None)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        keys = [self._key(req) for req in requests]
        out = [ll for ll, _ in self.scorer.loglikelihood_rolling(texts, keys=keys, sparsity=self._sparsity,
                                                                 stats=self._stats)]
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate

        sc = self.scorer
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        for idxs in groups.values():
            kw = dict(requests[idxs[0]].args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if _bool(kw.get("do_sample", False)) else 0.0
            cfg_kw: dict[str, Any] = dict(max_new_tokens=n_new, temperature=temperature, stop_strings=until,
                                          seed=sc.seed)
            if sc.kind == "diffusion":
                block = self.block_length or n_new
                block = block if n_new % int(block) == 0 else n_new
                steps = self.gen_steps or n_new
                num_blocks = n_new // int(block)
                steps = max(num_blocks, int(steps) // num_blocks * num_blocks)
                cfg_kw.update(steps=steps, block_length=int(block), mask_id=sc.mask_id,
                              logit_shift=sc.shift_logits)
            config = GenerationConfig(**cfg_kw)
            for s in range(0, len(idxs), sc.batch_size):
                chunk = idxs[s:s + sc.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                configs = self.sparsity
                if len(configs) == 1:
                    if self._stats is SCORER_DEFAULT and sc.stats is None:
                        sc.stats = SparsityStats()
                    res = generate(sc.model, sc.tokenizer, prompts, config, kind=sc.kind,
                                   sparsity=StepSparsity(configs[0], stats=self.stats))
                else:
                    with sc.sparsified(self._sparsity, self._stats):
                        res = generate(sc.model, sc.tokenizer, prompts, config, kind=sc.kind)
                for i, text in zip(chunk, res.texts, strict=True):
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def main() -> None:
    """``python -m dllm_sparse.eval.lm_eval_model ...``: lm-eval's CLI with ``--model dllm_sparse`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
