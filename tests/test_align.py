"""Word alignment without MFA (issue 15): dataloaders/align.py against the real sample's MFA TextGrid, its text
handling, bad input, --dataset on a custom dataset that then goes through test.py, and infer.py's automatic words."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dataloaders import align
from dataloaders.beat2 import read_audio, read_motion, read_words, write_motion
from utils.log import get_logger
from test_generate import SMALL, random_weights_setup  # noqa: E402  (the generation tests' tiny random models)

pytest.importorskip("pocketsphinx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "run_scripts"))
from eval_align import frame_agreement, onset_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ID = "2_scott_0_1_1"


def run_module(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dataloaders.align", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def engine():
    return align.PocketSphinx()


@pytest.fixture(scope="module")
def sample(beat2_sample):
    y = read_audio(beat2_sample / "wave16k" / f"{SAMPLE_ID}.wav")
    return y, read_words(beat2_sample / "textgrid" / f"{SAMPLE_ID}.TextGrid")


@pytest.fixture(scope="module")
def sample_run(sample, engine):
    """One alignment of the whole sample with the MFA TextGrid's words as the transcript (its times unused); the
    result also holds what the recogniser heard without the transcript."""
    y, reference = sample
    return align.align_audio(y, [w for _, _, w in reference if w], engine, name="sample")


# ------------------------------------------------------------------------------------------------ real sample

def test_recognition_against_mfa(sample, sample_run):
    """Without a transcript (measured: recall@0.2 0.698, precision@0.2 0.781, frames 0.724)."""
    y, reference = sample
    scores = onset_scores(reference, sample_run.heard)
    assert scores["recall@0.2"] >= 0.64 and scores["precision@0.2"] >= 0.74, scores
    assert frame_agreement(reference, sample_run.heard, len(y) / 16000) >= 0.67


def test_forced_alignment_against_mfa(sample, sample_run):
    """With the transcript (measured: recall@0.1 0.965, frames 0.905); every word placed, in order."""
    y, reference = sample
    words = [w for _, _, w in reference if w]
    assert [w for _, _, w in sample_run.words] == words
    assert onset_scores(reference, sample_run.words)["recall@0.1"] >= 0.92
    assert frame_agreement(reference, sample_run.words, len(y) / 16000) >= 0.85
    assert sample_run.agreement > 0.6 and not sample_run.warnings


def test_long_audio_in_chunks(sample, sample_run, engine, monkeypatch):
    """Decoded in pieces of at most 20 s: the cuts fall in pauses, and the transcript, split across them by the
    recognised words, is still aligned as well (the recognition of the shared run is reused)."""
    y, reference = sample
    monkeypatch.setattr(align, "CHUNK_SECONDS", 20.0)
    bounds = align.chunk_bounds(y)
    assert len(bounds) >= 4 and bounds[0][0] == 0 and bounds[-1][1] == len(y)
    assert all(b - a <= 20 * 16000 for a, b in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    words = [w for _, _, w in reference if w]
    warnings = []
    placed, _ = align._force_align(y, words, sample_run.heard, engine, "sample", warnings)
    assert [w for _, _, w in placed] == words and not warnings
    assert onset_scores(reference, placed)["recall@0.1"] >= 0.92


def test_numbers_and_unknown_words_are_placed(sample, engine):
    """'1st' is spelt out, 'weekendz' is not in the dictionary: both are still aligned where they are spoken."""
    y, reference = sample
    end = next(e for _, e, w in reference if w == "relaxing")
    result = align.align_audio(y[:int((end + 0.3) * 16000)], align.normalise_transcript(
        "The 1st thing I like to do, on weekendz, is relaxing."), engine)
    got = {w: s for s, _, w in result.words}
    assert [w for _, _, w in result.words] == "the first thing i like to do on weekendz is relaxing".split()
    truth = {w: s for s, _, w in reference}
    assert abs(got["first"] - truth["first"]) < 0.1 and abs(got["weekendz"] - truth["weekends"]) < 0.1


def test_mismatched_transcript_warns_with_score(sample, engine):
    y, _ = sample
    words = "purple elephants dance quietly under seven moons".split()
    result = align.align_audio(y[:5 * 16000], words, engine, name="clip")
    assert [w for _, _, w in result.words] == words  # never dropped
    assert any("does not seem to match" in w and "score" in w for w in result.warnings), result.warnings


# ------------------------------------------------------------------------------------------------ text, tiers

def test_normalise_transcript():
    text = "I've got 5 cats & 21 dogs; in 1998 it was 3.5% -- well-known \u201cfacts\u201d, the 2nd time. 2,500!"
    assert align.normalise_transcript(text) == (
        "i've got five cats and twenty one dogs in nineteen ninety eight it was three point five percent well known "
        "facts the second time two thousand five hundred").split()
    assert align.number_words(1_000_017) == "one million seventeen".split()


def test_letter_to_sound_gives_known_phones(engine):
    for word in ("mambatalk", "zxqv", "smplx", "a"):
        phones = align.letter_to_sound(word).split()
        assert phones and all(p.isalpha() and p.isupper() for p in phones)
    engine.pronounce("xyzzyqt")  # added to the aligner's dictionary without error
    assert engine.aligner.lookup_word("xyzzyqt") is not None


def test_tidy_keeps_every_word():
    words = [(1.0, 1.0, "a"), (0.9, 1.2, "b"), (1.1, 1.1, "c"), (2.99, 3.5, "d")]
    out = align.tidy(words, 3.0)
    assert [w for _, _, w in out] == ["a", "b", "c", "d"]
    assert all(e > s for s, e, _ in out) and all(out[i][1] <= out[i + 1][0] for i in range(len(out) - 1))
    assert out[-1][1] <= 3.0 and out[0][0] >= 0.0


def test_textgrid_layout(tmp_path):
    path = align.write_textgrid(tmp_path / "x.TextGrid", [(0.5, 0.8, "hello"), (0.8, 1.1, "world")], 2.0)
    words = read_words(path)
    assert words == [(0.0, 0.5, ""), (0.5, 0.8, "hello"), (0.8, 1.1, "world"), (1.1, 2.0, "")]
    empty = read_words(align.write_textgrid(tmp_path / "e.TextGrid", [], 2.0))
    assert empty == [(0.0, 2.0, "")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.TextGrid", "x.TextGrid"]


# ------------------------------------------------------------------------------------------------ bad input

def test_no_speech_gives_empty_tier(engine):
    rng = np.random.default_rng(0)
    for y in (np.zeros(3 * 16000, np.float32), 0.1 * rng.standard_normal(3 * 16000).astype(np.float32)):
        result = align.align_audio(y, None, engine, name="quiet.wav")
        assert result.words == [] and "no speech" in result.warnings[0]


def test_cli_unreadable_file_writes_nothing(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000, np.float32), 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "out"
    r = run_module(good, corrupt, "--out_dir", out)
    assert r.returncode == 2 and "corrupt.wav" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        align.read_transcript(tmp_path / "missing.txt")


def test_whisper_absent():
    import importlib.util
    if importlib.util.find_spec("faster_whisper") is not None:
        pytest.skip("faster-whisper is installed")
    with pytest.raises(ValueError, match="pip install faster-whisper"):
        align.load_engine("whisper")
    assert isinstance(align.load_engine("auto"), align.PocketSphinx)


# ------------------------------------------------------------------------------------------------ custom dataset

@pytest.fixture(scope="module")
def custom_dataset(beat2_sample, tmp_path_factory):
    """Two 6-s recordings (motion + 16-bit PCM wav at 44.1 kHz stereo) and a csv, no TextGrids, filled by
    `python -m dataloaders.align --dataset`; random stage-1, FGD and MambaTalk weights to run test.py with."""
    tmp = tmp_path_factory.mktemp("custom")
    data = tmp / "data"
    for sub in ("smplxflame_30", "wave16k", "weights"):
        (data / sub).mkdir(parents=True)
    motion = read_motion(beat2_sample / "smplxflame_30" / f"{SAMPLE_ID}.npz")
    y = read_audio(beat2_sample / "wave16k" / f"{SAMPLE_ID}.wav")
    from scipy.signal import resample_poly
    rows = [("2_scott_0_91_91", "train", 0), ("2_scott_0_92_92", "test", 10)]
    for fid, _, t0 in rows:
        f = slice(t0 * 30, (t0 + 6) * 30)
        write_motion(data / "smplxflame_30" / f"{fid}.npz", motion["betas"], motion["poses"][f],
                     motion["expressions"][f], motion["trans"][f])
        clip = resample_poly(y[t0 * 16000:(t0 + 6) * 16000], 441, 160)
        sf.write(data / "wave16k" / f"{fid}.wav", np.stack([clip, clip], 1), 44100, subtype="PCM_16")
    mean_vel = "mean_vel_smplxflame_30.npy"
    (data / "weights" / mean_vel).symlink_to(beat2_sample / "weights" / mean_vel)
    (data / "train_test_split.csv").write_text("id,type\n" + "".join(f"{i},{t}\n" for i, t, _ in rows))
    assert len(align.main(["--dataset", str(data), "--engine", "pocketsphinx"])) == 2  # the CLI, in this process
    args, _ = random_weights_setup(data, tmp)
    return args, data, tmp


def test_dataset_filled_then_tested(custom_dataset, beat2_sample):
    from test import run_test
    args, data, tmp = custom_dataset
    grids = sorted((data / "textgrid").glob("*"))
    assert [g.name for g in grids] == ["2_scott_0_91_91.TextGrid", "2_scott_0_92_92.TextGrid"]
    reference = [(s - 10, e - 10, w) for s, e, w in read_words(beat2_sample / "textgrid" / f"{SAMPLE_ID}.TextGrid")
                 if 10 <= s and e <= 16]
    words = read_words(grids[1])
    assert words[0][0] == 0.0 and abs(words[-1][1] - 6.0) < 1e-3
    assert onset_scores(reference, words)["recall@0.2"] >= 0.35  # 6 s starting mid-sentence: measured 0.47
    assert align.fill_dataset(data) == []  # nothing left to do: the TextGrids are kept
    report, out_dir = run_test(args, out_dir=str(tmp / "test_out"))
    poses = np.load(Path(out_dir) / "res_2_scott_0_92_92.npz")["poses"]
    assert poses.shape == (180, 165) and np.isfinite(poses).all()
    assert np.isfinite(report["metrics"]["fgd"])


def test_infer_aligns_words(custom_dataset, tmp_path, capsys):
    import infer
    args, data, tmp = custom_dataset
    wav, out = data / "wave16k" / "2_scott_0_92_92.wav", tmp_path / "res.npz"
    argv = ["--config", str(ROOT / "configs/demo/mambatalk.yaml"), "--audio", str(wav), "--out", str(out),
            "--align_engine", "pocketsphinx"]
    for k in ("data_path", "data_path_1", "out_path", "cache_path", "root_path", "e_path", "test_ckpt", *SMALL):
        argv += [f"--{k}", str(getattr(args, k))]
    try:
        infer.main(argv)
    finally:  # main() logs to the captured stderr of this test: leave no handler bound to it
        for handler in list(get_logger().handlers):
            get_logger().removeHandler(handler)
    err = capsys.readouterr().err
    assert np.load(out)["poses"].shape == (180, 165)
    words = read_words(tmp_path / "res.TextGrid")
    n = len([w for _, _, w in words if w])
    assert n > 5 and f"of {n} spoken words are in the model's vocabulary" in err
    assert words == read_words(data / "textgrid" / "2_scott_0_92_92.TextGrid")  # the same words as --dataset made
