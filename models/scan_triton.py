"""The torch backend's selective scan on CUDA as two Triton kernels (forward, backward), with Mamba's extras fused.

Same recurrence as models/scan.py (`selective_scan_reference`): u, delta (b, d, l), A (d, n), B, C (b, n, l), and
optionally D, delta_bias (d,) and z (b, d, l); dt = softplus(delta + delta_bias) (softplus optional),
h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = <C_t, h_t> + D u_t, out = y * silu(z). Any strides and float dtypes
(bf16 under autocast): inputs are read as float32 and all arithmetic is float32, as in the PyTorch path; the output
and the gradients are written in the inputs' dtypes.

Why kernels: in plain PyTorch every time step is a separate launch over a (b, d, n) state that lives in device
memory; here one program owns BLOCK_D channels x n states of one sequence and keeps them in registers for the
whole sequence, so the forward reads its inputs once and writes out once. The bias, softplus, D and z terms and the
dtype conversions are done in the same kernels: in PyTorch they are ~20 launches and as many passes over
(b, d, l) float32 tensors per layer, forward and backward (issue 17: the eager training step is launch-bound).
The forward also writes dt and the ungated output for the backward, which re-runs the recurrence, parks the states
in a scratch buffer of its own, then walks time backwards. Reductions across channels (dB, dC) and across the batch
(dA, dD, d bias) are written as per-program partial sums and added up in PyTorch, so results are deterministic.

Both passes are registered as torch.library custom ops, which torch.compile traces (opaque to it, capturable in
CUDA graphs); eager calls run the same kernels through an autograd.Function (`_EagerScan`: less host time).
Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors; the tests use it.
"""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: models/scan.py then uses its PyTorch loop everywhere
    triton = None

# One warp per program of 32 channels: the time loops are latency-bound, and with one warp the sums across a program's
# channels (dB, dC) need no barrier. H200, (192, 1536, 64) bf16, forward + backward: 2.16 ms, against 3.72 ms with 4
# warps and without loading one step ahead (block sizes 16-64, 1-4 warps and a chunked backward tried: README,
# Speed).
BLOCK_D = 32
NUM_WARPS = 1


def available():
    return triton is not None


if triton is not None:

    @triton.jit
    def _dt(raw, bias, m, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """dt = softplus(delta + bias), or delta + bias, from the loaded delta."""
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += bias
        if SOFTPLUS:  # max(raw, 0) + log1p(exp(-|raw|)), log1p by Kahan's trick (exact for tiny arguments)
            e = tl.exp(-tl.abs(raw))
            e1 = 1.0 + e
            dt = tl.maximum(raw, 0.0) + tl.where(e1 == 1.0, e, tl.log(e1) * e / (e1 - 1.0))
            dt = tl.where(m, dt, 0.0)  # padded channels: dt = 0 keeps their states at 0
        else:
            dt = raw
        return dt

    # Every time loop below loads step t+1's inputs before it computes step t: each program is a chain of dependent
    # steps, so the time per step is the latency of its loads unless they are in flight during the arithmetic.

    @triton.jit
    def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, saved_ptr, D, N,
                    su_b, su_d, su_l, st_b, st_d, st_l, sa_d, sa_n, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l,
                    sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, L: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, SAVE: tl.constexpr):
        # SAVE (for the backward): dt and the ungated output y, float32 (2, b, l, D) in saved
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < D, n < N
        # padded channels/states load A = 0 and u = dt = B = C = 0: their states stay 0 and add nothing
        A2 = tl.load(A_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=md[:, None] & mn[None, :],
                     other=0.0) * 1.4426950408889634
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
        Dv = 0.0
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        u_p, dl_p = u_ptr + b * su_b + d * su_d, delta_ptr + b * st_b + d * st_d
        B_p, C_p, z_p = B_ptr + b * sb_b + n * sb_n, C_ptr + b * sc_b + n * sc_n, z_ptr + b * sz_b + d * sz_d
        u_n, dl_n = tl.load(u_p, mask=md, other=0.0), tl.load(dl_p, mask=md, other=0.0)
        B_n, C_n = tl.load(B_p, mask=mn, other=0.0), tl.load(C_p, mask=mn, other=0.0)
        z_n = tl.load(z_p, mask=md & HAS_Z, other=0.0)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for t in range(L):
            u, dl, Bt, Ct, z = u_n, dl_n, B_n, C_n, z_n
            m1, mn1 = md & (t + 1 < L), mn & (t + 1 < L)
            u_n = tl.load(u_p + (t + 1) * su_l, mask=m1, other=0.0)
            dl_n = tl.load(dl_p + (t + 1) * st_l, mask=m1, other=0.0)
            B_n = tl.load(B_p + (t + 1) * sb_l, mask=mn1, other=0.0)
            C_n = tl.load(C_p + (t + 1) * sc_l, mask=mn1, other=0.0)
            z_n = tl.load(z_p + (t + 1) * sz_l, mask=m1 & HAS_Z, other=0.0)
            u = u.to(tl.float32)
            dt = _dt(dl, bias, md, HAS_BIAS, SOFTPLUS)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt.to(tl.float32)[None, :]
            y = tl.sum(h * Ct.to(tl.float32)[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if SAVE:
                row = b * L * D + t * D + d
                tl.store(saved_ptr + row, dt, mask=md)
                tl.store(saved_ptr + tl.num_programs(0) * L * D + row, y, mask=md)
            if HAS_Z:
                z = z.to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(y_ptr + b * sy_b + d * sy_d + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=md)

    @triton.jit
    def _bwd_kernel(u_ptr, saved_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, gy_ptr, hs_ptr,
                    gu_ptr, gdelta_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
                    D, N, su_b, su_d, su_l, sa_d, sa_n, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l,
                    sz_b, sz_d, sz_l, sg_b, sg_d, sg_l, L: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # saved: the forward's dt and ungated y, (2, b, l, D) float32.
        # gu, gdelta, gz: (b, l, D) contiguous; gA: (b, D, N), gD and gbias: (b, D) per-sequence partials;
        # gB, gC: (b, n_blocks, L, N) per-channel-block partials; hs: (b, n_blocks, L, BLOCK_D, BLOCK_N) scratch
        # for this program's states.
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        n_blocks = tl.num_programs(1)
        d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < D, n < N
        mdn = md[:, None] & mn[None, :]
        A = tl.load(A_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=mdn, other=0.0)
        A2 = A * 1.4426950408889634
        y_off = tl.num_programs(0) * L * D
        Dv = 0.0
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        TILE: tl.constexpr = BLOCK_D * BLOCK_N
        tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
        # hs keeps the states of even steps only (half the scratch traffic); pass 2 recomputes an odd step's state
        # from the even one before it, with the same expression as pass 1
        hs_base = hs_ptr + (b * n_blocks + blk) * ((L + 1) // 2) * TILE
        u_p, dt_p = u_ptr + b * su_b + d * su_d, saved_ptr + b * L * D + d
        B_p, C_p = B_ptr + b * sb_b + n * sb_n, C_ptr + b * sc_b + n * sc_n
        z_p, g_p = z_ptr + b * sz_b + d * sz_d, gy_ptr + b * sg_b + d * sg_d
        # pass 1: the forward recurrence again, parking every state
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        u_n, dt_n = tl.load(u_p, mask=md, other=0.0), tl.load(dt_p, mask=md, other=0.0)
        B_n = tl.load(B_p, mask=mn, other=0.0)
        for t in range(L):
            u, dt, Bt = u_n, dt_n, B_n
            m1, mn1 = md & (t + 1 < L), mn & (t + 1 < L)
            u_n = tl.load(u_p + (t + 1) * su_l, mask=m1, other=0.0)
            dt_n = tl.load(dt_p + (t + 1) * D, mask=m1, other=0.0)
            B_n = tl.load(B_p + (t + 1) * sb_l, mask=mn1, other=0.0)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u.to(tl.float32))[:, None] * Bt.to(tl.float32)[None, :]
            if t % 2 == 0:
                tl.store(hs_base + (t // 2) * TILE + tile, h)
        tl.debug_barrier()
        # pass 2, backwards in time. G_t = dLoss/dh_t = g_t C_t + a_{t+1} G_{t+1} (g_t: the gradient of the scan's
        # own output <C_t, h_t>); `carry` holds a_{t+1} G_{t+1}.
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
        gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
        h_t = h
        # u, dt and B are loaded two steps ahead (step t-1's recompute the state h_{t-1} of an odd t-1 at step t),
        # the rest one step ahead
        t = L - 1
        u_c, dt_c = tl.load(u_p + t * su_l, mask=md, other=0.0), tl.load(dt_p + t * D, mask=md, other=0.0)
        B_c = tl.load(B_p + t * sb_l, mask=mn, other=0.0)
        m1, mn1 = md & (L > 1), mn & (L > 1)
        u_n, dt_n = tl.load(u_p + (t - 1) * su_l, mask=m1, other=0.0), tl.load(dt_p + (t - 1) * D, mask=m1, other=0.0)
        B_n = tl.load(B_p + (t - 1) * sb_l, mask=mn1, other=0.0)
        g_n = tl.load(g_p + t * sg_l, mask=md, other=0.0)
        y_n = tl.load(dt_p + y_off + t * D, mask=md & HAS_Z, other=0.0)
        z_n = tl.load(z_p + t * sz_l, mask=md & HAS_Z, other=0.0)
        C_n = tl.load(C_p + t * sc_l, mask=mn, other=0.0)
        hp_n = tl.load(hs_base + ((L - 2) // 2) * TILE + tile, mask=(tile >= 0) & (L > 1), other=0.0)
        for i in range(L):
            t = L - 1 - i
            u, dt, Bt, g, y, z, Ct, h_even = u_c, dt_c, B_c, g_n, y_n, z_n, C_n, hp_n
            u_c, dt_c, B_c = u_n, dt_n, B_n  # step t-1
            m1, mn1, m2, mn2 = md & (t > 0), mn & (t > 0), md & (t > 1), mn & (t > 1)
            u_n = tl.load(u_p + (t - 2) * su_l, mask=m2, other=0.0)
            dt_n = tl.load(dt_p + (t - 2) * D, mask=m2, other=0.0)
            B_n = tl.load(B_p + (t - 2) * sb_l, mask=mn2, other=0.0)
            g_n = tl.load(g_p + (t - 1) * sg_l, mask=m1, other=0.0)
            y_n = tl.load(dt_p + y_off + (t - 1) * D, mask=m1 & HAS_Z, other=0.0)
            z_n = tl.load(z_p + (t - 1) * sz_l, mask=m1 & HAS_Z, other=0.0)
            C_n = tl.load(C_p + (t - 1) * sc_l, mask=mn1, other=0.0)
            hp_n = tl.load(hs_base + ((t - 2) // 2) * TILE + tile, mask=(tile >= 0) & (t > 1), other=0.0)
            if t % 2 == 0:  # h_{t-1} from h_{t-2} (stored; zeros and zero inputs for t = 0 give h_{-1} = 0)
                h_prev = tl.exp2(dt_c[:, None] * A2) * h_even + \
                    (dt_c * u_c.to(tl.float32))[:, None] * B_c.to(tl.float32)[None, :]
            else:
                h_prev = h_even
            u, g, Bt, Ct = u.to(tl.float32), g.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32)
            row = b * L * D + t * D + d
            a = tl.exp2(dt[:, None] * A2)
            if HAS_Z:  # out = y * silu(z), y = <C, h> + D u (saved by the forward)
                z = z.to(tl.float32)
                sz = tl.sigmoid(z)
                tl.store(gz_ptr + row, (g * y * sz * (1.0 + z * (1.0 - sz))).to(gz_ptr.dtype.element_ty), mask=md)
                g = g * z * sz
            if HAS_D:
                gD += g * u
            G = g[:, None] * Ct[None, :] + carry
            part = (b * n_blocks + blk) * L * N + t * N + n
            tl.store(gC_ptr + part, tl.sum(g[:, None] * h_t, axis=0), mask=mn)
            tl.store(gB_ptr + part, tl.sum(G * (dt * u)[:, None], axis=0), mask=mn)
            g_dtu = tl.sum(G * Bt[None, :], axis=1)  # x_t = dt u B receives G_t
            g_w = G * h_prev * a                     # w = dt A (a = exp(w)) receives G_t h_{t-1} a_t
            gA += g_w * dt[:, None]
            g_dt = tl.sum(g_w * A, axis=1) + g_dtu * u
            if SOFTPLUS:  # d softplus(raw) / d raw = sigmoid(raw) = 1 - exp(-dt) (its series for small dt)
                g_dt = g_dt * tl.where(dt < 1e-4, dt * (1.0 - 0.5 * dt), 1.0 - tl.exp(-dt))
            if HAS_BIAS:
                gbias += g_dt
            g_u = g_dtu * dt
            if HAS_D:
                g_u += Dv * g
            tl.store(gdelta_ptr + row, g_dt.to(gdelta_ptr.dtype.element_ty), mask=md)
            tl.store(gu_ptr + row, g_u.to(gu_ptr.dtype.element_ty), mask=md)
            carry = a * G
            h_t = h_prev
        tl.store(gA_ptr + b * D * N + d[:, None] * N + n[None, :], gA, mask=mdn)
        if HAS_D:
            tl.store(gD_ptr + b * D + d, gD, mask=md)
        if HAS_BIAS:
            tl.store(gbias_ptr + b * D + d, gbias, mask=md)


def _block_n(N):
    return max(2, triton.next_power_of_2(N))


def _strides(t, like):
    """A tensor's (b, d, l) strides, or like's for an absent one (its kernel branch is compiled out)."""
    return t.stride() if t is not None else like.stride()


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save):
    """(y, saved): saved holds dt and the ungated y for the backward when `save`, else it is empty."""
    b, Dn, L = u.shape
    N = A.shape[1]
    y = u.new_empty(b, L, Dn).transpose(1, 2)  # (b, d, l) view of a (b, l, d) buffer, like Mamba's activations
    saved = u.new_empty((2, b, L, Dn) if save else (0,), dtype=torch.float32)
    grid = (b, triton.cdiv(Dn, BLOCK_D))
    _fwd_kernel[grid](u, delta, A, B, C, u if D is None else D, u if z is None else z,
                      u if delta_bias is None else delta_bias, y, saved, Dn, N, *u.stride(), *delta.stride(),
                      *A.stride(), *B.stride(), *C.stride(), *_strides(z, u), *y.stride(), L=L, BLOCK_D=BLOCK_D,
                      BLOCK_N=_block_n(N), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                      SOFTPLUS=delta_softplus, SAVE=save, num_warps=NUM_WARPS)
    return y, saved


@torch.library.custom_op("mambatalk::selective_scan_fwd", mutates_args=())
def scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
             delta_softplus: bool, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save)


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save):
    b, Dn, L = u.shape
    return u.new_empty(b, L, Dn).transpose(1, 2), u.new_empty((2, b, L, Dn) if save else (0,), dtype=torch.float32)


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, gy):
    """[g_u, g_delta, g_A, g_B, g_C] + [g_D] + [g_z] + [g_delta_bias] for the inputs that are given."""
    b, Dn, L = u.shape
    N = A.shape[1]
    BN = _block_n(N)
    n_blocks = triton.cdiv(Dn, BLOCK_D)
    hs = u.new_empty(b * n_blocks * ((L + 1) // 2) * BLOCK_D * BN, dtype=torch.float32)
    g_u, g_delta = u.new_empty(b, L, Dn), delta.new_empty(b, L, Dn)
    g_z = z.new_empty(b, L, Dn) if z is not None else g_u
    f32 = dict(dtype=torch.float32)
    g_A = u.new_empty(b, Dn, N, **f32)
    g_B, g_C = u.new_empty(b, n_blocks, L, N, **f32), u.new_empty(b, n_blocks, L, N, **f32)
    g_D = u.new_empty(b, Dn, **f32) if D is not None else g_A
    g_bias = u.new_empty(b, Dn, **f32) if delta_bias is not None else g_A
    _bwd_kernel[(b, n_blocks)](u, saved, A, B, C, u if D is None else D, u if z is None else z, gy, hs,
                               g_u, g_delta, g_z, g_A, g_B, g_C, g_D, g_bias, Dn, N, *u.stride(), *A.stride(),
                               *B.stride(),
                               *C.stride(), *_strides(z, u), *gy.stride(), L=L, BLOCK_D=BLOCK_D,
                               BLOCK_N=BN, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                               SOFTPLUS=delta_softplus, num_warps=NUM_WARPS)
    out = [g_u.transpose(1, 2), g_delta.transpose(1, 2), g_A.sum(0).to(A.dtype),
           g_B.sum(1).transpose(1, 2).contiguous().to(B.dtype), g_C.sum(1).transpose(1, 2).contiguous().to(C.dtype)]
    if D is not None:
        out.append(g_D.sum(0).to(D.dtype))
    if z is not None:
        out.append(g_z.transpose(1, 2))
    if delta_bias is not None:
        out.append(g_bias.sum(0).to(delta_bias.dtype))
    return out


@torch.library.custom_op("mambatalk::selective_scan_bwd", mutates_args=())
def scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
             delta_softplus: bool, saved: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    return _scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, gy)


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, gy):
    b, Dn, L = u.shape
    N = A.shape[1]
    g = lambda t: t.new_empty(b, L, Dn).transpose(1, 2)
    out = [g(u), g(delta), torch.empty_like(A), B.new_empty(b, N, L), C.new_empty(b, N, L)]
    out += [torch.empty_like(D)] if D is not None else []
    out += [g(z)] if z is not None else []
    out += [torch.empty_like(delta_bias)] if delta_bias is not None else []
    return out


def _setup(ctx, inputs, output):
    if not inputs[9]:
        raise RuntimeError("selective_scan_fwd was called with save=False where gradients are needed")
    ctx.save_for_backward(*inputs[:8], output[1])
    ctx.softplus = inputs[8]


def _input_grads(ctx, gy, bwd):
    """The 8 inputs' gradients (None for an absent D, z or bias) from the backward kernel's list."""
    u, delta, A, B, C, D, z, bias, saved = ctx.saved_tensors
    grads = iter(bwd(u, delta, A, B, C, D, z, bias, ctx.softplus, saved, gy))
    out = [next(grads) for _ in range(5)]
    return out + [next(grads) if t is not None else None for t in (D, z, bias)]


def _backward(ctx, gy, _):
    return (*_input_grads(ctx, gy, scan_bwd), None, None)


scan_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerScan(torch.autograd.Function):
    """The same kernels and saved tensors as the custom ops, without torch.library's dispatch: that costs ~70 us of
    host time per call (CPU probe: 260 against 120 us per forward + backward), and the eager training step on a
    GPU is set by its host (issue 17). torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        y, saved = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved)
        ctx.softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, gy):
        return (*_input_grads(ctx, gy, _scan_bwd), None)


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """models.scan.selective_scan for CUDA tensors in one forward and one backward kernel: y (b, d, l) in u's dtype.
    Inputs in any float dtype (bf16 under autocast) and strides, read as float32 in the kernels, which compute in
    float32 as the PyTorch path does; gradients come back in each input's dtype."""
    ins = (u, delta, A, B, C, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ins)
    if torch.compiler.is_compiling():
        return scan_fwd(*ins, bool(delta_softplus), save)[0]
    if save:
        return _EagerScan.apply(*ins, bool(delta_softplus))
    return _scan_fwd(*ins, bool(delta_softplus), False)[0]

