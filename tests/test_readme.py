"""The README's Python examples run as written (a README that drifts from the code is a bug)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 2


# An example that compiles (torch.compile on a CPU: tens of seconds) runs with the slow tests.
@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow) if "torch.compile(" in block else i
                                   for i, block in enumerate(_python_blocks())])
def test_readme_example_runs(index, capsys):
    code = _python_blocks()[index]
    if "smollm2-135m" in code:
        from dllm_sparse.models.loading import smollm2_gguf_path

        try:
            smollm2_gguf_path()  # downloads once when not cached
        except RuntimeError as e:
            pytest.skip(f"SmolLM2 GGUF neither cached nor downloadable (offline?): {e}")
    from dllm_sparse.models.families import PROFILES

    saved = list(PROFILES)  # an example that registers a family must not change the families later tests see
    try:
        exec(compile(code, f"README.md[python block {index}]", "exec"), {})
    finally:
        PROFILES[:] = saved
    out = capsys.readouterr().out
    if "for site in ALL_SITES" in code:
        values = [float(v) for v in re.findall(r"measured sparsity ([\d.]+)%", out)]
        assert len(values) == 4 and all(5 < v < 95 for v in values), out


def test_ci_installs_as_the_readme_says():
    """.ci/run installs what the README's install block installs: the same torch version, the README's CPU index when
    CI_TORCH_INDEX names it (the plain line, a local CPU wheel, otherwise), then the same project install line."""
    block = re.search(r"## Install\n.*?```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    readme_torch = re.search(r"^pip install torch==(\S+) --index-url (\S+)$", block, flags=re.M)
    ci_torch = re.search(r'^pip install torch==(\S+) \$\{CI_TORCH_INDEX:\+--index-url "\$CI_TORCH_INDEX"\}$', ci,
                         flags=re.M)
    assert readme_torch and ci_torch, (block, ci)
    assert readme_torch.group(1) == ci_torch.group(1)  # one torch version
    assert readme_torch.group(2) in ci  # the index CI_TORCH_INDEX is documented to take is the README's
    project = [ln for ln in block.splitlines() if ln.startswith("pip install -e")]
    assert project and all(re.search(rf"^{re.escape(ln)}$", ci, flags=re.M) for ln in project)
