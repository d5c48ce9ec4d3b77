"""Evaluation tasks: the built-in offline suite, lm-evaluation-harness tasks, and the lm-eval model ``dllm_sparse``."""
