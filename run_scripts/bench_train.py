"""Training step time of every trainer on CPU (or the configured device), on a small synthetic dataset.

    python run_scripts/bench_train.py [--configs demo|published|NAME ...] [--batch_size N] [--steps N] [--threads N]

Prints seconds per optimiser step (forward, backward, clipping, Adam) and frames per second, after one warm-up step.
`demo` times configs/demo/*.yaml as they are; `published` times configs/mambatalk.yaml at batch 2 (stage-1 models and
the FGD autoencoder randomly initialised: only the speed is measured). Data: a `test`-preset synthetic dataset written
to a temporary folder.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import torch  # noqa: E402

from dataloaders.synthetic import write_demo_dataset  # noqa: E402
from models.motion_representation import STAGE1_FILES, VAESKConv, build_stage1_models  # noqa: E402
from trainers import build_trainer  # noqa: E402
from utils.checkpoint import save_weights  # noqa: E402
from utils.config import load_config  # noqa: E402

DEMO = ["cnn_vqvae_face_30", "cnn_vqvae_upper_30", "cnn_vqvae_hands_30", "cnn_vqvae_lower_foot_30",
        "cnn_vqvae_lower_30", "aeskconv", "mambatalk"]


def random_stage1(args, folder, data_path):
    """Randomly initialised stage-1 models and FGD autoencoder where the MambaTalk trainer looks for them."""
    torch.manual_seed(0)
    for name, model in build_stage1_models(args).items():
        save_weights(model, Path(folder) / "pretrained_vq" / STAGE1_FILES[name])
    save_weights(VAESKConv(args), Path(data_path) / args.e_path)


def time_steps(config, overrides, steps):
    args = load_config(config, overrides)
    if args.trainer == "mambatalk":
        random_stage1(args, args.data_path_1, args.data_path)
    trainer = build_trainer(args)
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.train_loader)
            batch = next(batches)
        trainer.train_step(batch)
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
    return dt, args.batch_size * args.pose_length / dt, n_params, args.batch_size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="*", default=["demo"])
    p.add_argument("--batch_size", type=int, default=0, help="override every config's batch size (0 = keep)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rec_ver_weight", type=float, default=-1, help="override stage-1 vertex-loss weight (-1 = keep)")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        write_demo_dataset(work / "data", seed=0, preset="test")
        jobs = []
        for name in opts.configs:
            if name == "demo":
                jobs += [(f"configs/demo/{n}.yaml", {}) for n in DEMO]
            elif name == "published":
                jobs.append(("configs/mambatalk.yaml", {"batch_size": 2, "ctc_model": "none"}))
            else:
                jobs.append((name if name.endswith(".yaml") else f"configs/demo/{name}.yaml", {}))
        print(f"device {opts.device}, {torch.get_num_threads()} threads, {opts.steps} timed steps")
        for config, extra in jobs:
            overrides = {"data_path": str(work / "data") + "/", "root_path": str(work) + "/", "out_path": str(work / "runs") + "/",
                         "data_path_1": str(work / "pretrained") + "/", "device": opts.device, "max_steps": 0,
                         "pretrained_vq_dir": "", "stat": "none"} | extra
            if opts.batch_size:
                overrides["batch_size"] = opts.batch_size
            if opts.rec_ver_weight >= 0 and "vqvae" in config:
                overrides["rec_ver_weight"] = opts.rec_ver_weight
            dt, fps, n, batch = time_steps(config, overrides, opts.steps)
            print(f"{config:42s} batch {batch:4d}  {n / 1e6:6.2f} M params  "
                  f"{dt:7.3f} s/step  {fps:8.0f} frames/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
