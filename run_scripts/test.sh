#!/usr/bin/env bash
# Generate, score and save every test sequence (published usage). Extra arguments are config overrides,
# e.g. --test_ckpt PATH --paper_protocol true.
set -euo pipefail
cd "$(dirname "$0")/.."
python test.py --config configs/mambatalk.yaml "$@"
