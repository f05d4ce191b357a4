"""Time export.py's writers on 60 s of motion (1800 frames at 30 fps).

    OMP_NUM_THREADS=2 python run_scripts/bench_export.py [--npy_path X.npz] [--seconds 60] [--threads 2]

Motion: the shared real sample (../shared/beat2_sample), repeated or cut to the length; without it a synthetic
swing. Prints, for BVH and glb, the median of --repeats runs of reading the npz, building the file and writing it
(the body model is loaded once beforehand, as infer.py has it already; its load time is printed separately).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataloaders.beat2 import read_motion, write_motion  # noqa: E402
from utils.body_model import BodyModel  # noqa: E402
from utils.export_motion import export_motion  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "beat2_sample" / "smplxflame_30" / "2_scott_0_1_1.npz"


def motion_of_length(path, frames):
    if path and Path(path).is_file():
        m = read_motion(path)
        reps = -(-frames // len(m["poses"]))
        return {k: (v if k == "betas" else np.concatenate([v] * reps)[:frames]) for k, v in m.items()}
    t = np.arange(frames)[:, None] / 30.0
    poses = (0.3 * np.sin(2 * np.pi * (0.5 + np.arange(165) / 165) * t)).astype(np.float32)
    return dict(poses=poses, trans=np.tile([0.0, 1.3, 0.0], (frames, 1)).astype(np.float32),
                betas=np.zeros(300, np.float32), expressions=np.zeros((frames, 100), np.float32))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npy_path", default=str(SAMPLE))
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smplx_model_dir", default=str(ROOT / "pretrained" / "smplx_models"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    frames = int(round(args.seconds * 30))
    t0 = time.perf_counter()
    body = BodyModel(args.smplx_model_dir)
    load = time.perf_counter() - t0
    print(f"body: {body.description}; load {load:.2f} s; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "motion.npz"
        m = motion_of_length(args.npy_path, frames)
        write_motion(npz, m["betas"], m["poses"], m["expressions"], m["trans"])
        for fmt in ("bvh", "glb"):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                path, = export_motion(npz, [fmt], tmp, body)
                times.append(time.perf_counter() - t0)
            print(f"{fmt}: {frames} frames ({frames / 30:.0f} s of motion) in {statistics.median(times):.3f} s "
                  f"(median of {args.repeats}; runs {', '.join(f'{t:.3f}' for t in times)}); "
                  f"{path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
