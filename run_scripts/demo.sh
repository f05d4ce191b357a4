#!/usr/bin/env bash
# The whole pipeline on the embedded demo data (no download, no SMPL-X file, no GPU).
# Sets up .venv when needed, then runs run_scripts/demo.py (pass --force to redo every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh
python run_scripts/demo.py "$@"
