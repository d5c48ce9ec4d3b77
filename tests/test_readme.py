"""The README's and the docs pages' Python examples run as written (a page that drifts from the code is a bug), the
README stays a front door (short), and every relative link of the README and the docs points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def _examples():
    """Every ```python block of every page, as (page, index, code); one that compiles (torch.compile on a CPU: tens
    of seconds) runs with the slow tests."""
    for page in PAGES:
        for index, code in enumerate(_python_blocks(page)):
            marks = [pytest.mark.slow] if "torch.compile(" in code else []
            yield pytest.param(page, index, code, marks=marks, id=f"{page.relative_to(ROOT)}[{index}]")


def test_readme_has_examples():
    assert len(_python_blocks(README)) >= 3  # sparsify, generate with per-step sparsity, accelerate_ffn


def test_docs_have_examples():
    assert sum(len(_python_blocks(p)) for p in PAGES if p != README) >= 10


@pytest.mark.parametrize("page, index, code", list(_examples()))
def test_example_runs(page, index, code, capsys):
    if "smollm2-135m" in code:
        from dllm_sparse.models.loading import smollm2_gguf_path

        try:
            smollm2_gguf_path()  # downloads once when not cached
        except RuntimeError as e:
            pytest.skip(f"SmolLM2 GGUF neither cached nor downloadable (offline?): {e}")
    from dllm_sparse.models.families import PROFILES

    saved = list(PROFILES)  # an example that registers a family must not change the families later tests see
    try:
        exec(compile(code, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), {})
    finally:
        PROFILES[:] = saved
    out = capsys.readouterr().out
    if "for site in ALL_SITES" in code:
        values = [float(v) for v in re.findall(r"measured sparsity ([\d.]+)%", out)]
        assert len(values) == 4 and all(5 < v < 95 for v in values), out


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the details to a page in docs/ "
        "and link it from the README's 'Read next' table")


# [text](target) and ![alt](target); a target may carry a title ("...") or an #anchor, which are not part of the path
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_link_finder_sees_links():
    page = ROOT / "docs" / "index.md"
    found = _relative_links(page)
    assert "definitions.md" in found and "../README.md" in found, found
    assert _relative_links(README), "the README links no page"


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchors_are_githubs():
    assert _anchors(ROOT / "docs" / "advantage.md") >= {"the-verdict-rule-per-site", "running-the-study"}
    assert "policies-dllm_sparsesamplersreuse" in _anchors(ROOT / "docs" / "mask_reuse.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    links = _relative_links(page)
    broken = [t for t in links if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
    text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
    same_page = re.findall(r"\]\((#[^)\s]+)\)", text)
    missing = []
    for link in links + same_page:
        path, _, anchor = link.partition("#")
        target = page.parent / path if path else page
        if anchor and target.suffix == ".md" and anchor not in _anchors(target):
            missing.append(link)
    assert not missing, f"{page.relative_to(ROOT)} links to headings that do not exist: {missing}"


def test_architecture_lists_every_module():
    """docs/architecture.md has one line per module of the library and per script: a new one gets its line."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    files = [f for folder in ("dllm_sparse", "samplers", "kernels") for f in (ROOT / folder).rglob("*.py")
             if f.name != "__init__.py"]
    files += [f for f in (ROOT / "experiments").iterdir() if f.suffix in (".py", ".sh")]
    files += list((ROOT / "dllm_sparse").rglob("*.c"))
    assert len(files) > 60
    missing = [str(f.relative_to(ROOT)) for f in files if f"`{f.name}`" not in text and f"`csrc/{f.name}`" not in text]
    assert not missing, f"docs/architecture.md does not list {missing}"


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
