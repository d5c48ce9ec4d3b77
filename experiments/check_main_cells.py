"""Recompute a few cells of the committed main experiment and compare them with its rows, field by field.

    python experiments/check_main_cells.py                      # ~2 min on a quiet 2-core CPU, 1 thread
    python experiments/check_main_cells.py --cells dense input  # a subset of the cells below

The committed run (docs/results/llada_vs_llama: rows.jsonl and the sweep_config.json it was made with) is the
reference. Each group of cells below is swept with that configuration (models, ELBO settings, seed, dtype, batch
size, scope, every item of the task) restricted to its sites and thresholds, one after the other into one work
folder (so the dense passes of the first group serve the later ones), and every recomputed row must equal the
committed row of the same key in every field except the ones that record when, where and how long
(``seconds``, ``finished_at``, ``rank``): the per-item scores (``items``), the metrics, the measured sparsities,
relative performance, the model identity. Floating-point results depend on the CPU and the thread count: run it on
the kind of machine the rows were made on (their ``threads`` field: 1; ``--threads``) to expect exact equality. On
another CPU kind, compare with rows made on this machine instead: ``--results`` takes any sweep folder holding these
cells (its rows.jsonl and sweep_config.json), e.g. one computed by the code before a change. A ``--work-dir`` that
already holds the cells is resumed, not recomputed. Exit status 0 when every row is equal, 1 otherwise (the
differing fields are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "llada_vs_llama"
#: name -> (sites, thresholds, tasks, models or None for the run's two): the groups of cells recomputed.
CELLS = {
    "dense": (["input", "gate", "up", "intermediate"], [1.0], ["builtin_mc", "builtin_ppl"], None),  # 20 rows
    "input": (["input"], [0.9], ["builtin_mc"], None),  # both models' input top-p 0.9 on the MC task
    "up": (["up"], [0.95], ["builtin_ppl"], ["smollm2-135m"]),  # the AR model's up top-p 0.95, passages
    "intermediate": (["intermediate"], [0.98], ["builtin_ppl"], ["smollm2-135m-mdm"]),  # the twin's, passages
}
#: Fields that record when, where and how long a cell ran, not what it computed.
NOT_COMPARED = ("seconds", "finished_at", "rank")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS),
                    help="which groups of cells to recompute (default: all; 'dense' first when given)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the committed run: a folder with rows.jsonl and sweep_config.json (default: %(default)s)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the recomputed rows go (default: a temporary folder, removed afterwards)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the committed rows)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be a whole number >= 1 (got {args.threads})")
    for name in ("rows.jsonl", "sweep_config.json"):
        if not (args.results / name).is_file():
            ap.error(f"--results {args.results} has no {name}: give the folder of a committed sweep")
    return args


def differences(ours: dict, theirs: dict) -> list[str]:
    """The fields (other than :data:`NOT_COMPARED`) whose values differ, with both values."""
    out = []
    for k in sorted(set(ours) | set(theirs)):
        if k in NOT_COMPARED:
            continue
        a, b = ours.get(k, "<missing>"), theirs.get(k, "<missing>")
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{k}: recomputed {json.dumps(a)[:120]} != committed {json.dumps(b)[:120]}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dllm_sparse.eval.rows import read_rows
    from dllm_sparse.eval.sweep.config import SweepConfig, planned_keys
    from dllm_sparse.eval.sweep.run import run_sweep

    torch.set_num_threads(args.threads)
    committed = {r["key"]: r for r in read_rows(args.results / "rows.jsonl")}
    base = json.loads((args.results / "sweep_config.json").read_text())
    names = sorted(args.cells, key=list(CELLS).index)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        checked, failed, seen = 0, 0, set()
        for name in names:
            sites, thresholds, tasks, models = CELLS[name]
            cfg = SweepConfig(**{**base, "output_dir": work, "sites": sites, "thresholds": thresholds, "tasks": tasks,
                                 "models": models or base["models"], "progress": False})
            want = planned_keys(cfg)
            rows = {r["key"]: r for r in run_sweep(cfg) if r["key"] in want}
            for key in sorted(want - seen):  # a dense row shared with an earlier group is compared once
                seen.add(key)
                row, ref = rows.get(key), committed.get(key)
                label = f"{name}: {json.loads(key)[0]} {json.loads(key)[1]} {json.loads(key)[2]}"
                if row is None or ref is None:
                    print(f"MISSING {label}: {'not recomputed' if row is None else 'not in the committed rows'}")
                    failed += 1
                    continue
                diff = differences(row, ref)
                checked += 1
                failed += bool(diff)
                print(f"{'DIFFERS' if diff else 'equal  '} {label} ({len(ref.get('items', {}).get('ids', []))} items)")
                for d in diff:
                    print(f"    {d}")
    print(f"\n{checked} rows compared with {args.results / 'rows.jsonl'}: "
          f"{'all equal' if not failed else f'{failed} differ or are missing'} (threads {args.threads})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
