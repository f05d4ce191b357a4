"""Checkpoint I/O in the published format ({'model_state': {'module.<key>': tensor}}, spec §4.6), plus
training-state files for resuming, and the two helpers every file in the repo goes through: `atomic_write` (the one
write path) and `load_torch_file` (the one place a torch file is unpickled, never running code from it)."""
import contextlib
import errno
import glob
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

FULL_DISK_BYTES = 1 << 20  # torch.save failing with less than this free on the disk failed because the disk is full


class CheckpointMismatchError(RuntimeError):
    """A checkpoint cannot be used: unreadable, refused as unsafe, or its keys or shapes do not match the model."""


class WriteError(OSError):
    """A file could not be written; the message names it and says why (its errno is kept, not shown)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.errno = code


# ---------------------------------------------------------------------------------------------- writing

def pid_is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_dead_temps(path, tags=("tmp",)):
    """Delete `<path>.<tag>-<pid>` files or folders whose writer process no longer runs (killed mid-write)."""
    path = Path(path)
    for tag in tags:
        for tmp in path.parent.glob(f"{glob.escape(path.name)}.{tag}-*"):
            pid = tmp.name.rsplit("-", 1)[1]
            if not pid.isdigit() or pid_is_running(int(pid)):
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def free_bytes(folder):
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_failure(err, path, what="file", consequence=""):
    """The WriteError an OSError from writing `path` becomes: it names the file and says why in words."""
    folder = Path(path).parent
    code = err.errno
    free = free_bytes(folder) if folder.is_dir() else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full" if code == errno.ENOSPC else "the disk quota is exhausted"
        reason += f" ({free / 2**20:.1f} MiB free in {folder})" if free is not None else ""
    else:
        reason = err.strerror or str(err)
    message = f"could not write the {what} {path}: {reason}" + (f". {consequence}" if consequence else "")
    return WriteError(code or errno.EIO, message)


@contextlib.contextmanager
def atomic_write(path, what="file"):
    """Yield a temporary path next to `path`; rename it to `path` on success, delete it on failure.

    A reader therefore never sees a half-written file, even if the writer is killed; the temporary files of killed
    writers are removed by the next write of the same file. A failure to write (an OSError: full disk, no permission)
    is raised as a WriteError (an OSError) naming `path` and the reason."""
    path = Path(path)
    remove_dead_temps(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, WriteError):
            raise  # already described by a nested writer
        raise write_failure(e, path, what, f"Nothing was replaced: the previous {path.name} (if any) is intact and "
                                           "no partial file was left") from e
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- reading

def load_torch_file(path, what):
    """torch.load with weights_only=True: tensors and plain Python values only, so a crafted file cannot run code.
    Any failure is a CheckpointMismatchError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise CheckpointMismatchError(f"{path}: refused to load as a {what}: it references {found.group(1)}, "
                                          f"which a {what} of this code never holds (a crafted file, or one saved "
                                          "with other Python objects; unpickling it could run code)") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointMismatchError(f"{path}: cannot be read as a {what} (truncated, or not a PyTorch file: "
                                      f"{first[:200]})") from None


def _state_dict_of(model_or_state_dict):
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


def _strip_module(sd):
    return {k.removeprefix("module."): v for k, v in sd.items()}


def torch_save(obj, path):
    """torch.save, with a failed write raised as OSError: torch reports it as RuntimeError without an errno ('file write
    failed', 'basic_ios::clear: iostream error'), so one that ends with (next to) no space left is a full disk."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        free = free_bytes(Path(path).parent)
        if free is not None and free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise OSError(errno.EIO, f"torch.save failed: {(str(e).strip().splitlines() or ['?'])[0]}") from e


def save_weights(model_or_state_dict, path):
    """Save in the published format: {'model_state': {'module.' + key: tensor}} (DataParallel naming)."""
    sd = _strip_module(_state_dict_of(model_or_state_dict))
    payload = {"model_state": {"module." + k: v.detach().cpu() for k, v in sd.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "checkpoint") as tmp:
        torch_save(payload, tmp)


def read_state_dict(path):
    """Read weights from a published-format file or a plain state dict; returns keys without 'module.'."""
    payload = load_torch_file(path, "weights file")
    if isinstance(payload, dict) and "model_state" in payload:
        payload = payload["model_state"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors or {{'model_state': state_dict}}")
    return _strip_module(payload)


def check_state_dict(model, sd, path, strict=True):
    """{'missing', 'unexpected', 'misshaped'} key lists of `sd` against `model`; with strict=True any of them is a
    CheckpointMismatchError naming the file and listing the keys."""
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
    return {"missing": missing, "unexpected": unexpected, "misshaped": misshaped}


def load_weights(model, path, strict=True):
    """Load weights into `model`. With strict=True any missing, unexpected or mis-shaped key is an error
    (CheckpointMismatchError naming the file and listing the keys); with strict=False matching keys load
    and the lists are returned as a dict."""
    sd = read_state_dict(path)
    report = check_state_dict(model, sd, path, strict)
    own = model.state_dict()
    bad = {k.split(":")[0] for k in report["misshaped"]}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return report


TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "batch_in_epoch",
                       "best_value", "best_epoch", "rng", "trainer")


def save_training_state(path, state):
    """Save a resume state atomically. It must hold only tensors and plain Python values (dict, list, tuple, str,
    numbers, None), so that load_training_state can read it without unpickling objects."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "training state") as tmp:
        torch_save(state, tmp)


def load_training_state(path, required=()):
    """A resume state (a dict) read with weights_only=True; `required` keys must be present."""
    state = load_torch_file(path, "training state")
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: not a training state (holds a {type(state).__name__}, not a dict)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointMismatchError(f"{path}: not a training state of this code: missing {missing}. A weights file "
                                      "(last_<epoch>.bin, <metric>.bin) can be given to --resume instead")
    return state
