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
