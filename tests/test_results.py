"""The committed results are what their rows give, and the README shows those results (no stale numbers).

docs/results/llada_vs_llama/ holds the default run of `python experiments/llada_vs_llama.py` (rows, tables,
figures, summary), docs/results/shared_scope/ the same run with `--scope step --sites input intermediate`.
Recomputing the tables from the committed rows must give the committed tables byte for byte, and the README's
tables (and the main experiment's verdicts) must be the committed ones.
"""

import json
import re
from pathlib import Path

import pytest

from dllm_sparse.eval.critical import write_critical
from dllm_sparse.eval.rows import read_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "llada_vs_llama"
SHARED = ROOT / "docs" / "results" / "shared_scope"
README = ROOT / "README.md"


def _table_lines(text: str, heading: str) -> list[str]:
    """The Markdown table lines right after ``heading`` in ``text``."""
    after = text.split(heading, 1)[1]
    return [ln for ln in after.splitlines() if ln.startswith("|")][:4]


@pytest.mark.parametrize("results", [RESULTS, SHARED], ids=lambda p: p.name)
def test_committed_tables_are_what_the_committed_rows_give(tmp_path, results):
    rows = read_rows(results / "rows.jsonl")
    summary = json.loads((results / "summary.json").read_text())
    assert rows and summary["models"]
    paths = write_critical(rows, tmp_path)  # the script's defaults: capped average, 1000 replicates, seed 0
    for name in ("critical_sparsity.md", "critical_sparsity.csv", "model_comparison.csv"):
        assert (tmp_path / name).read_text() == (results / name).read_text(), name
    assert paths["differences"]


def test_readme_shows_the_committed_shared_scope_table():
    readme = README.read_text()
    table = _table_lines((SHARED / "critical_sparsity.md").read_text(), "## Interpolated")
    assert len(table) == 4
    for line in table[2:]:  # the two models' rows (the header is the main table's too)
        assert line in readme, line
    assert {r["scope"] for r in read_rows(SHARED / "rows.jsonl") if r.get("scope")} == {"step"}


def test_readme_shows_the_committed_table_and_verdicts():
    readme = README.read_text()
    md = (RESULTS / "critical_sparsity.md").read_text()
    table = _table_lines(md, "## Interpolated")
    assert len(table) == 4  # header, rule, two models
    for line in table:
        assert line in readme, line
    comparison = _table_lines(md, "## Diffusion vs AR")
    for line in comparison[2:]:
        site, verdict = line.split("|")[1].strip(), line.split("|")[4].strip()
        assert re.search(rf"\| {site} \|[^\n]*\| {re.escape(verdict)} \|", readme), (site, verdict)


@pytest.mark.parametrize("figure", ["relative_performance_avg_curve.png"])
def test_readme_figures_exist(figure):
    readme = README.read_text()
    assert f"docs/results/llada_vs_llama/figures/{figure}" in readme
    assert (RESULTS / "figures" / figure).stat().st_size > 10_000
