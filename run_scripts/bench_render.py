"""Rendering speed on this machine: frames per second of each stage and of the whole render + encode.

    python run_scripts/bench_render.py [--seconds 10] [--width 1280 --height 720] [--npz X.npz --wav X.wav]

Defaults to the BEAT2 sample (../shared/beat2_sample) when present, else a synthetic motion. Target (issue 6):
>= 20 frames/s for render + encode at 1280x720 on 2 CPU cores.
"""
import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.body_model import BodyModel  # noqa: E402
from utils.video import (MotionMeshes, PanelRenderer, create_gl_context, fixed_panels, load_motion,  # noqa: E402
                         panel_layout, render_frame, render_npz)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "beat2_sample"


def synthetic_motion(path, frames):
    t = np.arange(frames)[:, None] / 30.0
    poses = (0.3 * np.sin(2 * np.pi * 0.5 * t + np.arange(165)[None])).astype(np.float32)
    np.savez(path, poses=poses, trans=np.zeros((frames, 3), np.float32), betas=np.zeros(300, np.float32),
             expressions=np.zeros((frames, 100), np.float32))


def pyrender_ms_per_frame(vertices, faces, width, height, frames=20):
    """The published path (spec §9 step 5): per frame and view a trimesh -> pyrender scene, rendered offscreen."""
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyrender
    import trimesh
    renderer = pyrender.OffscreenRenderer(width // 2, height)
    tilt, light = np.deg2rad(-2), np.deg2rad(-30)
    camera_pose = np.array([[1, 0, 0, 0], [0, np.cos(tilt), -np.sin(tilt), 1.0],
                            [0, np.sin(tilt), np.cos(tilt), 5.0], [0, 0, 0, 1]])
    light_pose = np.array([[1, 0, 0, 0], [0, np.cos(light), -np.sin(light), 0],
                           [0, np.sin(light), np.cos(light), 3], [0, 0, 0, 1]])

    def frame(i):
        views = []
        for _ in range(2):  # face close-up and body
            mesh = trimesh.Trimesh(vertices[i % len(vertices)], faces, vertex_colors=[220, 220, 220, 255],
                                   process=False)
            scene = pyrender.Scene()
            scene.add(pyrender.Mesh.from_trimesh(mesh, smooth=True))
            scene.add(pyrender.OrthographicCamera(xmag=1, ymag=1), pose=camera_pose)
            scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=4), pose=light_pose)
            views.append(renderer.render(scene)[0])
        return np.hstack(views)

    frame(0)
    per_frame = timed(lambda: frame(np.random.randint(len(vertices))), frames)
    renderer.delete()
    return per_frame * 1000


def cpu_seconds():
    """CPU time of this process and its finished children (ffmpeg), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    print(f"body model + normals: {per_frame * 1000:.1f} ms/frame")

    layout = panel_layout(args.width, 1)
    panels = fixed_panels([meshes], layout, args.height)
    arrays = [meshes.chunk_arrays(idx)]
    renderer = PanelRenderer(create_gl_context(), args.width, args.height, body.faces, body.num_vertices, 1)
    print(f"GL: {renderer.ctx.info['GL_RENDERER']} / {renderer.ctx.info['GL_VERSION']}")
    frame = iter(range(10**9))
    draw = lambda: render_frame(renderer, panels, arrays, next(frame) % len(idx))
    draw()
    per_frame = timed(draw, 60)
    renderer.ctx.release()
    print(f"render only (upload, 2 views, read back) {args.width}x{args.height}: {per_frame * 1000:.1f} ms/frame "
          f"= {1 / per_frame:.1f} frames/s")

    if importlib.util.find_spec("pyrender") is None:
        print("pyrender: not installed, the published renderer's figure is skipped")
    else:
        ms = pyrender_ms_per_frame(arrays[0][0], body.faces, args.width, args.height)
        print(f"pyrender (published path, render only, 2 views) {args.width}x{args.height}: {ms:.1f} ms/frame "
              f"= {1000 / ms:.1f} frames/s")

    start, cpu_start = time.perf_counter(), cpu_seconds()
    render_npz(npz, wav if wav and wav.is_file() else None, tmp.name, width=args.width, height=args.height,
               max_seconds=args.seconds, smplx_model_dir=args.smplx_model_dir, progress=False, body_model=body,
               preset=args.preset)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    frames = round(args.seconds * 30)
    print(f"render + encode ({args.preset}, with audio) {args.width}x{args.height}, {frames} frames: "
          f"{elapsed:.1f} s = {frames / elapsed:.1f} frames/s (target >= 20); CPU time (python + ffmpeg) "
          f"{cpu / frames * 1000:.0f} ms/frame, i.e. at most {os.cpu_count() * frames / cpu:.0f} frames/s on "
          f"{os.cpu_count()} idle cores")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (figures drop when other work shares the cores)")


if __name__ == "__main__":
    main()
