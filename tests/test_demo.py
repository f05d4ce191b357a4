"""The README's first command, shortened: the whole demo pipeline on the small demo data (slow: ~4 minutes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_beats_static_pose(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "demo.py"), "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "test" / "table.json").read_text())
    model, static = rows["MambaTalk (demo)"], rows["static mean pose"]
    assert model["fgd"] < static["fgd"]
    assert list((out / "render").glob("*.mp4")), "no video rendered"
    for name in ("face", "upper", "hands", "lower_foot", "foot"):
        assert (out / "pretrained" / "pretrained_vq" / f"{name}.bin").is_file()
