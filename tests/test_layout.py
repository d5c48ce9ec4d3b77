"""The house rules a newcomer relies on, checked on the source tree: no library module over 700 lines, no function
over 100 lines (library and scripts), no import cycle between library modules (imports inside functions counted),
and no private name imported from another package."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# source folder -> the installed package name
PACKAGES = {"dllm_sparse": "dllm_sparse", "samplers": "dllm_sparse.samplers", "kernels": "dllm_sparse.kernels"}
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100


def library_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


MODULES = library_modules()
SCRIPTS = sorted((ROOT / "experiments").glob("*.py"))


def imported_modules(name: str, path: pathlib.Path) -> set[str]:
    """Library modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `from pkg import name`: name may be a function, not a module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    # a module importing its own package's __init__ (for a re-exported name) is not a cycle worth counting
    return {t for t in found if t != name and not name.startswith(t + ".")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_constructed_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_library_modules():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert import_cycles(graph) == []


def test_no_library_module_over_700_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert long == {}, f"split these by idea: {long}"


@pytest.mark.parametrize("path", list(MODULES.values()) + SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_100_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"break into named steps: {long}"


def test_no_private_name_imported_from_another_package():
    offences = []
    for name, path in MODULES.items():
        top = name.split(".")[:2] if name.count(".") >= 1 else [name]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                source = node.module if not node.level else None
                privates = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if not privates:
                    continue
                if node.level:  # relative: another package when it climbs out of this one
                    if node.level > 1:
                        offences.append(f"{name}: from {'.' * node.level}{node.module} import {privates}")
                elif source.split(".")[0] in ("dllm_sparse", *PACKAGES) and source.split(".")[:2] != top:
                    offences.append(f"{name}: from {source} import {privates}")
    assert offences == []
