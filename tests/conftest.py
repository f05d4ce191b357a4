"""Shared pytest setup: repo root on sys.path, the real BEAT2 sample, and a small synthetic dataset."""
import importlib.util
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
