"""The Monte-Carlo ELBO's default settings, in one place: the :class:`~dllm_sparse.eval.scoring.scorer.Scorer`, the
sweep's :class:`~dllm_sparse.eval.sweep.config.SweepConfig` and the lm-eval model ``dllm_sparse`` all read them.

* ``MC_NUM``: Monte-Carlo rows (masked copies of an answer) per request;
* ``MC_BATCH``: the stratified mini-batch of those rows (``MC_NUM`` must be a multiple of it);
* ``SEED``: the seed of the per-item generators (with the item's key), so every configuration draws the same masks.
"""

MC_NUM = 128
MC_BATCH = 16
SEED = 1234
