"""``dllm-sparse device-check``: the prepared GPU check, run from a clone of the repository.

The check runs the repository's kernel tests (``tests/``) and benchmark scripts (``experiments/``), which the
installed package does not include, so it needs a clone: inside one (its folder or any folder below it) this
command runs the clone's ``experiments/device_check.py`` with the options given (``--smoke``: tiny shapes on a
CPU; ``--help`` there lists every option; ``bash experiments/device_check.sh`` is the same check). Outside a clone
it stops and says so.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path("experiments") / "device_check.py"


def find_clone(start: Path) -> Path | None:
    """The nearest folder from ``start`` up that holds the repository's device check and its tests."""
    for folder in (start, *start.parents):
        if (folder / SCRIPT).is_file() and (folder / "tests").is_dir():
            return folder
    return None


def main(argv: list[str] | None = None, prog: str | None = None) -> dict | int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "dllm-sparse device-check"
    clone = find_clone(Path.cwd())
    if clone is None:
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: {prog} [options of experiments/device_check.py]\n\n{__doc__}")
            return 0
        raise SystemExit(f"{prog}: no clone of dllm-sparse here ({Path.cwd()} and the folders above it hold no "
                         f"{SCRIPT}): the check runs the repository's tests and benchmark scripts, which the "
                         f"installed package does not include. Run it inside a clone (cd into it, then {prog} "
                         f"--smoke), or there: bash experiments/device_check.sh")
    spec = importlib.util.spec_from_file_location("device_check", clone / SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    return script.main(argv, prog=prog)
