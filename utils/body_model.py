"""SMPL-X forward kinematics for batches of 165-D poses: the real SMPL-X when present, else the built-in stand-in.

Both bodies go through the published `smplx.create(...)` call (spec §2), so joints follow the same conventions.
Forward is differentiable (stage-1 losses back-propagate through it); wrap calls in `torch.no_grad()` where no
gradient is wanted.
"""
import logging
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import smplx
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues, vertices2landmarks

from utils import standin_body
from utils.skeleton import NUM_JOINTS, POSE_DIM

logger = logging.getLogger("mambatalk")

NUM_BETAS, NUM_EXPRESSIONS = 300, 100


def smplx_npz_path(model_dir):
    return Path(model_dir) / "smplx" / standin_body.NPZ_NAME


# The arrays smplx.SMPLX reads (use_pca=False, no face contour) and the shape each must have: V vertices, F faces.
SMPLX_ARRAYS = {
    "v_template": ("V", 3), "f": ("F", 3), "shapedirs": ("V", 3, None), "posedirs": ("V", 3, 9 * 54),
    "J_regressor": (55, "V"), "weights": ("V", 55), "kintree_table": (2, 55),
    "hands_componentsl": (None, 45), "hands_componentsr": (None, 45), "hands_meanl": (45,), "hands_meanr": (45,),
    "lmk_faces_idx": (None,), "lmk_bary_coords": (None, 3),
}


def read_smplx_arrays(path):
    """The numeric arrays smplx needs from an SMPL-X npz, read with allow_pickle=False key by key.

    The real SMPLX_NEUTRAL_2020.npz also holds object arrays (name tables such as joint2num) that smplx would unpickle
    (it loads with allow_pickle=True), and a pickle can run code; those are never read. Raises ValueError naming the
    file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in SMPLX_ARRAYS if k not in npz.files]
            if missing:
                raise ValueError(f"missing array(s) {missing}")
            arrays = {}
            for key in SMPLX_ARRAYS:
                try:
                    arrays[key] = npz[key]
                except ValueError:  # numpy refuses object arrays without allow_pickle
                    raise ValueError(f"'{key}' is a pickled object array, not numbers (refused: unpickling it could "
                                     "run code)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: cannot be used as an SMPL-X model: {e}") from None
    sizes = {}
    for key, expected in SMPLX_ARRAYS.items():
        a = arrays[key]
        ok = a.dtype.kind in "biuf" and a.ndim == len(expected)
        for dim, want in zip(a.shape, expected) if ok else ():
            if isinstance(want, str):
                want = sizes.setdefault(want, dim)
            ok = ok and dim > 0 and (want is None or dim == want)
        if not ok:
            raise ValueError(f"{path}: cannot be used as an SMPL-X model: '{key}' has shape {a.shape} and dtype "
                             f"{a.dtype}, expected numbers of shape {expected}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: cannot be used as an SMPL-X model: '{key}' contains NaN or infinite values")
    return arrays


def create_smplx(npz_path):
    """smplx.create(...) as the published code calls it, on a copy of the file holding only its numeric arrays."""
    arrays = read_smplx_arrays(npz_path)
    with tempfile.TemporaryDirectory(prefix="mambatalk_smplx_") as root:
        (Path(root) / "smplx").mkdir()
        # float32: smplx turns every float array into float32 buffers anyway; halves the copy
        np.savez(Path(root) / "smplx" / standin_body.NPZ_NAME,
                 **{k: a.astype(np.float32) if a.dtype.kind == "f" else a for k, a in arrays.items()})
        try:
            return smplx.create(root, model_type="smplx", gender="NEUTRAL_2020", num_betas=NUM_BETAS,
                                num_expression_coeffs=NUM_EXPRESSIONS, ext="npz", use_pca=False,
                                use_face_contour=False)
        except (ValueError, IndexError, RuntimeError, TypeError) as e:
            raise ValueError(f"{npz_path}: cannot be used as an SMPL-X model: smplx failed with {e}") from None


def as_tensor(x, name, device):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"BodyModel: {name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x.to(device=device, dtype=torch.float32)


class BodyModel(torch.nn.Module):
    """`forward(poses (N,165), betas, expressions, trans)` -> dict(joints, vertices).

    With `return_vertices=True` joints are smplx's (N,127,3) (55 skeleton joints, 21 vertex keypoints, 51 face
    landmarks) and vertices (N,V,3). With `return_vertices=False` only the 55 skeleton joints are computed (N,55,3):
    the same values without skinning the mesh, far cheaper (foot contact, metrics).

    The model is loaded by smplx and its buffers are used as they are; forward evaluates smplx's equations (shape and
    expression blend shapes, pose correctives, joint regression, kinematic chain, linear blend skinning, extra
    joints, landmarks) in a cheaper order: blend directions are concatenated and joint-regressed once, a shape shared
    by all frames is blended once, all-zero blend shapes (the stand-in's) are skipped, and skinning is one matrix
    product plus an element-wise transform instead of a 4x4 product per vertex. Tests check it against smplx.
    """

    def __init__(self, model_dir=None, device="cpu"):
        super().__init__()
        if model_dir and smplx_npz_path(model_dir).is_file():
            root, self.is_standin = Path(model_dir), False
            self.description = f"SMPL-X ({standin_body.NPZ_NAME} in {Path(model_dir) / 'smplx'})"
        else:
            root, self.is_standin = standin_body.ensure_standin(), True
            self.description = "built-in stand-in body (not SMPL-X)"
            if model_dir:
                logger.info("no SMPL-X model at %s", smplx_npz_path(model_dir))
        logger.info("body model: %s", self.description)
        self.smplx = create_smplx(smplx_npz_path(root))
        self.smplx.requires_grad_(False)  # its default pose/shape parameters are never used
        sm = self.smplx
        self.faces = np.asarray(sm.faces, dtype=np.int64)
        self.num_vertices = int(sm.v_template.shape[0])
        self.has_expression_shapes = bool(sm.expr_dirs.any())
        self.has_pose_correctives = bool(sm.posedirs.any())
        shape_dirs = torch.cat([sm.shapedirs, sm.expr_dirs], dim=-1)  # (V, 3, 400)
        self.register_buffer("rest_joints", sm.J_regressor @ sm.v_template)
        self.register_buffer("joint_dirs", torch.einsum("jv,vcl->jcl", sm.J_regressor, shape_dirs))
        self.to(device)

    def check_inputs(self, poses, betas, expressions, trans):
        device = self.rest_joints.device
        poses = as_tensor(poses, "poses", device)
        if poses.dim() != 2 or poses.shape[1] != POSE_DIM or poses.shape[0] == 0:
            raise ValueError(f"BodyModel: poses must have shape (N, {POSE_DIM}) with N >= 1, got {tuple(poses.shape)}")
        n = poses.shape[0]
        if betas is None:
            betas = torch.zeros(1, NUM_BETAS, device=device)
        else:
            betas = as_tensor(betas, "betas", device)
            if betas.shape == (NUM_BETAS,):
                betas = betas[None]
            if betas.dim() != 2 or betas.shape[1] != NUM_BETAS or betas.shape[0] not in (1, n):
                raise ValueError(f"BodyModel: betas must have shape ({NUM_BETAS},) or ({n}, {NUM_BETAS}), "
                                 f"got {tuple(betas.shape)}")
        if expressions is None:
            expressions = torch.zeros(n, NUM_EXPRESSIONS, device=device)
        else:
            expressions = as_tensor(expressions, "expressions", device)
            if expressions.shape != (n, NUM_EXPRESSIONS):
                raise ValueError(f"BodyModel: expressions must have shape ({n}, {NUM_EXPRESSIONS}), "
                                 f"got {tuple(expressions.shape)}")
        if trans is None:
            trans = torch.zeros(n, 3, device=device)
        else:
            trans = as_tensor(trans, "trans", device)
            if trans.shape != (n, 3):
                raise ValueError(f"BodyModel: trans must have shape ({n}, 3), got {tuple(trans.shape)}")
        return poses, betas, expressions, trans

    def forward(self, poses, betas=None, expressions=None, trans=None, chunk=128, return_vertices=True):
        poses, betas, expressions, trans = self.check_inputs(poses, betas, expressions, trans)
        if chunk < 1:
            raise ValueError(f"BodyModel: chunk must be >= 1, got {chunk}")
        parts = []
        for s in range(0, poses.shape[0], chunk):
            b = betas if betas.shape[0] == 1 else betas[s:s + chunk]
            parts.append(self.forward_chunk(poses[s:s + chunk], b, expressions[s:s + chunk], trans[s:s + chunk],
                                            return_vertices))
        joints = torch.cat([p[0] for p in parts])
        vertices = torch.cat([p[1] for p in parts]) if return_vertices else None
        return {"joints": joints, "vertices": vertices}

    def forward_chunk(self, poses, betas, expressions, trans, with_vertices):
        sm, n = self.smplx, poses.shape[0]
        rot = batch_rodrigues((poses + sm.pose_mean).reshape(-1, 3)).view(n, NUM_JOINTS, 3, 3)
        shape = torch.cat([betas.expand(n, -1), expressions], dim=-1)
        rest_joints = self.rest_joints + torch.einsum("bl,jcl->bjc", shape, self.joint_dirs)
        joints, transforms = batch_rigid_transform(rot, rest_joints, sm.parents)
        if not with_vertices:
            return joints + trans[:, None], None
        verts = self.shaped_vertices(betas, expressions)  # (n or 1, V, 3)
        if self.has_pose_correctives:
            eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
            verts = verts + ((rot[:, 1:] - eye).reshape(n, -1) @ sm.posedirs).view(n, -1, 3)
        # Skinning: the top 3x4 of every vertex's blended transform from one matrix product, laid out (n, 3, 4, V)
        # so that applying it is element-wise along V.
        per_joint = transforms[:, :, :3].reshape(n, NUM_JOINTS, 12).transpose(1, 2).reshape(n * 12, NUM_JOINTS)
        blended = (per_joint @ sm.lbs_weights.T).view(n, 3, 4, -1)
        xyz = verts.transpose(1, 2)[:, None]  # (n or 1, 1, 3, V)
        verts = (blended[:, :, 3] + blended[:, :, 0] * xyz[:, :, 0] + blended[:, :, 1] * xyz[:, :, 1]
                 + blended[:, :, 2] * xyz[:, :, 2]).transpose(1, 2).contiguous()
        landmarks = vertices2landmarks(verts, sm.faces_tensor, sm.lmk_faces_idx.expand(n, -1).contiguous(),
                                       sm.lmk_bary_coords.expand(n, -1, -1))
        joints = torch.cat([sm.vertex_joint_selector(verts, joints), landmarks], dim=1)
        return joints + trans[:, None], verts + trans[:, None]

    def shaped_vertices(self, betas, expressions):
        """Template plus shape and expression blend shapes; (1,V,3) when one shape serves every frame."""
        sm = self.smplx
        if betas.shape[0] > 1 and not betas.requires_grad and bool((betas == betas[:1]).all()):
            betas = betas[:1]
        verts = sm.v_template + torch.einsum("bl,vcl->bvc", betas, sm.shapedirs)
        if self.has_expression_shapes and (expressions.requires_grad or bool(expressions.any())):
            verts = verts + torch.einsum("bl,vcl->bvc", expressions, sm.expr_dirs)
        return verts


_CACHE = {}


def load_body_model(args, device="cpu"):
    """BodyModel for `args.smplx_model_dir` (empty -> `args.data_path_1 + 'smplx_models/'`), one per (dir, device)."""
    model_dir = getattr(args, "smplx_model_dir", "") or str(getattr(args, "data_path_1", "")) + "smplx_models/"
    key = (str(Path(model_dir).resolve()), str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = BodyModel(model_dir, device=device)
    return _CACHE[key]
