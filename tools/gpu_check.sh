#!/usr/bin/env bash
# One prepared GPU check (issue #14): kernels vs reference, GPU benchmarks, the 4 GB float16 style
# transfer, training throughput and a 1-process NCCL DDP run; <= 8 minutes on one modern GPU.
#   tools/gpu_check.sh OUT_DIR              # writes OUT_DIR/report.md and OUT_DIR/report.json
#   tools/gpu_check.sh OUT_DIR --cpu-tiny   # every step on the CPU at tiny size
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: tools/gpu_check.sh OUT_DIR [--cpu-tiny] [--steps a,b]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON_SET:-}" ] && [ "$PYTHON" = python ]; then
    PYTHON=.venv/bin/python
fi
exec "$PYTHON" tools/gpu_check.py "$@"
