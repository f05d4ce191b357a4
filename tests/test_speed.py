"""Speed work (issue 9) changes no results: shared conditioning of the training step, batched/graphed generation,
the Triton scan kernels (through Triton's CPU interpreter here, natively on a GPU), and the speed table script."""
import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from models import scan
from models.mambatalk import MambaTalk
from utils.flat_weights import FlatWeights
from models.motion_representation import build_stage1_models
from trainers import generate as gen
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "run_scripts"))
import bench_gpu  # noqa: E402

# argmax codes and the root as published: these tests compare generate() with the published per-window loop
SMALL = dict(hidden_size=64, audio_f=64, motion_f=32, vae_codebook_size=32, word_index_num=40, word_dims=16,
             ctc_model="none", pose_length=32, code_temperature=0.0, root_anchor_seconds=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is as fast and does not stall when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_args(**extra):
    return load_config(REPO / "configs" / "mambatalk.yaml", SMALL | extra)


def build(args, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MambaTalk(args)


def window_batch(args, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    T, P = args.pose_length, args.pose_dims + 7
    masks = [torch.ones(batch, T, P) for _ in range(2)]
    masks[0][:, :args.pre_frames] = 0
    masks.append((torch.rand(batch, T, P, generator=g) < 0.5).float())
    inputs = dict(in_audio=torch.randn(batch, T * 16000 // 30, 3, generator=g),
                  in_word=torch.randint(0, args.word_index_num, (batch, T), generator=g),
                  in_motion=torch.randn(batch, T, P, generator=g), in_id=torch.randint(0, 25, (batch, T, 1), generator=g))
    return inputs, [masks[0], masks[2], masks[2]]


def test_shared_condition_equals_three_passes():
    """Training mode, same seed: outputs, gradients and BatchNorm statistics of one call with three masks equal three
    separate calls (dropout draws in the same order; the encoders draw none)."""
    args = small_args()
    a, b = build(args), build(args)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    b.batch_passes = False  # separate passes: the same dropout draws as separate calls
    inputs, masks = window_batch(args)
    torch.manual_seed(5)
    outs_a = [a(mask=m, **inputs) for m in masks]
    torch.manual_seed(5)
    outs_b = b(mask=masks, **inputs)
    loss = lambda outs: sum((o["rec_upper"] ** 2).mean() + o["cls_face"].logsumexp(-1).mean() for o in outs)
    loss(outs_a).backward()
    loss(outs_b).backward()
    for oa, ob in zip(outs_a, outs_b):
        for k in oa:
            torch.testing.assert_close(ob[k], oa[k], rtol=1e-5, atol=1e-6)
    grads_a = dict(a.named_parameters())
    for name, p in b.named_parameters():
        ga = grads_a[name].grad
        if ga is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, ga, rtol=1e-4, atol=1e-6, msg=name)
    buffers_a = dict(a.named_buffers())
    counts = [n for n in buffers_a if n.endswith("num_batches_tracked")]
    assert counts and all(int(buffers_a[n]) == 3 for n in counts)
    for name, buf in b.named_buffers():
        torch.testing.assert_close(buf, buffers_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_pass_losses_equal_per_pass_losses():
    """The training step's losses of the three passes computed at once from the pass-stacked outputs equal
    latent_loss / cls_loss on each pass (float32 rounding), with the published weights, a classification weight of 0
    included; and the step gives the same losses either way."""
    from trainers.generate import PARTS
    from trainers.mambatalk import MambaTalkTrainer
    g = torch.Generator().manual_seed(0)
    B, T, K = 3, 8, 16
    out = {f"{kind}_{k}": torch.randn(3 * B, T, K, generator=g) for kind in ("rec", "cls") for k in PARTS}
    t = {"motion": torch.zeros(B, T, 5), "latent": {k: torch.randn(B, T, K, generator=g) for k in PARTS},
         "index": {k: torch.randint(0, K, (B, T), generator=g) for k in PARTS}}
    lat_w = {"face": 1.0, "upper": 0.5, "hands": 2.0, "lower": 1.5}
    cls_w = {"face": 0.0, "upper": 1.0, "hands": 3.0, "lower": 1.0}
    ones = dict.fromkeys(PARTS, 1.0)
    trainer = MambaTalkTrainer.__new__(MambaTalkTrainer)
    got = trainer.pass_losses(out, t, [(lat_w, cls_w), (lat_w, ones), (lat_w, ones)])
    chunks = [{k: v[p * B:(p + 1) * B] for k, v in out.items()} for p in range(3)]
    want = {"latent": trainer.latent_loss(chunks[0], t, lat_w), "cls_full": trainer.cls_loss(chunks[0], t, cls_w),
            "latent_self": trainer.latent_loss(chunks[1], t, lat_w), "cls_self": trainer.cls_loss(chunks[1], t, ones),
            "latent_word": trainer.latent_loss(chunks[2], t, lat_w), "cls_word": trainer.cls_loss(chunks[2], t, ones)}
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match="3 passes"):
        trainer.pass_losses(out, t, [(lat_w, cls_w)] * 2)

    # the step: the pass-stacked outputs come in the order of the weights (seeded, masked, word pass)
    args = load_config(REPO / "configs" / "mambatalk.yaml", dict(ctc_model="none", **bench_gpu.TINY))
    model, vq = bench_gpu.build_models(args, torch.device("cpu"))
    step = bench_gpu.step_trainer(args, torch.device("cpu"), model, vq, True, "none", False)
    batch = bench_gpu.training_batch(args, torch.device("cpu"))
    results = []
    for split in (False, True):
        if split:  # the per-pass losses on the same outputs
            step.pass_losses = lambda out, t, w: {
                name: loss(chunk, t, weights) for chunk, (lw, cw), names in zip(
                    [dict(zip(out, parts)) for parts in zip(*(v.chunk(3) for v in out.values()))], w,
                    [("latent", "cls_full"), ("latent_self", "cls_self"), ("latent_word", "cls_word")])
                for name, loss, weights in zip(names, (step.latent_loss, step.cls_loss), (lw, cw))}
        torch.manual_seed(3)
        with torch.no_grad():
            results.append(step.compute_losses(step.model, batch, 0))
    for k in results[1]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-6, atol=1e-7, msg=k)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def test_batched_passes_equal_separate_passes():
    """The three passes as one batch of 3B give the separate passes' outputs and gradients (dropout off)."""
    args = small_args()
    a, b = no_dropout(build(args).train()), no_dropout(build(args).train())
    b.load_state_dict(a.state_dict())
    a.batch_passes, b.batch_passes = False, True
    inputs, masks = window_batch(args)
    outs = {}
    for name, model in (("separate", a), ("batched", b)):
        out = model(mask=masks, **inputs)
        sum((o["rec_hands"] ** 2).mean() + o["cls_lower"].logsumexp(-1).mean() for o in out).backward()
        outs[name] = out
    for oa, ob in zip(outs["separate"], outs["batched"]):
        for k in oa:
            torch.testing.assert_close(ob[k], oa[k], rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in a.named_parameters()}
    for n, p in b.named_parameters():
        if grads[n] is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_encode_condition_then_predict_equals_forward():
    args = small_args()
    model = build(args).eval()
    inputs, masks = window_batch(args)
    with torch.no_grad():
        full = model(mask=masks[1], **inputs)
        cond = model.encode_condition(inputs["in_audio"], inputs["in_word"], inputs["in_id"], args.pose_length)
        split = model.predict(cond, masks[1], inputs["in_motion"])
    for k in full:
        torch.testing.assert_close(split[k], full[k])


def test_generate_equals_published_window_loop(monkeypatch):
    """Batched conditioning, length-sorted groups (batch_size 2 < 3 sequences), the fixed-shape window step and the
    face branch run afterwards in chunks (FACE_BATCH) give the published per-window loop's motion."""
    monkeypatch.setitem(gen.FACE_BATCH, "cpu", 3)
    args = small_args()
    model = build(args).eval()
    torch.manual_seed(3)
    vq = {k: m.eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [2.5, 5.0, 3.2])
    ref = bench_gpu.published_generate(model, vq, seqs, args)
    got = gen.generate(model, vq, seqs, args, batch_size=2)
    for r, g in zip(ref, got):
        for k in r:
            assert g[k].shape == r[k].shape
            torch.testing.assert_close(g[k], r[k], rtol=1e-4, atol=1e-4)


TRITON_SCAN_CHECK = textwrap.dedent("""
    import warnings
    import torch
    from models import scan_triton
    from models.scan import selective_scan_reference
    warnings.simplefilter("error", RuntimeWarning)  # no overflow anywhere in the kernels
    torch.manual_seed(0)
    worst = 0.0
    for b, d, l, n in [(2, 5, 7, 3), (1, 40, 9, 16), (2, 33, 12, 16), (1, 3, 1, 4)]:  # l = 1: nothing to load ahead
        for use_D, use_z, use_bias, softplus in [(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 0, 1)]:
            # u and z as the in-projection leaves them: (b, d, l) views of a (b, l, 2d) tensor
            u = torch.randn(b, l, 2 * d)[..., :d].transpose(1, 2)
            z = torch.randn(b, l, 2 * d)[..., d:].transpose(1, 2) if use_z else None
            delta = torch.randn(b, l, d).transpose(1, 2) * 0.5
            bias = torch.randn(d) * 0.3 - 1 if use_bias else None
            if not softplus:  # dt = delta + bias directly: keep it positive (a negative dt makes the states grow)
                delta, bias = delta.abs() * 0.3, None if bias is None else bias.abs()
            A = -torch.exp(torch.randn(d, n) * 0.5 + 1)
            B, C = torch.randn(b, l, n).transpose(1, 2), torch.randn(b, n, l)
            D = torch.randn(d) if use_D else None
            ins = [u, delta, A, B, C, D, z, bias]
            xs = [t.clone().requires_grad_() if t is not None else None for t in ins]
            y = scan_triton.selective_scan_fused(*xs, delta_softplus=softplus)
            gy = torch.randn_like(y)
            g = torch.autograd.grad((y * gy).sum(), [t for t in xs if t is not None])
            ref = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
            y_ref = selective_scan_reference(*ref, delta_softplus=softplus)
            g_ref = torch.autograd.grad((y_ref * gy.double()).sum(), [t for t in ref if t is not None])
            for a, r in zip((y,) + g, (y_ref,) + g_ref):
                assert a.shape == r.shape and a.dtype == torch.float32
                worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
            # the custom op (what torch.compile traces) gives what the eager path gives, bit for bit
            y_op = scan_triton.scan_fwd(*xs, bool(softplus), True)[0]
            g_op = torch.autograd.grad((y_op * gy).sum(), [t for t in xs if t is not None])
            assert all(torch.equal(a, c) for a, c in zip((y,) + g, (y_op,) + g_op))
        # bf16 in (as under autocast): bf16 out, bf16 gradients
        xb = [t.to(torch.bfloat16).requires_grad_() if t is not None and t.dim() == 3 else t for t in ins]
        yb = scan_triton.selective_scan_fused(*xb, delta_softplus=softplus)
        assert yb.dtype == torch.bfloat16
        gb = torch.autograd.grad(yb.float().sum(), [t for t in xb if t is not None and t.requires_grad])
        assert all(x.dtype == torch.bfloat16 for x in gb)
    print("worst", worst)
    assert worst < 1e-6, worst
""")


TRITON_CONV_CHECK = textwrap.dedent("""
    import torch
    from models import conv_triton, ssm
    torch.manual_seed(0)
    worst = 0.0
    for b, L, E, K in [(2, 64, 96, 4), (3, 37, 70, 4), (1, 130, 64, 3), (2, 5, 8, 4)]:
        # x in the in-projection's layout: a (b, l, E) view of a (b, l, 2E) tensor
        x = torch.randn(b, L, 2 * E)[..., :E].requires_grad_()
        w, bias = (torch.randn(E, K) * 0.5).requires_grad_(), torch.randn(E).requires_grad_()
        y = conv_triton.causal_conv1d_silu(x, w, bias)
        assert y.is_contiguous() and y.shape == x.shape
        gy = torch.randn_like(y)
        g = torch.autograd.grad((y * gy).sum(), (x, w, bias))
        ref = [t.detach().double().requires_grad_() for t in (x, w, bias)]
        y_ref = conv_triton.causal_conv1d_silu_reference(*ref)
        g_ref = torch.autograd.grad((y_ref * gy.double()).sum(), ref)
        for a, r in zip((y,) + g, (y_ref,) + g_ref):
            worst = max(worst, ((a.double() - r).norm() / r.norm()).item())
        # the custom op (what torch.compile traces) gives what the eager path gives, bit for bit
        y_op = conv_triton.conv_silu_fwd(x, w.contiguous(), bias)
        g_op = torch.autograd.grad((y_op * gy).sum(), (x, w, bias))
        assert all(torch.equal(a, c) for a, c in zip((y,) + g, (y_op,) + g_op))
    assert worst < 1e-6, worst
    # a Mamba layer with its convolution on the kernels (forced: on CPU it uses PyTorch's) against PyTorch's
    layer = ssm.Mamba(32)
    h = torch.randn(2, 20, 32)
    outs = []
    for use in (False, True):
        ssm._triton_conv = lambda x, backend, use=use: use
        h_in = h.clone().requires_grad_()
        out = layer(h_in)
        grads = torch.autograd.grad(out.square().sum(), [h_in] + list(layer.parameters()))
        outs.append((out,) + grads)
    gap = max(((a - r).norm() / r.norm()).item() for a, r in zip(*outs[::-1]))
    assert gap < 1e-5, gap
    print("worst", worst, "layer", gap)
""")


TRITON_EPILOGUE_CHECK = textwrap.dedent("""
import torch
from models import conv_triton
from models.layers import BasicBlock, WavEncoder
torch.manual_seed(0)
worst = 0.0
for shape, dtype in [((2, 8, 1, 300), torch.float32), ((3, 5, 1, 77), torch.float32),
                     ((2, 16, 1, 129), torch.bfloat16)]:
    x, r = (torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    b, rb = (torch.randn(shape[1]).to(dtype) for _ in range(2))
    for args in [(b,), (b, r), (b, r, rb)]:
        want = conv_triton.bias_leaky_relu_reference(x.double(), *[a.double() for a in args], slope=0.01)
        got = x.clone()
        conv_triton.bias_leaky_relu_(got, *args, slope=0.01)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        gap = ((got.double() - want).norm() / want.norm()).item()
        assert gap < (1e-6 if dtype == torch.float32 else 4e-3), (shape, dtype, len(args), gap)
        worst = max(worst, gap if dtype == torch.float32 else 0.0)
assert worst < 1e-6, worst
# the whole encoder, folded, with the kernel (forced: on CPU tensors) against without it
conv_triton.epilogue_fits = lambda x, s=None: x.is_contiguous(memory_format=torch.channels_last) and (
    s is None or s.is_contiguous(memory_format=torch.channels_last))
calls = []
kernel = conv_triton.bias_leaky_relu_
conv_triton.bias_leaky_relu_ = lambda *a, **k: calls.append(1) or kernel(*a, **k)
enc = WavEncoder(16, audio_in=3).eval()
for m in enc.modules():
    if isinstance(m, BasicBlock):
        m.fold_batchnorms()
enc.channels_last = True
x = torch.randn(2, 4000, 3)
with torch.no_grad():
    BasicBlock.fused_epilogue = False
    want = enc(x)
    BasicBlock.fused_epilogue = None
    got = enc(x)
gap = ((got - want).norm() / want.norm()).item()
assert gap < 1e-5, gap
assert len(calls) == 2 * 9, len(calls)  # two per block, nine blocks
print("worst", worst, "encoder", gap)
""")


TRITON_WAVE_CHECK = textwrap.dedent("""
import torch
from models import conv_triton
torch.manual_seed(0)
worst = {}
for B, L, Cin, Cout, k, s, p in [(2, 300, 3, 128, 15, 5, 40), (3, 97, 2, 20, 15, 5, 100), (1, 50, 4, 16, 3, 1, 1),
                                 (2, 40, 1, 8, 15, 6, 0)]:
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(B, L, Cin).to(dtype)
        w = (torch.randn(Cout, Cin, k) * 0.3).to(dtype).requires_grad_()
        bias = torch.randn(Cout).to(dtype).requires_grad_()
        y = conv_triton.wave_conv(x, w, bias, s, p)
        assert y.dtype == dtype and y.is_contiguous()
        gy = torch.randn_like(y)
        gw, gb = torch.autograd.grad((y.float() * gy.float()).sum(), (w, bias))
        assert gw.dtype == dtype and gw.stride() == w.stride() and gb.dtype == dtype
        ref = [t.detach().double().requires_grad_() for t in (w, bias)]
        y_ref = conv_triton.wave_conv_reference(x.double(), *ref, s, p)
        gw_ref, gb_ref = torch.autograd.grad((y_ref * gy.double()).sum(), ref)
        for name, a, r in (("y", y, y_ref), ("gw", gw, gw_ref), ("gb", gb, gb_ref)):
            assert a.shape == r.shape, (name, a.shape, r.shape)
            e = ((a.double() - r).norm() / r.norm()).item()
            worst[(name, dtype)] = max(worst.get((name, dtype), 0.0), e)
for (name, dtype), e in worst.items():
    assert e < (1e-6 if dtype == torch.float32 else 2e-3), (name, dtype, e)
# channels-last weights keep their layout in the gradient
w = torch.randn(8, 3, 15).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
gw, = torch.autograd.grad(conv_triton.wave_conv(torch.randn(1, 40, 3), w, None, 5, 7).sum(), (w,))
assert gw.stride() == w.stride()
# an input that needs a gradient is refused in the backward
x = torch.randn(1, 40, 3, requires_grad=True)
try:
    torch.autograd.grad(conv_triton.wave_conv(x, torch.randn(8, 3, 15, requires_grad=True), None, 5, 7).sum(), (x,))
    raise SystemExit("no error for an input gradient")
except RuntimeError as e:
    assert "no input gradient" in str(e), e
print("worst", worst)
""")


@pytest.mark.parametrize("script", ["scan", "conv", "epilogue", "wave"])
def test_triton_kernels_in_interpreter(script):
    """Triton's interpreter runs the GPU kernels on CPU tensors. scan: models/scan_triton.py (bias, softplus, D, z
    inside; strided inputs) against the float64 step-by-step recurrence, every combination of the optional terms.
    conv: models/conv_triton.py against float64 PyTorch, and inside a Mamba layer (forward and all gradients).
    epilogue: the audio encoder's fused bias + shortcut + LeakyReLU against float64 PyTorch (float32 and bf16), and a
    folded encoder with it against without it. wave: the first audio convolutions' implicit matrix product
    (models/conv_triton.wave_conv: output, weight and bias gradients against float64 PyTorch in float32 and float16;
    Triton 3.6's interpreter computes bf16 products wrongly, so bf16 is tested on the GPU), a channels-last weight's
    gradient layout, and the refusal of an input that needs a gradient."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    code = dict(scan=TRITON_SCAN_CHECK, conv=TRITON_CONV_CHECK, epilogue=TRITON_EPILOGUE_CHECK,
                wave=TRITON_WAVE_CHECK)[script]
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shape", [(2, 16, 64, 16), (3, 1536, 64, 16), (1, 70, 100, 5)])
def test_torch_backend_on_gpu_matches_reference(shape, monkeypatch):
    pytest.importorskip("triton")
    from tests.test_scan import assert_close, make_inputs
    monkeypatch.setattr(scan, "USE_TRITON", True)
    assert_close(make_inputs(*shape, device="cuda"), "torch", "reference", tol=1e-5, gtol=1e-4)


SAMPLED = dict(code_temperature=1.0, code_hold=4, root_anchor_seconds=1.5)  # the default protocol's decoding


def test_noise_drawn_ahead_in_chunks_gives_the_same_motion(monkeypatch):
    """The window steps' sampling noise is drawn NOISE_CHUNK windows at a time: the chunking changes nothing, and
    the codes are those that choose_codes draws from the window's key itself."""
    args = small_args(**SAMPLED)
    torch.manual_seed(0)
    model = build(args).eval()
    vq = {k: m.eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [4.0, 2.5])
    whole = gen.generate(model, vq, seqs, args)
    monkeypatch.setattr(gen, "NOISE_CHUNK", 2)
    chunked = gen.generate(model, vq, seqs, args)
    for a, b in zip(whole, chunked):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    keys = torch.tensor([5, 9])
    kinds = dict.fromkeys(gen.PARTS, "index")
    logits = torch.randn(2, 8, 6)
    for sampling in ((1.0, 0, 4, 0, 0), (1.0, 0, 4, 3, 4)):  # the second with the upper body's codes chosen per block
        noise = gen.window_noise(kinds, sampling, keys, 3, 5, 8, 6)
        blocks = sampling[3] > 0
        assert [v.shape for v in noise] == [(2, 2, 3 if blocks else 8, 6)] + [(2, 2, 8, 6)] * 2
        for w in (3, 4):
            for n, part in enumerate(gen.PARTS[1:], start=1):
                out = {f"rec_{part}": logits, f"cls_{part}": logits}
                extra = dict(upper_block=3, upper_top_k=4) if blocks else {}
                direct = gen.choose_codes(None, out, {part: 1.0}, 1.0, noise_key=keys + w, hold=4, **extra)
                ahead = gen.choose_codes(None, out, {part: 1.0}, 1.0, hold=4, noise={part: noise[n - 1][w - 3]},
                                         **extra)
                assert torch.equal(direct[part][1], ahead[part][1])
    assert gen.window_noise(kinds, (0.0, 0, 1, 0, 0), keys, 0, 4, 8, 6) == []


def test_conditioning_chunks_give_the_same_motion(monkeypatch):
    """The windows' conditioning is computed in chunks of window steps (ConditionChunks) and the face branch in
    batches of windows: chunk and batch sizes change nothing, including for sequences that finish before others
    (their steps read the longest sequence's rows) and face batches that span chunks."""
    args = small_args(**SAMPLED)
    torch.manual_seed(0)
    model = build(args).eval()
    vq = {k: m.eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [4.0, 2.5, 3.1])
    base = gen.generate(model, vq, seqs, args)
    for encode, face in ((4, 7), (7, 10)):  # windows per encoder call (chunks of encode // 3 steps), face rows per call
        monkeypatch.setitem(gen.ENCODE_BATCH, "cpu", encode)
        monkeypatch.setitem(gen.FACE_BATCH, "cpu", face)
        other = gen.generate(model, vq, seqs, args)
        for a, b in zip(base, other):
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=f"{k}, batches {encode}/{face}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("decoding", [{}, SAMPLED], ids=["published", "sampled"])
def test_graphed_generation_on_gpu_matches_eager(monkeypatch, decoding):
    """Graphed generation equals eager generation, with the side streams (conditioning chunks that grow, face branch
    batches within the chain) and without them."""
    args = small_args(**decoding)
    model = build(args).cuda().eval()
    torch.manual_seed(3)
    vq = {k: m.cuda().eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [2.5, 5.0, 3.2])
    monkeypatch.setattr(gen, "NOISE_CHUNK", 3)  # a new draw of noise within the chain
    monkeypatch.setitem(gen.ENCODE_BATCH, "cuda", 16)  # chunks of 2, then 4 steps (3 sequences)
    monkeypatch.setitem(gen.FACE_BATCH, "cuda", 6)  # the face branch every 2 steps
    monkeypatch.setattr(gen, "CUDA_GRAPHS", False)
    eager = gen.generate(model, vq, seqs, args)
    monkeypatch.setattr(gen, "CUDA_GRAPHS", True)
    for side_streams in (True, False):
        monkeypatch.setattr(gen, "SIDE_STREAMS", side_streams)
        graphed = gen.generate(model, vq, seqs, args)
        for e, g in zip(eager, graphed):
            for k in e:
                torch.testing.assert_close(g[k], e[k], rtol=1e-4, atol=1e-4, msg=f"{k}, side streams {side_streams}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_uploads_at_once_on_gpu_equal_the_cpu_pieces():
    """generate()'s one-copy uploads (_upload_all, one pinned buffer per call): each piece as the CPU path gives it
    (cast, cut or zero-padded to its rows), also when later uploads are queued before the first has reached the GPU
    (a pinned buffer is not reused under a copy still waiting)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    words = torch.randint(0, 50, (70,), generator=g)
    torch.cuda._sleep(200_000_000)  # the copies below wait behind this on the stream
    uploads = []
    for k in range(3):
        floats = [(audio[100:900] + k, 800), (audio[4500:5000] + k, 700), (torch.zeros(0, 3), 2),
                  (torch.arange(3.0) + k, 3)]
        ints = [(words + k, 64), (words[:10] + k, 12)]
        uploads += [(floats, gen._upload_all(floats, cuda, torch.float32)),
                    (ints, gen._upload_all(ints, cuda, torch.int64))]
    torch.cuda.synchronize()
    for pieces, got in uploads:
        want = gen._upload_all(pieces, cpu, got[0].dtype)
        for v, w in zip(got, want):
            assert v.is_cuda and v.dtype == w.dtype and v.shape == w.shape
            assert torch.equal(v.cpu(), w)
    assert torch.equal(uploads[0][1][1][500:].cpu(), torch.zeros(200, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphs_replayed_side_by_side_on_gpu_keep_their_products_apart():
    """Two graphs whose float32 products of long inner dimension run split-K (partial sums in cuBLAS's workspace),
    replayed at the same time on two streams as generation's conditioning and window steps are, captured as
    generation captures them (graph_streams' "condition" and "capture"): each result equals the eager product, 50
    times over. Captured on one stream they would share the workspace."""
    from utils.cuda_graph import GraphedFunction, graph_streams
    device = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device).manual_seed(0)
        a = [torch.randn(64, 1 << 17, device=device, generator=g) for _ in range(2)]
        b = [torch.randn(1 << 17, 64, device=device, generator=g) for _ in range(2)]
        expected = [x @ y for x, y in zip(a, b)]
        product = lambda x, y: (x @ y,)  # noqa: E731
        window = GraphedFunction(product, [a[0], b[0]])
        condition = GraphedFunction(product, [a[1], b[1]], capture_stream=graph_streams(device)["condition"])
        side = torch.cuda.Stream(device)
        for _ in range(50):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                beside = condition(a[1], b[1])[0]
            main = window(a[0], b[0])[0]
            torch.cuda.current_stream().wait_stream(side)
            torch.testing.assert_close(main, expected[0], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(beside, expected[1], rtol=1e-4, atol=1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_window_step_on_gpu_matches_eager():
    """`compile: true`: the window step through torch.compile, then captured; float32 results as eager."""
    args = small_args(**SAMPLED)
    model = build(args).cuda().eval()
    torch.manual_seed(3)
    vq = {k: m.cuda().eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [2.5, 5.0, 3.2])
    eager = gen.generate(model, vq, seqs, args)
    args.compile = True
    compiled = gen.generate(model, vq, seqs, args)
    for e, c in zip(eager, compiled):
        for k in e:
            torch.testing.assert_close(c[k], e[k], rtol=1e-3, atol=1e-3)


def test_bench_prints_table():
    """The speed table script runs end to end at tiny sizes on CPU (so it cannot rot)."""
    r = subprocess.run([sys.executable, "run_scripts/bench_gpu.py", "--device", "cpu", "--tiny"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "MambaTalk speed on CPU" in out
    for target in ("train step", "window, batch 1", "clip (1 seq", "test set (3 seq", "scan d=16"):
        assert target in out, target
    assert "FAILED" not in out, out
    assert "first-step losses within 0.0e+00" in out  # shared conditioning, fp32: identical losses


def test_bench_train_repeats_report_the_median():
    """--train_repeats N builds and times each training row N times in the process and reports the median, with
    every run's figure in a note (the eager step moves by tens of ms between runs on the device)."""
    import re
    r = subprocess.run([sys.executable, "run_scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--only", "train",
                        "--train_rows", "fast", "--train_repeats", "3", "--steps", "1", "--warmup", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.split("MambaTalk speed on CPU")[1]
    note = re.search(r"fast: .*: median of 3 runs in one process, ([\d.]+) / ([\d.]+) / ([\d.]+) ms/step", table)
    assert note, table
    runs = sorted(float(x) for x in note.groups())
    reported = float(re.search(r"^\s+([\d.,]+)\s+ms/step", table, re.M).group(1).replace(",", ""))
    assert abs(reported - runs[1]) <= 0.05 + 1e-3 * runs[1], (reported, runs)


def test_bench_prints_the_rows_so_far_when_stopped():
    """SIGTERM (what `timeout` sends) stops the speed table script with the rows measured so far and a note saying
    where it stopped (a device call's time limit used to lose the whole table)."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "run_scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--only", "train"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for the first measured row, then stop it
        lines.append(p.stdout.readline())
        if "ms/step" in lines[-1]:
            break
    p.send_signal(signal.SIGTERM)
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert "ms/step" in "".join(lines), out
    table = out.split("MambaTalk speed on CPU")[1]
    assert "published: fp32, 3 full passes, Adam" in table and "stopped by SIGTERM (time limit)" in table, out


def test_bench_isolated_sections_give_one_table():
    """--isolate runs each section in a process of its own and prints one table of them all; --section_timeout stops
    a section and goes on with the next (a section stuck in a native call must not cost the rest of the table)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "run_scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--isolate"]
    r = subprocess.run(cmd + ["--only", "clip", "testset"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.split("MambaTalk speed on CPU")[-1]
    assert r.stdout.count("MambaTalk speed on CPU") == 1
    lines = table.splitlines()
    for target, config in (("clip (1 seq, 6 s)", "published"), ("test set (3 seq, 12 s)", "fast: generate(), bf16")):
        assert any(line.startswith(target) and config in line for line in lines), table
    r = subprocess.run(cmd + ["--only", "clip", "testset", "--section_timeout", "0.01"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for section in ("clip", "testset"):
        assert f"section {section}: stopped after --section_timeout" in r.stdout, r.stdout


def test_compile_with_cuda_graph_leaves_graphs_to_the_whole_step():
    """`compile: true` with `cuda_graph: false` compiles with CUDA graphs on one GPU; with `cuda_graph: true` or
    `auto` (the default) the whole step is captured (graph_step) and the model is compiled without graphs of its own
    (a graph cannot be captured inside another); `auto` after a step that could not be captured goes back to eager
    steps. Only the configuration logic: no GPU needed."""
    from trainers.mambatalk import MambaTalkTrainer
    t = MambaTalkTrainer.__new__(MambaTalkTrainer)
    t.device = torch.device("cuda")
    for cuda_graph, amp, graphed, mode in [(False, "bf16", False, "reduce-overhead"), (True, "bf16", True, None),
                                           ("auto", "none", True, None), ("auto", "bf16", True, None),
                                           (True, "fp16", False, "reduce-overhead"),
                                           ("auto", "fp16", False, "reduce-overhead")]:
        t.args = small_args(compile=True, cuda_graph=cuda_graph, amp=amp)
        assert t.graph_step() is graphed and t.compile_mode() == mode
    t.args = small_args(cuda_graph="auto")
    t._graph_failed = True
    assert not t.graph_step()
    t.args = small_args(cuda_graph=True)
    assert t.graph_step()
    del t._graph_failed
    t.device = torch.device("cpu")
    t.args = small_args(compile=True, cuda_graph=True)
    assert not t.graph_step() and t.compile_mode() is None


# ---- issue 17: speed options keep the float32 reference's outputs within stated tolerances -------------------------

def test_generate_timeline_runs_on_cpu():
    """profile_step.py --timeline (issue 17's generation timeline) at tiny sizes: every phase of generate() is listed,
    the window steps once per window of the longest sequence."""
    r = subprocess.run([sys.executable, "run_scripts/profile_step.py", "--rows", "--timeline"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    clip = r.stdout.split("generate() timeline")[1]
    rows = {line.split("  ")[1].strip(): line.split() for line in clip.splitlines()[2:] if line.strip()}
    assert {"ConditionChunks >", "window step <", "face_codes <", "decoded_to_motion <", "end"} <= set(rows)
    # a 6-s clip, 180 frames, in windows of 32 frames (tiny sizes) that each add 28 to the 4 seed frames: 7 steps
    assert rows["window step <"][3] == "7"


def test_step_phases_run_on_cpu():
    """profile_step.py --phases (where the eager step's time goes, host against GPU, issue 17) at tiny sizes: every
    phase is listed once per step, and on a CPU the two columns are the same clock."""
    r = subprocess.run([sys.executable, "run_scripts/profile_step.py", "--rows", "fast", "--phases", "--steps", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    part = r.stdout.split("phases of the step")[1].split("\n\n")[0]
    rows = {line[:46].strip(): [float(x) for x in line[46:].split()] for line in part.splitlines()[2:] if line.strip()}
    for phase in ("stage-1 targets", "forward", "backward", "clip + Adam"):
        host, gpu = rows[f"{phase} > .. {phase} <"]
        assert host > 0 and host == gpu, phase
    assert rows["forward > .. forward <"][0] > rows["stage-1 targets > .. stage-1 targets <"][0]


def test_step_families_run_on_cpu():
    """profile_step.py --families (one step's time by kernel family, for the compiled step's breakdown, issue 17) at
    tiny sizes on a CPU (aten ops): the families add up to the busy time and the audio CNNs show as convolutions;
    --kernels 4 lists the four ops with the most time, largest first, none above its family's total."""
    r = subprocess.run([sys.executable, "run_scripts/profile_step.py", "--rows", "fast", "--families", "--steps", "1",
                        "--kernels", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    head, table = r.stdout.split("one step by kernel family")[1].split("% busy")
    table, top = table.split("kernels with the most time")
    busy = float(head.split("busy ")[1].split(" ms")[0])
    rows = {line[:44].strip(): float(line[44:].split()[0]) for line in table.strip().splitlines()[:-1]}
    assert abs(sum(rows.values()) - busy) < 0.05 + 0.01 * len(rows)
    assert rows["convolutions (cuDNN, layout transforms)"] > 0 and rows["matrix products"] > 0
    top_ms = [float(line.split()[0]) for line in top.strip().splitlines()[1:]]
    assert len(top_ms) == 4 and top_ms == sorted(top_ms, reverse=True)
    assert top_ms[0] <= max(rows.values()) + 0.01


def test_kernel_families_of_real_kernel_names():
    """profile_step.kernel_family on kernel names from an H200 profile of the eager and compiled steps."""
    from profile_step import kernel_family  # run_scripts/ is on the path (bench_gpu above)
    names = {
        "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolutions",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16>": "convolutions",
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "matrix products",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "matrix products",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<192, 64>>": "attention",
        "_bwd_kernel": "this project's Triton kernels",
        "triton_per_fused_native_layer_norm_native_layer_norm_backward_12": "compiled (inductor) kernels",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "norms",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::LpNormFunctor>": "optimiser",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "copies",
        "Memset (Device)": "copies",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::func_wrapper>>":
            "reductions",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other elementwise",
    }
    for name, family in names.items():
        assert kernel_family(name).startswith(family), (name, kernel_family(name))


def test_wav_encoder_channels_last_matches_published_layout():
    """(B, C, 1, L) channels-last blocks: outputs, gradients and BatchNorm statistics equal the (B, C, L) ones to
    float32 rounding (relative 1e-4; conv biases before BatchNorm get no true gradient and are left out)."""
    from models.layers import WavEncoder
    torch.manual_seed(0)
    a = WavEncoder(16, audio_in=3)
    b = WavEncoder(16, audio_in=3)
    b.load_state_dict(a.state_dict())
    a.channels_last, b.channels_last = False, True
    x = torch.randn(2, 3000, 3)
    ya, yb = a(x), b(x)
    assert float((yb - ya).detach().norm() / ya.detach().norm()) < 1e-4
    (ya ** 2).mean().backward()
    (yb ** 2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name.endswith("bias") and "bn" not in name and name != "out.bias":
            continue
        assert float((pa.grad - pb.grad).norm() / pa.grad.norm()) < 1e-4, name
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-4, atol=1e-6, msg=name)
    a.eval(), b.eval()
    with torch.no_grad():
        assert float((b(x) - a(x)).norm() / a(x).norm()) < 1e-4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the default under 16-bit autocast
        assert WavEncoder.channels_last is None
        a.channels_last = None
        assert float((a(x).float() - b(x)).norm() / b(x).norm()) < 2e-2


def test_folded_batchnorms_equal_the_eval_encoder():
    """BasicBlock.fold_batchnorms (generation's bf16 copy): the audio encoder with each eval-mode BatchNorm folded into
    its convolution gives the unfolded encoder's output in both layouts (float32, relative 1e-5), and refuses a
    training-mode block."""
    import copy
    from models.layers import BasicBlock, WavEncoder
    torch.manual_seed(0)
    enc = WavEncoder(16, audio_in=3)
    with torch.no_grad():  # statistics far from the initial (0, 1), so that folding has something to do
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    with pytest.raises(ValueError, match="eval mode"):
        copy.deepcopy(enc).feat_extractor[0].fold_batchnorms()
    enc.eval()
    folded = copy.deepcopy(enc)
    for m in folded.modules():
        if isinstance(m, BasicBlock):
            m.fold_batchnorms()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(2, 3000, 3)
    with torch.no_grad():
        for layout in (False, True):
            enc.channels_last = folded.channels_last = layout
            want, got = enc(x), folded(x)
            assert float((got - want).norm() / want.norm()) < 1e-5, layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_conv_epilogue_on_gpu_matches_pytorch(monkeypatch):
    """The audio encoders' fused epilogue on the GPU (models/conv_triton.bias_leaky_relu_, bf16 generation's default):
    the kernel against float64 PyTorch at a published width and length; a folded published-width encoder with it
    against without it (bf16); and bf16 generation's window forward with folded BatchNorms and the kernel, and without
    either (the model under autocast), both within test_bf16_generation_tolerance's bounds of float32."""
    from models import conv_triton
    from models.layers import BasicBlock, WavEncoder
    g = torch.Generator("cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
        shape = (3, 128, 1, 40_001)
        x = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        r = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        b, rb = (torch.randn(128, device="cuda", generator=g).to(dtype) for _ in range(2))
        for args in ((b,), (b, r), (b, r, rb)):
            want = conv_triton.bias_leaky_relu_reference(x.double(), *(a.double() for a in args))
            got = x.clone()
            conv_triton.bias_leaky_relu_(got, *args)
            assert float((got.double() - want).norm() / want.norm()) < tol, (dtype, len(args))
    calls = []
    kernel = conv_triton.bias_leaky_relu_
    monkeypatch.setattr(conv_triton, "bias_leaky_relu_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    enc = WavEncoder(512, audio_in=3).cuda().eval()
    for m in enc.modules():
        if isinstance(m, BasicBlock):
            m.fold_batchnorms()
    enc = enc.to(torch.bfloat16)
    wav = torch.randn(4, 2 * 16000, 3, device="cuda", generator=g).to(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(BasicBlock, "fused_epilogue", False)
        want = enc(wav).float()
        assert not calls
        monkeypatch.setattr(BasicBlock, "fused_epilogue", None)
        got = enc(wav).float()
    assert len(calls) == 18  # two per block, nine blocks
    assert float((got - want).norm() / want.norm()) < 1e-2
    args = small_args()
    model = build(args).cuda().eval()
    inputs, masks = window_batch(args, batch=4)
    inputs, mask = {k: v.cuda() for k, v in inputs.items()}, masks[0].cuda()
    calls.clear()
    with torch.no_grad():
        ref = model(mask=mask, **inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            unfused = model(mask=mask, **inputs)
            assert not calls
            fused = gen.bf16_weights(model)(mask=mask, **inputs)
            assert calls
    for k in ref:
        for name, got in (("fused", fused), ("autocast", unfused)):
            assert float((got[k].float() - ref[k]).norm() / ref[k].norm()) < 2e-2, (name, k)
            if k.startswith("cls"):
                assert float((got[k].argmax(-1) == ref[k].argmax(-1)).float().mean()) >= 0.9, (name, k)


def test_generation_split_equals_predict():
    """Generation's window step (precomputed speaker queries and cross-attention keys/values, body parts) and its
    batched face branch give predict()'s outputs to float32 rounding."""
    args = small_args()
    model = build(args).eval()
    inputs, masks = window_batch(args)
    with torch.no_grad():
        cond = model.encode_condition(inputs["in_audio"], inputs["in_word"], inputs["in_id"], args.pose_length)
        full = model.predict(cond, masks[1], inputs["in_motion"])
        gen_cond = model.generation_condition(cond)
        tokens, global_features = model.body_tokens(gen_cond, masks[1], inputs["in_motion"])
        body = {k: v for part in ("upper", "hands", "lower")
                for k, v in model.local_scan.part_output(part, *tokens, gen_cond["spk_body"]).items()}
        face = model.predict_face(cond["spk_face"], global_features)
    assert set(body) | set(face) == set(full)
    for k, v in (body | face).items():
        torch.testing.assert_close(v, full[k], rtol=1e-5, atol=1e-5)


def test_seed_pose_equals_axis_angle_round_trip():
    torch.manual_seed(0)
    parts = [torch.randn(2, 4, 6 * n) for n in (13, 30, 9)]
    legs = gen.orthonormalise_6d(parts[2])
    ref = gen.axis_angle_to_rot6d(gen.assemble_pose(parts[0], parts[1], legs))
    torch.testing.assert_close(gen.seed_pose6d(parts[0], parts[1], legs), ref, rtol=1e-4, atol=1e-5)


def test_bf16_generation_tolerance():
    """bf16 (stored bf16 weights under autocast): a window's latents and logits within 2e-2 (relative norm) of float32
    and at least 90 % of argmax codes equal (random weights: many near ties); the weight copy is reused until
    the model's parameters change."""
    args = small_args()
    model = build(args).eval()
    inputs, masks = window_batch(args, batch=4)
    shadow = gen.bf16_weights(model)
    assert gen.bf16_weights(model) is shadow
    assert any(p.dtype == torch.bfloat16 for p in shadow.parameters())
    with torch.no_grad():
        ref = model(mask=masks[0], **inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = shadow(mask=masks[0], **inputs)
    for k in ref:
        assert float((got[k].float() - ref[k]).norm() / ref[k].norm()) < 2e-2, k
        if k.startswith("cls"):
            assert float((got[k].argmax(-1) == ref[k].argmax(-1)).float().mean()) >= 0.9, k
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a training step changes the weights: a new copy
    assert gen.bf16_weights(model) is not shadow


def test_bf16_generate_runs_on_cpu():
    args = small_args(amp="bf16")
    model = build(args).eval()
    torch.manual_seed(3)
    vq = {k: m.eval() for k, m in build_stage1_models(args).items()}
    seqs = bench_gpu.random_sequences(args, [2.5, 3.2])
    out = gen.generate(model, vq, seqs, args)
    ref = bench_gpu.published_generate(model, vq, seqs, args)
    for o, r in zip(out, ref):
        for k in r:
            assert o[k].shape == r[k].shape and o[k].dtype == torch.float32 and torch.isfinite(o[k]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode, rtol, atol", [("graph", 1e-4, 1e-5), ("compile-graph", 1e-3, 1e-4)])
def test_graphed_train_step_on_gpu_matches_eager(mode, rtol, atol):
    """utils.cuda_graph.GraphedTrainStep replays the eager step: without dropout and with every canvas entry masked
    (the last epoch's mask ratio), the same losses step after step (float32). compile-graph (`compile: true` with
    `cuda_graph: true`): the compiled model captured with the rest of the step; inductor's fused kernels round
    differently, hence the looser bound (it compiles for about a minute)."""
    from utils.cuda_graph import GraphedTrainStep
    args = small_args(batch_size=4)
    device = torch.device("cuda")
    trainers = []
    for row in ("graph", mode):  # the first is run eagerly (with the same capturable fused Adam)
        model, vq = bench_gpu.build_models(args, device)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
        t = bench_gpu.step_trainer(args, device, model, vq, True, "none", True, row, True)
        t.epoch = args.epochs  # mask ratio 1: the masked passes' masks are all ones, no random draws
        trainers.append(t)
    eager, graphed = trainers
    eager.args.cuda_graph = False
    batch = bench_gpu.training_batch(args, device)
    graphed.train_step = GraphedTrainStep(graphed, batch, warmup=3)  # its warm-up steps are undone
    for _ in range(3):
        a, b = eager.train_step(batch), graphed.train_step(batch)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol)


def _trainer_pair(args, device, graph):
    """An eager trainer and one with `cuda_graph: graph`, same weights, dropout off."""
    trainers = []
    for mode in (False, graph):
        model, vq = bench_gpu.build_models(args, device)
        t = bench_gpu.step_trainer(args, device, no_dropout(model), vq, True, "none", True)
        t.args.cuda_graph = mode
        trainers.append(t)
    return trainers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_graph_serves_every_epoch_on_gpu():
    """MambaTalkTrainer.train_step under `cuda_graph: auto` on one GPU: captured on the first step and replayed in
    later epochs (the mask ratio is a device scalar the graph reads), with the eager step's losses step after step
    (float32, dropout off, same seed before each step: a replay draws the eager step's masks)."""
    args = small_args(batch_size=4, epochs=4)
    device = torch.device("cuda")
    eager, graphed = _trainer_pair(args, device, "auto")
    batch = bench_gpu.training_batch(args, device)
    graphs = set()
    for step, epoch in enumerate((0, 0, 2, 3)):
        results = []
        for t in (eager, graphed):
            t.epoch = epoch
            torch.manual_seed(10 + step)
            results.append(t.train_step(batch))
        graphs.add(id(graphed._graphed[1]))
        for k in results[0]:
            torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-5, msg=f"epoch {epoch} {k}")
    assert graphed.graph_step() and len(graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_goes_on_eagerly_when_capture_fails_on_gpu(caplog):
    """Under `cuda_graph: auto`, a step that cannot be captured (here compute_losses reads a loss on the host, which
    capture forbids) is found in the last warm-up step, logged and trained eagerly, from the weights and random
    stream as they were: the eager trainer's losses and weights. (A sync inside a capture itself would leave
    PyTorch's CUDA random generator in capture mode: no eager step could draw afterwards.)"""
    args = small_args(batch_size=4)
    device = torch.device("cuda")
    eager, failing = _trainer_pair(args, device, "auto")
    real = failing.compute_losses

    def syncing(model, batch, epoch):
        losses = real(model, batch, epoch)
        float(losses["latent"])
        return losses

    failing.compute_losses = syncing
    batch = bench_gpu.training_batch(args, device)
    for step in range(2):
        results = []
        for t in (eager, failing):
            torch.manual_seed(20 + step)
            results.append(t.train_step(batch))
        for k in results[0]:
            torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-5)
    assert "training eagerly" in caplog.text and not failing.graph_step()
    state = eager.raw_model.state_dict()
    for k, v in failing.raw_model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5, msg=k)


def test_mask_ratio_as_a_device_scalar_draws_the_same_masks():
    """What a graphed step compares the random canvas with (train_step's float32 scalar) gives the masks of the
    eager step's Python float, at every epoch of a 200-epoch run."""
    from trainers.mambatalk import mask_ratio
    draws = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    scalar = torch.zeros(())
    for epoch in range(200):
        ratio = mask_ratio(epoch, 200)
        scalar.fill_(ratio)
        edge = torch.tensor(ratio, dtype=torch.float32)  # where float32 and float64 comparisons could part
        edges = torch.stack([torch.nextafter(edge, torch.tensor(0.0)), edge, torch.nextafter(edge, torch.tensor(1.0))])
        for values in (draws, edges):
            assert torch.equal(values < scalar, values < ratio), epoch


def test_cuda_graph_option_trains_eagerly_without_a_gpu(caplog):
    """`cuda_graph: true` where it cannot apply (here: no GPU) trains eagerly, with a warning, the same losses."""
    args = small_args(batch_size=2, cuda_graph=True)
    device = torch.device("cpu")
    losses = []
    for graph in (True, False):
        model, vq = bench_gpu.build_models(args, device)
        t = bench_gpu.step_trainer(args, device, model, vq, True, "none", False, None, True)
        t.args.cuda_graph = graph
        torch.manual_seed(0)
        losses.append(t.train_step(bench_gpu.training_batch(args, device)))
    assert "training eagerly" in caplog.text
    for k in losses[1]:
        torch.testing.assert_close(losses[0][k], losses[1][k])
    caplog.clear()
    t.args.cuda_graph = "auto"  # the default: silent where it cannot apply
    t.train_step(bench_gpu.training_batch(args, device))
    assert "eagerly" not in caplog.text and not t.graph_step()


def test_training_state_restore_undoes_steps():
    """What GraphedTrainStep does after its warm-up steps: weights, BatchNorm statistics and Adam's state back to
    before them, so the next step is the first step of a fresh trainer."""
    from utils.cuda_graph import restore_training_state, training_state
    args = small_args(batch_size=2)
    device = torch.device("cpu")
    trainers = []
    for _ in range(2):
        model, vq = bench_gpu.build_models(args, device)
        trainers.append(bench_gpu.step_trainer(args, device, model, vq, True, "none", False, None, True))
    warmed, fresh = trainers
    batch = bench_gpu.training_batch(args, device)
    saved = training_state(warmed.raw_model, warmed.optimizer)
    for _ in range(2):
        warmed.train_step(batch)
    restore_training_state(saved, warmed.optimizer)
    for t in trainers:
        torch.manual_seed(4)
        t.train_step(batch)
    state_a, state_b = warmed.raw_model.state_dict(), fresh.raw_model.state_dict()
    for k in state_b:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=1e-5, atol=1e-6, msg=k)


def _training_step_results(flat, packed, amp="bf16", seed=5, dropout=True, conv_layout=None):
    """Losses, gradients (by parameter name) and buffers of one forward + backward of the MambaTalk training step
    (tiny sizes, CPU), with or without flat weights (utils.flat_weights). conv_layout "contiguous"/"channels_last":
    the audio encoders run channels-last (as on GPUs) with their convolution weights stored as they are built /
    reordered by channels_last_conv_weights_ (as GPU training)."""
    from models.layers import PackedAttention, WavEncoder, channels_last_conv_weights_
    args = load_config(REPO / "configs" / "mambatalk.yaml", dict(ctc_model="none", **bench_gpu.TINY))
    model, vq = bench_gpu.build_models(args, torch.device("cpu"))
    if conv_layout:
        for m in model.modules():
            if isinstance(m, WavEncoder):
                m.channels_last = True
        if conv_layout == "channels_last":
            assert channels_last_conv_weights_(model) == 50
    if not dropout:
        no_dropout(model)
    trainer = bench_gpu.step_trainer(args, torch.device("cpu"), model, vq, True, amp, False, flat_weights=flat)
    assert (trainer.flat is not None) == (flat and amp != "none")
    before = PackedAttention.packed
    PackedAttention.packed = packed
    try:
        torch.manual_seed(seed)
        losses = trainer.compute_losses(trainer.model, bench_gpu.training_batch(args, torch.device("cpu")), 0)
        sum(losses.values()).backward()
    finally:
        PackedAttention.packed = before
    if trainer.flat is not None:
        assert all(p.grad is None for p in model.parameters())
        by_param = dict(zip(map(id, trainer.flat.params), trainer.flat.grads()))
        unused = {id(trainer.flat.params[trainer.flat.order[k]]) for k in trainer.flat.unused}
        grads = {n: by_param[id(p)] for n, p in model.named_parameters() if id(p) in by_param and id(p) not in unused}
    else:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, dict(model.named_buffers())


def test_flat_weights_give_autocast_numbers_exactly():
    """utils.flat_weights (every weight a view of one float32 tensor; the cast weights' bf16 copies made at once and
    all gradients written into one flat gradient) against autocast casting each weight itself: losses, every
    gradient and every buffer bit-identical."""
    plain, flat = _training_step_results(False, False), _training_step_results(True, False)
    for a, b in zip(plain, flat):
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_motion_encoder_weights_channels_last():
    """The motion encoders (VQEncoderV5/V6: MambaTalk's and the stage-1 models') get their convolution weights in
    channels-last order too (GPU training and the frozen target encoders; forced here on a CPU): the same outputs,
    input and weight gradients, and checkpoints; a second call reorders nothing."""
    from models.layers import channels_last_conv_weights_
    from models.motion_representation import VQEncoderV5
    torch.manual_seed(0)
    enc = VQEncoderV5(12, 16, 2).double()
    assert channels_last_conv_weights_(enc) == 0  # CPU: only where asked
    ref = copy.deepcopy(enc)
    enc.channels_last = True
    assert channels_last_conv_weights_(enc) == 6 and channels_last_conv_weights_(enc) == 0
    assert all(m.weight.stride(1) == 1 and not m.weight.is_contiguous()
               for m in enc.modules() if isinstance(m, torch.nn.Conv1d))
    x = torch.randn(3, 20, 12, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = enc(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (yr * gy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(enc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    fresh = VQEncoderV5(12, 16, 2).double()
    fresh.load_state_dict(enc.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=1e-12, atol=1e-12)


def test_channels_last_conv_weights_keep_the_training_step():
    """models.layers.channels_last_conv_weights_ (GPU training: the audio encoders' convolution weights stored in the
    order a channels-last convolution reads) changes memory only: the same values and parameter objects, the
    flat weights keep that layout (so gradients are not re-copied), they still give autocast's numbers bit for
    bit, and the step's numbers equal those with the weights as built."""
    from models.layers import WavEncoder, channels_last_conv_weights_
    args = load_config(REPO / "configs" / "mambatalk.yaml", dict(ctc_model="none", **bench_gpu.TINY))
    model, _ = bench_gpu.build_models(args, torch.device("cpu"))
    assert channels_last_conv_weights_(model) == 0  # CPU, layout chosen per call: nothing to do
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    for m in model.modules():
        if isinstance(m, WavEncoder):
            m.channels_last = True
    assert channels_last_conv_weights_(model) == 50
    moved = [n for n, p in model.named_parameters() if n.startswith("audio_pre_encoder") and p.dim() == 3]
    assert len(moved) == 50
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n
        assert (p.dim() == 3 and p.stride(1) == 1 and not p.is_contiguous()) == (n in moved), n
    fresh, _ = bench_gpu.build_models(args, torch.device("cpu"), seed=1)
    fresh.load_state_dict(model.state_dict())  # a checkpoint of the reordered weights loads anywhere
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    from utils.flat_weights import FlatWeights
    trained = [p for p in model.parameters() if p.requires_grad]
    FlatWeights(model, trained, torch.bfloat16)
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n
        assert (p.dim() == 3 and p.stride(1) == 1 and not p.is_contiguous()) == (n in moved), n

    built = _training_step_results(False, False, conv_layout="contiguous")
    plain = _training_step_results(False, False, conv_layout="channels_last")
    flat = _training_step_results(True, False, conv_layout="channels_last")
    for a, b, c in zip(built, plain, flat):
        assert a.keys() == b.keys() == c.keys() and a
        for k in a:
            assert torch.equal(b[k], c[k]), k
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for n in moved:
        assert flat[1][n].stride() == dict(model.named_parameters())[n].stride(), n


class _Shared(torch.nn.Module):
    """A tied weight (in two modules), a channel-fastest conv weight, an embedding, a parameter the forward uses
    only through a broadcast (stride-0 gradient) and one it does not use."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 5)
        self.b = torch.nn.Linear(5, 3, bias=False)
        self.b.weight = self.a.weight
        self.conv = torch.nn.Conv1d(3, 4, 7)
        with torch.no_grad():
            self.conv.weight.data = self.conv.weight.transpose(1, 2).contiguous().transpose(1, 2)
        self.emb = torch.nn.Embedding(10, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))
        self.unused = torch.nn.Parameter(torch.randn(2, 2))

    def forward(self, x, ids):
        h = self.a(x + self.emb(ids))  # (N, 5)
        y = h @ self.b.weight  # the tied weight again
        c = self.conv(y.T[None].contiguous())
        return y.float().square().sum() + c.float().sum() + self.scale.sum() * y.float().mean()  # stride-0 gradient


def _flat_results(flat):
    torch.manual_seed(0)
    model = _Shared()
    x, ids = torch.randn(9, 3), torch.randint(0, 10, (9,))
    params = [p for p in model.parameters() if p.requires_grad]
    fw = FlatWeights(model, params, torch.bfloat16) if flat else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fw.call(model, x, ids) if fw else model(x, ids)
    loss.backward()
    grads = fw.grads() if fw else [p.grad for p in params]
    return model, params, fw, loss, grads


def test_flat_weights_views_gradients_and_shared_weights():
    """utils.flat_weights.FlatWeights on a module with a tied weight, a channel-fastest conv weight, an embedding, a
    broadcast parameter and an unused one: the parameters stay the modules' own objects with their values and
    strides, now views of `master`; the loss and gradients equal plain autocast's bit for bit (the unused
    parameter's is zero, and FlatWeights records it as unused); an optimiser step on `master` moves the modules'
    weights; a gradient that reaches a parameter outside `call` raises."""
    ref_model, ref_params, _, ref_loss, ref_grads = _flat_results(False)
    model, params, fw, loss, grads = _flat_results(True)
    assert len(params) == 7 and torch.equal(loss, ref_loss)
    for p, q, g, gr in zip(params, ref_params, grads, ref_grads):
        assert p.untyped_storage().data_ptr() == fw.master.untyped_storage().data_ptr()
        assert p.stride() == q.stride() and torch.equal(p, q)
        assert torch.equal(g, gr) if gr is not None else not g.any()
    assert [params[fw.order[k]] is model.unused for k in fw.unused] == [True]
    from utils.flat_weights import ALIGN
    assert all(offset % ALIGN == 0 for offset in fw.offsets) and fw.n_cast % ALIGN == 0  # aligned weight addresses
    covered = torch.zeros(fw.master.numel(), dtype=torch.bool)
    for offset, p in zip(fw.offsets, (params[i] for i in fw.order)):
        covered[offset:offset + p.numel()] = True
    assert not covered.all() and not fw.master.grad[~covered].any()  # the gaps' gradient is zero: Adam leaves them
    assert model.conv.weight.stride()[1] == 1
    before = model.a.weight.detach().clone()
    torch.optim.Adam([fw.master], lr=0.1).step()
    assert model.b.weight is model.a.weight and not torch.equal(model.a.weight, before)
    assert torch.equal(model.unused, ref_model.unused)  # zero gradient and zero moments: Adam leaves it alone
    with pytest.raises(RuntimeError, match="outside FlatWeights.call"):
        model(torch.randn(9, 3), torch.zeros(9, dtype=torch.long)).backward()


def test_flat_weights_optimizer_state_round_trip():
    """FlatWeights.per_parameter_state / flat_state: the flat Adam state saved per parameter equals per-parameter
    Adam's after the same steps (moments to rounding), loads back into a flat optimiser exactly, and a state of the
    wrong size or with step counts that differ is refused."""
    _, params, fw, _, grads = _flat_results(True)
    ref = [p.detach().clone().requires_grad_() for p in params]
    flat_opt, ref_opt = torch.optim.Adam([fw.master], lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    flat_opt.step()
    ref_opt.step()
    saved = fw.per_parameter_state(flat_opt.state_dict())
    want = ref_opt.state_dict()
    assert saved["param_groups"][0]["params"] == want["param_groups"][0]["params"]
    for i in want["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(saved["state"][i][k], want["state"][i][k], rtol=1e-6, atol=1e-9)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    again = torch.optim.Adam([fw.master], lr=1e-2)
    again.load_state_dict(fw.flat_state(saved))
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(again.state[fw.master][k], flat_opt.state[fw.master][k]), k
    with pytest.raises(ValueError, match="parameters in the saved state"):
        fw.flat_state(saved | {"param_groups": [saved["param_groups"][0] | {"params": [0, 1]}]})
    bad = {i: dict(v) for i, v in saved["state"].items()}
    bad[3]["step"] = bad[3]["step"] + 1
    with pytest.raises(ValueError, match="step counts differ"):
        fw.flat_state(saved | {"state": bad})


def test_packed_attention_matches_pytorch_attention():
    """models.layers.PackedAttention (q/k/v split by unbind; GPU training's default) against PyTorch's attention in a
    whole training step: same losses, gradients and statistics to float32 rounding. Dropout is off: the two draw
    their attention dropout masks differently (same rate)."""
    plain = _training_step_results(False, False, "none", dropout=False)
    packed = _training_step_results(False, True, "none", dropout=False)
    for a, b in zip(plain, packed):
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_attention_keys_shared_by_passes():
    """A key/value batch that divides the query batch (MambaTalk's passes share one cross-attention memory): the
    keys and values are projected once and repeated, on both paths; outputs and gradients equal those with the
    memory repeated beforehand (float64), and a batch that does not divide is refused."""
    from models.layers import PackedAttention
    torch.manual_seed(0)
    attn = PackedAttention(24, 4, dropout=0.0, batch_first=True).double()
    query = torch.randn(6, 5, 24, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    for packed in (True, False):
        attn.packed = packed
        results = []
        for mem in (memory, memory.repeat(3, 1, 1)):
            attn.zero_grad()
            query.grad = memory.grad = None
            out = attn(query, mem, mem, need_weights=False)[0]
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            results.append([out, query.grad, memory.grad, attn.in_proj_weight.grad, attn.in_proj_bias.grad])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert results[0][2].abs().sum() > 0
    with pytest.raises(ValueError, match="does not divide"):
        attn(query, memory[:1].repeat(4, 1, 1), memory[:1].repeat(4, 1, 1), need_weights=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_conv_training_on_gpu_matches_pytorch():
    """Mamba's causal conv + SiLU on models/conv_triton.py (GPU training's default) against PyTorch's convolution:
    float32 to rounding; under bf16 autocast within bf16 rounding of the activations."""
    pytest.importorskip("triton")
    from models import ssm
    torch.manual_seed(0)
    layer = ssm.Mamba(256).cuda()
    h = torch.randn(16, 64, 256, device="cuda")
    for amp, tol in ((False, 1e-5), (True, 2e-2)):
        results = []
        for use in (False, True):
            ssm.TRITON_CONV = use
            try:
                h_in = h.clone().requires_grad_()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = layer(h_in).float()
                grads = torch.autograd.grad(out.square().mean(), [h_in] + list(layer.parameters()))
            finally:
                ssm.TRITON_CONV = True
            results.append((out,) + grads)
        for ref, got in zip(*results):
            gap = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert gap < tol, (amp, gap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_wave_conv_training_on_gpu_matches_cudnn():
    """The audio encoders' first convolutions on models/conv_triton.wave_conv (GPU training under bf16 autocast with
    BasicBlock.wave_conv on) against float64 PyTorch at the published shape, and both published encoders' training
    forward and backward with it against cuDNN (each gradient within twice cuDNN's own bf16 gap from float32)."""
    pytest.importorskip("triton")
    from models import conv_triton
    from models.layers import BasicBlock, WavEncoder, channels_last_conv_weights_
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(8, 34_133, 3, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(128, 3, 15, device="cuda", generator=g) * 0.2).to(torch.bfloat16).requires_grad_()
    b = torch.randn(128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    y = conv_triton.wave_conv(x, w, b, 5, 1600)
    gy = torch.randn_like(y)
    got = (y,) + torch.autograd.grad((y.float() * gy.float()).sum(), (w, b))
    ref = [t.detach().double().requires_grad_() for t in (w, b)]
    y_ref = conv_triton.wave_conv_reference(x.double(), *ref, 5, 1600)
    want = (y_ref,) + torch.autograd.grad((y_ref * gy.double()).sum(), ref)
    for name, a, r in zip(("y", "gw", "gb"), got, want):
        assert float((a.double() - r).norm() / r.norm()) < 4e-3, name
    # both published encoders' training step: bf16 with wave_conv and bf16 with cuDNN against float32 (no TF32). The
    # gradients reaching a convolution through a training-mode BatchNorm are sums with heavy cancellation (a bias
    # before a BatchNorm gets ~0), so each gradient is held to cuDNN's own bf16 gap, not to a fixed bound.
    torch.manual_seed(0)
    for audio_in in (3, 2):
        enc = WavEncoder(512, audio_in=audio_in).cuda()
        channels_last_conv_weights_(enc)
        wav = torch.randn(16, 34_133, audio_in, device="cuda", generator=g)
        results, calls = {}, []
        kernel = conv_triton.wave_conv_fwd
        for name, use, amp in (("fp32", False, False), ("cudnn", False, True), ("wave", True, True)):
            BasicBlock.wave_conv = use
            try:
                conv_triton.wave_conv_fwd = lambda *a: calls.append(1) or kernel(*a)
                with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False), \
                        torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = enc(wav).float()
                    grads = torch.autograd.grad(out.square().mean(), list(enc.parameters()))
            finally:
                BasicBlock.wave_conv, conv_triton.wave_conv_fwd = False, kernel
            results[name] = (out,) + grads
        assert len(calls) == 2  # the first block's convolution and its shortcut, in the wave run only
        for i, (ref, cudnn, wave) in enumerate(zip(results["fp32"], results["cudnn"], results["wave"])):
            gap_cudnn, gap_wave = (float((t.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                                   for t in (cudnn, wave))
            assert gap_wave <= 2 * gap_cudnn + 1e-3, (audio_in, i, gap_wave, gap_cudnn)
        assert float((results["wave"][0] - results["fp32"][0]).norm() / results["fp32"][0].norm()) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_step_raises_for_a_nonfinite_loss_without_updating():
    """On GPUs the loss is checked at the next step (no host sync between forward and backward): a NaN loss raises
    there, naming its step, and the weights are those before it."""
    args = load_config(REPO / "configs" / "mambatalk.yaml", dict(ctc_model="none", **bench_gpu.TINY))
    device = torch.device("cuda")
    model, vq = bench_gpu.build_models(args, device)
    trainer = bench_gpu.step_trainer(args, device, model, vq, True, "bf16", True)
    batch = bench_gpu.training_batch(args, device)
    trainer.train_step(batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = dict(batch, pose=batch["pose"].clone())
    bad["pose"][0, 3, 5] = float("nan")
    trainer.global_step = 1
    trainer.train_step(bad)  # queued; the check comes with the next step
    with pytest.raises(FloatingPointError, match="step 2: batch item 'pose'"):
        trainer.train_step(batch)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_embedding_rows_backward_matches_pytorch():
    """models.layers.Embedding's GPU training backward (one index_add_ instead of PyTorch's sort-based kernels): the
    same rows forward and the same weight gradient to float32 rounding, repeated ids included; on a CPU (and
    outside training) it is nn.Embedding itself. The MambaTalk word and speaker embeddings keep their keys."""
    from models.layers import Embedding, _EmbeddingRows
    torch.manual_seed(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        emb = Embedding(25, 16).to(device)
        ids = torch.randint(0, 25, (64, 64), device=device)
        ids[:, :8] = 3  # many repeats of one row
        gy = torch.randn(64, 64, 16, device=device)
        out = _EmbeddingRows.apply(emb.weight, ids)
        (g,) = torch.autograd.grad((out * gy).sum(), [emb.weight])
        ref = torch.nn.functional.embedding(ids, emb.weight)
        (g_ref,) = torch.autograd.grad((ref * gy).sum(), [emb.weight])
        assert torch.equal(out, ref)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
        assert g[3].abs().sum() > 0
        y = emb(ids)
        assert (y.grad_fn.name() == "_EmbeddingRowsBackward") == (device == "cuda"), y.grad_fn.name()
    model = MambaTalk(load_config(REPO / "configs" / "mambatalk.yaml", dict(ctc_model="none", **bench_gpu.TINY)))
    assert isinstance(model.text_pre_encoder_face, Embedding) and isinstance(model.speaker_encoder_body, Embedding)
    assert "speaker_encoder_face.weight" in model.state_dict()
