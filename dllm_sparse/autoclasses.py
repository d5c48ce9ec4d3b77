"""Register the native LLaDA with transformers' Auto classes once they are used, at no import cost.

``import dllm_sparse`` stays light (no torch, no transformers), yet with it imported
``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM.from_pretrained(d)`` build the native
:class:`~dllm_sparse.models.llada.LLaDAModelLM` for a saved ``model_type: llada`` directory without
``trust_remote_code``. The registration lives in :mod:`dllm_sparse.models.llada` (it needs torch and the model
class). It runs when transformers' module of the Auto model classes (``transformers.models.auto.modeling_auto``)
is imported, which every one of the three classes needs and which imports torch itself; at once when that
module is already imported. ``AutoConfig`` alone, without any Auto model class touched, is not covered.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["install"]

#: The transformers module whose import triggers the registration.
TRIGGER = "transformers.models.auto.modeling_auto"


def _register() -> None:
    try:
        importlib.import_module("dllm_sparse.models.llada")  # its import registers "llada" with the Auto classes
    except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
        warnings.warn(f"dllm_sparse could not register its native LLaDA with transformers' Auto classes "
                      f"({type(e).__name__}: {e}); load LLaDA checkpoints with dllm_sparse.load_model", stacklevel=2)


class _RegisterAfterImport:  # a meta path finder (the importlib.abc base would cost 10 ms of imports)
    """Finds nothing itself: wraps the real loader of :data:`TRIGGER` so :func:`_register` runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once; also keeps the look-up below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now when transformers' Auto model classes are already imported, else on their import."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
