#!/usr/bin/env bash
# Make ./.venv with everything the project needs, then activate it. Idempotent and quiet when up to date.
# Usage: bash run_scripts/setup_env.sh   or   source run_scripts/setup_env.sh (leaves the venv active)

_mt_setup() {
    local root venv py stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        echo "[setup] creating $venv"
        python3 -m venv "$venv" || return 1
    fi
    if ! "$py" -c "import torch" >/dev/null 2>&1; then
        # torch first, CPU build: a plain "pip install torch" on Linux would pull several GB of CUDA wheels
        echo "[setup] installing torch (CPU)"
        "$py" -m pip install -q "torch==2.13.0" \
            || "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
            || return 1
    fi
    stamp="$venv/.requirements-stamp"
    want="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "[setup] installing requirements-dev.txt"
        "$py" -m pip install -q -r "$root/requirements-dev.txt" || return 1
        echo "$want" > "$stamp"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
}

if ! _mt_setup; then
    echo "[setup] failed to set up $(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv" >&2
    unset -f _mt_setup
    return 1 2>/dev/null || exit 1
fi
unset -f _mt_setup
