"""Motion from a speech recording alone.

    python infer.py --audio speech.wav [--textgrid words.TextGrid] [--speaker 2] [--seed_pose pose.npz] \
        --out result.npz [--config configs/mambatalk.yaml] [--ckpt pretrained/mambatalk_100.bin] [--key value ...]

Any wav format, sample rate and channel count (resampled to 16 kHz mono). The TextGrid (a Montreal Forced Aligner
`words` tier) is optional: without it every frame gets the token a silence gets in training, so the model gestures
from the audio alone and loses the word cue. Generation runs the same windowed code as test.py, seeded like it with
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
    p.add_argument("--speaker", type=int, default=2, help="BEAT2 speaker number whose style to use (default 2, scott)")
    p.add_argument("--seed_pose", default="", help="npz whose first frames seed the first window (optional)")
    p.add_argument("--ckpt", default="", help="MambaTalk weights (default: the config's test_ckpt)")
    p.add_argument("--config", "-c", default="configs/mambatalk.yaml")
    p.add_argument("--export", nargs="+", default=[], choices=FORMATS,
                   help="also write the result as these animation files beside it (see export.py)")
    own, rest = p.parse_known_args(argv)
    args = parse_args(["--config", own.config] + rest)
    return own, args


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
        word = torch.from_numpy(word_indices(words, n_frames, vocab).astype(np.int64))
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
    get_logger().info(f"wrote {own.out}: {result['poses'].shape[0]} frames ({result['poses'].shape[0] / FPS:.2f} s)")
    if own.export:
        export_motion(own.out, own.export, out_dir, load_body_model(args))
    return own.out


if __name__ == "__main__":
    run_cli(main)
