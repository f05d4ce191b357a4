"""Where the MambaTalk training step spends its GPU time, by module (issue 17): one table per configuration.

    python run_scripts/profile_step.py --rows published fast            # this checkout
    python run_scripts/profile_step.py --repo /tmp/before --rows fast   # another checkout's model and trainer
    python run_scripts/profile_step.py --tiny                           # CPU, small sizes (CPU time instead)
    python run_scripts/profile_step.py --rows --timeline                # generate(): host and GPU timeline
    python run_scripts/profile_step.py --rows fast --phases             # the step's phases: host against GPU time
    python run_scripts/profile_step.py --rows compile-graph --families  # one step's GPU time by kernel family

Forward passes are labelled by module with hooks (innermost labelled module wins); a backward kernel is charged to
the module whose forward op created its autograd node (matched by the profiler's sequence numbers); the losses and
the optimiser (clipping, Adam, zero_grad) are labelled around their calls. GPU time is the sum of kernel durations
from one profiled step; "launch gaps" is the un-profiled median step time minus that sum (the GPU waiting for the
host). `--repo` imports models/, trainers/ and run_scripts/bench_gpu.py from another checkout (the "before" table).
"""
import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

CATEGORIES = ("audio CNNs", "motion encoder CNN", "transformer layers", "Mamba mixers (scan, projections)",
              "Mamba blocks (norms, gated MLP)", "other generator layers", "stage-1 VQ (targets)", "losses",
              "optimiser (clip, Adam)", "other")


def module_categories(model, vq):
    """{module: category} for the modules whose forward is labelled."""
    cats = {model: "other generator layers"}
    for name in ("audio_pre_encoder_face", "audio_pre_encoder_body"):
        cats[getattr(model, name)] = "audio CNNs"
    cats[model.global_scan.motion_encoder] = "motion encoder CNN"
    for m in model.modules():
        kind = type(m).__name__
        if kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
            cats[m] = "transformer layers"
        elif kind == "Mamba":
            cats[m] = "Mamba mixers (scan, projections)"
        elif kind == "Block":
            cats[m] = "Mamba blocks (norms, gated MLP)"
    for m in vq.values():
        cats[m] = "stage-1 VQ (targets)"
    return cats


def label_modules(cats):
    """Forward hooks that open a profiler range 'cat:<category>' around each labelled module's forward."""
    stack, handles = [], []

    def pre(module, args):
        rf = torch.profiler.record_function("cat:" + cats[module])
        rf.__enter__()
        stack.append(rf)

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)

    for m in cats:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def labelled(fn, category):
    def wrapper(*a, **k):
        with torch.profiler.record_function("cat:" + category):
            return fn(*a, **k)
    return wrapper


def _label_of(event):
    e = event
    while e is not None:
        if e.name.startswith("cat:"):
            return e.name[4:]
        if e.name.startswith("Optimizer."):
            return "optimiser (clip, Adam)"
        e = e.cpu_parent
    return None


def _backward_node(event):
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
        if e.name.startswith("cat:") or e.name.startswith("Optimizer."):
            return None
        e = e.cpu_parent
    return None


def attribute(events, use_kernels):
    """{category: [forward ms, backward ms, forward kernels, backward kernels]} (on a CPU: host ops instead of
    kernels) and the total number of kernels (ops)."""
    seq_label = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.sequence_nr >= 0 and \
                not e.name.startswith("autograd::"):
            label = _label_of(e)
            if label is not None:
                seq_label.setdefault(e.sequence_nr, label)
    table, count = defaultdict(lambda: [0.0, 0.0, 0, 0]), 0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if use_kernels:
            t, n = sum(k.duration for k in e.kernels) / 1e3, len(e.kernels)
        else:  # CPU: self time of leaf aten ops
            if not e.name.startswith("aten::") or e.cpu_children:
                continue
            t, n = e.self_cpu_time_total / 1e3, 1
        count += n
        if t == 0:
            continue
        node = _backward_node(e)
        if node is not None:
            row = table[seq_label.get(node.sequence_nr, "other")]
            row[1] += t
            row[3] += n
        else:
            row = table[_label_of(e) or "other"]
            row[0] += t
            row[2] += n
    return table, count


class Marks(list):
    """(name, host clock, CUDA event or None) at the points where `mark` is called or a `wrap`ped function starts
    and ends: when the host got there, and (events) when the GPU did."""

    def __init__(self, cuda):
        super().__init__()
        self.cuda = cuda

    def mark(self, name):
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.append((name, time.perf_counter(), event))

    def wrap(self, fn, name):
        def wrapper(*x, **k):
            self.mark(name + " >")
            out = fn(*x, **k)
            self.mark(name + " <")
            return out
        return wrapper


def row_trainer(bg, args, device, row, compiled=False):
    """(label, model, vq, trainer, batch) for a bench_gpu.py TRAIN_ROWS row; eager unless `compiled` (and on a GPU),
    amp only on GPUs."""
    label, share, amp, fused, mode, backend, batched = bg.TRAIN_ROWS[row]
    a = type(args)(**vars(args))
    a.ssm_backend = bg.row_backend(backend)
    model, vq = bg.build_models(a, device)
    cuda = device.type == "cuda"
    trainer = bg.step_trainer(a, device, model, vq, share, amp if cuda else "none", fused,
                              mode if compiled and cuda else None, batched)
    return label, model, vq, trainer, bg.training_batch(args, device)


def median_step_ms(bg, trainer, batch, device, steps):
    """Median wall time of `steps` training steps after 3 warm-up steps, un-profiled (ms)."""
    for _ in range(3):
        trainer.train_step(batch)
    times = []
    for _ in range(steps):
        bg.sync(device)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        bg.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def profile_row(bg, args, device, row, steps, kernels=0):
    label, model, vq, trainer, batch = row_trainer(bg, args, device, row)
    wall = median_step_ms(bg, trainer, batch, device, steps)
    handles = label_modules(module_categories(model, vq))
    trainer.latent_loss = labelled(trainer.latent_loss, "losses")
    trainer.cls_loss = labelled(trainer.cls_loss, "losses")
    trainer.pass_losses = labelled(trainer.pass_losses, "losses")
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = labelled(clip, "optimiser (clip, Adam)")
    import trainers.mambatalk as tm
    targets = tm.prepare_targets
    tm.prepare_targets = labelled(targets, "stage-1 VQ (targets)")
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            trainer.train_step(batch)
            bg.sync(device)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        tm.prepare_targets = targets
        for h in handles:
            h.remove()
    table, count = attribute(prof.events(), device.type == "cuda")
    if kernels:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=kernels, max_name_column_width=90))
    return label, wall, table, count


def print_table(title, wall, table, count, gpu):
    busy = sum(f + b for f, b, _, _ in table.values())
    unit = "GPU" if gpu else "CPU (self time of aten ops)"
    print(f"\n{title}\nstep {wall:.1f} ms (median, not profiled); {unit} busy {busy:.1f} ms in "
          f"{count} {'kernels' if gpu else 'ops'}")
    what = "kernels" if gpu else "ops"
    print(f"{'module':<36}{'forward ms':>11}{'backward ms':>12}{'total ms':>10}{'% step':>8}"
          f"{'fwd ' + what:>13}{'bwd ' + what:>13}")
    for cat in CATEGORIES:
        if cat in table:
            f, b, nf, nb = table[cat]
            print(f"{cat:<36}{f:>11.2f}{b:>12.2f}{f + b:>10.2f}{100 * (f + b) / wall:>7.1f}%{nf:>13}{nb:>13}")
    if gpu:
        gap = wall - busy
        print(f"{'launch gaps (GPU idle)':<36}{'':>11}{'':>12}{gap:>10.2f}{100 * gap / wall:>7.1f}%")


def bench_audio_cnns(args, device, repeats=10):
    """Both audio encoders, forward + backward at the training batch: float32/bf16, NCW/channels-last, cuDNN
    autotuning off/on."""
    from models.layers import WavEncoder
    torch.manual_seed(0)
    encoders = [WavEncoder(args.audio_f, 3).to(device), WavEncoder(args.audio_f, 2).to(device)]
    samples = int(args.pose_length / args.pose_fps * args.audio_sr)
    x = torch.randn(args.batch_size, samples, 3, device=device)
    print(f"\naudio CNNs (both encoders), forward + backward, batch {args.batch_size} x {samples} samples")
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for amp in (False, True):
            for nhwc in (False, True):
                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        out = [e(x[..., :3 - i]) for i, e in enumerate(encoders)]
                    sum(o.float().square().mean() for o in out).backward()
                for e in encoders:
                    e.channels_last = nhwc
                for _ in range(3):
                    step()
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    times.append(time.perf_counter() - t0)
                print(f"  cudnn.benchmark {bench!s:5}  {'bf16' if amp else 'fp32'}  "
                      f"{'channels-last' if nhwc else 'NCW          '}  {statistics.median(times) * 1e3:8.2f} ms")
    torch.backends.cudnn.benchmark = False


def profile_generate(bg, args, device, seconds=60.0):
    """One generate() call for a clip (after a first call that captures its graphs): wall time, GPU busy time,
    kernel count, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    from trainers import generate as gen
    model, vq = bg.build_models(args, device)
    seqs = bg.random_sequences(args, [seconds])
    for amp in ("none", "bf16"):
        a = type(args)(**vars(args))
        a.amp = amp
        gen.generate(model, vq, seqs, a)
        bg.sync(device)
        t0 = time.perf_counter()
        gen.generate(model, vq, seqs, a)
        bg.sync(device)
        wall = time.perf_counter() - t0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            gen.generate(model, vq, seqs, a)
            bg.sync(device)
        events = prof.events()
        kernels = [k for e in events if e.device_type == torch.autograd.DeviceType.CPU for k in e.kernels]
        busy = sum(k.duration for k in kernels) / 1e3
        print(f"\ngenerate(), {seconds:.0f}-s clip, amp {amp}: wall {wall * 1e3:.1f} ms (not profiled), "
              f"GPU busy {busy:.1f} ms in {len(kernels)} kernels")
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))


def generate_timeline(bg, args, device, seconds, amp="bf16", repeats=3):
    """When the host queues each phase of generate() and when the GPU reaches it, without synchronising anything:
    a CUDA event and the host clock at the entry and exit of each phase (window steps, the conditioning, face
    branch, decoding), from the start of the call, for its first and last occurrence. Where the GPU column runs far
    behind the host one the GPU is the bottleneck; where they are equal the GPU waits for the host. (On a CPU both
    columns are host time.)"""
    from trainers import generate as gen
    model, vq = bg.build_models(args, device)
    seqs = bg.random_sequences(args, seconds)
    a = type(args)(**vars(args))
    a.amp = amp
    cuda = device.type == "cuda"
    marks = Marks(cuda)
    mark, wrap = marks.mark, marks.wrap

    names = ("ConditionChunks", "face_codes", "decode_codes", "decoded_to_motion", "window_noise")
    originals = {n: getattr(gen, n) for n in names + ("_window_step",)}
    for n in names:
        setattr(gen, n, wrap(originals[n], n))
    gen._window_step = lambda *x, **k: wrap(originals["_window_step"](*x, **k), "window step")
    try:
        gen.generate(model, vq, seqs, a)  # captures its graphs
        walls = []
        for _ in range(repeats):
            bg.sync(device)
            marks.clear()
            mark("start")
            t0 = time.perf_counter()
            gen.generate(model, vq, seqs, a)
            mark("end")
            bg.sync(device)
            walls.append(time.perf_counter() - t0)
    finally:
        for n, f in originals.items():
            setattr(gen, n, f)
    _, host0, event0 = marks[0]
    seen = defaultdict(list)
    for name, host, event in marks:
        seen[name].append(((host - host0) * 1e3, event0.elapsed_time(event) if cuda else (host - host0) * 1e3))
    print(f"\ngenerate() timeline, {len(seconds)} sequence(s), {sum(seconds):.0f} s, amp {amp}: "
          f"{statistics.median(walls) * 1e3:.1f} ms per call (median of {repeats}); ms from the call's start")
    print(f"  {'phase':<24}{'calls':>6}{'first: host':>13}{'GPU':>9}{'last: host':>13}{'GPU':>9}")
    for name, v in seen.items():
        print(f"  {name:<24}{len(v):>6}{v[0][0]:>13.1f}{v[0][1]:>9.1f}{v[-1][0]:>13.1f}{v[-1][1]:>9.1f}")


def step_phases(bg, args, device, row, steps=10):
    """When the host queues each phase of a training step (stage-1 targets, forward, backward, clipping and Adam;
    the losses are between forward and backward) and how long the GPU takes from one phase boundary to the next,
    without synchronising inside the step: a CUDA event and the host clock at each boundary, averaged over `steps`
    steps. Where the GPU column equals the host
    column the GPU waits for the host (a host-bound step: fewer launches help, faster kernels do not); where it is
    larger the GPU is the limit. (On a CPU both columns are host time.) No profiler runs in this process before it:
    after a torch.profiler session the same steps take longer on the host."""
    import trainers.mambatalk as tm
    label, _, _, trainer, batch = row_trainer(bg, args, device, row)
    cuda = device.type == "cuda"
    marks = Marks(cuda)
    mark, wrap = marks.mark, marks.wrap

    targets, backward = tm.prepare_targets, torch.Tensor.backward
    tm.prepare_targets = wrap(targets, "stage-1 targets")
    torch.Tensor.backward = wrap(backward, "backward")
    trainer.forward = wrap(trainer.forward, "forward")
    trainer.apply_gradients = wrap(trainer.apply_gradients, "clip + Adam")
    host, gpu, walls = defaultdict(float), defaultdict(float), []
    try:
        for _ in range(3):
            trainer.train_step(batch)
        for _ in range(steps):
            bg.sync(device)
            marks.clear()
            mark("step")
            trainer.train_step(batch)
            mark("end")
            queued = time.perf_counter() - marks[0][1]
            bg.sync(device)
            walls.append((time.perf_counter() - marks[0][1], queued))
            for (a_name, a_host, a_event), (b_name, b_host, b_event) in zip(marks, marks[1:]):
                key = f"{a_name} .. {b_name}"
                host[key] += (b_host - a_host) * 1e3 / steps
                gpu[key] += (a_event.elapsed_time(b_event) if cuda else (b_host - a_host) * 1e3) / steps
    finally:
        tm.prepare_targets, torch.Tensor.backward = targets, backward
    wall = statistics.median(w for w, _ in walls) * 1e3
    queued = statistics.median(q for _, q in walls) * 1e3
    print(f"\n[{row}] {label}: phases of the step, mean of {steps} steps; step {wall:.1f} ms (median), "
          f"queued by the host in {queued:.1f} ms")
    print(f"  {'from .. to':<44}{'host ms':>9}{'GPU ms':>9}")
    for key in host:
        print(f"  {key:<44}{host[key]:>9.2f}{gpu[key]:>9.2f}")
    return host, gpu


# kernel (or, on a CPU, aten op) families by name, first match wins: inductor's kernels first (their names list the
# ops they fused), convolutions before matrix products (cuDNN's convolution kernels are implicit GEMMs), multi-tensor
# kernels before norms (clipping's norm is one)
PROJECT_KERNELS = ("_fwd_kernel", "_bwd_kernel", "_epilogue_kernel")  # models/scan_triton.py, models/conv_triton.py
FAMILIES = (
    ("compiled (inductor) kernels", ("triton_",)),
    ("convolutions (cuDNN, layout transforms)", ("conv", "cudnn", "nchwtonhwc", "nhwctonchw", "implicit_gemm",
                                                 "fprop", "dgrad", "wgrad")),
    ("attention", ("flash", "fmha", "attention")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "splitk", "xmma", "mm", "linear")),
    ("optimiser and clipping (multi-tensor)", ("multi_tensor", "fused_adam", "foreach")),
    ("norms", ("norm",)),
    ("copies, fills, casts", ("copy", "fill", "memset", "memcpy")),
    ("reductions", ("reduce", "sum")),
    ("other elementwise", ("elementwise", "dropout", "relu", "silu", "add", "mul")),
)


def kernel_family(name):
    low = name.lower()
    if low in PROJECT_KERNELS:
        return "this project's Triton kernels"
    for family, keys in FAMILIES:
        if any(k in low for k in keys):
            return family
    return "other"


def step_families(bg, args, device, row, steps=10, top=0):
    """The GPU time of one training step of `row` by kernel family (FAMILIES), compiled rows compiled (their
    kernels have no module to be charged to, so the by-module table cannot show them): where the compiled step's
    time goes. On a CPU: self time of aten ops. Graphed rows are profiled on a replay; should a profiler not see the
    kernels inside graph replays, `--rows compile` has the same compiled kernels launched one by one."""
    from torch.profiler import ProfilerActivity, profile
    label, _, _, trainer, batch = row_trainer(bg, args, device, row, compiled=True)
    cuda = device.type == "cuda"
    wall = median_step_ms(bg, trainer, batch, device, steps)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
        bg.sync(device)
    families = defaultdict(lambda: [0.0, 0])
    by_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            ms = e.device_time / 1e3
        elif not cuda and e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            ms = e.self_cpu_time_total / 1e3
        else:
            continue
        for f in (families[kernel_family(e.name)], by_name[e.name]):
            f[0] += ms
            f[1] += 1
    busy = sum(ms for ms, _ in families.values())
    unit = "GPU kernels" if cuda else "CPU, self time of aten ops"
    print(f"\n[{row}] {label}: one step by kernel family ({unit}); step {wall:.1f} ms (median, not profiled), "
          f"busy {busy:.1f} ms in {sum(n for _, n in families.values())}")
    print(f"  {'family':<42}{'ms':>9}{'count':>8}{'% busy':>8}")
    for family, (ms, n) in sorted(families.items(), key=lambda x: -x[1][0]):
        print(f"  {family:<42}{ms:>9.2f}{n:>8}{100 * ms / max(busy, 1e-9):>7.1f}%")
    if top:
        print(f"  the {top} kernels with the most time (name cut at 100 characters)")
        for name, (ms, n) in sorted(by_name.items(), key=lambda x: -x[1][0])[:top]:
            print(f"  {ms:>8.2f} ms {n:>5}x  {kernel_family(name)[:12]:<12}  {name[:100]}")
    return dict(families), busy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="checkout whose model/trainer is profiled (default: this one)")
    p.add_argument("--rows", nargs="*", default=["published", "fast"], help="bench_gpu.py TRAIN_ROWS keys")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small sizes (default on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps for the median step time")
    p.add_argument("--audio_cnns", action="store_true", help="also time the audio CNN variants")
    p.add_argument("--generate", action="store_true", help="also profile generate() on a 60-s clip")
    p.add_argument("--kernels", type=int, default=0,
                   help="also print the N ops/kernels with the most self time (with --families: by kernel name)")
    p.add_argument("--families", action="store_true",
                   help="per row: one step's GPU time by kernel family (compiled rows compiled: e.g. --rows compile-graph)")
    p.add_argument("--phases", action="store_true",
                   help="first, per row: host and GPU time of each phase of the step (no profiler in the process yet)")
    p.add_argument("--timeline", action="store_true",
                   help="also print when the host queues and the GPU runs generate()'s phases (60-s clip, test set)")
    opts = p.parse_args()
    repo = Path(opts.repo).resolve()
    sys.path[:0] = [str(repo), str(repo / "run_scripts")]
    import bench_gpu as bg
    from utils.config import load_config
    device = torch.device(opts.device)
    tiny = opts.tiny or device.type == "cpu"
    if tiny:
        torch.set_num_threads(1)
    args = load_config(str(repo / "configs" / "mambatalk.yaml"), dict(ctc_model="none", **(bg.TINY if tiny else {})))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"profile of the training step: {repo} on {name}, torch {torch.__version__}, batch {args.batch_size} x "
          f"{args.pose_length} frames")
    if opts.generate:
        profile_generate(bg, args, device, 6.0 if tiny else 60.0)
    if opts.timeline:
        for seconds in ([6.0], [3.0, 2.5]) if tiny else ([60.0], [float(x) for x in bg.TESTSET_SECONDS]):
            generate_timeline(bg, args, device, seconds)
    if opts.audio_cnns:
        bench_audio_cnns(args, device)
    if opts.phases:
        for row in opts.rows:
            step_phases(bg, args, device, row, opts.steps)
    if opts.families:
        for row in opts.rows:
            step_families(bg, args, device, row, opts.steps, opts.kernels)
        return
    for row in opts.rows:
        with contextlib.suppress(KeyboardInterrupt):
            label, wall, table, count = profile_row(bg, args, device, row, opts.steps, opts.kernels)
            print_table(f"[{row}] {label}", wall, table, count, device.type == "cuda")


if __name__ == "__main__":
    main()
