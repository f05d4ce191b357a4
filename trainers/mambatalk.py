"""Stage-2 trainer (spec §5): MambaTalk predicts the VQ codes of each body part from audio, words and speaker.

Per step: one seeded pass (4 visible frames) and two passes with an element-wise random mask whose ratio grows
from 0.05 to 1 over training; each pass is scored by latent regression (MSE to the code vectors) and code
classification (cross-entropy). Validation runs on the real val split (the published code scored the train loader,
§10.3 #1) and reports FGD with the evaluation autoencoder when its weights exist.
"""
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.layers import channels_last_conv_weights_
from models.mambatalk import MambaTalk
from models.motion_representation import STAGE1_FILES, VAESKConv, build_stage1_models
from trainers.base import Trainer, to_device
from trainers.generate import PARTS, choose_codes, decode_codes, decoded_to_motion, orthonormalise_6d
from utils.checkpoint import load_weights
from utils.cuda_graph import GraphedTrainStep, NotCapturable
from utils.log import get_logger
from utils.metric import frechet_distance
from utils.rotation import axis_angle_to_rot6d
from utils.skeleton import PART_JOINTS

STAGE1_CONFIGS = {"face": "cnn_vqvae_face_30.yaml", "upper": "cnn_vqvae_upper_30.yaml", "hands": "cnn_vqvae_hands_30.yaml",
                  "lower": "cnn_vqvae_lower_foot_30.yaml", "global_motion": "cnn_vqvae_lower_30.yaml"}
STAGE1_BEST = {"global_motion": "trans.bin"}  # the checkpoint each stage-1 run selects on val (others: rec.bin)
REPO_ROOT = Path(__file__).resolve().parents[1]


def stage1_dir(args):
    return args.pretrained_vq_dir or os.path.join(args.data_path_1, "pretrained_vq")


def stage1_train_command(args, name):
    """The command that trains stage-1 model `name`: the config beside the MambaTalk config (configs/demo/ for the
    demo), else the published one in configs/."""
    here = Path(getattr(args, "config_path", "") or "configs/x.yaml").parent / STAGE1_CONFIGS[name]
    config = here if here.is_file() else Path("configs") / STAGE1_CONFIGS[name]
    return f"python train.py --config {config}"


def check_stage1_files(args):
    """Every stage-1 checkpoint MambaTalk needs exists, else FileNotFoundError naming it and how to make it."""
    for name, filename in STAGE1_FILES.items():
        path = os.path.join(stage1_dir(args), filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"stage-1 checkpoint {path} is missing. Train it with `{stage1_train_command(args, name)}` and copy "
                f"the run's {STAGE1_BEST.get(name, 'rec.bin')} to {path}, or download the official pretrained_vq files "
                "(see pretrained/README.md).")


def load_frozen_models(args, device):
    """The five stage-1 models from `pretrained_vq_dir` (default data_path_1/pretrained_vq/), frozen, in eval mode."""
    check_stage1_files(args)
    models = build_stage1_models(args)
    for name, model in models.items():
        load_weights(model, os.path.join(stage1_dir(args), STAGE1_FILES[name]))
        model.to(device).eval().requires_grad_(False)
        channels_last_conv_weights_(model)  # GPUs: the encoders' weights in the order their convolutions read
    return models


def load_eval_model(args, device):
    """The FGD feature extractor (VAESKConv) from data_path + e_path, or None with a warning when it is absent."""
    path = os.path.join(args.data_path, args.e_path) if args.e_path else ""
    if not path or not os.path.isfile(path):
        get_logger().warning(f"FGD evaluation autoencoder {path or '(e_path unset)'} not found: FGD is not computed")
        return None
    model = VAESKConv(args)
    load_weights(model, path)
    return model.to(device).eval().requires_grad_(False)


def mask_ratio(epoch, epochs):
    """Share of masked canvas entries in the two masked passes: 0.05 at epoch 0, rising linearly towards 1 (§5.2)."""
    return epoch / epochs * 0.95 + 0.05


def joints_6d(pose6d, table):
    """Slice the 6D columns of a joint table out of a full (..., 330) 6D pose."""
    return pose6d[..., _joint_columns(table, pose6d.device)]


@functools.lru_cache(maxsize=None)
def _joint_columns(table, device):
    """joints_6d's column index, made once per device: indexing with a Python list copies it to the GPU on every
    call, which a CUDA graph of the training step (utils.cuda_graph.GraphedTrainStep) cannot capture."""
    return torch.tensor([6 * j + c for j in PART_JOINTS[table] for c in range(6)], device=device)


def prepare_targets(batch, vq):
    """Model inputs and per-part targets of a batch (§5.1)."""
    pose = batch["pose"].float()
    aa, contact = pose[..., :165], pose[..., 165:169]
    trans = batch["trans"].float()
    pose6d = axis_angle_to_rot6d(aa)
    parts = {
        "face": torch.cat([joints_6d(pose6d, "beat_smplx_face"), batch["facial"].float()], dim=-1),
        "upper": joints_6d(pose6d, "beat_smplx_upper"),
        "hands": joints_6d(pose6d, "beat_smplx_hands"),
        "lower": torch.cat([joints_6d(pose6d, "beat_smplx_lower"), trans, contact], dim=-1),
    }
    with torch.no_grad():
        index = {k: vq[k].map2index(v) for k, v in parts.items()}
        latent = {k: vq[k].quantizer.get_codebook_entry(index[k]) for k in parts}  # = map2latent, one encode
    return {
        "motion": torch.cat([pose6d, trans, contact], dim=-1), "pose6d": pose6d, "index": index, "latent": latent,
        "audio": batch["audio"].float(), "word": batch["word"].long(), "id": batch["id"].long(), "trans": trans,
    }


class MambaTalkTrainer(Trainer):
    # The three passes of a step see identical audio/words/speakers: encode them once (MambaTalk.forward with a list
    # of masks; identical results, BatchNorm statistics included). False: three full passes, as published.
    share_condition = True

    def check_inputs(self):
        check_stage1_files(self.args)

    def graph_step(self):
        """Whether the step runs as one CUDA graph (utils.cuda_graph.GraphedTrainStep): `cuda_graph: true`, or `auto`
        (the default) unless a capture failed in this run, on one GPU without DDP or fp16 loss scaling (host syncs).
        With `compile: true` too, the compiled model's kernels are captured with the rest of the step (losses,
        backward, Adam), which the compiled model's own CUDA graphs leave out."""
        a = self.args
        wanted = a.cuda_graph is True or (a.cuda_graph == "auto" and not getattr(self, "_graph_failed", False))
        return wanted and self.device.type == "cuda" and not dist.is_initialized() and a.amp != "fp16"

    def compile_mode(self):
        """With the whole step captured (graph_step), compilation without CUDA graphs of its own."""
        return None if self.graph_step() else super().compile_mode()

    def train_step(self, batch):
        """The step as one CUDA graph where graph_step() says so, captured on the first step and again only when the
        learning rate (a decay epoch) or the batch shapes change: the epoch's mask ratio is a device scalar the graph
        reads. Under `auto`, a step that cannot be captured (a host sync, e.g. Adam without `fused`) is logged and
        trained eagerly."""
        if not self.graph_step():
            if self.args.cuda_graph is True and not getattr(self, "_warned_graph", False):
                self._warned_graph = True
                get_logger().warning("cuda_graph: true needs one GPU without DDP or fp16: training eagerly")
            return super().train_step(batch)
        batch = to_device(batch, self.device)
        if getattr(self, "graph_mask_ratio", None) is None:
            self.graph_mask_ratio = torch.zeros((), device=self.device)
        self.graph_mask_ratio.fill_(mask_ratio(self.epoch, self.args.epochs))
        key = (tuple(group["lr"] for group in self.optimizer.param_groups),
               tuple((k, tuple(v.shape)) for k, v in batch.items() if torch.is_tensor(v)))
        if getattr(self, "_graphed", None) is None or self._graphed[0] != key:
            self._graphed = None  # free the previous graph's memory first
            self._make_optimizer_capturable()
            try:
                self._graphed = (key, GraphedTrainStep(self, batch))
            except NotCapturable as e:
                if self.args.cuda_graph is True:
                    raise RuntimeError(f"cuda_graph: true, but the training step cannot be captured: {e}") from e
                self._graph_failed = True
                get_logger().warning(f"the training step cannot be captured as a CUDA graph ({e}); training eagerly "
                                     "from here")
                return super().train_step(batch)
            except Exception as e:
                raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                                   "set cuda_graph: false to train eagerly") from e
            get_logger().info("training step captured as one CUDA graph (cuda_graph: false trains eagerly)")
        return self._graphed[1](batch)

    def _make_optimizer_capturable(self):
        """Adam with its step counts on the GPU, as a captured step needs (also after resuming an eager run's
        state, whose counts are on the CPU)."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device, torch.float32)

    def build_model(self):
        self.vq = load_frozen_models(self.args, self.device)
        self.eval_model = load_eval_model(self.args, self.device) if self.is_main else None
        self.best_metric = "fid" if self.eval_model is not None else "latent"
        model = MambaTalk(self.args, vocab=self.train_data.vocab)
        # The published forward discards this branch's output, so it never gets a gradient; Adam skips such
        # parameters anyway. Frozen, DDP does not wait for their gradients. Its weights stay in the checkpoint.
        model.global_scan.face_q_self_attn.requires_grad_(False)
        return model

    def test_checkpoint(self, path, tag):
        """The published periodic test: generate the test split with this checkpoint and score it (test.py)."""
        spec = importlib.util.spec_from_file_location("mambatalk_test_entry", REPO_ROOT / "test.py")
        test_entry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(test_entry)
        test_entry.run_test(self.args, ckpt=path, out_dir=os.path.join(self.run_dir, "test", tag), log=self.log)

    def latent_loss(self, out, t, weights):
        return sum(weights[k] * F.mse_loss(out[f"rec_{k}"].float(), t["latent"][k]) for k in PARTS)

    def cls_loss(self, out, t, weights):
        return sum(weights[k] * F.cross_entropy(out[f"cls_{k}"].flatten(0, 1).float(), t["index"][k].flatten())
                   for k in PARTS if weights[k] != 0)

    def pass_losses(self, out, t, weights):
        """The step's losses (compute_losses' keys) from one output whose batch holds the passes one after the other
        (MambaTalk.forward with stack_passes): every part's latent MSE and code cross-entropy of every pass in one
        go, ~20 kernels instead of ~120 for 3 passes x 4 parts x 2 losses (the eager GPU step is host-bound).
        weights: per pass, (latent weights, classification weights) by part. The same maths as latent_loss and
        cls_loss per pass, summed in another order (float32 rounding); a part whose classification weight is 0 is
        multiplied by 0 instead of left out (the same unless its cross-entropy is not finite)."""
        names = [("latent", "cls_full"), ("latent_self", "cls_self"), ("latent_word", "cls_word")]
        n, B = len(weights), t["motion"].shape[0]
        if n != len(names):
            raise ValueError(f"pass_losses: {len(names)} passes expected, got {n}")
        rec = torch.stack([out[f"rec_{k}"] for k in PARTS]).float().unflatten(1, (n, B))   # (parts, n, B, T, K)
        target = torch.stack([t["latent"][k] for k in PARTS]).unsqueeze(1)               # (parts, 1, B, T, K)
        latent = (rec - target).square().flatten(2).mean(-1)                              # (parts, n)
        logits = torch.stack([out[f"cls_{k}"] for k in PARTS]).float()                    # (parts, n B, T, K)
        index = torch.stack([t["index"][k] for k in PARTS]).unsqueeze(1).expand(-1, n, -1, -1)
        ce = F.cross_entropy(logits.flatten(0, 2), index.flatten(), reduction="none")
        ce = ce.view(len(PARTS), n, -1).mean(-1)                                           # (parts, n)
        per_pass = (torch.stack([latent, ce]) * self._pass_weights(weights, latent.device)).sum(1)  # (2, n)
        return {name: per_pass[i, p] for p, pair in enumerate(names) for i, name in enumerate(pair)}

    def _pass_weights(self, weights, device):
        """pass_losses' weights as a (2, parts, passes) device tensor, made once (a host-to-device copy each step
        would wait for the GPU, and a CUDA graph could not capture it)."""
        values = [[[w[i][k] for w in weights] for k in PARTS] for i in range(2)]
        key = (device, str(values))
        cached = self.__dict__.get("_pass_weight_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_pass_weight_cache"] = (key, torch.tensor(values, device=device))
        return cached[1]

    def forward(self, model, t, mask, **kwargs):
        """One call of the generator under the configured autocast (losses take .float() of its outputs)."""
        with self.autocast():
            return self.call_model(model, in_audio=t["audio"], in_word=t["word"], mask=mask, in_motion=t["motion"],
                                   in_id=t["id"], **kwargs)

    def seeded_mask(self, motion):
        mask = torch.ones_like(motion)
        mask[:, :self.args.pre_frames] = 0
        return mask

    def compute_losses(self, model, batch, epoch):
        a = self.args
        t = prepare_targets(batch, self.vq)
        lat_w = {"face": a.lf, "upper": a.lu, "hands": a.lh, "lower": a.ll}
        cls_w = {"face": a.cf, "upper": a.cu, "hands": a.ch, "lower": a.cl}
        ones = dict.fromkeys(PARTS, 1.0)  # the masked passes weight every part's classification by 1 (§5.3)
        # Under CUDA-graph capture the ratio is train_step's device scalar (set each step, so one capture serves
        # every epoch); it holds mask_ratio(epoch) in float32, the precision of the comparison with a Python float.
        ratio = getattr(self, "graph_mask_ratio", None)  # absent where GraphedTrainStep is used directly (bench, tests)
        if ratio is None or not (t["motion"].is_cuda and torch.cuda.is_current_stream_capturing()):
            ratio = mask_ratio(epoch, a.epochs)
        mask = (torch.rand_like(t["motion"]) < ratio).float()  # element-wise, as published
        # seeded pass, masked pass, and the published `use_word` pass (same inputs, fresh dropout)
        masks = [self.seeded_mask(t["motion"]), mask, mask]
        if self.share_condition:  # one call; the audio/text encoders run once for the three passes
            return self.pass_losses(self.forward(model, t, masks, stack_passes=True), t,
                                    [(lat_w, cls_w), (lat_w, ones), (lat_w, ones)])
        out_seeded, out_self, out_word = (self.forward(model, t, m) for m in masks)
        return {
            "latent": self.latent_loss(out_seeded, t, lat_w), "cls_full": self.cls_loss(out_seeded, t, cls_w),
            "latent_self": self.latent_loss(out_self, t, lat_w), "cls_self": self.cls_loss(out_self, t, ones),
            "latent_word": self.latent_loss(out_word, t, lat_w), "cls_word": self.cls_loss(out_word, t, ones),
        }

    def evaluate(self, loader):
        a = self.args
        lat_w = {"face": a.lf, "upper": a.lu, "hands": a.lh, "lower": a.ll}
        cls_w = {"face": a.cf, "upper": a.cu, "hands": a.ch, "lower": a.cl}
        latent_sum, correct, total, n_batches = 0.0, dict.fromkeys(PARTS, 0), 0, 0
        feats_gen, feats_gt = [], []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            t = prepare_targets(batch, self.vq)
            out = {k: v.float() for k, v in self.forward(self.raw_model, t, self.seeded_mask(t["motion"])).items()}
            latent_sum += float(self.latent_loss(out, t, lat_w))
            n_batches += 1
            for k in PARTS:
                correct[k] += int((out[f"cls_{k}"].argmax(-1) == t["index"][k]).sum())
            total += t["index"]["upper"].numel()
            if self.eval_model is not None:
                decoded = decode_codes(self.vq, choose_codes(self.vq, out, cls_w))
                start_xz = t["trans"][:, 0, [0, 2]]
                pose, _, _, _ = decoded_to_motion(self.vq, decoded, start_xz)
                gen6d = orthonormalise_6d(axis_angle_to_rot6d(pose))
                feats_gen.append(self.eval_model.map2latent(gen6d.float()).reshape(-1, a.vae_length).cpu())
                feats_gt.append(self.eval_model.map2latent(t["pose6d"]).reshape(-1, a.vae_length).cpu())
        metrics = {"latent": latent_sum / max(n_batches, 1)}
        metrics |= {f"acc_{k}": correct[k] / max(total, 1) for k in PARTS}
        if feats_gen:
            metrics["fid"] = float(frechet_distance(torch.cat(feats_gen).numpy().astype(np.float64),
                                                    torch.cat(feats_gt).numpy().astype(np.float64)))
        return metrics
