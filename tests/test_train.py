"""Training on the synthetic demo data (CPU, tiny widths, a few steps): every trainer runs and writes checkpoints that
load strictly, MambaTalk's loss falls, resume is exact, a 2-process gloo DDP run keeps the ranks identical, and bad
input (missing data or stage-1 files, NaN batches, a full disk) fails with a clear message and no corrupt file."""
import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import motion_representation
from models.mambatalk import MambaTalk
from models.motion_representation import STAGE1_FILES
from trainers import build_trainer
from trainers.base import EpochSampler, untuned_cudnn
from trainers.mambatalk import mask_ratio
from conftest import fill
from utils.checkpoint import CheckpointMismatchError, load_weights
from utils.config import load_config
from conftest import Hostile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 16  # stage-1 latent width = codebook size = MambaTalk's latent heads (tiny, for speed)
TINY_MAMBATALK = {"hidden_size": 32, "audio_f": 16, "motion_f": 16, "vae_codebook_size": WIDTH}
# (test id, demo config, overrides): the stage-1 models MambaTalk needs, plus the FGD autoencoder.
# Face/upper/hands switch the vertex losses back on (the demo configs turn them off for speed).
STAGE1 = {
    "ae_upper": ("cnn_vqvae_upper_30", {"rec_ver_weight": 1.0}),
    "ae_hands": ("cnn_vqvae_hands_30", {"rec_ver_weight": 1.0}),
    "aeface": ("cnn_vqvae_face_30", {"rec_ver_weight": 1.0}),
    "aelowerfoot": ("cnn_vqvae_lower_foot_30", {}),
    "aelower": ("cnn_vqvae_lower_30", {}),
    "aeskconv": ("aeskconv", {}),
}
INSTALL = {"aeface": "face", "ae_upper": "upper", "ae_hands": "hands", "aelowerfoot": "lower", "aelower": "global_motion"}


class Lab:
    """Config factory over one temporary folder: demo configs pointed at the test data, CPU, tiny, quiet."""

    def __init__(self, data, tmp):
        self.data, self.tmp = data, tmp
        self.vq_dir = tmp / "pretrained" / "pretrained_vq"
        self.eval_ae = tmp / "aeskconv.bin"

    def config(self, name, out="runs", **overrides):
        base = {"data_path": f"{self.data}/", "root_path": "", "cache_path": f"{self.tmp}/cache/{name}/",
                "out_path": f"{self.tmp}/{out}/", "data_path_1": f"{self.tmp}/pretrained/", "device": "cpu",
                "stat": "none", "e_path": str(self.eval_ae), "vae_length": WIDTH, "vae_codebook_size": WIDTH,
                "batch_size": 2, "max_steps": 2, "log_period": 1, "stride": 60}
        if name == "aeskconv":
            del base["vae_length"], base["vae_codebook_size"]  # 240 is tied to the skeleton encoder
        if name == "mambatalk":
            del base["vae_length"]  # the FGD autoencoder's width
            base |= TINY_MAMBATALK | {"batch_size": 4, "stride": 20}
        return load_config(ROOT / "configs" / "demo" / f"{name}.yaml", base | overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads gain nothing, and on a busy CPU their spinning costs up to 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lab(demo_data, tmp_path_factory):
    """Trains the five stage-1 models and the FGD autoencoder for two steps each and installs their best
    checkpoints where the MambaTalk configs look for them."""
    lab = Lab(demo_data, tmp_path_factory.mktemp("train"))
    lab.runs, lab.trainers = {}, {}
    for key, (name, overrides) in STAGE1.items():
        trainer = build_trainer(lab.config(name, **overrides))
        lab.runs[key] = Path(trainer.fit())
        lab.trainers[key] = trainer
        best = lab.runs[key] / f"{trainer.best_metric}.bin"
        target = lab.eval_ae if key == "aeskconv" else lab.vq_dir / STAGE1_FILES[INSTALL[key]]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(best.read_bytes())
    return lab


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", list(STAGE1))
def test_stage1_trainer_writes_strict_checkpoints(lab, key):
    run, trainer = lab.runs[key], lab.trainers[key]
    args = trainer.args
    files = {p.name for p in run.iterdir()}
    assert {"last_0.bin", f"{trainer.best_metric}.bin", "train_state.pt", f"{args.name}.yaml", f"{args.name}.txt"} <= files
    assert not any(".tmp-" in f for f in files)
    for ckpt in ("last_0.bin", f"{trainer.best_metric}.bin"):
        fresh = getattr(motion_representation, args.g_name)(args)
        load_weights(fresh, run / ckpt)  # strict: raises on any missing/unexpected/mis-shaped key
        assert state_dicts_equal(fresh.state_dict(), trainer.raw_model.state_dict())
    log = (run / f"{args.name}.txt").read_text()
    assert "[eval val after epoch 0, step 2]" in log and "training done: 2 steps" in log


def test_stage1_vertex_terms_and_published_switch(lab):
    """The vertex path runs (face/upper with rec_ver_weight 1) and vq_fixes switches between the published and the
    fixed terms: the same vertex MSE, different vertex velocity/acceleration terms (§10.3 #10). (The published face
    term, §10.3 #9, flips the sign of the expression error; its value changes only where the jaw rotation moves
    expression-displaced vertices, so it is not compared here.)"""
    for key in ("ae_upper", "aeface"):
        trainer = lab.trainers[key]
        batch = {k: v for k, v in next(iter(trainer.train_loader)).items()}
        with torch.no_grad():
            trainer.args.vq_fixes = True
            fixed = trainer.compute_losses(trainer.raw_model, batch, 0)
            trainer.args.vq_fixes = False
            published = trainer.compute_losses(trainer.raw_model, batch, 0)
            trainer.args.vq_fixes = True
        assert {"ver", "ver_vel", "ver_acc"} <= set(fixed) and all(torch.isfinite(v) for v in fixed.values())
        assert fixed["rec"] == published["rec"]
        assert fixed["ver_vel"] != published["ver_vel"] and fixed["ver_acc"] != published["ver_acc"]
        assert fixed["ver"] == pytest.approx(float(published["ver"]), rel=1e-3) and fixed["ver"] > 0


def test_codebook_init_option(lab):
    """Published: codes uniform in +-1/n; `vq_codebook_init: data`: each code is an encoder output of the first batch."""
    for init in ("uniform", "data"):
        trainer = build_trainer(lab.config("cnn_vqvae_upper_30", out="init", vq_codebook_init=init, max_steps=0))
        trainer.before_training()
        codes = trainer.raw_model.quantizer.embedding.weight
        if init == "uniform":
            assert codes.abs().max() <= 1 / trainer.args.vae_codebook_size
        else:
            z = trainer.raw_model.encoder(trainer.model_input(next(iter(trainer.train_loader)))).flatten(0, 1)
            distance = torch.cdist(codes, z, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
            assert distance.max() < 1e-4  # every code is one of the frames' encodings


def test_dead_code_restart(lab):
    """`vq_restart_period`: every code left unused by a batch moves onto one of that batch's encodings (so more codes
    are chosen afterwards), the rest keep their values; period 0 (published) never touches the codebook."""
    trainer = build_trainer(lab.config("cnn_vqvae_upper_30", out="restart", vq_codebook_init="uniform",
                                       vq_restart_period=1, batch_size=4, max_steps=0))
    batch = next(iter(trainer.train_loader))
    quantizer, encoder = trainer.raw_model.quantizer, trainer.raw_model.encoder
    with torch.no_grad():
        z = encoder(trainer.model_input(batch)).flatten(0, 1)
        used_before = torch.bincount(quantizer.map2index(z), minlength=quantizer.n_e) > 0
        codes_before = quantizer.embedding.weight.clone()
        assert 0 < int(used_before.sum()) < quantizer.n_e  # the uniform init leaves most codes unused
        trainer.restart_dead_codes(batch)
        codes = quantizer.embedding.weight
        assert torch.equal(codes[used_before], codes_before[used_before])
        assert trainer.restarted_codes == int((~used_before).sum())
        distance = torch.cdist(codes[~used_before], z, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert distance.max() < 1e-4
        used_after = torch.bincount(quantizer.map2index(z), minlength=quantizer.n_e) > 0
        assert int(used_after.sum()) > int(used_before.sum())  # (near-identical frames may still share one code)
    off = build_trainer(lab.config("cnn_vqvae_upper_30", out="restart_off", max_steps=2, vq_restart_period=0))
    before = off.raw_model.quantizer.embedding.weight.clone()
    off.fit()
    assert off.restarted_codes == 0
    assert not torch.equal(before, off.raw_model.quantizer.embedding.weight)  # trained, but never restarted
def test_optimiser_and_schedule_are_published(lab):
    trainer = lab.trainers["aelowerfoot"]
    args = trainer.args
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert group["lr"] == pytest.approx(args.lr_base * args.batch_size / 128)
    assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 0
    assert trainer.scheduler.step_size == args.decay_epochs and trainer.scheduler.gamma == args.decay_rate
    assert mask_ratio(0, 200) == pytest.approx(0.05) and mask_ratio(199, 200) == pytest.approx(0.99525)


def test_epoch_sampler_shards_and_resumes():
    ranks = [EpochSampler(23, 3, True, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    batches = [list(s) for s in ranks]
    seen = [i for b in batches for batch in b for i in batch]
    assert len(seen) == len(set(seen)) == 2 * 3 * 3  # 11 per rank -> 3 full batches each, no overlap
    ranks[0].set_epoch(4, start_batch=2)
    assert list(ranks[0]) == batches[0][2:]
    ranks[0].set_epoch(5)
    assert list(ranks[0]) != batches[0]  # a new shuffle every epoch


def test_mambatalk_trains_evaluates_tests_and_saves(lab):
    """Two epochs: FGD on the val split each epoch, the published periodic test (here from epoch 1) and the final
    test of the best checkpoint; every weights file loads strictly into a fresh MambaTalk."""
    trainer = build_trainer(lab.config("mambatalk", batch_size=16, max_steps=0, epochs=2, test_start_epoch=1,
                                       test_period=1))
    run = Path(trainer.fit())
    n = trainer.sampler.batches_per_epoch()
    assert trainer.global_step == 2 * n and trainer.best_metric == "fid"
    log = (run / f"{trainer.args.name}.txt").read_text()
    assert log.count("fid ") >= 2 and "cls_self" in log
    for ckpt in ("fid.bin", "last_1.bin"):
        fresh = MambaTalk(trainer.args, vocab=trainer.train_data.vocab)
        load_weights(fresh, run / ckpt)
    assert state_dicts_equal(fresh.state_dict(), trainer.raw_model.state_dict())  # last_1.bin = final weights
    for tag in ("1", "best_fid"):
        assert (run / "test" / tag / "metrics.json").is_file()
        assert list((run / "test" / tag).glob("res_*.npz"))


def test_bf16_autocast_steps(lab):
    """amp: bf16 runs the networks under autocast and the losses in float32 (no NaN from bf16 acos/rotations)."""
    for name, overrides in (("cnn_vqvae_upper_30", {"rec_ver_weight": 1.0}), ("mambatalk", {})):
        trainer = build_trainer(lab.config(name, out="bf16", amp="bf16", **overrides))
        assert trainer.flat is None  # CPU default
        trainer.fit()
        assert trainer.global_step == 2 and np.isfinite(trainer.best_value)


@pytest.mark.parametrize("key", list(STAGE1))
def test_flat_weights_train_every_stage1_model(lab, key, monkeypatch):
    """Flat weights (the GPU default under bf16, forced here on a CPU) with every stage-1 trainer: all of their
    training forwards go through Trainer.call_model (a gradient reaching a parameter directly would raise), the
    weights move and stay finite."""
    from trainers.base import Trainer
    monkeypatch.setattr(Trainer, "flat_weights", True)
    name, overrides = STAGE1[key]
    trainer = build_trainer(lab.config(name, out="flat_" + key, amp="bf16", **overrides))
    assert trainer.flat is not None
    before = [p.detach().clone() for p in trainer.flat.params]
    trainer.fit()
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.flat.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.flat.params))


@pytest.mark.slow
def test_mambatalk_loss_falls(lab):
    """100 steps of the tiny model at batch 4 (lr_base 0.02, i.e. lr 6.25e-4): measured, the mean total loss of the
    last 20 steps is about 40 % below the first 20's (38.4 -> 22.8; 150 steps gave 48 %). Asserting a 25 % drop
    leaves a wide margin."""
    trainer = build_trainer(lab.config("mambatalk", max_steps=100, epochs=1000, lr_base=0.02, eval_split="",
                                       log_period=50))
    totals = []
    step = trainer.train_step
    trainer.train_step = lambda batch: totals.append(float((out := step(batch))["total"])) or out
    trainer.fit()
    assert len(totals) == 100
    first, last = sum(totals[:20]) / 20, sum(totals[-20:]) / 20
    print(f"MambaTalk loss: first 20 steps {first:.3f}, last 20 steps {last:.3f}, drop {1 - last / first:.1%}")
    assert last < 0.75 * first


def test_resume_is_exact(lab):
    """8 steps straight == 4 steps, then --resume <run>/train_state.pt for 4 more (an epoch boundary, its
    evaluation and scheduler step fall inside the second half; dropout, masks and Adam state all carry over)."""
    common = {"batch_size": 16, "epochs": 50}
    straight = build_trainer(lab.config("mambatalk", out="straight", max_steps=8, **common))
    assert straight.sampler.batches_per_epoch() < 8  # the run crosses an epoch boundary
    straight.fit()
    first = build_trainer(lab.config("mambatalk", out="halves", max_steps=4, **common))
    run = Path(first.fit())
    resumed = build_trainer(lab.config("mambatalk", out="halves", max_steps=8, resume=str(run / "train_state.pt"),
                                       **common))
    assert resumed.global_step == 4 and resumed.run_dir == str(run)
    resumed.fit()
    assert resumed.global_step == 8 and resumed.epoch == straight.epoch
    assert state_dicts_equal(resumed.raw_model.state_dict(), straight.raw_model.state_dict())
    a, b = torch.load(run / "train_state.pt", weights_only=True), straight.optimizer.state_dict()
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"], b["state"][k]["exp_avg_sq"]) for k in b["state"])


def test_flat_weights_resume_is_exact_and_interchangeable(lab, monkeypatch):
    """bf16 training with flat weights (utils.flat_weights; GPU default, forced here on a CPU): 6 steps straight ==
    3 steps, then --resume for 3 more, bit for bit; the training state keeps Adam's state per parameter, so the
    same file resumes without flat weights (moments equal the saved ones), and a state saved without flat weights
    resumes with them (the flat moments hold the saved ones); the flat run stays within clipping's rounding of the
    per-parameter run."""
    from trainers.base import Trainer
    common = {"batch_size": 16, "epochs": 50, "amp": "bf16", "eval_split": ""}
    monkeypatch.setattr(Trainer, "flat_weights", True)
    straight = build_trainer(lab.config("mambatalk", out="flat_straight", max_steps=6, **common))
    assert straight.flat is not None and straight.optimizer.param_groups[0]["params"] == [straight.flat.master]
    straight.fit()
    run = Path(build_trainer(lab.config("mambatalk", out="flat_halves", max_steps=3, **common)).fit())
    resumed = build_trainer(lab.config("mambatalk", out="flat_halves", max_steps=6,
                                       resume=str(run / "train_state.pt"), **common))
    resumed.fit()
    assert state_dicts_equal(resumed.raw_model.state_dict(), straight.raw_model.state_dict())

    saved = torch.load(run / "train_state.pt", weights_only=True)["optimizer"]
    trained = [p for p in resumed.raw_model.parameters() if p.requires_grad]
    assert sorted(saved["state"]) == list(range(len(trained))) == saved["param_groups"][0]["params"]
    assert all(saved["state"][i]["exp_avg"].shape == p.shape for i, p in enumerate(trained))
    monkeypatch.setattr(Trainer, "flat_weights", False)
    plain = build_trainer(lab.config("mambatalk", out="flat_halves", max_steps=6,
                                     resume=str(run / "train_state.pt"), **common))
    assert plain.flat is None
    for i, p in enumerate(plain.optimizer.param_groups[0]["params"]):
        assert torch.equal(plain.optimizer.state[p]["exp_avg_sq"], saved["state"][i]["exp_avg_sq"])
    plain.fit()
    for (k, a), b in zip(plain.raw_model.state_dict().items(), straight.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)

    run = Path(build_trainer(lab.config("mambatalk", out="plain_halves", max_steps=3, **common)).fit())
    monkeypatch.setattr(Trainer, "flat_weights", True)
    flat = build_trainer(lab.config("mambatalk", out="plain_halves", max_steps=6,
                                    resume=str(run / "train_state.pt"), **common))
    saved = torch.load(run / "train_state.pt", weights_only=True)["optimizer"]
    moments = flat.flat.param_views(flat.optimizer.state[flat.flat.master]["exp_avg"])
    assert all(torch.equal(m, saved["state"][i]["exp_avg"]) for i, m in enumerate(moments))
    flat.fit()
    assert flat.global_step == 6


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    from trainers import build_trainer
    from utils.config import parse_args
    trainer = build_trainer(parse_args(sys.argv[1:]))
    trainer.fit()
    torch.save(trainer.raw_model.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
""")


def test_ddp_two_processes_keep_identical_weights(lab, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): per-rank shards of the global batch, rank-0 evaluation and
    checkpoints; afterwards both ranks hold the same parameters and buffers (BatchNorm statistics included)."""
    args = lab.config("mambatalk", out="ddp", max_steps=3, batch_size=4)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    cli = ["--config", str(ROOT / "configs/demo/mambatalk.yaml")]
    for key in ("data_path", "root_path", "cache_path", "out_path", "data_path_1", "device", "stat", "e_path",
                "vae_codebook_size", "batch_size", "max_steps", *TINY_MAMBATALK):
        cli += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *cli], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes 2" in r.stderr and "2 windows per process" in r.stderr
    sd0, sd1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    assert state_dicts_equal(sd0, sd1)
    assert any("running_mean" in k for k in sd0)
    runs = list((lab.tmp / "ddp" / "custom").iterdir())
    assert len(runs) == 1  # one run folder, rank 0's
    run = runs[0]
    saved = torch.load(run / "train_state.pt", weights_only=True)["model"]
    assert state_dicts_equal(saved, sd0)  # rank 0 wrote the state
    assert (run / "fid.bin").is_file() and (run / "last_0.bin").is_file()


# ---------------------------------------------------------------------------------------------------- bad input

def test_missing_dataset_names_the_path(lab, tmp_path):
    missing = tmp_path / "no_such_beat2"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_trainer(lab.config("cnn_vqvae_lower_30", out="bad_data", data_path=f"{missing}/"))
    assert not (lab.tmp / "bad_data").exists()  # failed before creating a run folder


def test_missing_stage1_checkpoint_names_file_and_command(lab, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_trainer(lab.config("mambatalk", out="bad_vq", data_path_1=f"{tmp_path}/"))
    msg = str(err.value)
    assert str(tmp_path / "pretrained_vq" / "face.bin") in msg
    assert "python train.py --config" in msg and "cnn_vqvae_face_30.yaml" in msg
    assert not (lab.tmp / "bad_vq").exists()


def test_nan_batch_names_the_step(lab):
    trainer = lab.trainers["aelowerfoot"]
    batch = next(iter(trainer.train_loader))
    batch["pose"][0, 3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"step {trainer.global_step + 1}: batch item 'pose'"):
        trainer.train_step(batch)


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_gradients_skip_the_update(lab, fused, caplog):
    """A finite loss whose gradient is NaN (sqrt's slope at 0 times 0): the step leaves weights and Adam's state as
    they were and is counted; a later finite step updates; a log window of only such steps stops the run."""
    trainer = lab.trainers["aelowerfoot"]
    batch = next(iter(trainer.train_loader))
    model, saved_optimizer = trainer.raw_model, trainer.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused or None)
    honest = trainer.compute_losses

    def nan_gradient(model_, batch_, epoch):
        losses = honest(model_, batch_, epoch)
        return losses | {"nan_slope": (0.0 * params[0].sum()).clamp(min=0).sqrt()}

    try:
        trainer.train_step(batch)  # one ordinary step first: Adam has state to keep
        before = [p.detach().clone() for p in params]
        moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in params]
        trainer.compute_losses = nan_gradient
        losses = trainer.train_step(batch)
        assert torch.isfinite(losses["total"])
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert all(torch.equal(m, trainer.optimizer.state[p]["exp_avg"]) for m, p in zip(moments, params))
        assert float(trainer.skipped_steps) == 1
        with caplog.at_level("WARNING"):
            trainer.check_skipped_steps(4)
        assert "1 of the last 4 steps skipped" in caplog.text and float(trainer.skipped_steps) == 0
        trainer.train_step(batch)
        with pytest.raises(FloatingPointError, match="all of the last 1 steps were non-finite"):
            trainer.check_skipped_steps(1)
        del trainer.compute_losses
        trainer.train_step(batch)
        assert not all(torch.equal(a, p) for a, p in zip(before, params))
        assert float(trainer.skipped_steps) == 0
    finally:
        trainer.__dict__.pop("compute_losses", None)
        trainer.optimizer = saved_optimizer


def test_full_disk_keeps_previous_checkpoint(lab, tmpfs):
    """A real full filesystem: torch.save fails with a RuntimeError of its own, which used to escape as a traceback.
    Now one message names the file, the previous checkpoint and state are intact and no partial file is left."""
    trainer = lab.trainers["aelowerfoot"]
    files = ("last_0.bin", "train_state.pt")
    src = Path(trainer.run_dir)
    disk = tmpfs(sum((src / name).stat().st_size for name in files) + (256 << 10))
    for name in files:
        (disk / name).write_bytes((src / name).read_bytes())
    fill(disk)
    before = {name: (disk / name).read_bytes() for name in files}
    trainer.run_dir = str(disk)
    try:
        full = "the disk is full"
        with pytest.raises(OSError, match=rf"could not write the checkpoint {disk}/last_0.bin: {full}") as err:
            trainer.save_weights("last_0.bin")
        assert err.value.errno == errno.ENOSPC and "Nothing was replaced" in str(err.value)
        with pytest.raises(OSError, match=rf"could not write the training state {disk}/train_state.pt: {full}"):
            trainer.save_state()
    finally:
        trainer.run_dir = str(src)
    assert {name: (disk / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", *files]
    load_weights(getattr(motion_representation, trainer.args.g_name)(trainer.args), disk / "last_0.bin")


def copied_state(lab, tmp_path, key="aelowerfoot"):
    """A copy of a stage-1 run's train_state.pt in its own folder (a resume writes into the state's folder)."""
    path = tmp_path / "run" / "train_state.pt"
    path.parent.mkdir()
    path.write_bytes((lab.runs[key] / "train_state.pt").read_bytes())
    return path


def test_resume_refuses_crafted_truncated_or_foreign_states(lab, tmp_path):
    """--resume reads train_state.pt without unpickling objects: a crafted state is refused before it can run code,
    a truncated one or one of another config is a message naming the file, never a raw traceback."""
    path = copied_state(lab, tmp_path)
    good = path.read_bytes()
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    torch.save(state | {"rng": Hostile(marker)}, path)
    with pytest.raises(CheckpointMismatchError, match=rf"{path}: refused to load as a training state: it references"):
        build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path)))
    assert not marker.exists()
    path.write_bytes(good[:len(good) // 3])
    with pytest.raises(CheckpointMismatchError, match=rf"{path}: cannot be read as a training state \(truncated"):
        build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path)))
    path.write_bytes(good)
    with pytest.raises(CheckpointMismatchError, match=rf"{path}: checkpoint does not match .*\n  mis-shaped keys"):
        build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path), vae_length=2 * WIDTH,
                                 vae_codebook_size=2 * WIDTH))
    with pytest.raises(ValueError, match=rf"{path} was trained with batch_size 2: .*cannot change it"):
        build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path), batch_size=4))


def test_resume_applies_a_new_learning_rate(lab, tmp_path, caplog):
    """--lr_base with --resume used to be dropped silently (the optimiser state brought the old rate back) while the
    run's YAML recorded the new value; it is applied, with a log line, and the schedule continues from it."""
    path = copied_state(lab, tmp_path)
    old = build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path)))
    old.release_run_dir()
    old_lr = old.optimizer.param_groups[0]["lr"]
    trainer = build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path), lr_base=10 * old.args.lr_base,
                                       weight_decay=0.01))
    trainer.release_run_dir()
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(10 * old_lr) and group["weight_decay"] == 0.01
    assert trainer.scheduler.base_lrs == [pytest.approx(10 * old.scheduler.base_lrs[0])]
    log = (path.parent / f"{trainer.args.name}.txt").read_text()
    assert "resume: settings that differ from the saved run are applied: lr_base" in log and "weight_decay 0.01" in log


def test_resume_of_a_graphed_gpu_state_on_a_cpu(lab, tmp_path):
    """A graphed GPU run saves Adam groups with fused and capturable set; resuming it on a CPU (eager) uses this run's
    Adam (capturable Adam refuses CPU step counts) and trains on, with the saved moments."""
    path = copied_state(lab, tmp_path)
    state = torch.load(path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True, foreach=None)
    torch.save(state, path)
    trainer = build_trainer(lab.config("cnn_vqvae_lower_foot_30", resume=str(path)))
    try:
        group = trainer.optimizer.param_groups[0]
        assert not group["capturable"] and not group["fused"]
        moments = {k: v["exp_avg"].clone() for k, v in enumerate(trainer.optimizer.state.values())}
        saved = list(state["optimizer"]["state"].values())
        assert all(torch.equal(moments[k], saved[k]["exp_avg"]) for k in moments)
        batch = next(iter(trainer.train_loader))
        losses = trainer.train_step(batch)
        assert all(torch.isfinite(v) for v in losses.values())
    finally:
        trainer.release_run_dir()


def test_resume_with_reordered_conv_weights(lab, monkeypatch):
    """A MambaTalk state saved with the audio encoders' weights as built, resumed where they are stored channels-last
    (GPU training, models.layers.channels_last_conv_weights_; forced here on a CPU): the weights and Adam's moments
    take the new layout with the same values (fused Adam needs parameter and moments in one layout), and training
    goes on."""
    from models.layers import WavEncoder
    common = {"batch_size": 16, "epochs": 50}
    run = Path(build_trainer(lab.config("mambatalk", out="layout", max_steps=2, **common)).fit())
    monkeypatch.setattr(WavEncoder, "channels_last", True)
    resumed = build_trainer(lab.config("mambatalk", out="layout", max_steps=3, resume=str(run / "train_state.pt"),
                                       **common))
    saved = torch.load(run / "train_state.pt", weights_only=True)
    reordered = 0
    for i, p in enumerate(resumed.optimizer.param_groups[0]["params"]):
        reordered += not p.is_contiguous()
        for k in ("exp_avg", "exp_avg_sq"):
            moment = resumed.optimizer.state[p][k]
            assert moment.stride() == p.stride() and torch.equal(moment, saved["optimizer"]["state"][i][k])
    assert reordered == 50
    resumed.fit()
    assert resumed.global_step == 3
    assert all(torch.isfinite(p).all() for p in resumed.raw_model.parameters())


RACE_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, time
    sys.path.insert(0, {root!r})
    import train  # the slow imports happen before the start line
    from utils.log import run_cli

    def run(argv):
        logging.getLogger("mambatalk").handlers.clear()  # each phase is a fresh run, as in a new process
        try:
            run_cli(lambda: train.main(argv))
            return 0
        except SystemExit as e:
            return e.code

    for phase, argv in enumerate(json.loads(sys.argv[2])):
        go = sys.argv[1] + str(phase)
        open(go + ".ready-" + str(os.getpid()), "w").close()
        while not os.path.exists(go):
            time.sleep(0.002)
        start = float(open(go).read())
        while time.time() < start:
            time.sleep(0.001)
        print("phase", phase, "exit", run(argv), file=sys.stderr, flush=True)
""")


def start_together(tmp_path, phases):
    """Two train.py processes run each command line of `phases` in turn, both released at the same instant just after
    a new second begins (so new runs get the same timestamped name). Returns each process's stderr per phase."""
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    logs = [tmp_path / f"race{i}.err" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "go"), json.dumps(phases)], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")) for log in logs]
    for phase in range(len(phases)):
        deadline = time.time() + 120
        while len(list(tmp_path.glob(f"go{phase}.ready-*"))) < 2 and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.01)
        (tmp_path / "go.tmp").write_text(str(math.floor(time.time()) + 1.05))
        os.replace(tmp_path / "go.tmp", tmp_path / f"go{phase}")
    for p in procs:
        p.wait(timeout=300)
    return [[part for part in re.split(r"phase \d+ exit", log.read_text())] for log in logs], \
        [[int(c) for c in re.findall(r"phase \d+ exit (\d+)", log.read_text())] for log in logs]


def test_two_runs_started_together_never_share_a_folder(lab, tmp_path):
    """Two real train.py processes with the same config started in the same second used to share one run folder
    (interleaved log, one run's YAML next to the other's checkpoints). Now each gets its own folder; and two resumes
    of one state do not both write into its folder: the second is refused with a message."""
    args = lab.config("cnn_vqvae_lower_30", out="race", max_steps=1, eval_split="")
    cli = ["--config", str(ROOT / "configs/demo/cnn_vqvae_lower_30.yaml")]
    for key in ("data_path", "root_path", "cache_path", "out_path", "data_path_1", "device", "stat", "vae_length",
                "vae_codebook_size", "batch_size", "eval_split", "max_steps"):
        cli += [f"--{key}", str(getattr(args, key))]
    state = copied_state(lab, tmp_path, "aelower")  # 2 steps of the same config
    outputs, codes = start_together(tmp_path, [cli, cli[:-2] + ["--max_steps", "3", "--resume", str(state)]])
    assert [c[0] for c in codes] == [0, 0], [out[0][-2000:] for out in outputs]
    runs = sorted((lab.tmp / "race" / "custom").iterdir())
    assert len(runs) == 2 and runs[1].name == runs[0].name + "_2"
    for run in runs:
        logs, yamls = list(run.glob("*.txt")), list(run.glob("*.yaml"))
        assert len(logs) == 1 and len(yamls) == 1 and (run / "train_state.pt").is_file()
        assert logs[0].read_text().count("run folder") == 1 and f"run folder {run} " in logs[0].read_text()

    assert sorted(c[1] for c in codes) == [0, 2], [out[-1][-2000:] for out in outputs]
    refused = next(out[1] for out, c in zip(outputs, codes) if c[1] == 2)
    assert f"error: run folder {state.parent} is in use by another training process" in refused
    assert "Traceback" not in refused and refused.count("error:") == 1
    assert torch.load(state, weights_only=True)["global_step"] == 3


def test_training_on_a_gpu_turns_cudnn_attention_off():
    """cuDNN's attention backward returned NaN in bf16 MambaTalk training (README, Known limitations): the trainer
    switches that kernel off on GPUs and leaves CPU runs alone."""
    from trainers.base import avoid_cudnn_attention
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_untuned_cudnn_turns_autotuning_off_and_back():
    """Evaluation and checkpoint tests during GPU training run without cuDNN's autotuning (their lengths vary), and the
    training steps' setting (Trainer.cudnn_benchmark) comes back afterwards, also after an error."""
    flags = torch.backends.cudnn
    before = (flags.benchmark, flags.deterministic, flags.allow_tf32)
    try:
        flags.benchmark, flags.allow_tf32 = True, False
        with untuned_cudnn():
            assert not flags.benchmark and not flags.allow_tf32
        assert flags.benchmark
        with pytest.raises(KeyError), untuned_cudnn():
            raise KeyError("evaluation failed")
        assert flags.benchmark and not flags.allow_tf32
    finally:
        flags.benchmark, flags.deterministic, flags.allow_tf32 = before
