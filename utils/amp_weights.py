"""Autocast's weight casts, done for all weights at once (issue 17: the eager bf16 training step is launch-bound).

Under autocast every Linear and convolution casts its float32 weight and bias to bf16 with a kernel of its own, and
the backward pass casts each of their gradients back with another: about 700 of the eager MambaTalk step's ~5,800
kernel launches. `call_with_cast_weights` makes the same bf16 copies with one multi-tensor copy before the forward
pass and runs the model on them; the copies' gradients come back to the float32
parameters through one autograd node that casts them all with one multi-tensor copy.

The maths is autocast's: the same bf16 weights enter the same ops (autocast leaves bf16 tensors alone), and each
parameter receives the same bf16 gradient sum, cast to float32. tests/test_train.py checks that the gradients are
bit-identical to plain autocast.
"""
import functools

import torch
import torch.nn as nn

# modules whose weights autocast casts to the low-precision dtype (linear and convolution ops; attention's
# projections are linear ops)
CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.MultiheadAttention)


def autocast_weights(model):
    """[(module, attribute, parameter)] of the trainable float32 weights autocast casts: those of CAST_MODULES,
    except the ones marked `_keep_float32` (Mamba's conv1d and dt bias, which other code reads in float32)."""
    out = []
    for module in model.modules():
        if isinstance(module, CAST_MODULES):
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32 and not getattr(p, "_keep_float32", False):
                    out.append((module, name, p))
    return out


class _CastAll(torch.autograd.Function):
    """params (float32) -> copies in `dtype`, parts of one buffer; backward: every gradient cast back at once.

    Each copy has its parameter's strides (the audio encoders' convolution weights are stored channels-last on GPUs,
    models.layers.channels_last_conv_weights_), and each float32 gradient has the strides of the gradient it is cast
    from: a multi-tensor copy runs as a few kernels only while source and destination strides agree; otherwise it
    falls back to one kernel per tensor (380 in the eager MambaTalk step's backward before this)."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.set_materialize_grads(False)  # unused copies get None, not a zero tensor each
        flat = params[0].new_empty(sum(p.numel() for p in params), dtype=dtype)
        copies = _parts(flat, [_layout(p) for p in params])
        torch._foreach_copy_(copies, params)
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        used = [i for i, g in enumerate(grads) if g is not None]
        if not used:
            return (None,) * (len(grads) + 1)
        flat = grads[used[0]].new_empty(sum(grads[i].numel() for i in used), dtype=torch.float32)
        views = _parts(flat, [_layout(grads[i]) for i in used])
        torch._foreach_copy_(views, [grads[i] for i in used])
        out = [None] * len(grads)
        for v, i in zip(views, used):
            out[i] = v
        return (None, *out)


@functools.lru_cache(maxsize=4096)
def _dense_strides(shape, strides):
    """`strides` if a tensor of this shape and strides fills exactly shape.numel() consecutive places of memory in
    some order of its dimensions (so a buffer part can take them), else the contiguous strides. Cached: ~760 calls
    per MambaTalk step, the same few hundred layouts every step."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(shape, strides) if n > 1):
        if stride != expected:
            return _contiguous_strides(shape)
        expected *= size
    return strides if shape.numel() > 0 else _contiguous_strides(shape)


def _layout(t):
    return t.shape, _dense_strides(t.shape, t.stride())


def _contiguous_strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _parts(flat, layouts):
    """Consecutive parts of `flat`, one per (shape, strides) of a dense layout."""
    out, offset = [], 0
    for shape, strides in layouts:
        out.append(flat.as_strided(shape, strides, offset))
        offset += shape.numel()
    return out


def call_with_cast_weights(model, dtype, weights, *args, **kwargs):
    """model(*args, **kwargs) with the parameters of `weights` (autocast_weights(model)) replaced by `dtype` copies
    for the call. Call it under autocast with the same dtype.

    The copies are put into the modules' parameter dicts directly and put back afterwards: torch.func.functional_call
    does the same with checks that cost ~3 ms of host time per call for MambaTalk's 388 weights (0.1 ms here)."""
    copies = _CastAll.apply(dtype, *(p for _, _, p in weights))
    try:
        for (module, name, _), copy in zip(weights, copies):
            module._parameters[name] = copy
        return model(*args, **kwargs)
    finally:
        for module, name, p in weights:
            module._parameters[name] = p
