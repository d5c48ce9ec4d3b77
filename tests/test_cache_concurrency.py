"""First-time cache builds from several processes at once: every process gets a complete directory, none crashes.

The embedded twin's merged directory used to be built without a lock, and a second process could delete the
first one's finished directory under it (``FileNotFoundError .../model.safetensors``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_sparse.models.loading import cache_dir

BUILD = """
import sys
from dllm_sparse.models.twin import smollm2_mdm_dir
from transformers import AutoModel
import dllm_sparse.models.llada  # registers model_type llada
path = smollm2_mdm_dir()
AutoModel.from_pretrained(path)  # the directory is complete: every file the config names is there
print(path)
"""


def _shared_base(tmp: Path) -> None:
    """A fresh cache whose dequantised SmolLM2 is the real one (linked), so only the twin is built."""
    base = cache_dir() / "smollm2" / "hf"
    if not (base / "config.json").is_file():
        pytest.skip("the dequantised SmolLM2 is not cached here (run the default suite once first)")
    (tmp / "smollm2").mkdir(parents=True)
    (tmp / "smollm2" / "hf").symlink_to(base, target_is_directory=True)


@pytest.mark.slow
@pytest.mark.parametrize("pair", range(3))
def test_two_processes_build_the_twin_at_once(tmp_path, pair):
    cache = tmp_path / f"cache{pair}"
    _shared_base(cache)
    env = {**os.environ, "DLLM_SPARSE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1  # both got the same finished directory
    built = Path(paths.pop())
    assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()
    assert not list(built.parent.glob(f"{built.name}-tmp-*"))  # no temporary directory left behind


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)) or ".": p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_a_cache_entry_is_readable_by_every_user_whatever_the_umask(tmp_path):
    """save_to_cache publishes the directory 0755 and every file 0644 (model.safetensors included, which the
    safetensors writer makes 0600), even under a private umask; an entry built before that is fixed on use."""
    from conftest import build_tiny_model
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from dllm_sparse.models.loading import save_to_cache, share_cache_entry

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")),
                                  unk_token="a")
    target = tmp_path / "cache" / "entry"
    target.parent.mkdir()
    old = os.umask(0o077)
    try:
        save_to_cache(build_tiny_model("llama"), tok, target)
    finally:
        os.umask(old)
    modes = _modes(target)
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == {name: 0o755 if (target / name).is_dir() else 0o644 for name in modes}, modes

    (target / "model.safetensors").chmod(0o600)  # as older versions left it
    share_cache_entry(target)
    assert _modes(target)["model.safetensors"] == 0o644
