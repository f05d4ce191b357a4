"""Rendering speed on this machine: frames per second of each stage and of the whole render + encode.

    python run_scripts/bench_render.py [--seconds 10] [--width 1280 --height 720] [--npz X.npz --wav X.wav]

Defaults to the BEAT2 sample (../shared/beat2_sample) when present, else a synthetic motion. Target (issue 6):
>= 20 frames/s for render + encode at 1280x720 on 2 CPU cores.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.body_model import BodyModel  # noqa: E402
from utils.video import (MotionMeshes, PanelRenderer, load_motion, panel_layout,  # noqa: E402
                         render_npz)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "beat2_sample"


def synthetic_motion(path, frames):
    t = np.arange(frames)[:, None] / 30.0
    poses = (0.3 * np.sin(2 * np.pi * 0.5 * t + np.arange(165)[None])).astype(np.float32)
    np.savez(path, poses=poses, trans=np.zeros((frames, 3), np.float32), betas=np.zeros(300, np.float32),
             expressions=np.zeros((frames, 100), np.float32))


def timed(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", default=str(SAMPLE / "smplxflame_30" / "2_scott_0_1_1.npz"))
    parser.add_argument("--wav", default=str(SAMPLE / "wave16k" / "2_scott_0_1_1.wav"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--smplx_model_dir", default="./pretrained/smplx_models/")
    parser.add_argument("--preset", default="veryfast", help="x264 preset")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    npz, wav = Path(args.npz), Path(args.wav)
    if not npz.is_file():
        npz, wav = Path(tmp.name) / "synthetic.npz", None
        synthetic_motion(npz, int(args.seconds * 30))
    body = BodyModel(args.smplx_model_dir)
    print(f"cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, body: {body.description} "
          f"({body.num_vertices} vertices, {len(body.faces)} faces), motion: {npz.name}")

    meshes = MotionMeshes(load_motion(npz), body, translation=False, chunk=32)
    idx = np.arange(32)
    per_frame = timed(lambda: meshes.chunk_arrays(idx), 3) / len(idx)
    print(f"body model + normals (close-up and body): {per_frame * 1000:.1f} ms/frame")

    layout = panel_layout(args.width, 1)
    cameras = list(reversed(meshes.cameras(layout[1][1] / args.height, layout[0][1] / args.height)))
    arrays = meshes.chunk_arrays(idx)
    renderer = PanelRenderer(args.width, args.height, body.faces, body.num_vertices, 2)
    print(f"GL: {renderer.ctx.info['GL_RENDERER']} / {renderer.ctx.info['GL_VERSION']}")
    frame = iter(range(10**9))
    draw = lambda: renderer.render([(v[next(frame) % 32], n[0]) for v, n in arrays], cameras, layout)
    draw()
    per_frame = timed(draw, 60)
    renderer.release()
    print(f"render only (upload, 2 views, read back) {args.width}x{args.height}: {per_frame * 1000:.1f} ms/frame "
          f"= {1 / per_frame:.1f} frames/s")

    start = time.perf_counter()
    render_npz(npz, wav if wav and wav.is_file() else None, tmp.name, width=args.width, height=args.height,
               max_seconds=args.seconds, smplx_model_dir=args.smplx_model_dir, progress=False, body_model=body,
               preset=args.preset)
    elapsed = time.perf_counter() - start
    frames = round(args.seconds * 30)
    print(f"render + encode ({args.preset}, with audio) {args.width}x{args.height}, {frames} frames: "
          f"{elapsed:.1f} s = {frames / elapsed:.1f} frames/s (target >= 20)")


if __name__ == "__main__":
    main()
