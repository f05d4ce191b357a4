"""Stage-1 trainers (spec §6): part VQ-VAEs and the global-motion autoencoder.

They differ only in how a batch becomes loss terms. Two published quirks are fixed behind `vq_fixes` (default on):
  §10.3 #9  the face vertex loss compared (GT expressions + predicted jaw) with (predicted expressions + GT jaw);
            fixed, it compares the fully predicted face with the fully ground-truth face.
  §10.3 #10 vertex velocity/acceleration were taken across the flattened batch*time axis (mixing clips) and weighted
            by rec_weight twice; fixed, they are taken along time inside each clip, weighted once.
With `vq_fixes: false` the published terms are computed, e.g. to reproduce the released training. The default is on
because the published face term flips the sign of the expression error, so where the jaw rotation moves
expression-displaced vertices it scores the wrong mesh (#9), and the published vertex differences are dominated by
clip-boundary jumps (#10); with the weights of every released config at 1, the double weighting changes nothing.
One deviation: the lower-body "joint" term uses the 55 skeleton joints instead of smplx's 127 output joints (the
other 72 are surface keypoints that need the whole mesh skinned per frame).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import motion_representation
from trainers.base import Trainer, to_device
from utils.body_model import load_body_model
from utils.rotation import (axis_angle_to_matrix, axis_angle_to_rot6d, matrix_to_axis_angle, matrix_to_rotation_6d,
                            rotation_6d_to_matrix)
from utils.skeleton import FOOT_JOINTS, PART_JOINTS

DT = 1.0 / 30


def geodesic_loss(R_hat, R):
    """Mean rotation angle between two sets of rotation matrices (published GeodesicLoss, clamped arccos)."""
    cos = (torch.einsum("...ij,...ij->...", R_hat, R) - 1) / 2
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean()


def diff(x, order=1, dim=1):
    for _ in range(order):
        x = x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
    return x


def central_velocity(x, dt=DT):
    """Forward difference at the first frame, central differences inside, backward at the last (dim 1 = time)."""
    v = torch.empty_like(x)
    v[:, 0] = (x[:, 1] - x[:, 0]) / dt
    v[:, -1] = (x[:, -1] - x[:, -2]) / dt
    v[:, 1:-1] = (x[:, 2:] - x[:, :-2]) / (2 * dt)
    return v


def integrate_velocity(v, x0, dt=DT):
    """pos[0] = x0, pos[t] = pos[t-1] + v[t-1] * dt (dim 1 = time)."""
    steps = torch.cumsum(v[:, :-1] * dt, dim=1)
    return torch.cat([x0[:, None], x0[:, None] + steps], dim=1)


def foot_velocity(joints):
    """Per-frame displacement of the ankle and foot joints, the last frame zero: (B, T, 4, 3)."""
    feet = joints[:, :, list(FOOT_JOINTS)]
    return torch.cat([feet[:, 1:] - feet[:, :-1], torch.zeros_like(feet[:, :1])], dim=1)


def insert_part(part_aa, joints):
    """Scatter a part's axis-angle (..., 3J) into a zero 165-D pose."""
    full = part_aa.new_zeros(*part_aa.shape[:-1], 55, 3)
    full[..., joints, :] = part_aa.reshape(*part_aa.shape[:-1], len(joints), 3)
    return full.reshape(*part_aa.shape[:-1], 165)


class Stage1Trainer(Trainer):
    best_metric = "rec"

    def build_model(self):
        a = self.args
        self.restarted_codes = 0  # dead codes moved by restart_dead_codes, for the logs and tests
        self.body = load_body_model(a, self.device)
        self.joints = PART_JOINTS[a.tar_joints]
        if a.vae_length != a.vae_codebook_size:
            self.log.warning(f"vae_length {a.vae_length} != vae_codebook_size {a.vae_codebook_size}: MambaTalk builds its "
                             "stage-1 models with latent width = vae_codebook_size, so it cannot load this model")
        return getattr(motion_representation, a.g_name)(a)

    def vertex_terms(self, v_hat, v, ver_loss, diff_loss, published_diff_weight=1.0):
        """ver, ver_vel, ver_acc of (B, T, V, 3) vertex (or joint) tensors."""
        ver = ver_loss(v_hat, v)
        if self.args.vq_fixes:
            return ver, diff_loss(diff(v_hat), diff(v)), diff_loss(diff(v_hat, 2), diff(v, 2))
        flat_hat, flat = v_hat.flatten(0, 1), v.flatten(0, 1)  # published: differences run across clip boundaries
        w = published_diff_weight
        return ver, w * diff_loss(diff(flat_hat, 1, 0), diff(flat, 1, 0)), w * diff_loss(diff(flat_hat, 2, 0), diff(flat, 2, 0))

    def body_forward(self, poses, betas, expressions=None, trans=None, vertices=True):
        B, T = poses.shape[:2]
        out = self.body(poses.reshape(B * T, 165), betas=betas.reshape(B * T, -1),
                        expressions=None if expressions is None else expressions.reshape(B * T, -1),
                        trans=None if trans is None else trans.reshape(B * T, 3), return_vertices=vertices)
        x = out["vertices"] if vertices else out["joints"]
        return x.reshape(B, T, *x.shape[1:])

    def run(self, model, x):
        """The network under the configured autocast; its outputs, and all the loss math after it, in float32."""
        with self.autocast():
            out = self.call_model(model, x)
        return {k: v.float() for k, v in out.items()}

    def model_input(self, batch):
        """The model's input tensor (B, T, vae_test_dim) for a batch: the one definition, used by the losses and by the
        codebook init and restarts (VQ trainers)."""
        raise NotImplementedError

    def before_training(self):
        """`vq_codebook_init: data` (a project option; published: uniform): before the first step, every code is set
        to the encoder output of a random frame of the first training batch. With the published tiny uniform init the
        encoder outputs start far from all codes, one or two codes win every frame and the rest never move (on the
        demo data 300 steps leave 1-3 of 64 codes in use; with this init 18)."""
        quantizer = getattr(self.raw_model, "quantizer", None)
        if quantizer is None or self.args.vq_codebook_init == "uniform":
            return
        if self.args.vq_codebook_init != "data":
            raise ValueError(f"config key 'vq_codebook_init': expected uniform or data, got '{self.args.vq_codebook_init}'")
        self.sampler.set_epoch(0)
        batch = to_device(next(iter(self.train_loader)), self.device)
        with torch.no_grad():
            z = self.raw_model.encoder(self.model_input(batch)).flatten(0, 1)
            g = torch.Generator().manual_seed(self.args.random_seed)
            rows = torch.randint(z.shape[0], (quantizer.embedding.weight.shape[0],), generator=g)
            quantizer.embedding.weight.copy_(z[rows.to(z.device)])
        if self.world_size > 1:
            dist.broadcast(quantizer.embedding.weight.data, 0)  # every rank starts from rank 0's codebook
        self.log.info(f"codebook initialised from {z.shape[0]} encoder outputs of the first batch")

    def train_step(self, batch):
        losses = super().train_step(batch)
        period = self.args.vq_restart_period
        if period and (self.global_step + 1) % period == 0:  # global_step counts this step only after it returns
            self.restart_dead_codes(batch)
        return losses

    @torch.no_grad()
    def restart_dead_codes(self, batch):
        """`vq_restart_period: N` (a project option; published: 0 = never): every N steps, each code that no frame of
        this batch chose is moved onto the encoder output of a random frame of the batch, so that the codebook keeps
        being used as the encoder drifts (with a short schedule, codes stranded early are otherwise never chosen again;
        the demo's upper-body model kept 15 of 64 codes). Deterministic given the step, so resume stays exact."""
        quantizer = getattr(self.raw_model, "quantizer", None)
        if quantizer is None:
            return
        batch = to_device(batch, self.device)
        z = self.raw_model.encoder(self.model_input(batch)).flatten(0, -2).float()
        used = torch.bincount(quantizer.map2index(z).flatten(), minlength=quantizer.n_e) > 0
        dead = (~used).nonzero().flatten()
        if len(dead):
            g = torch.Generator().manual_seed(self.args.random_seed + self.global_step)
            rows = torch.randperm(z.shape[0], generator=g)[:len(dead)].to(z.device)  # distinct frames
            dead = dead[:len(rows)]
            quantizer.embedding.weight[dead] = z[rows].to(quantizer.embedding.weight.dtype)
        if self.world_size > 1:
            dist.broadcast(quantizer.embedding.weight.data, 0)  # ranks saw different batches: rank 0's codebook wins
        self.restarted_codes += len(dead)
        if len(dead):
            self.log.info(f"step {self.global_step + 1}: {len(dead)} unused codes restarted from encoder outputs")

    def evaluate(self, loader):
        """The training loss terms on the eval split, averaged over batches."""
        sums, n = {}, 0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            for k, v in self.compute_losses(self.raw_model, batch, self.epoch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}


class PartVQTrainer(Stage1Trainer):
    """`trainer: ae`: upper body (78-D) and hands (180-D) VQ-VAEs (spec §6.1)."""

    def model_input(self, batch):
        return axis_angle_to_rot6d(batch["pose"].float())

    def compute_losses(self, model, batch, epoch):
        a = self.args
        pose = batch["pose"].float()  # (B, T, 3J) axis-angle
        B, T = pose.shape[:2]
        J = len(self.joints)
        R = axis_angle_to_matrix(pose.reshape(B, T, J, 3))
        out = self.run(model, self.model_input(batch))
        R_hat = rotation_6d_to_matrix(out["rec_pose"].reshape(B, T, J, 6))
        losses = {
            "rec": a.rec_weight * a.rec_pos_weight * geodesic_loss(R_hat, R),
            "vel": F.l1_loss(diff(R_hat), diff(R)),
            "acc": F.l1_loss(diff(R_hat, 2), diff(R, 2)),
            "com": out["embedding_loss"],
        }
        if a.rec_ver_weight > 0:
            pose_hat = matrix_to_axis_angle(R_hat).reshape(B, T, J * 3)
            betas, trans = batch["beta"].float(), batch["trans"].float()
            v_hat = self.body_forward(insert_part(pose_hat, self.joints), betas, trans=trans)
            with torch.no_grad():
                v = self.body_forward(insert_part(pose, self.joints), betas, trans=trans)
            # published ae_trainer weights the vertex vel/acc terms by rec_weight twice (§10.3 #10)
            ver, ver_vel, ver_acc = self.vertex_terms(v_hat, v, F.mse_loss, F.l1_loss, a.rec_weight)
            w = a.rec_weight * a.rec_ver_weight
            losses |= {"ver": w * ver, "ver_vel": w * ver_vel, "ver_acc": w * ver_acc}
        return losses


class FaceVQTrainer(Stage1Trainer):
    """`trainer: aeface`: jaw 6D + 100 expressions (spec §6.2)."""

    def model_input(self, batch):
        return torch.cat([axis_angle_to_rot6d(batch["pose"].float()[..., :3]), batch["facial"].float()], dim=-1)

    def compute_losses(self, model, batch, epoch):
        a = self.args
        jaw = batch["pose"].float()[..., :3]
        exps = batch["facial"].float()
        B, T = jaw.shape[:2]
        R = axis_angle_to_matrix(jaw)
        out = self.run(model, self.model_input(batch))
        rec = out["rec_pose"]
        R_hat, exps_hat = rotation_6d_to_matrix(rec[..., :6]), rec[..., 6:]
        losses = {
            "rec": a.rec_weight * a.rec_pos_weight * geodesic_loss(R_hat, R),
            "vel": F.mse_loss(diff(R_hat), diff(R)),
            "acc": F.mse_loss(diff(R_hat, 2), diff(R, 2)),
            "face": F.mse_loss(exps_hat, exps),
            "face_vel": F.mse_loss(diff(exps_hat), diff(exps)),
            "face_acc": F.mse_loss(diff(exps_hat, 2), diff(exps, 2)),
            "com": out["embedding_loss"],
        }
        if a.rec_ver_weight > 0:
            betas = batch["beta"].float()
            jaw_hat = matrix_to_axis_angle(R_hat)
            face_pose = lambda j: insert_part(j, [22])
            if a.vq_fixes:
                v_hat = self.body_forward(face_pose(jaw_hat), betas, exps_hat)
                with torch.no_grad():
                    v = self.body_forward(face_pose(jaw), betas, exps)
            else:  # published: (GT expressions + predicted jaw) against (predicted expressions + GT jaw)
                v_hat = self.body_forward(face_pose(jaw_hat), betas, exps)
                v = self.body_forward(face_pose(jaw), betas, exps_hat)
            ver, ver_vel, ver_acc = self.vertex_terms(v_hat, v, F.mse_loss, F.mse_loss)
            w = a.rec_weight * a.rec_ver_weight
            losses |= {"ver": w * ver, "ver_vel": w * ver_vel, "ver_acc": w * ver_acc}
        return losses


def lower_input(batch, joints):
    """Lower-body items: pose = 27 axis-angle + 4 contacts. Returns leg rotations (B,T,9,3,3), trans, contacts."""
    pose = batch["pose"].float()
    B, T = pose.shape[:2]
    R = axis_angle_to_matrix(pose[..., :-4].reshape(B, T, len(joints), 3))
    return R, batch["trans"].float(), pose[..., -4:]


class LowerVQTrainer(Stage1Trainer):
    """`trainer: aelowerfoot` -> pretrained_vq/lower_foot.bin (spec §6.3)."""

    def model_input(self, batch):
        R, trans, contact = lower_input(batch, self.joints)
        return torch.cat([matrix_to_rotation_6d(R).flatten(-2), trans, contact], dim=-1)

    def compute_losses(self, model, batch, epoch):
        a = self.args
        R, _, contact = lower_input(batch, self.joints)
        B, T, J = R.shape[:3]
        out = self.run(model, self.model_input(batch))
        rec = out["rec_pose"]
        R_hat = rotation_6d_to_matrix(rec[..., :J * 6].reshape(B, T, J, 6))
        contact_hat = rec[..., J * 6 + 3:J * 6 + 7]
        losses = {
            "rec": a.rec_weight * a.rec_pos_weight * geodesic_loss(R_hat, R),
            "contact": F.mse_loss(contact_hat, contact),
            "vel": F.l1_loss(diff(R_hat), diff(R)),
            "acc": F.l1_loss(diff(R_hat, 2), diff(R, 2)),
            "com": out["embedding_loss"],
        }
        betas = batch["beta"].float()
        pose_hat = insert_part(matrix_to_axis_angle(R_hat).reshape(B, T, J * 3), self.joints)
        joints_hat = self.body_forward(pose_hat, betas, vertices=False)
        with torch.no_grad():
            joints_tar = self.body_forward(insert_part(matrix_to_axis_angle(R).reshape(B, T, J * 3), self.joints),
                                           betas, vertices=False)
        # published: MSE over smplx's 127 output joints; here the 55 skeleton joints (the other 72 are surface
        # keypoints that need the whole mesh skinned, ~100x the cost), so this term is close to, not equal to, it
        losses["ver"] = a.rec_weight * a.rec_ver_weight * F.mse_loss(joints_hat, joints_tar)
        in_contact = (contact_hat > 0.95).detach().float()[..., None]
        foot_slide = foot_velocity(joints_hat) * in_contact
        losses["foot"] = 20 * F.l1_loss(foot_slide, torch.zeros_like(foot_slide))
        return losses


class GlobalMotionTrainer(Stage1Trainer):
    """`trainer: aelower` -> pretrained_vq/foot.bin: legs -> root velocity, height and foot contact (spec §6.4)."""
    best_metric = "trans"

    def compute_losses(self, model, batch, epoch):
        R, trans, contact = lower_input(batch, self.joints)
        B, T, J = R.shape[:3]
        legs6d = matrix_to_rotation_6d(R).reshape(B, T, J * 6)
        out = self.run(model, torch.cat([legs6d, legs6d.new_zeros(B, T, 7)], dim=-1))
        rec = out["rec_pose"]
        vx_hat, y_hat, vz_hat = rec[..., J * 6], rec[..., J * 6 + 1], rec[..., J * 6 + 2]
        contact_hat = rec[..., J * 6 + 3:J * 6 + 7]
        vx, vz = central_velocity(trans[..., 0]), central_velocity(trans[..., 2])
        x_hat = integrate_velocity(vx_hat, trans[:, 0, 0])
        z_hat = integrate_velocity(vz_hat, trans[:, 0, 2])
        xyz_hat = torch.stack([x_hat, y_hat, z_hat], dim=-1)
        v_hat, v = torch.stack([vx_hat, vz_hat], -1), torch.stack([vx, vz], -1)
        losses = {
            "contact": F.mse_loss(contact_hat, contact),
            "transv": F.l1_loss(vx_hat, vx) + F.l1_loss(vz_hat, vz),
            "v3": 5 * F.l1_loss(diff(v_hat), diff(v)),
            "a3": 5 * F.l1_loss(diff(v_hat, 2), diff(v, 2)),
            "v2": 5 * F.l1_loss(diff(xyz_hat), diff(trans)),
            "a2": 5 * F.l1_loss(diff(xyz_hat, 2), diff(trans, 2)),
            "trans": F.l1_loss(xyz_hat, trans),
        }
        # The vertex terms pose the body with the ground-truth legs on both sides, so predicted and target vertices
        # differ by the translation error alone: MSE over vertices equals the MSE of the translations, exactly.
        ver, ver_vel, ver_acc = self.vertex_terms(xyz_hat[:, :, None], trans[:, :, None], F.mse_loss, F.mse_loss)
        losses["ver"] = ver + 5 * ver_vel + 5 * ver_acc
        betas = batch["beta"].float()
        with torch.no_grad():
            legs_aa = matrix_to_axis_angle(R).reshape(B, T, J * 3)
            joints_rest = self.body_forward(insert_part(legs_aa, self.joints), betas, vertices=False)
        joints_hat = joints_rest + xyz_hat[:, :, None]
        in_contact = (contact_hat > 0.95).detach().float()[..., None]
        foot_slide = foot_velocity(joints_hat) * in_contact
        losses["foot"] = 20 * F.l1_loss(foot_slide, torch.zeros_like(foot_slide))
        return losses


class EvalAETrainer(Stage1Trainer):
    """`trainer: aeskconv`: the FGD feature extractor VAESKConv as a plain autoencoder of full-body 6D poses.

    The published code ships this model (BEAT2's AESKConv_240_100.bin) but not its trainer; this one exists so that
    data without that file (the embedded demo) still gets an FGD. Loss: 6D reconstruction and its velocity."""

    def build_model(self):
        model = getattr(motion_representation, self.args.g_name)(self.args)
        # fc_mu / fc_logvar only exist so the released file loads (variational: False): frozen, so DDP sees no
        # parameter without a gradient
        for p in (*model.fc_mu.parameters(), *model.fc_logvar.parameters()):
            p.requires_grad_(False)
        return model

    def compute_losses(self, model, batch, epoch):
        pose = batch["pose"].float()[..., :165]
        B, T = pose.shape[:2]
        x = matrix_to_rotation_6d(axis_angle_to_matrix(pose.reshape(B, T, 55, 3))).reshape(B, T, 330)
        rec = self.run(model, x)["rec_pose"]
        return {"rec": F.mse_loss(rec, x), "vel": F.mse_loss(diff(rec), diff(x))}
