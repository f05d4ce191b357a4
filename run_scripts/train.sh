#!/usr/bin/env bash
# Train MambaTalk with the published command line: configs/mambatalk.yaml with --test_start_epoch 80 --test_period 5
# (the published train.sh overrides the yaml's 70/10), i.e. last_<epoch>.bin saved and tested at epochs 80, 85, ...
# Extra arguments are config overrides, e.g.  bash run_scripts/train.sh --amp bf16 --fused_adam true
# With more than one GPU visible (CUDA_VISIBLE_DEVICES, else nvidia-smi -L; or set NGPU) it runs one process per GPU
# through torchrun (DDP, NCCL); batch_size stays the global batch, split over the processes.
# Needs the five stage-1 models in pretrained/pretrained_vq/ (run_scripts/train_vq.sh, or the released files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '[0-9]' || true
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NGPU=${NGPU:-$(count_gpus)}
ARGS=(train.py --config configs/mambatalk.yaml --model mambatalk --test_start_epoch 80 --test_period 5 "$@")
if [ "$NGPU" -gt 1 ]; then
    echo "[train.sh] $NGPU GPUs: torchrun --nproc_per_node $NGPU"
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "${ARGS[@]}"
else
    exec "$PYTHON" "${ARGS[@]}"
fi
