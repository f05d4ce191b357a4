"""Motion from a speech recording alone.

    python infer.py --audio speech.wav [--textgrid words.TextGrid | --transcript words.txt | --words none] \
        [--speaker 2] [--seed_pose pose.npz] --out result.npz [--config configs/mambatalk.yaml] \
        [--ckpt pretrained/mambatalk_100.bin] [--key value ...]

Any wav format, sample rate and channel count (resampled to 16 kHz mono). Word timings come from --textgrid (a
Montreal Forced Aligner `words` tier) when given; otherwise (`--words auto`) they are made from the audio by
dataloaders/align.py (recognised, or force-aligned to --transcript) and written next to the result as
<out>.TextGrid; `--words none` gives every frame the token a silence gets in training.
Generation runs the same windowed code as test.py, seeded like it with
how the training recordings start when the config's dataset is at hand (else the skeleton's rest pose), or with the
first frames of --seed_pose, and is deterministic.
"""
import argparse
import os

import numpy as np
import torch

from dataloaders.beat2 import UNK, audio_features, get_vocab, load_ctc_model, read_audio, read_motion, read_words, word_indices, write_motion
from dataloaders.cache import load_start_pose, load_start_trans
from models.mambatalk import MambaTalk
from trainers.base import resolve_device
from trainers.generate import Sequence, generate, neutral_seed
from trainers.mambatalk import load_frozen_models
from utils.body_model import load_body_model
from utils.checkpoint import load_weights
from utils.config import parse_args
from utils.export_motion import FORMATS, export_motion
from utils.log import get_logger, run_cli, setup_logging
from utils.rotation import axis_angle_to_rot6d
from utils.skeleton import speaker_index

SR, FPS = 16000, 30
SILENCE_PEAK = 1e-3  # a waveform whose peak stays below this holds no speech


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", required=True, help="speech recording (wav, any rate/channels)")
    p.add_argument("--out", required=True, help="result npz (BEAT2 format)")
    p.add_argument("--textgrid", default="", help="word alignment with a 'words' tier (optional)")
    p.add_argument("--words", default="auto", choices=("auto", "none"),
                   help="without --textgrid: auto = align the audio (default), none = silence token on every frame")
    p.add_argument("--transcript", default="", help="text of the speech: force-align these words (optional)")
    p.add_argument("--align_engine", default="auto", choices=("auto", "pocketsphinx", "whisper"),
                   help="aligner for --words auto (see dataloaders/align.py)")
    p.add_argument("--whisper_model", default="base.en", help="faster-whisper model folder or hub name")
    p.add_argument("--speaker", type=int, default=2, help="BEAT2 speaker number whose style to use (default 2, scott)")
    p.add_argument("--seed_pose", default="", help="npz whose first frames seed the first window (optional)")
    p.add_argument("--ckpt", default="", help="MambaTalk weights (default: the config's test_ckpt)")
    p.add_argument("--config", "-c", default="configs/mambatalk.yaml")
    p.add_argument("--export", nargs="+", default=[], choices=FORMATS,
                   help="also write the result as these animation files beside it (see export.py)")
    own, rest = p.parse_known_args(argv)
    args = parse_args(["--config", own.config] + rest)
    return own, args


def textgrid_path(out):
    return os.path.splitext(out)[0] + ".TextGrid"


def auto_words(own, y, n_frames, vocab, log):
    """Word timings made from the audio (dataloaders/align.py) -> per-frame vocabulary indices; the TextGrid is kept
    in own.alignment and written beside the result once generation has succeeded."""
    from dataloaders.align import align_audio, read_transcript
    transcript = read_transcript(own.transcript) if own.transcript else None
    result = align_audio(y, transcript, own.align_engine, name=own.audio, whisper_model=own.whisper_model)
    own.alignment = result
    spoken = [w for _, _, w in result.words]
    how = "force-aligned to the transcript" if transcript is not None else "recognised"
    log.info(f"words ({result.engine}, {how}): {len(spoken)} found: {' '.join(spoken[:12])}"
             f"{' ...' if len(spoken) > 12 else ''}")
    if vocab is None:
        log.warning("no vocabulary (data_path/weights/vocab.pkl or TextGrids) to map the words to: every frame gets "
                    "the silence token")
        return np.full(n_frames, UNK)
    log_vocabulary_coverage(spoken, vocab, log)
    return word_indices(result.words, n_frames, vocab)


def log_vocabulary_coverage(spoken, vocab, log):
    """How many of the recording's words the model knows: unknown words reach it as the unknown-word token."""
    known = sum(w in vocab.word2index for w in spoken)
    log.info(f"{known} of {len(spoken)} spoken words are in the model's vocabulary"
             + (" (the others reach it as one unknown-word token)" if known < len(spoken) else ""))


def load_inputs(own, args, vocab, log):
    y = read_audio(own.audio)
    seconds = len(y) / SR
    n_frames = int(len(y) * FPS // SR)
    if n_frames < args.pre_frames + 1:
        raise ValueError(f"{own.audio}: {seconds:.3f} s of audio is too short to generate motion "
                         f"(needs at least {(args.pre_frames + 1) / FPS:.2f} s)")
    if np.abs(y).max() < SILENCE_PEAK:
        log.warning(f"{own.audio}: the audio is silent (peak {np.abs(y).max():.1e}); the result will be near-static")
    window_seconds = args.pose_length / FPS
    if seconds < window_seconds:
        log.warning(f"{own.audio}: {seconds:.2f} s is shorter than one {args.pose_length}-frame window "
                    f"({window_seconds:.2f} s); generating one padded window")
    audio = torch.from_numpy(audio_features(y, load_ctc_model(args.ctc_model)))
    if own.textgrid:
        words = read_words(own.textgrid)
        end = max((e for _, e, _ in words), default=0.0)
        if end > seconds + 0.5:
            log.warning(f"{own.textgrid}: words run to {end:.2f} s but the audio lasts {seconds:.2f} s; "
                        "words past the end of the audio are ignored")
        log_vocabulary_coverage([w for _, _, w in words if w.strip()], vocab, log)
        word = torch.from_numpy(word_indices(words, n_frames, vocab).astype(np.int64))
    elif own.words == "auto":
        word = torch.from_numpy(auto_words(own, y, n_frames, vocab, log).astype(np.int64))
    else:
        word = torch.full((n_frames,), UNK, dtype=torch.long)
    seed, start_trans, betas = None, None, np.zeros(300, np.float32)
    if own.seed_pose:
        motion = read_motion(own.seed_pose)
        if len(motion["poses"]) < args.pre_frames:
            raise ValueError(f"{own.seed_pose}: needs at least {args.pre_frames} frames to seed generation")
        pose = torch.from_numpy(motion["poses"][:args.pre_frames]).float()
        trans = torch.from_numpy(motion["trans"][:args.pre_frames]).float()
        seed = torch.cat([axis_angle_to_rot6d(pose), trans, torch.ones(args.pre_frames, 4)], dim=-1)
        start_trans, betas = trans[0], motion["betas"]
    else:
        try:
            seed = neutral_seed(args.pre_frames, torch.device("cpu"), load_start_pose(args))
            seed[:, 330:333] = torch.from_numpy(load_start_trans(args))  # where, and how high, the speakers stand
        except (FileNotFoundError, ValueError) as e:
            log.info(f"no training recordings to take a start pose from ({e}); seeding with the rest pose")
    sequence = Sequence(audio=audio, word=word, speaker=speaker_index(own.speaker), n_frames=n_frames,
                        seed=seed, start_trans=start_trans, sample_key=args.random_seed)
    return sequence, betas


def main(argv=None):
    own, args = parse(argv)
    log = setup_logging()
    torch.manual_seed(args.random_seed)
    device = resolve_device(args.device)
    ckpt = own.ckpt or args.test_ckpt
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint {ckpt} not found (give --ckpt; see pretrained/README.md)")
    out_dir = os.path.dirname(os.path.abspath(own.out))
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"cannot write {own.out}: folder {out_dir} is missing or not writable")
    if own.transcript and (own.textgrid or own.words == "none"):
        raise ValueError("--transcript is used to align the audio: it goes with --words auto and no --textgrid")
    own.alignment = None
    try:
        vocab = get_vocab(args)
    except FileNotFoundError:
        if own.textgrid:
            raise
        vocab = None  # no words to map; the checkpoint holds the embeddings
    sequence, betas = load_inputs(own, args, vocab, log)
    model = MambaTalk(args, vocab=vocab, from_checkpoint=True)
    load_weights(model, ckpt)
    model.to(device).eval()
    vq = load_frozen_models(args, device)
    result = generate(model, vq, [sequence], args)[0]
    write_motion(own.out, betas, result["poses"].numpy(), result["expressions"].numpy(), result["trans"].numpy())
    if own.alignment is not None:
        from dataloaders.align import write_textgrid
        write_textgrid(textgrid_path(own.out), own.alignment.words, own.alignment.duration)
        get_logger().info(f"wrote {textgrid_path(own.out)}: the words used")
    get_logger().info(f"wrote {own.out}: {result['poses'].shape[0]} frames ({result['poses'].shape[0] / FPS:.2f} s)")
    if own.export:
        export_motion(own.out, own.export, out_dir, load_body_model(args))
    return own.out


if __name__ == "__main__":
    run_cli(main)
