"""The ``dllm-sparse`` command: one installed entry point for the project's main jobs.

    dllm-sparse compare                  # the diffusion model vs its AR twin: critical sparsity, tables, figures
    dllm-sparse generate                 # dense and sparse generations side by side
    dllm-sparse mask-reuse               # keep-mask stability across denoising steps and the reuse policies
    dllm-sparse frontier step            # quality vs measured speed of one denoising step, per strategy
    dllm-sparse frontier trajectory      # the same over whole denoising trajectories
    dllm-sparse frontier generation      # whole generations: caches, parallel decoding, FFN sparsity on top
    dllm-sparse device-check --smoke     # the prepared GPU check (in a clone: it runs the repository's tests)
    dllm-sparse lm-eval run --model dllm_sparse ...   # lm-eval's CLI with this package's model and tasks
    dllm-sparse COMMAND --help           # a command's options and their defaults

Each command's arguments and run live in a module of this package, so the installed command needs no clone; a
clone's ``experiments/<script>.py`` calls the same ``main``. Only argparse is imported before a command's
arguments are parsed: ``--help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module whose main(argv, prog) runs it, or a table of subcommands; one line for --help)
Table = dict[str, tuple["str | Table", str]]
FRONTIERS: Table = {
    "step": ("dllm_sparse.cli.step_frontier", "quality vs measured speed of one denoising step, per strategy"),
    "trajectory": ("dllm_sparse.cli.trajectory_frontier",
                   "quality vs measured speed over whole denoising trajectories, per strategy"),
    "generation": ("dllm_sparse.cli.generation_frontier",
                   "speed and quality of whole generations: block caches, parallel decoding, FFN sparsity on top"),
}
COMMANDS: Table = {
    "compare": ("dllm_sparse.cli.compare",
                "FFN activation sparsity of the diffusion model vs its AR twin: critical sparsity, tables, figures "
                "(the main study)"),
    "generate": ("dllm_sparse.cli.generate", "generate with and without FFN activation sparsity, side by side"),
    "mask-reuse": ("dllm_sparse.cli.mask_reuse",
                   "how stable FFN keep-masks are across denoising steps, and what reusing them costs and buys"),
    "frontier": (FRONTIERS, "quality vs measured speed: 'frontier step', 'trajectory' or 'generation'"),
    "device-check": ("dllm_sparse.cli.device_check",
                     "the prepared GPU check (runs the repository's tests and benchmarks: needs a clone)"),
    "lm-eval": ("dllm_sparse.cli.lm_eval", "lm-eval's CLI with --model dllm_sparse and this package's tasks"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dllm-sparse")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def _parser(prog: str, description: str, table: Table) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if table is COMMANDS:
        ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    for name, (_, line) in table.items():
        sub.add_parser(name, help=line, add_help=False)  # listed here; the command parses its own arguments
    return ap


def _dispatch(prog: str, description: str, table: Table, argv: list[str]) -> int:
    # Only the command's name is parsed here: --help / --version, a missing or unknown command end in argparse's
    # usage message (naming the choices); everything after the name is the command's own.
    parser = _parser(prog, description, table)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        parser.error(f"{argv[0]!r} comes before any command: options go after it ({prog} COMMAND [options])")
    name = parser.parse_args(argv[:1]).command
    target, line = table[name]
    if isinstance(target, dict):
        return _dispatch(f"{prog} {name}", line, target, argv[1:])
    result = importlib.import_module(target).main(argv[1:], prog=f"{prog} {name}")
    return result if isinstance(result, int) else 0  # some commands return their results (a dict): success


def main(argv: list[str] | None = None) -> int:
    """The ``dllm-sparse`` console script: ``dllm-sparse COMMAND [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _dispatch("dllm-sparse", __doc__, COMMANDS, argv)
