#!/usr/bin/env bash
# The speed table of issue 9: published configuration against the fast one (run_scripts/bench_gpu.py).
# On a GPU it times the published sizes; on CPU a tiny version (the test suite runs that), or with --published_size
# the published sizes (slow; e.g. --only clip).
#   bash run_scripts/bench.sh [--only train window clip testset scan] [--compile] [--tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" run_scripts/bench_gpu.py "$@"
