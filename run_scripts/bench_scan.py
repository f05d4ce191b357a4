"""Time one Mamba-1 layer (d_model 768, 64 frames) per scan backend, and the Mamba stacks of MambaTalk.

    python run_scripts/bench_scan.py                 # GPU if present, else CPU (short)
    python run_scripts/bench_scan.py --device cpu --batches 1 8

Prints one table: forward and forward+backward milliseconds (median over repeats; CUDA events on a GPU),
speed-up of each backend over `reference`, and peak GPU memory. float32 unless --bf16 (autocast rows).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import scan, ssm  # noqa: E402
from models.scan import available_backends, selective_scan  # noqa: E402
from models.ssm import Mamba, MambaModel, MambaScan, set_ssm_backend  # noqa: E402

# The Mamba modules MambaTalk builds (spec §4.5), with how many of each.
MAMBATALK_STACKS = [
    ("local_scan.face_scan", lambda: MambaScan(768, 768, 4, 768), 768, 1),
    ("global_scan.face_scan", lambda: MambaScan(512, 512, 1, 1024), 512, 1),
    ("global_scan.body_scan", lambda: MambaScan(256, 256, 1, 768), 256, 1),
    ("local_scan.{upper,hands,lower}_scan", lambda: MambaModel(768, 1, 768), 768, 3),
]


def median_ms(fn, device, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_module(model, x, backend, device, reps, warmup, bf16):
    set_ssm_backend(backend)
    x = x.detach().requires_grad_()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def fwd():
        with torch.no_grad(), amp:
            model(x)

    def fwd_bwd():
        with amp:
            y = model(x)
        y.float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_fwd = median_ms(fwd, device, reps, warmup)
    t_bwd = median_ms(fwd_bwd, device, reps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else float("nan")
    model.zero_grad(set_to_none=True)
    return t_fwd, t_bwd, peak


def time_scan_alone(args, device, backends, reps, warmup):
    """selective_scan by itself at the layer's sizes (d_inner 2 d_model, N 16) with random inputs."""
    b, d, l, n = max(args.batches), 2 * args.d_model, args.frames, 16
    g = lambda *s: torch.randn(*s, device=device)
    ins = dict(u=g(b, d, l), delta=g(b, d, l) * 0.5 - 3, A=-torch.arange(1, n + 1.0, device=device).repeat(d, 1),
               B=g(b, n, l), C=g(b, n, l), D=g(d), z=g(b, d, l), delta_bias=g(d) * 0.1)
    ins = {k: v.requires_grad_() for k, v in ins.items()}
    print(f"\nselective_scan alone: b {b}, d {d}, l {l}, n {n}, fp32")
    print(f"{'backend':<34} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    # The torch backend may run its core as Triton kernels on a GPU (scan.USE_TRITON); the block/keep
    # variants below time its PyTorch loop.
    triton_default = getattr(scan, "USE_TRITON", False)
    keep_default = scan.KEEP_STATES[device.type]
    variants = [(be, None, keep_default, triton_default) for be in backends]
    variants += [("torch", k, keep, False) for k in (args.scan_blocks or [None]) for keep in (True, False)]
    default, keep_table = dict(scan.BLOCK_ELEMENTS), dict(scan.KEEP_STATES)
    for backend, log2, keep, use_triton in variants:
        scan.KEEP_STATES[device.type] = keep
        if hasattr(scan, "USE_TRITON"):
            scan.USE_TRITON = use_triton
        if log2 is not None:
            scan.BLOCK_ELEMENTS[device.type] = 1 << log2
        with torch.no_grad():
            t_fwd = median_ms(lambda: selective_scan(**ins, delta_softplus=True, backend=backend), device, reps, warmup)
        t_bwd = median_ms(lambda: selective_scan(**ins, delta_softplus=True, backend=backend).sum().backward(),
                          device, reps, warmup)
        if backend != "torch":
            label = backend
        elif use_triton and on_triton(device):
            label = "torch (Triton kernels)"
        else:
            label = f"torch loop block 2^{log2 or default[device.type].bit_length() - 1} keep={keep}"
        print(f"{label:<34} {t_fwd:>9.2f} {t_bwd:>11.2f}", flush=True)
        scan.BLOCK_ELEMENTS.update(default)
        scan.KEEP_STATES.update(keep_table)
        if hasattr(scan, "USE_TRITON"):
            scan.USE_TRITON = triton_default


def on_triton(device):
    return device.type == "cuda" and hasattr(scan, "scan_triton") and scan.scan_triton.available()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--backends", nargs="+", default=None, help="default: all available")
    p.add_argument("--reps", type=int, default=None, help="default 20 on a GPU, 1 on CPU")
    p.add_argument("--bf16", action="store_true", help="also time under bf16 autocast (GPU)")
    p.add_argument("--stacks", action="store_true", help="also time MambaTalk's Mamba stacks (batch 64)")
    p.add_argument("--scan-blocks", type=int, nargs="*", default=None,
                   help="also time the scan alone (largest batch); the torch loop with these log2 block budgets")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    reps = args.reps or (20 if on_gpu else 1)
    warmup = 3 if on_gpu else 1
    backends = args.backends or [b for b in available_backends() if on_gpu or b != "cuda"]
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    if "cuda" in backends:
        print(f"cuda backend: mamba-ssm selective_scan_fn; fused mamba_inner_fn "
              f"(needs causal-conv1d): {ssm._fused_inner() is not None}")

    torch.manual_seed(0)
    layer = Mamba(args.d_model).to(device)
    n_params = sum(q.numel() for q in layer.parameters())
    print(f"\nOne Mamba layer: d_model {args.d_model}, {n_params:,} parameters, {args.frames} frames, "
          f"median of {reps}")
    header = f"{'backend':<10} {'batch':>5} {'dtype':<5} {'fwd ms':>9} {'fwd+bwd ms':>11} " \
             f"{'x ref fwd':>9} {'x ref f+b':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    dtypes = ["fp32", "bf16"] if args.bf16 and on_gpu else ["fp32"]
    for batch in args.batches:
        x = torch.randn(batch, args.frames, args.d_model, device=device)
        for dtype in dtypes:
            ref = None
            for backend in backends:
                if backend == "reference" and dtype == "bf16":
                    continue
                t_fwd, t_bwd, peak = time_module(layer, x, backend, device, reps, warmup, dtype == "bf16")
                if backend == "reference":
                    ref = (t_fwd, t_bwd)
                speed = f"{ref[0] / t_fwd:>9.1f} {ref[1] / t_bwd:>9.1f}" if ref else f"{'-':>9} {'-':>9}"
                print(f"{backend:<10} {batch:>5} {dtype:<5} {t_fwd:>9.2f} {t_bwd:>11.2f} {speed} {peak:>9.0f}",
                      flush=True)

    if args.scan_blocks is not None:
        time_scan_alone(args, device, backends, reps, warmup)

    print("\nMamba stacks of MambaTalk (spec §4.5)")
    stack_backends = [b for b in backends if b != "reference"] if args.stacks else []
    cols = "".join(f" {b + ' f+b ms':>15}" for b in stack_backends)
    print(f"{'module':<38} {'count':>5} {'params each':>12}{cols}")
    for label, build, width, count in MAMBATALK_STACKS:
        model = build().to(device)
        row = f"{label:<38} {count:>5} {sum(q.numel() for q in model.parameters()):>12,}"
        x = torch.randn(64, args.frames, width, device=device)
        for backend in stack_backends:
            row += f" {time_module(model, x, backend, device, reps, warmup, False)[1]:>15.2f}"
        print(row, flush=True)
    set_ssm_backend("auto")


if __name__ == "__main__":
    main()
