#!/usr/bin/env bash
# Validates and benchmarks dsig_ext's CUDA path on a machine with an NVIDIA GPU, offline and
# without detectron2: build for the local GPU, CUDA and op tests, compute-sanitizer, benchmark.
# Usage: benchmarks/gpu_check.sh OUT [--wheels DIR] [--work DIR] [--jobs N] [--skip STEP ...]
# The interpreter is $PYTHON, else the repository's .venv, else python3 (see gpu_check.py).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
