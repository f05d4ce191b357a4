"""Word alignment (dataloaders/align.py) against a reference TextGrid (the BEAT2 sample's, made by the Montreal
Forced Aligner): onset recall within 0.1 s and 0.2 s, precision, frame agreement at 30 fps, compute per second of audio.

    python run_scripts/eval_align.py [--wav W.wav --reference R.TextGrid] [--engine pocketsphinx] [--mode both]

Defaults to the shared sample. The reference is never an input except, in `transcript` mode, for its words (its
times are not used). Targets (issue 15): with the transcript recall@0.1 s >= 0.90; without it recall@0.2 s >= 0.65
and precision >= 0.75; at most 0.5 s of compute per second of audio.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders import align  # noqa: E402
from dataloaders.align import align_audio, load_engine  # noqa: E402
from dataloaders.beat2 import read_audio, read_words  # noqa: E402
from utils.log import setup_logging  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "beat2_sample"


def onset_matches(reference, hypothesis, tol):
    """How many reference words have their own hypothesis word (same text) starting within tol seconds
    (one-to-one, closest pairs first). Silences (empty marks) are not words."""
    ref = [(s, w) for s, _, w in reference if w.strip()]
    hyp = [(s, w) for s, _, w in hypothesis if w.strip()]
    pairs = sorted((abs(rs - hs), i, j) for i, (rs, rw) in enumerate(ref) for j, (hs, hw) in enumerate(hyp)
                   if rw == hw and abs(rs - hs) <= tol)
    used_ref, used_hyp = set(), set()
    for _, i, j in pairs:
        if i not in used_ref and j not in used_hyp:
            used_ref.add(i)
            used_hyp.add(j)
    return len(used_ref), len(ref), len(hyp)


def onset_scores(reference, hypothesis):
    """{recall@0.1, recall@0.2, precision@0.2 (share of hypothesis words matched within 0.2 s)}."""
    out = {}
    for tol in (0.1, 0.2):
        n, n_ref, n_hyp = onset_matches(reference, hypothesis, tol)
        out[f"recall@{tol}"] = n / max(1, n_ref)
        out[f"precision@{tol}"] = n / max(1, n_hyp)
    return out


def frame_words(words, n_frames, fps=30):
    """The word under each frame's time ('' where no word: a silence counts as a word)."""
    t = np.arange(n_frames) / fps
    out = np.full(n_frames, "", dtype=object)
    for start, end, mark in words:
        out[(t >= start) & (t < end)] = mark.strip()
    return out


def frame_agreement(reference, hypothesis, duration, fps=30):
    n = int(duration * fps)
    return float((frame_words(reference, n, fps) == frame_words(hypothesis, n, fps)).mean())


def evaluate(wav, reference_path, engine_name="pocketsphinx", modes=("recognise", "transcript")):
    y = read_audio(wav)
    duration = len(y) / 16000
    reference = read_words(reference_path)
    engine = load_engine(engine_name)
    rows = {}
    for mode in modes:
        transcript = [w.lower() for _, _, w in reference if w.strip()] if mode == "transcript" else None
        t0, w0 = time.process_time(), time.perf_counter()
        result = align_audio(y, transcript, engine, name=str(wav))
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        rows[mode] = {**onset_scores(reference, result.words),
                      "frames": frame_agreement(reference, result.words, duration),
                      "cpu_s_per_s": cpu / duration, "wall_s_per_s": wall / duration, "n_words": len(result.words)}
    return rows, duration


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wav", default=str(SAMPLE / "wave16k" / "2_scott_0_1_1.wav"))
    p.add_argument("--reference", default=str(SAMPLE / "textgrid" / "2_scott_0_1_1.TextGrid"))
    p.add_argument("--engine", default="pocketsphinx")
    p.add_argument("--chunk_seconds", type=float, default=0, help="longest decoded piece (default align.CHUNK_SECONDS)")
    p.add_argument("--mode", default="both", choices=("both", "recognise", "transcript"))
    a = p.parse_args()
    setup_logging()
    if a.chunk_seconds:
        align.CHUNK_SECONDS = a.chunk_seconds
    modes = ("recognise", "transcript") if a.mode == "both" else (a.mode,)
    rows, duration = evaluate(a.wav, a.reference, a.engine, modes)
    print(f"{a.wav}: {duration:.1f} s, engine {a.engine}, chunks <= {align.CHUNK_SECONDS:g} s, "
          f"{os.cpu_count()} CPUs visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'mode':<11} {'words':>5} {'rec@0.1':>8} {'rec@0.2':>8} {'prec@0.1':>8} {'prec@0.2':>8} {'frames':>7} "
          f"{'cpu s/s':>8} {'wall s/s':>8}")
    for mode, r in rows.items():
        print(f"{mode:<11} {r['n_words']:>5} {r['recall@0.1']:>8.3f} {r['recall@0.2']:>8.3f} "
              f"{r['precision@0.1']:>8.3f} {r['precision@0.2']:>8.3f} {r['frames']:>7.3f} "
              f"{r['cpu_s_per_s']:>8.3f} {r['wall_s_per_s']:>8.3f}")


if __name__ == "__main__":
    main()
