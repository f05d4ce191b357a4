"""Randomly initialised stage-1 models in the published layout, for speed and plumbing runs without real weights.

    python run_scripts/make_random_stage1.py --out DIR [--config configs/mambatalk.yaml]

Writes DIR/pretrained_vq/{face,upper,hands,lower_foot,foot}.bin; pass `--data_path_1 DIR/` (or
`--pretrained_vq_dir DIR/pretrained_vq/`) to train.py. The codes they give mean nothing: never train for results.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.motion_representation import STAGE1_FILES, build_stage1_models  # noqa: E402
from utils.checkpoint import save_weights  # noqa: E402
from utils.config import load_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/mambatalk.yaml")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    torch.manual_seed(opts.seed)
    for name, model in build_stage1_models(load_config(opts.config)).items():
        path = Path(opts.out) / "pretrained_vq" / STAGE1_FILES[name]
        save_weights(model, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
