"""Shared pytest setup: repo root on sys.path, the real BEAT2 sample, and a small synthetic dataset."""
import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower test (still run in CI)")


@pytest.fixture(scope="session")
def beat2_sample():
    """Path to the one real BEAT2 sequence in ../shared/beat2_sample (never copied into the repo)."""
    path = REPO_ROOT.parent / "shared" / "beat2_sample"
    if not path.is_dir():
        pytest.skip(f"real BEAT2 sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small synthetic dataset in BEAT2 layout, written once per test session."""
    if importlib.util.find_spec("dataloaders.synthetic") is None:
        pytest.skip("dataloaders/synthetic.py does not exist yet")
    from dataloaders.synthetic import write_demo_dataset
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(out, seed=0, preset="test")
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: `tmpfs(size)` mounts a real tmpfs of `size` (bytes or '256k') in tmp_path and returns its path; `fill`
    then takes its last free byte. Needs root (CI runs as root); skipped otherwise. Unmounted after the test."""
    mounts = []

    def mount(size, name="disk"):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / name
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder):
    """Write a filler file in `folder` until its disk is full."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[:len(chunk) // 2]


class Hostile:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file (`from conftest import
    Hostile` in the tests of crafted pickles)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")
