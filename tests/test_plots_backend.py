"""The library leaves matplotlib's backend to its user (a notebook keeps its own); only the scripts pick Agg."""

import subprocess
import sys


def test_importing_and_plotting_keeps_the_users_backend(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
from dllm_sparse.eval.analysis import plots  # noqa: F401
from dllm_sparse.eval.studies import reuse_plots  # noqa: F401
from dllm_sparse.eval.analysis.plots import plot_relative_performance
rows = [{{"model": "A", "kind": "ar", "site": "dense", "rule": "dense", "p": 1.0, "task": "t",
         "sparsity_by_site": {{"input": 0.0}}, "relative_performance": 1.0}},
        {{"model": "A", "kind": "ar", "site": "input", "rule": "top_p", "p": 0.9, "task": "t", "sparsity": 0.3,
         "relative_performance": 0.98, "source": "measured"}}]
plot_relative_performance(rows, r"{tmp_path}")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
