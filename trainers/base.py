"""The one training loop shared by every trainer.

A trainer subclass supplies only what differs between the stage-1 models and MambaTalk:
`build_model()`, `compute_losses(batch, epoch)` (a dict of already-weighted loss terms, summed here) and
`evaluate(loader)` (a dict of metrics; `best_metric` of it picks the best checkpoint, lower is better).

Everything else lives here: device and DDP set-up, data loading with a resumable per-epoch shuffle, the optimiser and
step schedule of the published code (Adam, lr = lr_base * batch_size / 128, step decay per epoch), bf16/fp16 autocast,
gradient clipping, logging (console, log file, TensorBoard), periodic / best checkpoints in the published format and a
full training state for exact resume.
"""
import importlib
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from utils.config import save_config
from utils.log import get_logger, setup_logging


def resolve_device(name, local_rank=0):
    if name in ("", "auto", None):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config asks for device '{name}' but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(args):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch), shards by rank and can start mid-epoch.

    Deriving the order from the epoch number (not from a running RNG stream) is what makes resume exact.
    """

    def __init__(self, n_items, batch_size, shuffle, seed, rank=0, world_size=1, drop_last=True):
        self.n_items, self.batch_size, self.shuffle, self.seed = n_items, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n_items, generator=g).tolist()
        else:
            order = list(range(self.n_items))
        per_rank = self.n_items // self.world_size if self.drop_last else math.ceil(self.n_items / self.world_size)
        order = (order + order[: per_rank * self.world_size - len(order)]) if len(order) < per_rank * self.world_size else order
        return order[self.rank: per_rank * self.world_size: self.world_size]

    def batches_per_epoch(self):
        n = len(self._rank_indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        indices = self._rank_indices()
        n_batches = self.batches_per_epoch()
        for b in range(self.start_batch, n_batches):
            yield indices[b * self.batch_size: (b + 1) * self.batch_size]

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch


def build_dataset(args, split):
    module = importlib.import_module(f"dataloaders.{args.dataset}")
    return module.CustomDataset(args, split)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    best_metric = None  # name of the evaluate() metric whose minimum selects `<run>/<metric>.bin`

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(args)
        self.is_main = self.rank == 0
        self.run_dir = self._run_dir()
        os.makedirs(self.run_dir, exist_ok=True)
        self.log = setup_logging(os.path.join(self.run_dir, f"{args.name}.txt"), self.rank)
        if self.is_main:
            save_config(args, os.path.join(self.run_dir, f"{args.name}.yaml"))
        seed_everything(args.random_seed + self.rank)
        self.log.info(f"run folder {self.run_dir} | device {self.device} | processes {self.world_size}")

        self.train_data = build_dataset(args, "train")
        self.eval_data = build_dataset(args, args.eval_split) if args.eval_split else None
        self.sampler = EpochSampler(len(self.train_data), args.batch_size, True, args.random_seed,
                                    self.rank, self.world_size, drop_last=True)
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(f"training split has {len(self.train_data)} windows, fewer than one batch of "
                             f"{args.batch_size} per process; lower --batch_size")
        self.train_loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=self.sampler,
                                                        num_workers=args.loader_workers, pin_memory=self.device.type == "cuda",
                                                        persistent_workers=args.loader_workers > 0)
        self.model = self.build_model().to(self.device)
        self.raw_model = self.model
        self.log.info(f"model {type(self.model).__name__}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters")
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=args.decay_epochs, gamma=args.decay_rate)
        self.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        if self.world_size > 1:
            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model)
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.best_value, self.best_epoch = float("inf"), -1
        self.writer = self._summary_writer()
        if args.resume:
            self.resume(args.resume)

    # ---- subclass hooks -------------------------------------------------------------------------------------------
    def build_model(self):
        raise NotImplementedError

    def compute_losses(self, batch, epoch):
        raise NotImplementedError

    def evaluate(self, loader):
        return {}

    def parameters_to_optimise(self):
        return self.raw_model.parameters()

    # ---- set-up helpers -------------------------------------------------------------------------------------------
    def _run_dir(self):
        if self.args.resume and os.path.basename(self.args.resume).startswith("train_state"):
            return os.path.dirname(os.path.abspath(self.args.resume))
        return os.path.join(self.args.out_path, "custom", self.args.name + self.args.notes)

    def build_optimizer(self):
        args = self.args
        lr = args.lr_base * args.batch_size / 128
        if args.opt != "adam":
            raise ValueError(f"config key 'opt': only 'adam' (the published optimiser) is implemented, got '{args.opt}'")
        fused = bool(args.fused_adam) and self.device.type == "cuda"
        return torch.optim.Adam(self.parameters_to_optimise(), lr=lr, betas=tuple(args.opt_betas),
                                weight_decay=args.weight_decay, fused=fused or None)

    def _summary_writer(self):
        if not self.is_main:
            return None
        if self.args.stat == "wandb":
            import wandb  # only when asked for
            wandb.init(project=self.args.project, dir=self.run_dir, name=self.args.name, config=vars(self.args))
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(self.run_dir)

    def _log_scalars(self, prefix, values, step):
        if not self.is_main:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        elif self.args.stat == "wandb":
            import wandb
            wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def save_weights(self, filename):
        if self.is_main:
            path = os.path.join(self.run_dir, filename)
            save_weights(self.raw_model, path)
            self.log.info(f"saved {path}")

    def save_state(self):
        if not self.is_main:
            return
        state = {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "rng": rng_state(),
            "trainer": self.args.trainer, "world_size": self.world_size,
        }
        save_training_state(os.path.join(self.run_dir, "train_state.pt"), state)

    def resume(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: no such file")
        if not os.path.basename(path).startswith("train_state"):
            load_weights(self.raw_model, path)  # a published-format weights file: weights only, as the published code
            self.log.info(f"loaded weights from {path} (no optimiser state: training restarts at epoch 0)")
            return
        state = load_training_state(path)
        if state.get("trainer") != self.args.trainer:
            raise ValueError(f"{path} is a training state of trainer '{state.get('trainer')}', not '{self.args.trainer}'")
        self.raw_model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step, self.batch_in_epoch = state["epoch"], state["global_step"], state["batch_in_epoch"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        if state.get("world_size", 1) == self.world_size:
            set_rng_state(state["rng"])
        else:
            self.log.warning(f"{path} was written by {state.get('world_size')} processes, resuming on {self.world_size}: "
                             "random streams restart")
        self.log.info(f"resumed {path} at epoch {self.epoch}, step {self.global_step}")

    # ---- the loop -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        batch = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            losses = self.compute_losses(batch, self.epoch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite loss at epoch {self.epoch}, step {self.global_step}: {bad}. "
                                     "Check the batch for NaN input (the data cache rejects NaN poses) or lower lr_base.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.args.grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: v.detach() for k, v in losses.items()} | {"total": total.detach()}

    def fit(self):
        args = self.args
        frames_per_step = args.batch_size * args.pose_length * self.world_size
        stop = False
        while self.epoch < args.epochs and not stop:
            self.model.train()
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            bar = tqdm(self.train_loader, desc=f"epoch {self.epoch}", disable=not self.is_main, dynamic_ncols=True,
                       mininterval=1.0)
            sums, count, t0 = {}, 0, time.time()
            for batch in bar:
                losses = self.train_step(batch)
                self.global_step += 1
                self.batch_in_epoch += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
                if self.global_step % args.log_period == 0 or self.batch_in_epoch == 1:
                    fps = frames_per_step * count / max(time.time() - t0, 1e-9)
                    bar.set_postfix(loss=f"{float(losses['total']):.4f}", fps=f"{fps:.0f}")
                    self._log_scalars("train", {k: float(v) for k, v in losses.items()}, self.global_step)
                    self._log_scalars("lr", {"glr": self.optimizer.param_groups[0]["lr"]}, self.global_step)
                if args.max_steps and self.global_step >= args.max_steps:
                    stop = True
                    break
            if count:
                fps = frames_per_step * count / max(time.time() - t0, 1e-9)
                summary = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
                self.log.info(f"[epoch {self.epoch}] steps {self.global_step} | {summary} | {fps:.0f} frames/s")
            if stop and self.batch_in_epoch < self.sampler.batches_per_epoch():
                self.save_state()  # stopped mid-epoch by max_steps: resume continues from this batch
                break
            self.batch_in_epoch = 0
            self.scheduler.step()
            finished_epoch = self.epoch
            self.epoch += 1
            self._end_of_epoch(finished_epoch)
            self.save_state()
        self._barrier()
        self.save_weights(f"last_{max(self.epoch - 1, 0)}.bin")
        self.log.info(f"training done: {self.global_step} steps; best {self.best_metric} {self.best_value:.6g} "
                      f"at epoch {self.best_epoch}" if self.best_metric else f"training done: {self.global_step} steps")
        return self.run_dir

    def _end_of_epoch(self, epoch):
        args = self.args
        if self.eval_data is not None and (epoch + 1) % args.eval_period == 0:
            metrics = self.run_evaluation()
            if self.is_main and self.best_metric in metrics and metrics[self.best_metric] < self.best_value:
                self.best_value, self.best_epoch = metrics[self.best_metric], epoch
                self.save_weights(f"{self.best_metric}.bin")
        if epoch >= args.test_start_epoch and epoch % args.test_period == 0 and epoch != 0:
            self.save_weights(f"last_{epoch}.bin")

    def run_evaluation(self):
        """Evaluation runs on rank 0 with the unwrapped model; the other ranks wait."""
        metrics = {}
        if self.is_main:
            loader = torch.utils.data.DataLoader(self.eval_data, batch_size=self.args.batch_size, shuffle=False,
                                                 drop_last=False, num_workers=self.args.loader_workers)
            self.raw_model.eval()
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                 enabled=self.autocast_dtype is not None):
                metrics = self.evaluate(loader)
            self.raw_model.train()
            self._log_scalars("val", metrics, self.global_step)
            self.log.info(f"[eval {self.args.eval_split} after epoch {self.epoch - 1}] "
                          + " ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
        self._barrier()
        return metrics

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()
