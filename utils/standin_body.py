"""Built-in stand-in body: a skinned mannequin written in the SMPL-X npz format.

SMPL-X cannot be downloaded here, yet foot contact, metrics and rendering need joints and a mesh. This module builds,
deterministically, a ~1.75 m mannequin with the 55 SMPL-X joints (same order and parents, rest pose close to the
SMPL-X neutral template: y up, facing +z, left at +x, T-pose, soles near y = -1.31 so BEAT2 translations put it on
the floor) and one ellipsoid per joint (torso, limbs, head, jaw, eyes, palms, 15 finger segments per hand). It is
written as `<dir>/smplx/SMPLX_NEUTRAL_2020.npz` so that the same `smplx.create(...)` call loads it.

Joints are exact: each joint has a hidden marker vertex (in no face) at its rest position, skinned to the joint's
parent, and `J_regressor` is one-hot on it; so the posed marker equals the posed joint. Shape: the first beta scales
the body by 2 % per unit; other betas, all 100 expressions and all pose correctives are zero. The vertices that
smplx reads as extra joints (nose, eyes, ears, finger tips, toes, heels) are placed at those body points.
"""
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from smplx.vertex_ids import vertex_ids as SMPLX_VERTEX_IDS

from utils.skeleton import NUM_JOINTS, PARENTS

NUM_SHAPE, NUM_EXPRESSION = 300, 100
NPZ_NAME = "SMPLX_NEUTRAL_2020.npz"
HEIGHT_SCALE_PER_BETA = 0.02

# Rest positions (metres) of the left and midline joints; right joints mirror the left ones in x.
BODY_JOINTS = {
    0: (0.0, -0.35, 0.01), 1: (0.065, -0.445, -0.005), 3: (0.0, -0.235, -0.015), 4: (0.11, -0.82, 0.0),
    6: (0.0, -0.105, 0.0), 7: (0.075, -1.225, -0.045), 9: (0.0, -0.05, 0.02), 10: (0.12, -1.28, 0.075),
    12: (0.0, 0.115, -0.02), 13: (0.045, 0.03, -0.005), 15: (0.0, 0.27, 0.0), 16: (0.18, 0.085, -0.02),
    18: (0.435, 0.06, -0.04), 20: (0.69, 0.065, -0.045), 22: (0.0, 0.26, 0.035), 23: (0.032, 0.355, 0.105),
}
MIRROR = {2: 1, 5: 4, 8: 7, 11: 10, 14: 13, 17: 16, 19: 18, 21: 20, 24: 23}
# Left hand, relative to the wrist (palm down, thumb forward): first knuckle, three segment lengths along x, radius.
# Order of §3.1: index, middle, pinky, ring, thumb.
FINGERS = [
    ((0.095, 0.005, 0.025), (0.036, 0.024, 0.022), 0.0095),
    ((0.100, 0.005, 0.000), (0.040, 0.027, 0.024), 0.0100),
    ((0.082, 0.000, -0.042), (0.028, 0.019, 0.018), 0.0085),
    ((0.093, 0.003, -0.022), (0.036, 0.025, 0.022), 0.0095),
]
THUMB = [(0.025, -0.010, 0.030), (0.055, -0.015, 0.052), (0.080, -0.018, 0.065), (0.100, -0.020, 0.075)]
THUMB_RADIUS = 0.011
# Ellipsoid resolution (latitude bands, longitude segments) by part size.
RES_LARGE, RES_LIMB, RES_MEDIUM, RES_SMALL = (22, 28), (20, 24), (14, 18), (8, 10)


def rest_joints():
    """(55, 3) float64 rest joint positions."""
    J = np.zeros((NUM_JOINTS, 3))
    for k, p in BODY_JOINTS.items():
        J[k] = p
    for right, left in MIRROR.items():
        J[right] = J[left] * (-1.0, 1.0, 1.0)
    for side, wrist, first in ((1.0, 20, 25), (-1.0, 21, 40)):
        for f, (knuckle, lengths, _) in enumerate(FINGERS):
            p = np.array(knuckle)
            for s in range(3):
                J[first + 3 * f + s] = J[wrist] + p * (side, 1.0, 1.0)
                p = p + (lengths[s], 0.0, 0.0)
        for s in range(3):
            J[first + 12 + s] = J[wrist] + np.array(THUMB[s]) * (side, 1.0, 1.0)
    return J


def finger_tips(J):
    """(10, 3) tip points: left index, middle, pinky, ring, thumb, then the right hand."""
    tips = []
    for side, wrist, first in ((1.0, 20, 25), (-1.0, 21, 40)):
        for f, (_, lengths, _) in enumerate(FINGERS):
            tips.append(J[first + 3 * f + 2] + (side * lengths[2], 0.0, 0.0))
        tips.append(J[wrist] + np.array(THUMB[3]) * (side, 1.0, 1.0))
    return np.array(tips)


def ellipsoid(n_lat, n_lon):
    """Unit sphere around +z: south pole, n_lat-1 rings of n_lon, north pole; faces wound outward."""
    alpha = np.pi * np.arange(1, n_lat) / n_lat
    phi = 2 * np.pi * np.arange(n_lon) / n_lon
    rings = np.stack([np.outer(np.sin(alpha), np.cos(phi)), np.outer(np.sin(alpha), np.sin(phi)),
                      np.outer(-np.cos(alpha), np.ones(n_lon))], axis=-1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, 0.0, -1.0]], rings, [[0.0, 0.0, 1.0]]])
    rings_idx = 1 + np.arange((n_lat - 1) * n_lon).reshape(n_lat - 1, n_lon)  # ring k, segment j
    next_idx = np.roll(rings_idx, -1, axis=1)  # the neighbour at j + 1 around the ring
    north = len(verts) - 1
    faces = [np.stack([np.zeros(n_lon, int), next_idx[0], rings_idx[0]], 1)]
    for k in range(n_lat - 2):
        a, b, c, d = rings_idx[k], next_idx[k], next_idx[k + 1], rings_idx[k + 1]
        faces += [np.stack([a, b, c], 1), np.stack([a, c, d], 1)]
    faces.append(np.stack([np.full(n_lon, north), rings_idx[-1], next_idx[-1]], 1))
    return verts, np.concatenate(faces)


def part_specs(J):
    """One ellipsoid per joint: (joint, pole_start, pole_end, radius_v, radius_w, hint for v, blend, resolution).

    The ellipsoid runs between its poles; v is `hint` made perpendicular to the axis. Vertices are skinned to `joint`,
    blending into the parent over `blend` metres around the joint along the axis (0 = rigid).
    """
    X, Y = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])

    def along(a, b, before, after):
        u = (b - a) / np.linalg.norm(b - a)
        return a - before * u, b + after * u

    specs = [
        (0, (-0.17, -0.40, 0.0), (0.17, -0.40, 0.0), 0.11, 0.11, Y, 0.0, RES_LARGE),
        (3, (0.0, -0.33, 0.0), (0.0, -0.04, 0.01), 0.145, 0.105, X, 0.05, RES_LARGE),
        (6, (0.0, -0.2, 0.0), (0.0, 0.07, 0.01), 0.15, 0.10, X, 0.05, RES_LARGE),
        (9, (0.0, -0.13, 0.01), (0.0, 0.17, -0.01), 0.175, 0.11, X, 0.05, RES_LARGE),
        (12, (0.0, 0.08, -0.02), (0.0, 0.30, 0.0), 0.055, 0.055, X, 0.04, RES_MEDIUM),
        (15, (0.0, 0.225, 0.02), (0.0, 0.445, 0.02), 0.08, 0.10, X, 0.04, RES_LARGE),
        (22, (0.0, 0.29, 0.0), (0.0, 0.235, 0.1), 0.055, 0.03, X, 0.0, RES_MEDIUM),
    ]
    for eye in (23, 24):
        c = J[eye]
        specs.append((eye, c - (0, 0, 0.013), c + (0, 0, 0.013), 0.013, 0.013, X, 0.0, RES_SMALL))
    for side, (collar, shoulder, elbow, wrist, hip, knee, ankle, foot) in (
            (1.0, (13, 16, 18, 20, 1, 4, 7, 10)), (-1.0, (14, 17, 19, 21, 2, 5, 8, 11))):
        a, f = J[ankle], J[foot]
        specs += [
            (collar, *along(J[collar], J[shoulder], 0.02, 0.02), 0.05, 0.05, Y, 0.03, RES_MEDIUM),
            (shoulder, *along(J[shoulder], J[elbow], 0.04, 0.03), 0.05, 0.05, Y, 0.04, RES_LIMB),
            (elbow, *along(J[elbow], J[wrist], 0.03, 0.02), 0.04, 0.045, Y, 0.03, RES_LIMB),
            (wrist, J[wrist] + (-0.015 * side, 0.0, -0.008), J[wrist] + (0.105 * side, 0.003, -0.008),
             0.022, 0.048, Y, 0.02, RES_MEDIUM),
            (hip, *along(J[hip] + (0, 0.05, 0), J[knee], 0.0, 0.03), 0.085, 0.08, X, 0.06, RES_LIMB),
            (knee, *along(J[knee], J[ankle], 0.03, 0.035), 0.055, 0.06, X, 0.04, RES_LIMB),
            (ankle, (a[0], -1.265, a[2] - 0.065), (f[0], -1.27, f[2] + 0.01), 0.04, 0.045, Y, 0.0, RES_MEDIUM),
            (foot, (f[0], -1.283, f[2] - 0.04), (f[0] + 0.005 * side, -1.285, f[2] + 0.06), 0.022, 0.042, Y,
             0.02, RES_MEDIUM),
        ]
    tips = finger_tips(J)
    for hand, first in enumerate((25, 40)):
        for f in range(5):
            chain = [J[first + 3 * f + s] for s in range(3)] + [tips[5 * hand + f]]
            radius = THUMB_RADIUS if f == 4 else FINGERS[f][2]
            for s in range(3):
                r = radius * (1.0 - 0.08 * s)
                specs.append((first + 3 * f + s, *along(chain[s], chain[s + 1], 0.006, 0.004 if s < 2 else 0.0),
                              r, r, Y, r, RES_SMALL))
    assert sorted(s[0] for s in specs) == list(range(NUM_JOINTS))
    return specs


def build_mesh(J):
    """Vertices (V,3), faces (F,3), skinning weights (V,55); the last 55 vertices are the joint markers."""
    verts, faces, weights = [], [], []
    offset = 0
    for joint, p0, p1, r_v, r_w, hint, blend, (n_lat, n_lon) in part_specs(J):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        u = (p1 - p0) / np.linalg.norm(p1 - p0)
        v = hint - (hint @ u) * u
        v /= np.linalg.norm(v)
        w = np.cross(u, v)  # (v, w, u) is right-handed, so outward winding is kept
        unit, tri = ellipsoid(n_lat, n_lon)
        half = np.linalg.norm(p1 - p0) / 2
        pts = (p0 + p1) / 2 + unit[:, :1] * r_v * v + unit[:, 1:2] * r_w * w + unit[:, 2:] * half * u
        wts = np.zeros((len(pts), NUM_JOINTS))
        parent = PARENTS[joint]
        to_parent = np.zeros(len(pts))
        if blend > 0 and parent >= 0:
            to_parent = np.clip(0.5 - ((pts - J[joint]) @ u) / (2 * blend), 0.0, 1.0)
            wts[:, parent] = to_parent
        wts[:, joint] = 1.0 - to_parent
        verts.append(pts)
        faces.append(tri + offset)
        weights.append(wts)
        offset += len(pts)
    markers = np.zeros((NUM_JOINTS, NUM_JOINTS))
    markers[np.arange(NUM_JOINTS), [max(p, 0) for p in PARENTS]] = 1.0
    return np.concatenate(verts + [J]), np.concatenate(faces), np.concatenate(weights + [markers])


def keypoint_targets(J):
    """Body points for the vertex ids smplx reads as extra joints (nose, eyes, ears, finger tips, toes, heels)."""
    tips = finger_tips(J)
    t = {"nose": (0.0, 0.33, 0.125), "leye": (0.032, 0.355, 0.12), "reye": (-0.032, 0.355, 0.12),
         "lear": (0.08, 0.34, 0.02), "rear": (-0.08, 0.34, 0.02)}
    for hand, prefix in enumerate("lr"):
        for f, name in enumerate(("index", "middle", "pinky", "ring", "thumb")):
            t[prefix + name] = tips[5 * hand + f]
    for side, prefix, ankle, foot in ((1.0, "L", 7, 10), (-1.0, "R", 8, 11)):
        f, a = J[foot], J[ankle]
        t[prefix + "BigToe"] = (f[0] - 0.015 * side, -1.29, f[2] + 0.07)
        t[prefix + "SmallToe"] = (f[0] + 0.03 * side, -1.29, f[2] + 0.05)
        t[prefix + "Heel"] = (a[0], -1.29, a[2] - 0.105)
    return {name: np.asarray(p, float) for name, p in t.items()}


def place_keypoints(verts, faces, weights, J):
    """Reorder vertices so that smplx's extra-joint vertex ids land on the matching body points."""
    n_mesh = len(verts) - NUM_JOINTS  # markers are never picked
    order = np.arange(len(verts))  # new index -> old index
    where = np.arange(len(verts))  # old index -> new index
    taken = set()
    for name, target in keypoint_targets(J).items():
        dist = np.linalg.norm(verts[:n_mesh] - target, axis=1)
        dist[list(taken)] = np.inf
        old = int(np.argmin(dist))
        taken.add(old)
        new = SMPLX_VERTEX_IDS["smplx"][name]
        displaced = order[new]
        order[new], order[where[old]] = old, displaced
        where[displaced], where[old] = where[old], new
    return verts[order], where[faces], weights[order], where[n_mesh:]


def landmark_faces(verts, faces, count=51):
    """`count` faces spread over the front of the head (smplx interpolates its 51 face landmarks there)."""
    centroid = verts[faces].mean(1)
    front = np.flatnonzero((centroid[:, 2] > 0.08) & (centroid[:, 1] > 0.25) & (np.abs(centroid[:, 0]) < 0.06))
    front = front[np.lexsort((centroid[front, 0], -centroid[front, 1]))]
    return front[np.linspace(0, len(front) - 1, count).round().astype(np.int64)]


def build_standin():
    """All arrays of the stand-in npz (deterministic)."""
    J = rest_joints()
    verts, faces, weights = build_mesh(J)
    verts, faces, weights, marker_idx = place_keypoints(verts, faces, weights, J)
    V = len(verts)
    J_regressor = np.zeros((NUM_JOINTS, V))
    J_regressor[np.arange(NUM_JOINTS), marker_idx] = 1.0
    shapedirs = np.zeros((V, 3, NUM_SHAPE + NUM_EXPRESSION), np.float32)
    shapedirs[:, :, 0] = HEIGHT_SCALE_PER_BETA * verts
    kintree = np.stack([np.array(PARENTS, np.int64) % 2**32, np.arange(NUM_JOINTS)]).astype(np.uint32)
    return {
        "v_template": verts.astype(np.float32),
        "f": faces.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": np.zeros((V, 3, 9 * (NUM_JOINTS - 1)), np.float32),
        "J_regressor": J_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "kintree_table": kintree,
        "hands_componentsl": np.eye(45, dtype=np.float32),
        "hands_componentsr": np.eye(45, dtype=np.float32),
        "hands_meanl": np.zeros(45, np.float32),
        "hands_meanr": np.zeros(45, np.float32),
        "lmk_faces_idx": landmark_faces(verts, faces),
        "lmk_bary_coords": np.full((51, 3), 1.0 / 3.0, np.float32),
    }


def write_npz(arrays, path):
    """np.savez_compressed with fixed zip timestamps, so equal arrays give equal bytes; written atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buf.getvalue())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def standin_dir(cache_dir=None):
    """`<cache>/standin_body/<hash of this generator's source>`: editing the generator gives a fresh folder."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("MAMBATALK_CACHE") or Path.home() / ".cache" / "mambatalk") / "standin_body"
    return Path(cache_dir) / hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def ensure_standin(cache_dir=None):
    """Model folder for `smplx.create` holding the stand-in; generated when missing or damaged.

    `<folder>/smplx/SMPLX_NEUTRAL_2020.npz` plus a `.sha256` file written after it: a file whose hash does not
    match (partly written, edited) is rebuilt.
    """
    root = standin_dir(cache_dir)
    npz = root / "smplx" / NPZ_NAME
    digest_file = npz.with_name(NPZ_NAME + ".sha256")
    if npz.is_file() and digest_file.is_file() and digest_file.read_text().strip() == file_sha256(npz):
        return root
    npz.parent.mkdir(parents=True, exist_ok=True)
    write_npz(build_standin(), npz)
    tmp = digest_file.with_name(f"{digest_file.name}.tmp-{os.getpid()}")
    tmp.write_text(file_sha256(npz) + "\n")
    os.replace(tmp, digest_file)
    return root
