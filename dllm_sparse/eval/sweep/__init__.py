"""Sweeps: models x sites x rule thresholds x tasks, one tidy row per cell, resumable (see ``run``)."""
