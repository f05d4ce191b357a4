"""SMPL-X forward kinematics for batches of 165-D poses: the real SMPL-X when present, else the built-in stand-in.

Both bodies go through the published `smplx.create(...)` call (spec §2), so joints follow the same conventions.
Forward is differentiable (stage-1 losses back-propagate through it); wrap calls in `torch.no_grad()` where no
gradient is wanted.
"""
import logging
from pathlib import Path

import numpy as np
import smplx
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues

from utils import standin_body
from utils.skeleton import NUM_JOINTS, POSE_DIM

logger = logging.getLogger("mambatalk")

NUM_BETAS, NUM_EXPRESSIONS = 300, 100


def smplx_npz_path(model_dir):
    return Path(model_dir) / "smplx" / standin_body.NPZ_NAME


def as_tensor(x, name, device):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"BodyModel: {name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x.to(device=device, dtype=torch.float32)


class BodyModel(torch.nn.Module):
    """`forward(poses (N,165), betas, expressions, trans)` -> dict(joints, vertices).

    With `return_vertices=True` joints are smplx's (N,127,3) (55 skeleton joints, 21 vertex keypoints, 51 face
    landmarks) and vertices (N,V,3). With `return_vertices=False` only the 55 skeleton joints are computed (N,55,3),
    by the same kinematics without skinning the mesh: identical values, far cheaper (foot contact, metrics).
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
        self.smplx = smplx.create(str(root), model_type="smplx", gender="NEUTRAL_2020", num_betas=NUM_BETAS,
                                  num_expression_coeffs=NUM_EXPRESSIONS, ext="npz", use_pca=False,
                                  use_face_contour=False)
        self.smplx.requires_grad_(False)  # its default pose/shape parameters are never used
        self.faces = np.asarray(self.smplx.faces, dtype=np.int64)
        self.num_vertices = int(self.smplx.v_template.shape[0])
        # Joint-only path: rest joints and their shape/expression directions, regressed once.
        sm = self.smplx
        self.register_buffer("rest_joints", sm.J_regressor @ sm.v_template)
        shape_dirs = torch.cat([sm.shapedirs, sm.expr_dirs], dim=-1)  # (V, 3, 400)
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
        betas = betas.expand(n, NUM_BETAS)
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
        run = self.full_chunk if return_vertices else self.joints_chunk
        parts = [run(poses[s:s + chunk], betas[s:s + chunk], expressions[s:s + chunk], trans[s:s + chunk])
                 for s in range(0, poses.shape[0], chunk)]
        joints = torch.cat([p[0] for p in parts])
        vertices = torch.cat([p[1] for p in parts]) if return_vertices else None
        return {"joints": joints, "vertices": vertices}

    def full_chunk(self, poses, betas, expressions, trans):
        out = self.smplx(betas=betas, expression=expressions, transl=trans, global_orient=poses[:, 0:3],
                         body_pose=poses[:, 3:66], jaw_pose=poses[:, 66:69], leye_pose=poses[:, 69:72],
                         reye_pose=poses[:, 72:75], left_hand_pose=poses[:, 75:120],
                         right_hand_pose=poses[:, 120:165], return_verts=True)
        return out.joints, out.vertices

    def joints_chunk(self, poses, betas, expressions, trans):
        """The 55 skeleton joints exactly as smplx's lbs computes them (joints do not depend on skinning)."""
        n = poses.shape[0]
        full_pose = poses + self.smplx.pose_mean  # smplx adds the hand mean pose (zero for flat hands)
        rot = batch_rodrigues(full_pose.reshape(-1, 3)).view(n, NUM_JOINTS, 3, 3)
        shape = torch.cat([betas, expressions], dim=-1)
        rest = self.rest_joints + torch.einsum("bl,jcl->bjc", shape, self.joint_dirs)
        posed, _ = batch_rigid_transform(rot, rest, self.smplx.parents)
        return posed + trans[:, None], None


_CACHE = {}


def load_body_model(args, device="cpu"):
    """BodyModel for `args.smplx_model_dir` (empty -> `args.data_path_1 + 'smplx_models/'`), one per (dir, device)."""
    model_dir = getattr(args, "smplx_model_dir", "") or str(getattr(args, "data_path_1", "")) + "smplx_models/"
    key = (str(Path(model_dir).resolve()), str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = BodyModel(model_dir, device=device)
    return _CACHE[key]
