"""Windowed generation, test.py and infer.py on the demo data and the real sample (randomly initialised weights:
these tests check the mechanics, lengths, files and error messages, not motion quality)."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from models.mambatalk import MambaTalk
from models.motion_representation import STAGE1_FILES, VAESKConv, build_stage1_models
from trainers.base import build_dataset
from trainers.generate import Sequence, WindowPlan, generate
from trainers.mambatalk import load_frozen_models
from utils.checkpoint import save_weights
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 32, "audio_f": 32, "motion_f": 32, "vae_codebook_size": 16, "device": "cpu",
         "ctc_model": "none"}


def random_weights_setup(data, tmp):
    """A tiny config on dataset `data` with random stage-1, FGD and MambaTalk weights saved under `tmp` in the
    published format. Returns (args, test dataset)."""
    torch.manual_seed(0)
    args = load_config(ROOT / "configs/demo/mambatalk.yaml", {
        **SMALL, "data_path": str(data) + "/", "data_path_1": str(tmp / "pretrained") + "/",
        "out_path": str(tmp / "runs") + "/", "cache_path": str(tmp / "cache") + "/", "root_path": "",
        "e_path": str(tmp / "aeskconv.bin"), "test_ckpt": str(tmp / "mambatalk.bin")})
    (tmp / "pretrained" / "pretrained_vq").mkdir(parents=True)
    for name, model in build_stage1_models(args).items():
        save_weights(model, tmp / "pretrained" / "pretrained_vq" / STAGE1_FILES[name])
    save_weights(VAESKConv(args), tmp / "aeskconv.bin")
    test_data = build_dataset(args, "test")
    save_weights(MambaTalk(args, vocab=test_data.vocab), tmp / "mambatalk.bin")
    return args, test_data


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    args, test_data = random_weights_setup(demo_data, tmp)
    return args, tmp, test_data


def _model(args, vocab):
    from utils.checkpoint import load_weights
    model = MambaTalk(args, vocab=vocab)
    load_weights(model, args.test_ckpt)
    return model.eval()


def test_window_plan_lengths():
    full = WindowPlan(1890, 1890 * 16000 // 30, 64, 4, paper_protocol=False)
    assert full.n_out == 1890 and full.n_windows == 32 and full.audio_starts[1] == 32000
    paper = WindowPlan(1890, 1890 * 16000 // 30, 64, 4, paper_protocol=True)
    n8 = 1890 - 1890 % 8
    assert paper.n_out == 60 * ((n8 - 4) // 60) + 4 == 1864  # the published length (spec §7.3)
    assert paper.audio_len == 533 * 64 and paper.audio_starts[1] == 533 * 60


def test_batched_generation_equals_one_by_one(setup):
    args, _, test_data = setup
    model = _model(args, test_data.vocab)
    vq = load_frozen_models(args, torch.device("cpu"))
    item = test_data[0]
    seqs = [Sequence(audio=item["audio"][: 16000 * s], word=item["word"][: 30 * s], speaker=1, n_frames=30 * s)
            for s in (3, 7, 5)]
    together = generate(model, vq, seqs, args)
    alone = [generate(model, vq, [s], args)[0] for s in seqs]
    for a, b, s in zip(together, alone, seqs):
        assert a["poses"].shape == (s.n_frames, 165) and a["expressions"].shape == (s.n_frames, 100)
        assert torch.allclose(a["poses"], b["poses"], atol=1e-5)
        assert torch.allclose(a["trans"], b["trans"], atol=1e-5)
        assert torch.allclose(a["expressions"], b["expressions"], atol=1e-5)


def test_full_test_run_writes_results(setup):
    from test import run_test  # the repository's test.py
    args, tmp, test_data = setup
    report, out_dir = run_test(args, out_dir=str(tmp / "test_out"))
    m = report["metrics"]
    for key in ("fgd", "l1div", "face_mse", "face_lvd"):
        assert m[key] is not None and np.isfinite(m[key]), key
    saved = json.loads((Path(out_dir) / "metrics.json").read_text())
    assert saved["metrics"]["fgd"] == pytest.approx(m["fgd"]) and "paper_scaled" in saved
    for fid, k in zip(test_data.file_ids, range(len(test_data))):
        n = test_data[k]["pose"].shape[0]
        for prefix in ("res", "gt"):
            d = np.load(Path(out_dir) / f"{prefix}_{fid}.npz")
            assert set(d.files) >= {"betas", "poses", "expressions", "trans", "model", "gender", "mocap_frame_rate"}
            assert d["poses"].shape == (n, 165) and d["trans"].shape == (n, 3)  # every frame, by default
            assert np.isfinite(d["poses"]).all()


def test_paper_protocol_length(setup):
    from test import run_test
    args, tmp, test_data = setup
    args = load_config(ROOT / "configs/demo/mambatalk.yaml", {**vars_subset(args), "paper_protocol": True})
    _, out_dir = run_test(args, out_dir=str(tmp / "paper_out"))
    fid, n = test_data.file_ids[0], test_data[0]["pose"].shape[0]
    n8 = n - n % 8
    assert np.load(Path(out_dir) / f"res_{fid}.npz")["poses"].shape[0] == 60 * ((n8 - 4) // 60) + 4


def vars_subset(args):
    keys = ["data_path", "data_path_1", "out_path", "cache_path", "root_path", "e_path", "test_ckpt", *SMALL]
    return {k: getattr(args, k) for k in keys}


def run_infer(args, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "infer.py"), "--config", str(ROOT / "configs/demo/mambatalk.yaml")]
    for k, v in vars_subset(args).items():
        cmd += [f"--{k}", str(v)]
    return subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def run_infer_many(args, *runs):
    """run_infer for each argument list, two processes at a time with one thread each (the suite's time on a
    2-core machine: these runs are mostly start-up, which one thread does anyway); results in the order given."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda extra: run_infer(args, *extra, env=env), runs))


def test_infer_on_real_wav(setup, beat2_sample, tmp_path):
    args, _, _ = setup
    wav = beat2_sample / "wave16k" / "2_scott_0_1_1.wav"
    seconds = sf.info(str(wav)).frames / sf.info(str(wav)).samplerate
    outs = []
    none = ["--words", "none"]  # automatic words are tested in tests/test_align.py
    extras = (none, ["--textgrid", str(beat2_sample / "textgrid" / "2_scott_0_1_1.TextGrid")], none)
    results = run_infer_many(args, *(["--audio", str(wav), "--out", str(tmp_path / f"res_{i}.npz"), *extra]
                                     for i, extra in enumerate(extras)))
    for i, r in enumerate(results):
        out = tmp_path / f"res_{i}.npz"
        assert r.returncode == 0, r.stderr
        poses = np.load(out)["poses"]
        assert poses.shape == (int(seconds * 30), 165) and np.isfinite(poses).all()
        assert poses.std(axis=0).max() > 1e-3  # not a static pose
        outs.append(poses)
    assert np.array_equal(outs[0], outs[2])  # deterministic


def test_infer_bad_inputs(setup, beat2_sample, tmp_path):
    args, tmp, _ = setup
    silent, short, corrupt = tmp_path / "silent.wav", tmp_path / "short.wav", tmp_path / "corrupt.wav"
    sf.write(silent, np.zeros(16000 * 3, np.float32), 16000)
    sf.write(short, 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32), 16000)
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    grid = beat2_sample / "textgrid" / "2_scott_0_1_1.TextGrid"  # 64 s of words against 3 s of audio
    other = tmp / "other.bin"
    save_weights(MambaTalk(load_config(ROOT / "configs/demo/mambatalk.yaml", {**vars_subset(args), "hidden_size": 48})),
                 other)
    silent_r, short_r, corrupt_r, grid_r, other_r = run_infer_many(
        args, ["--audio", str(silent), "--out", str(tmp_path / "a.npz")],
        ["--audio", str(short), "--out", str(tmp_path / "b.npz")],
        ["--audio", str(corrupt), "--out", str(tmp_path / "c.npz")],
        ["--audio", str(silent), "--textgrid", str(grid), "--out", str(tmp_path / "d.npz")],
        ["--audio", str(short), "--out", str(tmp_path / "e.npz"), "--ckpt", str(other)])
    assert silent_r.returncode == 0 and "silent" in silent_r.stderr
    assert short_r.returncode == 0 and "shorter than one" in short_r.stderr
    assert np.load(tmp_path / "b.npz")["poses"].shape == (15, 165)
    assert corrupt_r.returncode == 2 and "corrupt.wav" in corrupt_r.stderr and "Traceback" not in corrupt_r.stderr
    assert grid_r.returncode == 0 and "past the end of the audio" in grid_r.stderr
    assert other_r.returncode == 2 and "other.bin" in other_r.stderr and "Traceback" not in other_r.stderr
    assert not (tmp_path / "e.npz").exists()


def test_code_sampling_follows_the_softmax():
    from trainers.generate import choose_codes
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9]))
    out = {f"{kind}_{p}": logits.expand(1, 4000, 4).clone() for p in ("face", "upper", "hands", "lower")
           for kind in ("cls", "rec")}
    weights = {"face": 1, "upper": 1, "hands": 1, "lower": 1}
    key = torch.tensor([7])
    argmax = choose_codes(None, out, weights)["upper"][1]
    assert (argmax == 0).all()
    sampled = choose_codes(None, out, weights, temperature=1.0, noise_key=key)
    freq = torch.bincount(sampled["upper"][1].flatten(), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.03), freq
    assert not torch.equal(sampled["upper"][1], sampled["hands"][1])  # each part draws its own noise
    again = choose_codes(None, out, weights, temperature=1.0, noise_key=key)
    assert torch.equal(again["upper"][1], sampled["upper"][1])  # seeded
    top2 = choose_codes(None, out, weights, temperature=1.0, top_k=2, noise_key=key)["upper"][1]
    assert set(top2.unique().tolist()) == {0, 1}
    held = choose_codes(None, out, weights, temperature=1.0, noise_key=key, hold=4)["upper"][1].reshape(1000, 4)
    assert (held == held[:, :1]).all() and len(held[:, 0].unique()) == 3  # one draw per 4 frames, still sampled
    cold = choose_codes(None, out, weights, temperature=0.05, noise_key=key)["upper"][1]
    assert (cold == 0).float().mean() > 0.99  # low temperature approaches the argmax


def test_upper_codes_held_per_block():
    """code_block_upper: one upper code per block, chosen by the block's mean log-probability among its top k; the
    other parts and the argmax are unchanged."""
    from trainers.generate import choose_codes
    torch.manual_seed(0)
    out = {f"{kind}_{p}": torch.randn(2, 61, 8) for p in ("face", "upper", "hands", "lower") for kind in ("cls", "rec")}
    weights = {"face": 1, "upper": 1, "hands": 1, "lower": 1}
    key = torch.tensor([3, 4])
    plain = choose_codes(None, out, weights, temperature=1.0, noise_key=key, hold=4)
    held = choose_codes(None, out, weights, temperature=1.0, noise_key=key, hold=4, upper_block=8, upper_top_k=3)
    up = held["upper"][1]
    for b in range(0, 61, 8):  # the last block has 5 frames
        assert (up[:, b:b + 8] == up[:, b:b + 1]).all()
    assert len(up[:, ::8].unique()) > 1
    for p in ("face", "hands", "lower"):
        assert torch.equal(held[p][1], plain[p][1])
    # every chosen code is among its block's 3 best by mean log-probability
    logp = torch.log_softmax(out["cls_upper"], dim=-1)
    for b in range(0, 61, 8):
        best = logp[:, b:b + 8].mean(dim=1).topk(3, dim=-1).indices
        assert (best == up[:, b:b + 1]).any(dim=-1).all()
    argmax = choose_codes(None, out, weights, upper_block=8, upper_top_k=3)["upper"][1]
    assert torch.equal(argmax, out["cls_upper"].argmax(dim=-1))
    # the block's mean log-probability decides, not its frames' majority: code 0 leads on 5 of 8 frames (0.5 against
    # 0.45) but is nearly excluded on 3 (0.01), so code 1 has the higher mean; a cold sample takes it
    probs = torch.tensor([[0.5, 0.45, 0.05]] * 5 + [[0.01, 0.6, 0.39]] * 3)
    cold = {"cls_upper": probs.log()[None], "rec_upper": None}
    assert (choose_codes(None, cold, {"upper": 1}, temperature=0.01, noise_key=key[:1], upper_block=8)["upper"][1]
            == 1).all()
    # and the draw follows the softmax of that mean: constant logits -> the softmax itself, one draw per block
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9])).expand(1, 16000, 4).clone()
    sampled = choose_codes(None, {"cls_upper": logits, "rec_upper": None}, {"upper": 1}, temperature=1.0,
                           noise_key=key[:1], upper_block=8)["upper"][1][0, ::8]
    freq = torch.bincount(sampled, minlength=4).float() / len(sampled)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.04), freq


def test_sampled_generation_is_seeded_per_sequence(setup):
    """Sampling gives the same motion for a sequence whatever it is batched with; another sample_key another draw;
    the paper protocol always takes the argmax."""
    args, _, test_data = setup
    model = _model(args, test_data.vocab)
    vq = load_frozen_models(args, torch.device("cpu"))
    item = test_data[0]
    seqs = [Sequence(audio=item["audio"][: 16000 * s], word=item["word"][: 30 * s], speaker=1, n_frames=30 * s,
                     sample_key=s) for s in (3, 5)]
    sampled = load_config(ROOT / "configs/demo/mambatalk.yaml", {**vars_subset(args), "code_temperature": 1.0})
    together = generate(model, vq, seqs, sampled)
    alone = generate(model, vq, seqs[1:], sampled)[0]
    assert torch.allclose(together[1]["poses"], alone["poses"], atol=1e-5)
    seqs[1].sample_key = 99
    other = generate(model, vq, seqs[1:], sampled)[0]
    assert not torch.allclose(other["poses"], alone["poses"], atol=1e-3)
    argmax = load_config(ROOT / "configs/demo/mambatalk.yaml", {**vars_subset(args), "code_temperature": 0.0})
    greedy = generate(model, vq, seqs[1:], argmax)[0]
    assert not torch.allclose(greedy["poses"], alone["poses"], atol=1e-3)
    paper = generate(model, vq, [Sequence(**{**vars(seqs[1]), "n_frames": 124})], sampled, paper_protocol=True)[0]
    paper_greedy = generate(model, vq, [Sequence(**{**vars(seqs[1]), "n_frames": 124})], argmax, paper_protocol=True)[0]
    assert torch.equal(paper["poses"], paper_greedy["poses"])


def test_edge_padded_decoding_has_no_edge_transient():
    """decode_codes(pad=...): the decoder sees the first and last codes continued past the ends, so a held code decodes
    to a held pose up to the edges (with zeros past the ends the first frames move: the legs' transient became a
    root-height dip); frames far from the ends decode as without padding."""
    from trainers.generate import decode_codes
    torch.manual_seed(0)
    args = load_config(ROOT / "configs/demo/mambatalk.yaml", SMALL)
    vq = {"lower": build_stage1_models(args)["lower"]}
    held = torch.full((1, 40), 5, dtype=torch.long)
    plain = decode_codes(vq, {"lower": ("index", held)})["lower"]
    padded = decode_codes(vq, {"lower": ("index", held)}, pad={"lower": 16})["lower"]
    assert padded.shape == plain.shape
    assert torch.allclose(padded, padded[:, 20:21].expand_as(padded), atol=1e-5)
    assert (plain[:, 0] - plain[:, 20]).abs().max() > 1e-3
    varied = torch.randint(0, 16, (1, 60))
    plain = decode_codes(vq, {"lower": ("index", varied)})["lower"]
    padded = decode_codes(vq, {"lower": ("index", varied)}, pad={"lower": 16})["lower"]
    assert torch.allclose(padded[:, 20:40], plain[:, 20:40], atol=1e-5)


@pytest.mark.parametrize("edge_pad, leak", [(0, 0.0), (16, 0.01)])
def test_rows_of_different_lengths_decode_as_alone(edge_pad, leak):
    """generate() decodes a group's sequences as one batch padded to the longest (decode_codes / decoded_to_motion
    with lengths): each row's frames equal decoding that sequence alone at its own length, edges included, under
    both the published root (no padding, no leak) and the demo's (edge padding, leak, standing height)."""
    from trainers.generate import decode_codes, decoded_to_motion
    torch.manual_seed(0)
    args = load_config(ROOT / "configs/demo/mambatalk.yaml", SMALL)
    vq = build_stage1_models(args)
    lengths = [37, 64, 5]
    codes = {p: torch.randint(0, 16, (3, 64)) for p in ("face", "upper", "hands", "lower")}
    start_xz, start_y = torch.randn(3, 2), torch.rand(3) + 0.5
    pad = {"lower": edge_pad}

    def motion(rows, n=None, lengths_t=None):
        merged = {p: ("index", c[rows, :n]) for p, c in codes.items()}
        decoded = decode_codes(vq, merged, pad=pad, lengths=lengths_t)
        return decoded_to_motion(vq, decoded, start_xz[rows], leak, edge_pad,
                                 start_y[rows] if leak else None, lengths_t)

    together = motion(slice(None), lengths_t=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = motion(slice(b, b + 1), n)
        for t, a, tol in zip(together, alone, (1e-4, 1e-5, 1e-5, 1e-5)):  # pose: 6D -> axis-angle amplifies rounding
            assert a.shape[1] == n
            torch.testing.assert_close(t[b:b + 1, :n], a, atol=tol, rtol=1e-5)
    # without the masking, the short rows would see their neighbours' codes past their ends: the check can fail
    unmasked = decode_codes(vq, {"upper": ("index", codes["upper"])})["upper"][2, :5]
    assert (unmasked - decode_codes(vq, {"upper": ("index", codes["upper"][2:3, :5])})["upper"][0]).abs().max() > 1e-4
