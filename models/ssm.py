"""Mamba-1 layers with mamba-ssm 2.x parameter names, shapes and initialisation (spec §4.4.8).

Mamba (the mixer), GatedMLP, Block (Add -> LayerNorm -> mixer -> Add -> LayerNorm -> MLP, non-fused),
MambaScan (blocks + final norm + Linear) and MambaModel (1 Transformer encoder layer + blocks + final
norm). The selective scan runs on the backend chosen with `set_ssm_backend` (see models/scan.py).
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import conv_triton
from models.scan import BACKENDS, resolve_backend, selective_scan

_backend = "auto"


def set_ssm_backend(name):
    """Backend for every Mamba layer: auto (models.scan.resolve_backend: the torch backend's Triton kernels for training
    on GPUs, cuda for generation where mamba-ssm imports, else torch), cuda, torch or reference."""
    global _backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown ssm_backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    _backend = name


def get_ssm_backend():
    return _backend


# Training on GPUs (the torch backend, autograd on): the causal conv + SiLU as models/conv_triton.py's kernels.
TRITON_CONV = True


def _triton_conv(x, backend):
    """Same rule as the scan's Triton kernels (models.scan.resolve_backend): training on a GPU with Triton; generation
    and CPUs keep PyTorch's convolution (their numbers stay those of earlier runs)."""
    return TRITON_CONV and backend == "torch" and x.is_cuda and torch.is_grad_enabled() and conv_triton.available()


@functools.lru_cache(maxsize=None)
def _fused_inner():
    """mamba-ssm's fused conv + scan + out_proj function; it needs causal-conv1d too. None otherwise."""
    try:
        from mamba_ssm.ops import selective_scan_interface as ssi
    except Exception:
        return None
    if getattr(ssi, "causal_conv1d_fwd_function", None) is None:
        return None
    return ssi.mamba_inner_fn


class Mamba(nn.Module):
    """Mamba-1 mixer: (b, l, d_model) -> (b, l, d_model)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, layer_idx=None,
                 dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.layer_idx = layer_idx
        E, R, N = self.d_inner, self.dt_rank, d_state
        # Registration order fixes the state_dict order: own parameters (A_log, D) first, then
        # in_proj, conv1d, x_proj, dt_proj, out_proj.
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # dt_proj: weight ~ U(+-R^-0.5); bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max].
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # init_mamba_weights must keep it
        # read as float32 by the scan, or by mamba-ssm's fused kernels as given: never stored in bf16 for generation
        for p in (self.dt_proj.bias, self.conv1d.weight, self.conv1d.bias):
            p._keep_float32 = True
        # S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log in float32.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def forward(self, hidden):
        L = hidden.shape[1]
        backend = resolve_backend(_backend, hidden)
        xz = self.in_proj(hidden)  # (b, l, 2E)
        A = -torch.exp(self.A_log.float())
        fused = _fused_inner() if backend == "cuda" else None
        if fused is not None:
            return fused(xz.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                         self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, None, None,
                         self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        # split in the (b, l, 2E) layout: the backward then concatenates the two halves' gradients straight into the
        # projection's layout; split after the transpose, it built a (b, 2E, l) gradient that the projection's
        # backward copied back with a strided copy (H200, published size: 1.8 ms per step in 7 copies; the graphed
        # bf16 step 83.6 -> 81.0 ms, same call)
        x, z = xz.chunk(2, dim=-1)
        z = z.transpose(1, 2)
        if _triton_conv(x, backend):  # (b, l, E) in and out: the x-projection reads it, the scan its transpose
            x = conv_triton.causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias).transpose(1, 2)
        else:
            x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L])  # causal: keep the first L outputs of the padded conv
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added inside the scan, before softplus
        y = selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                           z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=backend)
        return self.out_proj(y.transpose(1, 2))


class GatedMLP(nn.Module):
    """fc1 -> (value, gate) halves -> value * silu(gate) -> fc2; no biases."""

    def __init__(self, in_features, hidden_features, out_features=None, multiple_of=128):
        super().__init__()
        hidden = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=False)

    def forward(self, x):
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))


class Block(nn.Module):
    """mamba-ssm's Block, non-fused path. forward(h, residual) -> (h, residual)."""

    def __init__(self, dim, d_intermediate, layer_idx=None, norm_eps=1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = Mamba(dim, layer_idx=layer_idx)
        if d_intermediate > 0:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = GatedMLP(dim, d_intermediate, dim)
        else:
            self.mlp = None

    def forward(self, h, residual=None):
        residual = h if residual is None else h + residual
        h = self.mixer(self.norm(residual))
        if self.mlp is not None:
            residual = h + residual
            h = self.mlp(self.norm2(residual))
        return h, residual


def init_mamba_weights(module, n_layer, n_residuals_per_layer=2):
    """mamba-ssm's `_init_weights`, applied to every submodule: zero each nn.Linear bias (except
    dt_proj's) and re-draw any parameter whose name *relative to a submodule* is `out_proj.weight` or
    `fc2.weight` (so also MultiheadAttention.out_proj) as kaiming-uniform(a=sqrt 5) / sqrt(n_res * n_layer).
    n_residuals_per_layer is 2 when the blocks have an MLP (d_intermediate > 0), else 1."""
    def init(m):
        if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
            nn.init.zeros_(m.bias)
        for name, p in m.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)
    module.apply(init)


def _run_blocks(layers, h):
    residual = None
    for layer in layers:
        h, residual = layer(h, residual)
    return h if residual is None else h + residual


class MambaScan(nn.Module):
    """n_layer Blocks of width in_dim, final LayerNorm, then Linear(in_dim, out_dim)."""

    def __init__(self, in_dim, out_dim, n_layer, d_intermediate):
        super().__init__()
        self.layers = nn.ModuleList(Block(in_dim, d_intermediate, layer_idx=i) for i in range(n_layer))
        self.norm_f = nn.LayerNorm(in_dim, eps=1e-5)
        self.out = nn.Linear(in_dim, out_dim)
        init_mamba_weights(self, n_layer, 2 if d_intermediate > 0 else 1)

    def forward(self, h):
        return self.out(self.norm_f(_run_blocks(self.layers, h)))


class MambaModel(nn.Module):
    """One TransformerEncoderLayer (8 heads, ff = d_model), n_layer Blocks, final LayerNorm."""

    def __init__(self, d_model, n_layer, d_intermediate):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=8, dim_feedforward=d_model, batch_first=True)
        self.attention = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.layers = nn.ModuleList(Block(d_model, d_intermediate, layer_idx=i) for i in range(n_layer))
        self.norm_f = nn.LayerNorm(d_model, eps=1e-5)
        init_mamba_weights(self, n_layer, 2 if d_intermediate > 0 else 1)

    def forward(self, h):
        return self.norm_f(_run_blocks(self.layers, self.attention(h)))
