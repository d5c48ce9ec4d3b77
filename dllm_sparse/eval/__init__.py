"""Evaluation, above the samplers: ``scoring`` (likelihoods and the Scorer), ``tasks`` (built-in and lm-eval tasks,
the lm-eval model), ``sweep`` (resumable sweeps), ``analysis`` (critical sparsity, bootstrap, plots) and ``studies``
(each study script's library side); ``identity`` and ``rows`` are shared by all of them."""
