#!/usr/bin/env bash
# The prepared GPU check, one shot of at most 600 s on one H100/H200: the kernel tests compiled on the GPU, kernel and
# decode benchmarks at LLaDA-8B / LLaMA-3.1-8B shapes under CUDA graphs, the step frontier at an 8B shape, and a
# twin-training run. What comes back is four files in $OUT (else runs/device_check/out).
#
#   bash experiments/device_check.sh            # on the GPU machine
#   bash experiments/device_check.sh --smoke    # any CPU, tiny shapes, a few minutes
#
# Options are those of experiments/device_check.py (--parts, --train-minutes, --resume, ...; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON, else the repository's venv, else python3 (the device image has no `python`), else python.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then PY=python3
  else PY=python
  fi
fi
# exec: the signals the device sends reach device_check.py itself, which stops its running part's process group.
exec "$PY" -u experiments/device_check.py --output-dir "${OUT:-runs/device_check/out}" "$@"
