"""Convolution kernels in Triton for GPUs: Mamba's causal depthwise convolution and SiLU (forward, backward) for
training, and the audio encoder's convolution epilogue (bias, shortcut, LeakyReLU) for inference.

The causal convolution. Reference (models/ssm.py, Mamba.forward): y = silu(conv1d(x)[..., :L]), a depthwise Conv1d
of kernel K with K-1 zeros of padding in front, on x (b, E, l). Here x comes in the in-projection's own layout,
(b, l, E) with any strides, and y goes out as a contiguous (b, l, E) tensor in x's dtype, which is what the
x-projection reads; the scan reads its transpose without a copy.

Why kernels: in PyTorch this is a layout copy, cuDNN's/ATen's depthwise kernel (slow for 4 taps: ~0.2 ms per layer
at batch 192 x 64 frames x 1536 channels on an H200), a slice, SiLU, and in the backward the same again with a
zero-filled slice gradient: ~10 launches and ~0.55 ms per Mamba layer. One program here owns a (time x channel) tile;
the backward recomputes the pre-activation instead of storing it. The sums are float32; the result is rounded once to
x's dtype (the PyTorch path under bf16 autocast also rounds the convolution's output and its weights to bf16 before
SiLU, so the two differ by bf16 rounding: tests/test_speed.py states the bound). Weight and bias gradients are written
as per-program partial sums and added up in PyTorch, so results are deterministic.
"""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_L, BLOCK_E = 64, 64


def available():
    return triton is not None


if triton is not None:

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, L, E, sx_b, sx_l, sx_e,
                    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
        pb = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        me = e < E
        s = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(b_ptr + e, mask=me, other=0.0)[None, :]
        for k in tl.static_range(K):
            ts = t - (K - 1) + k
            m = ((ts >= 0) & (ts < L))[:, None] & me[None, :]
            xv = tl.load(x_ptr + pb * sx_b + ts[:, None] * sx_l + e[None, :] * sx_e, mask=m, other=0.0)
            s += xv.to(tl.float32) * tl.load(w_ptr + e * K + k, mask=me, other=0.0)[None, :]
        y = s * tl.sigmoid(s)
        out = (t < L)[:, None] & me[None, :]
        tl.store(y_ptr + pb * L * E + t[:, None] * E + e[None, :], y.to(y_ptr.dtype.element_ty), mask=out)

    @triton.jit
    def _preact(x_ptr, w_ptr, bias, pb, tau, e, me, L, sx_b, sx_l, sx_e, K: tl.constexpr):
        """The convolution's output (before SiLU) at times tau (BLOCK_L,), channels e (BLOCK_E,)."""
        s = bias[None, :] + tl.zeros((tau.shape[0], e.shape[0]), dtype=tl.float32)
        for k in tl.static_range(K):
            ts = tau - (K - 1) + k
            m = ((ts >= 0) & (ts < L))[:, None] & me[None, :]
            xv = tl.load(x_ptr + pb * sx_b + ts[:, None] * sx_l + e[None, :] * sx_e, mask=m, other=0.0)
            s += xv.to(tl.float32) * tl.load(w_ptr + e * K + k, mask=me, other=0.0)[None, :]
        return s

    @triton.jit
    def _bwd_kernel(x_ptr, w_ptr, b_ptr, gy_ptr, gx_ptr, gw_ptr, gb_ptr, L, E, sx_b, sx_l, sx_e,
                    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
        # gy, gx: (b, l, E) contiguous; gw: (programs over b and l, E, K) and gb: (programs over b and l, E) partials
        pb = tl.program_id(0).to(tl.int64)
        pl = tl.program_id(1)
        t = pl * BLOCK_L + tl.arange(0, BLOCK_L)
        e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        me = e < E
        bias = tl.load(b_ptr + e, mask=me, other=0.0)
        part = pb * tl.num_programs(1) + pl
        gx = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32)
        # x_t feeds the outputs at times t + j (j = 0..K-1) through tap K-1-j; dL/ds there is gy * silu'(s)
        for j in tl.static_range(K):
            tau = t + j
            s = _preact(x_ptr, w_ptr, bias, pb, tau, e, me, L, sx_b, sx_l, sx_e, K)
            m = (tau < L)[:, None] & me[None, :]
            gy = tl.load(gy_ptr + pb * L * E + tau[:, None] * E + e[None, :], mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(s)
            gs = gy * sig * (1.0 + s * (1.0 - sig))
            gx += gs * tl.load(w_ptr + e * K + (K - 1 - j), mask=me, other=0.0)[None, :]
            if j == 0:  # the weight and bias gradients of this tile's own outputs
                tl.store(gb_ptr + part * E + e, tl.sum(gs, axis=0), mask=me)
                for k in tl.static_range(K):
                    ts = t - (K - 1) + k
                    mk = ((ts >= 0) & (ts < L))[:, None] & me[None, :]
                    xv = tl.load(x_ptr + pb * sx_b + ts[:, None] * sx_l + e[None, :] * sx_e, mask=mk, other=0.0)
                    tl.store(gw_ptr + part * E * K + e * K + k, tl.sum(gs * xv.to(tl.float32), axis=0), mask=me)
        out = (t < L)[:, None] & me[None, :]
        tl.store(gx_ptr + pb * L * E + t[:, None] * E + e[None, :], gx.to(gx_ptr.dtype.element_ty), mask=out)


def _grid(x):
    b, L, E = x.shape
    return (b, triton.cdiv(L, BLOCK_L), triton.cdiv(E, BLOCK_E))


def _conv_silu_fwd(x, weight, bias):
    b, L, E = x.shape
    y = x.new_empty(b, L, E)
    _fwd_kernel[_grid(x)](x, weight, bias, y, L, E, *x.stride(), K=weight.shape[1], BLOCK_L=BLOCK_L,
                          BLOCK_E=BLOCK_E, num_warps=4)
    return y


@torch.library.custom_op("mambatalk::causal_conv_silu_fwd", mutates_args=())
def conv_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _conv_silu_fwd(x, weight, bias)


@conv_silu_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape)


def _conv_silu_bwd(x, weight, bias, gy):
    b, L, E = x.shape
    K = weight.shape[1]
    grid = _grid(x)
    gy = gy.contiguous()
    gx = x.new_empty(b, L, E)
    gw = weight.new_empty(b * grid[1], E, K)
    gb = bias.new_empty(b * grid[1], E)
    _bwd_kernel[grid](x, weight, bias, gy, gx, gw, gb, L, E, *x.stride(), K=K, BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E,
                      num_warps=4)
    return gx, gw.sum(0), gb.sum(0)


@torch.library.custom_op("mambatalk::causal_conv_silu_bwd", mutates_args=())
def conv_silu_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_silu_bwd(x, weight, bias, gy)


@conv_silu_bwd.register_fake
def _(x, weight, bias, gy):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    return conv_silu_bwd(*ctx.saved_tensors, gy)


conv_silu_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerConvSilu(torch.autograd.Function):
    """The custom ops' kernels without torch.library's dispatch (host time; see scan_triton._EagerScan)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _conv_silu_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        return _conv_silu_bwd(*ctx.saved_tensors, gy)


def causal_conv1d_silu(x, weight, bias):
    """silu(causal depthwise conv) of x (b, l, E) with weight (E, K) and bias (E,) (float32); -> (b, l, E) contiguous
    in x's dtype. Differentiable in all three. The custom ops under torch.compile, else the same kernels through an
    autograd.Function (less host time per call)."""
    weight, bias = weight.contiguous(), bias.contiguous()
    if torch.compiler.is_compiling():
        return conv_silu_fwd(x, weight, bias)
    return _EagerConvSilu.apply(x, weight, bias)


def causal_conv1d_silu_reference(x, weight, bias):
    """The same in PyTorch, as Mamba.forward computes it (the tests' ground truth)."""
    E, K = weight.shape
    y = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=K - 1, groups=E)
    return torch.nn.functional.silu(y[..., :x.shape[1]]).transpose(1, 2)


# The audio encoder's convolution epilogue (models/layers.BasicBlock, inference with folded BatchNorms). PyTorch adds a
# cuDNN convolution's bias in a kernel of its own, a strided broadcast over the channels-last output, then LeakyReLU,
# and for the block's second convolution also the shortcut (itself a convolution with its own bias add): five passes
# over the block's largest tensors. Here they are two, one per convolution, done in place in float32 registers and
# rounded once.
EPILOGUE_BLOCK = 2048

if triton is not None:

    @triton.jit
    def _epilogue_kernel(x_ptr, b_ptr, r_ptr, rb_ptr, N, C, slope,
                         HAS_RES: tl.constexpr, HAS_RES_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        c = offs % C
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + \
            tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RES_BIAS:
            v += tl.load(rb_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, tl.where(v >= 0.0, v, v * slope).to(x_ptr.dtype.element_ty), mask=m)


def epilogue_fits(x, shortcut=None):
    """Whether bias_leaky_relu_ takes x (and shortcut): on a GPU, channels-last (or plain (B, L, C)) memory with the
    channels last, and int32 offsets."""
    def dense(t):
        return t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous()
    return (triton is not None and x.is_cuda and x.numel() < 2 ** 31 and dense(x) and
            (shortcut is None or (shortcut.shape == x.shape and shortcut.dtype == x.dtype and dense(shortcut))))


@torch.library.custom_op("mambatalk::bias_leaky_relu_", mutates_args=("x",))
def bias_leaky_relu_(x: torch.Tensor, bias: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                     shortcut_bias: Optional[torch.Tensor] = None, slope: float = 0.01) -> None:
    """x <- leaky_relu(x + bias + shortcut + shortcut_bias), in place, the biases broadcast over the channels (dim 1,
    stored last in memory: epilogue_fits). shortcut and shortcut_bias may be None."""
    n, C = x.numel(), x.shape[1]
    grid = (triton.cdiv(n, EPILOGUE_BLOCK),)
    has_res, has_rb = shortcut is not None, shortcut_bias is not None
    _epilogue_kernel[grid](x, bias, shortcut if has_res else x, shortcut_bias if has_rb else bias, n, C, slope,
                           HAS_RES=has_res, HAS_RES_BIAS=has_rb, BLOCK=EPILOGUE_BLOCK, num_warps=8)


@bias_leaky_relu_.register_fake
def _(x, bias, shortcut=None, shortcut_bias=None, slope=0.01):
    return None


def bias_leaky_relu_reference(x, bias, shortcut=None, shortcut_bias=None, slope=0.01):
    """The same in PyTorch, out of place, as BasicBlock computes it unfused (the tests' ground truth)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = x + bias.reshape(view)
    if shortcut is not None:
        y = y + (shortcut if shortcut_bias is None else shortcut + shortcut_bias.reshape(view))
    return torch.nn.functional.leaky_relu(y, slope)


# The audio encoders' first convolutions (models/layers.BasicBlock.wave_conv, GPU training; off by default): 2 or 3
# input channels at the sample rate, 15 taps, stride 5, 128 output channels, where cuDNN is far from the GPU's speed.
# Each is one matrix product whose left operand is never built: in channels-last memory (B, L, C) the k x C inputs
# under output position l are the contiguous run x[b, l*stride - padding :][: k*C], so row (b, l) of the unfolded
# input is read straight from x with zeros where it falls into the padding. Only the forward and the weight and bias
# gradients exist: the encoders' input (the waveform features) needs no gradient. Sums are float32, the result rounded
# once to x's dtype (cuDNN under autocast rounds the convolution, then adds the bf16 bias and rounds again); the
# weight gradient is summed per program and the partial sums added up in PyTorch (deterministic).
# H200, batch 64 x 64 frames, bf16, with the bias (session 15): forward 0.24-0.28 ms against cuDNN's 0.39 ms, but
# forward + weight gradient 1.04 / 0.87 ms (3 / 2 input channels) against cuDNN's 0.86 / 0.85 ms, so it is off.
# Untried: the input channel count as a constexpr (every tile element divides by it at run time) and tuned tiles (an
# autotuned forward without the bias took 0.083 ms in a probe, this fixed tiling ~0.2 ms).
WAVE_MAX_K = 64  # taps x input channels that one program's operand tile holds
WAVE_BM, WAVE_BN, WAVE_SPLIT = 128, 128, 264  # the weight gradient's row chunks go to WAVE_SPLIT programs

if triton is not None:

    @triton.jit
    def _wave_rows(x_ptr, rows, kk, M, L, Lout, Cin, K, stride, padding):
        """The (rows x kk) tile of the unfolded input, zero outside the sequence and past M rows / K columns."""
        b = rows // Lout
        start = (rows % Lout) * stride - padding
        pos = start[:, None] + kk[None, :] // Cin
        m = (rows < M)[:, None] & (kk < K)[None, :] & (pos >= 0) & (pos < L)
        return tl.load(x_ptr + (b.to(tl.int64) * L * Cin + start * Cin)[:, None] + kk[None, :], mask=m, other=0.0)

    @triton.jit
    def _wave_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, L, Lout, Cin, stride, padding,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        a = _wave_rows(x_ptr, rows, kk, M, L, Lout, Cin, K, stride, padding)
        w = tl.load(w_ptr + kk[:, None] * N + cols[None, :], mask=(kk < K)[:, None] & (cols < N)[None, :], other=0.0)
        acc = tl.dot(a, w.to(a.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])

    @triton.jit
    def _wave_wgrad_kernel(x_ptr, gy_ptr, gw_ptr, gb_ptr, M, N, K, L, Lout, Cin, stride, padding,
                           CHUNKS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # gw partial (split, K, N) = unfolded x^T @ gy over this program's rows; gb partial (split, N) = sum of gy
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        split = tl.program_id(1)
        kk = tl.arange(0, BK)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        gb = tl.zeros((BN,), dtype=tl.float32)
        first = split * (CHUNKS * BM)
        for c in range(CHUNKS):  # the last program's rows past M load zeros
            rows = first + c * BM + tl.arange(0, BM)
            a = _wave_rows(x_ptr, rows, kk, M, L, Lout, Cin, K, stride, padding)
            g = tl.load(gy_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                        mask=(rows < M)[:, None] & (cols < N)[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), g.to(a.dtype), acc)
            gb += tl.sum(g.to(tl.float32), axis=0)
        base = split.to(tl.int64) * K * N
        tl.store(gw_ptr + base + kk[:, None] * N + cols[None, :], acc, mask=(kk < K)[:, None] & (cols < N)[None, :])
        tl.store(gb_ptr + split * N + cols, gb, mask=cols < N)


def _wave_sizes(x, weight, stride, padding):
    B, L, Cin = x.shape
    Cout, _, k = weight.shape
    Lout = (L + 2 * padding - k) // stride + 1
    return B, L, Cin, Cout, k, Lout


def _wave_block_k(K):
    return max(16, triton.next_power_of_2(K))


@torch.library.custom_op("mambatalk::wave_conv_fwd", mutates_args=())
def wave_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                  padding: int) -> torch.Tensor:
    """x (B, L, Cin) contiguous, weight (Cout, Cin, k) -> (B, Lout, Cout) contiguous in x's dtype."""
    B, L, Cin, Cout, k, Lout = _wave_sizes(x, weight, stride, padding)
    K, M = k * Cin, B * Lout
    w = weight.permute(2, 1, 0).reshape(K, Cout).contiguous()  # row j * Cin + c: tap j of input channel c
    y = x.new_empty(B, Lout, Cout)
    grid = (triton.cdiv(M, WAVE_BM), triton.cdiv(Cout, WAVE_BN))
    _wave_fwd_kernel[grid](x, w, w if bias is None else bias, y, M, Cout, K, L, Lout, Cin, stride, padding,
                           HAS_BIAS=bias is not None, BM=WAVE_BM, BN=WAVE_BN, BK=_wave_block_k(K), num_warps=8)
    return y


@wave_conv_fwd.register_fake
def _(x, weight, bias, stride, padding):
    B, L, Cin, Cout, k, Lout = _wave_sizes(x, weight, stride, padding)
    return x.new_empty(B, Lout, Cout)


@torch.library.custom_op("mambatalk::wave_conv_wgrad", mutates_args=())
def wave_conv_wgrad(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, stride: int,
                    padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight gradient in weight's dtype and layout, bias gradient (Cout,) float32) for wave_conv_fwd's output
    gradient gy (B, Lout, Cout)."""
    B, L, Cin, Cout, k, Lout = _wave_sizes(x, weight, stride, padding)
    K, M = k * Cin, B * Lout
    gy = gy.contiguous()
    rows_per_program = triton.cdiv(triton.cdiv(M, WAVE_SPLIT), WAVE_BM) * WAVE_BM
    split = triton.cdiv(M, rows_per_program)
    gw = x.new_empty(split, K, Cout, dtype=torch.float32)
    gb = x.new_empty(split, Cout, dtype=torch.float32)
    grid = (triton.cdiv(Cout, WAVE_BN), split)
    _wave_wgrad_kernel[grid](x, gy, gw, gb, M, Cout, K, L, Lout, Cin, stride, padding,
                             CHUNKS=rows_per_program // WAVE_BM, BM=WAVE_BM, BN=WAVE_BN, BK=_wave_block_k(K),
                             num_warps=8)
    g_weight = torch.empty_like(weight)
    g_weight.copy_(gw.sum(0).reshape(k, Cin, Cout).permute(2, 1, 0))
    return g_weight, gb.sum(0)


@wave_conv_wgrad.register_fake
def _(x, weight, gy, stride, padding):
    return torch.empty_like(weight), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _wave_setup(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, padding, None if bias is None else bias.dtype)


def _wave_backward(ctx, gy):
    x, weight = ctx.saved_tensors
    stride, padding, bias_dtype = ctx.conv
    if ctx.needs_input_grad[0]:
        raise RuntimeError("wave_conv has no input gradient (models/conv_triton.py): use it on inputs without one")
    g_weight, g_bias = wave_conv_wgrad(x, weight, gy, stride, padding)
    return None, g_weight, None if bias_dtype is None else g_bias.to(bias_dtype), None, None


wave_conv_fwd.register_autograd(_wave_backward, setup_context=_wave_setup)


def wave_conv_fits(x, weight):
    """Whether wave_conv takes this convolution: a GPU, few input channels (taps x channels <= WAVE_MAX_K), an input
    that needs no gradient, (B, L, C) memory and int32 offsets within a sequence."""
    return (triton is not None and x.is_cuda and not x.requires_grad and x.dim() == 3 and x.is_contiguous() and
            weight.shape[1] * weight.shape[2] <= WAVE_MAX_K and x.shape[1] * x.shape[2] < 2 ** 31)


def wave_conv(x, weight, bias=None, stride=1, padding=0):
    """Conv1d of x (B, L, Cin), channels last, with weight (Cout, Cin, k) -> (B, Lout, Cout): wave_conv_fits inputs.
    Under autocast it computes in autocast's dtype, as F.conv1d would."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return wave_conv_fwd(x, weight.to(x.dtype), bias, stride, padding)


def wave_conv_reference(x, weight, bias=None, stride=1, padding=0):
    """The same in PyTorch (the tests' ground truth)."""
    return torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, stride, padding).transpose(1, 2)
