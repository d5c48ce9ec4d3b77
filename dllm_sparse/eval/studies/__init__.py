"""The library side of each study script, one module named after it."""
