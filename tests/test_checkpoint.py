import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import fill
from dataloaders.beat2 import write_motion
from utils.checkpoint import (CheckpointMismatchError, atomic_write, load_training_state, load_weights,
                              save_training_state, save_weights)
from utils.log import run_cli, setup_logging


class Hostile:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def small_model(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_published_format(tmp_path):
    src, dst = small_model(), small_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    src[1].running_mean.fill_(0.5)  # buffers travel too
    path = tmp_path / "m.bin"
    save_weights(src, path)
    payload = torch.load(path, weights_only=True)
    assert list(payload) == ["model_state"]
    assert all(k.startswith("module.") for k in payload["model_state"])
    assert set(payload["model_state"]) == {"module." + k for k in src.state_dict()}
    load_weights(dst, path)
    assert_same_weights(src, dst)


def test_save_weights_does_not_double_prefix(tmp_path):
    src = small_model()
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    save_weights(wrapped, tmp_path / "m.bin")
    keys = torch.load(tmp_path / "m.bin", weights_only=True)["model_state"].keys()
    assert all(k.startswith("module.") and not k.startswith("module.module.") for k in keys)


def test_plain_state_dict_and_module_prefix_accepted(tmp_path):
    src = small_model()
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "prefixed.pt")
    for name in ("plain.pt", "prefixed.pt"):
        dst = small_model(4)
        with torch.no_grad():
            dst[0].weight.zero_()
        load_weights(dst, tmp_path / name)
        assert_same_weights(src, dst)


def test_mismatch_error_lists_keys_and_file(tmp_path):
    sd = small_model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["2.bias"]
    sd["0.weight"] = torch.zeros(5, 3)
    path = tmp_path / "bad.bin"
    save_weights(sd, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(small_model(), path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing" in msg and "2.bias" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    assert "mis-shaped" in msg and "0.weight" in msg and "(5, 3)" in msg
    assert isinstance(e.value, RuntimeError)


def test_non_strict_loads_what_matches(tmp_path):
    sd = small_model().state_dict()
    del sd["2.bias"]
    save_weights(sd, tmp_path / "part.bin")
    dst = small_model()
    report = load_weights(dst, tmp_path / "part.bin", strict=False)
    assert report["missing"] == ["2.bias"]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_weights(small_model(), tmp_path / "nope.bin")


def test_atomic_write_leaves_no_file_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    # an existing file survives a failed rewrite unchanged
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"bad")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_training_state_round_trip(tmp_path):
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "step": 120,
             "rng": torch.get_rng_state()}
    save_training_state(tmp_path / "state.pt", state)
    back = load_training_state(tmp_path / "state.pt")
    assert back["epoch"] == 3 and back["step"] == 120
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.Adam(small_model().parameters())
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_training_state_never_runs_code(tmp_path):
    """A crafted train_state.pt (a pickle that creates a file when loaded) is refused with a message naming the file
    and what it references; the marker never appears. A weights file gets the same treatment."""
    marker = tmp_path / "pwned"
    loaders = {"train_state.pt": load_training_state, "last_0.bin": lambda p: load_weights(small_model(), p)}
    for name, loader in loaders.items():
        path = tmp_path / name
        torch.save({"model": small_model().state_dict(), "epoch": 1, "rng": Hostile(marker)}, path)
        with pytest.raises(CheckpointMismatchError, match=rf"{name}: refused to load .*io\.open.*could run code"):
            loader(path)
        assert not marker.exists()


def test_truncated_or_foreign_training_state_is_a_message(tmp_path):
    good = tmp_path / "train_state.pt"
    save_training_state(good, {"model": small_model().state_dict(), "epoch": 1})
    cut = tmp_path / "cut" / "train_state.pt"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match=rf"{cut}: cannot be read as a training state \(truncated"):
        load_training_state(cut)
    with pytest.raises(CheckpointMismatchError, match=r"not a training state of this code: missing \['optimizer'\]"):
        load_training_state(good, required=("model", "optimizer"))


def test_dead_writers_temp_files_are_removed(tmp_path):
    """A writer killed mid-write leaves `<file>.tmp-<pid>`; the next write of that file removes it once that process is
    gone, and leaves a running writer's temporary file alone."""
    path = tmp_path / "train_state.pt"
    code = f"import os; open('{path}.tmp-' + str(os.getpid()), 'w').write('half')"
    dead = subprocess.run([sys.executable, "-c", code], check=True)
    leftovers = list(tmp_path.glob("train_state.pt.tmp-*"))
    assert len(leftovers) == 1 and dead.returncode == 0
    running = tmp_path / f"train_state.pt.tmp-{os.getppid()}"  # pytest's parent process: alive
    running.write_bytes(b"in progress")
    save_training_state(path, {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train_state.pt", running.name])
    assert load_training_state(path)["epoch"] == 1


def test_full_disk_is_a_message_naming_the_file(tmpfs):
    """A real full filesystem: torch.save (RuntimeError inside torch) and numpy writes (OSError) both become one
    message naming the file; the previous file is intact and no partial file is left."""
    disk = tmpfs("256k")
    state, motion = disk / "train_state.pt", disk / "res_1.npz"
    save_training_state(state, {"epoch": 1})
    before = state.read_bytes()
    fill(disk)
    with pytest.raises(OSError, match=rf"could not write the training state {state}: the disk is full") as err:
        save_training_state(state, {"epoch": 2, "weights": torch.zeros(100_000)})
    assert err.value.errno == 28 and "Nothing was replaced" in str(err.value)
    with pytest.raises(OSError, match=rf"could not write the motion file {motion}: the disk is full"):
        write_motion(motion, np.zeros(300), np.zeros((900, 165)), np.zeros((900, 100)), np.zeros((900, 3)))
    assert state.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "train_state.pt"]


@pytest.mark.parametrize("with_log", [False, True])
def test_cli_error_is_printed_once(capfd, with_log):
    logger = logging.getLogger("mambatalk")
    handlers = list(logger.handlers)
    try:
        if with_log:
            setup_logging()
        else:
            for h in list(logger.handlers):
                logger.removeHandler(h)

        def main():
            raise ValueError("/data/x.TextGrid: malformed")

        with pytest.raises(SystemExit) as code:
            run_cli(main)
        assert code.value.code == 2
        err = capfd.readouterr().err
        assert err.count("error: /data/x.TextGrid: malformed") == 1
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in handlers:
            logger.addHandler(h)


def test_full_disk_under_the_log_file_is_one_warning(tmpfs, capfd):
    disk = tmpfs("64k")
    logger = logging.getLogger("mambatalk")
    handlers = list(logger.handlers)
    try:
        log = setup_logging(disk / "run.txt")
        fill(disk)
        for i in range(3):
            log.info(f"line {i} " + "x" * 8192)
        err = capfd.readouterr().err
        assert err.count(f"warning: cannot write the log file {disk}/run.txt (No space left on device)") == 1
        assert "Logging error" not in err and "Traceback" not in err and err.count("line ") == 3
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for h in handlers:
            logger.addHandler(h)
