"""The torch backend's selective scan on CUDA as two Triton kernels (forward, backward).

Same core as models/scan.py's `_ScanFn`: u, dt (b, d, l) with dt already biased and softplus'ed, A (d, n),
B, C (b, n, l), all float32, any strides; returns y (b, d, l) with y_t = <C_t, h_t>,
h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t. D, z, bias and softplus stay in autograd around it.

Why kernels: in plain PyTorch every time step is a separate launch over a (b, d, n) state that lives in device
memory; here one program owns BLOCK_D channels x n states of one sequence and keeps them in registers for the
whole sequence, so the forward reads u, dt, B, C once and writes y once. The backward first re-runs the forward
and parks the states in a scratch buffer (its own slice, so it stays mostly in L2), then walks time backwards.
Reductions across channels (dB, dC) and across the batch (dA) are written as per-program partial sums and added
up in PyTorch, so results are deterministic.

Both passes are registered as torch.library custom ops (opaque to torch.compile, capturable in CUDA graphs).
Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors; the tests use it.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: models/scan.py then uses its PyTorch loop everywhere
    triton = None

BLOCK_D = 32  # channels per program: b * d / 32 programs (3072 at batch 64, d_inner 1536)


def available():
    return triton is not None


if triton is not None:

    @triton.jit
    def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, D, N,
                    su_b, su_d, su_l, st_b, st_d, st_l, sa_d, sa_n, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l,
                    sy_b, sy_d, sy_l, L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < D, n < N
        # padded channels/states load A = 0 and u = dt = B = C = 0: their states stay 0 and add nothing
        A2 = tl.load(A_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=md[:, None] & mn[None, :], other=0.0) * 1.4426950408889634
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for t in range(L):
            u = tl.load(u_ptr + b * su_b + d * su_d + t * su_l, mask=md, other=0.0)
            dt = tl.load(dt_ptr + b * st_b + d * st_d + t * st_l, mask=md, other=0.0)
            Bt = tl.load(B_ptr + b * sb_b + n * sb_n + t * sb_l, mask=mn, other=0.0)
            Ct = tl.load(C_ptr + b * sc_b + n * sc_n + t * sc_l, mask=mn, other=0.0)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(y_ptr + b * sy_b + d * sy_d + t * sy_l, tl.sum(h * Ct[None, :], axis=1), mask=md)

    @triton.jit
    def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, hs_ptr, gu_ptr, gdt_ptr, gA_ptr, gB_ptr, gC_ptr,
                    D, N, su_b, su_d, su_l, st_b, st_d, st_l, sa_d, sa_n, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l,
                    sg_b, sg_d, sg_l, L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        # gu, gdt: (b, l, D) contiguous; gA: (b, D, N) per-sequence partials; gB, gC: (b, n_blocks, L, N)
        # per-channel-block partials; hs: (b, n_blocks, L, BLOCK_D, BLOCK_N) scratch for this program's states.
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        n_blocks = tl.num_programs(1)
        d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < D, n < N
        mdn = md[:, None] & mn[None, :]
        A = tl.load(A_ptr + d[:, None] * sa_d + n[None, :] * sa_n, mask=mdn, other=0.0)
        A2 = A * 1.4426950408889634
        tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
        hs_base = hs_ptr + (b * n_blocks + blk) * L * BLOCK_D * BLOCK_N
        # pass 1: the forward recurrence again, parking every state
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for t in range(L):
            u = tl.load(u_ptr + b * su_b + d * su_d + t * su_l, mask=md, other=0.0)
            dt = tl.load(dt_ptr + b * st_b + d * st_d + t * st_l, mask=md, other=0.0)
            Bt = tl.load(B_ptr + b * sb_b + n * sb_n + t * sb_l, mask=mn, other=0.0)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(hs_base + t * BLOCK_D * BLOCK_N + tile, h)
        tl.debug_barrier()
        # pass 2, backwards in time. G_t = dLoss/dh_t = gy_t C_t + a_{t+1} G_{t+1}; `carry` holds a_{t+1} G_{t+1}.
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        h_t = h
        for i in range(L):
            t = L - 1 - i
            u = tl.load(u_ptr + b * su_b + d * su_d + t * su_l, mask=md, other=0.0)
            dt = tl.load(dt_ptr + b * st_b + d * st_d + t * st_l, mask=md, other=0.0)
            gy = tl.load(gy_ptr + b * sg_b + d * sg_d + t * sg_l, mask=md, other=0.0)
            Bt = tl.load(B_ptr + b * sb_b + n * sb_n + t * sb_l, mask=mn, other=0.0)
            Ct = tl.load(C_ptr + b * sc_b + n * sc_n + t * sc_l, mask=mn, other=0.0)
            h_prev = tl.load(hs_base + (t - 1) * BLOCK_D * BLOCK_N + tile, mask=(tile >= 0) & (t > 0), other=0.0)
            a = tl.exp2(dt[:, None] * A2)
            G = gy[:, None] * Ct[None, :] + carry
            part = (b * n_blocks + blk) * L * N + t * N + n
            tl.store(gC_ptr + part, tl.sum(gy[:, None] * h_t, axis=0), mask=mn)
            tl.store(gB_ptr + part, tl.sum(G * (dt * u)[:, None], axis=0), mask=mn)
            g_dtu = tl.sum(G * Bt[None, :], axis=1)  # x_t = dt u B receives G_t
            g_w = G * h_prev * a                     # w = dt A (a = exp(w)) receives G_t h_{t-1} a_t
            gA += g_w * dt[:, None]
            row = b * L * D + t * D + d
            tl.store(gdt_ptr + row, tl.sum(g_w * A, axis=1) + g_dtu * u, mask=md)
            tl.store(gu_ptr + row, g_dtu * dt, mask=md)
            carry = a * G
            h_t = h_prev
        tl.store(gA_ptr + b * D * N + d[:, None] * N + n[None, :], gA, mask=mdn)


def _block_n(N):
    return max(2, triton.next_power_of_2(N))


@torch.library.custom_op("mambatalk::selective_scan_fwd", mutates_args=())
def scan_fwd(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    b, D, L = u.shape
    N = A.shape[1]
    y = u.new_empty(b, L, D).transpose(1, 2)  # (b, d, l) view of a (b, l, d) buffer, like Mamba's activations
    grid = (b, triton.cdiv(D, BLOCK_D))
    _fwd_kernel[grid](u, dt, A, B, C, y, D, N, *u.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
                      *y.stride(), L=L, BLOCK_D=BLOCK_D, BLOCK_N=_block_n(N), num_warps=4)
    return y


@scan_fwd.register_fake
def _(u, dt, A, B, C):
    b, D, L = u.shape
    return u.new_empty(b, L, D).transpose(1, 2)


@torch.library.custom_op("mambatalk::selective_scan_bwd", mutates_args=())
def scan_bwd(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, D, L = u.shape
    N = A.shape[1]
    BN = _block_n(N)
    n_blocks = triton.cdiv(D, BLOCK_D)
    hs = u.new_empty(b * n_blocks * L * BLOCK_D * BN)
    g_u, g_dt = u.new_empty(b, L, D), u.new_empty(b, L, D)
    g_A = u.new_empty(b, D, N)
    g_B, g_C = u.new_empty(b, n_blocks, L, N), u.new_empty(b, n_blocks, L, N)
    _bwd_kernel[(b, n_blocks)](u, dt, A, B, C, gy, hs, g_u, g_dt, g_A, g_B, g_C, D, N, *u.stride(),
                               *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *gy.stride(),
                               L=L, BLOCK_D=BLOCK_D, BLOCK_N=BN, num_warps=4)
    return (g_u.transpose(1, 2), g_dt.transpose(1, 2), g_A.sum(0),
            g_B.sum(1).transpose(1, 2).contiguous(), g_C.sum(1).transpose(1, 2).contiguous())


@scan_bwd.register_fake
def _(u, dt, A, B, C, gy):
    b, D, L = u.shape
    N = A.shape[1]
    g = u.new_empty(b, L, D).transpose(1, 2)
    return g, torch.empty_like(g), A.new_empty(D, N), B.new_empty(b, N, L), C.new_empty(b, N, L)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    return scan_bwd(*ctx.saved_tensors, gy)


scan_fwd.register_autograd(_backward, setup_context=_setup)


def selective_scan_core(u, dt, A, B, C):
    """y (b, d, l) for float32 u, dt (b, d, l), A (d, n), B, C (b, n, l); differentiable in all five."""
    return scan_fwd(u, dt, A, B, C)
