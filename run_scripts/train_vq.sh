#!/usr/bin/env bash
# Train the five stage-1 models of MambaTalk in turn with the published configs (spec §6):
#   face (aeface), upper and hands (ae), lower_foot (aelowerfoot -> lower_foot.bin), lower (aelower -> foot.bin).
# Extra arguments are config overrides for every run, e.g.  bash run_scripts/train_vq.sh --device cuda:0
# CONFIG_DIR=configs/demo trains the demo-size ones instead. Each run writes outputs/.../custom/<name>/ with rec.bin
# (trans.bin for lower) chosen on the val split; copy those to pretrained/pretrained_vq/ under the names MambaTalk
# expects (face.bin, upper.bin, hands.bin, lower_foot.bin, foot.bin).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CONFIG_DIR=${CONFIG_DIR:-configs}

for part in face upper hands lower_foot lower; do
    echo "[train_vq.sh] $CONFIG_DIR/cnn_vqvae_${part}_30.yaml"
    "$PYTHON" train.py --config "$CONFIG_DIR/cnn_vqvae_${part}_30.yaml" "$@"
done
echo "[train_vq.sh] done. Copy each run's rec.bin (lower: trans.bin) to pretrained/pretrained_vq/: face.bin, upper.bin,"
echo "             hands.bin, lower_foot.bin (from cnn_vqvae_lower_foot_30) and foot.bin (from cnn_vqvae_lower_30)."
