"""Does a MambaTalk training run stay finite? (issue 17's fp32 step-439 question)

    python run_scripts/stability_check.py --variant default|published [train.py options...]

Runs train.py's trainer for --max_steps steps and prints, every --every steps, the mean total loss, the largest
pre-clipping gradient norm and the largest |weight|. `published` runs the published step on the same data, batches
and initial weights: three full passes (no shared conditioning, no batched passes), the audio CNNs in the published
(B, C, L) layout, plain Adam, cuDNN benchmark/deterministic flags. If a loss goes non-finite, the offending batch is
run again through the (not yet updated) model with hooks that name the first module whose output is non-finite.
Not a test: a GPU run takes minutes (run_scripts/gpu_speed_run.sh runs it with STABILITY=1).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers import build_trainer  # noqa: E402
from utils.config import parse_args  # noqa: E402


def first_nonfinite_module(model, run):
    """Name, output max |x| of the first module (in execution order) whose output has a non-finite value, plus the
    largest finite |output| seen before it."""
    found, largest, handles = [], [0.0, ""], []

    def hook(name):
        def fn(module, args, out):
            tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
            for t in tensors:
                if not t.is_floating_point():
                    continue
                if not found and not bool(torch.isfinite(t).all()):
                    found.append(name)
                elif not found:
                    m = float(t.detach().abs().max()) if t.numel() else 0.0
                    if m > largest[0]:
                        largest[:] = [m, name]
        return fn

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(hook(name or "<model>")))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return (found[0] if found else None), largest


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["default", "published"], default="default")
    p.add_argument("--every", type=int, default=10)
    opts, rest = p.parse_known_args()
    args = parse_args(rest)
    trainer = build_trainer(args)
    model = trainer.raw_model
    if opts.variant == "published":
        trainer.share_condition = False
        model.batch_passes = False
        for enc in (model.audio_pre_encoder_face, model.audio_pre_encoder_body):
            enc.channels_last = False
        torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = True
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr,
                                             betas=tuple(args.opt_betas), weight_decay=args.weight_decay)
        trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, args.decay_epochs, args.decay_rate)
    norms, state = [], {"batch": None}
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        n = clip(params, max_norm, *a, **k)
        norms.append(float(n))
        return n

    torch.nn.utils.clip_grad_norm_ = recording_clip
    step_fn = trainer.train_step
    window = {"loss": [], "norm": []}

    def step(batch):
        state["batch"] = batch
        losses = step_fn(batch)
        window["loss"].append(float(losses["total"]))
        window["norm"].append(norms[-1] if norms else float("nan"))
        if (trainer.global_step + 1) % opts.every == 0:
            wmax = max(float(q.detach().abs().max()) for q in model.parameters())
            print(f"[{opts.variant}] step {trainer.global_step + 1}: loss {sum(window['loss']) / len(window['loss']):.4f}"
                  f" (max {max(window['loss']):.4f}) grad norm max {max(window['norm']):.3g} |w| max {wmax:.3g}",
                  flush=True)
            window["loss"], window["norm"] = [], []
        return losses

    trainer.train_step = step
    print(f"[{opts.variant}] {args.max_steps} steps, amp {args.amp}, batch {args.batch_size}, lr "
          f"{trainer.optimizer.param_groups[0]['lr']:.3g}, device {trainer.device}", flush=True)
    try:
        trainer.fit()
        print(f"[{opts.variant}] finite for all {trainer.global_step} steps; grad norm max {max(norms):.3g}, "
              f"median {sorted(norms)[len(norms) // 2]:.3g}")
    except FloatingPointError as e:
        print(f"[{opts.variant}] step {trainer.global_step + 1}: {e!r}")
        from trainers.mambatalk import prepare_targets
        from trainers.base import to_device
        batch = to_device(state["batch"], trainer.device)
        t = prepare_targets(batch, trainer.vq)
        mask = trainer.seeded_mask(t["motion"])
        name, largest = first_nonfinite_module(model, lambda: trainer.forward(model, t, mask))
        print(f"[{opts.variant}] first module with a non-finite output (seeded pass, eval of the same batch, "
              f"train mode): {name}; largest finite output before it {largest[0]:.3g} at {largest[1]}")
        big = sorted(((float(q.detach().abs().max()), n) for n, q in model.named_parameters()), reverse=True)[:5]
        print(f"[{opts.variant}] largest weights: " + ", ".join(f"{n} {v:.3g}" for v, n in big))
        recent = [f"{x:.3g}" for x in norms[-20:]]
        print(f"[{opts.variant}] last 20 grad norms: {' '.join(recent)}")
        return 1
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return 0 if all(math.isfinite(x) for x in norms) else 1


if __name__ == "__main__":
    sys.exit(main())
