"""BEAT2 readers and per-file features (spec §2, §3.2-3.5, §3.9).

Readers validate their input and raise ValueError / FileNotFoundError naming the file and the problem.
Feature functions are plain numpy and work on one file at a time; `dataloaders/cache.py` stores their output.
"""
import builtins
import codecs
import copyreg
import csv
import math
import pickle
from pathlib import Path

import numpy as np
import soundfile as sf
import textgrid
from scipy.ndimage import maximum_filter1d
from scipy.signal import resample_poly

from utils.log import get_logger
from utils.metric import joint_speeds

log = get_logger()

PAD, SOS, EOS, UNK = 0, 1, 2, 3
MOTION_KEYS = {"poses": 165, "trans": 3, "expressions": 100}  # per-frame arrays and their widths
N_BETAS = 300
ENVELOPE_SAMPLES = 1024  # amplitude envelope window (§3.4)
CONTACT_THRESHOLD = 0.01  # metres per frame (§3.2)


# ---------------------------------------------------------------------------------------------- readers

def read_motion(path):
    """npz -> dict(poses (T,165), trans (T,3), betas (300,), expressions (T,100)), all float32, all finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"motion file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as npz ({e})") from None
    with npz:
        missing = [k for k in (*MOTION_KEYS, "betas") if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; found {npz.files}")
        out = {k: np.asarray(npz[k], dtype=np.float32) for k in (*MOTION_KEYS, "betas")}
    n_frames = out["poses"].shape[0]
    for key, width in MOTION_KEYS.items():
        a = out[key]
        if a.ndim != 2 or a.shape[1] != width:
            raise ValueError(f"{path}: '{key}' has shape {a.shape}, expected (T, {width})")
        if a.shape[0] != n_frames:
            raise ValueError(f"{path}: '{key}' has {a.shape[0]} frames but 'poses' has {n_frames}")
    betas = out["betas"]
    if betas.ndim == 2 and betas.shape[0] >= 1:  # some exports store (1,300) or per-frame betas
        betas = betas[0]
    if betas.shape != (N_BETAS,):
        raise ValueError(f"{path}: 'betas' has shape {out['betas'].shape}, expected ({N_BETAS},)")
    out["betas"] = betas
    for key, a in out.items():
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: '{key}' contains NaN or infinite values")
    if n_frames == 0:
        raise ValueError(f"{path}: 'poses' has no frames")
    return out


def write_motion(path, betas, poses, expressions, trans):
    """Write a BEAT2-format motion npz (the keys read_motion and BEAT2 tools read), atomically."""
    from utils.checkpoint import atomic_write
    with atomic_write(path, "motion file") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, betas=np.asarray(betas, np.float32), poses=np.asarray(poses, np.float32),
                     expressions=np.asarray(expressions, np.float32), trans=np.asarray(trans, np.float32),
                     model="smplx2020", gender="neutral", mocap_frame_rate=30)


def _resample_ratio(rate, sr):
    g = math.gcd(int(rate), int(sr))
    return sr // g, rate // g


def audio_length(path, sr=16000):
    """Number of samples `read_audio(path, sr)` returns, from the header only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as audio ({e})") from None
    up, down = _resample_ratio(info.samplerate, sr)
    return -(-info.frames * up // down)  # resample_poly output length: ceil(n * up / down)


def read_audio(path, sr=16000):
    """Any soundfile-readable audio (PCM16, float32, any rate, any channels) -> mono float32 at `sr`.

    The published code loads with librosa at 22.05 kHz and resamples to 16 kHz; we resample directly from the
    file's own rate (polyphase, Kaiser window), so a 16 kHz file is read unchanged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        y, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as audio ({e})") from None
    y = y.mean(axis=1)
    if rate != sr:
        up, down = _resample_ratio(rate, sr)
        y = resample_poly(y, up, down)
    if not np.isfinite(y).all():
        raise ValueError(f"{path}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(y, dtype=np.float32)


def read_words(path):
    """TextGrid -> [(start, end, mark)] of the tier named 'words'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TextGrid not found: {path}")
    try:
        grid = textgrid.TextGrid.fromFile(str(path))
    except (textgrid.exceptions.TextGridError, EOFError, UnicodeError) as e:  # the parser's own, readable messages
        raise ValueError(f"{path}: cannot be parsed as a Praat TextGrid ({str(e).strip()[:200]})") from None
    except Exception:  # the parser met a line it did not expect; its internal error would mean nothing to a user
        raise ValueError(f"{path}: malformed TextGrid: its tiers and intervals do not follow Praat's long or short "
                         "text format (xmin/xmax/intervals lines, quoted texts)") from None
    names = [tier.name for tier in grid.tiers]
    if "words" not in names:
        raise ValueError(f"{path}: no tier named 'words' (tiers found: {names})")
    tier = grid.getFirst("words")
    if not isinstance(tier, textgrid.IntervalTier):
        raise ValueError(f"{path}: tier 'words' is not an interval tier")
    return [(float(iv.minTime), float(iv.maxTime), iv.mark) for iv in tier]


def read_split(path):
    """train_test_split.csv -> [(id, type)] in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "type"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns 'id,type', found {reader.fieldnames}")
        return [(row["id"].strip(), row["type"].strip()) for row in reader]


def speaker_of(file_id, csv_path=""):
    """'2_scott_0_1_1' -> 2."""
    try:
        return int(file_id.split("_")[0])
    except ValueError:
        raise ValueError(f"{csv_path}: id '{file_id}' does not start with a speaker number") from None


def select_ids(rows, loader_type, speakers, additional_data=False, csv_path=""):
    """Ids of `loader_type` rows of the given speakers (plus 'additional' rows for train when asked), in csv order.

    The published loader silently falls back to 8 training files when the selection is empty; we raise."""
    types = [loader_type] + (["additional"] if additional_data and loader_type == "train" else [])
    speakers = {int(s) for s in speakers}
    ids = [fid for t in types for fid, typ in rows if typ == t and speaker_of(fid, csv_path) in speakers]
    if not ids:
        raise ValueError(f"{csv_path}: split '{loader_type}' is empty for speakers {sorted(speakers)}")
    return ids


# ---------------------------------------------------------------------------------------------- vocabulary

class Vocab:
    """Word <-> index table. Same attribute names as the published pickled class, so its pickle loads into it."""
    PAD_token, SOS_token, EOS_token, UNK_token = PAD, SOS, EOS, UNK

    def __init__(self, words=(), word_embedding_weights=None):
        self.index2word = {PAD: "<PAD>", SOS: "<SOS>", EOS: "<EOS>", UNK: "<UNK>"}
        self.word2index = {}
        for word in words:
            if word not in self.word2index:
                self.word2index[word] = len(self.index2word)
                self.index2word[len(self.index2word)] = word
        self.n_words = len(self.index2word)
        self.word_embedding_weights = word_embedding_weights  # None -> the model uses a seeded random init

    def get_word_index(self, word):
        return self.word2index.get(word, UNK)


def _latin1_encode(text, encoding="utf-8"):
    # protocol-2 pickles of bytes call _codecs.encode(str, 'latin1'); nothing else is allowed through
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _safe_globals():
    """(module, name) -> object for the only globals a vocabulary pickle may reference."""
    allowed = {("copyreg", "_reconstructor"): copyreg._reconstructor, ("_codecs", "encode"): _latin1_encode,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("builtins", "__builtin__"):  # protocol 0-2 pickles name the Python 2 module
        for name in ("object", "set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "str",
                     "bytes", "bytearray", "bool"):
            allowed[(module, name)] = getattr(builtins, name)
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names
        allowed[(f"{core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
        allowed[(f"{core}.multiarray", "scalar")] = np.float32(0).__reduce__()[0]
        allowed[(f"{core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    return allowed


_SAFE_GLOBALS = _safe_globals()


class _VocabUnpickler(pickle.Unpickler):
    """Unpickles the published vocab.pkl: any class named Vocab becomes ours; only numpy array helpers and
    plain builtins are allowed, every other global is refused (a pickle can otherwise run arbitrary code)."""

    def find_class(self, module, name):
        if name == "Vocab":
            return Vocab
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_vocab(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary not found: {path}")
    try:
        with open(path, "rb") as f:
            vocab = _VocabUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded as a vocabulary pickle ({e})") from None
    if not isinstance(vocab, Vocab) or not isinstance(getattr(vocab, "word2index", None), dict):
        raise ValueError(f"{path}: expected a pickled Vocab with a word2index dict, got {type(vocab).__name__}")
    if not hasattr(vocab, "n_words"):
        vocab.n_words = len(getattr(vocab, "index2word", {})) or len(vocab.word2index) + 4
    weights = getattr(vocab, "word_embedding_weights", None)
    vocab.word_embedding_weights = None if weights is None else np.asarray(weights, dtype=np.float32)
    return vocab


def build_vocab(textgrid_paths):
    """Vocabulary of every word in the given TextGrids: PAD, SOS, EOS, UNK, then the words sorted.
    Silences (empty marks) are not words, so they map to UNK, as they most likely do with the published vocab."""
    words = {mark for p in textgrid_paths for _, _, mark in read_words(p) if mark.strip()}
    return Vocab(sorted(words))


def get_vocab(args):
    """The vocabulary every split and the model share: data_path/weights/vocab.pkl, else built from all TextGrids."""
    data = Path(args.data_path)
    pkl = data / "weights" / "vocab.pkl"
    if pkl.is_file():
        return load_vocab(pkl)
    grids = sorted((data / args.word_rep).glob("*.TextGrid"))
    if not grids:
        raise FileNotFoundError(f"no {pkl} and no TextGrids in {data / args.word_rep} to build a vocabulary from")
    log.info(f"no {pkl}: vocabulary built from {len(grids)} TextGrids")
    return build_vocab(grids)


# ---------------------------------------------------------------------------------------------- features

def foot_contact(joints):
    """joints (T, >=12, 3) -> (T, 4) float32: 1 where ankle/foot joints 7, 8, 10, 11 move < 1 cm to the next frame."""
    feet = np.asarray(joints, dtype=np.float64)[:, (7, 8, 10, 11)]
    step = np.linalg.norm(feet[1:] - feet[:-1], axis=-1)
    step = np.concatenate([step, np.zeros((1, 4))])  # the last frame has no next frame: in contact
    return (step < CONTACT_THRESHOLD).astype(np.float32)


def amplitude_envelope(y):
    """Forward running max of |y| over 1024 samples; the last 1023 samples repeat env[L-1024]."""
    a = np.abs(np.asarray(y, dtype=np.float32))
    n = len(a)
    if n < ENVELOPE_SAMPLES:
        return np.full(n, a.max() if n else 0.0, dtype=np.float32)
    env = maximum_filter1d(a, ENVELOPE_SAMPLES, origin=-(ENVELOPE_SAMPLES // 2))  # window [t, t+1024)
    env[n - ENVELOPE_SAMPLES + 1:] = env[n - ENVELOPE_SAMPLES]
    return env


def normalise_wave(y):
    """Zero mean, unit variance over the whole file, as Wav2Vec2FeatureExtractor does."""
    y = np.asarray(y, dtype=np.float64)
    return ((y - y.mean()) / np.sqrt(y.var() + 1e-7)).astype(np.float32)


_CTC_MODELS = {}


def load_ctc_model(name):
    """Wav2Vec2ForCTC from a HF name (already downloaded) or a local dir; None for 'none' or when unavailable.
    Loaded once per process (the published loader reloads it in every dataset constructor)."""
    if name is None or str(name).strip().lower() in ("", "none"):
        return None
    if name not in _CTC_MODELS:
        try:
            from transformers import Wav2Vec2ForCTC
        except ImportError:
            log.warning(f"transformers is not installed: the CTC audio channel is set to zeros (ctc_model={name})")
            _CTC_MODELS[name] = None
            return None
        if Path(name).exists():  # a local model the user pointed at: failing to load it is an error
            try:
                _CTC_MODELS[name] = Wav2Vec2ForCTC.from_pretrained(name, local_files_only=True).eval()
            except Exception as e:
                raise ValueError(f"{name}: cannot be loaded as a Wav2Vec2ForCTC model ({e})") from None
        else:
            try:
                _CTC_MODELS[name] = Wav2Vec2ForCTC.from_pretrained(name, local_files_only=True).eval()
            except OSError as e:
                log.warning(f"CTC model '{name}' is not available offline: the CTC audio channel is set to zeros "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
                _CTC_MODELS[name] = None
    return _CTC_MODELS[name]


def _conv_geometry(config):
    """(total stride, receptive field) in samples of wav2vec2's convolutional feature encoder."""
    stride, field = 1, 1
    for k, s in zip(config.conv_kernel, config.conv_stride):
        field += (k - 1) * stride
        stride *= s
    return stride, field


def ctc_ids(model, wave, sr=16000, chunk_seconds=30.0, context_seconds=1.0):
    """Argmax CTC token ids (one per wav2vec2 frame, ~50 Hz) of a normalised wave.

    The published code runs the whole file in one pass; to bound memory we run chunks of `chunk_seconds` with
    `context_seconds` of extra audio on each side, aligned to the conv stride so frame k of every chunk is global
    frame k. Files shorter than one chunk give exactly the one-pass result."""
    import torch
    stride, field = _conv_geometry(model.config)
    n_frames = (len(wave) - field) // stride + 1
    if n_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    chunk, context = max(1, int(chunk_seconds * sr) // stride), int(context_seconds * sr) // stride
    ids = np.empty(n_frames, dtype=np.int64)
    device = next(model.parameters()).device
    with torch.no_grad():
        for f0 in range(0, n_frames, chunk):
            f1 = min(f0 + chunk, n_frames)
            g0, g1 = max(0, f0 - context), min(n_frames, f1 + context)
            end = len(wave) if g1 == n_frames else (g1 - 1) * stride + field  # the last chunk keeps the tail
            segment = torch.from_numpy(np.ascontiguousarray(wave[g0 * stride:end]))
            logits = model(segment[None].to(device)).logits[0]
            ids[f0:f1] = logits[f0 - g0:f1 - g0].argmax(-1).cpu().numpy()
    return ids


def upsample_ids(ids, n_samples):
    """Frame ids -> one id per sample (§3.4): samples [idx[i], idx[i+1]) get ids[i], the tail gets ids[-1],
    idx = linspace(0, L, len(ids), endpoint=False) truncated to int."""
    if len(ids) == 0:
        return np.zeros(n_samples, dtype=np.float32)
    starts = np.linspace(0, n_samples, num=len(ids), endpoint=False).astype(int)
    counts = np.diff(np.append(starts, n_samples))
    return np.repeat(np.asarray(ids, dtype=np.float32), counts)


def audio_features(y, ctc=None, sr=16000):
    """`amplitude+ctc+audio` (§3.4): (L, 3) float32 = [envelope of |y|, CTC id as float, normalised wave].
    `ctc` is a Wav2Vec2ForCTC-like model or None (zero CTC channel)."""
    wave = normalise_wave(y)
    feats = np.empty((len(y), 3), dtype=np.float32)
    feats[:, 0] = amplitude_envelope(y)
    feats[:, 1] = 0.0 if ctc is None else upsample_ids(ctc_ids(ctc, wave, sr), len(y))
    feats[:, 2] = wave
    return feats


def word_indices(words, n_frames, vocab, fps=30):
    """Per-frame vocab index (§3.5): the first interval with start <= i/fps <= end gives the word;
    a mark of one space gives PAD, frames no interval covers give UNK."""
    t = np.arange(n_frames) / fps
    out = np.full(n_frames, UNK, dtype=np.int32)
    for start, end, mark in reversed(words):  # reversed: the first matching interval is written last and wins
        i0, i1 = np.searchsorted(t, start, "left"), np.searchsorted(t, end, "right")
        out[i0:i1] = PAD if mark == " " else vocab.get_word_index(mark)
    return out


def mean_velocity(joint_sequences, fps=30):
    """Mean speed per joint over all frames of all sequences (§3.9) -> (J,) float32 (single frames have no speed)."""
    speeds = np.concatenate([joint_speeds(np.asarray(j, dtype=np.float64), fps) for j in joint_sequences if len(j) >= 2],
                            axis=0)
    return speeds.mean(axis=0).astype(np.float32)
