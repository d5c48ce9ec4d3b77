"""Atomic file writes: write to a temporary file next to the target, fsync it, rename it over the target.

A reader, or a rerun after a kill, sees the old file or the new one, never half of one (a truncated summary made
every rerun crash before). Bottom layer, so the samplers, the sparsity statistics and the model tools use the same
writes as :mod:`dllm_sparse.eval.rows` (which re-exports them).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "json_default"]


def json_default(o: Any):
    """``json.dumps(default=...)`` for rows and summaries: tensors as lists, everything else as its string."""
    # torch is looked up, not imported: an object can only be a tensor once torch is loaded, and scripts that
    # write files with these helpers (and answer --help) should not pay torch's import time for it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


@contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """``with atomic_open(path) as f: f.write(...)``: a text file that replaces ``path`` only when the block
    finishes without an exception (then flushed, fsync'ed and renamed); on an exception ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file is created exclusively (mkstemp: O_CREAT | O_EXCL, a fresh random name) next to the
    # target: two writers (processes or threads) never share one, and a file or symlink planted at a
    # predictable name is never opened or followed.
    import tempfile  # here, not at the top: scripts answering --help import this module

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.chmod(fd if os.chmod in os.supports_fd else tmp, 0o666 & ~_umask())  # what open(path, "w") gives
        with open(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process umask, read without changing it where the system shows it (Linux: /proc/self/status);
    setting it to read it back would briefly give files other threads create the wrong mode."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, **dumps_kwargs: Any) -> None:
    """``json.dumps(data)`` (tensors as lists, other objects as strings: :func:`json_default`) written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, default=json_default, **dumps_kwargs) + "\n")
