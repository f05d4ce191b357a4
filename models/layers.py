"""Small building blocks shared by the generator and the stage-1 models (spec §4.1, §4.4.2, §4.4.5, §4.4.6).

Submodule names are part of the checkpoint format: do not rename attributes or reorder registrations.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import conv_triton


def init_weight(module):
    """Xavier-normal weights and zero biases for conv/linear layers; use as `net.apply(init_weight)`."""
    if isinstance(module, (nn.Conv1d, nn.Linear, nn.ConvTranspose1d)):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """x + conv(lrelu(conv(x))) on (B, C, T); no activation after the sum."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv1d(channels, channels, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv1d(channels, channels, 3, 1, 1),
        )

    def forward(self, x):
        return x + self.model(x)


class MLP(nn.Module):
    """Linear -> LeakyReLU(0.2) -> Linear, stored as `mlp.0` / `mlp.2`."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.mlp(x)


class BasicBlock(nn.Module):
    """1-D residual block of the audio encoder.

    `padding` applies to the first conv and the shortcut conv only (the published code calls it `first_dilation`);
    the second conv is always 'same' padded. The shortcut is a conv+BN when `downsample` is true, else the identity.

    `fused_epilogue`: None adds each convolution's bias, the shortcut and LeakyReLU in one Triton kernel
    (models/conv_triton.bias_leaky_relu_) when that is the same maths, i.e. for inference (no autograd) on a GPU, in
    channels-last memory, with the BatchNorms folded (fold_batchnorms: generation's bf16 copy); False: never (the
    tests and `bench_gpu.py --conv_epilogue` compare the two).
    """

    fused_epilogue = None
    # left_out: None, or (while WavEncoder.forward runs) the encoder's list of (BatchNorm, conv bias) pairs whose
    # zero gradient and running-mean shift _conv_bn leaves to the encoder
    left_out = None
    # wave_conv: True runs the first block's convolutions (2-3 input channels at the sample rate) as
    # models/conv_triton.wave_conv when training on a GPU under 16-bit autocast; False (default): cuDNN. Off because
    # on the H200 its forward beat cuDNN's but its weight gradient lost more (README, Speed: session 15); generation
    # always uses cuDNN.
    wave_conv = False

    def __init__(self, in_channels, channels, kernel_size, stride=1, padding=0, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size, stride, padding)
        self.bn1 = nn.BatchNorm1d(channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, 1, kernel_size // 2)
        self.bn2 = nn.BatchNorm1d(channels)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_channels, channels, kernel_size, stride, padding), nn.BatchNorm1d(channels))

    def fold_batchnorms(self):
        """For inference only (eval mode): each BatchNorm folded into the convolution before it, which then computes
        both (generation's bf16 copy, trainers/generate.bf16_weights: one kernel less per BatchNorm; the test set's
        audio encoders ran 600 of them)."""
        for conv, bn in ((self.conv1, "bn1"), (self.conv2, "bn2")):
            _fold_batchnorm(conv, getattr(self, bn))
            setattr(self, bn, nn.Identity())
        if self.downsample is not None:
            _fold_batchnorm(self.downsample[0], self.downsample[1])
            self.downsample[1] = nn.Identity()

    def forward(self, x):
        """x: (B, C, L), or (B, C, 1, L) in channels-last memory (WavEncoder.channels_last)."""
        if x.dim() == 4 and self._fuse(x):
            slope = self.act.negative_slope
            out = _epilogue(_conv2d(self.conv1, x, bias=False), self.conv1.bias, slope=slope)
            out = _conv2d(self.conv2, out, bias=False)
            if self.downsample is None:
                return _epilogue(out, self.conv2.bias, x, slope=slope)
            shortcut = _conv2d(self.downsample[0], x, bias=False)
            return _epilogue(out, self.conv2.bias, shortcut, self.downsample[0].bias, slope=slope)
        shortcut = x if self.downsample is None else self._conv_bn(self.downsample[0], self.downsample[1], x)
        out = self.act(self._conv_bn(self.conv1, self.bn1, x))
        out = self._conv_bn(self.conv2, self.bn2, out, wave=False)
        return self.act(out + shortcut)

    def _conv_bn(self, conv, bn, x, wave=True):
        """bn(conv(x)). A BatchNorm that normalises with the batch's own statistics (training) removes any
        per-channel constant from its input, so there the conv bias changes nothing but the running mean, and its
        true gradient is exactly zero (the published code computes it as a sum over batch and time that is
        rounding noise, which Adam then turns into steps of about the learning rate). So in training the
        convolution runs without its bias, which saves a pass over the output forward (the add) and one backward
        (that sum: ~2.6 ms of the H200 training step); the bias gets an exact zero gradient and is added to the
        running mean, which then holds what it would hold with the bias in the convolution. Inside a WavEncoder
        (`left_out` set) the encoder does both for all of its blocks at once (the eager step is host-bound)."""
        skip = isinstance(bn, nn.BatchNorm1d) and bn.training and conv.bias is not None
        if x.dim() == 3:
            out = F.conv1d(x, conv.weight, None if skip else conv.bias, conv.stride, conv.padding)
        else:
            out = self._conv(conv, x, bias=not skip) if wave else _conv2d(conv, x, bias=not skip)
        if skip and self.left_out is None:
            out = _ZeroGradient.apply(out, conv.bias)
        out = bn(out) if x.dim() == 3 else _bn2d(bn, out)
        if skip:
            if self.left_out is None:
                _shift_running_means([(bn, conv.bias)], x.device.type)
            else:
                self.left_out.append((bn, conv.bias))
        return out

    def _conv(self, conv, x, bias=True):
        """_conv2d, or wave_conv on the (B, L, C) view of x's channels-last memory (see wave_conv above)."""
        if self.wave_conv and torch.is_grad_enabled() and x.is_cuda and x.shape[2] == 1 and \
                (torch.is_autocast_enabled("cuda") or x.dtype in (torch.bfloat16, torch.float16)):
            rows = x.squeeze(2).transpose(1, 2)
            if conv_triton.wave_conv_fits(rows, conv.weight):
                y = conv_triton.wave_conv(rows, conv.weight, conv.bias if bias else None, conv.stride[0],
                                          conv.padding[0])
                return y.transpose(1, 2).unsqueeze(2)
        return _conv2d(conv, x, bias=bias)

    def _fuse(self, x):
        if self.fused_epilogue is False or self.training or torch.is_grad_enabled():
            return False
        folded = all(isinstance(bn, nn.Identity) for bn in (self.bn1, self.bn2)) and \
            (self.downsample is None or isinstance(self.downsample[1], nn.Identity))
        return folded and conv_triton.epilogue_fits(x)


def _epilogue(out, bias, shortcut=None, shortcut_bias=None, slope=0.01):
    """leaky_relu(out + bias + shortcut + shortcut_bias): in place in one kernel where the memory allows it."""
    if conv_triton.epilogue_fits(out, shortcut):
        conv_triton.bias_leaky_relu_(out, bias, shortcut, shortcut_bias, slope=slope)
        return out
    return conv_triton.bias_leaky_relu_reference(out, bias, shortcut, shortcut_bias, slope)


class _ZeroGradient(torch.autograd.Function):
    """x itself; each of `left_out`, parameters that the computation leaves out because their gradient is exactly
    zero, gets that zero (parts of one zero-filled buffer: one kernel), so that every trained parameter still
    receives a gradient (DistributedDataParallel expects one)."""

    @staticmethod
    def forward(ctx, x, *left_out):
        ctx.like = [(p.shape, p.dtype) for p in left_out]
        ctx.device = x.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        zeros = [None] * len(ctx.like)
        for dtype in dict.fromkeys(d for _, d in ctx.like):
            which = [i for i, (_, d) in enumerate(ctx.like) if d == dtype]
            sizes = [ctx.like[i][0].numel() for i in which]
            buf = torch.zeros(sum(sizes), dtype=dtype, device=ctx.device)
            for i, part in zip(which, buf.split(sizes)):
                zeros[i] = part.view(ctx.like[i][0])
        return (grad, *zeros)


@torch.no_grad()
def _shift_running_means(pairs, device_type):
    """For each (bn, bias): bn's running mean as if its input had included `bias` (bn has just been updated with the
    batch's statistics: the running variance does not depend on a constant shift). The biases are taken in the dtype
    the convolution would have used (autocast's cast), so flat-weights and per-parameter training keep the same
    statistics. One multi-tensor add per momentum value."""
    pairs = [(bn, bias) for bn, bias in pairs if bn.track_running_stats and bn.running_mean is not None]
    if not pairs:
        return
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    biases = torch.cat([bias.detach().reshape(-1) for _, bias in pairs])
    if dtype is not None:
        biases = biases.to(dtype)
    biases = biases.to(pairs[0][0].running_mean.dtype).split([bias.numel() for _, bias in pairs])
    groups = {}
    for (bn, _), b in zip(pairs, biases):
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        means, adds = groups.setdefault(factor, ([], []))
        means.append(bn.running_mean.data)  # .data: batch_norm saved it for backward (unused in training)
        adds.append(b)
    for factor, (means, adds) in groups.items():
        torch._foreach_add_(means, adds, alpha=factor)


@torch.no_grad()
def _fold_batchnorm(conv, bn):
    """conv's weights and bias made to give bn(conv(x)) for bn in eval mode (its running statistics)."""
    if bn.training or bn.running_mean is None or not bn.affine or conv.bias is None:
        raise ValueError("folding a BatchNorm needs eval mode, running statistics, affine parameters and a conv bias")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
    conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)


def _conv2d(conv, x, bias=True):
    """A Conv1d applied to (B, C, 1, L): the same weights as a 1 x k 2-D convolution (without its bias: bias=False)."""
    return F.conv2d(x, conv.weight.unsqueeze(2), conv.bias if bias else None, (1, conv.stride[0]), (0, conv.padding[0]))


def _bn2d(bn, x):
    """A BatchNorm1d applied to (B, C, 1, L), with its running-statistics bookkeeping (nn.BatchNorm1d refuses 4-D).
    With a momentum, the batch counter is not advanced here: WavEncoder advances all of its counters with one
    multi-tensor add (one GPU launch instead of one per layer)."""
    if isinstance(bn, nn.Identity):  # folded into the convolution (BasicBlock.fold_batchnorms)
        return x
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.momentum is None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked)
    use_batch = bn.training or bn.running_mean is None
    return F.batch_norm(x, bn.running_mean if not bn.training or bn.track_running_stats else None,
                        bn.running_var if not bn.training or bn.track_running_stats else None,
                        bn.weight, bn.bias, use_batch, factor, bn.eps)


class WavEncoder(nn.Module):
    """Sample-rate audio features (B, L, C) -> per-frame features (B, T', out_dim), about 533 samples per frame.

    The published model has out_dim=512 and internal widths 128/256/512; here the widths are out_dim/4, /2, /1 so a
    small `audio_f` gives a small encoder while 512 reproduces the published keys and shapes.
    Three scales are concatenated: two extra branches re-downsample the 1/30 and 1/180 features to the frame rate.

    `channels_last` runs the blocks on (B, C, 1, L) in channels-last memory, the layout that cuDNN's convolutions
    and oneDNN's 16-bit (AMX) ones consume directly, with no layout transposes around each of the 28 convolutions:
    both encoders' forward + backward at batch 64 took 27 ms instead of 39 ms in bf16 and 40 instead of 50 ms in
    float32 on an H200. By default it is used on GPUs and for 16-bit computation on CPUs (float32 on a CPU is faster
    in the published (B, C, L) layout). Same parameters and maths: results agree to rounding (tests/test_speed.py).
    """

    channels_last = None  # None: on GPUs, and on CPUs under 16-bit autocast; True/False: always/never

    def __init__(self, out_dim, audio_in=1):
        super().__init__()
        if out_dim % 4:
            raise ValueError(f"WavEncoder out_dim must be divisible by 4, got {out_dim}")
        c1, c2, c3 = out_dim // 4, out_dim // 2, out_dim
        k = 15
        self.feat_extractor = nn.Sequential(
            BasicBlock(audio_in, c1, k, stride=5, padding=1600, downsample=True),
            BasicBlock(c1, c1, k, stride=6, downsample=True),
            BasicBlock(c1, c1, k, stride=1, padding=7),
            BasicBlock(c1, c2, k, stride=6, downsample=True),
            BasicBlock(c2, c2, k, stride=1, padding=7),
            BasicBlock(c2, c3, k, stride=3, downsample=True),
        )
        self.multi_scale = nn.ModuleList([
            nn.Sequential(BasicBlock(c1, c2, k, stride=6, downsample=True),
                          BasicBlock(c2, c3, k, stride=3, downsample=True)),
            nn.Sequential(BasicBlock(c2, c3, k, stride=3, downsample=True)),
        ])
        self.out = nn.Linear(3 * c3, out_dim)

    def _blocks(self):
        if "_block_list" not in self.__dict__:
            self.__dict__["_block_list"] = [m for m in self.modules() if isinstance(m, BasicBlock)]
        return self.__dict__["_block_list"]

    def _counted_batchnorms(self):
        """The BatchNorms whose counter _bn2d does not advance (found once: the training step is host-bound)."""
        if "_bn_list" not in self.__dict__:
            self.__dict__["_bn_list"] = [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)
                                         and m.track_running_stats and m.momentum is not None]
        return self.__dict__["_bn_list"]

    def forward(self, wav):
        if wav.dim() == 2:
            wav = wav.unsqueeze(-1)
        x = wav.transpose(1, 2)                       # (B, C, L)
        nhwc = self.channels_last
        if nhwc is None:
            nhwc = wav.is_cuda or wav.dtype in (torch.bfloat16, torch.float16) or \
                torch.is_autocast_enabled(wav.device.type)
        if nhwc:  # (B, C, 1, L) with channel stride 1: (B, L, C) memory, as the input already is
            x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        left_out = [] if self.training else None
        for block in self._blocks():
            block.__dict__["left_out"] = left_out
        try:
            blocks = list(self.feat_extractor)  # (slicing the Sequential would build a new module per call)
            fine = blocks[2](blocks[1](blocks[0](x)))     # ~1/30 of the samples
            mid = blocks[4](blocks[3](fine))              # ~1/180
            coarse = blocks[5](mid)                       # frame rate
            feats = torch.cat([self.multi_scale[0](fine), self.multi_scale[1](mid), coarse], dim=1)
        finally:
            for block in self._blocks():
                block.__dict__["left_out"] = None
        if left_out:  # the biases BasicBlock._conv_bn left out: zero gradients and running-mean shifts, all at once
            feats = _ZeroGradient.apply(feats, *(bias for _, bias in left_out))
            _shift_running_means(left_out, wav.device.type)
        if nhwc:
            feats = feats.squeeze(2)                  # channel stride 1: the transpose below is contiguous
            if self.training:  # the batch counters _bn2d left to us
                counters = [m.num_batches_tracked for m in self._counted_batchnorms() if m.training]
                if counters:
                    torch._foreach_add_(counters, 1)
        return self.out(feats.transpose(1, 2))


def channels_last_conv_weights_(model):
    """Stores the convolution weights of the encoders in `model` whose convolutions run channels-last on this device
    with the input channel fastest ((C_out, C_in, k) with strides (C_in k, 1, C_in)): the memory order a
    channels-last convolution reads. Same values, so the same maths and checkpoints; the parameters stay the same
    objects (call it before the optimizer has state). Why: cuDNN otherwise reorders each weight in a kernel of its
    own in the forward pass and the weight gradient back in the backward pass (GPU training: about 110 kernels per
    MambaTalk step for the audio encoders alone). Encoders are the modules with a `channels_last` class attribute
    (WavEncoder; the motion encoders VQEncoderV5/V6, whose (B, T, C) input already gives their convolutions the
    channel fastest): True always, None on GPUs. Returns how many weights it reordered."""
    n = 0
    for encoder in model.modules():
        if not hasattr(type(encoder), "channels_last"):
            continue
        wanted = encoder.channels_last
        params = list(encoder.parameters())
        if not params or not (wanted or (wanted is None and params[0].device.type == "cuda")):
            continue
        for conv in encoder.modules():
            if isinstance(conv, nn.Conv1d) and conv.weight.stride(1) != 1:
                w = conv.weight
                w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)
                n += 1
    return n


class PeriodicPositionalEncoding(nn.Module):
    """Sinusoidal encoding of period `period`, tiled to cover `max_seq_len`; forward(x) = dropout(x + pe[:, :T])."""

    def __init__(self, d_model, dropout=0.1, period=25, max_seq_len=600):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"PeriodicPositionalEncoding needs an even d_model, got {d_model}")
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(period, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(period, d_model)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq)
        repeats = max_seq_len // period + 1
        self.register_buffer("pe", pe.unsqueeze(0).repeat(1, repeats, 1))  # persistent: it is in the checkpoint

    def forward(self, x):
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"sequence of {x.shape[1]} frames is longer than the positional table "
                             f"({self.pe.shape[1]})")
        return self.dropout(x + self.pe[:, : x.shape[1]])


class PackedAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with the same parameters (so the same checkpoint keys) and, for GPU training, its forward
    written out for the batch-first, unmasked case this model uses.

    Why: F.multi_head_attention_forward picks q, k and v out of the packed projection by indexing, and the backward
    of each index writes a zero-filled gradient of the whole projection, then adds them up: 8 kernels over three
    full-size tensors per attention, where one `unbind` (backward: one stack) does. Same maths: one packed
    projection, scaled-dot-product attention with dropout on the weights, the output projection.

    `packed`: None uses it for training on GPUs only (CPU training and all inference keep PyTorch's code, so their
    numbers stay those of earlier runs); True/False: always/never (tests compare the two).

    Batch-first, key and value may have a batch that divides the query's: the query batch then holds passes over the
    same keys one after the other (MambaTalk's training passes share one cross-attention memory), and the key/value
    projection runs once per key item instead of once per pass, its result repeated (PyTorch's path gets the keys
    repeated instead)."""

    packed = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        passes = 1
        if self.batch_first and query.dim() == 3 and key.dim() == 3 and key.shape[0] != query.shape[0]:
            if query.shape[0] % key.shape[0] or value.shape[0] != key.shape[0]:
                raise ValueError(f"attention: key/value batch {key.shape[0]} does not divide the query batch "
                                 f"{query.shape[0]}")
            passes = query.shape[0] // key.shape[0]
        use = self.packed if self.packed is not None else (self.training and query.is_cuda)
        if not (use and self.batch_first and key is value and key_padding_mask is None and attn_mask is None
                and not need_weights and not is_causal and self._qkv_same_embed_dim and self.in_proj_bias is not None
                and self.bias_k is None and not self.add_zero_attn and query.dim() == 3):
            if passes > 1:
                same = key is value
                key = key.repeat(passes, 1, 1)
                value = key if same else value.repeat(passes, 1, 1)
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.repeat(passes, 1)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        B, T, E = query.shape
        h = self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k, v = F.linear(query, w, b).unflatten(-1, (3, h, E // h)).unbind(2)
        else:
            q = F.linear(query, w[:E], b[:E]).unflatten(-1, (h, E // h))
            kv = F.linear(key, w[E:], b[E:])
            if passes > 1:
                kv = kv.repeat(passes, 1, 1)
            k, v = kv.unflatten(-1, (2, h, E // h)).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, E)), None


def use_packed_attention(module):
    """Every nn.MultiheadAttention inside `module` becomes a PackedAttention (same parameters, in place)."""
    for m in module.modules():
        if type(m) is nn.MultiheadAttention:
            m.__class__ = PackedAttention
    return module


class _EmbeddingRows(torch.autograd.Function):
    """weight[ids]; backward: the rows' gradients summed with one index_add_ (PyTorch's CUDA embedding backward
    sorts the indices first: ~31 kernels per call, against 2 here)."""

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        rows = grad.new_zeros(ctx.weight_shape)
        return rows.index_add_(0, ids.reshape(-1), grad.reshape(-1, rows.shape[1])), None


class Embedding(nn.Embedding):
    """nn.Embedding (same parameters, initialisation and forward) whose training backward on a GPU sums the rows'
    gradients with one index_add_ (atomic adds: the sums' order varies, a float32 rounding difference) instead of
    PyTorch's sort-based kernels: the eager training step is bound by the host's time per kernel launch."""

    def forward(self, ids):
        plain = self.padding_idx is not None or self.max_norm is not None or self.sparse or self.scale_grad_by_freq
        if plain or not (self.weight.is_cuda and self.weight.requires_grad and torch.is_grad_enabled()):
            return super().forward(ids)
        return _EmbeddingRows.apply(self.weight, ids)
