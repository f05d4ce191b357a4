"""The trainable weights of the single-process training step as one flat float32 tensor (issue 17: the eager bf16
step on a GPU is bound by the host's time per kernel launch and per autograd node, not by the GPU).

`FlatWeights` moves a model's trainable parameters into parts of one float32 tensor, `master` (each part aligned
to ALIGN elements, the gaps zero); each parameter stays the module's own nn.Parameter (same name, shape, layout and
values, so state dicts and checkpoints are unchanged) but is now a view of `master`. The optimiser updates `master`
alone, and the training forward runs through `FlatWeights.call`, which gives the modules weights made from `master`
by one autograd node:

- the weights that autocast would cast (Linear, convolution and attention weights, `autocast_weights`) come as
  `dtype` copies cast in one kernel, the others as float32 copies made in one kernel: the numbers autocast uses;
- in the backward pass the node writes every weight's gradient into one flat float32 gradient (multi-tensor copies,
  the bf16 ones cast as autocast's own cast nodes would), so autograd accumulates one gradient instead of one per
  parameter (646 AccumulateGrad nodes in the MambaTalk step), clipping takes one norm and Adam updates one tensor.

Numbers: the forward and every gradient are autocast's, bit for bit (tests/test_speed.py). Clipping's norm is summed
in another order (about 1e-7 relative), and Adam's update is elementwise, so its results are the per-parameter
step's to that rounding. Two differences from per-parameter Adam, both absent in the shipped configs: a weight that
gets no gradient gets a zero one, so Adam's momentum still moves a weight that was used earlier and its weight decay
shrinks one never used (the trainer uses flat weights only with weight_decay 0, and a step whose unused weights
differ from the first step's logs a warning). The optimiser state is saved per parameter, as without flat weights,
so a training state resumes either way (`per_parameter_state`, `flat_state`).
"""
import functools

import torch
import torch.nn as nn

from utils.log import get_logger

ALIGN = 64  # elements: where each parameter's part of the flat tensor starts (256 bytes in float32, 128 in bf16)
# modules whose weights autocast casts to the low-precision dtype (linear and convolution ops; attention's
# projections are linear ops)
CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.MultiheadAttention)


def autocast_weights(model):
    """The trainable float32 parameters autocast casts: those of CAST_MODULES, except the ones marked
    `_keep_float32` (Mamba's conv1d and dt bias, which other code reads in float32)."""
    out = []
    for module in model.modules():
        if isinstance(module, CAST_MODULES):
            for p in module.parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32 and not getattr(p, "_keep_float32", False):
                    out.append(p)
    return out


class FlatWeights:
    """`params` (a model's trainable float32 parameters, in the optimiser's order) as views of one tensor `master`.

    cast_dtype: the autocast dtype whose copies the cast weights get in `call` (None: float32 copies of all)."""

    def __init__(self, model, params, cast_dtype=None):
        params = list(params)
        if len({id(p) for p in params}) != len(params) or not params:
            raise ValueError("FlatWeights: the parameters must be distinct and at least one")
        if any(p.dtype != torch.float32 or not p.requires_grad for p in params):
            raise ValueError("FlatWeights: only trainable float32 parameters can be flattened")
        self.params, self.cast_dtype = params, cast_dtype
        cast_ids = {id(p) for p in autocast_weights(model)} if cast_dtype is not None else set()
        # master order: the cast weights first, so that one kernel casts them all, then the rest
        self.order = ([i for i, p in enumerate(params) if id(p) in cast_ids]
                      + [i for i, p in enumerate(params) if id(p) not in cast_ids])
        # Each part starts at a multiple of ALIGN elements: cuBLAS and cuDNN choose slower kernels (and other
        # summation orders) for weights whose address is not 16-byte aligned; the gaps stay zero.
        self.layouts = [_layout(params[i]) for i in self.order]
        self.offsets, end = [], 0
        for i in self.order:
            self.offsets.append(end)
            end += -(-params[i].numel() // ALIGN) * ALIGN
        n_cast_params = sum(id(p) in cast_ids for p in params)
        self.n_cast = self.offsets[n_cast_params] if n_cast_params < len(params) else end  # where the rest begins
        self.master = torch.zeros(end, device=params[0].device, dtype=torch.float32, requires_grad=True)
        views = self.param_views(self.master.detach(), ordered=True)
        with torch.no_grad():
            for i, view in zip(self.order, views):
                view.copy_(params[i])
                params[i].data = view  # the module's parameter, now a view of master
        # where each parameter sits in the modules (a parameter shared by two modules is in both)
        index = {id(params[i]): k for k, i in enumerate(self.order)}
        self.slots = [(module, name, index[id(p)]) for module in model.modules()
                      for name, p in module._parameters.items() if p is not None and id(p) in index]
        for p in params:  # a gradient that reaches a parameter itself would never be applied: refuse it loudly
            p.register_post_accumulate_grad_hook(_used_outside_call)
        self.unused = None  # the weights without a gradient in the first backward pass

    def call(self, model, *args, **kwargs):
        """model(*args, **kwargs) with every flattened parameter replaced, for the call, by its copy from `master`
        (with gradients off: the model itself). Call it under autocast with `cast_dtype`.

        The copies are put into the modules' parameter dicts directly and put back afterwards:
        torch.func.functional_call does the same with checks that cost ~3 ms of host time per MambaTalk call."""
        if not torch.is_grad_enabled():
            return model(*args, **kwargs)
        copies = _FlatCopies.apply(self, self.master)
        try:
            for module, name, k in self.slots:
                module._parameters[name] = copies[k]
            return model(*args, **kwargs)
        finally:
            for module, name, k in self.slots:
                module._parameters[name] = self.params[self.order[k]]

    def param_views(self, flat, ordered=False):
        """Views of a flat tensor shaped like `master` (a gradient, a moment), one per parameter in `params` order
        (ordered=True: in master's order)."""
        views = [flat.as_strided(shape, strides, flat.storage_offset() + offset)
                 for (shape, strides), offset in zip(self.layouts, self.offsets)]
        if ordered:
            return views
        out = [None] * len(self.params)
        for i, view in zip(self.order, views):
            out[i] = view
        return out

    def per_parameter_state(self, state_dict):
        """The flat optimiser's state_dict() in the form of an optimiser over `params` (what the trainer saves):
        flat moments are split into per-parameter copies, scalars (the step count) repeated for each."""
        (group,) = state_dict["param_groups"]
        flat = state_dict["state"].get(group["params"][0], {})
        split = {k: self.param_views(v) for k, v in flat.items()
                 if torch.is_tensor(v) and v.shape == self.master.shape}
        state = {}
        if flat:
            for i in range(len(self.params)):
                state[i] = {k: split[k][i].clone() if k in split else v.clone() if torch.is_tensor(v) else v
                            for k, v in flat.items()}
        return {"state": state, "param_groups": [group | {"params": list(range(len(self.params)))}]}

    def flat_state(self, saved):
        """A per-parameter optimiser state (per_parameter_state's form, or a run without flat weights) as the
        flat optimiser's state_dict. Raises ValueError when it cannot be one: another number of parameters or
        groups, moments of other shapes, or step counts that differ between parameters."""
        groups, state = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state, dict):
            raise ValueError("expected one parameter group")
        ids = groups[0].get("params", [])
        if len(ids) != len(self.params):
            raise ValueError(f"{len(ids)} parameters in the saved state, {len(self.params)} trained now")
        entries = [state.get(i) for i in ids]
        present = [e for e in entries if e]
        out_group = groups[0] | {"params": [0]}
        if not present:
            return {"state": {}, "param_groups": [out_group]}
        keys = set(present[0])
        steps = {float(e["step"]) for e in present if "step" in e}
        if len(steps) > 1:
            raise ValueError(f"the parameters' step counts differ ({sorted(steps)[:3]}...)")
        flat = {}
        for k in keys:
            sample = present[0][k]
            if not torch.is_tensor(sample) or sample.dim() == 0:
                flat[k] = sample.clone() if torch.is_tensor(sample) else sample
                continue
            buf = torch.zeros_like(self.master, dtype=sample.dtype, device=self.master.device)
            for p, entry, view in zip(self.params, entries, self.param_views(buf)):
                if entry:
                    if k not in entry or tuple(entry[k].shape) != tuple(p.shape):
                        raise ValueError(f"a saved '{k}' has shape {tuple(entry[k].shape) if k in entry else None}, "
                                         f"its parameter {tuple(p.shape)}")
                    view.copy_(entry[k])
            flat[k] = buf
        return {"state": {0: flat}, "param_groups": [out_group]}

    def grads(self):
        """The current gradient of each parameter (views of master.grad, `params` order; None before backward)."""
        g = self.master.grad
        return [None] * len(self.params) if g is None else self.param_views(g)


def _used_outside_call(p):
    raise RuntimeError("a flattened parameter received a gradient directly: it was used with gradients outside "
                       "FlatWeights.call, and the optimiser, which updates the flat tensor, would never apply it")


class _FlatCopies(torch.autograd.Function):
    """master -> one copy per parameter (cast weights in `cast_dtype`, the rest float32), parts of two buffers;
    backward: all gradients written into one flat float32 gradient."""

    @staticmethod
    def forward(ctx, flat_weights, master):
        fw = ctx.flat_weights = flat_weights
        ctx.set_materialize_grads(False)  # unused copies get None, not a zero tensor each
        n = fw.n_cast
        low = master[:n].to(fw.cast_dtype) if n else master[:0]
        rest = master[n:].clone()
        copies = []
        for layout, offset in zip(fw.layouts, fw.offsets):
            copies.append(low.as_strided(*layout, offset) if offset < n else rest.as_strided(*layout, offset - n))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        fw = ctx.flat_weights
        flat = torch.zeros_like(fw.master, memory_format=torch.contiguous_format)  # the gaps between parts stay 0
        views = fw.param_views(flat, ordered=True)
        unused = [k for k, g in enumerate(grads) if g is None]
        if fw.unused is None:
            fw.unused = set(unused)
        elif set(unused) != fw.unused:
            fw.unused = set(unused)
            get_logger().warning("FlatWeights: the weights without a gradient changed between steps; a weight used "
                                 "earlier is moved by Adam's momentum while unused (per-parameter Adam skips it)")
        # A multi-tensor copy stays on its fast path (a few kernels) only while each pair has one dtype and the same
        # strides; the other pairs are copied one by one (gradients that come back in another layout).
        groups = {}
        for k, g in enumerate(grads):
            if g is None:
                continue
            if g.stride() == views[k].stride():
                groups.setdefault(g.dtype, ([], []))
                groups[g.dtype][0].append(views[k])
                groups[g.dtype][1].append(g)
            else:
                views[k].copy_(g)
        for dst, src in groups.values():
            torch._foreach_copy_(dst, src)
        return None, flat


@functools.lru_cache(maxsize=4096)
def _dense_strides(shape, strides):
    """`strides` if a tensor of this shape and strides fills exactly shape.numel() consecutive places of memory in
    some order of its dimensions (so a buffer part can take them), else the contiguous strides."""
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
