"""Speed of training and generation (issue 9): the published configuration against the fast one, in one run.

    python run_scripts/bench_gpu.py                 # GPU: published sizes
    python run_scripts/bench_gpu.py --tiny          # small sizes (CPU: what the test runs, so this cannot rot)
    python run_scripts/bench_gpu.py --only train window --compile
    python run_scripts/bench_gpu.py --compile --isolate --section_timeout 300   # each section in its own process

Prints ONE table (card named): for each target, the plain float32 eager configuration that mirrors the published
code and the fast configuration, with peak GPU memory, then the agreement between the two.

  train    full MambaTalk training step (frozen VQ encoders, three passes, six losses, backward, clipping, Adam)
           at batch x 64 frames through the trainer's own train_step. published: fp32, three full passes, Adam,
           mamba-ssm's scan. fast: bf16 autocast, conditioning shared by the three passes, passes batched, fused Adam,
           Triton scan (+ the whole eager step as one CUDA graph, as `cuda_graph: true`: the row "graph"; + that with
           the model compiled, as `compile: true` with `cuda_graph: true`: --compile, the row "compile-graph"; the
           graphed rows run after every other section). SIGTERM (e.g. `timeout`) prints the rows measured so far.
           The published rows run with the published code's cuDNN flags (benchmark, deterministic).
  window   one 64-frame window at batch 1, the generator's forward. published: eager fp32. fast: CUDA graph (bf16:
           on bf16 weights, as generate() runs); and generate()'s per-window step alone.
  clip     a 60-s clip (30 windows, one after another), codes decoded to motion. published: the per-window loop of
           the published test (full forward per window, inputs sliced on the host). fast: trainers.generate.
  testset  15 sequences, 956 s of speech in all (BEAT2 speaker 2's test split), batched across sequences.
  model    (with --published_repo PATH, a fetched copy of the published repository, imported at run time and never
           part of this project) the generator alone: forward of the three passes + six losses + backward + clipping
           + Adam at batch x 64 frames, same weights and inputs: the published class (fp32, bf16 autocast) against
           ours (three separate passes; shared conditioning and batched passes).
  scan     one Mamba layer (d_model 256/512/768, 64 frames, batch 64), forward+backward: mamba-ssm's kernel (cuda)
           against the torch backend (Triton kernels on GPUs) and the torch backend's PyTorch loop.
Weights are random (speed only); data are random tensors already on the device (the loader is timed elsewhere).
"""
import argparse
import copy
import faulthandler
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import scan, ssm  # noqa: E402
from models.layers import BasicBlock, channels_last_conv_weights_  # noqa: E402
from models.mambatalk import MambaTalk  # noqa: E402
from models.motion_representation import build_stage1_models  # noqa: E402
from models.scan import available_backends  # noqa: E402
from trainers import generate as gen  # noqa: E402
from trainers.base import avoid_cudnn_attention  # noqa: E402
from trainers.mambatalk import MambaTalkTrainer  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.cuda_graph import GraphedFunction  # noqa: E402

TINY = dict(hidden_size=64, audio_f=64, motion_f=32, vae_codebook_size=32, word_index_num=40, word_dims=16,
            batch_size=2, pose_length=32)
SECTIONS = ("train", "model", "window", "clip", "testset", "scan")
TESTSET_SECONDS = [40.0 + i * (87.47 - 40.0) / 14 for i in range(15)]  # 956 s, as BEAT2 speaker 2's test split
# training configurations: label, shared conditioning, amp, fused Adam, torch.compile mode, ssm backend, batched passes.
# Backend "cuda" is mamba-ssm's kernel where it is built (the published code's), else auto; auto trains on the torch
# backend's Triton kernels on GPUs. "compile-ro" is what the trainer runs with `compile: true` on one GPU.
TRAIN_ROWS = {
    "published": ("published: fp32, 3 full passes, Adam", False, "none", False, None, "cuda", True),
    # sequential passes draw dropout as the published step does: the first-step losses must be identical
    "shared": ("fp32, shared conditioning, separate passes", True, "none", False, None, "cuda", False),
    "fp32": ("fp32 trainer default: shared cond., batched passes, Triton scan", True, "none", False, None, "auto",
             True),
    "fast-mamba": ("bf16, shared cond., batched, fused Adam, mamba-ssm scan", True, "bf16", True, None, "cuda", True),
    "fast": ("fast: bf16, shared cond., batched, fused Adam, Triton scan", True, "bf16", True, None, "auto", True),
    "compile": ("fast + torch.compile", True, "bf16", True, "default", "auto", True),
    "compile-ro": ("fast + torch.compile with CUDA graphs (reduce-overhead)", True, "bf16", True, "reduce-overhead",
                   "auto", True),
    # MambaTalkTrainer.train_step with `cuda_graph: true` (the default `auto` on one GPU): the eager step captured as
    # one CUDA graph (utils.cuda_graph.GraphedTrainStep, capturable fused Adam), no compile
    "graph": ("fast + the whole step as one CUDA graph (no compile; default)", True, "bf16", True, "graph", "auto", True),
    # `compile: true` with `cuda_graph: true`: the compiled model (no CUDA graphs of its own) and the rest of the step
    # (targets, losses, backward, Adam) captured as one CUDA graph
    "compile-graph": ("fast + torch.compile + the whole step as one CUDA graph", True, "bf16", True, "compile-graph",
                      "auto", True),
}
GRAPH_ROWS = ("graph", "compile-graph")  # a failed capture can leave the CUDA context unusable: these run last
CUDNN_BENCHMARK = None  # --cudnn_benchmark: cuDNN's autotuning for this project's training rows (None: the trainer's)


# ---- helpers --------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()  # models of earlier rows must not count towards this row's peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def median_seconds(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_models(args, device, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random word vectors: no vocab here
        model = MambaTalk(args)
    model.global_scan.face_q_self_attn.requires_grad_(False)  # as the trainer does: its output is discarded
    vq = build_stage1_models(args)
    for m in vq.values():
        m.to(device).eval().requires_grad_(False)
    return model.to(device), vq


def training_batch(args, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = args.batch_size, args.pose_length
    samples = int(T / args.pose_fps * args.audio_sr)
    r = lambda *s: torch.randn(*s, generator=g)
    batch = dict(pose=torch.cat([0.3 * r(B, T, 165), (r(B, T, 4) > 0).float()], dim=-1), trans=r(B, T, 3),
                 facial=0.3 * r(B, T, 100), audio=r(B, samples, 3),
                 word=torch.randint(0, args.word_index_num, (B, T), generator=g),
                 id=torch.randint(0, 25, (B, 1), generator=g).expand(B, T)[..., None].clone())
    return {k: v.to(device) for k, v in batch.items()}


def row_backend(name):
    return "auto" if name == "cuda" and "cuda" not in available_backends() else name


def step_trainer(args, device, model, vq, share, amp, fused, compile_mode=None, batched=True, flat_weights=None):
    """A MambaTalkTrainer that runs its own train_step/compute_losses, without the data/logging set-up.
    flat_weights: the trainer's choice (None: as Trainer, on GPUs under bf16 unless compiled)."""
    avoid_cudnn_attention(device)  # as Trainer.__init__
    # the published code runs with cuDNN's benchmark and deterministic flags on
    published = not share and amp == "none"
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = published and device.type == "cuda"
    if not published and device.type == "cuda":  # as Trainer.__init__ (--cudnn_benchmark: forced on or off)
        torch.backends.cudnn.benchmark = MambaTalkTrainer.cudnn_benchmark if CUDNN_BENCHMARK is None else CUDNN_BENCHMARK
    for encoder in (model.audio_pre_encoder_face, model.audio_pre_encoder_body, model.global_scan.motion_encoder):
        encoder.channels_last = False if published else None  # the published layouts
    channels_last_conv_weights_(model)  # as Trainer.__init__
    if not published:
        for m in vq.values():
            channels_last_conv_weights_(m)  # as trainers.mambatalk.load_frozen_models
    model.batch_passes = batched
    args = copy.copy(args)
    args.amp, args.fused_adam = amp, fused
    args.cuda_graph = compile_mode in GRAPH_ROWS  # the trainer's own graphed step; the other rows eager
    t = MambaTalkTrainer.__new__(MambaTalkTrainer)
    t.args, t.device, t.vq, t.raw_model, t.model = args, device, vq, model, model
    t.share_condition = share
    t.autocast_dtype = torch.bfloat16 if amp == "bf16" else None
    if flat_weights is not None:
        t.flat_weights = flat_weights
    if compile_mode and compile_mode != "graph":
        t.flat_weights = False  # as Trainer.use_flat_weights with compile: true (graphs expect the parameters)
    t.optimizer = t.build_optimizer()
    if compile_mode in GRAPH_ROWS:
        t._make_optimizer_capturable()  # as train_step before a capture (tests capture GraphedTrainStep directly)
    t.scaler = torch.amp.GradScaler(device.type, enabled=False)
    t.epoch, t.global_step = 0, 0
    if compile_mode == "compile-graph":
        t.model = torch.compile(model)
    elif compile_mode and compile_mode not in GRAPH_ROWS:
        t.model = torch.compile(model, mode=compile_mode)
    return t


def random_sequences(args, seconds, device_seed=0):
    g = torch.Generator().manual_seed(device_seed)
    seqs = []
    for i, s in enumerate(seconds):
        n = int(s * gen.FPS)
        seqs.append(gen.Sequence(audio=torch.randn(int(s * gen.SAMPLES_PER_SECOND), 3, generator=g),
                                 word=torch.randint(0, args.word_index_num, (n,), generator=g), speaker=i % 25,
                                 n_frames=n, start_trans=torch.zeros(3)))
    return seqs


@torch.no_grad()
def published_generate(model, vq, sequences, args):
    """The published test's loop: every window runs the whole generator (audio encoders included) on inputs sliced
    on the host and copied over, then its codes are decoded for the next seed; sequences batched per window."""
    device = next(model.parameters()).device
    window, pre = args.pose_length, args.pre_frames
    cls_weights = {"face": args.cf, "upper": args.cu, "hands": args.ch, "lower": args.cl}
    model.eval()
    plans = [gen.WindowPlan(s.n_frames, s.audio.shape[0], window, pre, False) for s in sequences]
    seeds = [gen.neutral_seed(pre, device) for _ in sequences]
    starts = [s.start_trans.to(device).float() for s in sequences]
    for seed, st in zip(seeds, starts):
        seed[:, 330:333] = st
    codes = [[] for _ in sequences]
    for w in range(max(p.n_windows for p in plans)):
        ids = [i for i, p in enumerate(plans) if p.n_windows > w]
        audio = torch.stack([gen._slice_pad(sequences[i].audio, plans[i].audio_starts[w], plans[i].audio_len)
                             for i in ids]).to(device)
        word = torch.stack([gen._slice_pad(sequences[i].word, plans[i].frame_starts[w], window) for i in ids]).to(device)
        spk = torch.stack([torch.full((window, 1), sequences[i].speaker, dtype=torch.long) for i in ids]).to(device)
        motion = torch.zeros(len(ids), window, seeds[0].shape[1], device=device)
        motion[:, :pre] = torch.stack([seeds[i] for i in ids])
        mask = torch.ones_like(motion)
        mask[:, :pre] = 0
        out = model(in_audio=audio, in_word=word, mask=mask, in_motion=motion, in_id=spk)
        window_codes = gen.choose_codes(vq, out, cls_weights)
        decoded = gen.decode_codes(vq, {k: window_codes[k] for k in ("upper", "hands", "lower")})
        keep = slice(0, window) if w == 0 else slice(pre, window)
        nxt = gen._next_seed(decoded, pre, torch.stack([starts[i] for i in ids]), False, vq,
                             torch.stack([seeds[i] for i in ids]))
        for j, i in enumerate(ids):
            codes[i].append({k: (kind, v[j:j + 1, keep]) for k, (kind, v) in window_codes.items()})
            seeds[i] = nxt[j]
    results = []
    for i in range(len(sequences)):
        merged = {p: (codes[i][0][p][0], torch.cat([c[p][1] for c in codes[i]], dim=1)) for p in gen.PARTS}
        pose, exps, trans, contacts = gen.decoded_to_motion(vq, gen.decode_codes(vq, merged), starts[i][[0, 2]][None])
        n = plans[i].n_out
        results.append({"poses": pose[0, :n].cpu(), "expressions": exps[0, :n].cpu(), "trans": trans[0, :n].cpu(),
                        "contacts": contacts[0, :n].cpu()})
    return results


def pose_gap(a, b):
    """Largest absolute difference of the generated poses (radians) over all sequences."""
    return max(float((x["poses"] - y["poses"]).abs().max()) for x, y in zip(a, b))


def same_frames(a, b, tol=1e-3):
    """Fraction of frames whose poses agree within tol (a code that flips changes its frames' poses entirely)."""
    same = sum(int(((x["poses"] - y["poses"]).abs().amax(-1) < tol).sum()) for x, y in zip(a, b))
    return same / sum(x["poses"].shape[0] for x in a)


# ---- sections -------------------------------------------------------------------------------------------------------

START = time.perf_counter()


class TimeLimit(BaseException):
    """SIGTERM (e.g. from `timeout`): print the rows measured so far (not an Exception: run_row must not catch it)."""


def _stop(signum, frame):
    raise TimeLimit()


class Table:
    def __init__(self):
        self.rows, self.notes = [], []

    def add(self, target, config, value, unit, base=None, mem=float("nan"), higher_is_better=False):
        if base is None or value != value:
            ratio = ""
        else:
            ratio = f"{(value / base if higher_is_better else base / value):.2f}x"
        text = f"{value:.3f}" if value < 1 else f"{value:,.2f}" if value < 1e5 else f"{value:,.0f}"
        self.rows.append((target, config, text, unit, ratio,
                          "" if mem != mem else f"{mem:.2f}"))
        print(f"  [{time.perf_counter() - START:.0f} s] [{target or self.rows[-2][0]}] "
              f"{config or self.rows[-2][1]}: {self.rows[-1][2]} {unit}" + (f", peak {mem:.2f} GiB" if mem == mem else ""),
              flush=True)  # progress, kept if a later row hangs

    def fail(self, target, config, err):
        self.rows.append((target, config, "FAILED", type(err).__name__, "", ""))
        self.notes.append(f"{target} / {config}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    def print(self, title):
        head = ("target", "configuration", "value", "unit", "speed-up", "peak GiB")
        widths = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(len(head))]
        line = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        print("\n" + title)
        print(line.format(*head))
        print("-" * (sum(widths) + 2 * (len(widths) - 1)))
        for r in self.rows:
            print(line.format(*r))
        for n in self.notes:
            print("  note: " + n)


SIGTERM_GRACE_S = 5  # --isolate: how long a stopped section may take to hand over its rows
SEQUENCE_REPEATS = 3  # generate() calls timed per clip / test-set row (after a first call that captures graphs)
HANG_DUMP_S = 240  # a row still running after this long prints every thread's stack (--hang_dump)


def run_row(table, target, config, fn):
    # where a row is stuck, even inside a native call (the test set's fp32 row after the clip section: README, Known
    # limitations); printed to stderr, the row goes on
    faulthandler.dump_traceback_later(HANG_DUMP_S, exit=False)
    try:
        return fn()
    except Exception as err:  # one failing configuration must not hide the others
        traceback.print_exc()
        table.fail(target, config, err)
        return None
    finally:
        faulthandler.cancel_dump_traceback_later()


def bench_train(table, args, device, opts):
    steps, warm = opts.steps, opts.warmup
    frames = args.batch_size * args.pose_length
    base = opts.__dict__.setdefault("train_base", {})  # the published row's figures, for rows run later too

    def once(share, amp, fused, compile_mode, backend, batched):
        """(seconds per step, first step's seconds, peak GiB, first-step losses) of a freshly built trainer."""
        a = copy.copy(args)
        a.ssm_backend = row_backend(backend)  # MambaTalk(args) sets the module-wide backend
        model, vq = build_models(a, device)
        trainer = step_trainer(a, device, model, vq, share, amp, fused, compile_mode, batched)
        batch = training_batch(args, device)
        torch.manual_seed(123)
        t0 = time.perf_counter()
        # identical weights, batch and seed in every configuration; graph rows: warm-up and capture, then a replay
        first = trainer.train_step(batch)
        sync(device)
        t_first = time.perf_counter() - t0
        reset_peak(device)
        for _ in range(warm):
            trainer.train_step(batch)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        sync(device)
        dt = (time.perf_counter() - t0) / steps
        peak = peak_gib(device)
        del trainer, model
        return dt, t_first, peak, {k: float(v) for k, v in first.items()}

    def run(config, share, amp, fused, compile_mode, backend, batched):
        # --train_repeats: the row's trainer built and timed that many times in this process, the median reported
        # (the eager step's time moves by tens of ms between runs; compiled rows, minutes to build, run once)
        repeats = 1 if compile_mode and compile_mode != "graph" else max(1, opts.train_repeats)
        runs = [once(share, amp, fused, compile_mode, backend, batched) for _ in range(repeats)]
        dt = statistics.median(r[0] for r in runs)
        t_first, first = runs[0][1], runs[0][3]
        fps = frames / dt
        table.add("train step", config, fps, "frames/s", base.get("fps"), max(r[2] for r in runs),
                  higher_is_better=True)
        table.add("", "", dt * 1e3, "ms/step", base.get("ms"), float("nan"))
        if repeats > 1:
            table.notes.append(f"train step / {config}: median of {repeats} runs in one process, "
                               + " / ".join(f"{r[0] * 1e3:.1f}" for r in runs) + " ms/step")
        if compile_mode:
            what = {"graph": "warm-up and capture", "compile-graph": "compilation, warm-up and capture"}
            table.notes.append(f"train step / {config}: first step {t_first:.1f} s "
                               f"({what.get(compile_mode, 'compilation')})")
        return fps, dt * 1e3, first

    gpu_rows = ("fp32", "fast-mamba", "compile", "compile-ro") + GRAPH_ROWS  # equal to other rows on CPU, or GPU only
    wanted = [k for k in TRAIN_ROWS if k in opts.train_rows and (k not in gpu_rows or device.type == "cuda")]
    ref_losses = None
    for key in wanted:
        c = TRAIN_ROWS[key]
        out = run_row(table, "train step", c[0], lambda c=c: run(*c))
        if key == "compile-graph" and out is None and "compile-ro" not in opts.train_rows:
            c = TRAIN_ROWS["compile-ro"]  # the best configuration without the whole-step capture
            out = run_row(table, "train step", c[0], lambda c=c: run(*c))
        if key == "published" and out:
            base.update(fps=out[0], ms=out[1])
            ref_losses = out[2]
        elif out and ref_losses:
            gap = max(abs(out[2][k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in ref_losses)
            why = " (other dropout draws)" if key != "shared" else ""
            table.notes.append(f"train step / {c[0]}: first-step losses within {gap:.1e} (relative) of published{why}")
    ssm.set_ssm_backend("auto")
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False  # generation rows: infer.py's settings


def mamba_ssm_from_source(src):
    """mamba-ssm's Python modules from an unpacked source package `src` when the package is not installed (building
    its CUDA extension takes ~7 minutes): imported without its package __init__, with stand-ins for what the
    published class never calls (the compiled selective_scan_cuda, transformers, huggingface_hub), and the selective
    scan of its Mamba layer replaced by ours (models.scan: the Triton kernels on GPUs). Returns a label for the rows."""
    import importlib
    import importlib.util
    import types
    if "mamba_ssm" in sys.modules:  # already set up (a second call)
        return getattr(sys.modules["mamba_ssm"], "scan_label", "mamba-ssm's scan")
    if importlib.util.find_spec("mamba_ssm") is not None:
        return "mamba-ssm's scan"
    for name, attrs in (("selective_scan_cuda", {}), ("transformers", {}),
                        ("transformers.generation", dict(GenerateDecoderOnlyOutput=object, TextStreamer=object)),
                        ("transformers.utils", dict(WEIGHTS_NAME="", CONFIG_NAME="")),
                        ("transformers.utils.hub", dict(cached_file=None)),
                        ("huggingface_hub", dict(PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {})))):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attrs)
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(Path(src) / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")

    def ours(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        if return_last_state:
            raise NotImplementedError("the stand-in scan returns no state")
        return scan.selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                   backend=scan.resolve_backend("auto", u))
    simple.selective_scan_fn = ours
    pkg.scan_label = "scan: ours (mamba-ssm not built)"
    return pkg.scan_label


def published_class(repo, args, device, mamba_src=None):
    """The published MambaTalk class from a fetched copy of the published repository (`repo`), imported under the
    package name `published_models` (its top-level names clash with ours). Its vocabulary-building module imports
    lmdb, fasttext and loguru, which the model does not use: stand-ins are registered when they are missing. The
    class reads `data_path/weights/vocab.pkl`; a temporary one with random word vectors is written. `mamba_src`: see
    mamba_ssm_from_source."""
    import importlib
    import importlib.util
    import pickle
    import tempfile
    import types

    import numpy as np
    if mamba_src:
        mamba_ssm_from_source(mamba_src)
    for name in ("lmdb", "fasttext", "loguru", "pyarrow"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.logger = types.SimpleNamespace(info=print, warning=print)
            sys.modules[name] = stub
    pkg = types.ModuleType("published_models")
    pkg.__path__ = [str(Path(repo) / "models")]
    sys.modules["published_models"] = pkg
    module = importlib.import_module("published_models.mambatalk")
    data = Path(tempfile.mkdtemp()) / "weights"
    data.mkdir()
    words = np.random.default_rng(0).standard_normal((args.word_index_num, args.word_dims)).astype(np.float32)
    with open(data / "vocab.pkl", "wb") as f:
        pickle.dump(types.SimpleNamespace(word_embedding_weights=words), f)
    a = copy.copy(args)
    a.data_path = str(data.parent) + "/"
    torch.manual_seed(0)
    return module.MambaTalk(a).to(device)


def bench_model(table, args, device, opts):
    """The generator alone (no trainer): three passes, six losses, backward, clipping, Adam; same weights, inputs."""
    if not opts.published_repo:
        return
    B, T, K = args.batch_size, args.pose_length, args.vae_codebook_size
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(B, int(T / args.pose_fps * args.audio_sr), 3, generator=g).to(device)
    word = torch.randint(0, args.word_index_num, (B, T), generator=g).to(device)
    ids = torch.randint(0, 25, (B, T, 1), generator=g).to(device)
    motion = torch.randn(B, T, args.pose_dims + 7, generator=g).to(device)
    seeded = torch.ones_like(motion)
    seeded[:, :args.pre_frames] = 0
    masked = (torch.rand(motion.shape, generator=g) < 0.5).float().to(device)
    latent = {p: torch.randn(B, T, K, generator=g).to(device) for p in gen.PARTS}
    index = {p: torch.randint(0, K, (B, T), generator=g).to(device) for p in gen.PARTS}
    cls_w = {"face": args.cf, "upper": args.cu, "hands": args.ch, "lower": args.cl}

    def losses(out, weights):
        lat = sum(3.0 * torch.nn.functional.mse_loss(out[f"rec_{p}"].float(), latent[p]) for p in gen.PARTS)
        cls = sum(weights[p] * torch.nn.functional.cross_entropy(out[f"cls_{p}"].flatten(0, 1).float(),
                                                                 index[p].flatten()) for p in gen.PARTS if weights[p])
        return lat + cls

    reference = {}

    def run(name, model, amp, passes, fused):
        model.train()
        # the published code runs with cuDNN's benchmark and deterministic flags on; ours with PyTorch's defaults
        torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = passes == "published" and \
            device.type == "cuda"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=2.5e-4, fused=fused or None)
        kw = dict(in_audio=audio, in_word=word, in_motion=motion, in_id=ids)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if passes == "shared":
                    outs = model(mask=[seeded, masked, masked], **kw)
                elif passes == "published":
                    outs = [model(mask=seeded, **kw), model(mask=masked, use_word=False, **kw),
                            model(mask=masked, use_word=True, **kw)]
                else:
                    outs = [model(mask=m, **kw) for m in (seeded, masked, masked)]
            total = losses(outs[0], cls_w) + sum(losses(o, dict.fromkeys(gen.PARTS, 1.0)) for o in outs[1:])
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_norm)
            opt.step()
            return total.detach()

        torch.manual_seed(7)
        first = float(step())
        reset_peak(device)
        t = median_seconds(step, device, opts.steps, warmup=opts.warmup)
        table.add("generator alone", name, t * 1e3, "ms/step", reference.get("ms"), peak_gib(device))
        reference.setdefault("ms", t * 1e3)
        table.notes.append(f"generator alone / {name}: first-step loss {first:.6g}")
        return t

    scan_label = mamba_ssm_from_source(opts.published_mamba_src) if opts.published_mamba_src else "mamba-ssm's scan"

    def published(amp):
        model = published_class(opts.published_repo, args, device, opts.published_mamba_src)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        run(f"published class, {'bf16 autocast' if amp else 'fp32'}, Adam ({scan_label})", model, amp, "published",
            False)
        del model
        return weights

    weights = run_row(table, "generator alone", "published class", lambda: published(False))
    run_row(table, "generator alone", "published class bf16", lambda: published(True))
    for name, passes in (("ours, bf16, three passes, fused Adam", "separate"),
                         ("ours, bf16, shared conditioning + batched passes, fused Adam", "shared")):
        def ours(name=name, passes=passes):
            model, _ = build_models(args, device)
            if weights is not None:
                missing = model.load_state_dict(weights, strict=False)
                if missing.missing_keys or missing.unexpected_keys:
                    table.notes.append(f"generator alone: published weights: {len(missing.missing_keys)} keys "
                                       f"missing, {len(missing.unexpected_keys)} unexpected")
            run(name, model, True, passes, device.type == "cuda")
        run_row(table, "generator alone", name, ours)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False


def window_inputs(args, device, batch=1):
    T, P = args.pose_length, args.pose_dims + 7
    samples = int(T / args.pose_fps * args.audio_sr)
    mask = torch.ones(batch, T, P, device=device)
    mask[:, :args.pre_frames] = 0
    return (torch.randn(batch, samples, 3, device=device), torch.randint(0, args.word_index_num, (batch, T), device=device),
            torch.randint(0, 25, (batch, T, 1), device=device), torch.randn(batch, T, P, device=device), mask)


def bench_window(table, args, device, opts):
    model, vq = build_models(args, device)
    model.eval()
    inputs = window_inputs(args, device)

    def full(audio, word, ids, motion, mask, amp=False):
        net = gen.bf16_weights(model) if amp else model  # as generate() runs bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(in_audio=audio, in_word=word, mask=mask, in_motion=motion, in_id=ids)
        return tuple(out[k].float() for k in sorted(out))

    base = {}

    def eager():
        reset_peak(device)
        with torch.no_grad():
            t = median_seconds(lambda: full(*inputs), device, opts.repeats, warmup=2)
        base["t"] = t * 1e3
        table.add("window, batch 1", "published: fp32 eager forward", t * 1e3, "ms", None, peak_gib(device))
        return t

    run_row(table, "window, batch 1", "published: fp32 eager forward", eager)
    for amp in ((False, True) if device.type == "cuda" else ()):
        name = f"fast: CUDA graph, {'bf16' if amp else 'fp32'}"

        def graphed(amp=amp, name=name):
            reset_peak(device)
            with torch.no_grad():
                g = GraphedFunction(lambda *x: full(*x, amp=amp), inputs)
                t = median_seconds(lambda: g(*inputs), device, opts.repeats, warmup=2)
                ref, got = full(*inputs), g(*inputs)
            table.add("window, batch 1", name, t * 1e3, "ms", base.get("t"), peak_gib(device))
            err = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
            table.notes.append(f"window / {name}: outputs within {err:.1e} (relative norm) of eager fp32")

        run_row(table, "window, batch 1", name, graphed)

    for amp, compiled in [(False, False), (True, False)] + ([(True, True)] if opts.compile_generation else []):
        name = f"fast: generate()'s step ({'graph, ' if device.type == 'cuda' else ''}{'bf16' if amp else 'fp32'}" + \
            (", compiled)" if compiled else ")")

        def step_only(amp=amp, name=name, compiled=compiled):
            # the per-window work inside generate(): conditioning precomputed, body-part codes, decoding, next seed
            net = gen.bf16_weights(model) if amp else model
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                cond = net.generation_condition(net.encode_condition(inputs[0], inputs[1], inputs[2], args.pose_length))
            with torch.no_grad():
                kinds = {p: "index" if getattr(args, "c" + p[0]) != 0 else "latent" for p in gen.PARTS}
                seed = gen.neutral_seed(args.pre_frames, device)[None]
                sampling = (float(args.code_temperature), int(args.code_top_k), int(args.code_hold),
                            int(args.code_block_upper), int(args.code_top_k_upper))
                keys = torch.zeros(1, dtype=torch.int64, device=device)
                noise = gen.window_noise(kinds, sampling, keys, 0, 1, args.pose_length, args.vae_codebook_size)
                example = [cond[k] for k in gen.CONDITION] + [seed, torch.zeros(1, 3, device=device)] + \
                    [v[0] for v in noise]
                step = gen._window_step(net, vq, kinds, args.pre_frames, False, amp, sampling,
                                        gen.root_leak(args, False), example, compiled=compiled)
                t = median_seconds(lambda: step(*example), device, opts.repeats, warmup=2)
            table.add("window, batch 1", name, t * 1e3, "ms", base.get("t"), peak_gib(device))

        run_row(table, "window, batch 1", name, step_only)


def bench_sequences(table, args, device, opts, target, seconds):
    model, vq = build_models(args, device)
    seqs = random_sequences(args, seconds)
    label = f"{target} ({len(seconds)} seq, {sum(seconds):.0f} s)"
    results = {}

    def published():
        reset_peak(device)
        t0 = time.perf_counter()
        results["base"] = published_generate(model, vq, seqs, args)
        t = time.perf_counter() - t0
        table.add(label, "published: per-window full forward, fp32", t, "s", None, peak_gib(device))
        return t

    base = run_row(table, label, "published", published)
    variants = [("none", False), ("bf16", False)] + ([("bf16", True)] if opts.compile_generation else [])
    for amp, compiled in variants:
        name = f"fast: generate(), {'fp32' if amp == 'none' else 'bf16'}{' + compiled step' if compiled else ''}"

        def fast(amp=amp, name=name, compiled=compiled):
            a = copy.copy(args)
            a.amp, a.compile = amp, compiled
            reset_peak(device)
            t0 = time.perf_counter()
            first = gen.generate(model, vq, seqs, a)  # includes graph capture
            t_first = time.perf_counter() - t0
            walls = []
            for _ in range(SEQUENCE_REPEATS):
                t0 = time.perf_counter()
                out = gen.generate(model, vq, seqs, a)  # ends with a copy to the host: no sync needed
                walls.append(time.perf_counter() - t0)
            t = statistics.median(walls)
            table.add(label, name, t, "s", base, peak_gib(device))
            note = f"{target} / {name}: median of {SEQUENCE_REPEATS} calls, {min(walls):.3f}-{max(walls):.3f} s; " \
                f"first call {t_first:.3f} s (with graph capture on GPUs" + \
                (", and compilation)" if compiled else ")")
            if "base" in results:
                note += (f"; poses within {pose_gap(out, results['base']):.1e} rad of published, "
                         f"{100 * same_frames(out, results['base']):.1f}% of frames within 1e-3")
            note += f"; repeat calls agree to {pose_gap(out, first):.1e}"
            table.notes.append(note)

        run_row(table, label, name, fast)


def bench_scan(table, args, device, opts):
    widths = [16] if opts.tiny else [256, 512, 768]
    batch = 2 if opts.tiny else 64
    backends = [b for b in ("cuda", "torch") if b in available_backends()]
    for d_model in widths:
        torch.manual_seed(0)
        layer = ssm.Mamba(d_model).to(device)
        x = torch.randn(batch, args.pose_length, d_model, device=device)
        base = None
        variants = [(b, b, True) for b in backends] + [("torch (PyTorch loop)", "torch", False)]
        if device.type != "cuda":
            variants = [v for v in variants if v[2] is False or v[1] != "torch"]
        for name, backend, triton_on in variants:
            label = f"scan d={d_model} b={batch}"

            def run(name=name, backend=backend, triton_on=triton_on, label=label):
                ssm.set_ssm_backend(backend)
                scan.USE_TRITON = triton_on
                xi = x.detach().requires_grad_()

                def fwd_bwd():
                    layer(xi).square().mean().backward()

                with torch.no_grad():
                    t_f = median_seconds(lambda: layer(x), device, opts.repeats * 4, warmup=2)
                reset_peak(device)
                t_fb = median_seconds(fwd_bwd, device, opts.repeats * 4, warmup=2)
                table.add(label, f"{name}: forward", t_f * 1e3, "ms", base[0] if base else None)
                table.add(label, f"{name}: forward+backward", t_fb * 1e3, "ms", base[1] if base else None,
                          peak_gib(device))
                return t_f * 1e3, t_fb * 1e3

            r = run_row(table, label, name, run)
            if base is None and r:
                base = r  # the first backend (cuda where built) is the reference of this width
        layer.zero_grad(set_to_none=True)
    scan.USE_TRITON = True
    ssm.set_ssm_backend("auto")


def profile_train(args, device, opts):
    """Where a training configuration's step spends its time: host (Python, dispatch) against device (kernels)."""
    from torch.profiler import ProfilerActivity, profile
    label, share, amp, fused, mode, backend, batched = TRAIN_ROWS[opts.profile]
    a = copy.copy(args)
    a.ssm_backend = row_backend(backend)
    model, vq = build_models(a, device)
    amp = amp if device.type == "cuda" else "none"
    trainer = step_trainer(a, device, model, vq, share, amp, fused, mode, batched)
    print(f"profile of the training step: {label}", flush=True)
    batch = training_batch(args, device)
    for _ in range(3):
        trainer.train_step(batch)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.train_step(batch)
        sync(device)
    wall = time.perf_counter() - t0
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 if kernels else float("nan")
    ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"))
    print(f"profiled step ({opts.profile}): wall {wall * 1e3:.0f} ms (with profiler), {len(kernels)} GPU kernels busy "
          f"{busy:.0f} ms, {ops} aten calls on the host")


def run_sections(table, args, device, opts, graph_last, clip, test_set):
    if "train" in opts.only:
        bench_train(table, args, device, opts)
    if "model" in opts.only:
        bench_model(table, args, device, opts)
    if "window" in opts.only:
        bench_window(table, args, device, opts)
    if "clip" in opts.only:
        bench_sequences(table, args, device, opts, "clip", clip)
    if "testset" in opts.only:
        bench_sequences(table, args, device, opts, "test set", test_set)
    if "scan" in opts.only:
        bench_scan(table, args, device, opts)
    if graph_last:
        opts.train_rows = graph_last
        bench_train(table, args, device, opts)


def run_isolated(table, opts):
    """--isolate: each section in a process of its own (this script with --only SECTION; the graphed training rows
    with the train section), their rows gathered into one table. Whatever one section leaves behind in a process
    (CUDA graphs, compiled functions, a stuck call) cannot touch the next one, and a section that runs longer than
    --section_timeout is stopped (its rows so far are kept) while the others still run."""
    argv = [a for a in sys.argv[1:] if a != "--isolate"]
    for section in [s for s in SECTIONS if s in opts.only]:
        with tempfile.TemporaryDirectory() as tmp:
            rows_out = Path(tmp) / "rows.json"
            child = subprocess.Popen([sys.executable, __file__, *argv, "--only", section, "--rows_out", str(rows_out)])
            stopped = None
            try:
                child.wait(timeout=opts.section_timeout)
            except subprocess.TimeoutExpired:
                stopped = f"section {section}: stopped after --section_timeout {opts.section_timeout:.0f} s"
            except TimeLimit:
                stopped = f"section {section}: stopped by SIGTERM (time limit)"
            if stopped:
                # it writes the rows it has at once, unless it is stuck in a native call; the grace is short so that
                # this table still prints before an outer time limit's kill
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=SIGTERM_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                    stopped += f" (it did not react to SIGTERM within {SIGTERM_GRACE_S} s and was killed: its rows " \
                               "are lost, but its progress lines above have them)"
            if rows_out.exists():
                part = json.loads(rows_out.read_text())
                table.rows += [tuple(r) for r in part["rows"]]
                table.notes += part["notes"]
            elif not stopped:
                table.fail(section, "(whole section)", RuntimeError(f"the process exited with {child.returncode}"))
            if stopped:
                table.notes.append(stopped)
                if stopped.startswith(f"section {section}: stopped by SIGTERM"):
                    raise TimeLimit()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mambatalk.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small model and data (default on CPU)")
    p.add_argument("--published_size", action="store_true", help="published sizes on CPU too (slow; e.g. --only clip)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10 GPU, 1 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps after the first")
    p.add_argument("--train_repeats", type=int, default=1,
                   help="build and time each training row this many times, report the median (compiled rows: once)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of the window/scan timings (median)")
    p.add_argument("--compile", action="store_true",
                   help="add the training row of `compile: true` with `cuda_graph: true` (compiles for minutes)")
    p.add_argument("--compile_generation", action="store_true",
                   help="also rows of generate() with its window step compiled (config compile: true)")
    p.add_argument("--published_mamba_src", default=None,
                   help="unpacked mamba-ssm source package, for the published class where mamba-ssm is not installed")
    p.add_argument("--published_repo", default=None,
                   help="folder of a fetched copy of the published repository: adds the 'model' rows")
    p.add_argument("--profile", nargs="?", const="fast", choices=list(TRAIN_ROWS),
                   help="profile one training step of this configuration (default fast) and stop")
    p.add_argument("--train_rows", nargs="+", default=["published", "shared", "fp32", "fast-mamba", "fast", "graph"],
                   choices=list(TRAIN_ROWS), help="training configurations")
    p.add_argument("--isolate", action="store_true",
                   help="run each section in a process of its own and print one table of all of them")
    p.add_argument("--section_timeout", type=float, default=None,
                   help="with --isolate: stop a section after this many seconds and go on with the next")
    p.add_argument("--rows_out", default=None, help=argparse.SUPPRESS)  # --isolate's sections write their rows here
    p.add_argument("--hang_dump", type=float, default=240.0,
                   help="seconds after which a row that is still running prints every thread's stack")
    p.add_argument("--side_streams", choices=("on", "off"), default="on",
                   help="generation: the conditioning and the face branch on side streams beside the window chain "
                        "(trainers.generate.SIDE_STREAMS; off to test README Known limitations' hang)")
    p.add_argument("--conv_epilogue", choices=("fused", "torch"), default="fused",
                   help="bf16 generation's audio encoders: bias, shortcut and LeakyReLU in one Triton kernel per "
                        "convolution (models.layers.BasicBlock.fused_epilogue), or PyTorch's separate kernels")
    p.add_argument("--wave_conv", choices=("triton", "cudnn"), default="cudnn",
                   help="training rows: the audio encoders' first convolutions as models/conv_triton.wave_conv "
                        "(models.layers.BasicBlock.wave_conv) or cuDNN's (the default)")
    p.add_argument("--cudnn_benchmark", choices=("on", "off"), default=None,
                   help="this project's training rows with cuDNN's autotuning on or off (default: the trainer's)")
    opts = p.parse_args()
    global CUDNN_BENCHMARK
    CUDNN_BENCHMARK = None if opts.cudnn_benchmark is None else opts.cudnn_benchmark == "on"
    gen.SIDE_STREAMS = opts.side_streams == "on"
    BasicBlock.fused_epilogue = None if opts.conv_epilogue == "fused" else False
    BasicBlock.wave_conv = opts.wave_conv == "triton"
    global HANG_DUMP_S
    HANG_DUMP_S = opts.hang_dump
    device = torch.device(opts.device)
    if opts.compile and not {"compile-ro", "compile-graph"} & set(opts.train_rows):
        opts.train_rows.append("compile-graph")  # (compile-ro instead if it fails)
    # a failed graph capture can leave the CUDA context unusable: the graphed rows run after every other section
    graph_last = [k for k in GRAPH_ROWS if k in opts.train_rows] if "train" in opts.only else []
    opts.train_rows = [k for k in opts.train_rows if k not in graph_last]
    opts.tiny = opts.tiny or (device.type == "cpu" and not opts.published_size)
    opts.steps = opts.steps or (1 if opts.tiny else 10)
    opts.warmup = opts.warmup if opts.warmup is not None else (0 if opts.tiny else 3)
    opts.repeats = opts.repeats or (1 if opts.tiny else 20)
    if device.type == "cpu" and opts.tiny:
        torch.set_num_threads(1)  # tiny sizes: one thread is as fast and does not stall on a busy machine
    # argmax codes and the root as published, so that generate() and the published loop compute the same thing
    args = load_config(opts.config, dict(ctc_model="none", code_temperature=0.0, root_anchor_seconds=0.0,
                                         **(TINY if opts.tiny else {})))
    if device.type == "cuda":
        card = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        card = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    clip = [6.0] if opts.tiny else [60.0]
    test_set = [4.0, 5.0, 3.0] if opts.tiny else TESTSET_SECONDS
    print(f"device: {card}; scan backends: {', '.join(available_backends())}; "
          f"{'tiny sizes' if opts.tiny else 'published sizes'}; batch {args.batch_size} x {args.pose_length} frames",
          flush=True)
    if opts.profile:
        return profile_train(args, device, opts)
    table = Table()
    if not gen.SIDE_STREAMS:
        table.notes.append("generation: --side_streams off (conditioning and face branch on the main stream)")
    if BasicBlock.fused_epilogue is False:
        table.notes.append("generation: --conv_epilogue torch (the audio encoders' bias, shortcut and LeakyReLU "
                           "as PyTorch's kernels)")
    signal.signal(signal.SIGTERM, _stop)
    try:
        if opts.isolate:
            run_isolated(table, opts)
        else:
            run_sections(table, args, device, opts, graph_last, clip, test_set)
    except TimeLimit:
        table.notes.append(f"stopped by SIGTERM (time limit) after {time.perf_counter() - START:.0f} s: the rows "
                           "after the last one above are missing")
    if opts.rows_out:  # a section run by --isolate: its parent prints the table
        try:
            Path(opts.rows_out).write_text(json.dumps(dict(rows=table.rows, notes=table.notes)))
        except OSError as e:  # the parent stopped waiting (a time limit) and removed its folder
            print(f"rows of this section not handed over ({e.strerror}): they are in the progress lines above",
                  flush=True)
        return
    table.print(f"MambaTalk speed on {card} (random weights; {'tiny' if opts.tiny else 'published'} sizes)")


if __name__ == "__main__":
    main()
