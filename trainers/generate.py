"""Windowed generation (spec §7), shared by validation, test.py and infer.py.

A sequence is generated in 64-frame windows that overlap by `pre_frames` (4): each window is seeded with the last
4 decoded frames of the previous one, so windows of one sequence run one after another while windows of different
sequences are batched together.

Two protocols:
  * default: every frame is generated (the last window is padded and the output trimmed), audio windows start at the
    exact sample of their first frame, and the first window is seeded with a given seed (in test.py the training
    split's mean pose held still; a neutral standing pose when none is given), never silently with ground truth.
  * paper_protocol: the published test (§7.1, §10.3 #6, #7): the sequence is cut to a multiple of 8 frames and then
    to 60*k + 4 frames, audio is sliced with 533 samples per frame, window 0 is seeded with ground truth and the seed
    translation of later windows integrates the lower VQ's unsupervised translation channels from the first frame.
"""
import bisect
import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass

import torch

from models.layers import BasicBlock, WavEncoder
from utils.cuda_graph import GraphedFunction, graph_streams, run_parallel
from utils.rotation import (axis_angle_to_rot6d, matrix_to_rotation_6d, rot6d_to_axis_angle, rotation_6d_to_matrix)
from utils.skeleton import PART_JOINTS, REST_TRANS, rest_pose

SAMPLES_PER_SECOND = 16000
FPS = 30
PARTS = ("face", "upper", "hands", "lower")
# On a GPU the per-window step (generator, code choice, VQ decoding, next seed) and the encoders (per chunk of windows)
# replay as CUDA graphs, one per batch size; False runs them eagerly (same results).
CUDA_GRAPHS = True
# Windows per call of the audio/text encoders: large batches on GPUs and under CPU bf16 (oneDNN's AMX kernels);
# float32 on a CPU runs fastest window by window (a 64-frame window's activations stay in cache).
ENCODE_BATCH = {"cuda": 64, "cpu-bf16": 8, "cpu": 1}
FACE_BATCH = {"cuda": 256, "cpu": 4}  # windows per call of the face branch (it runs behind the window steps)
LEAK_BLOCK = 256   # frames per block of the leaky integration's closed form
# On GPUs the audio/text conditioning of a group's windows is queued on a side stream, chunk by chunk, and each window
# step waits only for its chunk (the encoders' large convolutions overlap the chain of small window-step kernels); the
# face branch runs on a second side stream behind the steps whose features it reads. False: all on the main stream.
SIDE_STREAMS = True
CHUNKS_AHEAD = 2   # chunks of conditioning queued ahead of the one the window chain reads
NOISE_CHUNK = 32   # windows whose sampling noise is drawn at once, ahead of their steps
GLOBAL_PAD = 16    # frames repeated at each end before the global-motion model (its receptive field is smaller)
# MambaTalk.generation_condition's outputs that window_step reads, in its argument order
CONDITION = ("spk_body", "face_feat", "body_query", "memory")
ENCODED = CONDITION + ("spk_face",)  # what the encoders compute per window: CONDITION and the face branch's input


@dataclass
class Sequence:
    """One generation request. `audio` (L, 3) holds the three 16 kHz channels of §3.4; `word` (T,) vocab indices."""
    audio: torch.Tensor
    word: torch.Tensor
    speaker: int
    n_frames: int
    seed: torch.Tensor = None         # (pre_frames, 337): 6D pose, translation, contacts; None -> neutral pose
    start_trans: torch.Tensor = None  # (3,) root translation of frame 0 (x/z integration start); None -> seed's
    sample_key: int = 0               # seeds the code sampling of this sequence (temperature > 0)


def orthonormalise_6d(x):
    """Re-project flat 6D vectors (..., 6J) onto valid rotations."""
    shape = x.shape
    return matrix_to_rotation_6d(rotation_6d_to_matrix(x.reshape(*shape[:-1], -1, 6))).reshape(shape)


def scatter_parts(part_aa):
    """{table: (..., 3J) axis-angle} -> (..., 165) with every other joint (eyes included) at zero rotation."""
    first = next(iter(part_aa.values()))
    full = first.new_zeros(*first.shape[:-1], 55, 3)
    joints = _joint_index(tuple(part_aa), full.device)
    full[..., joints, :] = torch.cat(list(part_aa.values()), dim=-1).unflatten(-1, (-1, 3))
    return full.reshape(*first.shape[:-1], 165)


_JOINT_INDEX = {}  # (tables, device) -> index tensor; a dict, not lru_cache, which torch.compile does not trust


def _joint_index(tables, device):
    """The joints of PART_JOINTS[table] (a name, or a tuple of names: their lists one after another) as a tensor on
    `device`, made once (indexing with a list copies it over every call, which a CUDA graph cannot hold)."""
    if (tables, device) not in _JOINT_INDEX:
        names = (tables,) if isinstance(tables, str) else tables
        _JOINT_INDEX[tables, device] = torch.tensor([j for t in names for j in PART_JOINTS[t]], device=device)
    return _JOINT_INDEX[tables, device]


def assemble_pose(upper6d, hands6d, legs6d, jaw6d=None):
    """Part 6D outputs -> (..., 165) axis-angle (§7.1 step 6); the jaw is identity when not given."""
    tables = ["beat_smplx_upper", "beat_smplx_hands", "beat_smplx_lower"] + (["beat_smplx_face"] if jaw6d is not None
                                                                              else [])
    parts = [upper6d, hands6d, legs6d] + ([jaw6d] if jaw6d is not None else [])
    # one conversion for the joints of all parts (per-joint arithmetic: the same values, a quarter of the kernels)
    aa = rot6d_to_axis_angle(torch.cat(parts, dim=-1))
    sizes = [p.shape[-1] // 2 for p in parts]
    return scatter_parts(dict(zip(tables, aa.split(sizes, dim=-1))))


def integrate(v, x0, leak=0.0, anchor=None):
    """pos[0] = x0, pos[t] = pos[t-1] + v[t-1] / fps, along dim 1. With leak > 0 each step also pulls the position
    back towards `anchor` (default x0) by that share of the distance: pos[t] = pos[t-1] + v[t-1] / fps
    - leak * (pos[t-1] - anchor), so a small bias of the predicted velocity no longer adds up to a walk."""
    if leak <= 0:
        return torch.cat([x0[:, None], x0[:, None] + torch.cumsum(v[:, :-1] / FPS, dim=1)], dim=1)
    anchor = x0 if anchor is None else anchor
    keep = 1.0 - leak
    steps = (v[:, :-1] / FPS).double()
    d, out = (x0 - anchor).double(), [(x0 - anchor).double()[:, None]]
    # closed form of the linear recursion d[t] = keep * d[t-1] + step[t-1], in blocks short enough that keep^-t stays
    # far from overflow on any recording length
    for b in range(0, steps.shape[1], LEAK_BLOCK):
        block = steps[:, b:b + LEAK_BLOCK]
        powers = keep ** torch.arange(1, block.shape[1] + 1, device=v.device, dtype=torch.float64)
        seg = powers * (d[:, None] + torch.cumsum(block / powers, dim=1))
        out.append(seg)
        d = seg[:, -1]
    return (anchor[:, None] + torch.cat(out, dim=1)).to(v.dtype)


def root_leak(args, paper_protocol):
    """Per-frame leak of the root's floor position towards where the sequence started (`root_anchor_seconds` is its
    time constant; 0 = none, and none under the paper protocol). A non-zero leak also edge-pads the global-motion
    model's input (global_motion): 0 keeps the root exactly as published."""
    seconds = 0.0 if paper_protocol else float(getattr(args, "root_anchor_seconds", 0.0))
    return 1.0 / (seconds * FPS) if seconds > 0 else 0.0


def edge_padded(fn, x, pad, lengths=None):
    """fn(x, keep) for a sequence model over dim 1 of x (B, T, ...), with x's first and last frames repeated `pad`
    times on either side and the output cut back to T frames: convolutions see zeros past the ends otherwise.
    lengths (B,) int tensor: row b holds a sequence of lengths[b] frames (zeros or anything after): its edges are its
    own, and fn gets keep (B, T + 2 pad, 1), 1 on each row's padded sequence (run_layers); keep is None without
    lengths. The output past each row's length is not meaningful."""
    if lengths is None:
        if pad == 0:
            return fn(x, None)
        ends = (x[:, :1].expand(-1, pad, *x.shape[2:]), x[:, -1:].expand(-1, pad, *x.shape[2:]))
        return fn(torch.cat([ends[0], x, ends[1]], dim=1), None)[:, pad:pad + x.shape[1]]
    frames = torch.arange(-pad, x.shape[1] + pad, device=x.device)
    keep = (frames[None] < lengths[:, None] + pad)[..., None].float()
    if pad:  # frame t of row b reads x[b, clamp(t, 0, lengths[b] - 1)]: each row's own ends, repeated
        index = torch.minimum(frames.clamp(min=0)[None], lengths[:, None] - 1)
        x = x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    return fn(x, keep)[:, pad:pad + x.shape[1] - 2 * pad]


def global_motion(vq, to_global, pad, lengths=None):
    """The global-motion model on (B, T, C), edge-padded by `pad` frames: with zero padding the root height of the
    first frames came out some 10 cm off and then rose 4 cm per frame. lengths: see edge_padded."""
    return edge_padded(lambda x, keep: vq["global_motion"](x, keep)["rec_pose"], to_global, pad, lengths)


def choose_codes(vq, out, cls_weights, temperature=0.0, top_k=0, noise_key=None, hold=1, upper_block=0,
                 upper_top_k=0, noise=None):
    """Per part of `out`: the classifier's code when its loss weight is non-zero, else the nearest code of the regressed
    latent (published: body parts classified, face nearest). Returns {part: ('index', (B,T)) or ('latent', (B,T,C))}.

    temperature 0 takes the argmax (published). temperature > 0 samples from softmax(logits / temperature), restricted
    to the `top_k` most likely codes when top_k > 0, by the Gumbel-max trick with noise from `sample_noise(noise_key)`:
    a weakly trained generator's argmax falls back on its most frequent code (the rest pose), while a sample keeps the
    motion its code distribution describes. `hold` consecutive frames share one draw of the noise, so that the code
    changes where the logits do rather than on every frame (held strokes instead of flicker).

    upper_block > 0 (sampling only): the upper body's codes (spine, arms), which place the hands and so most of the
    joint positions, are chosen once per block of that many frames, from the block's mean log-probability plus one
    Gumbel draw, among its `upper_top_k` best codes (0 = all): independent draws frame by frame average out, in the
    VQ decoder, to small movements around the rest pose, where the ground truth makes large strokes (block_codes).

    `noise` {part: noise}: the Gumbel noise drawn ahead (window_noise), instead of drawing it here from noise_key."""
    codes = {}
    for n, part in enumerate(PARTS):
        if f"rec_{part}" not in out:  # the body window step and the face branch each score their own parts
            continue
        if cls_weights[part] == 0:
            q = vq[part].quantizer
            codes[part] = ("latent", q.get_codebook_entry(q.map2index(out[f"rec_{part}"])))
            continue
        logits = out[f"cls_{part}"]
        if temperature > 0 and part == "upper" and upper_block > 0:
            codes[part] = ("index", block_codes(logits.float() / temperature, upper_block, upper_top_k,
                                                None if noise is not None else noise_key * len(PARTS) + n,
                                                None if noise is None else noise[part]))
            continue
        if temperature > 0:
            logits = logits.float() / temperature
            if 0 < top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            T, K = logits.shape[1:]
            logits = logits + (noise[part] if noise is not None else gumbel_noise(noise_key, n, T, K, hold))
        codes[part] = ("index", logits.argmax(dim=-1))
    return codes


def gumbel_noise(noise_key, n_part, rows, n_codes, hold=1):
    """Gumbel(0, 1) noise (B, rows, n_codes) of part PARTS[n_part] for each key of `noise_key` (B,), `hold`
    consecutive rows sharing one draw: what choose_codes adds to a part's logits (rows = frames) or block_codes to
    its block scores (rows = blocks). It depends on nothing generated, so generate() draws it for many windows at
    once, outside the window chain (some 80 small kernels per step)."""
    u = sample_noise(noise_key * len(PARTS) + n_part, (-(-rows // hold), n_codes))
    return -torch.log(-torch.log(u.repeat_interleave(hold, dim=1)[:, :rows]))


def block_codes(logits, frames, top_k, key=None, noise=None):
    """One sampled code per block of `frames` frames of (B, T, K) logits (already divided by the temperature), held
    for the whole block: Gumbel-max on the block's mean log-probability, i.e. a draw from the normalised geometric
    mean of its frames' distributions, restricted to the `top_k` best of them when top_k > 0 (a short last block
    averages the frames it has). Noise (B, blocks, K): `noise`, else drawn from sample_noise(key), one per block."""
    B, T, K = logits.shape
    n_blocks = -(-T // frames)
    pad = n_blocks * frames - T
    logp = torch.nn.functional.pad(torch.log_softmax(logits, dim=-1), (0, 0, 0, pad))
    count = torch.full((n_blocks, 1), float(frames), device=logits.device)
    count[-1] -= pad
    score = logp.unflatten(1, (n_blocks, frames)).sum(dim=2) / count
    if 0 < top_k < K:
        kth = score.topk(top_k, dim=-1).values[..., -1:]
        score = score.masked_fill(score < kth, float("-inf"))
    if noise is None:
        noise = -torch.log(-torch.log(sample_noise(key, (n_blocks, K))))
    score = score + noise
    return score.argmax(dim=-1).repeat_interleave(frames, dim=1)[:, :T]


def _splitmix64(x):
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic; logical shifts emulated with masks)."""
    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)
    x = (x ^ shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ shr(x, 31)


def _signed(u):
    return u - (1 << 64) if u >= 1 << 63 else u


def sample_noise(key, shape):
    """Uniform (0, 1) noise of `shape` for each row of `key` (B,) int64: a counter-based hash of (key, position), so a
    sequence gets the same noise whatever it is batched with, on any device, and inside a CUDA graph."""
    count = math.prod(shape)
    pos = torch.arange(count, device=key.device, dtype=torch.int64)
    x = _splitmix64((key[:, None] + 1) * _signed(0x9E3779B97F4A7C15) + pos[None, :])
    u = ((x >> 11) & ((1 << 53) - 1)).double().add_(0.5).div_(float(1 << 53))
    return u.float().clamp_(1e-7, 1 - 1e-7).reshape(key.shape[0], *shape)


def decode_codes(vq, codes, pad=None, lengths=None):
    """Codes -> decoded part motion {part: (B, T, C)}. pad {part: n}: that part decoded edge-padded by n frames
    (edge_padded). For the legs, zero padding made a transient in the first frames, which the global-motion model
    turned into a height dip of some 4 cm at frame 0 (a demo model: a 2.3 cm root jump between frames 0 and 1).
    lengths (B,): rows of different lengths, each decoded as if alone (edge_padded)."""
    pad = pad or {}
    return {part: edge_padded(vq[part].decode if kind == "index" else vq[part].decoder, value, pad.get(part, 0),
                              lengths) for part, (kind, value) in codes.items()}


def decoded_to_motion(vq, decoded, start_xz, leak=0.0, edge_pad=0, start_y=None, lengths=None):
    """Decoded parts -> pose (B,T,165), expressions (B,T,100), translation (B,T,3), contacts (B,T,4) (§7.1 step 6).
    leak: see integrate; edge_pad: see global_motion (0, 0: as published). start_y (B,): the height the speaker
    stands at; the predicted height then only says how it varies (its mean is moved there), as a briefly trained
    global-motion model's height was off by 11 cm (None: the predicted height as it is, published).
    lengths (B,): rows of different lengths (edge_padded); each row's frames past its length are not meaningful."""
    lower = decoded["lower"]
    legs6d = orthonormalise_6d(lower[..., :54])
    pose = assemble_pose(decoded["upper"], decoded["hands"], legs6d, decoded["face"][..., :6])
    contacts = lower[..., 57:61]
    to_global = torch.cat([legs6d, torch.zeros_like(lower[..., 54:57]), contacts], dim=-1)
    rec_global = global_motion(vq, to_global, edge_pad, lengths)
    # x and z as one batch of rows (strided slices: see _next_seed); the integration is causal, so frames past a
    # row's length do not reach its own frames
    x, z = integrate(rec_global[..., 54:57:2].transpose(1, 2).flatten(0, 1), start_xz.flatten(), leak) \
        .unflatten(0, (-1, 2)).unbind(1)
    y = rec_global[..., 55]
    if start_y is not None:
        if lengths is None:
            mean = y.mean(dim=1, keepdim=True)
        else:
            inside = torch.arange(y.shape[1], device=y.device)[None] < lengths[:, None]
            mean = (y * inside).sum(dim=1, keepdim=True) / lengths[:, None]
        y = y - mean + start_y[:, None]
    trans = torch.stack([x, y, z], dim=-1)
    return pose, decoded["face"][..., 6:], trans, contacts


def neutral_seed(pre_frames, device, pose=None):
    """A still standing pose with feet in contact, as (pre_frames, 337): `pose` (165,) axis-angle (test.py passes
    the training split's mean pose), else the rest pose (identity rotations except arms lowered)."""
    pose = rest_pose() if pose is None else pose
    pose6d = axis_angle_to_rot6d(torch.as_tensor(pose, dtype=torch.float32, device=device))
    row = torch.cat([pose6d, torch.tensor(REST_TRANS, device=device), torch.ones(4, device=device)])
    return row.expand(pre_frames, -1).clone()


_REST_SEEDS = {}  # (pre_frames, device) -> neutral_seed of the rest pose


def _rest_seed(pre_frames, device):
    if (pre_frames, device) not in _REST_SEEDS:
        _REST_SEEDS[pre_frames, device] = neutral_seed(pre_frames, device)
    return _REST_SEEDS[pre_frames, device]


class WindowPlan:
    """Where each window of a sequence reads its audio and frames, under either protocol."""

    def __init__(self, n_frames, audio_len, window, pre, paper_protocol):
        hop = window - pre
        if paper_protocol:
            n8 = n_frames - n_frames % 8
            self.n_windows = (n8 - pre) // hop
            self.n_out = hop * self.n_windows + pre
            per_frame = SAMPLES_PER_SECOND // FPS
            self.audio_starts = [i * hop * per_frame for i in range(self.n_windows)]
            self.audio_len = per_frame * window
        else:
            self.n_windows = max(1, math.ceil((n_frames - pre) / hop))
            self.n_out = n_frames
            self.audio_starts = [round(i * hop * SAMPLES_PER_SECOND / FPS) for i in range(self.n_windows)]
            self.audio_len = math.floor(window / FPS * SAMPLES_PER_SECOND)
        self.frame_starts = [i * hop for i in range(self.n_windows)]
        if self.n_windows < 1:
            raise ValueError(f"sequence of {n_frames} frames is too short for the paper protocol "
                             f"(needs at least {window} frames)")


def _slice_pad(x, start, length, dim=0):
    """x[start:start+length] along dim 0, zero-padded past the end."""
    piece = x[start:start + length]
    if piece.shape[0] < length:
        pad = x.new_zeros(length - piece.shape[0], *x.shape[1:])
        piece = torch.cat([piece, pad], dim=0)
    return piece


@torch.no_grad()
def generate(model, vq, sequences, args, paper_protocol=False, batch_size=64, progress=None):
    """Generate motion for a list of `Sequence`s. Returns one dict per sequence with torch tensors on CPU:
    poses (n,165), expressions (n,100), trans (n,3), contacts (n,4).

    Sequences go in groups of `batch_size`, longest first. The audio/text conditioning of all of a group's windows is
    queued first, in large batches (ConditionChunks: it does not depend on the generated motion, and the audio
    encoders are most of the model's work; on GPUs it runs beside the window chain). Each group then runs its
    windows one after another at a fixed batch size
    (a sequence that has finished runs along, its steps unused), so the per-window step needs no host
    synchronisation and replays as a CUDA graph on GPUs. `args.amp == 'bf16'` runs the generator under bf16
    autocast (codes can differ from float32 where two logits are within rounding); the VQ decoders stay float32.
    """
    device = next(model.parameters()).device
    window, pre = args.pose_length, args.pre_frames
    cls_weights = {"face": args.cf, "upper": args.cu, "hands": args.ch, "lower": args.cl}
    amp = getattr(args, "amp", "none") == "bf16"
    sampling = (0.0, 0, 1, 0, 0) if paper_protocol else (
        float(args.code_temperature), int(args.code_top_k), int(getattr(args, "code_hold", 1)),
        int(getattr(args, "code_block_upper", 0)), int(getattr(args, "code_top_k_upper", 0)))
    leak = root_leak(args, paper_protocol)
    edge_pad = GLOBAL_PAD if leak > 0 else 0  # the root fixes come together (root_anchor_seconds > 0)
    model.eval()
    if amp:
        model = bf16_weights(model)
    plans = [WindowPlan(s.n_frames, s.audio.shape[0], window, pre, paper_protocol) for s in sequences]
    # the given seeds and start translations in one upload, and a neutral seed made once (a plain upload makes the
    # host wait for the GPU)
    given = [(x, x.shape[0]) for s in sequences for x in (s.seed, s.start_trans) if x is not None]
    given = iter(_upload_all(given, device, torch.float32))
    seeds, starts = [], []
    for s in sequences:
        seed = next(given) if s.seed is not None else _rest_seed(pre, device).clone()
        start_trans = next(given) if s.start_trans is not None else None
        if s.seed is None and start_trans is not None:
            seed[:, 330:333] = start_trans  # a neutral pose where the speaker starts
        seeds.append(seed)
        starts.append(seed[0, 330:333].clone() if start_trans is None else start_trans)
    kinds = {p: "index" if cls_weights[p] != 0 else "latent" for p in PARTS}
    order = sorted(range(len(sequences)), key=lambda i: -plans[i].n_windows)
    groups = [order[g:g + batch_size] for g in range(0, len(order), batch_size)]
    total_steps, done_steps = sum(plans[g[0]].n_windows for g in groups), 0
    results = [None] * len(sequences)
    for ids in groups:
        n_windows = [plans[i].n_windows for i in ids]
        # every window's conditioning, in chunks of window steps, queued ahead of the chain (on GPUs on a side
        # stream, so that the audio encoders run while the window steps do)
        chunks = ConditionChunks(model, [sequences[i] for i in ids], [plans[i] for i in ids], window, device, amp)
        seed, start = torch.stack([seeds[i] for i in ids]), torch.stack([starts[i] for i in ids])
        inputs = chunks.step_inputs(0)
        keys = _to_device([sequences[i].sample_key for i in ids], device, torch.int64) * 1000003
        noise = window_noise(kinds, sampling, keys, 0, min(NOISE_CHUNK, n_windows[0]), window, args.vae_codebook_size)
        step = _window_step(model, vq, kinds, pre, paper_protocol, amp, sampling, leak,
                            list(inputs) + [seed, start] + [v[0] for v in noise],
                            compiled=bool(getattr(args, "compile", False)))
        body_codes, face, pending = [], [], []
        face_stream = graph_streams(device)["face"] if device.type == "cuda" and SIDE_STREAMS else None
        for w in range(n_windows[0]):
            if w and w % NOISE_CHUNK == 0:
                noise = window_noise(kinds, sampling, keys, w, min(w + NOISE_CHUNK, n_windows[0]), window,
                                     args.vae_codebook_size)
            *part_codes, global_features, seed = step(*chunks.step_inputs(w), seed, start,
                                                      *[v[w % NOISE_CHUNK] for v in noise])
            chunks.queue_ahead(w)
            body_codes.append(part_codes)
            pending.append(global_features)
            if len(pending) * len(ids) >= FACE_BATCH["cuda" if device.type == "cuda" else "cpu"] or \
                    w == n_windows[0] - 1:
                # the face branch does not feed the seed: many windows at once, beside the chain on GPUs
                spk_face = chunks.face_inputs(len(face), w + 1)
                face_keys = torch.cat([keys + k for k in range(len(face), w + 1)])
                codes_f = _beside(face_stream, face_codes, model, vq, kinds, spk_face, torch.cat(pending), amp,
                                  sampling, face_keys)
                face += list(codes_f.unflatten(0, (len(pending), len(ids))))
                pending = []
            done_steps += 1
            if progress is not None:
                progress(done_steps, total_steps)
        if face_stream is not None:
            torch.cuda.current_stream(device).wait_stream(face_stream)
        # the group's codes as one batch: window 0 whole, then each later window's frames after its seed; a sequence
        # that finished early holds its own codes first (its later steps' codes follow and are cut off)
        keep = lambda w: slice(0, window) if w == 0 else slice(pre, window)  # noqa: E731
        merged = {p: (kinds[p], torch.cat([c[:, keep(w)] for w, c in enumerate(part_codes)], dim=1))
                  for p, part_codes in zip(PARTS, [face] + [list(c) for c in zip(*body_codes)])}
        n_codes = [window + (window - pre) * (plans[i].n_windows - 1) for i in ids]
        start_xz = torch.stack([starts[i][0:3:2] for i in ids])  # slices: an index list makes the host wait for the GPU
        start_y = torch.stack([starts[i][1] for i in ids]) if leak > 0 else None
        # on GPUs the group is one batch of sequences of different lengths, each decoded as if alone (edge_padded): a
        # decode per sequence issued ~500 small kernels, and the host took longer to issue them than the GPU to run
        # them. On CPUs, where launches cost nothing, one sequence at a time (batched convolutions round differently)
        rows = [slice(None)] if device.type == "cuda" else [slice(j, j + 1) for j in range(len(ids))]
        for r in rows:
            lengths = _to_device(n_codes[r], device, torch.int64) if device.type == "cuda" else None
            part_codes = {p: (kind, v[r, :max(n_codes[r])]) for p, (kind, v) in merged.items()}
            decoded = decode_codes(vq, part_codes, pad={"lower": edge_pad}, lengths=lengths)  # legs feed the root
            motion = decoded_to_motion(vq, decoded, start_xz[r], leak, edge_pad,
                                       None if start_y is None else start_y[r], lengths)
            for j, i in list(enumerate(ids))[r]:
                results[i] = dict(zip(("poses", "expressions", "trans", "contacts"),
                                      (m[j - (r.start or 0), :plans[i].n_out] for m in motion)))
    # to the host only now, and in one copy (into pinned memory): a copy per sequence inside the loop made the host
    # wait for each sequence's decoding before queueing the next one's, and 60 small copies took 75 ms on a GPU host
    sizes = [v.numel() for r in results for v in r.values()]
    flat = torch.cat([v.reshape(-1) for r in results for v in r.values()])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda).copy_(flat) if flat.is_cuda else flat
    pieces = iter(host.split(sizes))
    return [{k: next(pieces).view(v.shape) for k, v in r.items()} for r in results]


def _beside(stream, fn, *args):
    """fn(*args) queued on `stream` (None: here) after all that this stream has queued. Its tensor arguments are kept
    for it and its output for this stream (the caching allocator would otherwise reuse their memory under the other
    one); this stream must wait for `stream` before it reads the output."""
    if stream is None:
        return fn(*args)
    here = torch.cuda.current_stream(stream.device)
    stream.wait_stream(here)
    with torch.cuda.stream(stream):
        out = fn(*args)
    for t in args:
        if isinstance(t, torch.Tensor):
            t.record_stream(stream)
    out.record_stream(here)
    return out


def encode_batch(device, amp):
    return ENCODE_BATCH["cuda" if device.type == "cuda" else "cpu-bf16" if amp else "cpu"]


def _to_device(values, device, dtype):
    """A list of numbers as a tensor on `device` (_upload: torch.tensor(..., device='cuda') from a list waits for all
    queued work first)."""
    return _upload(torch.tensor(values, dtype=dtype), device)


def _upload(t, device):
    """A CPU tensor to a GPU without making the host wait (through pinned memory)."""
    if device.type == "cuda" and not t.is_cuda:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _upload_all(pieces, device, dtype):
    """[(x, rows)]: each x as `dtype`, zero-padded to `rows` rows along dim 0, on `device`. On GPUs in one copy through
    one pinned buffer: a pinned copy per piece cost the host ~0.2 ms each, and the test set's chain waited for them."""
    if device.type != "cuda":
        return [_slice_pad(x, 0, rows).to(device, dtype) for x, rows in pieces]
    shapes = [(rows,) + tuple(x.shape[1:]) for x, rows in pieces]
    sizes = [math.prod(shape) for shape in shapes]
    buf = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
    offset = 0
    for (x, rows), size in zip(pieces, sizes):
        x = x[:rows].reshape(-1)
        buf[offset:offset + x.numel()].copy_(x)
        buf[offset + x.numel():offset + size].zero_()
        offset += size
    on_device = buf.to(device, non_blocking=True)
    return [v.view(shape) for v, shape in zip(on_device.split(sizes), shapes)]


class ConditionChunks:
    """MambaTalk.generation_condition of every window of a group of sequences (longest first), computed in chunks of
    window steps of about encode_batch() windows each (one encoder call), queued CHUNKS_AHEAD chunks ahead of the
    one the window chain reads. On GPUs they are queued on a side stream (SIDE_STREAMS) and the window steps wait
    only for the chunk they read: the audio encoders' large convolutions run beside the chain of small kernels.
    step_inputs(w): window step w's CONDITION tensors (B, ...); a sequence that has finished gets the first (longest)
    sequence's rows, which its unused step does not mind. face_inputs(a, b): spk_face of steps a..b-1,
    (steps * B, ...). queue_ahead(w): called after step w is queued, keeps the chunks ahead of the chain."""

    def __init__(self, model, sequences, plans, window, device, amp=False):
        n_windows = [p.n_windows for p in plans]
        self.device = device
        main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        side = graph_streams(device)["side"] if device.type == "cuda" and SIDE_STREAMS else None
        if side is not None:
            side.wait_stream(main)
        # the audio stays where it is and each chunk uploads the stretch its windows read: uploading the test set's
        # 183 MB at once (through pinned memory) took the host 40 ms before the first window step could be queued
        audio = [s.audio for s in sequences]
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():  # made and freed there
            words = _upload_all([(s.word, p.frame_starts[-1] + window) for s, p in zip(sequences, plans)], device,
                                torch.int64)
        self.model, self.sequences, self.plans, self.window, self.amp = model, sequences, plans, window, amp
        self.main, self.side, self.audio, self.words = main, side, audio, words
        # steps per chunk: a full encoder batch; the first chunk a small one (the chain starts when it is done), and on
        # GPUs the next ones growing from it (each is waited for by the chain while the ones before it are all it has)
        size, first_size = max(1, encode_batch(device, amp) // len(sequences)), max(1, 8 // len(sequences))
        self.first = [0]
        while self.first[-1] < n_windows[0]:
            grown = min(size, first_size << (len(self.first) - 1)) if device.type == "cuda" else size
            self.first.append(self.first[-1] + (first_size if len(self.first) == 1 else grown))
        self.first = self.first[:-1]
        self.chunks, self.events, self.waited = [], [], 0
        self._queue_until(0)

    def _queue_until(self, c):
        while len(self.chunks) <= min(c, len(self.first) - 1):
            self.chunks.append(self._queue(len(self.chunks)))

    def queue_ahead(self, w):
        """After window step w is queued: queue one more chunk if fewer than CHUNKS_AHEAD are queued past step w's. One
        at a time and only after a step, so that the host queues the chain's first steps as soon as their chunks are
        (the host queues a chunk in ~5 ms; on an H200 the test set's first step waited 27 ms for three of them)."""
        c = bisect.bisect_right(self.first, w) - 1
        if len(self.chunks) <= min(c + CHUNKS_AHEAD, len(self.first) - 1):
            self.chunks.append(self._queue(len(self.chunks)))

    def _queue(self, c):
        seqs, plans, window, side = self.sequences, self.plans, self.window, self.side
        n_windows = [p.n_windows for p in plans]
        w0 = self.first[c]
        w1 = self.first[c + 1] if c + 1 < len(self.first) else n_windows[0]
        n, graphs = encode_batch(self.device, self.amp), CUDA_GRAPHS and self.device.type == "cuda"
        items = [(j, w) for w in range(w0, w1) for j in range(len(seqs)) if w < n_windows[j]]
        # row of step w, sequence j within this chunk's items (a finished sequence: sequence 0's)
        pos = {item: k for k, item in enumerate(items)}
        rows = [pos.get((j, w), pos[0, w]) for w in range(w0, w1) for j in range(len(seqs))]
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            # sequence -> (first sample, this chunk's stretch of its audio on the device), uploaded at once
            ranges = {}
            for j in range(len(seqs)):
                last = min(w1, n_windows[j]) - 1
                if last >= w0:
                    ranges[j] = plans[j].audio_starts[w0], plans[j].audio_starts[last] + plans[j].audio_len
            pieces = _upload_all([(self.audio[j][a0:a1], a1 - a0) for j, (a0, a1) in ranges.items()], self.device,
                                 torch.float32)
            stretch = {j: (ranges[j][0], piece) for j, piece in zip(ranges, pieces)}
            parts = []
            for k in range(0, len(items), n):
                batch = items[k:k + n]
                if graphs:  # padded to a power of two (a graph per size), with copies of the last window
                    batch = batch + batch[-1:] * (min(n, 1 << (len(batch) - 1).bit_length()) - len(batch))
                a = torch.stack([stretch[j][1][plans[j].audio_starts[w] - stretch[j][0]:][:plans[j].audio_len]
                                 for j, w in batch])
                t = torch.stack([self.words[j][plans[j].frame_starts[w]:plans[j].frame_starts[w] + window]
                                 for j, w in batch])
                spk = _to_device([seqs[j].speaker for j, _ in batch], self.device, torch.int64)
                parts.append(_encoder(self.model, window, self.amp, (a, t, spk))(a, t, spk))
            index = _to_device(rows, self.device, torch.int64)
            chunk = {name: torch.cat([p[i] for p in parts])[index].unflatten(0, (w1 - w0, len(seqs)))
                     for i, name in enumerate(ENCODED)}
            if side is not None:
                for v in chunk.values():
                    v.record_stream(self.main)  # read there, freed here
                self.events.append(torch.cuda.Event())
                self.events[-1].record(side)
        return chunk

    def _chunk(self, w):
        c = bisect.bisect_right(self.first, w) - 1
        self._queue_until(c)
        while self.waited <= c and self.events:  # the main stream waits for the chunks it reads, once each
            torch.cuda.current_stream(self.device).wait_event(self.events[self.waited])
            self.waited += 1
        return c

    def step_inputs(self, w):
        c = self._chunk(w)
        return [self.chunks[c][name][w - self.first[c]] for name in CONDITION]

    def face_inputs(self, a, b):
        self._chunk(b - 1)
        rows = [self.chunks[c]["spk_face"][max(a, f) - f:b - f] for c, f in enumerate(self.first)
                if f < b and (c + 1 == len(self.first) or self.first[c + 1] > a)]
        return torch.cat(rows).flatten(0, 1)


def encode(model, window, amp, audio, words, speaker):
    """MambaTalk.generation_condition of a batch of windows (audio (n, L, 3), words (n, T), speaker (n,)) as a tuple
    in ENCODED order."""
    with torch.autocast(audio.device.type, dtype=torch.bfloat16, enabled=amp):
        cond = model.encode_condition(audio, words, speaker[:, None, None].expand(-1, window, 1), window)
        cond = model.generation_condition(cond)
    return tuple(cond[name] for name in ENCODED)


def _encoder(model, window, amp, example):
    """encode with its settings bound: on GPUs a CUDA graph per model and batch shape, kept while the model lives
    (an eager call queues some 400 kernels, and the host took longer to issue them than the GPU to run them)."""
    fn = functools.partial(encode, model, window, amp)
    if not (CUDA_GRAPHS and example[0].is_cuda):
        return fn
    key = ("encode", window, amp, tuple((t.shape, t.dtype) for t in example))
    cache = _graphs.setdefault(model, {})
    if key not in cache:
        # captured on a stream of their own: they replay beside the window steps' graphs (graph_streams)
        cache[key] = ((), GraphedFunction(fn, example, capture_stream=graph_streams(example[0].device)["condition"]))
    return cache[key][1]


def window_step(model, vq, kinds, pre, paper_protocol, amp, sampling, leak, compiled, spk_body, face_feat, body_query,
                memory, seed, start, *noise):
    """One window for a batch of sequences: codes of upper, hands and lower, the global features that the face
    branch needs (face_codes), and the next window's seed. sampling: choose_codes' (temperature, top_k, hold,
    upper_block, upper_top_k); noise: its Gumbel noise for each of sampled_parts(kinds, sampling), drawn ahead
    (window_noise). leak: see integrate. compiled: its three stages through torch.compile (_stage)."""
    condition = dict(spk_body=spk_body, face_feat=face_feat, body_query=body_query, memory=memory)
    n, window = spk_body.shape[:2]
    in_motion = seed.new_zeros(n, window, seed.shape[-1])
    in_motion[:, :pre] = seed
    mask = torch.ones_like(in_motion)
    mask[:, :pre] = 0
    tokens, global_features = _stage(body_tokens, compiled)(model, amp, condition, mask, in_motion)
    part_noise = dict(zip(sampled_parts(kinds, sampling), noise))
    # the parts as parallel branches of the window's CUDA graph (one after another elsewhere)
    branches = run_parallel([functools.partial(_stage(part_branch, compiled), model, vq, part, kinds, amp, sampling,
                                               tokens, spk_body, part_noise) for part in PARTS[1:]])
    window_codes = dict(zip(PARTS[1:], (b[0] for b in branches)))
    decoded = dict(zip(PARTS[1:], (b[1] for b in branches)))
    next_seed = _stage(_next_seed, compiled)(decoded, pre, start, paper_protocol, vq, seed, leak)
    return tuple(window_codes[p][1] for p in PARTS[1:]) + (global_features.float(), next_seed)


def body_tokens(model, amp, condition, mask, in_motion):
    """The window step up to the per-part branches: MambaTalk.body_tokens under the step's precision."""
    with torch.autocast(in_motion.device.type, dtype=torch.bfloat16, enabled=amp):
        return model.body_tokens(condition, mask, in_motion)


def part_branch(model, vq, part, kinds, amp, sampling, tokens, spk_body, noise):
    """One body part of a window step: its latent and logits, its code (choose_codes) and its decoded motion,
    independent of the other parts."""
    with torch.autocast(spk_body.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model.local_scan.part_output(part, *tokens, spk_body)
    out = {k: v.float() for k, v in out.items()}
    temperature, top_k, hold, upper_block, upper_top_k = sampling
    codes = choose_codes(vq, out, {part: 1.0 if kinds[part] == "index" else 0.0}, temperature, top_k, hold=hold,
                         upper_block=upper_block, upper_top_k=upper_top_k, noise=noise)
    return codes[part], decode_codes(vq, codes)[part]


def sampled_parts(kinds, sampling):
    """The body parts whose window-step codes are sampled (and get noise drawn ahead)."""
    return [p for p in PARTS[1:] if kinds[p] == "index"] if sampling[0] > 0 else []


def window_noise(kinds, sampling, keys, first, last, frames, n_codes):
    """The window steps' noise for windows first..last-1 of sequences keyed `keys` (B,): one (W, B, T, K) tensor per
    sampled part, window w keyed keys + w (what choose_codes would draw for it)."""
    parts = sampled_parts(kinds, sampling)
    if not parts:
        return []
    hold, upper_block = sampling[2:4]
    w = torch.arange(first, last, device=keys.device, dtype=torch.int64)
    key = (keys[None, :] + w[:, None]).flatten()
    noise = []
    for p in parts:
        if p == "upper" and upper_block > 0:  # one draw per block (block_codes)
            g = gumbel_noise(key, PARTS.index(p), -(-frames // upper_block), n_codes)
        else:
            g = gumbel_noise(key, PARTS.index(p), frames, n_codes, hold)
        noise.append(g.unflatten(0, (len(w), len(keys))))
    return noise


def face_codes(model, vq, kinds, spk_face, global_features, amp, sampling=(0.0, 0, 1), noise_key=None):
    """The face codes of windows, from the global features that their window steps returned (sampling and
    noise_key as in window_step)."""
    with torch.autocast(spk_face.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model.predict_face(spk_face, global_features)
    out = {name: v.float() for name, v in out.items()}
    return choose_codes(vq, out, {"face": 1.0 if kinds["face"] == "index" else 0.0}, *sampling[:2],
                        noise_key=noise_key, hold=sampling[2])["face"][1]


_bf16_copies = weakref.WeakKeyDictionary()  # model -> (parameter versions, copy with bf16 weights)


def bf16_weights(model):
    """For bf16 generation: an eval copy of `model` whose audio encoders' BatchNorms are folded into their
    convolutions (BasicBlock.fold_batchnorms) and whose linear, attention and convolution weights are stored in
    bf16, the values autocast casts them to on every call, so the casts go (a kernel per weight and call on a GPU;
    on a CPU half the memory traffic that bounds batch-1 matrix products: a 60-s clip's window steps ran 1.7x
    faster). Outputs agree with autocast's to bf16 rounding (tests/test_speed.py states the tolerance against
    float32). Kept while the model's parameters are unchanged (their version counters)."""
    params = dict(model.named_parameters())
    versions = tuple(p._version for p in params.values())
    cached = _bf16_copies.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    lower = {f"{name}.{p}" for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.MultiheadAttention))
             for p, _ in m.named_parameters(recurse=False)}
    shadow = copy.deepcopy(model).eval()
    for m in list(shadow.modules()):  # in float32, before the weights are rounded to bf16 (folding replaces modules)
        if isinstance(m, BasicBlock):
            m.fold_batchnorms()
        if isinstance(m, WavEncoder):
            m.__dict__.pop("_bn_list", None)  # its training-time list of BatchNorms
    for name, p in shadow.named_parameters():
        if name in lower and not getattr(params[name], "_keep_float32", False):
            p.data = p.data.to(torch.bfloat16)
    for m in shadow.modules():  # the audio CNNs run channels-last: their kernels too, or every call converts them
        if isinstance(m, WavEncoder):
            for conv in m.modules():
                if isinstance(conv, torch.nn.Conv1d):
                    conv.weight.data = conv.weight.data.transpose(1, 2).contiguous().transpose(1, 2)
    _bf16_copies[model] = (versions, shadow)
    return shadow


_graphs = weakref.WeakKeyDictionary()  # model -> {settings: (vq modules, GraphedFunction)}


def _window_step(model, vq, kinds, pre, paper_protocol, amp, sampling, leak, example, compiled=False):
    """window_step with its settings bound: a CUDA graph on GPUs (captured once per model, VQ set, batch size and
    settings, and kept while the model lives), else the eager function. `compiled` (config `compile: true`): the
    step's stages through torch.compile first (inductor fuses its ~300 small element-wise kernels; the first call of
    each batch size compiles for about a minute), then captured."""
    fn = functools.partial(window_step, model, vq, kinds, pre, paper_protocol, amp, sampling, leak, compiled)
    graphs = CUDA_GRAPHS and example[0].is_cuda
    if not (graphs or compiled):
        return fn
    vq_modules = tuple(vq[k] for k in sorted(vq))
    key = (tuple(kinds.items()), pre, paper_protocol, amp, sampling, leak, tuple((t.shape, t.dtype) for t in example),
           compiled)
    cache = _graphs.setdefault(model, {})
    if key not in cache or any(a is not b for a, b in zip(cache[key][0], vq_modules)):
        cache[key] = (vq_modules, GraphedFunction(fn, example) if graphs else fn)
    return cache[key][1]


_STAGES = {}  # function -> its _compiled version, made once (torch.compile's cache is per function object)


def _stage(fn, compiled):
    """A stage of the window step, compiled or not. The step is compiled stage by stage rather than as one function
    so that its body-part branches stay parallel streams of the captured graph (run_parallel), each branch fused."""
    if not compiled:
        return fn
    if fn not in _STAGES:
        _STAGES[fn] = _compiled(fn)
    return _STAGES[fn]


def _compiled(fn):
    """torch.compile(fn), traced and run with PyTorch's fused Transformer fast path off: traced, that fused op skips
    autocast's casts and fails on the bf16 weights of bf16 generation."""
    compiled = torch.compile(fn, dynamic=False)

    def run(*args):
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return compiled(*args)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    return run


def _next_seed(decoded, pre, start_trans, paper_protocol, vq, prev_seed, leak=0.0):
    """The last `pre` decoded frames of a window as the next window's seed (6D pose, translation, contacts)."""
    lower = decoded["lower"]
    legs6d = orthonormalise_6d(lower[..., :54])
    pose6d = seed_pose6d(decoded["upper"][:, -pre:], decoded["hands"][:, -pre:], legs6d[:, -pre:])
    contacts = lower[..., 57:61]
    if paper_protocol:
        # §10.3 #7: the lower VQ's translation channels, integrated from the sequence's first frame every window
        x = integrate(lower[..., 54], start_trans[:, 0])
        z = integrate(lower[..., 56], start_trans[:, 2])
        trans = torch.stack([x, lower[..., 55], z], dim=-1)
    else:
        # the global-motion model's root velocity, integrated on from where the previous seed ended (frame `pre-1` of
        # this window), pulled towards the sequence's start when leak > 0
        to_global = torch.cat([legs6d, torch.zeros_like(lower[..., 54:57]), contacts], dim=-1)
        rec_global = global_motion(vq, to_global, GLOBAL_PAD if leak > 0 else 0)[:, pre - 1:]
        # x and z as one batch of rows (fewer kernels in the window step)
        # (strided slices, not index lists: a list would be a host-to-device copy, which a CUDA graph cannot hold)
        xz = integrate(rec_global[..., 54:57:2].transpose(1, 2).flatten(0, 1),
                       prev_seed[:, pre - 1, 330:333:2].flatten(), leak, start_trans[:, 0:3:2].flatten())
        x, z = xz.unflatten(0, (-1, 2)).unbind(1)
        y = rec_global[..., 55]
        if leak > 0:  # at the speaker's standing height, as decoded_to_motion places the output
            y = y - y.mean(dim=1, keepdim=True) + start_trans[:, 1:2]
        trans = torch.stack([x, y, z], dim=-1)
    return torch.cat([pose6d, trans[:, -pre:], contacts[:, -pre:]], dim=-1)


def seed_pose6d(upper6d, hands6d, legs6d):
    """(..., 330) 6D pose of a seed: each part's 6D re-projected onto a rotation (what a round trip through
    axis-angle, assemble_pose then axis_angle_to_rot6d, gives up to rounding, in a few kernels instead of ~100);
    the joints of no part (jaw, eyes) at identity."""
    pose6d = upper6d.new_zeros(*upper6d.shape[:-1], 55, 6)
    pose6d[..., 0] = 1  # identity: rows (1, 0, 0) and (0, 1, 0)
    pose6d[..., 4] = 1
    # the three parts re-projected in one call (the same per-joint arithmetic, a third of the kernels)
    parts = orthonormalise_6d(torch.cat([upper6d, hands6d, legs6d], dim=-1)).unflatten(-1, (-1, 6))
    pose6d[..., _joint_index(("beat_smplx_upper", "beat_smplx_hands", "beat_smplx_lower"), upper6d.device), :] = parts
    return pose6d.flatten(-2)
