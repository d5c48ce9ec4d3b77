"""The identity of a run: every setting that can change a number, in one place, for every cache and resume key.

    ident = run_identity(lm, sparsity=config, dtype="bf16", mc_num=128, mc_batch=16, seed=1234, batch_size=16)
    ident["weights"]                       # 'sha256:…' of the model's weights (see weights_hash)
    ident.require_same(stored, what="lm-eval cache db.sqlite", fix="use a fresh --use_cache path")

A :class:`RunIdentity` is a flat, sorted mapping of JSON values. :func:`run_identity` fills the fields every
run has: the model's name, the hash of its weights, its kind, the dtype of its parameters and the device type
(float results differ between CPU and GPU kernels and between dtypes), the sparsity (config ids, full
precision; ``dense`` when none), and ``load_options`` when ``load_model`` passed settings to ``from_pretrained``
that can change the numbers (``attn_implementation``, ``revision``, config-field overrides, ...); callers add
the settings of their own computation (ELBO: ``mc_num``, ``mc_batch``, ``seed``; ``batch_size``; generation:
``gen_steps``, ``block_length``, ``max_gen_toks``, ``greedy_check``; ``limit`` …). Users of it: the lm-eval
response cache (:mod:`dllm_sparse.eval.tasks.lm_eval_model`),
the sweep cells (:mod:`dllm_sparse.eval.sweep.run`), the mask-reuse study cells
(:mod:`dllm_sparse.eval.studies.reuse_study`) and the step profile of ``experiments/llada_vs_llama.py``.

Batch size is part of every identity: a sparsified forward of a padded batch gives slightly different float
results than the same rows one by one, and a near-threshold activation can then fall on the other side of the
rule's threshold (measured: 0.34 nats on one AR item between batch 1 and 4).

On a mismatch, :meth:`RunIdentity.require_same` raises :class:`IdentityMismatch`, whose message lists each field
that differs as ``field: stored -> current`` and how to start fresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = ["RunIdentity", "IdentityMismatch", "run_identity", "weights_hash", "describe_differences"]

# Elements sampled from each tensor for the weights hash: evenly spaced over the tensor, so a change of any
# block of weights (a new fine-tune, another checkpoint) almost surely moves at least one sampled value.
_SAMPLES_PER_TENSOR = 256


def weights_hash(model: torch.nn.Module) -> str:
    """``sha256:<16 hex>`` of a model's weights, cheap enough to compute on every load (milliseconds for a
    135M model, well under a second for 8B on a GPU).

    Covers: every entry of ``state_dict()`` (parameters and buffers) by name, shape and dtype, plus the raw bytes
    of 256 evenly spaced elements of each tensor (all of it for small tensors). Two models with the same
    architecture but other weights therefore hash differently unless they agree on every sampled element; the
    same weights in another dtype hash differently too (the dtype changes the numbers). Tensors on the meta
    device (offloaded by accelerate) contribute their name, shape and dtype only."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu").contiguous()
        if sample.dtype == torch.bool:
            sample = sample.to(torch.uint8)
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _jsonable(v: Any) -> Any:
    """Settings as JSON values; floats stay full precision (json writes repr), so 0.12345671 != 0.12345674."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, torch.device):
        return v.type
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "id") and isinstance(v.id, str):  # a SparsityConfig
        return v.id
    return str(v)


class IdentityMismatch(RuntimeError):
    """Stored results belong to another configuration (the message names every field that differs)."""


def describe_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``['field: stored -> current', ...]`` for every field that differs (a missing field shows as <absent>)."""
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


class RunIdentity(Mapping):
    """A flat mapping of every setting that can change a number of a run (see the module docstring)."""

    def __init__(self, fields: Mapping[str, Any]):
        self._fields = {str(k): _jsonable(v) for k, v in sorted(fields.items())}

    def __getitem__(self, k: str) -> Any:
        return self._fields[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"RunIdentity({self._fields!r})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal identities give equal strings."""
        return json.dumps(self._fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunIdentity:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"not an identity (a JSON object): {text[:80]!r}")
        return cls(data)

    @property
    def digest(self) -> str:
        """A short hash of :meth:`to_json` (names cache folders and files)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def updated(self, **fields: Any) -> RunIdentity:
        return RunIdentity({**self._fields, **fields})

    def subset(self, names: Sequence[str]) -> RunIdentity:
        return RunIdentity({k: self._fields[k] for k in names if k in self._fields})

    def require_same(self, stored: Mapping[str, Any], *, what: str, fix: str) -> None:
        """Raise :class:`IdentityMismatch` unless ``stored`` equals this identity. ``what`` names the stored
        results (a file, a folder), ``fix`` says how to go on (a fresh folder, the right flags)."""
        diffs = describe_differences(stored, self._fields)
        if diffs:
            raise IdentityMismatch(
                f"{what} was computed with another configuration; reusing it would return that configuration's "
                f"numbers. What differs (stored -> now):\n  " + "\n  ".join(diffs) + f"\n{fix}")


def run_identity(lm: Any = None, *, model: str | None = None, weights: str | None = None, kind: str | None = None,
                 dtype: Any = None, device_type: str | None = None, sparsity: Any = None,
                 **settings: Any) -> RunIdentity:
    """The identity of a run of ``lm`` (a ``LoadedModel``, a ``Scorer`` or anything with ``.model``): model
    name, :func:`weights_hash`, kind, parameter dtype and device type are read from it unless given; ``sparsity``
    is a ``SparsityConfig``, a list of them or None (dense); ``settings`` are the run's other settings (each a
    field). Without ``lm`` the given fields alone make the identity (for keys planned before a model loads)."""
    if lm is not None:
        module = getattr(lm, "model", lm)
        model = model if model is not None else getattr(lm, "name", None) or type(module).__name__
        weights = weights if weights is not None else weights_hash(module)
        kind = kind if kind is not None else getattr(lm, "kind", None)
        options = _load_options(module)
        if options and "load_options" not in settings:
            settings = {**settings, "load_options": options}
        param = next(module.parameters(), None)
        if param is not None:
            dtype = dtype if dtype is not None else param.dtype
            device_type = device_type if device_type is not None else _device_type(module, param)
    if sparsity is None or (isinstance(sparsity, (list, tuple)) and not sparsity):
        sp: Any = "dense"
    elif isinstance(sparsity, (list, tuple)):
        sp = "+".join(_jsonable(s) for s in sparsity)
    else:
        sp = _jsonable(sparsity)
    fields = {"model": model, "weights": weights, "kind": kind, "dtype": dtype, "device_type": device_type,
              "sparsity": sp, **settings}
    return RunIdentity({k: v for k, v in fields.items() if v is not None or k in settings})


def _load_options(module: torch.nn.Module) -> dict[str, Any]:
    """What load_model passed to from_pretrained that can change the numbers (attention implementation,
    revision, config overrides, ...); ``{}`` when nothing was, so identities of plain loads keep their fields."""
    try:
        from dllm_sparse.models.loading import load_options
    except ImportError:
        return {}
    return load_options(module)


def _device_type(module: torch.nn.Module, param: torch.Tensor) -> str:
    try:
        from dllm_sparse.models.loading import model_device

        return model_device(module).type
    except (ImportError, StopIteration):
        return param.device.type
