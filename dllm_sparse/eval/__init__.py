"""Evaluation, above the samplers: likelihood scorers, tasks, the lm-eval model, sweeps, critical sparsity, plots."""
