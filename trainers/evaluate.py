"""Scoring generated sequences against references (spec §7.2, §8): the one evaluator used by test.py and by the
demo's baselines, so that every row of a results table is computed the same way."""
import numpy as np
import torch

from trainers.generate import orthonormalise_6d
from utils import metric
from utils.rotation import axis_angle_to_rot6d

FACE_CHUNK = 256  # frames of face meshes held at once (10k vertices each)


def face_only_pose(poses):
    """Keep only the jaw rotation of (n, 165) poses: the face metrics pose nothing else (§7.2)."""
    face = torch.zeros_like(poses)
    face[:, 66:69] = poses[:, 66:69]
    return face


def face_errors(body, rec_pose, rec_exps, tar_pose, tar_exps, betas, compat):
    """Face vertex MSE and LVD of one sequence, built chunk by chunk (LVD chunks overlap by one frame)."""
    n = rec_pose.shape[0]
    mse, lvd = [], []
    for s in range(0, n, FACE_CHUNK):
        e = min(n, s + FACE_CHUNK + 1)
        v_rec = body(face_only_pose(rec_pose[s:e]), betas=betas, expressions=rec_exps[s:e])["vertices"].cpu().numpy()
        v_tar = body(face_only_pose(tar_pose[s:e]), betas=betas, expressions=tar_exps[s:e])["vertices"].cpu().numpy()
        own = min(FACE_CHUNK, n - s)
        mse.append((metric.face_vertex_mse(v_rec[:own], v_tar[:own]), own))
        if e - s >= 2:
            lvd.append((metric.face_lvd(v_rec, v_tar, compat=compat), e - s - 1))
    return metric.weighted_mean(mse), metric.weighted_mean(lvd)


@torch.no_grad()
def score_sequences(results, references, audios, body, eval_model, mean_vel, clip_len=32, compat=True):
    """results, references: lists of dicts with `poses` (n,165) and `expressions` (n,100) (equal n per pair);
    references also carry `betas` (300,). audios: the full-length 16 kHz mono waveform of each sequence.
    Returns raw metric values: fgd (None without an eval model), bc, bc_gt, l1div, l1div_gt, face_mse, face_lvd,
    energy and energy_gt (mean joint angular speed of spine, neck, head, arms and hands, rad/s) and energy_ratio;
    where results and references carry `trans`: root_jump (the largest root step in the first 10 frames of any
    sequence, m), root_drift and root_drift_gt (m per minute, metric.root_drift)."""
    device = body.rest_joints.device
    feats_gen, feats_gt = [], []
    div, div_gt = metric.L1DiversityAccumulator(), metric.L1DiversityAccumulator()
    bc, bc_gt, mse, lvd, energy, energy_gt = [], [], [], [], [], []
    root_jump, drift, drift_gt = [], [], []
    for res, ref, audio in zip(results, references, audios):
        rec_pose = torch.as_tensor(np.asarray(res["poses"]), dtype=torch.float32, device=device)
        tar_pose = torch.as_tensor(np.asarray(ref["poses"]), dtype=torch.float32, device=device)
        if rec_pose.shape != tar_pose.shape:
            raise ValueError(f"generated poses {tuple(rec_pose.shape)} and reference {tuple(tar_pose.shape)} differ")
        n = rec_pose.shape[0]
        if n >= 2:
            energy.append((metric.motion_energy(np.asarray(res["poses"])), n - 1))
            energy_gt.append((metric.motion_energy(np.asarray(ref["poses"])), n - 1))
        if "trans" in res and "trans" in ref:
            root_jump.append(metric.root_start_jump(np.asarray(res["trans"])))
            drift.append((metric.root_drift(np.asarray(res["trans"])), n))
            drift_gt.append((metric.root_drift(np.asarray(ref["trans"])), n))
        betas = torch.as_tensor(np.asarray(ref["betas"]), dtype=torch.float32, device=device).reshape(-1)[:300]
        if eval_model is not None:
            for pose, feats in ((rec_pose, feats_gen), (tar_pose, feats_gt)):
                feats.append(metric.fgd_features(eval_model, orthonormalise_6d(axis_angle_to_rot6d(pose)), clip_len))
        # joints: given betas, zero translation, zero expression (the published test's joints_rec)
        joints = body(rec_pose, betas=betas, return_vertices=False)["joints"][:, :55].reshape(n, 165).cpu().numpy()
        joints_gt = body(tar_pose, betas=betas, return_vertices=False)["joints"][:, :55].reshape(n, 165).cpu().numpy()
        div.add(joints)
        div_gt.add(joints_gt)
        bc.append(metric.beat_consistency(joints, audio, mean_vel, compat=compat))
        bc_gt.append(metric.beat_consistency(joints_gt, audio, mean_vel, compat=compat))
        rec_exps = torch.as_tensor(np.asarray(res["expressions"]), dtype=torch.float32, device=device)
        tar_exps = torch.as_tensor(np.asarray(ref["expressions"]), dtype=torch.float32, device=device)
        m, v = face_errors(body, rec_pose, rec_exps, tar_pose, tar_exps, betas, compat)
        mse.append((m, n))
        lvd.append((v, n))
    fgd = None
    if eval_model is not None:
        fgd = float(metric.frechet_distance(np.concatenate(feats_gen).astype(np.float64),
                                            np.concatenate(feats_gt).astype(np.float64), compat=compat))
    return {"fgd": fgd, "bc": metric.beat_consistency_dataset(bc), "bc_gt": metric.beat_consistency_dataset(bc_gt),
            "l1div": div.score(), "l1div_gt": div_gt.score(), "face_mse": metric.weighted_mean(mse),
            "face_lvd": metric.weighted_mean(lvd), "energy": metric.weighted_mean(energy),
            "energy_gt": metric.weighted_mean(energy_gt),
            "energy_ratio": metric.weighted_mean(energy) / max(metric.weighted_mean(energy_gt), 1e-12),
            **({"root_jump": max(root_jump), "root_drift": metric.weighted_mean(drift),
                "root_drift_gt": metric.weighted_mean(drift_gt)} if root_jump else {})}


def format_table(rows):
    """rows: {name: metrics dict} -> a fixed-width text table (raw values)."""
    cols = ["fgd", "bc", "bc_gt", "l1div", "face_mse", "face_lvd", "energy", "energy_ratio"]
    width = max(12, max(len(r) for r in rows) + 2)
    lines = ["".ljust(width) + "".join(c.rjust(13) for c in cols)]
    for name, m in rows.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(("-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4g}").rjust(13))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
