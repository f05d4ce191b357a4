"""The demo model on a real recording: motion energy and root figures of infer.py's result against the real motion.

    python run_scripts/demo_real_speech.py [--out outputs/demo] [--sample ../shared/beat2_sample] [--id 2_scott_0_1_1]

Runs infer.py twice (words recognised from the audio, and the recording's MFA TextGrid) with the demo's default
decoding and prints, for each, the motion energy (utils.metric.motion_energy) and its ratio to the real motion's, the
largest root step in the first 10 frames and the root drift in m/min.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.metric import motion_energy, root_drift, root_start_jump  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="the demo's output folder (its --out)")
    p.add_argument("--sample", default=str(ROOT.parent / "shared" / "beat2_sample"), help="a BEAT2-layout folder")
    p.add_argument("--id", default="2_scott_0_1_1")
    opts = p.parse_args()
    demo, sample = Path(opts.out).resolve(), Path(opts.sample)
    real = np.load(sample / "smplxflame_30" / f"{opts.id}.npz")
    e_real = motion_energy(real["poses"])
    for words in ("auto", "textgrid"):
        result = demo / f"real_{opts.id}_{words}.npz"
        cmd = [sys.executable, "infer.py", "--config", "configs/demo/mambatalk.yaml", "--data_path", f"{demo}/beat2/",
               "--data_path_1", f"{demo}/pretrained/", "--cache_path", f"{demo}/cache/mambatalk/",
               "--ckpt", f"{demo}/pretrained/mambatalk_demo.bin", "--audio", str(sample / "wave16k" / f"{opts.id}.wav"),
               "--out", str(result)]
        if words == "textgrid":
            cmd += ["--textgrid", str(sample / "textgrid" / f"{opts.id}.TextGrid")]
        subprocess.run(cmd, cwd=ROOT, check=True)
        m = np.load(result)
        print(f"{words:8s} energy {motion_energy(m['poses']):.3f} rad/s, {motion_energy(m['poses']) / e_real:.2f}x the "
              f"real motion's {e_real:.3f}; first-10-frame root step {root_start_jump(m['trans']) * 100:.1f} cm; "
              f"drift {root_drift(m['trans']):.3f} m/min (real {root_drift(real['trans']):.3f})", flush=True)


if __name__ == "__main__":
    main()
