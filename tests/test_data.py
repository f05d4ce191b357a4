"""BEAT2 readers, features, cache and datasets (issue 2 items 5-7), on the real sample and small variants of it."""
import json
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dataloaders import beat2, cache
from dataloaders import beat_sep, beat_sep_lower
from utils.body_model import load_body_model
from utils.config import load_config
from utils.log import get_logger

SAMPLE_ID = "2_scott_0_1_1"
REPO = Path(__file__).resolve().parents[1]


def make_dataset_dir(sample, root, rows, link=("smplxflame_30", "wave16k", "textgrid", "weights")):
    """A BEAT2-layout dir whose files are symlinks to the sample, with our own csv rows [(id, type)].
    Ids other than the sample's get links to the sample's files under their own name."""
    root.mkdir(parents=True, exist_ok=True)
    ext = {"smplxflame_30": ".npz", "wave16k": ".wav", "textgrid": ".TextGrid"}
    for sub in link:
        (root / sub).mkdir(exist_ok=True)
        if sub == "weights":
            for f in (sample / sub).iterdir():
                (root / sub / f.name).symlink_to(f)
            continue
        for fid in {fid for fid, _ in rows}:
            (root / sub / f"{fid}{ext[sub]}").symlink_to(sample / sub / f"{SAMPLE_ID}{ext[sub]}")
    (root / "train_test_split.csv").write_text("id,type\n" + "".join(f"{i},{t}\n" for i, t in rows))
    return root


def make_args(data_dir, cache_root, config="configs/mambatalk.yaml", **overrides):
    values = {"data_path": f"{data_dir}/", "root_path": f"{cache_root}/", "ctc_model": "none"}
    values.update(overrides)
    return load_config(REPO / config, values)


@pytest.fixture
def log_messages():
    """Messages of the project logger during the test (independent of how logging was set up)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def sample_sets(beat2_sample, tmp_path_factory):
    """MambaTalk train and test datasets built once from the sample (its csv says test; ours adds a train row)."""
    root = tmp_path_factory.mktemp("beat2")
    data = make_dataset_dir(beat2_sample, root / "data", [(SAMPLE_ID, "train"), (SAMPLE_ID, "test")])
    args = make_args(data, root)
    return args, beat_sep_lower.CustomDataset(args, "train"), beat_sep_lower.CustomDataset(args, "test")


# ------------------------------------------------------------------------------------------- real sample

def test_train_windows(sample_sets):
    args, train, _ = sample_sets
    assert len(train) == train.n_items == 92
    assert train.windows[:, 1].tolist() == list(range(0, 1821, 20))
    item = train[91]
    shapes = {k: tuple(v.shape) for k, v in item.items()}
    assert shapes == {"pose": (64, 169), "audio": (34133, 3), "facial": (64, 100), "beta": (64, 300), "word": (64,),
                      "id": (64, 1), "emo": (1,), "sem": (1,), "trans": (64, 3)}
    dtypes = {k: v.dtype for k, v in item.items()}
    assert dtypes == {"pose": torch.float32, "audio": torch.float32, "facial": torch.float32, "beta": torch.float32,
                      "word": torch.int32, "id": torch.float32, "emo": torch.int32, "sem": torch.float32,
                      "trans": torch.float32}
    assert args.stride == 20  # the test loader must not overwrite it (published bug #13)


def test_whole_cut_of_a_training_split(sample_sets):
    """whole=True cuts any split like the test split (one whole sequence per file): the demo scores decoding on whole
    val recordings; whole=False gives the test split training windows."""
    args, train, test = sample_sets
    whole = beat_sep_lower.CustomDataset(args, "train", whole=True)
    assert len(whole) == 1 and whole.windows.tolist() == test.windows.tolist()
    assert whole[0]["pose"].shape == test[0]["pose"].shape
    windows = beat_sep_lower.CustomDataset(args, "test", whole=False)
    assert windows.windows.tolist() == train.windows.tolist()


def test_test_item_and_content(sample_sets, beat2_sample):
    """The test item is the whole sequence cut to 63 whole seconds; every channel checked against its source."""
    _, train, test = sample_sets
    assert len(test) == 1
    item = test[0]
    assert item["pose"].shape == (30 * 63, 169) and item["audio"].shape == (16000 * 63, 3)
    assert item["word"].shape == (1890,) and item["id"].shape == (1890, 1)
    for k, v in item.items():
        assert torch.isfinite(v.float()).all(), k
    motion = beat2.read_motion(beat2_sample / "smplxflame_30" / f"{SAMPLE_ID}.npz")
    np.testing.assert_array_equal(item["pose"][:, :165].numpy(), motion["poses"][:1890])
    np.testing.assert_allclose(item["trans"].numpy(), motion["trans"][:1890])
    np.testing.assert_allclose(item["facial"].numpy(), motion["expressions"][:1890])
    body = load_body_model(sample_sets[0])
    joints = body(motion["poses"], motion["betas"], motion["expressions"], motion["trans"], return_vertices=False)
    contact = beat2.foot_contact(joints["joints"][:, :55].detach().numpy())
    np.testing.assert_array_equal(item["pose"][:, 165:].numpy(), contact[:1890])
    assert (item["id"] == 1).all()  # scott: speaker 2 -> 1
    # the word at 1.60 s (frame 48) is "first"; window 2 starts at frame 40
    first = test.vocab.get_word_index("first")
    assert first > beat2.UNK and item["word"][48] == first and train[2]["word"][8] == first
    # train windows are slices of the test sequence (same cached features)
    w = train[5]
    torch.testing.assert_close(w["pose"], item["pose"][100:164])
    torch.testing.assert_close(w["audio"], item["audio"][53333:53333 + 34133])
    # audio channels: envelope of the raw wave, zero CTC (ctc_model none), normalised wave
    y = beat2.read_audio(beat2_sample / "wave16k" / f"{SAMPLE_ID}.wav")
    audio = item["audio"].numpy()
    for t in (0, 123456, 700000):
        assert audio[t, 0] == np.abs(y[t:t + 1024]).max()
    assert (audio[:, 1] == 0).all()
    np.testing.assert_allclose(audio[:, 2], (y[:1008000] - y.mean()) / y.std(), atol=1e-4)
    np.testing.assert_array_equal(test.avg_vel, np.load(beat2_sample / "weights" / "mean_vel_smplxflame_30.npy"))


def test_float32_wav_read_as_64_1_seconds(beat2_sample):
    path = beat2_sample / "wave16k" / f"{SAMPLE_ID}.wav"
    assert sf.info(str(path)).subtype == "FLOAT"
    y = beat2.read_audio(path)
    assert y.dtype == np.float32 and round(len(y) / 16000, 1) == 64.1 and len(y) == beat2.audio_length(path)


def test_cache_is_reused_and_readable_in_workers(sample_sets, monkeypatch):
    args, train, _ = sample_sets
    monkeypatch.setattr(cache, "_build", lambda *a, **k: pytest.fail("a valid cache was rebuilt"))
    again = beat_sep_lower.CustomDataset(args, "train")
    torch.testing.assert_close(again[7]["audio"], train[7]["audio"])
    clone = pickle.loads(pickle.dumps(again))  # what a spawned DataLoader worker receives: no array contents
    assert len(pickle.dumps(again)) < 100_000
    torch.testing.assert_close(clone[7]["pose"], train[7]["pose"])


def test_demo_data_loads(demo_data, tmp_path):
    """The embedded synthetic dataset goes through the same loader."""
    speakers = sorted({beat2.speaker_of(i) for i, _ in beat2.read_split(demo_data / "train_test_split.csv")})
    ds = beat_sep_lower.CustomDataset(make_args(demo_data, tmp_path, training_speakers=speakers), "train")
    item = ds[len(ds) - 1]
    assert item["pose"].shape == (64, 169) and item["audio"].shape == (34133, 3) and item["word"].shape == (64,)
    assert all(torch.isfinite(v.float()).all() for v in item.values())


def test_start_pose_of_training_split(demo_data, tmp_path):
    """The test-time seed pose: the mean of the first pre_frames frames of the training split's files (configured
    speakers only), computed once into the cache root and read back from there."""
    from dataloaders.cache import cache_root, load_start_pose
    args = make_args(demo_data, tmp_path, training_speakers=[2])
    ids = [i for i, split in beat2.read_split(demo_data / "train_test_split.csv")
           if split == "train" and i.startswith("2_")]
    first = [beat2.read_motion(demo_data / "smplxflame_30" / f"{i}.npz")["poses"][:args.pre_frames] for i in ids]
    pose = load_start_pose(args)
    assert pose.shape == (165,) and np.allclose(pose, np.concatenate(first).mean(0), atol=1e-5)
    cached = list(cache_root(args).glob("start_pose_*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros(165, np.float32))  # the cached file is what is read next time
    assert np.abs(load_start_pose(args)).max() == 0.0


# ------------------------------------------------------------------------------------------- beat_sep, speaker ids

def test_beat_sep_and_speaker_ids(beat2_sample, tmp_path):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [("30_x_0_1_1", "train")],
                            link=("smplxflame_30", "weights"))
    upper = beat_sep.CustomDataset(make_args(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml",
                                             training_speakers=[30]), "train")
    item = upper[0]
    assert item["pose"].shape == (64, 39) and (item["id"] == 29).all()  # beat_sep: s - 1
    assert item["audio"].tolist() == [-1] and item["word"].tolist() == [-1] and item["facial"].tolist() == [-1]
    assert upper.vocab is None
    lower = beat_sep_lower.CustomDataset(make_args(data, tmp_path, "configs/cnn_vqvae_lower_30.yaml",
                                                   training_speakers=[30]), "train")
    assert lower[0]["pose"].shape == (64, 31) and (lower[0]["id"] == 8).all()  # idmapping 30 -> 8
    # a window's frames are found by index, not recomputed: lower = 9 leg joints + 4 contacts
    legs = [k for j in (0, 1, 2, 4, 5, 7, 8, 10, 11) for k in range(3 * j, 3 * j + 3)]
    motion = beat2.read_motion(data / "smplxflame_30" / "30_x_0_1_1.npz")
    np.testing.assert_array_equal(lower[3]["pose"][:, :27].numpy(), motion["poses"][60:124, legs])


def test_mean_velocity_computed_into_cache_dir(beat2_sample, tmp_path):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")], link=("smplxflame_30",))
    os.chmod(data, 0o555)  # the dataset dir may be read-only
    try:
        ds = beat_sep.CustomDataset(make_args(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml"), "train")
    finally:
        os.chmod(data, 0o755)
    assert ds.avg_vel.shape == (55,) and ds.avg_vel.dtype == np.float32 and (ds.avg_vel > 0).all()
    saved = list((tmp_path / "datasets/beat_cache").glob("mean_vel_smplxflame_30_*.npy"))  # shared by configs
    assert len(saved) == 1 and np.array_equal(np.load(saved[0]), ds.avg_vel)
    assert not (data / "weights").exists()


# ------------------------------------------------------------------------------------------- cache behaviour

def test_killed_build_leaves_no_trusted_cache(beat2_sample, tmp_path, monkeypatch):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")], link=("smplxflame_30", "weights"))
    args = make_args(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml")
    split_dir = cache.cache_root(args) / "train"
    real_features = cache._features

    def dies_mid_build(*a, **k):
        real_features(*a, **k)  # arrays are half written when the "kill" comes
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cache, "_features", dies_mid_build)
    with pytest.raises(KeyboardInterrupt):
        beat_sep.CustomDataset(args, "train")
    assert not split_dir.exists() and not list(split_dir.parent.glob("train.tmp-*"))
    # a SIGKILLed build leaves its temp dir behind, complete with a manifest: it is never read, and removed
    leftover = split_dir.with_name("train.tmp-999999999")
    leftover.mkdir()
    (leftover / "manifest.json").write_text(json.dumps({"fingerprint": "x"}))
    monkeypatch.setattr(cache, "_features", real_features)
    ds = beat_sep.CustomDataset(args, "train")
    assert len(ds) == 92 and (split_dir / "manifest.json").is_file() and not leftover.exists()


def test_cache_rebuilt_when_input_or_setting_changes(beat2_sample, tmp_path, log_messages):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")], link=("weights",))
    (data / "smplxflame_30").mkdir()
    npz = data / "smplxflame_30" / f"{SAMPLE_ID}.npz"
    motion = dict(np.load(beat2_sample / "smplxflame_30" / f"{SAMPLE_ID}.npz"))
    np.savez(npz, **motion)
    args = make_args(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml")
    before = beat_sep.CustomDataset(args, "train")[0]["pose"]
    motion["poses"] = motion["poses"] + 1.0
    np.savez(npz, **motion)
    log_messages.clear()
    after = beat_sep.CustomDataset(args, "train")[0]["pose"]
    torch.testing.assert_close(after, before + 1.0)
    assert any("inputs or settings changed" in r.getMessage() for r in log_messages)
    hands = beat_sep.CustomDataset(make_args(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml",
                                             tar_joints="beat_smplx_hands"), "train")
    assert hands[0]["pose"].shape == (64, 90)  # same cache_path, other setting: rebuilt, not reused


# ------------------------------------------------------------------------------------------- bad input

def _build_error(data, tmp_path, config="configs/mambatalk.yaml", split="train", **overrides):
    module = beat_sep if "upper" in config else beat_sep_lower
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        module.CustomDataset(make_args(data, tmp_path, config, **overrides), split)
    return str(info.value)


@pytest.mark.parametrize("sub,suffix", [("wave16k", ".wav"), ("textgrid", ".TextGrid"), ("smplxflame_30", ".npz")])
def test_missing_file_of_listed_id(beat2_sample, tmp_path, sub, suffix):
    other = "2_scott_0_2_2"  # a test file with all its inputs, so the vocabulary can be built
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train"), (other, "test")])
    (data / sub / f"{SAMPLE_ID}{suffix}").unlink()
    msg = _build_error(data, tmp_path)
    assert f"{SAMPLE_ID}{suffix}" in msg and "missing" in msg and "train_test_split.csv" in msg


def _write_motion(beat2_sample, data, **changes):
    (data / "smplxflame_30").mkdir()
    motion = dict(np.load(beat2_sample / "smplxflame_30" / f"{SAMPLE_ID}.npz"))
    motion.update(changes)
    motion = {k: v for k, v in motion.items() if v is not None}
    path = data / "smplxflame_30" / f"{SAMPLE_ID}.npz"
    np.savez(path, **motion)
    return path


@pytest.mark.parametrize("change,expected", [
    ({"poses": None}, "missing array(s) ['poses']"),
    ({"poses": np.zeros((1906, 159), np.float32)}, "'poses' has shape (1906, 159), expected (T, 165)"),
    ({"poses": np.full((1906, 165), np.nan, np.float32)}, "'poses' contains NaN"),
])
def test_bad_motion(beat2_sample, tmp_path, change, expected):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")], link=("weights",))
    path = _write_motion(beat2_sample, data, **change)
    msg = _build_error(data, tmp_path, "configs/cnn_vqvae_upper_30.yaml")
    assert str(path) in msg and expected in msg


def test_audio_much_shorter_than_motion(beat2_sample, tmp_path):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")])
    wav = data / "wave16k" / f"{SAMPLE_ID}.wav"
    wav.unlink()
    sf.write(wav, np.zeros(16000 * 50, np.float32), 16000, subtype="PCM_16")
    msg = _build_error(data, tmp_path)
    assert str(wav) in msg and "13.53 s shorter than the motion" in msg


def test_textgrid_without_word_tier(beat2_sample, tmp_path):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train")])
    grid = data / "textgrid" / f"{SAMPLE_ID}.TextGrid"
    text = grid.read_text().replace('name = "words"', 'name = "tokens"')
    grid.unlink()
    grid.write_text(text)
    msg = _build_error(data, tmp_path)
    assert str(grid) in msg and "no tier named 'words'" in msg and "['tokens', 'phones']" in msg


def test_empty_split(beat2_sample, tmp_path):
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "test")])
    msg = _build_error(data, tmp_path, split="val")
    assert str(data / "train_test_split.csv") in msg and "'val' is empty for speakers [2]" in msg
    msg = _build_error(data, tmp_path, split="test", training_speakers=[4, 5])
    assert "'test' is empty for speakers [4, 5]" in msg


# ------------------------------------------------------------------------------------------- readers and features

def test_pcm16_and_resampled_wav(tmp_path):
    t = np.arange(16000 * 2) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "pcm.wav", tone, 16000, subtype="PCM_16")
    y = beat2.read_audio(tmp_path / "pcm.wav")
    assert y.dtype == np.float32 and len(y) == len(tone)
    np.testing.assert_allclose(y, tone, atol=1 / 32768)
    t44 = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t44), 0.5 * np.sin(2 * np.pi * 440 * t44)], axis=1)
    sf.write(tmp_path / "stereo44k.wav", stereo.astype(np.float32), 44100, subtype="FLOAT")
    y = beat2.read_audio(tmp_path / "stereo44k.wav")
    assert len(y) == 32000 == beat2.audio_length(tmp_path / "stereo44k.wav")
    np.testing.assert_allclose(y[1000:-1000], 0.75 * np.sin(2 * np.pi * 440 * t[1000:-1000]), atol=2e-3)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="junk.wav: cannot be read as audio"):
        beat2.read_audio(tmp_path / "junk.wav")


def test_tiny_random_ctc_model(beat2_sample, tmp_path, log_messages):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        conv_dim=(32, 32), conv_stride=(5, 64), conv_kernel=(10, 64), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    y = beat2.read_audio(beat2_sample / "wave16k" / f"{SAMPLE_ID}.wav")[:16000 * 4]
    feats = beat2.audio_features(y, model)
    ids = feats[:, 1]
    assert feats.shape == (len(y), 3) and (ids == ids.round()).all() and ids.min() >= 0 and ids.max() < 32
    assert len(np.unique(ids)) > 1
    with torch.no_grad():  # short audio: one pass, same ids as the model on the whole normalised wave
        whole = model(torch.from_numpy(feats[:, 2])[None]).logits[0].argmax(-1).numpy()
    np.testing.assert_array_equal(beat2.ctc_ids(model, feats[:, 2]), whole)
    # through the dataset: ctc_model names a local dir
    model.save_pretrained(tmp_path / "tiny_ctc")
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "test")])
    ds = beat_sep_lower.CustomDataset(make_args(data, tmp_path, ctc_model=str(tmp_path / "tiny_ctc")), "test")
    channel = ds[0]["audio"][:, 1]
    assert (channel == channel.round()).all() and channel.min() >= 0 and channel.max() < 32 and channel.max() > 0
    # a model that is not available offline: zero CTC channel and a warning, and the cache is rebuilt for it
    ds = beat_sep_lower.CustomDataset(make_args(data, tmp_path, ctc_model="no-such-org/no-such-model"), "test")
    assert (ds[0]["audio"][:, 1] == 0).all()
    assert any("no-such-org/no-such-model' is not available offline" in r.getMessage() for r in log_messages)


def test_upsample_ids_matches_linspace_rule():
    ids = np.array([5, 7, 9, 11, 2])
    out = beat2.upsample_ids(ids, 23)
    idx = np.linspace(0, 23, num=5, endpoint=False).astype(int)
    expected = np.empty(23)
    for i in range(5):
        expected[idx[i]:(idx[i + 1] if i + 1 < 5 else 23)] = ids[i]
    np.testing.assert_array_equal(out, expected)


def test_amplitude_envelope_and_foot_contact():
    rng = np.random.default_rng(0)
    y = rng.standard_normal(5000).astype(np.float32)
    env = beat2.amplitude_envelope(y)
    expected = np.array([np.abs(y[t:t + 1024]).max() for t in range(5000 - 1023)])
    np.testing.assert_array_equal(env[:5000 - 1023], expected)
    assert (env[5000 - 1023:] == expected[-1]).all()
    joints = np.zeros((5, 55, 3))
    joints[2:, 7, 0] = 0.05  # left ankle jumps 5 cm between frames 1 and 2
    joints[:, 11, 1] = np.arange(5) * 0.005  # right foot slides 5 mm per frame: still contact
    contact = beat2.foot_contact(joints)
    assert contact.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_word_indices_published_rules():
    vocab = beat2.Vocab(["first", "hello"])
    words = [(0.0, 0.1, "hello"), (0.1, 0.2, "first"), (0.2, 0.25, " "), (0.25, 0.3, "zzz"), (0.4, 0.5, "")]
    # frames at 30 fps: t = 0, .033, .067, .1 (boundary: first interval wins), .133, .167, .2, .233, .267, .3, .333
    out = beat2.word_indices(words, 12, vocab)
    h, f = vocab.get_word_index("hello"), vocab.get_word_index("first")
    assert out.tolist() == [h, h, h, h, f, f, f, 0, 3, 3, 3, 3]  # " " -> PAD, unknown -> UNK, uncovered -> UNK
    assert out.dtype == np.int32


def test_build_vocab(beat2_sample):
    vocab = beat2.build_vocab([beat2_sample / "textgrid" / f"{SAMPLE_ID}.TextGrid"])
    assert [vocab.index2word[i] for i in range(4)] == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
    words = [vocab.index2word[i] for i in range(4, vocab.n_words)]
    assert words == sorted(words) and "first" in words and "" not in vocab.word2index
    assert vocab.get_word_index("") == beat2.UNK and vocab.word_embedding_weights is None


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_published_style_vocab_pickle(tmp_path, monkeypatch, protocol):
    module = types.ModuleType("dataloaders.build_vocab")  # the published module name

    class Vocab:  # stand-in for the published class, pickled under its own module name
        def __init__(self):
            self.name, self.trimmed = "beat", False
            self.word2index, self.word2count = {"hello": 4}, {"hello": 1}
            self.index2word = {0: "<PAD>", 1: "<SOS>", 2: "<EOS>", 3: "<UNK>", 4: "hello"}
            self.n_words = 5
            self.word_embedding_weights = np.arange(15, dtype=np.float32).reshape(5, 3)

    Vocab.__module__, Vocab.__qualname__ = module.__name__, "Vocab"
    module.Vocab = Vocab
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "vocab.pkl"
    path.write_bytes(pickle.dumps(Vocab(), protocol=protocol))
    monkeypatch.delitem(sys.modules, module.__name__)
    vocab = beat2.load_vocab(path)
    assert isinstance(vocab, beat2.Vocab) and vocab.n_words == 5
    assert vocab.get_word_index("hello") == 4 and vocab.get_word_index("bye") == beat2.UNK
    np.testing.assert_array_equal(vocab.word_embedding_weights, np.arange(15, dtype=np.float32).reshape(5, 3))


def test_vocab_pickle_with_other_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "vocab.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match=r"vocab.pkl: .*refused global (posix|os)\.system"):
        beat2.load_vocab(path)


def test_cache_root_joins_like_published_but_keeps_absolute_paths():
    ns = types.SimpleNamespace
    assert cache.cache_root(ns(root_path="./", cache_path="datasets/beat_cache/")) == Path("datasets/beat_cache")
    assert cache.cache_root(ns(root_path="/data/", cache_path="cache/")) == Path("/data/cache")
    assert cache.cache_root(ns(root_path="./", cache_path="/tmp/c/")) == Path("/tmp/c")  # published: .//tmp/c


def test_full_disk_during_cache_build_is_a_message(beat2_sample, tmp_path, tmpfs):
    """A real full filesystem under cache_path: the cache arrays used to be sparse memory maps, and writing past the
    free space killed train.py with SIGBUS (exit 135) and no word. Now: one message naming the cache, exit 2."""
    data = make_dataset_dir(beat2_sample, tmp_path / "data", [(SAMPLE_ID, "train"), (SAMPLE_ID, "val")])
    disk = tmpfs("64k")
    cli = ["--config", "configs/demo/cnn_vqvae_lower_30.yaml", "--data_path", f"{data}/", "--root_path", "",
           "--cache_path", f"{disk}/", "--out_path", f"{tmp_path}/runs/", "--device", "cpu", "--stat", "none"]
    r = subprocess.run([sys.executable, "train.py", *cli], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert f"error: could not write the feature cache {disk}/train: the disk is full" in r.stderr
    assert "nothing was kept" in r.stderr and list(disk.iterdir()) == []


def test_malformed_textgrid_is_a_message(beat2_sample, tmp_path):
    """A TextGrid damaged inside a tier made the parser fail with its internals ('NoneType' object has no attribute
    'groups'); the message now names the file and says what is wrong in the user's terms."""
    grid = tmp_path / f"{SAMPLE_ID}.TextGrid"
    text = (beat2_sample / "textgrid" / f"{SAMPLE_ID}.TextGrid").read_text()
    head, tail = text.split("intervals [1]:", 1)
    grid.write_text(head + "intervals [1]:" + tail.replace("xmin = ", "xmin ", 1))
    with pytest.raises(ValueError) as err:
        beat2.read_words(grid)
    msg = str(err.value)
    assert msg.startswith(f"{grid}: malformed TextGrid") and "NoneType" not in msg and "groups" not in msg
