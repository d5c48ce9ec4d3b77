"""Quality vs measured speed over whole denoising trajectories, per strategy.

``python experiments/trajectory_frontier.py`` is ``dllm-sparse frontier trajectory``: the arguments and the run live in
:mod:`dllm_sparse.cli.trajectory_frontier` (installed with the package, so the command needs no clone). ``--help`` lists
the options.
"""

from dllm_sparse.cli.trajectory_frontier import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.trajectory_frontier import main

if __name__ == "__main__":
    main()
