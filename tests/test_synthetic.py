"""Embedded demo data (dataloaders/synthetic.py): BEAT2 layout and formats, determinism, and motion that follows speech."""
import csv
import json
import re
import time
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import textgrid
from scipy.ndimage import gaussian_filter1d

from dataloaders.synthetic import VOCAB, main, write_demo_dataset

REAL_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "beat2_sample"
NPZ_KEYS = ["betas", "poses", "expressions", "trans", "model", "gender", "mocap_frame_rate"]
ARM_DIMS = np.r_[48:66]  # shoulders, elbows, wrists (joints 16-21)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    t0 = time.perf_counter()
    write_demo_dataset(out, seed=0, preset="test")
    return out, time.perf_counter() - t0


def read_split(root):
    with open(root / "train_test_split.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(root, seq_id):
    motion = np.load(root / "smplxflame_30" / f"{seq_id}.npz")
    y, sr = sf.read(root / "wave16k" / f"{seq_id}.wav", dtype="float32")
    tier = textgrid.TextGrid.fromFile(str(root / "textgrid" / f"{seq_id}.TextGrid"))[0]
    return motion, y, sr, tier


def all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def loudness_30fps(y, n_frames):
    """RMS loudness at 100 Hz (librosa), resampled to the motion frame times."""
    rms = librosa.feature.rms(y=y, frame_length=1024, hop_length=160)[0]
    return np.interp(np.arange(n_frames) / 30, np.arange(len(rms)) * 160 / 16000, rms)


def onset_score(speed, onset_frames):
    """Best correlation, over lags of 0-0.3 s, between arm speed and a blurred impulse train at the given frames."""
    impulses = np.zeros(len(speed))
    impulses[onset_frames[(onset_frames >= 0) & (onset_frames < len(speed))]] = 1.0
    blurred = gaussian_filter1d(impulses, 3.0)
    return max(np.corrcoef(np.roll(blurred, lag), speed)[0, 1] for lag in range(10))


def test_test_preset_is_fast(dataset):
    assert dataset[1] < 3.0


def test_npz_layout(dataset):
    root, _ = dataset
    for row in read_split(root):
        motion, *_ = load(root, row["id"])
        assert motion.files == NPZ_KEYS
        n = motion["poses"].shape[0]
        assert motion["poses"].shape == (n, 165) and motion["poses"].dtype == np.float32
        assert motion["trans"].shape == (n, 3) and motion["trans"].dtype == np.float64
        assert motion["expressions"].shape == (n, 100) and motion["expressions"].dtype == np.float64
        assert motion["betas"].shape == (300,)
        assert str(motion["model"]) == "smplx2020" and str(motion["gender"]) == "neutral"
        assert int(motion["mocap_frame_rate"]) == 30
        assert 12 * 30 <= n <= 20 * 30


def test_layout_matches_real_sample(dataset):
    if not REAL_SAMPLE.exists():
        pytest.skip("real BEAT2 sample not available")
    root, _ = dataset
    seq_id = read_split(root)[0]["id"]
    real = np.load(next((REAL_SAMPLE / "smplxflame_30").glob("*.npz")))
    ours = np.load(root / "smplxflame_30" / f"{seq_id}.npz")
    assert ours.files == real.files
    assert [ours[k].dtype for k in ours.files] == [real[k].dtype for k in real.files]
    assert [ours[k].shape[1:] for k in ours.files] == [real[k].shape[1:] for k in real.files]
    # The TextGrid header and interval lines are laid out like the aligner's, numbers and tier count aside.
    mask = lambda text: [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.splitlines()[:20]]
    real_text = next((REAL_SAMPLE / "textgrid").glob("*.TextGrid")).read_text()
    assert mask((root / "textgrid" / f"{seq_id}.TextGrid").read_text()) == mask(real_text)


def test_wav_is_16k_mono_pcm16_matching_motion(dataset):
    root, _ = dataset
    for row in read_split(root):
        info = sf.info(str(root / "wave16k" / f"{row['id']}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        motion, y, _, _ = load(root, row["id"])
        assert abs(len(y) / 16000 * 30 - len(motion["poses"])) <= 1.0
        assert 0.1 < np.abs(y).max() < 1.0


def test_textgrid_words_tier_covers_audio_with_exact_times(dataset):
    root, _ = dataset
    vocab = {w for w, *_ in VOCAB}
    for row in read_split(root):
        motion, y, sr, tier = load(root, row["id"])
        assert tier.name == "words"
        assert tier[0].minTime == 0.0 and abs(tier[-1].maxTime - len(y) / sr) < 1e-6
        for a, b in zip(tier, list(tier)[1:]):
            assert a.maxTime == b.minTime
        words = [iv for iv in tier if iv.mark]
        assert {iv.mark for iv in words} <= vocab and len(words) >= 15
        assert all(0.2 - 1e-9 <= iv.maxTime - iv.minTime <= 0.6 + 1e-9 for iv in words)
        assert max(iv.maxTime - iv.minTime for iv in tier if not iv.mark) >= 0.3  # phrase pauses
        # Sound inside words, near-silence outside: the word times are those of the waveform.
        inside = np.zeros(len(y), bool)
        for iv in words:
            inside[int(iv.minTime * sr):int(iv.maxTime * sr)] = True
        assert np.sqrt(np.mean(y[inside] ** 2)) > 10 * np.sqrt(np.mean(y[~inside] ** 2))


def test_split_holds_out_whole_sequences(dataset):
    root, _ = dataset
    rows = read_split(root)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # so no id is in two splits
    assert all(re.fullmatch(r"\d+_[a-z]+_0_\d+_\d+", i) for i in ids)
    for split in ("train", "val", "test"):
        assert any(r["type"] == split and r["id"].startswith("2_") for r in rows)
    assert len({int(i.split("_")[0]) for i in ids}) >= 2
    listed = {(sub, f"{i}{ext}") for i in ids
              for sub, ext in (("smplxflame_30", ".npz"), ("wave16k", ".wav"), ("textgrid", ".TextGrid"))}
    on_disk = {(p.parent.name, p.name) for p in root.glob("*/*")}
    assert on_disk == listed


def test_same_seed_same_bytes_and_completion_marker(dataset, tmp_path):
    root, _ = dataset
    again = write_demo_dataset(tmp_path / "again", seed=0, preset="test")
    assert all_files(again) == all_files(root)
    assert json.loads((root / ".complete").read_text())["seed"] == 0 and not (root / ".partial").exists()

    other = write_demo_dataset(tmp_path / "other", seed=1, preset="test")
    seq_id = read_split(root)[0]["id"]
    assert (other / "smplxflame_30" / f"{seq_id}.npz").read_bytes() != (root / "smplxflame_30" / f"{seq_id}.npz").read_bytes()

    # A complete dataset of the same seed and preset is left alone; a different one is rebuilt without stale files.
    stamp = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    t0 = time.perf_counter()
    write_demo_dataset(again, seed=0, preset="test")
    assert time.perf_counter() - t0 < 0.5
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == stamp
    (again / "smplxflame_30" / "9_stale_0_1_1.npz").write_bytes(b"old")
    write_demo_dataset(again, seed=1, preset="test")
    assert all_files(again) == all_files(other)


def test_sequences_differ(dataset):
    root, _ = dataset
    seen_words, seen_poses = set(), []
    for row in read_split(root):
        motion, _, _, tier = load(root, row["id"])
        seen_words.add(tuple(iv.mark for iv in tier if iv.mark))
        seen_poses.append(motion["poses"][:300])
    assert len(seen_words) == len(seen_poses)
    for i in range(len(seen_poses)):
        for j in range(i + 1, len(seen_poses)):
            assert np.abs(seen_poses[i] - seen_poses[j]).mean() > 0.01


def test_jaw_and_face_follow_loudness(dataset):
    root, _ = dataset
    for row in read_split(root):
        motion, y, _, _ = load(root, row["id"])
        loud = loudness_30fps(y, len(motion["poses"]))
        jaw = np.linalg.norm(motion["poses"][:, 66:69], axis=1)
        assert np.corrcoef(loud, jaw)[0, 1] > 0.5
        expr_corr = [abs(np.corrcoef(loud, motion["expressions"][:, k])[0, 1]) for k in range(10)]
        assert max(expr_corr) > 0.5


def test_arm_strokes_follow_word_onsets(dataset):
    root, _ = dataset
    rng = np.random.default_rng(0)
    real, shuffled = [], []
    for row in read_split(root):
        motion, _, _, tier = load(root, row["id"])
        speed = np.r_[0.0, np.linalg.norm(np.diff(motion["poses"][:, ARM_DIMS], axis=0), axis=1)]
        onsets = np.round(np.array([iv.minTime for iv in tier if iv.mark]) * 30).astype(int)
        real.append(onset_score(speed, onsets))
        shuffled.append(np.mean([onset_score(speed, rng.integers(0, len(speed), len(onsets))) for _ in range(10)]))
    assert np.mean(real) > 0.2 and np.mean(real) > 3 * max(np.mean(shuffled), 0.02)


def test_motion_is_smooth_and_plausible(dataset):
    root, _ = dataset
    for row in read_split(root):
        motion, *_ = load(root, row["id"])
        poses, trans = motion["poses"].astype(np.float64), motion["trans"]
        assert np.isfinite(poses).all() and np.isfinite(trans).all() and np.isfinite(motion["expressions"]).all()
        angles = np.linalg.norm(poses.reshape(len(poses), 55, 3), axis=2)
        assert angles.max() < 2.6  # below pi (v3's largest strokes reach 2.25): axis-angle and 6D stay well conditioned
        assert np.abs(poses[:, 69:75]).max() == 0.0  # eyes
        assert np.abs(np.diff(poses, axis=0)).max() < 0.36  # rad per frame (the real BEAT2 sample's largest step)
        assert np.abs(np.diff(poses, 2, axis=0)).max() < 0.15
        assert np.abs(np.diff(trans, axis=0)).max() < 0.01  # m per frame: feet stay in contact
        arm_speed = np.abs(np.diff(poses[:, ARM_DIMS], axis=0)).mean()
        leg_speed = np.abs(np.diff(poses[:, np.r_[3:9, 12:18]], axis=0)).mean()
        assert leg_speed < 0.2 * arm_speed


def test_speakers_differ(dataset):
    root, _ = dataset
    rest = {}
    for row in read_split(root):
        motion, *_ = load(root, row["id"])
        rest.setdefault(row["id"].split("_")[0], []).append((motion["betas"], np.median(motion["poses"], axis=0)))
    (betas_a, pose_a), (betas_b, pose_b) = rest["2"][0], rest["4"][0]
    assert np.abs(betas_a - betas_b).max() > 0.1
    assert np.abs(pose_a - pose_b)[ARM_DIMS].max() > 0.05
    assert np.allclose(rest["2"][0][0], rest["2"][1][0])  # one body per speaker


def test_cli_and_bad_preset(dataset, capsys, tmp_path):
    root, _ = dataset
    main(["--out", str(root), "--preset", "test"])  # already complete: prints the summary only
    printed = capsys.readouterr().out
    assert "train" in printed and "test" in printed and str(root) in printed
    with pytest.raises(ValueError, match="preset"):
        write_demo_dataset(tmp_path / "x", preset="huge")
    # A directory it did not write (real data, say) is refused and left as it was.
    foreign = tmp_path / "beat2" / "smplxflame_30"
    foreign.mkdir(parents=True)
    (foreign / "2_scott_0_1_1.npz").write_bytes(b"real")
    with pytest.raises(ValueError, match="not written by"):
        write_demo_dataset(tmp_path / "beat2", preset="test")
    assert [p.name for p in foreign.iterdir()] == ["2_scott_0_1_1.npz"]


def test_topics_and_gesture_lexicon(dataset):
    """Recordings draw their content words from their topic, and a speaker makes the same stroke for the same word
    wherever it is said: the motion can be learned from the words, and recordings on other topics look different."""
    from dataloaders.synthetic import SPEAKERS, TOPICS, topic_words, word_gesture
    content = {w for w, _, is_content in VOCAB if is_content}
    topics = [topic_words(0, k) for k in range(1, TOPICS + 1)]
    assert set().union(*topics) == content and sum(len(t) for t in topics) == len(content)  # a partition
    root, _ = dataset
    for row in read_split(root):
        *_, tier = load(root, row["id"])
        k = int(row["id"].split("_")[-1])
        said = {iv.mark for iv in tier if iv.mark} & content
        assert said and said <= topic_words(0, k)
    style = SPEAKERS[2]
    a, b = word_gesture("music", style, 2, 0), word_gesture("music", style, 2, 0)
    assert np.array_equal(a["direction"], b["direction"]) and a["hand"] == b["hand"]
    forms = {tuple(word_gesture(w, style, 2, 0)["direction"]) for w in content}
    assert len(forms) == len(content)  # one stroke per word


def test_demo_preset_holds_out_enough_recordings():
    """The demo scores its model on held-out recordings of its training speaker (2): enough of them, one per topic in
    the test split, so that the demo's table does not hang on which one or two recordings were held out."""
    from dataloaders.synthetic import TOPICS, sequence_plan
    plan = sequence_plan(0, "demo")
    held = {split: [p for p in plan if p[1] == split and p[2] == 2] for split in ("val", "test")}
    assert len(held["val"]) >= 4 and len(held["test"]) >= TOPICS
    assert sorted((int(p[0].split("_")[-1]) - 1) % TOPICS for p in held["test"]) == list(range(TOPICS))
    assert all(20.0 <= p[3] <= 30.0 for p in plan)
