"""Metric functions on hand-made cases with known answers (spec §8, §10.3 #2-#5)."""
import math

import numpy as np
import pytest
import torch

from utils.metric import (L1DiversityAccumulator, beat_consistency, beat_consistency_dataset, bc_audio_window,
                          face_lvd, face_vertex_mse, fgd_features, frechet_distance, frechet_distance_from_stats,
                          l1_diversity, motion_beat_times, paper_scaled, weighted_mean)

FPS, SR = 30, 16000


# ----------------------------------------------------------------------------------------------------------- FGD

def closed_form_diag(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


@pytest.mark.parametrize("compat", [True, False])
def test_fgd_identical_sets_is_zero(compat):
    a = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    assert abs(frechet_distance(a, a, compat=compat)) < 1e-6


@pytest.mark.parametrize("compat", [True, False])
def test_fgd_from_stats_matches_closed_form_for_diagonal_gaussians(compat):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    got = frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2), compat=compat)
    assert got == pytest.approx(closed_form_diag(mu1, s1, mu2, s2), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("compat", [True, False])
def test_fgd_of_shifted_gaussian_samples_approaches_closed_form(compat):
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
    a = mu1 + np.sqrt(s1) * rng.standard_normal((200_000, 4))
    b = mu2 + np.sqrt(s2) * rng.standard_normal((200_000, 4))
    expected = closed_form_diag(mu1, s1, mu2, s2)  # 5.25 + 0.4018...
    assert frechet_distance(a, b, compat=compat) == pytest.approx(expected, rel=0.01)


def test_fgd_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 240)).astype(np.float32)
    b = rng.standard_normal((12, 240)).astype(np.float32) + 0.1
    for compat in (True, False):
        value = frechet_distance(a, b, compat=compat)
        assert np.isfinite(value) and value > 0
    assert abs(frechet_distance(a, a, compat=False)) < 1e-6


def test_fgd_compat_returns_sentinel_for_complex_sqrtm():
    # not a valid covariance product: sqrtm(diag(1, -1)) has imaginary part 1 on the diagonal
    mu = np.zeros(2)
    assert frechet_distance_from_stats(mu, np.diag([1.0, -1.0]), mu, np.eye(2), compat=True) == 1e10


def test_fgd_bad_shapes_raise():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


class Pool16Encoder(torch.nn.Module):
    """Stand-in for VAESKConv.encoder: a linear map to 240-D, averaged over each 16 frames."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(330, 240)

    def map2latent(self, x):
        b, t, _ = x.shape
        return self.proj(x).reshape(b, t // 16, 16, 240).mean(dim=2)


def test_fgd_features_truncate_to_clip_len_and_flatten():
    model = Pool16Encoder().eval()
    poses = np.random.default_rng(4).standard_normal((70, 330)).astype(np.float32)
    feats = fgd_features(model, poses)
    assert feats.shape == (4, 240)  # 70 -> 64 frames -> 4 latents
    with torch.no_grad():
        expected = model.map2latent(torch.from_numpy(poses[None, :64])).reshape(-1, 240).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    batched = torch.from_numpy(np.stack([poses[:40], poses[10:50]]))
    assert fgd_features(model, batched).shape == (4, 240)  # 2 sequences x 32 frames x 2 latents
    assert fgd_features(model, poses[:31]).shape == (0, 240)


# ------------------------------------------------------------------------------------------------- L1 diversity

def test_l1_diversity_known_values():
    assert l1_diversity(np.full((10, 165), 0.7)) == pytest.approx(0.0, abs=1e-12)
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])  # |dev| 1 per frame in col 0, 2 in col 1
    assert l1_diversity(x) == pytest.approx(3.0)
    joints = np.random.default_rng(5).standard_normal((20, 55, 3))
    assert l1_diversity(joints) == pytest.approx(l1_diversity(joints.reshape(20, 165)))
    acc = L1DiversityAccumulator()
    acc.add(x)
    acc.add(np.zeros((2, 2)))
    assert acc.score() == pytest.approx(12.0 / 6)  # sums over sequences / total frames
    with pytest.raises(ValueError, match="l1_diversity"):
        l1_diversity(np.zeros((0, 6)))


# ------------------------------------------------------------------------------------------- beat consistency

def beat_motion(n=300, beat_phase=15, period=30, still_until=0):
    """(n, 55, 3) joints moving along x with speed 1 + 0.5 cos(...) (central differences), minima exactly on frames
    beat_phase + k * period; optionally frozen before frame still_until."""
    w = 2 * math.pi / period
    t = np.arange(n, dtype=np.float64)
    amplitude = 0.5 / FPS / math.sin(w)  # central difference of A sin(w t) is A sin(w) / dt * cos(w t)
    x = t / FPS + amplitude * np.sin(w * (t - beat_phase + period / 2))
    x[:still_until] = x[still_until]
    joints = np.zeros((n, 55, 3))
    joints[:, :, 0] = x[:, None]
    return joints


ONSETS = np.arange(0.5, 6.0, 1.0)  # frames 75, 105, ..., 225 counted from frame 60
MEAN_VEL = np.ones(55)


@pytest.mark.parametrize("compat", [True, False])
def test_bc_is_one_when_motion_beats_sit_on_onsets(compat):
    bc, weight = beat_consistency(beat_motion(), None, MEAN_VEL, audio_onsets=ONSETS, compat=compat)
    assert bc == pytest.approx(1.0, abs=1e-12)
    assert weight == 300 - 120


@pytest.mark.parametrize("compat", [True, False])
def test_bc_drops_when_motion_beats_shift_by_0_3_s(compat):
    bc, _ = beat_consistency(beat_motion(beat_phase=15 + 9), None, MEAN_VEL, audio_onsets=ONSETS, compat=compat)
    assert bc == pytest.approx(math.exp(-0.5), abs=1e-9)  # every onset is 0.3 s from its nearest beat


def test_bc_compat_checks_beats_in_the_wrong_frame():
    # frozen for the first 90 frames: compat tests beat j (counted from frame 60) against the speed at frame j,
    # so it drops the beats at 1.5 s and 2.5 s (frames 105, 135 -> j = 45, 75, where the body is still)
    joints = beat_motion(still_until=90)
    fixed, compat = (motion_beat_times(joints, MEAN_VEL, compat=c)[0] for c in (False, True))
    np.testing.assert_allclose(fixed, [1.5, 2.5, 3.5, 4.5, 5.5])  # the 0.5 s minimum is inside the frozen part
    assert len(compat) > 0 and compat.min() > 3.0


def test_bc_compat_sees_absolute_deviation_from_mean():
    # steady walk: no speed minima in positions, but |x - mean| has a V at the middle frame, which compat
    # keeps (its speed is 0 there, yet the beat is checked at frame 150 - 60 = 90, where the speed is 1)
    joints = np.zeros((301, 55, 3))
    joints[:, :, 0] = np.arange(301.0)[:, None]
    mean_vel = np.full(55, 30.0)  # 1 unit per frame at 30 fps
    assert all(len(b) == 0 for b in motion_beat_times(joints, mean_vel, compat=False))
    for beats in motion_beat_times(joints, mean_vel, compat=True):
        np.testing.assert_allclose(beats, [3.0])


def test_bc_audio_window_published_and_fixed():
    n = 300  # int(16000/30*300) = 160000 samples of motion-aligned audio
    # audio tail beyond the motion: 5000 samples -> end bound 165000 - 32000 = 133000, trimmed by 2 s - 5000
    assert bc_audio_window(165_000, n, compat=True) == (32_000, 133_000)
    # tail of 2.5 s -> the end bound lies past the cut, so only the start is trimmed
    assert bc_audio_window(200_000, n, compat=True) == (32_000, 160_000)
    # audio shorter than the motion: the cut is the whole audio, end bound from it
    assert bc_audio_window(150_000, n, compat=True) == (32_000, 118_000)
    assert bc_audio_window(40_000, n, compat=True) == (32_000, 32_000)  # empty
    for n_audio in (165_000, 200_000):
        assert bc_audio_window(n_audio, n, compat=False) == (32_000, 128_000)


def click_track(n_samples, click_times):
    rng = np.random.default_rng(6)
    audio = 0.001 * rng.standard_normal(n_samples).astype(np.float32)
    for t in click_times:
        i = int(t * SR)
        audio[i:i + 320] += 0.8 * rng.standard_normal(320).astype(np.float32)  # 20 ms noise burst
    return audio


@pytest.mark.parametrize("compat", [True, False])
def test_bc_with_librosa_onsets_of_a_click_track(compat):
    # clicks 2.5 s, 3.5 s, ... from the audio start = 0.5 s, 1.5 s, ... into the BC window; 3 s of audio tail
    audio = click_track(int(SR / FPS * 300) + 3 * SR, 2.0 + ONSETS)
    on_beat, _ = beat_consistency(beat_motion(), audio, MEAN_VEL, compat=compat)
    off_beat, _ = beat_consistency(beat_motion(beat_phase=24), audio, MEAN_VEL, compat=compat)
    assert on_beat > 0.95  # onset times are quantised to 32 ms hops
    assert off_beat < on_beat - 0.2


def test_bc_unscorable_sequences_drop_out_of_the_dataset_mean():
    assert beat_consistency(beat_motion(n=120), None, MEAN_VEL, audio_onsets=ONSETS)[1] == 0
    bc, weight = beat_consistency(beat_motion(), np.zeros(SR * 12, np.float32), MEAN_VEL)  # silence: no onsets
    assert math.isnan(bc) and weight == 0
    assert beat_consistency_dataset([(1.0, 180), (0.5, 60), (bc, weight)]) == pytest.approx((180 + 30) / 240)
    assert math.isnan(weighted_mean([]))


def test_bc_bad_input_raises():
    with pytest.raises(ValueError, match="audio_16k or audio_onsets"):
        beat_consistency(beat_motion(), None, MEAN_VEL)
    with pytest.raises(ValueError, match="mean_vel"):
        beat_consistency(beat_motion(), None, np.ones(54), audio_onsets=ONSETS)


# -------------------------------------------------------------------------------------------------------- face

def test_face_mse_and_lvd_known_values():
    tar = np.random.default_rng(7).standard_normal((4, 50, 3))
    assert face_vertex_mse(tar, tar) == 0.0
    assert face_lvd(tar, tar, compat=True) == 0.0 and face_lvd(tar, tar, compat=False) == 0.0
    shifted = tar + 0.5
    assert face_vertex_mse(shifted, tar) == pytest.approx(0.25)
    assert face_lvd(shifted, tar, compat=False) == pytest.approx(0.0, abs=1e-12)  # same velocities
    assert face_lvd(shifted, tar, compat=True) == pytest.approx(0.5)  # rec[t+1] - tar[t] sees the offset
    drift = tar + 0.1 * np.arange(4)[:, None, None]
    assert face_lvd(drift, tar, compat=False) == pytest.approx(0.1)
    assert face_lvd(drift, tar, compat=True) == pytest.approx(np.mean([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="face_lvd"):
        face_lvd(tar[:1], tar[:1])
    with pytest.raises(ValueError, match="face_vertex_mse"):
        face_vertex_mse(tar, tar[:, :10])


def test_paper_scaled():
    raw = dict(fgd=0.5366, bc=0.781, l1div=13.05, face_mse=7.63e-8, face_lvd=1e-5, n_files=3)
    scaled = paper_scaled(raw)
    assert scaled == pytest.approx(dict(fgd=5.366, bc=7.81, l1div=13.05, face_mse=7.63, face_lvd=1.0))
