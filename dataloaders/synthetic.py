"""Embedded demo data: a small synthetic dataset in the exact BEAT2 layout in which the motion follows the speech.

    python -m dataloaders.synthetic --out demo_data [--seed 0] [--preset demo|test] [--force]

Each sequence is a string of words from a small vocabulary (a TextGrid `words` tier with their exact times), its
content words drawn from the recording's topic, a speech-like waveform built from it (syllable pulses of a pitched,
formant-filtered source plus consonant noise bursts, 16 kHz PCM16) and 30 fps SMPL-X motion driven by both: on each
accented syllable the arms make the stroke the speaker uses for that word (a fixed gesture lexicon), its
apex just after the syllable's loudness peak and its size following the loudness, the fingers open with it and the
head may nod; jaw and expression coefficients follow the loudness envelope; a little idle drift, spine sway and
weight shifting is not tied to the speech. Speakers differ in voice, gesture size and forms, handedness and resting
pose. The same seed and preset give the same bytes; a finished dataset is marked by `.complete` and is not
generated again.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, sosfilt, sosfiltfilt
from scipy.spatial.transform import Rotation

from utils.checkpoint import atomic_write

SR = 16000
FPS = 30
VERSION = 4  # bump when the generated content changes, so that old `.complete` dirs are rebuilt

# (word, syllables, content word). Content words carry most of the stress, and so most of the gestures.
VOCAB = [
    ("the", 1, False), ("a", 1, False), ("and", 1, False), ("to", 1, False), ("of", 1, False), ("i", 1, False),
    ("you", 1, False), ("we", 1, False), ("it", 1, False), ("is", 1, False), ("in", 1, False), ("on", 1, False),
    ("that", 1, False), ("but", 1, False), ("so", 1, False), ("with", 1, False), ("my", 1, False),
    ("think", 1, True), ("really", 2, True), ("people", 2, True), ("music", 2, True), ("weekend", 2, True),
    ("important", 3, True), ("different", 3, True), ("always", 2, True), ("never", 2, True), ("family", 3, True),
    ("travel", 2, True), ("morning", 2, True), ("coffee", 2, True), ("friends", 1, True), ("story", 2, True),
    ("beautiful", 3, True), ("remember", 3, True), ("question", 2, True), ("because", 2, True),
    ("something", 2, True), ("together", 3, True), ("great", 1, True), ("love", 1, True), ("work", 1, True),
    ("time", 1, True), ("home", 1, True), ("first", 1, True), ("today", 2, True), ("problem", 2, True),
    ("city", 2, True), ("movie", 2, True), ("happy", 2, True), ("money", 2, True),
]

# Per-speaker style: voice pitch, speaking rate, gesture size, hand preference, nod probability, gesture lag (s),
# resting elbow flexion and arm hang (rad), root height (m).
SPEAKERS = {
    2: dict(name="scott", f0=118.0, rate=1.0, gesture=1.0, p_right=0.5, p_both=0.25, p_nod=0.5, lag=0.07,
            elbow_rest=0.35, arm_hang=1.25, height=1.29),
    4: dict(name="lawrence", f0=100.0, rate=0.9, gesture=0.7, p_right=0.3, p_both=0.45, p_nod=0.7, lag=0.1,
            elbow_rest=0.5, arm_hang=1.3, height=1.33),
}

# Each recording is about one of TOPICS topics: its content words come from that topic's share of the vocabulary, and
# a speaker makes the same stroke on a given word wherever it is said (iconic gestures follow what is talked about;
# letting each topic's words share two forms instead was tried and did worse). So what a speaker does depends on
# what they say, and recordings on different topics look different, as in real data: with every recording drawing on
# one common pool of words and random strokes, nothing a model learns from the speech could bring its motion closer
# to a recording's, in a distribution metric such as FGD, than another recording's motion already is.
TOPICS = 5
# Motion that does not follow the speech (idle drift of arms, head, spine and face; weight shifts; finger jitter),
# as a share of the first version's amounts: small, so that most of the motion can be learned from the speech.
IDLE = 0.3
WEIGHT_SHIFT = 0.3
FINGER_JITTER = 0.03
# Liveliness (version 3): real BEAT2 motion moves about 5x more than version 2 did (mean joint angular speed over spine,
# neck, head, arms and hands: 0.75 rad/s for the shared real sample against 0.10-0.18), mostly in the hands. Version 3
# adds what real speakers do with every syllable, not only on accented words: a small beat of wrist, forearm and
# fingers, so that nearly all of the extra motion follows the speech and can be learned from it.
AROUSAL_SPREAD = 0.4   # per-recording arousal is uniform in 1 +- this
STROKE_SCALE = 1.5     # stroke size, as a multiple of version 2's
BEAT_SIZE = 0.45       # wrist/forearm beat on a syllable of full loudness (rad)
FINGER_OPENING = 0.8   # how far the fingers open on a full stroke (share of their curl; 0.3 in version 2)
FINGER_BEAT = 1.0      # finger flex on a syllable beat (share of their curl)


# Elbow flexion stays in reach of a real elbow (~140 degrees): strokes on loud syllables of an animated recording
# would otherwise add up past it. Below the knee it is untouched; above, it bends smoothly towards the maximum.
ELBOW_KNEE, ELBOW_MAX = 1.8, 2.4


def soft_limit(x, knee, top):
    """x below `knee` as it is; above, knee + (top - knee) * tanh((x - knee) / (top - knee)): smooth, below `top`."""
    span = top - knee
    return np.where(x < knee, x, knee + span * np.tanh((x - knee) / span))


def topic_words(seed, k):
    """The content words of recording k (1-based, counted per speaker): topic (k - 1) % TOPICS of the vocabulary's
    content words, dealt out in a seeded order."""
    content = [w[0] for w in VOCAB if w[2]]
    order = np.random.default_rng([seed, 5]).permutation(len(content))
    return {content[i] for i in order[(k - 1) % TOPICS::TOPICS]}


def word_gesture(word, style, speaker, seed):
    """The gesture a speaker makes on an accented `word`: hand choice (a number in [0, 1) read against the speaker's
    p_right and p_both), stroke direction, width and whether the head nods, fixed per (speaker, word)."""
    rng = np.random.default_rng([seed, 3, speaker, [w[0] for w in VOCAB].index(word)])
    # stroke direction: shoulder forward, shoulder abduction, shoulder twist, elbow flexion, wrist x/z
    direction = np.array([rng.uniform(-0.45, -0.15), rng.uniform(0.0, 0.3), rng.uniform(-0.25, 0.25),
                          rng.uniform(0.4, 0.9), rng.uniform(-0.35, 0.35), rng.uniform(-0.4, 0.4)])
    return dict(hand=rng.random(), direction=direction, sigma=rng.uniform(0.09, 0.15), nod=rng.random() < style["p_nod"])


# Sequences per speaker as (train, val, test) and their length range in seconds. The demo holds out 4 + 5 of speaker
# 2's recordings (version 4; 2 + 2 before): with two test recordings the demo's table was dominated by which two they
# were (the sampling seed alone moved L1 diversity by 15 %); its 5 test recordings are one per topic.
PRESETS = {
    "test": dict(seconds=(12.0, 20.0), splits={2: (4, 1, 1), 4: (1, 0, 0)}),
    "demo": dict(seconds=(20.0, 30.0), splits={2: (10, 4, 5), 4: (2, 1, 1)}),
}

# Joint indices of the 55-joint SMPL-X table (spec §3.1) that the generator moves.
PELVIS, L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 0, 1, 2, 4, 5, 7, 8
SPINE = (3, 6, 9)
NECK, HEAD, JAW = 12, 15, 22
# Arms as (collar, shoulder, elbow, wrist) and the first hand joint (index1, then middle, pinky, ring, thumb, 3 each).
ARMS = {"left": (13, 16, 18, 20), "right": (14, 17, 19, 21)}
HAND_START = {"left": 25, "right": 40}
# Arm angles are designed for the left side; the right side mirrors them by negating the y and z rotations.
MIRROR = {"left": np.array([1.0, 1.0, 1.0]), "right": np.array([1.0, -1.0, -1.0])}

# Formant filter bank: band centres (Hz) and vowel formants F1-F3 (Hz).
BANDS = np.array([300, 450, 600, 800, 1000, 1250, 1600, 2000, 2500, 3000, 3600], dtype=np.float64)
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [300, 2250, 3000], [570, 840, 2410], [320, 900, 2240]],
                  dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------- words

def plan_words(rng, n_cs, rate, topic=None):
    """Random phrases of words on a 10 ms grid (as aligner output is), content words from the set `topic` (None: all).
    Returns a list of dicts, times in centiseconds."""
    words = []
    t = int(rng.integers(30, 90))
    while True:
        for _ in range(int(rng.integers(3, 9))):
            content = rng.random() < 0.6
            choices = [i for i, w in enumerate(VOCAB) if w[2] == content]
            if content and topic is not None:
                choices = [i for i in choices if VOCAB[i][0] in topic]
            word, n_syl, _ = VOCAB[choices[int(rng.integers(len(choices)))]]
            dur = int(np.clip(round(100 * (0.13 + 0.12 * n_syl + rng.uniform(-0.03, 0.06)) / rate), 20, 60))
            if t + dur > n_cs - 40:
                return words
            stressed = rng.random() < (0.7 if content else 0.05)
            words.append(dict(word=word, n_syl=n_syl, start=t, end=t + dur, stressed=stressed))
            t += dur + (0 if rng.random() < 0.6 else int(rng.integers(2, 9)))
        t += int(rng.integers(35, 90))  # phrase pause


def plan_syllables(rng, words):
    """Split every word into syllables: start/end (s), loudness, vowel, consonant onset, and the loudness peak time."""
    syllables = []
    for w in words:
        start, end = w["start"] / 100, w["end"] / 100
        stress_pos = 0 if w["n_syl"] == 1 or rng.random() < 0.7 else int(rng.integers(w["n_syl"]))
        weights = rng.uniform(0.8, 1.2, w["n_syl"])
        weights[stress_pos] *= 1.4
        bounds = start + (end - start) * np.concatenate([[0], np.cumsum(weights) / weights.sum()])
        for k in range(w["n_syl"]):
            s0, s1 = bounds[k], bounds[k + 1]
            is_stress = k == stress_pos
            loud = (rng.uniform(0.85, 1.0) if w["stressed"] else 0.6) if is_stress else rng.uniform(0.4, 0.5)
            cons = min(rng.uniform(0.03, 0.07), 0.35 * (s1 - s0)) if rng.random() < (0.85 if k == 0 else 0.6) else 0.0
            voiced0 = s0 + 0.6 * cons
            syllables.append(dict(start=s0, end=s1, loud=loud, vowel=int(rng.integers(len(VOWELS))), cons=cons,
                                  plosive=rng.random() < 0.5, voiced0=voiced0,
                                  peak=voiced0 + 0.4 * (s1 - voiced0),  # peak of the envelope shape below
                                  accent=is_stress and w["stressed"], word=w["word"]))
    return syllables


# ----------------------------------------------------------------------------------------------------------- audio

def synth_speech(rng, syllables, n_samples, f0, peak=0.5):
    """Speech-like waveform (float32, peak `peak`) for the planned syllables; silence between words is faint noise."""
    t = np.arange(n_samples) / SR
    env_voiced = np.zeros(n_samples)
    env_noise = np.zeros(n_samples)
    for s in syllables:  # a loop over syllables (a few per second); the samples inside are filled by slices
        a, b = int(s["voiced0"] * SR), int(s["end"] * SR)
        u = np.linspace(0.0, 1.0, b - a, endpoint=False)
        env_voiced[a:b] = np.maximum(env_voiced[a:b], s["loud"] * np.sin(np.pi * u ** 0.75) ** 0.8)
        if s["cons"] > 0:
            a, b = int(s["start"] * SR), int((s["start"] + s["cons"]) * SR)
            u = np.linspace(0.0, 1.0, b - a, endpoint=False)
            burst = np.exp(-u * 6.0) if s["plosive"] else np.sin(np.pi * u) ** 2
            env_noise[a:b] = np.maximum(env_noise[a:b], 0.6 * s["loud"] * burst)
    env_voiced = _moving_average(env_voiced, 80)  # 5 ms: no clicks at syllable edges

    # Pitch: declination through the utterance, accents on stressed syllables, slow jitter; 100 Hz control rate.
    tc = np.arange(0.0, n_samples / SR + 0.01, 0.01)
    accents = np.array([s["peak"] for s in syllables if s["accent"]])
    bumps = np.exp(-0.5 * ((tc[None, :] - accents[:, None]) / 0.08) ** 2).sum(0) if len(accents) else 0.0
    drift = gaussian_filter1d(rng.standard_normal(len(tc)), 5.0)
    f0_ctrl = f0 * (1.0 + 0.15 * np.minimum(bumps, 1.0) - 0.08 * np.sin(np.pi * tc / tc[-1]) + 0.2 * drift)
    phase = np.cumsum(np.interp(t, tc, f0_ctrl)) / SR
    source = 2.0 * (phase % 1.0) - 1.0  # sawtooth glottal source: all harmonics

    # Formants: fixed band-pass filters mixed with gains that glide between the vowels of successive syllables.
    mids = np.array([0.5 * (s["voiced0"] + s["end"]) for s in syllables])
    ratio = np.log2(BANDS[None, :, None] / VOWELS[:, None, :])  # (vowel, band, formant)
    vowel_gain = (np.exp(-0.5 * (ratio / 0.2) ** 2) * np.array([1.0, 0.6, 0.3])).sum(-1)  # (vowel, band)
    syl_gain = vowel_gain[[s["vowel"] for s in syllables]]  # (syllable, band)
    voiced = np.zeros(n_samples)
    for band, fc in enumerate(BANDS):
        sos = butter(2, [fc * 0.85, fc * 1.15], btype="bandpass", fs=SR, output="sos")
        voiced += np.interp(t, mids, syl_gain[:, band]) * sosfilt(sos, source) * (fc / 500.0) ** 0.5
    voiced /= np.percentile(np.abs(voiced), 99) + 1e-9

    hiss = sosfilt(butter(4, 2500, btype="highpass", fs=SR, output="sos"), rng.standard_normal(n_samples))
    hiss /= np.abs(hiss).max()
    y = voiced * env_voiced + hiss * env_noise + 0.002 * rng.standard_normal(n_samples)
    return (peak * y / np.abs(y).max()).astype(np.float32)


def loudness_envelope(y, n_frames, window=1024):
    """RMS of `y` in a `window`-sample window centred on each frame time i/FPS."""
    csum = np.concatenate([[0.0], np.cumsum(y.astype(np.float64) ** 2)])
    centre = np.round(np.arange(n_frames) * SR / FPS).astype(np.int64)
    lo = np.clip(centre - window // 2, 0, len(y))
    hi = np.clip(centre + window // 2, 0, len(y))
    return np.sqrt((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1))


def _moving_average(x, n):
    csum = np.concatenate([[0.0], np.cumsum(x)])
    out = (csum[n:] - csum[:-n]) / n
    return np.concatenate([np.full(n // 2, out[0]), out, np.full(len(x) - len(out) - n // 2, out[-1])])


# ---------------------------------------------------------------------------------------------------------- motion

def smooth_noise(rng, n, sigma_s, dims=()):
    """Unit-std low-frequency noise of shape (n, *dims): white noise blurred over `sigma_s` seconds."""
    x = gaussian_filter1d(rng.standard_normal((n, *dims)), sigma_s * FPS, axis=0, mode="reflect")
    return x / (x.std(0, keepdims=True) + 1e-9)


def speaker_shape(speaker, seed):
    """Per-speaker constants: SMPL-X betas and expression loadings (neutral offset, mouth, brows, drift scale)."""
    rng = np.random.default_rng([seed, 1, speaker])
    k = np.arange(100)
    betas = np.zeros(300, dtype=np.float32)
    betas[:16] = rng.normal(0.0, 0.8, 16) * np.exp(-np.arange(16) / 8)
    return dict(betas=betas,
                expr_offset=rng.normal(0.0, 0.25, 100) * np.exp(-k / 20),
                expr_mouth=rng.normal(0.0, 0.6, 100) * np.exp(-k / 8),
                expr_brow=rng.normal(0.0, 0.25, 100) * np.exp(-k / 10),
                expr_drift=0.1 * np.exp(-k / 15),
                rest_jitter=rng.normal(0.0, 0.04, (55, 3)), speaker=speaker, seed=seed)


def synth_motion(rng, words, syllables, env, style, shape):
    """SMPL-X motion for one sequence. `env` is the loudness at each frame. Returns poses (T,165), trans, expressions."""
    n = len(env)
    t = np.arange(n) / FPS
    ang = np.zeros((n, 55, 3))  # rotation angles about x, y, z per joint, composed below as z then x then y
    level = np.clip(env / (np.percentile(env, 95) + 1e-9), 0.0, 1.2)  # loudness, ~0..1

    # Speaking activity: 1 while a phrase goes on, 0 in phrase pauses; lifts the hands into the gesture space.
    talking = np.zeros(n)
    for w in words:
        talking[int(w["start"] * FPS / 100):int(w["end"] * FPS / 100) + 3] = 1.0
    active = np.clip(gaussian_filter1d(talking, 0.35 * FPS), 0.0, 1.0)

    # Strokes: bell-shaped excursions of one or both arms whose apex falls just after an accented syllable's peak, in
    # the form the speaker uses for that word, as large as the syllable is loud.
    chosen = [s for s in syllables if s["accent"]]
    k = len(chosen)
    lexicon = [word_gesture(s["word"], style, shape["speaker"], shape["seed"]) for s in chosen]
    apex = np.array([s["peak"] for s in chosen]) + style["lag"] + rng.uniform(-0.01, 0.01, k)
    sigma = np.array([g["sigma"] for g in lexicon]).reshape(k)
    amp = STROKE_SCALE * style["gesture"] * np.array([s["loud"] for s in chosen]) * rng.uniform(0.9, 1.05, k)
    hand = np.array([g["hand"] for g in lexicon]).reshape(k)
    direction = np.array([g["direction"] for g in lexicon]).reshape(k, 6)
    bump = np.exp(-0.5 * ((t[None, :] - apex[:, None]) / sigma[:, None]) ** 2) * amp[:, None]  # (k, n)
    uses = {"right": (hand < style["p_right"]) | (hand > 1 - style["p_both"]),
            "left": hand >= style["p_right"]}
    strokes = {side: bump[uses[side]].T @ direction[uses[side]] for side in ARMS}  # (n, 6)
    openness = {side: np.clip(bump[uses[side]].sum(0) / STROKE_SCALE, 0.0, 1.2) for side in ARMS}

    # Beats: every voiced syllable gives a quick down-up of the hand (wrist, forearm, fingers), as loud as the
    # syllable, more on the speaker's preferred hand; the sign alternates within a word as a hand bounces.
    peaks = np.array([s["peak"] for s in syllables]) + style["lag"]
    loud = np.array([s["loud"] for s in syllables])
    pulses = np.exp(-0.5 * ((t[None, :] - peaks[:, None]) / 0.08) ** 2) * loud[:, None]  # (syllables, n)
    beat = pulses.sum(0)
    hand_share = {"right": style["p_right"] + style["p_both"], "left": 1.0 - style["p_right"]}
    beats = {side: BEAT_SIZE * style["gesture"] * hand_share[side] / max(hand_share.values()) * beat for side in ARMS}
    finger_gain = np.random.default_rng([shape["seed"], 4, shape["speaker"]]).uniform(0.6, 1.4, 12)

    for side, (collar, shoulder, elbow, wrist) in ARMS.items():
        st, drift = strokes[side], IDLE * smooth_noise(rng, n, 1.0, (4,))
        arm = np.zeros((n, 4, 3))
        arm[:, 0, 2] = 0.05 + 0.03 * drift[:, 0]
        arm[:, 1, 0] = -0.2 * active + st[:, 0] + 0.05 * drift[:, 1]
        arm[:, 1, 1] = -0.25 + st[:, 2]  # inward rotation: forearms in front of the body
        arm[:, 1, 2] = -style["arm_hang"] + 0.1 * active + st[:, 1]
        arm[:, 2, 1] = -soft_limit(style["elbow_rest"] + 0.55 * active + st[:, 3] + 0.08 * drift[:, 2]
                                   + 0.5 * beats[side], ELBOW_KNEE, ELBOW_MAX)
        arm[:, 3, 0] = -0.2 + st[:, 4] + 0.08 * drift[:, 3] + beats[side]
        arm[:, 3, 2] = st[:, 5] + 0.3 * beats[side]
        ang[:, [collar, shoulder, elbow, wrist]] = arm * MIRROR[side]
        # Fingers curl at rest and open on a stroke; pinky and ring curl most. Thumb stays near its rest pose.
        curl = np.clip(1.0 - FINGER_OPENING * openness[side], 0.15, 1.0) + FINGER_JITTER * smooth_noise(rng, n, 0.8)
        flex = FINGER_BEAT * beats[side] / BEAT_SIZE  # a beat curls the fingers further, each by its own amount
        base = np.array([0.25, 0.35, 0.55, 0.45])[:, None] * np.array([1.0, 0.9, 0.6])[None, :]
        fingers = np.zeros((n, 15, 3))
        fingers[:, :12, 2] = -(curl[:, None] * base.reshape(1, 12) + flex[:, None] * 0.5 * finger_gain)
        fingers[:, 12:, 0] = 0.15
        fingers[:, 12:, 2] = -0.1 * curl[:, None] - 0.15 * flex[:, None]
        start = HAND_START[side]
        ang[:, start:start + 15] = fingers * MIRROR[side]

    # Head nods on some stressed syllables; slow gaze drift.
    nod_at = apex[np.array([g["nod"] for g in lexicon], bool).reshape(k)] + 0.03
    nods = (0.12 * np.exp(-0.5 * ((t[None, :] - nod_at[:, None]) / 0.12) ** 2)).sum(0) if len(nod_at) else np.zeros(n)
    gaze = IDLE * smooth_noise(rng, n, 1.5, (3,))
    bob = 0.04 * beat  # the head bobs a little with every syllable
    ang[:, NECK] = np.stack([0.12 + 0.5 * nods + bob + 0.03 * gaze[:, 0], 0.06 * gaze[:, 1], 0.02 * gaze[:, 2]], 1)
    ang[:, HEAD] = np.stack([-0.03 + 0.5 * nods + bob, 0.06 * gaze[:, 1], 0.02 * gaze[:, 2]], 1)

    # Spine: slow sway, a lean while talking and a twist towards the gesturing hand.
    twist = strokes["right"][:, 3] - strokes["left"][:, 3]
    sway = IDLE * smooth_noise(rng, n, 1.2, (3,))
    for i, joint in enumerate(SPINE):
        ang[:, joint] = np.stack([0.05 + 0.03 * active + 0.02 * sway[:, 0], 0.03 * sway[:, 1] + 0.04 * twist,
                                  0.025 * sway[:, 2]], 1) * (1.0 - 0.2 * i)

    # Legs: weight moves from one foot to the other every few seconds; the unloaded knee bends a little.
    weight = np.zeros(n)
    i = 0
    while i < n:
        j = i + int(rng.uniform(4.0, 10.0) * FPS)
        weight[i:j] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
        i = j
    weight = WEIGHT_SHIFT * gaussian_filter1d(weight, 0.4 * FPS, mode="nearest")
    knee = {L_KNEE: 0.08 + 0.15 * np.clip(-weight, 0, 1), R_KNEE: 0.08 + 0.15 * np.clip(weight, 0, 1)}
    ang[:, PELVIS] = np.stack([0.01 * sway[:, 0], 0.04 * smooth_noise(rng, n, 2.0), 0.035 * weight], 1)
    for hip, kn, ankle, side in ((L_HIP, L_KNEE, L_ANKLE, 1.0), (R_HIP, R_KNEE, R_ANKLE, -1.0)):
        ang[:, hip] = np.stack([-0.5 * knee[kn], np.zeros(n), side * 0.05 - 0.035 * weight], 1)
        ang[:, kn, 0] = knee[kn]
        ang[:, ankle, 0] = -0.5 * knee[kn]

    # Jaw opens with loudness.
    ang[:, JAW, 0] = 0.02 + 0.14 * level + 0.005 * smooth_noise(rng, n, 0.2)

    ang[:, :23] += shape["rest_jitter"][:23] * (np.arange(23) != JAW)[:, None]
    ang = sosfiltfilt(butter(4, 6.0, fs=FPS, output="sos"), ang, axis=0)  # smooth: nothing faster than ~6 Hz
    poses = Rotation.from_euler("zxy", ang.reshape(-1, 3)[:, [2, 0, 1]]).as_rotvec().reshape(n, 165)

    trans = np.stack([0.03 * weight, style["height"] - 0.01 * np.abs(weight), 0.01 * smooth_noise(rng, n, 3.0)], 1)
    expressions = (shape["expr_offset"] + level[:, None] * shape["expr_mouth"]
                   + np.clip(openness["left"] + openness["right"], 0, 1.5)[:, None] * shape["expr_brow"]
                   + IDLE * smooth_noise(rng, n, 1.0, (100,)) * shape["expr_drift"])
    expressions = sosfiltfilt(butter(4, 6.0, fs=FPS, output="sos"), expressions, axis=0)
    return poses.astype(np.float32), trans, expressions


# ----------------------------------------------------------------------------------------------------------- files

def _fmt(x):
    return f"{x:.6f}".rstrip("0").rstrip(".")


def textgrid_text(intervals, duration):
    """Praat long-format TextGrid with one IntervalTier `words`, laid out line for line as BEAT2's aligner output."""
    head = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0 ", f"xmax = {_fmt(duration)} ",
            "tiers? <exists> ", "size = 1 ", "item []: ", "    item [1]:", '        class = "IntervalTier" ',
            '        name = "words" ', "        xmin = 0 ", f"        xmax = {_fmt(duration)} ",
            f"        intervals: size = {len(intervals)} "]
    body = []
    for i, (start, end, mark) in enumerate(intervals, 1):
        body += [f"        intervals [{i}]:", f"            xmin = {_fmt(start)} ", f"            xmax = {_fmt(end)} ",
                 f'            text = "{mark}" ']
    return "\n".join(head + body) + "\n"


def word_intervals(words, n_cs):
    """Words and the silences ("") between them, tiling [0, duration]. Times in seconds."""
    out, t = [], 0
    for w in words:
        if w["start"] > t:
            out.append((t / 100, w["start"] / 100, ""))
        out.append((w["start"] / 100, w["end"] / 100, w["word"]))
        t = w["end"]
    out.append((t / 100, n_cs / 100, ""))
    return out


def sequence_plan(seed, preset):
    """[(id, split, speaker, seconds)] for a preset. Val and test hold out whole sequences (the last ones)."""
    rng = np.random.default_rng([seed, 0])
    lo, hi = PRESETS[preset]["seconds"]
    plan = []
    for speaker, counts in PRESETS[preset]["splits"].items():
        splits = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
        for k, split in enumerate(splits, 1):
            seconds = round(float(rng.uniform(lo, hi)), 1)
            plan.append((f"{speaker}_{SPEAKERS[speaker]['name']}_0_{k}_{k}", split, speaker, seconds))
    return plan


def write_sequence(out_dir, seq_id, speaker, seconds, seed, index):
    """Generate one sequence and write its npz, wav and TextGrid."""
    rng = np.random.default_rng([seed, 2, speaker, index])
    # How animated the speaker is in this recording: louder, higher and faster speech and larger gestures together, as
    # in real recordings (BEAT2's emotion takes); another recording's motion then differs in size from this one's.
    arousal = float(rng.uniform(1.0 - AROUSAL_SPREAD, 1.0 + AROUSAL_SPREAD))
    base = SPEAKERS[speaker]
    style = dict(base, gesture=base["gesture"] * arousal, f0=base["f0"] * (1.0 + 0.25 * (arousal - 1.0)),
                 rate=base["rate"] * (1.0 + 0.15 * (arousal - 1.0)))
    n_cs = int(round(seconds * 100))
    n_frames, n_samples = n_cs * FPS // 100, n_cs * SR // 100
    words = plan_words(rng, n_cs, style["rate"], topic_words(seed, int(seq_id.split("_")[-1])))
    syllables = plan_syllables(rng, words)
    y = synth_speech(rng, syllables, n_samples, style["f0"], peak=0.5 * (0.4 + 0.6 * arousal))
    shape = speaker_shape(speaker, seed)
    poses, trans, expressions = synth_motion(rng, words, syllables, loudness_envelope(y, n_frames), style, shape)

    with atomic_write(out_dir / "smplxflame_30" / f"{seq_id}.npz") as tmp, open(tmp, "wb") as f:
        # Same keys, order and dtypes as the BEAT2 files.
        np.savez(f, betas=shape["betas"], poses=poses, expressions=expressions, trans=trans,
                 model=np.array("smplx2020"), gender=np.array("neutral"), mocap_frame_rate=np.array(FPS, np.int32))
    with atomic_write(out_dir / "wave16k" / f"{seq_id}.wav") as tmp:
        sf.write(tmp, y, SR, format="WAV", subtype="PCM_16")
    with atomic_write(out_dir / "textgrid" / f"{seq_id}.TextGrid") as tmp:
        tmp.write_text(textgrid_text(word_intervals(words, n_cs), n_cs / 100))


def write_demo_dataset(out_dir, seed=0, preset="demo", force=False):
    """Write the demo dataset into `out_dir` (BEAT2 layout) and return its path. Skips the work when `out_dir` already
    holds a finished dataset of the same seed and preset (its `.complete` marker), unless `force`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {out_dir}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    marker, partial = out_dir / ".complete", out_dir / ".partial"
    stamp = dict(generator="dataloaders.synthetic", version=VERSION, seed=int(seed), preset=preset)
    if not force and marker.exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out_dir
        except ValueError:
            pass
    # Stale files are deleted below: never do that in a directory this generator did not write (e.g. real BEAT2).
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (marker.exists() or partial.exists()):
        raise ValueError(f"{out_dir} is not empty and was not written by dataloaders.synthetic; "
                         "give an empty or new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial.touch()
    marker.unlink(missing_ok=True)

    plan = sequence_plan(seed, preset)
    keep = {seq_id for seq_id, *_ in plan}
    for sub, ext in (("smplxflame_30", ".npz"), ("wave16k", ".wav"), ("textgrid", ".TextGrid")):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (out_dir / sub).glob(f"*{ext}"):  # files of an earlier, different dataset would leak into it
            if old.stem not in keep:
                old.unlink()
    # The mean joint velocity is derived from the npz files by the loader: drop a stale one.
    (out_dir / "weights" / "mean_vel_smplxflame_30.npy").unlink(missing_ok=True)

    for index, (seq_id, _, speaker, seconds) in enumerate(plan):
        write_sequence(out_dir, seq_id, speaker, seconds, seed, index)
    with atomic_write(out_dir / "train_test_split.csv") as tmp:
        tmp.write_text("id,type\n" + "".join(f"{seq_id},{split}\n" for seq_id, split, *_ in plan))
    with atomic_write(marker) as tmp:
        tmp.write_text(json.dumps(stamp) + "\n")
    partial.unlink()
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the embedded synthetic demo dataset (BEAT2 layout).")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--force", action="store_true", help="regenerate even if the directory is complete")
    args = parser.parse_args(argv)
    t0 = time.time()
    out_dir = write_demo_dataset(args.out, seed=args.seed, preset=args.preset, force=args.force)
    plan = sequence_plan(args.seed, args.preset)
    for split in ("train", "val", "test"):
        rows = [p for p in plan if p[1] == split]
        speakers = sorted({p[2] for p in rows})
        print(f"{split:5s}: {len(rows):2d} sequences, {sum(p[3] for p in rows):6.1f} s, speakers {speakers}")
    print(f"dataset in {out_dir} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
