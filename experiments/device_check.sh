#!/usr/bin/env bash
# The prepared GPU check (<= 8 min on one H200): kernel and decode benchmarks at LLaDA-8B / LLaMA-3.1-8B shapes, the
# step frontier at an 8B shape, and a twin-training run. Everything goes under $OUT (else runs/device_check).
#
#   bash experiments/device_check.sh            # on the GPU machine
#   bash experiments/device_check.sh --smoke    # any CPU, tiny shapes, seconds
#
# Options are those of experiments/device_check.py (--parts, --train-minutes, ...; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" experiments/device_check.py --output-dir "${OUT:-runs/device_check}" "$@"
