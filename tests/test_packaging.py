"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` distribution.

transformers >= 5.25 imports ``kernels`` (Hugging Face's) at start-up. Wherever the repository root is first on
sys.path (a prompt, a notebook or ``python -m pytest`` started there), ``import kernels`` must still give the installed
distribution, or fail as it fails where none is installed; ``dllm_sparse.kernels`` stays this project's.
"""

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *flags: str, cwd: Path = ROOT, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _fake_distribution(tmp_path: Path) -> Path:
    """A stand-in for Hugging Face's package: a regular ``kernels`` package with a submodule, on its own path entry."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the installed distribution'\nfrom . import layer\n")
    (site / "kernels" / "layer.py").write_text("NAME = 'layer'\n")
    return site


def test_import_kernels_from_the_root_gives_the_installed_package(tmp_path):
    site = _fake_distribution(tmp_path)
    # The repository root is sys.path[0] ('' for -c), ahead of the fake distribution: the position that shadowed it.
    out = _python("""
        import sys, kernels, kernels.layer
        assert sys.path[0] == ''
        print(kernels.WHO, kernels.__file__, kernels.layer.NAME, sys.modules['kernels'] is kernels)
    """, pythonpath=str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["the", "installed", "distribution", str(site / "kernels" / "__init__.py"), "layer",
                                  "True"]


def test_import_kernels_from_the_root_fails_as_elsewhere_when_none_is_installed():
    # -S: no site-packages, so no kernels distribution; -I is not used because it would drop the root from sys.path.
    out = _python("""
        import sys
        sys.path.insert(0, '.')
        try:
            import kernels
        except ModuleNotFoundError as e:
            print('missing', e.name, 'kernels' in sys.modules)
    """, "-S")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["missing", "kernels", "False"]


def test_the_project_kernels_stay_dllm_sparse_kernels_from_the_root(tmp_path):
    site = _fake_distribution(tmp_path)
    out = _python("""
        import kernels
        import dllm_sparse.kernels as ours
        print(kernels.WHO == 'the installed distribution', ours.__name__, callable(ours.accelerate_ffn))
    """, pythonpath=str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "dllm_sparse.kernels", "True"]


def test_transformers_imports_from_the_root_beside_the_real_kernels_distribution():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers < 5.25 does not need it)")
    out = _python("""
        import sys
        import transformers
        from transformers import LlamaForCausalLM  # 5.25 imports kernels' CUDAProperties on the way
        import kernels
        print(kernels.__file__)
    """)
    assert out.returncode == 0, out.stderr
    origin = Path(out.stdout.strip())
    assert origin != ROOT / "kernels" / "__init__.py"
    assert origin == Path(dist.locate_file("kernels/__init__.py")), f"'import kernels' gave {origin}"
