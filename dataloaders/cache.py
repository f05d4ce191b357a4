"""Fingerprinted, atomic, memory-mapped feature cache, and the dataset that cuts windows from it (spec §3.3, §3.8).

One directory per split, `root_path + cache_path + loader_type/`, holds one .npy per feature with the files of the
split concatenated along time (pose.npy, trans.npy, facial.npy, word.npy, audio.npy; betas.npy one row per file),
and manifest.json: per-file offsets plus the fingerprint of everything the features depend on (input file sizes and
mtimes, settings, vocabulary, CTC model, body model, CACHE_VERSION). The published code silently reuses a stale
cache; here a changed fingerprint rebuilds it. A build writes into a temporary directory, manifest last, and renames
it into place, so a build killed half way leaves nothing that a later run trusts.
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataloaders import beat2
from utils import standin_body
from utils.body_model import load_body_model, smplx_npz_path
from utils.checkpoint import atomic_write, remove_dead_temps, write_failure
from utils.log import get_logger
from utils.skeleton import joint_mask

log = get_logger()

CACHE_VERSION = 1  # bump whenever a stored feature or the layout changes
MAX_AUDIO_SHORTFALL_S = 2.0  # audio shorter than the motion by more than this is an error
TEXTGRID_TOLERANCE_S = 0.5  # a TextGrid longer than the audio by more than this is a warning
AUDIO_DIR = "wave16k"  # fixed in the published loader


def cache_root(args):
    """root_path + cache_path as published, except that an absolute cache_path stands on its own."""
    return Path(str(args.root_path)) / str(args.cache_path)


def _file_signature(path):
    st = Path(path).stat()
    return [Path(path).name, st.st_size, st.st_mtime_ns]


def _sha(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _body_identity(args):
    """Which body the foot contacts come from, without loading it (same rule as utils.body_model)."""
    model_dir = getattr(args, "smplx_model_dir", "") or str(args.data_path_1) + "smplx_models/"
    npz = smplx_npz_path(model_dir)
    if npz.is_file():
        return _file_signature(npz)
    return "standin " + hashlib.sha256(Path(standin_body.__file__).read_bytes()).hexdigest()  # its generator


def _ctc_identity(name, model):
    if model is None:
        return "zeros"
    if Path(name).is_dir():
        return [str(Path(name).resolve())] + sorted(_file_signature(p) for p in Path(name).iterdir() if p.is_file())
    return [name, getattr(model.config, "_commit_hash", None)]


def _vocab_identity(vocab):
    return None if vocab is None else _sha(sorted(vocab.word2index.items()))


# ---------------------------------------------------------------------------------------------- split files

def split_files(args, loader_type):
    """[{id, speaker, motion, audio?, words?}] of the split, every listed file checked to exist."""
    data = Path(args.data_path)
    csv_path = data / "train_test_split.csv"
    ids = beat2.select_ids(beat2.read_split(csv_path), loader_type, args.training_speakers,
                           args.additional_data, csv_path)
    files = []
    for fid in ids:
        entry = {"id": fid, "speaker": beat2.speaker_of(fid, csv_path), "motion": data / args.pose_rep / f"{fid}.npz"}
        if args.audio_rep:
            entry["audio"] = data / AUDIO_DIR / f"{fid}.wav"
        if args.word_rep:
            entry["words"] = data / args.word_rep / f"{fid}.TextGrid"
        for key in ("motion", "audio", "words"):
            if key in entry and not entry[key].is_file():
                raise FileNotFoundError(f"{entry[key]}: missing; '{fid}' is listed for {loader_type} in {csv_path}")
        files.append(entry)
    return files


def check_settings(args):
    if args.ori_joints != "beat_smplx_joints":
        raise ValueError(f"config key 'ori_joints': only beat_smplx_joints (165-D SMPL-X) is supported, "
                         f"got {args.ori_joints!r}")
    if args.pose_fps != 30:
        raise ValueError(f"config key 'pose_fps': BEAT2 motion is 30 fps and is used unresampled, got {args.pose_fps}")
    if args.audio_rep not in (None, "amplitude+ctc+audio"):
        raise ValueError(f"config key 'audio_rep': only amplitude+ctc+audio is implemented, got {args.audio_rep!r}")


# ---------------------------------------------------------------------------------------------- build

def _plan(args, entry):
    """Validate one file's inputs and decide its usable length in whole seconds (§3.3)."""
    motion = beat2.read_motion(entry["motion"])
    n_frames = motion["poses"].shape[0]
    seconds = n_frames // args.pose_fps
    if "audio" in entry:
        n_samples = beat2.audio_length(entry["audio"], args.audio_sr)
        audio_s, motion_s = n_samples / args.audio_sr, n_frames / args.pose_fps
        if motion_s - audio_s > MAX_AUDIO_SHORTFALL_S:
            raise ValueError(f"{entry['audio']}: audio is {motion_s - audio_s:.2f} s shorter than the motion in "
                             f"{entry['motion']} ({audio_s:.2f} s vs {motion_s:.2f} s)")
        seconds = min(seconds, n_samples // args.audio_fps)
    if "words" in entry:
        end = max((e for _, e, _ in beat2.read_words(entry["words"])), default=0.0)
        if "audio" in entry and end - audio_s > TEXTGRID_TOLERANCE_S:
            log.warning(f"{entry['words']}: TextGrid ends at {end:.2f} s, {end - audio_s:.2f} s after the "
                        f"end of the audio ({audio_s:.2f} s)")
    if seconds == 0:
        log.warning(f"{entry['motion']}: shorter than one second, skipped")
    return seconds


def _features(args, entry, seconds, mask, body, vocab, ctc):
    """All stored features of one file, cut to whole seconds."""
    motion = beat2.read_motion(entry["motion"])
    n = seconds * args.pose_fps
    pose = motion["poses"][:, mask]
    if body is not None:
        with torch.no_grad():
            joints = body(motion["poses"], motion["betas"], motion["expressions"], motion["trans"],
                          return_vertices=False)["joints"][:, :55].numpy()
        pose = np.concatenate([pose, beat2.foot_contact(joints)], axis=1)
    out = {"pose": pose[:n], "trans": motion["trans"][:n], "betas": motion["betas"]}
    if args.facial_rep:
        out["facial"] = motion["expressions"][:n]
    if "audio" in entry:
        y = beat2.read_audio(entry["audio"], args.audio_sr)
        out["audio"] = beat2.audio_features(y, ctc, args.audio_sr)[:seconds * args.audio_fps]
    if "words" in entry:
        words = beat2.read_words(entry["words"])
        out["word"] = beat2.word_indices(words, motion["poses"].shape[0], vocab, args.pose_fps)[:n]
    return out


class _ArrayFile:
    """One cache array written front to back as a .npy file. Not a memory map: a sparse memory-mapped file that runs
    out of disk kills the process with SIGBUS, where an ordinary write raises OSError (a full disk, with a message)."""

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0
        self.file = open(path, "wb", buffering=0)  # whole arrays per write: nothing left to fail when closing
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, rows):
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise RuntimeError(f"{self.path}: rows of shape {rows.shape} do not fit the layout {self.shape}")
        data = memoryview(rows.reshape(-1)).cast("B")  # flat: a view with a zero in its shape cannot be cast
        while data:  # an unbuffered write may take fewer bytes (the next one then raises ENOSPC)
            data = data[self.file.write(data):]
        self.rows += len(rows)

    def close(self):
        self.file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, the layout has {self.shape[0]}")


def _build(args, loader_type, files, with_contacts, speaker_id, vocab, ctc, fingerprint, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(target, tags=("tmp", "old"))
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {}
    try:
        seconds = [_plan(args, e) for e in files]
        kept = [(e, s) for e, s in zip(files, seconds) if s > 0]
        if not kept:
            raise ValueError(f"{args.data_path}: no file of split '{loader_type}' has a whole second of data")
        mask = joint_mask(args.tar_joints)
        n_frames = [s * args.pose_fps for _, s in kept]
        n_samples = [s * args.audio_fps for _, s in kept]
        frames, samples = sum(n_frames), sum(n_samples)
        layout = {"pose": ((frames, int(mask.sum()) + (4 if with_contacts else 0)), np.float32),
                  "trans": ((frames, 3), np.float32)}
        if args.facial_rep:
            layout["facial"] = ((frames, beat2.MOTION_KEYS["expressions"]), np.float32)
        if args.word_rep:
            layout["word"] = ((frames,), np.int32)
        if args.audio_rep:
            layout["audio"] = ((samples, 3), np.float32)
        size = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in layout.values())
        with _writing(target, size):
            arrays = {k: _ArrayFile(tmp / f"{k}.npy", shape, dtype) for k, (shape, dtype) in layout.items()}
        betas = np.zeros((len(kept), beat2.N_BETAS), dtype=np.float32)
        body = load_body_model(args) if with_contacts else None
        records, frame_at, sample_at = [], 0, 0
        for i, (entry, sec) in enumerate(tqdm(kept, desc=f"caching {loader_type} features", unit="file")):
            feats = _features(args, entry, sec, mask, body, vocab, ctc)
            with _writing(target, size):
                for k, a in arrays.items():
                    a.append(feats[k])
            betas[i] = feats["betas"]
            records.append({"id": entry["id"], "speaker_id": speaker_id(entry["speaker"]), "seconds": sec,
                            "frame_offset": frame_at, "n_frames": n_frames[i],
                            "audio_offset": sample_at, "n_samples": n_samples[i]})
            frame_at += n_frames[i]
            sample_at += n_samples[i]
        manifest = {"fingerprint": fingerprint, "files": records,
                    "arrays": {k: list(shape) for k, (shape, _) in layout.items()} | {"betas": list(betas.shape)}}
        with _writing(target, size):
            for a in arrays.values():
                a.close()
            np.save(tmp / "betas.npy", betas)
            with open(tmp / "manifest.json", "w") as f:  # written last
                json.dump(manifest, f)
        if target.exists():  # a directory rename cannot replace a non-empty directory: move the old one aside
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if _open(target, fingerprint)[0] is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process has just put the same cache in place
    except BaseException:
        for a in arrays.values():
            with contextlib.suppress(OSError):
                a.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _writing(target, size):
    """A failed write of the cache becomes a message naming the cache folder, its size and the way out."""
    try:
        yield
    except OSError as e:
        raise write_failure(e, target, "feature cache", f"It needs {size / 2**20:.1f} MiB; nothing was kept. Free "
                                                        "space there or point cache_path at a disk with room") from e


def _open(target, fingerprint):
    """(manifest, memmaps) of a trusted cache, or (None, reason)."""
    manifest_path = target / "manifest.json"
    if not manifest_path.is_file():
        return None, "no cache yet"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") != fingerprint:
            return None, "inputs or settings changed"
        arrays = {k: np.load(target / f"{k}.npy", mmap_mode="r") for k in manifest["arrays"]}
        if any(list(a.shape) != manifest["arrays"][k] for k, a in arrays.items()):
            return None, "array shapes do not match the manifest"
    except (OSError, ValueError, KeyError) as e:
        return None, f"unreadable ({e})"
    return manifest, arrays


def load_or_build(args, loader_type, with_contacts, speaker_id, vocab):
    """The split's cached features: (manifest, {name: memmap}). Built (once) when missing or stale."""
    check_settings(args)
    files = split_files(args, loader_type)
    ctc = beat2.load_ctc_model(args.ctc_model) if args.audio_rep else None
    fingerprint = _sha({
        "version": CACHE_VERSION, "contacts": with_contacts, "speaker_ids": [speaker_id(f["speaker"]) for f in files],
        "settings": {k: getattr(args, k) for k in ("tar_joints", "pose_rep", "pose_fps", "facial_rep", "audio_rep",
                                                   "audio_sr", "audio_fps", "word_rep")},
        "inputs": [[_file_signature(f[k]) for k in ("motion", "audio", "words") if k in f] for f in files],
        "vocab": _vocab_identity(vocab) if args.word_rep else None,
        "ctc": _ctc_identity(args.ctc_model, ctc) if args.audio_rep else None,
        "body": _body_identity(args) if with_contacts else None,
    })
    target = cache_root(args) / loader_type
    if args.new_cache:
        reason = "new_cache is set"
    else:
        manifest, arrays = _open(target, fingerprint)
        if manifest is not None:
            return manifest, arrays
        reason = arrays
    log.info(f"building the {loader_type} cache in {target}: {reason}")
    _build(args, loader_type, files, with_contacts, speaker_id, vocab, ctc, fingerprint, target)
    manifest, arrays = _open(target, fingerprint)
    if manifest is None:
        raise RuntimeError(f"{target}: cache unreadable right after it was built ({arrays})")
    return manifest, arrays


# ---------------------------------------------------------------------------------------------- mean velocity

def load_mean_velocity(args):
    """(55,) mean joint speed (§3.9): data_path/weights/mean_vel_<pose_rep>.npy, else computed over every npz of
    the dataset, keyed by its inputs, and saved beside the per-config cache folders (the parent of the cache root)
    so that every config on the same data computes it once; the dataset dir may be read-only."""
    name = f"mean_vel_{args.pose_rep}"
    shipped = Path(args.data_path) / "weights" / f"{name}.npy"
    npzs = [] if shipped.is_file() else sorted((Path(args.data_path) / args.pose_rep).glob("*.npz"))
    key = _sha([_file_signature(p) for p in npzs] + [_body_identity(args)])[:16]
    computed = cache_root(args).parent / f"{name}_{key}.npy"
    for path in (shipped, computed):
        if path.is_file():
            vel = np.load(path)
            if vel.shape != (55,):
                raise ValueError(f"{path}: expected shape (55,), got {vel.shape}")
            return vel.astype(np.float32)
    if not npzs:
        raise FileNotFoundError(f"no {shipped} and no npz files in {Path(args.data_path) / args.pose_rep}")
    body = load_body_model(args)
    joints = []
    for p in tqdm(npzs, desc="mean joint velocity", unit="file"):
        m = beat2.read_motion(p)
        with torch.no_grad():
            joints.append(body(m["poses"], m["betas"], m["expressions"], m["trans"],
                               return_vertices=False)["joints"][:, :55].numpy())
    vel = beat2.mean_velocity(joints, args.pose_fps)
    computed.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(computed, "mean velocity file") as tmp, open(tmp, "wb") as f:
        np.save(f, vel)
    log.info(f"no {shipped}: mean joint velocity computed over {len(npzs)} files, saved to {computed}")
    return vel


def load_start_pose(args):
    """(165,) mean axis-angle pose of the first `pre_frames` frames of the training recordings (configured speakers):
    how a recording typically starts, the seed test-time generation starts from when it uses no ground truth (the
    published test seeds with the test recording's own first frames). Computed once into the cache root, keyed by the
    files. Averaging axis-angle vectors is close to the mean rotation for the small spread of a standing speaker's
    joints, and the seed only has to be plausible."""
    return _start_frames(args)[:165]


def load_start_trans(args):
    """(3,) mean root translation of the same frames: where (and at what height) the speakers stand when they start."""
    return _start_frames(args)[165:168]


def _start_frames(args):
    npzs = sorted(entry["motion"] for entry in split_files(args, "train"))
    if not npzs:
        raise FileNotFoundError(f"no training files in {Path(args.data_path) / 'train_test_split.csv'} for speakers "
                                f"{args.training_speakers}: no start pose to seed generation with")
    key = _sha([_file_signature(p) for p in npzs] + [args.pre_frames])[:16]
    path = cache_root(args) / f"start_pose_trans_{args.pose_rep}_{key}.npy"
    if path.is_file():
        return np.load(path)
    motions = [beat2.read_motion(p) for p in npzs]
    mean = np.concatenate([np.concatenate([m["poses"][:args.pre_frames], m["trans"][:args.pre_frames]], axis=1)
                           for m in motions]).mean(0).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "start pose file") as tmp, open(tmp, "wb") as f:
        np.save(f, mean)
    return mean


# ---------------------------------------------------------------------------------------------- dataset

class BeatDataset(torch.utils.data.Dataset):
    """Windows of the cached features. train/val: `pose_length`-frame windows every `stride` frames over whole
    seconds; test: one item per file, the whole sequence. `whole` (default: test only) cuts any split into whole
    sequences (the demo scores its decoding on whole val recordings). Items: dict of tensors as spec §3.8."""

    def __init__(self, args, loader_type, with_contacts, speaker_id, whole=None):
        if loader_type not in ("train", "val", "test"):
            raise ValueError(f"loader_type must be train, val or test, got {loader_type!r}")
        self.loader_type = loader_type
        self.whole = loader_type == "test" if whole is None else bool(whole)
        self.vocab = beat2.get_vocab(args) if args.word_rep else None
        manifest, self._arrays = load_or_build(args, loader_type, with_contacts, speaker_id, self.vocab)
        self.cache_dir = cache_root(args) / loader_type
        self.files = manifest["files"]
        self.avg_vel = load_mean_velocity(args)
        self.betas = np.array(self._arrays["betas"])
        self.windows = self._cut(args)
        self.n_items = len(self.windows)

    def _cut(self, args):
        """(N, 5) int64: file index, first frame, frames, first audio sample, samples (all within the file)."""
        fps, afps = args.pose_fps, args.audio_fps
        first, last = args.clean_first_seconds, args.clean_final_seconds
        rows = []
        for f, rec in enumerate(self.files):
            s0, e = first * fps, rec["n_frames"] - last * fps
            if e <= s0:
                continue
            if self.whole:  # one whole sequence (the published code's test also mutates args.stride here)
                rows.append((f, s0, e - s0, first * afps, (e - s0) * afps // fps))
                continue
            for ratio in args.multi_length_training:
                cut = int(args.pose_length * ratio)
                for i in range((e - s0 - cut) // args.stride + 1 if e - s0 >= cut else 0):
                    rows.append((f, s0 + i * args.stride, cut, first * afps + i * args.stride * afps // fps,
                                 math.floor(cut / fps * afps)))
        return np.array(rows, dtype=np.int64).reshape(-1, 5)

    def __len__(self):
        return len(self.windows)

    @property
    def file_ids(self):
        """The BEAT2 id of each item's file (test items are whole files, so one id per item)."""
        return [self.files[f]["id"] for f in self.windows[:, 0].tolist()]

    def __getstate__(self):  # DataLoader workers reopen the memmaps instead of pickling their contents
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrays = {p.stem: np.load(p, mmap_mode="r") for p in self.cache_dir.glob("*.npy")}

    def _frames(self, name, start, n, dtype=torch.float32):
        if name not in self._arrays:
            return torch.tensor([-1], dtype=dtype)  # feature not configured: the published placeholder
        return torch.from_numpy(np.array(self._arrays[name][start:start + n]))

    def __getitem__(self, k):
        f, start, n, a_start, a_len = self.windows[k].tolist()
        rec = self.files[f]
        fo = rec["frame_offset"] + start
        return {
            "pose": self._frames("pose", fo, n),
            "audio": self._frames("audio", rec["audio_offset"] + a_start, a_len),
            "facial": self._frames("facial", fo, n),
            "beta": torch.from_numpy(self.betas[f]).expand(n, -1).clone(),
            "word": self._frames("word", fo, n, torch.int32),
            "id": torch.full((n, 1), float(rec["speaker_id"])),
            "emo": torch.tensor([-1], dtype=torch.int32),
            "sem": torch.tensor([-1], dtype=torch.float32),
            "trans": self._frames("trans", fo, n),
        }
