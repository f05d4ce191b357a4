"""Export BEAT2-layout motion to animation tools: BVH and glTF 2.0 binary (.glb).

Both files hold the 55 SMPL-X joints with their usual names and parent table (utils/skeleton.py), bone offsets from
the body model's rest joints for the npz's `betas`, and the rest pose of SMPL-X (a T-pose, every joint's rest
orientation the identity), so a frame's local joint rotations are the npz's axis-angle poses as they are.

Axes and units: those of BEAT2's capture frame and of SMPL-X, which are glTF's: right-handed, y up, the body facing
+z, its left at +x, the floor near y = 0 (BEAT2's root translation stands the body on it).
  - glb: metres (glTF's unit). Importers convert to their own frame (Blender z up, Unity left-handed).
  - BVH: centimetres by default (the usual BVH unit: MotionBuilder, Maya, most mocap libraries), `bvh_units='m'`
    for metres. Rotation channels are Euler angles in degrees, order ZXY: "Zrotation Xrotation Yrotation", i.e.
    R = Rz @ Rx @ Ry (intrinsic, the listed order), the most common BVH order; each channel is unwrapped along
    time so that no angle jumps by 360 degrees between frames. The root has position channels (the pelvis's world
    position) and OFFSET 0 so that readers that add OFFSET to the position channels and readers that do not agree.

SMPL-X's expression blend shapes also move its face joints (jaw, eyes) a little per frame: the rest skeleton uses
the neutral expression and those joints get position channels (BVH, replacing OFFSET as Blender and bvhio read them)
or translation keys (glb). Not held: SMPL-X's pose-corrective blend shapes (the glb mesh is skinned by linear blend
skinning only); the stand-in body has none.
"""
import io
import logging
from pathlib import Path

import numpy as np
import pygltflib
import torch

from dataloaders.beat2 import read_motion
from utils.checkpoint import atomic_write
from utils.rotation import axis_angle_to_matrix, matrix_to_quaternion
from utils.skeleton import JOINT_NAMES, NUM_JOINTS, PARENTS

logger = logging.getLogger("mambatalk")

FORMATS = ("bvh", "glb")
BVH_UNITS = {"cm": 100.0, "m": 1.0}
DEFAULT_FPS = 30.0
MAX_INFLUENCES = 8  # glTF skin weights per vertex: up to two JOINTS_n/WEIGHTS_n sets of 4


def children_of(parents):
    kids = [[] for _ in parents]
    for k, p in enumerate(parents):
        if p >= 0:
            kids[p].append(k)
    return kids


def depth_first(parents):
    """Joint indices in the order a BVH hierarchy lists them (depth first, children in index order)."""
    kids, order, stack = children_of(parents), [], [parents.index(-1)]
    while stack:
        k = stack.pop()
        order.append(k)
        stack.extend(reversed(kids[k]))
    return order


# ---------------------------------------------------------------------------------------------- motion -> rig

def source_fps(path):
    """The npz's `mocap_frame_rate` when it stores a positive one (BEAT2 and our results do), else 30."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            rate = float(npz["mocap_frame_rate"]) if "mocap_frame_rate" in npz.files else 0.0
    except (ValueError, TypeError):
        rate = 0.0
    return rate if np.isfinite(rate) and rate > 0 else DEFAULT_FPS


def local_offsets(joints):
    """(..., 55, 3) joint positions -> each joint's position relative to its parent (the root's: itself)."""
    out = joints - joints[..., [max(p, 0) for p in PARENTS], :]
    out[..., 0, :] = joints[..., 0, :]
    return out


@torch.no_grad()
def build_rig(motion, body, translation=True):
    """Everything both writers need, float64 numpy, metres:
    rest_joints (55,3) for the motion's betas and a neutral expression; offsets (N,55,3) each joint's place in its
    parent's frame per frame, which differs from the rest offset only where expression blend shapes move joints (the
    real SMPL-X's face joints; `moving` lists those joints); local rotations rot (N,55,3,3); root_pos (N,3) = the
    pelvis's world position (+ trans; without translation it stays at the first frame's place, as render.py shows
    it); expressions (N,100); and the rest mesh (vertices for the betas, faces, skin weights, expression directions).
    """
    sm = body.smplx
    betas = torch.as_tensor(motion["betas"], dtype=torch.float32)[None]
    n_betas = betas.shape[1]
    rest = (body.rest_joints + torch.einsum("bl,jcl->bjc", betas, body.joint_dirs[..., :n_betas]))[0].double()
    expressions = torch.as_tensor(motion["expressions"], dtype=torch.float64)
    joints = rest + torch.einsum("nl,jcl->njc", expressions, body.joint_dirs[..., n_betas:].double())  # (N,55,3)
    rest, offsets = rest.numpy(), local_offsets(joints.numpy())
    moving = [k for k in range(1, NUM_JOINTS) if np.abs(offsets[:, k] - local_offsets(rest)[k]).max() > 1e-7]
    poses = torch.as_tensor(motion["poses"], dtype=torch.float64) + sm.pose_mean.double()  # SMPL-X hand mean pose
    rot = axis_angle_to_matrix(poses.view(-1, NUM_JOINTS, 3))
    trans = np.asarray(motion["trans"], np.float64)
    if not translation:
        trans = np.broadcast_to(trans[:1], trans.shape)
    verts = body.shaped_vertices(betas, torch.zeros(1, sm.expr_dirs.shape[-1]))[0]
    expr_dirs = sm.expr_dirs.numpy() if body.has_expression_shapes else None
    return {
        "rest_joints": rest, "offsets": offsets, "moving": moving, "rot": rot.numpy(),
        "root_pos": offsets[:, 0] + trans,
        "expressions": expressions.numpy(),
        "vertices": verts.double().numpy(), "faces": np.asarray(body.faces), "weights": sm.lbs_weights.numpy(),
        "expr_dirs": expr_dirs, "body": body.description,
    }


# ---------------------------------------------------------------------------------------------- BVH

def matrix_to_euler_zxy(R):
    """(..., 3, 3) -> (..., 3) angles (z, x, y) in radians with R = Rz(z) @ Rx(x) @ Ry(y).

    R[2,1] = sin x; R[0,1] = -sin z cos x, R[1,1] = cos z cos x; R[2,0] = -cos x sin y, R[2,2] = cos x cos y.
    At cos x = 0 (gimbal lock) z and y turn about the same axis: z = 0 and y takes the whole turn from R[0,2], R[0,0].
    """
    x = np.arctan2(R[..., 2, 1], np.hypot(R[..., 0, 1], R[..., 1, 1]))
    locked = np.hypot(R[..., 0, 1], R[..., 1, 1]) < 1e-9
    z = np.where(locked, 0.0, np.arctan2(-R[..., 0, 1], R[..., 1, 1]))
    y = np.where(locked, np.arctan2(R[..., 0, 2], R[..., 0, 0]), np.arctan2(-R[..., 2, 0], R[..., 2, 2]))
    return np.stack([z, x, y], axis=-1)


def bvh_text(rig, fps, units="cm"):
    if units not in BVH_UNITS:
        raise ValueError(f"BVH units must be one of {list(BVH_UNITS)}, got '{units}'")
    scale = BVH_UNITS[units]
    rest, kids = local_offsets(rig["rest_joints"]) * scale, children_of(PARENTS)
    rest[0] = 0.0  # the root's position channels hold its whole position
    positioned = {0, *rig["moving"]}
    with_position = "CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation"
    lines = ["HIERARCHY"]

    def emit(k, depth):
        pad = "  " * depth
        lines.extend([f"{pad}{'JOINT' if PARENTS[k] >= 0 else 'ROOT'} {JOINT_NAMES[k]}", pad + "{",
                      f"{pad}  OFFSET {rest[k, 0]:.6f} {rest[k, 1]:.6f} {rest[k, 2]:.6f}",
                      f"{pad}  {with_position if k in positioned else 'CHANNELS 3 Zrotation Xrotation Yrotation'}"])
        for c in kids[k]:
            emit(c, depth + 1)
        if not kids[k]:  # a leaf ends in an End Site half its own bone further on (it only sets the bone's length)
            tip = 0.5 * rest[k]
            lines.extend([f"{pad}  End Site", f"{pad}  {{", f"{pad}    OFFSET {tip[0]:.6f} {tip[1]:.6f} {tip[2]:.6f}",
                          f"{pad}  }}"])
        lines.append(pad + "}")

    emit(PARENTS.index(-1), 0)
    n = rig["rot"].shape[0]
    euler = np.degrees(np.unwrap(matrix_to_euler_zxy(rig["rot"]), axis=0))  # (N, 55, 3)
    # position channels replace OFFSET (as Blender and bvhio read them): the root's world position, a moving
    # joint's place in its parent's frame
    columns = []
    for k in depth_first(PARENTS):
        if k in positioned:
            columns.append(scale * (rig["root_pos"] if k == 0 else rig["offsets"][:, k]))
        columns.append(euler[:, k])
    lines += ["MOTION", f"Frames: {n}", f"Frame Time: {1.0 / fps:.8f}"]
    body = io.StringIO()
    np.savetxt(body, np.concatenate(columns, axis=1), fmt="%.6f")
    return "\n".join(lines) + "\n" + body.getvalue()


# ---------------------------------------------------------------------------------------------- glTF

class GlbBuilder:
    """Binary chunk plus the bufferViews and accessors that point into it."""

    def __init__(self):
        self.gltf = pygltflib.GLTF2(asset=pygltflib.Asset(version="2.0", generator="MambaTalk export.py (pygltflib)"))
        self.gltf.buffers.append(pygltflib.Buffer(byteLength=0))
        self.chunks, self.size = [], 0

    def view(self, array, target=None):
        data = np.ascontiguousarray(array).tobytes()
        pad = (-self.size) % 4
        if pad:
            self.chunks.append(b"\0" * pad)
            self.size += pad
        self.gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=self.size, byteLength=len(data),
                                                          target=target))
        self.chunks.append(data)
        self.size += len(data)
        return len(self.gltf.bufferViews) - 1

    def accessor(self, array, kind, target=None, bounds=False, view=None, offset=0, count=None):
        """array's dtype picks the component type; `view`/`offset`/`count` address part of an existing view."""
        component = {np.dtype(np.float32): pygltflib.FLOAT, np.dtype(np.uint8): pygltflib.UNSIGNED_BYTE,
                     np.dtype(np.uint16): pygltflib.UNSIGNED_SHORT,
                     np.dtype(np.uint32): pygltflib.UNSIGNED_INT}[array.dtype]
        if view is None:
            view = self.view(array, target)
        width = {pygltflib.SCALAR: 1, pygltflib.VEC3: 3, pygltflib.VEC4: 4, pygltflib.MAT4: 16}[kind]
        flat = array.reshape(-1, width)
        acc = pygltflib.Accessor(bufferView=view, byteOffset=offset, componentType=component,
                                 count=len(flat) if count is None else count, type=kind)
        if bounds:
            acc.min, acc.max = flat.min(0).tolist(), flat.max(0).tolist()
        self.gltf.accessors.append(acc)
        return len(self.gltf.accessors) - 1

    def glb(self):
        self.gltf.buffers[0].byteLength = self.size
        self.gltf.set_binary_blob(b"".join(self.chunks))
        return b"".join(self.gltf.save_to_bytes())


def vertex_normals(verts, faces):
    """Area-weighted vertex normals; vertices in no face (the stand-in's joint markers) get +y."""
    tri = verts[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(verts)
    for c in range(3):
        np.add.at(normals, faces[:, c], face_n)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 1e-12, normals / np.maximum(length, 1e-12), (0.0, 1.0, 0.0))


def skin_influences(weights):
    """Per-vertex joint indices and weights, the largest first, in sets of 4 (up to MAX_INFLUENCES), renormalised."""
    used = int((weights > 0).sum(1).max())
    k = min(MAX_INFLUENCES, 4 * -(-max(used, 1) // 4))
    idx = np.argsort(-weights, axis=1)[:, :k]
    w = np.take_along_axis(weights, idx, axis=1).astype(np.float64)
    w = np.where(w > 0, w, 0.0)
    w /= w.sum(1, keepdims=True)
    idx = np.where(w > 0, idx, 0)  # unused slots: joint 0 with weight 0
    return idx.astype(np.uint8), w.astype(np.float32)


def glb_bytes(rig, fps):
    b = GlbBuilder()
    g = b.gltf
    rest, n = rig["rest_joints"], rig["rot"].shape[0]

    # skeleton: node k is joint k, rest translation relative to its parent, rest rotation the identity
    for k, (name, t) in enumerate(zip(JOINT_NAMES, local_offsets(rest))):
        g.nodes.append(pygltflib.Node(name=name, translation=t.tolist(), children=children_of(PARENTS)[k]))
    inverse_bind = np.tile(np.eye(4), (NUM_JOINTS, 1, 1))
    inverse_bind[:, :3, 3] = -rest
    # glTF matrices are column-major: a transposed row-major 4x4 written in C order
    ibm = b.accessor(inverse_bind.transpose(0, 2, 1).astype(np.float32), pygltflib.MAT4)
    g.skins.append(pygltflib.Skin(name="smplx_skeleton", joints=list(range(NUM_JOINTS)), skeleton=0,
                                  inverseBindMatrices=ibm))

    # mesh: the rest vertices for the betas, skin weights, optional expression morph targets
    verts, faces = rig["vertices"], rig["faces"]
    attrs = pygltflib.Attributes(
        POSITION=b.accessor(verts.astype(np.float32), pygltflib.VEC3, pygltflib.ARRAY_BUFFER, bounds=True),
        NORMAL=b.accessor(vertex_normals(verts, faces).astype(np.float32), pygltflib.VEC3, pygltflib.ARRAY_BUFFER))
    joints, weights = skin_influences(rig["weights"])
    for s in range(joints.shape[1] // 4):
        setattr(attrs, f"JOINTS_{s}", b.accessor(joints[:, 4 * s:4 * s + 4], pygltflib.VEC4, pygltflib.ARRAY_BUFFER))
        setattr(attrs, f"WEIGHTS_{s}", b.accessor(weights[:, 4 * s:4 * s + 4], pygltflib.VEC4, pygltflib.ARRAY_BUFFER))
    index_type = np.uint16 if len(verts) < 65535 else np.uint32
    prim = pygltflib.Primitive(attributes=attrs, mode=pygltflib.TRIANGLES,
                               indices=b.accessor(faces.astype(index_type).reshape(-1), pygltflib.SCALAR,
                                                  pygltflib.ELEMENT_ARRAY_BUFFER, bounds=True))
    mesh = pygltflib.Mesh(name="body", primitives=[prim])
    expr_dirs = rig["expr_dirs"]
    if expr_dirs is not None:
        n_expr = expr_dirs.shape[-1]
        prim.targets = [{"POSITION": b.accessor(np.ascontiguousarray(expr_dirs[..., e], np.float32), pygltflib.VEC3,
                                                pygltflib.ARRAY_BUFFER, bounds=True)} for e in range(n_expr)]
        mesh.weights = [0.0] * n_expr
        mesh.extras = {"targetNames": [f"expression_{e:03d}" for e in range(n_expr)]}
    g.meshes.append(mesh)
    g.nodes.append(pygltflib.Node(name="body", mesh=0, skin=0))
    g.scenes.append(pygltflib.Scene(name="MambaTalk", nodes=[0, len(g.nodes) - 1]))
    g.scene = 0

    # animation: a rotation per joint, the root's translation, expression weights; one shared time axis
    anim = pygltflib.Animation(name="motion")
    times = b.accessor((np.arange(n) / fps).astype(np.float32), pygltflib.SCALAR, bounds=True)

    def channel(node, path, output):
        anim.samplers.append(pygltflib.AnimationSampler(input=times, output=output, interpolation="LINEAR"))
        anim.channels.append(pygltflib.AnimationChannel(sampler=len(anim.samplers) - 1,
                                                        target=pygltflib.AnimationChannelTarget(node=node, path=path)))

    channel(0, "translation", b.accessor(rig["root_pos"].astype(np.float32), pygltflib.VEC3))
    for k in rig["moving"]:
        channel(k, "translation", b.accessor(np.ascontiguousarray(rig["offsets"][:, k], np.float32), pygltflib.VEC3))
    quat = matrix_to_quaternion(torch.from_numpy(rig["rot"])).numpy()  # (N, 55, 4) w, x, y, z
    quat = quat[..., [1, 2, 3, 0]]  # glTF: x, y, z, w
    # neighbouring frames on the same hemisphere, so that interpolation between them takes the short way
    flips = np.cumsum(np.sum(quat[1:] * quat[:-1], axis=-1) < 0, axis=0) % 2
    quat[1:] *= np.where(flips, -1.0, 1.0)[..., None]
    by_joint = np.ascontiguousarray(quat.transpose(1, 0, 2), np.float32)  # (55, N, 4): one joint's keys together
    rot_view = b.view(by_joint)
    for k in range(NUM_JOINTS):
        channel(k, "rotation", b.accessor(by_joint[k], pygltflib.VEC4, view=rot_view, offset=k * n * 16))
    if expr_dirs is not None:
        channel(len(g.nodes) - 1, "weights", b.accessor(rig["expressions"][:, :expr_dirs.shape[-1]].astype(np.float32),
                                                        pygltflib.SCALAR))
    g.animations.append(anim)
    return b.glb()


# ---------------------------------------------------------------------------------------------- files

def export_motion(npy_path, formats, out_dir, body, translation=True, fps=None, bvh_units="cm"):
    """Write `<out_dir>/<npz stem>.<format>` for each format; returns the paths.

    The input is read and checked and every file built in memory before anything is written; each file is written
    atomically, and when one cannot be written the others of this call are removed: all or nothing in `out_dir`."""
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"export formats must be among {list(FORMATS)}, got {formats}")
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"frame rate must be positive, got {fps}")
    npy_path, out_dir = Path(npy_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export folder {out_dir} exists and is not a folder")
    motion = read_motion(npy_path)  # names the file on a missing key, a bad shape, NaN or no frames
    if bvh_units not in BVH_UNITS:
        raise ValueError(f"BVH units must be one of {list(BVH_UNITS)}, got '{bvh_units}'")
    fps = fps or source_fps(npy_path)
    rig = build_rig(motion, body, translation)
    payloads = {}
    for fmt in formats:
        payloads[fmt] = bvh_text(rig, fps, bvh_units).encode() if fmt == "bvh" else glb_bytes(rig, fps)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt, data in payloads.items():
        path = out_dir / f"{npy_path.stem}.{fmt}"
        try:
            with atomic_write(path) as tmp:
                tmp.write_bytes(data)
        except OSError as e:  # e.g. the disk is full: take back this call's other files too
            for done in paths:
                done.unlink(missing_ok=True)
            raise OSError(f"{path}: cannot write ({e.strerror or e}); no file written") from None
        paths.append(path)
    for path in paths:
        logger.info(f"wrote {path}: {len(motion['poses'])} frames at {fps:g} fps ({rig['body']})")
    return paths
