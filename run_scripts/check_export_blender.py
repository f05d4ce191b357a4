"""Check export.py's files in a real animation tool: Blender, as a Python module, headless.

    pip install --no-deps bpy==5.0.1    # Python 3.11 only; a 374 MB wheel; not in requirements (see README)
    python run_scripts/check_export_blender.py --npy_path ../shared/beat2_sample/smplxflame_30/2_scott_0_1_1.npz

Exports the npz to BVH and glb (utils/export_motion.py) in a temporary folder, imports each file with Blender's
own importers (File > Import > Motion Capture (.bvh) / glTF 2.0), and compares, on sampled frames, the animated
world position of the head and both wrists with the body model's joints for the same npz; for the glb also the
skinned mesh Blender evaluates against the body model's vertices. Prints one line per file; exits 1 when the frame
count is wrong or a joint is more than --tolerance off.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.beat2 import read_motion  # noqa: E402
from utils.body_model import BodyModel  # noqa: E402
from utils.export_motion import export_motion, source_fps  # noqa: E402
from utils.skeleton import JOINT_NAMES  # noqa: E402

CHECKED = ("head", "left_wrist", "right_wrist")


def blender_to_smplx(p):
    """Both importers turn y-up files into Blender's z-up frame: (x, y, z) -> (x, -z, y). Undo it."""
    p = np.asarray(p, dtype=np.float64)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def armature(bpy):
    arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
    if len(arms) != 1:
        raise RuntimeError(f"expected one armature after import, found {len(arms)}")
    return arms[0]


def joint_positions(bpy, arm, frames, first_frame):
    scene = bpy.context.scene
    out = np.zeros((len(frames), len(CHECKED), 3))
    for i, f in enumerate(frames):
        scene.frame_set(first_frame + int(f))
        out[i] = [tuple(arm.matrix_world @ arm.pose.bones[name].head) for name in CHECKED]
    return blender_to_smplx(out)


def mesh_vertices(bpy, frame=None):
    """World positions of the imported mesh's vertices: as stored (rest pose) or skinned at `frame`."""
    obj = [o for o in bpy.data.objects if o.type == "MESH"][0]
    if frame is not None:
        bpy.context.scene.frame_set(frame)
        obj = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    co = np.zeros(len(obj.data.vertices) * 3)
    obj.data.vertices.foreach_get("co", co)
    world = np.array(obj.matrix_world)
    return blender_to_smplx(co.reshape(-1, 3) @ world[:3, :3].T + world[:3, 3])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npy_path", required=True)
    p.add_argument("--smplx_model_dir", default="./pretrained/smplx_models/")
    p.add_argument("--samples", type=int, default=12, help="frames compared, spread over the sequence")
    p.add_argument("--tolerance", type=float, default=0.01, help="metres")
    args = p.parse_args(argv)
    import bpy  # late: only this script needs Blender

    motion = read_motion(args.npy_path)
    body = BodyModel(args.smplx_model_dir)
    n = len(motion["poses"])
    frames = np.unique(np.linspace(0, n - 1, args.samples).round().astype(int))
    with torch.no_grad():
        out = body(motion["poses"][frames], motion["betas"], motion["expressions"][frames], motion["trans"][frames])
    want = out["joints"][:, [JOINT_NAMES.index(j) for j in CHECKED]].double().numpy()
    fps = source_fps(args.npy_path)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        bvh, glb = export_motion(args.npy_path, ["bvh", "glb"], tmp, body)

        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.import_anim.bvh(filepath=str(bvh), global_scale=0.01, frame_start=1, use_fps_scale=False,
                                update_scene_fps=True, rotate_mode="NATIVE")
        scene, arm = bpy.context.scene, armature(bpy)
        start, end = (int(round(x)) for x in arm.animation_data.action.frame_range)
        count = end - start + 1
        err = np.linalg.norm(joint_positions(bpy, arm, frames, start) - want, axis=-1)
        good = count == n and err.max() < args.tolerance
        ok &= good
        print(f"BVH: Blender {bpy.app.version_string} imported {count} frames (npz {n}) at {scene.render.fps} fps; "
              f"head/wrists max error {1000 * err.max():.3f} mm over {len(frames)} frames -> "
              f"{'ok' if good else 'FAIL'}")

        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.context.scene.render.fps = int(round(fps))  # the importer turns key times into frames at the scene rate
        bpy.ops.import_scene.gltf(filepath=str(glb))
        arm = armature(bpy)
        start, end = (int(round(x)) for x in arm.animation_data.action.frame_range)
        count = end - start + 1
        err = np.linalg.norm(joint_positions(bpy, arm, frames, start) - want, axis=-1)
        # the importer drops loose vertices and may reorder: match the imported rest mesh to the body's rest mesh
        mid = int(frames[len(frames) // 2])
        with torch.no_grad():
            rest = body.shaped_vertices(torch.as_tensor(motion["betas"])[None], torch.zeros(1, 100))[0].double()
            verts = body(motion["poses"][mid:mid + 1], motion["betas"], motion["expressions"][mid:mid + 1],
                         motion["trans"][mid:mid + 1])["vertices"][0].double().numpy()
        match_dist, match = cKDTree(rest.numpy()).query(mesh_vertices(bpy))
        mesh_err = np.linalg.norm(mesh_vertices(bpy, start + mid) - verts[match], axis=-1).max()
        good = count == n and err.max() < args.tolerance
        ok &= good
        print(f"glb: Blender imported {count} frames (npz {n}), {len(arm.pose.bones)} bones; head/wrists max error "
              f"{1000 * err.max():.3f} mm over {len(frames)} frames; skinned mesh at frame {mid}: max vertex error "
              f"{1000 * mesh_err:.3f} mm ({len(match)} vertices, matched within {1000 * match_dist.max():.3f} mm) -> "
              f"{'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
