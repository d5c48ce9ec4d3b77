"""The committed results are what their rows give, and the README and the study pages show those results (no stale
numbers).

docs/results/llada_vs_llama/ holds the default run of `python experiments/llada_vs_llama.py` (rows, tables,
figures, summary), docs/results/shared_scope/ the same run with `--scope step --sites input intermediate`.
Recomputing the tables from the committed rows must give the committed tables byte for byte; the README's headline
table, the main experiment's page (its tables and verdicts) and the shared keep-sets page must show the committed ones.
"""

import json
import re
from pathlib import Path

import pytest

from dllm_sparse.eval.analysis.critical import write_critical
from dllm_sparse.eval.rows import read_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "llada_vs_llama"
SHARED = ROOT / "docs" / "results" / "shared_scope"
README = ROOT / "README.md"
MAIN_PAGE = ROOT / "docs" / "main_experiment.md"
SHARED_PAGE = ROOT / "docs" / "shared_keep_sets.md"


def _table_lines(text: str, heading: str) -> list[str]:
    """The lines of the first Markdown table after ``heading`` in ``text``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("results", [RESULTS, SHARED], ids=lambda p: p.name)
def test_committed_tables_are_what_the_committed_rows_give(tmp_path, results):
    rows = read_rows(results / "rows.jsonl")
    summary = json.loads((results / "summary.json").read_text())
    assert rows and summary["models"]
    paths = write_critical(rows, tmp_path)  # the script's defaults: capped average, 1000 replicates, seed 0
    for name in ("critical_sparsity.md", "critical_sparsity.csv", "model_comparison.csv"):
        assert (tmp_path / name).read_text() == (results / name).read_text(), name
    assert paths["differences"]


def test_shared_keep_sets_page_shows_the_committed_shared_scope_table():
    page = SHARED_PAGE.read_text()
    table = _table_lines((SHARED / "critical_sparsity.md").read_text(), "## Interpolated")
    assert len(table) == 4
    for line in table[2:]:  # the two models' rows (the page's header has fewer sites than the file's)
        assert line in page, line
    assert {r["scope"] for r in read_rows(SHARED / "rows.jsonl") if r.get("scope")} == {"step"}


@pytest.mark.parametrize("page", [README, MAIN_PAGE], ids=lambda p: p.name)
def test_page_shows_the_committed_headline_table(page):
    md = (RESULTS / "critical_sparsity.md").read_text()
    table = _table_lines(md, "## Interpolated")
    assert len(table) == 4  # header, rule, two models
    for line in table:
        assert line in page.read_text(), line


def test_main_experiment_page_shows_the_committed_first_crossing_and_verdicts():
    page = MAIN_PAGE.read_text()
    md = (RESULTS / "critical_sparsity.md").read_text()
    for model_row in _table_lines(md, "## First crossing")[2:]:  # the page's rows name the model ", first crossing"
        cells = [c.strip() for c in model_row.split("|")[1:-1]]
        assert re.search(rf"\| {re.escape(cells[0])}, first crossing \| " + " \\| ".join(map(re.escape, cells[2:])),
                         page), cells
    comparison = _table_lines(md, "## Diffusion vs AR")
    assert len(comparison) == 6  # header, rule, four sites
    for line in comparison[2:]:
        site, verdict = line.split("|")[1].strip(), line.split("|")[4].strip()
        assert re.search(rf"\| {site} \|[^\n]*\| {re.escape(verdict)} \|", page), (site, verdict)


@pytest.mark.parametrize("figure", ["relative_performance_avg_curve.png"])
def test_readme_figures_exist(figure):
    readme = README.read_text()
    assert f"docs/results/llada_vs_llama/figures/{figure}" in readme
    assert (RESULTS / "figures" / figure).stat().st_size > 10_000
