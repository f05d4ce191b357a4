"""Checkpoint I/O in the published format ({'model_state': {'module.<key>': tensor}}, spec §4.6), plus
training-state files for resuming, and the atomic_write helper every writer in the repo uses."""
import contextlib
import os
from pathlib import Path

import torch


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model."""


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path next to `path`; rename it to `path` on success, delete it on failure.

    A reader therefore never sees a half-written file, even if the writer is killed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _state_dict_of(model_or_state_dict):
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


def _strip_module(sd):
    return {k.removeprefix("module."): v for k, v in sd.items()}


def save_weights(model_or_state_dict, path):
    """Save in the published format: {'model_state': {'module.' + key: tensor}} (DataParallel naming)."""
    sd = _strip_module(_state_dict_of(model_or_state_dict))
    payload = {"model_state": {"module." + k: v.detach().cpu() for k, v in sd.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def read_state_dict(path):
    """Read weights from a published-format file or a plain state dict; returns keys without 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: cannot be read as a weights file: {e}") from None
    if isinstance(payload, dict) and "model_state" in payload:
        payload = payload["model_state"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors or {{'model_state': state_dict}}")
    return _strip_module(payload)


def load_weights(model, path, strict=True):
    """Load weights into `model`. With strict=True any missing, unexpected or mis-shaped key is an error
    (CheckpointMismatchError naming the file and listing the keys); with strict=False matching keys load
    and the lists are returned as a dict."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or misshaped):
        lines = [f"{path}: checkpoint does not match {type(model).__name__}"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = keys[:20] + ([f"... ({len(keys) - 20} more)"] if len(keys) > 20 else [])
                lines.append(f"  {label} keys ({len(keys)}): " + ", ".join(shown))
        raise CheckpointMismatchError("\n".join(lines))
    bad = {k.split(":")[0] for k in misshaped}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "misshaped": misshaped}


def save_training_state(path, state):
    """Save a resume state (model/optimizer/scheduler state dicts, epoch, step, rng ...) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    # our own file, may hold python ints, RNG states (numpy arrays) and optimizer dicts
    return torch.load(path, map_location="cpu", weights_only=False)
