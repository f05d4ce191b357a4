"""Print parameter counts of the published-size models and the forward time of MambaTalk on one 64-frame window
per ssm backend, on this machine's device.

    python run_scripts/bench_models.py [--device cpu|cuda] [--batches 1 64] [--repeats 5] [--config PATH]

Default batches: 1 and 64 on a GPU; 1 and 4 on CPU (batch 64 at published size takes minutes there).
Times are eval-mode forwards under torch.no_grad(), after one warm-up call, median of --repeats.
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ssm  # noqa: E402
from models.mambatalk import MambaTalk  # noqa: E402
from models.motion_representation import VAESKConv, build_stage1_models  # noqa: E402
from models.scan import available_backends  # noqa: E402
from utils.config import load_config  # noqa: E402


def count(module):
    return sum(p.numel() for p in module.parameters())


def window(batch, args, device):
    """Inputs of one training window: 34133 audio samples, pose_length frames, seed frames visible."""
    T, P = args.pose_length, args.pose_dims + 7
    mask = torch.ones(batch, T, P, device=device)
    mask[:, : args.pre_frames] = 0
    return dict(in_audio=torch.randn(batch, 34133, 3, device=device),
                in_word=torch.randint(0, args.word_index_num, (batch, T), device=device),
                mask=mask, in_motion=torch.randn(batch, T, P, device=device),
                in_id=torch.randint(0, 25, (batch, T, 1), device=device))


def time_forward(model, inputs, repeats, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up (kernel selection, allocator)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(**inputs)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mambatalk.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    batches = opts.batches or ([1, 64] if device.type == "cuda" else [1, 4])
    args = load_config(opts.config)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random word-embedding init when no vocab.pkl is present
        model = MambaTalk(args)
    print(f"MambaTalk ({opts.config}): {count(model):,} parameters, "
          f"{sum(v.numel() for v in model.state_dict().values()):,} state-dict elements")
    for name, child in model.named_children():
        print(f"  {name:24s} {count(child):>12,}")
    for name, part in build_stage1_models(args).items():
        print(f"stage-1 {name:16s} {count(part):>12,}")
    print(f"eval VAESKConv           {count(VAESKConv(args)):>12,}")

    model = model.to(device).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nforward of one {args.pose_length}-frame window on {name} (eval, no_grad, median of {opts.repeats}):")
    for backend in available_backends():
        ssm.set_ssm_backend(backend)
        for batch in batches:
            seconds = time_forward(model, window(batch, args, device), opts.repeats, device)
            print(f"  backend {backend:9s} batch {batch:3d}: {seconds * 1000:9.1f} ms")
    ssm.set_ssm_backend(args.ssm_backend)


if __name__ == "__main__":
    main()
