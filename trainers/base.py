"""The one training loop shared by every trainer.

A trainer subclass supplies only what differs between the stage-1 models and MambaTalk:
`build_model()`, `compute_losses(model, batch, epoch)` (a dict of already-weighted loss terms, summed here),
`evaluate(loader)` (a dict of metrics; `best_metric` of it picks the best checkpoint, lower is better) and optionally
`test_checkpoint(path, tag)` (run at the published test epochs).

Everything else lives here: device and DDP set-up, data loading with a resumable per-epoch shuffle, the optimiser and
step schedule of the published code (Adam, lr = lr_base * batch_size / 128, step decay per epoch), bf16/fp16 autocast,
gradient clipping, logging (console, log file, TensorBoard), periodic / best checkpoints in the published format and a
full training state for exact resume.

Under DDP (torchrun), `batch_size` stays the global batch of the published single-GPU run: each of the N processes
takes batch_size / N windows, so the learning rate and the results match one process up to batch composition.
"""
import contextlib
import datetime
import fcntl
import importlib
import itertools
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.layers import channels_last_conv_weights_
from utils.checkpoint import (TRAINING_STATE_KEYS, CheckpointMismatchError, check_state_dict, load_training_state,
                              load_weights, save_training_state, save_weights)
from utils.config import save_config
from utils.flat_weights import FlatWeights
from utils.log import setup_logging

DDP_TIMEOUT = datetime.timedelta(hours=1)  # rank 0 may evaluate / test for a long time while the others wait


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
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, or any size with `ddp: true`, e.g. to
    check the DDP/NCCL path on one GPU): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    launched = "MASTER_ADDR" in os.environ
    if (world_size > 1 or (args.ddp and launched)) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=DDP_TIMEOUT)
    return rank, world_size, device


def avoid_cudnn_attention(device):
    """Training on a GPU: PyTorch 2.11 runs bf16/fp16 attention on cuDNN's kernel by default, and its backward returned
    NaN query gradients from finite inputs after ~50 bf16 MambaTalk steps (H100, 64-frame windows; the forward, the
    memory-efficient and the math kernels were finite on the same step; cf. pytorch/pytorch#196678). Flash and
    memory-efficient attention are used instead (float32 never used cuDNN's)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def untuned_cudnn():
    """cuDNN without autotuning, for calls whose input lengths vary (Trainer.cudnn_benchmark)."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=False, deterministic=b.deterministic, allow_tf32=b.allow_tf32)


def check_training_config(args, world_size):
    """Options of the published optimiser/scheduler factories that are not implemented fail loudly."""
    if args.opt != "adam":
        raise ValueError(f"config key 'opt': only 'adam' (the published optimiser) is implemented, got '{args.opt}'")
    if args.lr_policy != "step":
        raise ValueError(f"config key 'lr_policy': only 'step' (the published schedule) is implemented, "
                         f"got '{args.lr_policy}'")
    if args.warmup_epochs:
        raise ValueError(f"config key 'warmup_epochs': warm-up is not implemented (published configs use 0), "
                         f"got {args.warmup_epochs}")
    if args.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"config key 'amp': expected none, bf16 or fp16, got '{args.amp}'")
    if args.stat not in ("ts", "wandb", "none"):
        raise ValueError(f"config key 'stat': expected ts (TensorBoard), wandb or none, got '{args.stat}'")
    if args.batch_size % world_size:
        raise ValueError(f"batch_size {args.batch_size} is the global batch and must divide evenly over "
                         f"{world_size} processes")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every random stream, as tensors and plain values (a training state loads with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Evaluation and testing leave the random streams as they found them, so the training trajectory does not
    depend on when (or whether) they run, e.g. after a resume."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


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
        if len(order) < per_rank * self.world_size:  # pad by wrapping around so every rank gets per_rank items
            order = order + order[: per_rank * self.world_size - len(order)]
        return order[self.rank: per_rank * self.world_size: self.world_size]

    def batches_per_epoch(self):
        n = len(self._rank_indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        indices = self._rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield indices[b * self.batch_size: (b + 1) * self.batch_size]

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch


def check_data_path(args):
    if not os.path.isdir(args.data_path):
        raise FileNotFoundError(f"dataset folder {args.data_path} not found (data_path of {args.config_path}); "
                                "download BEAT2 there, or write the demo data with "
                                "`python -m dataloaders.synthetic --out outputs/demo/beat2 --preset demo`")


def build_dataset(args, split, whole=None):
    """The split's dataset; whole=True: whole sequences, as the test split always is (BeatDataset)."""
    check_data_path(args)
    module = importlib.import_module(f"dataloaders.{args.dataset}")
    return module.CustomDataset(args, split, whole=whole)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_finite(batch, where):
    for k, v in batch.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"{where}: batch item '{k}' contains NaN or infinite values "
                                     "(a corrupted data cache? rebuild it with --new_cache true)")


def claim_run_dir(path, existing):
    """Make (or, when resuming, reuse) the run folder and hold `<run>/.run.lock` until release: two runs never share
    a folder. A new run whose name is taken (two runs started in the same second) gets `<path>_2`, `_3` ...;
    resuming a folder another process holds is refused. Returns (folder, lock file object)."""
    if existing:
        folder = path
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for k in itertools.count(1):
            folder = path if k == 1 else f"{path}_{k}"
            try:
                os.mkdir(folder)  # exclusive: of two processes asking for one name, one gets FileExistsError
                break
            except FileExistsError:
                continue
    lock = open(os.path.join(folder, ".run.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if the process dies
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ValueError(f"run folder {folder} is in use by another training process (pid {holder}); two runs "
                         "writing one folder would mix their logs and checkpoints. Wait for it to finish, or resume "
                         "from a copy of its train_state.pt in another folder") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return folder, lock


class Trainer:
    best_metric = None  # name of the evaluate() metric whose minimum selects `<run>/<metric>.bin`
    # cuDNN's autotuning (torch.backends.cudnn.benchmark) for the training steps on GPUs: their windows have one shape,
    # so each convolution is tuned once (H200, both published audio encoders' convolutions at batch 64, bf16: 15.9 ->
    # 12.9 ms forward + backward). Evaluation and the checkpoint tests run with it off: their sequences vary in length.
    cudnn_benchmark = True

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(args)
        check_training_config(args, self.world_size)
        avoid_cudnn_attention(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        check_data_path(args)
        self.check_inputs()  # before anything is written: a bad config leaves no empty run folder behind
        self.is_main = self.rank == 0
        self.run_dir, self.run_lock = self._run_dir(), None  # only rank 0 writes there (other ranks' names may differ)
        if self.is_main:
            self.run_dir, self.run_lock = claim_run_dir(self.run_dir, existing=self._resumes_run())
        try:
            self._setup(args)
        except BaseException:
            self.release_run_dir()
            raise

    def _setup(self, args):
        self.log = setup_logging(os.path.join(self.run_dir, f"{args.name}.txt"), self.rank)
        if self.is_main:
            save_config(args, os.path.join(self.run_dir, f"{args.name}.yaml"))
        seed_everything(args.random_seed + self.rank)
        self.log.info(f"run folder {self.run_dir} | device {self.device} | processes {self.world_size}")

        if not self.is_main:
            self._barrier()  # rank 0 builds (or checks) the data caches first; the others then only read them
        self.train_data = build_dataset(args, "train")
        self.eval_data = build_dataset(args, args.eval_split) if args.eval_split and self.is_main else None
        if self.is_main:
            self._barrier()
        self.rank_batch = args.batch_size // self.world_size
        self.sampler = EpochSampler(len(self.train_data), self.rank_batch, True, args.random_seed,
                                    self.rank, self.world_size, drop_last=True)
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(f"training split of {args.data_path} has {len(self.train_data)} windows, fewer than one "
                             f"batch of {self.rank_batch} per process; lower --batch_size")
        # Loaders get their own generators: creating an iterator must not draw from the global RNG (exact resume).
        self.train_loader = torch.utils.data.DataLoader(
            self.train_data, batch_sampler=self.sampler, num_workers=args.loader_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=args.loader_workers > 0,
            generator=torch.Generator())
        self.eval_loader = None if self.eval_data is None else torch.utils.data.DataLoader(
            self.eval_data, batch_size=self.rank_batch, shuffle=False, drop_last=False,
            num_workers=args.loader_workers, generator=torch.Generator())
        self.raw_model = self.build_model().to(self.device)
        channels_last_conv_weights_(self.raw_model)  # GPU audio encoders: the weight layout their convolutions read
        n_train = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        self.log.info(f"model {type(self.raw_model).__name__}: {n_train / 1e6:.2f} M trained parameters, "
                      f"{self.rank_batch} windows per process and step, {self.sampler.batches_per_epoch()} steps per epoch")
        self.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=args.decay_epochs, gamma=args.decay_rate)
        if self.flat is not None:
            self.log.info(f"flat weights: the {len(self.flat.params)} trained parameters are views of one float32 tensor "
                          "(utils/flat_weights.py)")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.model = self.raw_model
        if dist.is_initialized():
            self.model = DistributedDataParallel(self.raw_model,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            if dist.is_initialized():
                self.log.warning("compile: true under DDP compiles for minutes and measured no faster than eager "
                                 "(README, Known limitations)")
            self.model = torch.compile(self.model, mode=self.compile_mode())
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.best_value, self.best_epoch, self.evaluated_step = float("inf"), -1, -1
        self.writer = self._summary_writer()
        if args.resume:
            self.resume(args.resume)

    # ---- subclass hooks -------------------------------------------------------------------------------------------
    def compile_mode(self):
        """torch.compile's mode for `compile: true`. One process on a GPU: with CUDA graphs ("reduce-overhead", 28k ->
        34k frames/s at the published size on an H100, run_scripts/bench_gpu.py); under DDP plain compilation (its
        gradient hooks run between graphs)."""
        return "reduce-overhead" if self.device.type == "cuda" and not dist.is_initialized() else None

    def graph_step(self):
        """Whether train_step runs as one CUDA graph (trainers that can capture their step override this)."""
        return False

    def check_inputs(self):
        """Raise FileNotFoundError for files the trainer will need (checked before the run folder is made)."""

    def build_model(self):
        raise NotImplementedError

    def compute_losses(self, model, batch, epoch):
        raise NotImplementedError

    def evaluate(self, loader):
        return {}

    def before_training(self):
        """Called once before the first step of a fresh run (not on resume)."""

    def test_checkpoint(self, path, tag):
        """Called on rank 0 with a saved weights file at the published test epochs and for the best checkpoint."""

    # ---- set-up helpers -------------------------------------------------------------------------------------------
    def _resumes_run(self):
        return bool(self.args.resume) and os.path.basename(self.args.resume).startswith("train_state")

    def _run_dir(self):
        if self._resumes_run():
            if not os.path.isfile(self.args.resume):
                raise FileNotFoundError(f"--resume {self.args.resume}: no such file")
            return os.path.dirname(os.path.abspath(self.args.resume))
        return os.path.join(self.args.out_path, "custom", self.args.name + self.args.notes)

    def release_run_dir(self):
        """Let another process resume this run folder (fit() calls it at its end)."""
        if self.run_lock is not None:
            self.run_lock.close()
            self.run_lock = None

    def build_optimizer(self):
        args = self.args
        lr = args.lr_base * args.batch_size / 128  # published scaling (spec §5.5)
        # a graphed step skips non-finite updates on the device, which only fused Adam can (apply_gradients)
        fused = bool(args.fused_adam or self.graph_step()) and self.device.type == "cuda"
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.flat = FlatWeights(self.raw_model, params, self.autocast_dtype) if self.use_flat_weights() else None
        return torch.optim.Adam([self.flat.master] if self.flat else params, lr=lr, betas=tuple(args.opt_betas),
                                weight_decay=args.weight_decay, fused=fused or None)

    # Under bf16/fp16 autocast the single-process training model keeps its trainable weights in one flat tensor
    # (utils.flat_weights: autocast's numbers; one weight cast and one gradient accumulation instead of one per
    # weight, one tensor to clip and update). None: on GPUs, where the eager step is bound by host time per
    # launch (on a CPU the weight copies cost more than the launches they save); True/False: always/never.
    flat_weights = None

    def use_flat_weights(self):
        """Flat weights need the model called as itself (not DDP-wrapped or compiled: their gradient hooks and
        graphs expect the parameters), autocast, and weight_decay 0 (FlatWeights gives unused weights a zero
        gradient, which weight decay would turn into an update that per-parameter Adam does not make)."""
        flat = self.device.type == "cuda" if self.flat_weights is None else self.flat_weights
        return bool(flat and self.autocast_dtype is not None and not dist.is_initialized()
                    and not self.args.compile and self.args.weight_decay == 0)

    def optimized_tensors(self):
        """What the optimiser updates (the trainable parameters in model order, or the one flat tensor): the list to
        clip. Taken from the optimiser: walking the module tree for it took ~3 ms of host time per step."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def optimizer_state(self):
        """The optimiser's state_dict, per parameter also with flat weights: a training state resumes either way."""
        state = self.optimizer.state_dict()
        return self.flat.per_parameter_state(state) if self.flat else state

    def _summary_writer(self):
        if not self.is_main or self.args.stat == "none":
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
        """Rank 0 writes `<run>/<filename>` in the published format; returns its path."""
        path = os.path.join(self.run_dir, filename)
        if self.is_main:
            save_weights(self.raw_model, path)
            self.log.info(f"saved {path}")
        return path

    def save_state(self):
        if not self.is_main:
            return
        state = {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer_state(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "rng": rng_state(),
            "trainer": self.args.trainer, "world_size": self.world_size, "batch_size": self.args.batch_size,
        }
        save_training_state(os.path.join(self.run_dir, "train_state.pt"), state)

    def resume(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: no such file")
        if not os.path.basename(path).startswith("train_state"):
            load_weights(self.raw_model, path)  # a published-format weights file: weights only, as the published code
            self.log.info(f"loaded weights from {path} (no optimiser state: training restarts at epoch 0)")
            return
        state = load_training_state(path, TRAINING_STATE_KEYS)
        if state["trainer"] != self.args.trainer:
            raise ValueError(f"{path} is a training state of trainer '{state['trainer']}', not '{self.args.trainer}'")
        if state.get("batch_size", self.args.batch_size) != self.args.batch_size:
            raise ValueError(f"{path} was trained with batch_size {state['batch_size']}: a resume continues its epoch "
                             f"where it stopped and cannot change it (got --batch_size {self.args.batch_size}). Keep "
                             f"{state['batch_size']}, or start a new run from its weights with "
                             "--resume <run>/last_N.bin")
        if not isinstance(state["model"], dict) or not all(torch.is_tensor(v) for v in state["model"].values()):
            raise CheckpointMismatchError(f"{path}: its 'model' entry is not a state dict of tensors")
        check_state_dict(self.raw_model, state["model"], path)  # another config: the keys and shapes that differ
        try:
            self.raw_model.load_state_dict(state["model"], strict=True)
            saved = self._this_runs_adam(state["optimizer"])
            self.optimizer.load_state_dict(self.flat.flat_state(saved) if self.flat else saved)
            self._moments_in_parameter_layout()
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointMismatchError(f"{path}: optimiser or scheduler state does not match this config "
                                          f"({first})") from None
        self.apply_resumed_settings(state)
        self.epoch, self.global_step, self.batch_in_epoch = state["epoch"], state["global_step"], state["batch_in_epoch"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        if state.get("world_size", 1) == self.world_size:
            set_rng_state(state["rng"])  # rank 0's streams; under DDP the ranks' dropout streams then coincide
        else:
            self.log.warning(f"{path} was written by {state.get('world_size')} processes, resuming on {self.world_size}: "
                             "random streams restart")
        self.log.info(f"resumed {path} at epoch {self.epoch}, step {self.global_step}")

    def _moments_in_parameter_layout(self):
        """Adam's moments loaded from a state saved with other weight layouts (e.g. a CPU run resumed on a GPU, where
        channels_last_conv_weights_ reorders the audio encoders' weights) are copied into their parameter's layout:
        fused Adam walks parameter, gradient and moments as flat memory and needs the same strides."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                moments = self.optimizer.state.get(p, {})
                for k, v in moments.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                        moments[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def _this_runs_adam(self, saved):
        """A saved optimiser state with this run's Adam implementation (fused, capturable, foreach): they follow the
        device and cuda_graph, not the saved run (a graphed GPU run writes capturable groups, which Adam refuses on
        a CPU). Loading then puts the step counts where this implementation keeps them."""
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
            return saved  # load_state_dict names what is wrong
        flags = {k: self.optimizer.defaults.get(k) for k in ("fused", "capturable", "foreach")}
        return saved | {"param_groups": [g | flags if isinstance(g, dict) else g for g in saved["param_groups"]]}

    def apply_resumed_settings(self, state):
        """Loading the optimiser and scheduler states brings back the saved run's learning rate, betas, weight decay
        and decay schedule; settings given now (they are what the run's YAML records) replace them, with a log line.
        Unchanged settings leave the loaded values untouched, so a plain resume stays bit-exact."""
        args, groups, sched = self.args, self.optimizer.param_groups, self.scheduler
        changes = []
        lr = args.lr_base * args.batch_size / 128
        if sched.base_lrs[0] != lr:  # rescale the decayed rate: the step schedule continues from the new base
            ratio = lr / sched.base_lrs[0]
            for group in groups:
                group["lr"] *= ratio
                group["initial_lr"] = lr
            sched.base_lrs = [lr] * len(groups)
            sched._last_lr = [group["lr"] for group in groups]
            changes.append(f"lr_base {args.lr_base:g} (learning rate now {groups[0]['lr']:.3e})")
        betas = tuple(args.opt_betas)
        if tuple(groups[0]["betas"]) != betas:
            for group in groups:
                group["betas"] = betas
            changes.append(f"opt_betas {list(betas)}")
        if groups[0]["weight_decay"] != args.weight_decay:
            for group in groups:
                group["weight_decay"] = args.weight_decay
            changes.append(f"weight_decay {args.weight_decay:g}")
        if (sched.step_size, sched.gamma) != (args.decay_epochs, args.decay_rate):
            sched.step_size, sched.gamma = args.decay_epochs, args.decay_rate
            changes.append(f"decay_epochs {args.decay_epochs}, decay_rate {args.decay_rate:g} (from the next epoch)")
        if changes:
            self.log.info("resume: settings that differ from the saved run are applied: " + "; ".join(changes))

    # ---- the loop -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        self.check_previous_loss()
        batch = to_device(batch, self.device)
        losses = self.compute_losses(self.model, batch, self.epoch)
        total = sum(losses.values())
        where = f"epoch {self.epoch}, step {self.global_step + 1}"
        if self.device.type == "cuda":
            # Checked at the start of the next step (or at the next log line): a host sync here would leave the GPU
            # idle while the backward pass is launched (~4 ms of a ~130-ms eager bf16 step on an H200). A non-finite
            # loss gives non-finite gradients, whose update apply_gradients skips on the device, so the weights are
            # untouched when the error is raised.
            self._unchecked_loss = (total.detach(), losses, batch, where)
        else:
            self._raise_if_not_finite(total, losses, batch, where)  # nothing has been updated yet
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients itself
            if self.args.grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.optimized_tensors(), self.args.grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.apply_gradients()
        return {k: v.detach() for k, v in losses.items()} | {"total": total.detach()}

    @staticmethod
    def _raise_if_not_finite(total, losses, batch, where):
        if not torch.isfinite(total):  # a host sync
            check_finite(batch, where)
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"{where}: non-finite loss {bad}; the inputs were finite, so lower lr_base "
                                     "or check the stage-1 models")

    def check_previous_loss(self):
        """Raise for the last step's loss if it was not finite and has not been checked yet (GPU training)."""
        pending, self._unchecked_loss = getattr(self, "_unchecked_loss", None), None
        if pending is not None:
            self._raise_if_not_finite(*pending)

    def apply_gradients(self):
        """Clip (`grad_norm` > 0) and update, skipping the update when the gradients are not finite although the loss
        was: weights stay as they were and `skipped_steps` (a device tensor, read at log time) counts the step.
        Such a step turned every weight into NaN in a 450-step fp32 run at the published size (issue 17, README
        Known limitations). Fused Adam skips on the device (its `found_inf` input, no host sync, also inside a CUDA
        graph); other optimisers check on the host."""
        params = self.optimized_tensors()
        if self.args.grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        bad = (~torch.isfinite(norm)).float()
        if getattr(self, "skipped_steps", None) is None or self.skipped_steps.device != bad.device:
            self.skipped_steps = torch.zeros((), device=bad.device)
        self.skipped_steps += bad
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(bad):
            self.optimizer.step()
        return bad

    def check_skipped_steps(self, n_steps):
        """Log the steps that apply_gradients skipped since the last call; raise when all `n_steps` were."""
        skipped = getattr(self, "skipped_steps", None)
        n = 0 if skipped is None else int(skipped)
        if n:
            skipped.zero_()
            where = f"epoch {self.epoch}, step {self.global_step}"
            if n >= n_steps:
                raise FloatingPointError(f"{where}: the gradients of all of the last {n_steps} steps were non-finite "
                                         "(the losses were finite); lower lr_base or use grad_norm")
            self.log.warning(f"{where}: {n} of the last {n_steps} steps skipped: non-finite gradients from finite "
                             "losses")

    def autocast(self):
        """`amp` (bf16/fp16) for the networks' forward passes; trainers compute losses (rotations, acos, the body
        model, log-softmax) on float32 outputs outside it, where bf16 rounding would give NaN or bias."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def call_model(self, model, *args, **kwargs):
        """model(*args, **kwargs); call it under self.autocast(). With flat weights, the training model's calls with
        gradients on go through FlatWeights.call (weights made from the flat tensor, gradients back into it)."""
        if self.flat is not None and model is self.raw_model and torch.is_grad_enabled():
            return self.flat.call(model, *args, **kwargs)
        return model(*args, **kwargs)

    def _done(self):
        return self.epoch >= self.args.epochs or (self.args.max_steps and self.global_step >= self.args.max_steps)

    def train_epoch(self):
        """Steps of the current epoch from `batch_in_epoch` on, until its end or max_steps."""
        args = self.args
        n_batches = self.sampler.batches_per_epoch()
        self.raw_model.train()
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch}", disable=not self.is_main, dynamic_ncols=True,
                   mininterval=1.0, leave=False)
        sums, count, window = {}, 0, {"n": 0, "data": 0.0, "net": 0.0, "sums": {}}
        t_epoch = t_data = time.perf_counter()
        for batch in bar:
            t_net = time.perf_counter()
            losses = self.train_step(batch)  # loss tensors stay on the device until a log line needs them
            now = time.perf_counter()
            window["data"] += t_net - t_data
            window["net"] += now - t_net
            window["n"] += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            count += 1
            self.global_step += 1
            self.batch_in_epoch += 1
            if self.global_step % args.log_period == 0 or self.batch_in_epoch == n_batches:
                self.check_previous_loss()
                n = window["n"]
                self.check_skipped_steps(n)
                window["sums"] = {k: float(v) for k, v in window["sums"].items()}
                fps = args.batch_size * args.pose_length * n / max(window["data"] + window["net"], 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                mem = f" mem: {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f}GB" if self.device.type == "cuda" else ""
                self.log.info(f"[{self.epoch}][{self.batch_in_epoch}/{n_batches}] "
                              + " ".join(f"{k}: {v / n:.4f}" for k, v in window["sums"].items())
                              + f" glr: {lr:.3e} dtime: {1000 * window['data'] / n:.0f}ms "
                                f"ntime: {1000 * window['net'] / n:.0f}ms {fps:.0f} frames/s{mem}")
                bar.set_postfix(loss=f"{float(losses['total']):.4f}", fps=f"{fps:.0f}")
                self._log_scalars("train", {k: v / n for k, v in window["sums"].items()}, self.global_step)
                self._log_scalars("lr", {"glr": lr}, self.global_step)
                window = {"n": 0, "data": 0.0, "net": 0.0, "sums": {}}
            if args.max_steps and self.global_step >= args.max_steps:
                break
            t_data = time.perf_counter()
        bar.close()
        self.check_previous_loss()  # where max_steps stopped between log lines
        if count:
            fps = args.batch_size * args.pose_length * count / max(time.perf_counter() - t_epoch, 1e-9)
            summary = " ".join(f"{k} {float(v) / count:.4f}" for k, v in sums.items())
            self.log.info(f"[epoch {self.epoch}] steps {self.global_step} | {summary} | {fps:.0f} frames/s")
        return self.batch_in_epoch == n_batches

    def fit(self):
        """Train until `epochs` (or `max_steps`), evaluating, checkpointing and saving the resume state as it goes.
        Returns the run folder, released for a later --resume."""
        try:
            return self._fit()
        finally:
            self.release_run_dir()

    def _fit(self):
        with logging_redirect_tqdm(loggers=[self.log]):
            if self.global_step == 0:
                with preserved_rng():
                    self.before_training()
            while not self._done():
                if self.train_epoch():
                    finished = self.epoch
                    self.batch_in_epoch = 0
                    self.scheduler.step()
                    self.epoch += 1
                    self._end_of_epoch(finished)
                self.save_state()  # after every epoch, and where max_steps stopped mid-epoch
            self._sync_buffers()
            if self.eval_loader is not None and self.evaluated_step != self.global_step:
                self.evaluate_and_select(self.epoch if self.batch_in_epoch else self.epoch - 1)  # the final weights
            self._barrier()
            last_epoch = self.epoch if self.batch_in_epoch else max(self.epoch - 1, 0)
            self.save_weights(f"last_{last_epoch}.bin")
            best = os.path.join(self.run_dir, f"{self.best_metric}.bin")
            if self.is_main and self.args.epochs >= self.args.test_start_epoch and os.path.isfile(best):
                with preserved_rng(), untuned_cudnn():  # published: the best checkpoint is tested last
                    self.test_checkpoint(best, f"best_{self.best_metric}")
            self._barrier()
        if self.best_metric and self.best_epoch >= 0:
            self.log.info(f"training done: {self.global_step} steps; best {self.best_metric} {self.best_value:.6g} "
                          f"after epoch {self.best_epoch}")
        else:
            self.log.info(f"training done: {self.global_step} steps")
        if self.writer is not None:
            self.writer.close()
        return self.run_dir

    def _end_of_epoch(self, epoch):
        args = self.args
        self._sync_buffers()
        if self.eval_loader is not None and (epoch + 1) % args.eval_period == 0:
            self.evaluate_and_select(epoch)
        self._barrier()
        if epoch >= args.test_start_epoch and epoch % args.test_period == 0 and epoch != 0:
            path = self.save_weights(f"last_{epoch}.bin")
            if self.is_main:
                with preserved_rng(), untuned_cudnn():
                    self.test_checkpoint(path, str(epoch))
            self._barrier()

    def evaluate_and_select(self, epoch):
        """Rank 0 evaluates the unwrapped model on eval_split and keeps `<best_metric>.bin` (lower is better)."""
        self.raw_model.eval()
        with preserved_rng(), torch.no_grad(), untuned_cudnn():
            metrics = self.evaluate(self.eval_loader)
        self.raw_model.train()
        self.evaluated_step = self.global_step
        self._log_scalars("val", metrics, self.global_step)
        self.log.info(f"[eval {self.args.eval_split} after epoch {epoch}, step {self.global_step}] "
                      + " ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
        value = metrics.get(self.best_metric)
        if value is not None and value < self.best_value:
            self.best_value, self.best_epoch = value, epoch
            self.save_weights(f"{self.best_metric}.bin")
        return metrics

    def _sync_buffers(self):
        """DDP broadcasts buffers before each forward; the last forward's BatchNorm statistics still differ per rank."""
        if self.world_size > 1:
            for buffer in self.raw_model.buffers():
                dist.broadcast(buffer, 0)

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()
