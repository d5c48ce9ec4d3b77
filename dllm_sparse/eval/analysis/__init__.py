"""What is computed from sweep rows: critical sparsity, paired bootstrap intervals, figures."""
