"""Where the project caches what it builds once (the dequantised SmolLM2, the embedded twin, the compiled CPU
top-p kernel): ``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``. Bottom layer: no torch, no project import.

Code loaded from the cache (the compiled kernel, a shared library whose constructor runs when it is loaded) must
be code this user put there. :func:`check_private` refuses a path that another user owns or can write, the rules
sshd applies to ``~/.ssh/authorized_keys`` (StrictModes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["cache_dir", "check_private", "UnsafeCacheError"]


def cache_dir() -> Path:
    """``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``."""
    root = os.environ.get("DLLM_SPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dllm_sparse")
    return Path(root)


class UnsafeCacheError(RuntimeError):
    """A cache path another user owns or can write: code loaded from it could be theirs."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private(path: Path, root: Path, purpose: str) -> None:
    """Raise :class:`UnsafeCacheError` unless no other user can have put or changed ``path``, a file or folder at
    or below the cache folder ``root`` (both existing; ``root`` resolved, ``path`` spelled under it):

    - ``root`` and every entry from it down to ``path``: owned by this user (the effective uid), not writable by
      its group or others, and not a symbolic link (below ``root``);
    - every folder above ``root``: owned by this user or root, and not writable by group or others unless it
      has the sticky bit (``/tmp``: others can add entries there but not rename or remove this user's).

    The message names the path, what is wrong and the fix. ``purpose``: what is refused, e.g. "the compiled
    top-p kernel is not loaded from or built into it"."""
    uid = os.geteuid()
    rel = path.relative_to(root)
    for parent in reversed(root.parents):
        st = os.lstat(parent)
        problem = None
        if st.st_uid not in (0, uid):
            problem = f"owned by {_owner(st.st_uid)}, who can replace what is below it"
        elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            problem = f"writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):o}, no sticky bit)"
        if problem:
            raise UnsafeCacheError(f"{parent}, a folder above the cache {root}, is {problem}: {purpose}. Fix: "
                                   f"`chmod go-w {parent}`, or set DLLM_SPARSE_CACHE to a folder under folders "
                                   "that only you and root can write")
    entry = root
    for part in ("", *rel.parts):
        entry = entry / part if part else entry
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCacheError(f"{entry} is a symbolic link (to {os.readlink(entry)}): {purpose}. Fix: remove "
                                   "the link; it is recreated here")
        if st.st_uid != uid:
            raise UnsafeCacheError(f"{entry} is owned by {_owner(st.st_uid)}, not by you ({_owner(uid)}): "
                                   f"{purpose}. Fix: set DLLM_SPARSE_CACHE to a folder you own, or remove {entry} "
                                   "(it is recreated, yours)")
        if st.st_mode & 0o022:
            raise UnsafeCacheError(f"{entry} is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):o}): "
                                   f"{purpose}. Fix: `chmod go-w {entry}`")


def _who(mode: int) -> str:
    return " and ".join(name for name, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)
