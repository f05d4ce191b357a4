"""Selective scan (the S6 recurrence of Mamba-1) with three interchangeable backends.

Layout follows mamba-ssm's `selective_scan_fn`: u, delta, z (b, d, l); A (d, n); B, C (b, n, l);
D, delta_bias (d,). With dt = softplus(delta + delta_bias) (softplus optional):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (h: (b, d, n), h_{-1} = 0)
    y_t = <C_t, h_t> + D * u_t ;  out = y * silu(z)

Backends:
  reference  the plain step-by-step recurrence (ground truth for tests, slow).
  torch      this project's scan in plain PyTorch (CPU and GPU, differentiable). Decays and inputs are
             precomputed for a block of time steps at once, the recurrence itself is one fused
             multiply-add per step, and the backward pass is written by hand (a reverse scan of the same
             form) and recomputes states block by block, so memory stays O(b * block * d * n).
             It only ever multiplies decays in (0, 1], so it is stable for any length and decay.
             On CUDA the whole function (bias, softplus, D, z included) runs as two Triton kernels
             instead (models/scan_triton.py: states stay in registers; one launch each way) when Triton
             imports.
  cuda       mamba-ssm's fused kernel (needs `mamba_ssm` built for this GPU and CUDA tensors).
`auto` (the default) picks torch (Triton) for training on a GPU, cuda for generation, torch on CPU.
"""
import functools

import torch
import torch.nn.functional as F

from models import scan_triton

BACKENDS = ("reference", "torch", "cuda")
# torch backend on CUDA: the Triton kernels of models/scan_triton.py (False: the PyTorch loop below everywhere).
USE_TRITON = True

# torch backend tuning, by device type. BLOCK_ELEMENTS: size of one (b, block, d, n) work tensor; the
# time block is chosen to stay under it (cache-sized on CPU; on a GPU large enough to keep launches few,
# small enough to stay in L2). KEEP_STATES: keep the forward states (b, l, d, n) for the backward pass
# (one scan less per backward) instead of recomputing them block by block (memory O(b * block * d * n)).
BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
KEEP_STATES = {"cpu": False, "cuda": True}


@functools.lru_cache(maxsize=None)
def _mamba_ssm_scan():
    """mamba-ssm's selective_scan_fn, or None when the package (or its kernel) does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a kernel built for another torch/CUDA (OSError, RuntimeError)
        return None
    return selective_scan_fn


def available_backends():
    names = ["reference", "torch"]
    if torch.cuda.is_available() and _mamba_ssm_scan() is not None:
        names.append("cuda")
    return names


def resolve_backend(name, tensor):
    """'auto' on a GPU: the torch backend's Triton kernels while autograd records (training: the whole training step
    is faster than with mamba-ssm's kernel, and torch.compile traces them), else mamba-ssm's kernel where it imports
    (generation). 'auto' on CPU: 'torch'."""
    if name == "auto":
        if tensor.is_cuda and torch.is_grad_enabled() and USE_TRITON and scan_triton.available():
            return "torch"
        return "cuda" if tensor.is_cuda and _mamba_ssm_scan() is not None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown ssm backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    if name == "cuda" and (not tensor.is_cuda or _mamba_ssm_scan() is None):
        raise ValueError("ssm backend 'cuda' needs CUDA tensors and an importable mamba_ssm "
                         "(pip install mamba-ssm --no-build-isolation); use 'torch' or 'auto' instead")
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend="torch"):
    """Returns (b, d, l) in u's dtype. See the module docstring for the recurrence."""
    backend = resolve_backend(backend, u)
    if backend == "cuda":
        return _mamba_ssm_scan()(u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias,
                                 delta_softplus)
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype, work = u.dtype, _work_dtype(u)
    if USE_TRITON and u.is_cuda and work == torch.float32 and scan_triton.available():
        # one kernel each way with bias, softplus, D, z and the casts inside (custom ops: no graph break under
        # torch.compile)
        return scan_triton.selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
        dt = delta if delta_bias is None else delta + delta_bias.to(work)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        y = _scan_loop(u, dt, A, B, C)
        if D is not None:
            y = y + D.to(work)[:, None] * u
        if z is not None:
            y = y * F.silu(z.to(work))
    return y.to(dtype)


def _work_dtype(u):
    """Scans run in float32 (as mamba-ssm's kernel does), or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence exactly as written, one time step at a time."""
    dtype, work = u.dtype, _work_dtype(u)
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)


# ---------------------------------------------------------------------------------------------
# torch backend: y_t = <C_t, h_t>, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, with a hand-written
# backward. Work tensors are time-major, (c, b, d, n), so that one time step is a contiguous slab and
# a block of steps folds into one batch dimension for matmuls without copies.

def _block_len(u, n, block_len=None):
    b, d, l = u.shape
    if block_len is None:
        block_len = _setting(BLOCK_ELEMENTS, u) // (b * d * n)
    return max(1, min(l, block_len))


def _setting(table, u):
    return table.get(u.device.type, table["cuda"])


def _time_major(t):
    """(b, k, l) -> contiguous (l, b, k)."""
    return t.permute(2, 0, 1).contiguous()


def _block_states(dt, u, A, B, h0):
    """One block of c steps. dt, u: (c, b, d); A: (d, n); B: (c, b, n); h0: entering state (b, d, n) or
    None. Returns the decays a = exp(dt A) (c, b, d, n) and hh (c + 1, b, d, n) holding the entering
    state followed by the c states: hh[:-1] are the previous states, hh[1:] the states."""
    c, b, d = u.shape
    a = (dt[..., None] * A).exp_()
    hh = a.new_empty(c + 1, b, d, A.shape[1])
    hh[0] = 0 if h0 is None else h0
    torch.mul((dt * u)[..., None], B[:, :, None, :], out=hh[1:])  # inputs x_t = dt_t u_t B_t
    for j in range(c):  # the recurrence: one fused multiply-add over a (b, d, n) slab per step
        hh[j + 1].addcmul_(a[j], hh[j])
    return a, hh


@torch.compiler.disable  # run eagerly under torch.compile: its per-block Python state does not trace
def _scan_loop(u, dt, A, B, C):
    return _ScanFn.apply(u, dt, A, B, C)


class _ScanFn(torch.autograd.Function):
    """Core scan without D, z, bias and softplus (those stay in autograd). u, dt: (b, d, l); A: (d, n);
    B, C: (b, n, l); float32 or float64. Returns y (b, d, l)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, block_len=None):
        b, d, l = u.shape
        c = _block_len(u, A.shape[1], block_len)
        keep = _setting(KEEP_STATES, u)
        uT, dtT, BT, CT = (_time_major(t) for t in (u, dt, B, C))  # (l, b, .)
        y = u.new_empty(l, b, d)
        h, starts, kept = None, [], []  # per block: entering state (b, d, n); all states if keep
        for t0 in range(0, l, c):
            t1 = min(t0 + c, l)
            starts.append(h)
            _, hh = _block_states(dtT[t0:t1], uT[t0:t1], A, BT[t0:t1], h)
            torch.matmul(hh[1:], CT[t0:t1, :, :, None], out=y[t0:t1, :, :, None])
            h = hh[-1] if keep else hh[-1].clone()
            if keep:
                kept.append(hh)
        ctx.save_for_backward(u, dt, A, B, C)
        ctx.starts, ctx.kept, ctx.block = starts, kept, c
        return y.permute(1, 2, 0)

    @staticmethod
    def backward(ctx, gy):
        u, dt, A, B, C = ctx.saved_tensors
        b, d, l = u.shape
        n, c = A.shape[1], ctx.block
        uT, dtT, BT, CT, gyT = (_time_major(t) for t in (u, dt, B, C, gy))
        g_u, g_dt = torch.empty_like(uT), torch.empty_like(dtT)
        g_B, g_C = torch.empty_like(BT), torch.empty_like(CT)
        g_A = torch.zeros_like(A)
        carry = None  # a_{t1} G_{t1}: the gradient reaching a block's last state from the next block
        for k, t0 in reversed(list(enumerate(range(0, l, c)))):
            t1 = min(t0 + c, l)
            dt_c, u_c, B_c, C_c, gy_c = dtT[t0:t1], uT[t0:t1], BT[t0:t1], CT[t0:t1], gyT[t0:t1]
            if ctx.kept:
                a, hh = (dt_c[..., None] * A).exp_(), ctx.kept[k]
            else:
                a, hh = _block_states(dt_c, u_c, A, B_c, ctx.starts[k])
            torch.matmul(gy_c[:, :, None, :], hh[1:], out=g_C[t0:t1, :, None, :])
            # G_t = dL/dh_t = gy_t C_t + a_{t+1} G_{t+1}: the same recurrence, backwards in time.
            G = gy_c[..., None] * C_c[:, :, None, :]
            if carry is not None:
                G[-1] += carry
            for j in range(t1 - t0 - 2, -1, -1):
                G[j].addcmul_(a[j + 1], G[j + 1])
            carry = a[0] * G[0]
            # x_t = dt_t u_t B_t receives G_t.
            g_dtu = (G @ B_c[..., None]).squeeze(-1)  # (c, b, d)
            torch.matmul((dt_c * u_c)[:, :, None, :], G, out=g_B[t0:t1, :, None, :])
            # a_t = exp(w_t), w_t = dt_t A, receives G_t h_{t-1}, so w_t receives g_w = G_t h_{t-1} a_t.
            g_w = a.mul_(hh[:-1]).mul_(G).view(-1, d, n).transpose(0, 1)  # (d, c*b, n), no copy
            g_A += (g_w.transpose(1, 2) @ dt_c.reshape(-1, d).T[..., None]).squeeze(-1)  # sum_{t,b} g_w dt
            torch.addcmul((g_w @ A[..., None]).squeeze(-1).T.view(-1, b, d), g_dtu, u_c, out=g_dt[t0:t1])
            torch.mul(g_dtu, dt_c, out=g_u[t0:t1])  # the D * u and z terms are differentiated outside
        return (g_u.permute(1, 2, 0), g_dt.permute(1, 2, 0), g_A, g_B.permute(1, 2, 0),
                g_C.permute(1, 2, 0), None)
