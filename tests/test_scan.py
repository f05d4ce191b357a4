"""Selective scan backends: torch (and cuda when built) against the step-by-step reference."""
import pytest
import torch

from models import scan, scan_triton
from models.scan import available_backends, resolve_backend, selective_scan, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, l, n, device="cpu", dt_shift=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(u=r(b, d, l), delta=r(b, d, l) * 0.5 + dt_shift, A=-torch.exp(r(d, n) * 0.5 + 1.0),
             B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d) * 0.3)
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in t.items()}


def run(backend, t, use=NAMES, softplus=True):
    kw = {k: v for k, v in t.items() if k in use or k in ("u", "delta", "A", "B", "C")}
    return selective_scan(**kw, delta_softplus=softplus, backend=backend)


def grads(y, t, seed=1):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    return dict(zip(t, torch.autograd.grad((y * gy).sum(), list(t.values()), allow_unused=True)))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def assert_close(t, backend_a, backend_b, use=NAMES, softplus=True, tol=1e-5, gtol=1e-4):
    ya, yb = run(backend_a, t, use, softplus), run(backend_b, t, use, softplus)
    assert torch.isfinite(ya).all()
    assert rel_err(ya, yb) < tol
    ga, gb = grads(ya, t), grads(yb, t)
    for k in t:
        if gb[k] is None:
            assert ga[k] is None or not ga[k].any(), k
            continue
        assert torch.isfinite(ga[k]).all(), k
        assert rel_err(ga[k], gb[k]) < gtol, (k, rel_err(ga[k], gb[k]))


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 3, 1, 4), (3, 8, 33, 16), (2, 16, 64, 16)])
@pytest.mark.parametrize("block", [1, 4, 1000])  # time steps per block (1000: one block)
def test_torch_matches_reference(shape, block, monkeypatch):
    b, d, l, n = shape
    # blocks of `block` steps, so L is often not a multiple of the block
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, "cpu", block * b * d * n)
    assert_close(make_inputs(*shape), "torch", "reference")


def test_keep_states_gives_same_gradients(monkeypatch):
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, "cpu", 5 * 2 * 6 * 4)
    t = make_inputs(2, 6, 23, 4, seed=13)
    monkeypatch.setitem(scan.KEEP_STATES, "cpu", True)
    y = run("torch", t)
    g_kept = grads(y, t)
    monkeypatch.setitem(scan.KEEP_STATES, "cpu", False)
    g_recomputed = grads(run("torch", t), t)
    for k in t:
        assert rel_err(g_kept[k], g_recomputed[k]) < 1e-6, k


@pytest.mark.parametrize("use,softplus", [((), False), (("D",), False), (("z",), True),
                                          (("delta_bias",), True), (("D", "z"), False)])
def test_optional_arguments(use, softplus):
    assert_close(make_inputs(2, 6, 19, 4, seed=3), "torch", "reference", use=use, softplus=softplus)


@pytest.mark.parametrize("dt_shift", [6.0, -8.0])  # dt*A around -50 per step, and nearly no decay
def test_long_sequence_is_stable(dt_shift, monkeypatch):
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, "cpu", 100 * 2 * 4 * 8)  # 100-step blocks, 1201 steps
    t = make_inputs(2, 4, 1201, 8, dt_shift=dt_shift, seed=5)
    assert_close(t, "torch", "reference", gtol=2e-4)


def test_matches_float64_recurrence():
    """Both float32 backends land within float32 rounding of a float64 evaluation."""
    t64 = make_inputs(2, 8, 40, 16, dtype=torch.float64, seed=7)
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    truth = run("reference", t64)
    assert truth.dtype == torch.float64
    for backend in ("torch", "reference"):
        assert rel_err(run(backend, t32), truth) < 1e-5


@pytest.mark.parametrize("keep", [True, False])
def test_gradcheck_float64(keep, monkeypatch):
    monkeypatch.setitem(scan.KEEP_STATES, "cpu", keep)
    t = make_inputs(2, 3, 9, 2, dtype=torch.float64, seed=11)
    f = lambda *xs: scan._ScanFn.apply(*xs, 4)  # blocks of 4 steps over 9: three blocks
    assert torch.autograd.gradcheck(f, tuple(t[k] for k in ("u", "delta", "A", "B", "C")))


def test_half_precision_inputs_return_their_dtype():
    t = make_inputs(2, 8, 16, 4)
    tb = {k: (v.detach().bfloat16() if k in ("u", "delta", "z") else v.detach()) for k, v in t.items()}
    y = selective_scan(**tb, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    ref = selective_scan_reference(**{k: v.float() for k, v in tb.items()}, delta_softplus=True)
    assert rel_err(y, ref) < 1e-2


def test_backend_selection():
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("reference", x) == "reference"
    assert {"reference", "torch"} <= set(available_backends())
    with pytest.raises(ValueError, match="unknown ssm backend"):
        resolve_backend("triton", x)
    with pytest.raises(ValueError, match="cuda"):
        resolve_backend("cuda", x)  # CPU tensor


needs_cuda = pytest.mark.skipif("cuda" not in available_backends(), reason="needs a GPU and mamba_ssm")


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 16, 64, 16), (3, 64, 100, 16), (1, 8, 1, 16)])
def test_cuda_matches_reference_and_torch(shape):
    t = make_inputs(*shape, device="cuda")
    with torch.no_grad():  # generation; training (autograd on) gets the torch backend's Triton kernels
        assert resolve_backend("auto", t["u"]) == "cuda"
    assert resolve_backend("auto", t["u"]) == ("torch" if scan.USE_TRITON and scan_triton.available() else "cuda")
    # the kernel is built with --use_fast_math, hence the looser bounds
    assert_close(t, "cuda", "reference", tol=1e-4, gtol=1e-3)
    assert_close(t, "torch", "cuda", tol=1e-4, gtol=1e-3)


@needs_cuda
@pytest.mark.parametrize("keep", [True, False])
def test_cuda_torch_backend_long_sequence(keep, monkeypatch):
    monkeypatch.setitem(scan.BLOCK_ELEMENTS, "cuda", 64 * 2 * 32 * 16)  # 64-step blocks
    monkeypatch.setitem(scan.KEEP_STATES, "cuda", keep)
    t = make_inputs(2, 32, 1500, 16, device="cuda", dt_shift=4.0, seed=9)
    assert_close(t, "torch", "cuda", tol=1e-4, gtol=1e-3)
