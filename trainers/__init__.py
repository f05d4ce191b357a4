"""Trainer registry: the `trainer:` key of a config names one of these."""
import importlib

TRAINERS = {
    "ae": "trainers.vq:PartVQTrainer",
    "aeface": "trainers.vq:FaceVQTrainer",
    "aelowerfoot": "trainers.vq:LowerVQTrainer",
    "aelower": "trainers.vq:GlobalMotionTrainer",
    "mambatalk": "trainers.mambatalk:MambaTalkTrainer",
    "aeskconv": "trainers.vq:EvalAETrainer",  # the FGD autoencoder (not trained by the published code)
}


def build_trainer(args):
    if args.trainer not in TRAINERS:
        raise ValueError(f"config key 'trainer': unknown trainer '{args.trainer}', expected one of {sorted(TRAINERS)}")
    module, cls = TRAINERS[args.trainer].split(":")
    return getattr(importlib.import_module(module), cls)(args)
