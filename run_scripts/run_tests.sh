#!/usr/bin/env bash
# Run the test suite (creating/updating .venv first). Extra arguments go to pytest, e.g. -k rotation.
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh
python -m pytest -q tests "$@"
