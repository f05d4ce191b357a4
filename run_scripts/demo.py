"""The whole pipeline on the embedded demo data: data, five stage-1 models, the FGD autoencoder, MambaTalk, test
with metrics against two baselines, and a rendered video. Run through `bash run_scripts/demo.sh` (the README's first
command). Re-running reuses finished stages; `--force` redoes everything, `--quick` trains fewer steps (CI test).

All outputs live under outputs/demo/: beat2/ (the dataset, BEAT2 layout), pretrained/ (the trained weights in the
published layout), runs/ (training runs), test/ (results, metrics, the table), render/ (the video).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEMO = Path("outputs/demo")
QUICK_STEPS = 120  # --quick: at most this many steps per stage-1 model (the full demo: 200-600; 200 here cost ~50 s more)
QUICK_GEN_STEPS = 100  # --quick: MambaTalk's steps (the full demo: 300); 200 took 6.4 of the quick run's 10.6 min
# (config, best checkpoint the trainer writes, where MambaTalk expects it)
STAGE1 = [
    ("configs/demo/cnn_vqvae_face_30.yaml", "rec.bin", "pretrained/pretrained_vq/face.bin"),
    ("configs/demo/cnn_vqvae_upper_30.yaml", "rec.bin", "pretrained/pretrained_vq/upper.bin"),
    ("configs/demo/cnn_vqvae_hands_30.yaml", "rec.bin", "pretrained/pretrained_vq/hands.bin"),
    ("configs/demo/cnn_vqvae_lower_foot_30.yaml", "rec.bin", "pretrained/pretrained_vq/lower_foot.bin"),
    ("configs/demo/cnn_vqvae_lower_30.yaml", "trans.bin", "pretrained/pretrained_vq/foot.bin"),
    ("configs/demo/aeskconv.yaml", "rec.bin", "beat2/weights/aeskconv_demo.bin"),
]
GENERATOR = ("configs/demo/mambatalk.yaml", "fid.bin", "pretrained/mambatalk_demo.bin")


def stage(title):
    """Print what a stage does and, when it ends, how long it took."""
    class Timer:
        def __enter__(self):
            print(f"\n=== {title}", flush=True)
            self.t0 = time.time()

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"=== done in {time.time() - self.t0:.1f} s: {title}", flush=True)
    return Timer()


SEED = 0  # --seed: the demo data's seed, added to every training run's random_seed
GEN_STEPS = 0  # --gen_steps: MambaTalk's step count instead of its config's (experiments)


def demo_args(config, quick):
    """The demo config, moved under DEMO (when --out changes it) and shortened for --quick."""
    from utils.config import parse_args
    args = parse_args(["--config", config])
    args.random_seed += SEED
    if GEN_STEPS and config == GENERATOR[0]:
        args.epochs = max(1, round(args.epochs * GEN_STEPS / args.max_steps))
        args.max_steps = GEN_STEPS
    cap = QUICK_GEN_STEPS if config == GENERATOR[0] else QUICK_STEPS
    if quick and args.max_steps > cap:
        # fewer epochs too, so that epoch-driven schedules (MambaTalk's mask ratio) still run their whole course
        args.epochs = max(1, round(args.epochs * cap / args.max_steps))
        args.max_steps = cap
    for key in ("data_path", "data_path_1", "out_path", "cache_path", "test_ckpt"):
        value = getattr(args, key).removeprefix("./")
        if value.startswith("outputs/demo/"):
            setattr(args, key, str(DEMO / value.removeprefix("outputs/demo/")) + ("/" if value.endswith("/") else ""))
    args.root_path = ""
    return args


def train(config, best_name, target, force, quick):
    from trainers import build_trainer
    target = DEMO / target
    if target.is_file() and not force:
        print(f"reusing {target}")
        return target
    args = demo_args(config, quick)
    run_dir = Path(build_trainer(args).fit())
    best = run_dir / best_name
    if not best.is_file():  # no evaluation ran (e.g. a step cap inside the first epoch): take the last weights
        best = max(run_dir.glob("last_*.bin"), key=lambda p: p.stat().st_mtime)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, str(target) + ".tmp")
    os.replace(str(target) + ".tmp", target)
    print(f"{best} -> {target}")
    return target


def baselines(test_dir, args):
    """Two baselines scored by the same evaluator as the model: a static mean pose (the mean training pose held
    still) and mismatched ground truth (another recording's real motion, from the training split, played against
    this audio)."""
    from dataloaders.beat2 import read_audio, read_motion, read_split, select_ids
    from trainers.base import build_dataset
    from trainers.evaluate import score_sequences
    from trainers.mambatalk import load_eval_model
    from utils.body_model import load_body_model

    data = Path(args.data_path)
    rows = read_split(data / "train_test_split.csv")
    train_ids = select_ids(rows, "train", args.training_speakers)
    train_motion = [read_motion(data / "smplxflame_30" / f"{i}.npz") for i in train_ids]
    mean_pose = np.concatenate([m["poses"] for m in train_motion]).mean(0)
    mean_exps = np.concatenate([m["expressions"] for m in train_motion]).mean(0)
    results = json.loads((test_dir / "metrics.json").read_text())
    ids = results["ids"]
    refs, audios, static, swapped = [], [], [], []
    for k, fid in enumerate(ids):
        gt = dict(np.load(test_dir / f"gt_{fid}.npz"))
        n = len(gt["poses"])
        refs.append(gt)
        audios.append(read_audio(data / "wave16k" / f"{fid}.wav"))
        static.append({"poses": np.tile(mean_pose, (n, 1)), "expressions": np.tile(mean_exps, (n, 1))})
        # another *training* sequence: swapping the held-out sequences among themselves would hand the evaluator
        # the reference set itself, which a distribution metric such as FGD cannot tell apart from it
        other = read_motion(data / "smplxflame_30" / f"{train_ids[k % len(train_ids)]}.npz")
        reps = int(np.ceil(n / len(other["poses"])))
        swapped.append({"poses": np.tile(other["poses"], (reps, 1))[:n],
                        "expressions": np.tile(other["expressions"], (reps, 1))[:n]})
    device = torch.device("cpu")
    body = load_body_model(args, device)
    eval_model = load_eval_model(args, device)
    avg_vel = build_dataset(args, "test").avg_vel  # the test cache already exists: this only reads it
    return {name: score_sequences(res, refs, audios, body, eval_model, avg_vel, args.vae_test_len,
                                  compat=args.metric_compat)
            for name, res in (("static mean pose", static), ("other sequence's motion", swapped))}


def render_result(fid, quick):
    """The held-out recording `fid`: ground truth and result side by side, with its audio."""
    cmd = [sys.executable, "render.py", "--npy_path", str(DEMO / "test" / f"res_{fid}.npz"),
           "--wav_path", str(DEMO / "beat2" / "wave16k" / f"{fid}.wav"), "--save_dir", str(DEMO / "render"),
           "--gt_npz", str(DEMO / "test" / f"gt_{fid}.npz")]
    if quick:
        cmd += ["--max_seconds", "2", "--width", "320", "--height", "180"]
    subprocess.run(cmd, check=True)


def main():
    global DEMO, SEED, GEN_STEPS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quick", action="store_true", help="fewer training steps (the CI test)")
    p.add_argument("--out", default=str(DEMO), help="folder for every demo output (default outputs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data and of every training run (default 0)")
    p.add_argument("--no_render", action="store_true", help="skip the video (no OpenGL needed)")
    p.add_argument("--gen_steps", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args()
    DEMO, SEED, GEN_STEPS = Path(opts.out), opts.seed, opts.gen_steps
    t_all = time.time()
    from dataloaders.synthetic import write_demo_dataset
    with stage("1/5 demo data: speech-driven synthetic BEAT2 dataset"):
        if opts.force and (DEMO / "beat2").exists():
            shutil.rmtree(DEMO / "beat2")
        write_demo_dataset(DEMO / "beat2", seed=SEED, preset="demo")
    for config, best, target in STAGE1:
        with stage(f"2/5 stage 1: {Path(config).stem}"):
            train(config, best, target, opts.force, opts.quick)
    with stage("3/5 stage 2: MambaTalk"):
        ckpt = train(*GENERATOR, opts.force, opts.quick)

    from test import run_test  # noqa: the repository's test.py (generation + metrics)
    from trainers.evaluate import format_table
    with stage("4/5 test: generate the held-out sequences, score them and two baselines"):
        args = demo_args(GENERATOR[0], opts.quick)
        report, test_dir = run_test(args, ckpt=str(ckpt), out_dir=str(DEMO / "test"))
        rows = {"MambaTalk (demo)": report["metrics"]}
        rows |= baselines(Path(test_dir), args)
        m = report["metrics"]
        rows["ground truth"] = {"bc": m["bc_gt"], "l1div": m["l1div_gt"], "fgd": 0.0, "face_mse": 0.0,
                                "face_lvd": 0.0, "energy": m["energy_gt"], "energy_ratio": 1.0}
        table = format_table(rows)
        print(table)
        (DEMO / "test" / "table.txt").write_text(table + "\n")
        with open(DEMO / "test" / "table.json", "w") as f:
            json.dump(rows, f, indent=2)
    with stage("5/5 render one held-out result with its audio" + (" (skipped: --no_render)" if opts.no_render else "")):
        if not opts.no_render:
            render_result(report["ids"][0], opts.quick)
    print(f"\nDemo finished in {time.time() - t_all:.0f} s. Outputs:")
    print(f"  dataset            {DEMO / 'beat2'}")
    print(f"  stage-1 weights    {DEMO / 'pretrained' / 'pretrained_vq'}")
    print(f"  MambaTalk weights  {ckpt}")
    print(f"  training runs      {DEMO / 'runs'}")
    print(f"  results + metrics  {DEMO / 'test'} (res_*.npz, gt_*.npz, metrics.json, table.txt)")
    print(f"  video              {DEMO / 'render'}")
    print(own_recording_commands(args, ckpt))


def own_recording_commands(args, ckpt):
    """The commands that run the demo model on a recording of one's own, with every path this demo used."""
    py = ".venv/bin/python"  # works without activating the venv
    flags = f"--config {GENERATOR[0]}"
    if DEMO != Path("outputs/demo"):  # the config's paths point into outputs/demo/: point them here instead
        flags += f" --data_path {args.data_path} --data_path_1 {args.data_path_1} --cache_path {args.cache_path}"
    result = DEMO / "my_speech.npz"
    return ("\nThe demo model on your own recording (any wav; its words are recognised from the audio, see README "
            "'Audio only'):\n"
            f"  {py} infer.py {flags} --ckpt {ckpt} --audio my_speech.wav --out {result}\n"
            f"  {py} render.py --npy_path {result} --wav_path my_speech.wav --save_dir {DEMO / 'render'}")


if __name__ == "__main__":
    main()
