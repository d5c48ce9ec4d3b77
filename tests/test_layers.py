"""The layering of docs/architecture.md: no module imports from a layer above its own (lazy imports included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layer of each package (higher numbers sit above lower ones).
LAYERS = {
    "dllm_sparse.sparsity": 0, "dllm_sparse.steps": 0, "dllm_sparse.models": 0, "dllm_sparse.atomic": 0,
    "dllm_sparse.samplers": 1, "dllm_sparse.kernels": 1,
    "dllm_sparse.eval": 2,
    "dllm_sparse.cli": 3,
}
# Where each package's files live in the repository.
FOLDERS = {"dllm_sparse.samplers": ROOT / "samplers", "dllm_sparse.kernels": ROOT / "kernels"}


def _module_files():
    for package in LAYERS:
        folder = FOLDERS.get(package, ROOT / package.replace(".", "/"))
        if folder.is_dir():
            for f in sorted(folder.rglob("*.py")):
                yield package, f
        else:
            yield package, folder.with_suffix(".py")


def _layer_of(module: str):
    for package, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == package or module.startswith(package + "."):
            return layer
    return None


def _imports(path: Path, package: str):
    """Absolute names of the project modules a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("dllm_sparse"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")  # level 1 = this file's package, level 2 = its parent, ...
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("dllm_sparse"):
                if name in ("dllm_sparse", "dllm_sparse.models", "dllm_sparse.sparsity"):
                    yield from (f"{name}.{a.name}" for a in node.names)
                else:
                    yield name


def test_no_module_imports_from_a_higher_layer():
    violations = []
    seen = 0
    for package, path in _module_files():
        own = LAYERS[package]
        for name in _imports(path, package):
            layer = _layer_of(name)
            seen += 1
            if layer is not None and layer > own:
                violations.append(f"{path.relative_to(ROOT)} (layer {own}) imports {name} (layer {layer})")
    assert seen > 30  # the scan really read the project's imports
    assert not violations, "\n".join(violations)


def test_the_scan_detects_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dllm_sparse.eval.sweep.run import run_sweep\n")
    names = list(_imports(bad, "dllm_sparse.sparsity"))
    assert names == ["dllm_sparse.eval.sweep.run"] and _layer_of(names[0]) == 2 > LAYERS["dllm_sparse.sparsity"]
