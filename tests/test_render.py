"""render.py / utils/video.py: a real BEAT2 sequence to an mp4 with sound, options, and bad input."""
import logging
import re
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile

import render
from utils.log import get_logger
from utils.video import load_motion, render_npz, text_mask

REPO_ROOT = Path(__file__).resolve().parents[1]
W, H = 320, 180


def read_video(path):
    """(frames (N, H, W, 3) uint8, metadata, ffmpeg's stream listing)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    listing = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                             capture_output=True, text=True).stderr
    return frames, meta, listing


def write_motion(path, frames, **drop):
    """A small synthetic BEAT2-format npz: the jaw opens and closes, the right arm waves."""
    t = np.arange(frames) / 30.0
    poses = np.zeros((frames, 165), np.float32)
    poses[:, 66] = 0.25 * (1 + np.sin(2 * np.pi * 2 * t))  # jaw
    poses[:, 50] = 0.8 * np.sin(2 * np.pi * t)  # right shoulder
    data = dict(poses=poses, trans=np.zeros((frames, 3), np.float32), betas=np.zeros(300, np.float32),
                expressions=np.zeros((frames, 100), np.float32))
    for key in drop:
        data.pop(key)
    np.savez(path, **data)
    return path


def write_wav(path, seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    soundfile.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def log_messages():
    """Messages logged by the project logger (which may not propagate to the root logger)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = get_logger()
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_render_sample_cli(beat2_sample, tmp_path):
    """The published command line on 3 s of the real sample: 90 frames at 30 fps, audio, moving, not blank."""
    npz = beat2_sample / "smplxflame_30" / "2_scott_0_1_1.npz"
    wav = beat2_sample / "wave16k" / "2_scott_0_1_1.wav"
    out_dir = tmp_path / "render"
    proc = subprocess.run([sys.executable, "render.py", "--npy_path", str(npz), "--wav_path", str(wav),
                           "--save_dir", str(out_dir), "--max_seconds", "3", "--width", str(W), "--height", str(H),
                           "--no_progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    video = out_dir / "2_scott_0_1_1.mp4"
    assert proc.stdout.strip() == str(video)
    assert [p.name for p in out_dir.iterdir()] == [video.name]  # no temp files, no frame images left

    frames, meta, listing = read_video(video)
    assert len(frames) == 90 and meta["fps"] == 30 and meta["size"] == (W, H)
    assert abs(meta["duration"] - 3.0) <= 0.1
    assert re.search(r"Stream #\d+:\d+.*: Audio: aac", listing), listing
    assert frames.std(axis=(1, 2, 3)).min() > 10  # every frame has content, none is blank
    face, body = frames[:, :, :W // 2].astype(float), frames[:, :, W // 2:].astype(float)
    assert np.abs(np.diff(body, axis=0)).mean(axis=(1, 2, 3)).max() > 0.5  # the body moves
    assert np.abs(face - face[0]).mean(axis=(1, 2, 3)).max() > 0.5  # the face (jaw, expressions) moves
    assert "stand-in" in proc.stderr or "SMPL-X" in proc.stderr  # the log says which body was drawn


def test_jaw_moves_in_close_up_and_fps_resampling(tmp_path):
    """The close-up shows the jaw opening (the published one does not); fps 15 keeps the duration."""
    npz = write_motion(tmp_path / "m.npz", frames=30)
    video = render_npz(npz, None, tmp_path, width=W, height=H, fps=15, progress=False)
    frames, meta, listing = read_video(video)
    assert len(frames) == 15 and meta["fps"] == 15 and abs(meta["duration"] - 1.0) <= 0.1
    assert "Audio" not in listing
    face = frames[:, :, :W // 2].astype(float)
    assert np.abs(face - face[0]).mean(axis=(1, 2, 3)).max() > 1.0


def test_ground_truth_side_by_side_and_wav_padding(tmp_path, log_messages):
    npz = write_motion(tmp_path / "result.npz", frames=30)
    gt = tmp_path / "gt.npz"
    still = dict(np.load(npz))
    still["poses"] = np.zeros_like(still["poses"])
    np.savez(gt, **still)
    wav = write_wav(tmp_path / "short.wav", 0.5)
    video = render_npz(npz, wav, tmp_path / "out", width=W, height=H, gt_npz=gt, translation=True, progress=False)
    assert video.name == "result.mp4"
    assert any("padded with silence" in m for m in log_messages)
    frames, meta, listing = read_video(video)
    assert len(frames) == 30 and abs(meta["duration"] - 1.0) <= 0.1 and "Audio" in listing
    left, right = frames[:, :, :W // 2].astype(float), frames[:, :, W // 2:].astype(float)
    assert np.abs(np.diff(left, axis=0)).mean() < np.abs(np.diff(right, axis=0)).mean()  # still gt, moving result


def test_close_up_head_frame_holds_the_head_still(beat2_sample):
    """Seen from the head frame the skull stays put while the real motion turns the head around."""
    from utils.body_model import BodyModel
    from utils.video import HEAD_JOINT, MotionMeshes

    body = BodyModel(str(REPO_ROOT / "pretrained" / "smplx_models"))
    meshes = MotionMeshes(load_motion(beat2_sample / "smplxflame_30" / "2_scott_0_1_1.npz"), body, False, 32)
    rest = body(np.zeros((1, 165), np.float32))
    crown = rest["joints"][0, HEAD_JOINT].numpy() + np.array([0, 0.1, 0], np.float32)
    skull = np.linalg.norm(rest["vertices"][0].numpy() - crown, axis=1) < 0.08
    assert skull.sum() > 20
    vertices, _, to_head = meshes.chunk_arrays(np.arange(0, 1800, 60))
    world = vertices[:, skull]
    in_head = np.einsum("nij,nvj->nvi", to_head[:, :3, :3], world) + to_head[:, None, :3, 3]
    assert world.std(axis=0).max() > 0.02  # the head does move in the world ...
    assert in_head.std(axis=0).max() < 0.005  # ... but not in the close-up


def test_text_mask():
    mask = text_mask("Hi!")  # lower case drawn as upper case, unknown '!' as '?'
    assert mask.shape == (7, 17) and mask.any()
    assert np.array_equal(mask[:, 6:11], text_mask("I"))


def test_load_motion_defaults(tmp_path):
    motion = load_motion(write_motion(tmp_path / "m.npz", frames=5, trans=1, betas=1, expressions=1))
    assert motion["poses"].shape == (5, 165) and not motion["trans"].any()
    assert motion["betas"].shape == (300,) and motion["expressions"].shape == (5, 100)


def bad_inputs(tmp_path):
    good_npz = write_motion(tmp_path / "good.npz", frames=10)
    good_wav = write_wav(tmp_path / "good.wav", 0.3)
    no_poses = tmp_path / "no_poses.npz"
    np.savez(no_poses, trans=np.zeros((10, 3)))
    wrong_width = tmp_path / "wrong_width.npz"
    np.savez(wrong_width, poses=np.zeros((10, 156)))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good_npz.read_bytes()[:300])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    return {  # name: (npz, wav, save_dir, exception, text the message must contain)
        "no poses": (no_poses, good_wav, out, ValueError, "no 'poses'"),
        "wrong pose width": (wrong_width, good_wav, out, ValueError, "(10, 156)"),
        "corrupt npz": (corrupt, good_wav, out, ValueError, "not a readable .npz"),
        "missing npz": (tmp_path / "missing.npz", good_wav, out, FileNotFoundError, "not found"),
        "missing wav": (good_npz, tmp_path / "missing.wav", out, FileNotFoundError, "not found"),
        "unwritable output": (good_npz, good_wav, a_file / "sub", PermissionError, "output folder"),
    }


CASES = ["no poses", "wrong pose width", "corrupt npz", "missing npz", "missing wav", "unwritable output"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises(tmp_path, case):
    npz, wav, save_dir, error, text = bad_inputs(tmp_path)[case]
    with pytest.raises(error) as info:
        render_npz(npz, wav, save_dir, width=W, height=H, progress=False)
    message = str(info.value)
    assert text in message
    named = save_dir if case == "unwritable output" else wav if case == "missing wav" else npz
    assert str(named) in message


@pytest.mark.parametrize("case", CASES)
def test_bad_input_cli_exit_code(tmp_path, case, capsys):
    npz, wav, save_dir, _, text = bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as info:
        render.main(["--npy_path", str(npz), "--wav_path", str(wav), "--save_dir", str(save_dir),
                     "--width", str(W), "--height", str(H), "--no_progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("render.py: error:") and text in err and "Traceback" not in err


def test_body_caption_stays_inside_the_first_panel():
    from utils.video import overlay_patches, panel_layout
    for width, height, motions in ((1280, 720, 2), (320, 180, 2), (640, 360, 1)):
        layout = panel_layout(width, motions)
        caption = "body: stand-in body (no SMPL-X model file)"
        patches = overlay_patches(width, height, layout, ["ground truth", "result"][:motions], caption)
        yellow = [(p, x, y) for p, x, y in patches if p.ndim == 3 and (p == (230, 230, 160)).all(-1).any()]
        assert yellow, "no caption drawn"
        assert all(x + p.shape[1] <= layout[0][1] for p, x, _ in yellow), "caption runs into the next panel"
        assert all(y + p.shape[0] <= height for p, _, y in yellow)
        drawn = sum(int((p == (230, 230, 160)).all(-1).sum()) for p, _, _ in yellow)
        assert drawn >= text_mask("stand-in").sum()  # words were drawn, not cut away
