"""Stage-1 motion models (spec §4.2) and the FGD feature extractor VAESKConv (spec §4.3).

All encoders and decoders take and return (B, T, C). Attribute names and registration order are the checkpoint
format of the published files (`pretrained_vq/*.bin`, `AESKConv_240_100.bin`).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ResBlock, init_weight

# Where build_stage1_models' models are stored under `pretrained_vq/`.
STAGE1_FILES = dict(face="face.bin", upper="upper.bin", hands="hands.bin", lower="lower_foot.bin",
                    global_motion="foot.bin")


# ----------------------------------------------------------------------------------------------------------------
# Per-frame conv encoder / decoder and the quantiser (§4.2.1)

def run_layers(layers, x, keep=None):
    """x (B, C, T) through a Sequential of stride-1 Conv1d / LeakyReLU / ResBlock layers. keep (B, 1, T): 1 on the
    frames of each row's sequence, 0 past its end; every convolution's output is zeroed past the end, so each row
    sees zeros there as if it had been run alone at its own length (sequences of different lengths in one batch)."""
    if keep is None:
        return layers(x)
    x = x * keep
    for layer in layers:
        if isinstance(layer, ResBlock):
            x = x + run_layers(layer.model, x, keep)
        else:
            x = layer(x)
            if isinstance(layer, nn.Conv1d):
                x = x * keep
    return x


class VQEncoderV5(nn.Module):
    """n x [Conv1d(k3), LeakyReLU(0.2), ResBlock]; no temporal down-sampling (one latent per frame).

    Its (B, T, C) input, permuted to (B, C, T), has the channel fastest, so cuDNN runs its convolutions
    channels-last; `channels_last` (None: on GPUs; True/False: always/never) says whether
    models.layers.channels_last_conv_weights_ stores its weights in that order too (otherwise cuDNN reorders the
    input and each weight, and the weight gradients back, in kernels of their own: ~140 per MambaTalk training
    step for the motion encoder and the four stage-1 target encoders)."""

    channels_last = None

    def __init__(self, in_dim, width, n_layers):
        super().__init__()
        layers = []
        for i in range(n_layers):
            layers += [nn.Conv1d(in_dim if i == 0 else width, width, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                       ResBlock(width)]
        self.main = nn.Sequential(*layers)
        self.main.apply(init_weight)

    def forward(self, x, keep=None):
        """keep (B, T, 1): see run_layers."""
        return run_layers(self.main, x.permute(0, 2, 1), _channels_first(keep)).permute(0, 2, 1)


def _channels_first(keep):
    return None if keep is None else keep.permute(0, 2, 1)


# The published code defines V6 separately, with the same layers; MambaTalk's motion encoder uses that name.
VQEncoderV6 = VQEncoderV5


class VQDecoderV5(nn.Module):
    """2 ResBlocks, n x [Conv1d(k3), LeakyReLU(0.2)] ending at out_dim, then a last Conv1d(out_dim, out_dim)."""

    def __init__(self, width, out_dim, n_layers):
        super().__init__()
        channels = [width] * n_layers + [out_dim]
        layers = [ResBlock(width), ResBlock(width)]
        for i in range(n_layers):
            layers += [nn.Conv1d(channels[i], channels[i + 1], 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv1d(out_dim, out_dim, 3, 1, 1))
        self.main = nn.Sequential(*layers)
        self.main.apply(init_weight)

    def forward(self, x, keep=None):
        """keep (B, T, 1): see run_layers."""
        return run_layers(self.main, x.permute(0, 2, 1), _channels_first(keep)).permute(0, 2, 1)


class VQDecoderV3(nn.Module):
    """Like V5 but each of the n conv stages first upsamples time x2 (nearest): (B, T, width) -> (B, T*2^n, out_dim)."""

    def __init__(self, width, out_dim, n_layers):
        super().__init__()
        channels = [width] * n_layers + [out_dim]
        layers = [ResBlock(width), ResBlock(width)]
        for i in range(n_layers):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(channels[i], channels[i + 1], 3, 1, 1),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv1d(out_dim, out_dim, 3, 1, 1))
        self.main = nn.Sequential(*layers)
        self.main.apply(init_weight)

    def forward(self, x):
        return self.main(x.permute(0, 2, 1)).permute(0, 2, 1)


class Quantizer(nn.Module):
    """Nearest-code vector quantiser with a straight-through estimator (VQ-VAE, beta = commitment weight)."""

    def __init__(self, n_e, e_dim, beta=1.0):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def map2index(self, z):
        """(..., e_dim) -> (...) index of the nearest code by squared L2 distance."""
        flat = z.reshape(-1, self.e_dim)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(dim=1).reshape(z.shape[:-1])

    def get_codebook_entry(self, indices):
        """(...) long -> (..., e_dim) code vectors."""
        return self.embedding(indices)

    def forward(self, z):
        """z (..., e_dim) -> (loss, z_q with straight-through gradient, indices, perplexity)."""
        indices = self.map2index(z)
        z_q = self.get_codebook_entry(indices)
        # codebook term pulls codes to encodings, commitment term (beta) pulls encodings to codes
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        usage = F.one_hot(indices.reshape(-1), self.n_e).float().mean(0)
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return loss, z_q, indices, perplexity


class VQVAEConvZero(nn.Module):
    """Per-frame VQ-VAE: vae_test_dim -> vae_length latents quantised on vae_codebook_size codes -> vae_test_dim."""

    def __init__(self, args):
        super().__init__()
        self.encoder = VQEncoderV5(args.vae_test_dim, args.vae_length, args.vae_layer)
        self.quantizer = Quantizer(args.vae_codebook_size, args.vae_length, getattr(args, "vae_quantizer_lambda", 1.0))
        self.decoder = VQDecoderV5(args.vae_length, args.vae_test_dim, args.vae_layer)

    def forward(self, x):
        loss, z_q, _, perplexity = self.quantizer(self.encoder(x))
        return dict(poses_feat=z_q, embedding_loss=loss, perplexity=perplexity, rec_pose=self.decoder(z_q))

    def map2index(self, x):
        return self.quantizer.map2index(self.encoder(x))

    def map2latent(self, x):
        """Code vectors of the nearest codes (no straight-through path): MambaTalk's regression targets."""
        return self.quantizer.get_codebook_entry(self.map2index(x))

    def decode(self, indices, keep=None):
        return self.decoder(self.quantizer.get_codebook_entry(indices), keep)


class VAEConvZero(nn.Module):
    """Same encoder/decoder as VQVAEConvZero without a quantiser (the global-motion model)."""

    def __init__(self, args):
        super().__init__()
        self.encoder = VQEncoderV5(args.vae_test_dim, args.vae_length, args.vae_layer)
        self.decoder = VQDecoderV5(args.vae_length, args.vae_test_dim, args.vae_layer)

    def forward(self, x, keep=None):
        return dict(rec_pose=self.decoder(self.encoder(x, keep), keep))


# Input widths of the five stage-1 models (§4.2.2): face = jaw 6D + 100 expressions, upper = 13 joints x 6D,
# hands = 30 joints x 6D, lower = 9 joints x 6D + trans 3 + foot contact 4.
STAGE1_SPECS = dict(
    face=(VQVAEConvZero, 106, 2),
    upper=(VQVAEConvZero, 78, 2),
    hands=(VQVAEConvZero, 180, 2),
    lower=(VQVAEConvZero, 61, 4),
    global_motion=(VAEConvZero, 61, 4),
)


def build_stage1_models(args):
    """The five frozen stage-1 models MambaTalk trains against, in eval mode (weights still random: load STAGE1_FILES).

    The published trainer mutates args around each construction; this builds from copies. The latent width is
    `vae_codebook_size` (256 published) because MambaTalk's latent heads, which regress these codes, have that width.
    """
    models = {}
    for name, (cls, in_dim, n_layers) in STAGE1_SPECS.items():
        part_args = copy.copy(args)
        part_args.vae_test_dim, part_args.vae_layer, part_args.vae_length = in_dim, n_layers, args.vae_codebook_size
        models[name] = cls(part_args).eval()
    return models


# ----------------------------------------------------------------------------------------------------------------
# Skeleton convolutions for the FGD autoencoder (§4.3). An "edge" is a joint with its parent link; each edge owns a
# fixed group of channels, and convolutions only mix groups of edges that are at most `skeleton_dist` apart.

def build_edge_topology(parents):
    """Edges as (parent, child) joint pairs: edge 0 is the root to a virtual joint len(parents), edge i>0 is joint i."""
    return [(0, len(parents))] + [(int(parents[i]), i) for i in range(1, len(parents))]


def find_neighbor(edges, max_dist):
    """For each edge, the edges within `max_dist` hops (two edges sharing a joint are 1 apart), itself included."""
    n = len(edges)
    inf = n + 1
    dist = [[0 if i == j else (1 if set(edges[i]) & set(edges[j]) else inf) for j in range(n)] for i in range(n)]
    for k in range(n):  # Floyd-Warshall
        for i in range(n):
            for j in range(n):
                dist[i][j] = min(dist[i][j], dist[i][k] + dist[k][j])
    return [[j for j in range(n) if dist[i][j] <= max_dist] for i in range(n)]


def skeleton_pooling_groups(edges, last_pool):
    """Groups of edges merged by SkeletonPool, and the merged edges (first joint, last joint).

    The tree is walked depth-first from joint 0 and cut into chains at branching joints and leaves. Chains are merged
    in consecutive pairs (an odd chain keeps its first edge alone); with `last_pool` each whole chain is one group.
    """
    degree = {}
    for a, b in edges:
        degree[a] = degree.get(a, 0) + 1
        degree[b] = degree.get(b, 0) + 1
    chains = []

    def walk(joint, chain):
        if chain and degree[joint] != 2:  # a leaf or a branching joint ends the chain
            chains.append(chain)
            chain = []
        for idx, (a, b) in enumerate(edges):
            if a == joint:
                walk(b, chain + [idx])

    walk(0, [])
    groups = []
    for chain in chains:
        if last_pool:
            groups.append(chain)
            continue
        if len(chain) % 2:
            groups.append(chain[:1])
            chain = chain[1:]
        groups += [chain[i:i + 2] for i in range(0, len(chain), 2)]
    new_edges = [(edges[g[0]][0], edges[g[-1]][1]) for g in groups]
    return groups, new_edges


class SkeletonConv(nn.Module):
    """Conv1d over (B, E*c_in, T) whose weight is masked so edge e's outputs see only its neighbours' input groups.

    The mask is a frozen Parameter registered before weight and bias: that is the published state-dict order.
    """

    def __init__(self, neighbour_list, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        n_edges = len(neighbour_list)
        if in_channels % n_edges or out_channels % n_edges:
            raise ValueError(f"SkeletonConv: channels {in_channels}->{out_channels} not divisible by {n_edges} edges")
        c_in, c_out = in_channels // n_edges, out_channels // n_edges
        self.stride, self.padding = stride, padding
        mask = torch.zeros(out_channels, in_channels, kernel_size)
        weight = torch.zeros(out_channels, in_channels, kernel_size)
        bias = torch.zeros(out_channels)
        for e, neighbours in enumerate(neighbour_list):
            cols = torch.cat([torch.arange(n * c_in, (n + 1) * c_in) for n in neighbours])
            rows = slice(e * c_out, (e + 1) * c_out)
            mask[rows, cols] = 1.0
            # each edge's block is initialised like an ordinary conv with only its neighbours as fan-in
            block = torch.empty(c_out, len(cols), kernel_size)
            nn.init.kaiming_uniform_(block, a=5 ** 0.5)
            weight[rows, cols] = block
            bound = 1.0 / (len(cols) * kernel_size) ** 0.5
            bias[rows] = torch.empty(c_out).uniform_(-bound, bound)
        self.mask = nn.Parameter(mask, requires_grad=False)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return F.conv1d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class SkeletonPool(nn.Module):
    """Mean-pools channel groups of merged edges: a frozen (E'*c, E*c) matrix applied as weight @ x."""

    def __init__(self, groups, n_edges, channels_per_edge):
        super().__init__()
        c = channels_per_edge
        weight = torch.zeros(len(groups) * c, n_edges * c)
        for i, group in enumerate(groups):
            for e in group:
                weight[i * c:(i + 1) * c, e * c:(e + 1) * c] = torch.eye(c) / len(group)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return torch.matmul(self.weight, x)


class SkeletonResidual(nn.Module):
    """tanh(pool(GroupNorm(skel_conv_k4_s2(x)) + skel_conv_k1_s2(x))); halves T, pools edges when that merges any."""

    def __init__(self, neighbour_list, in_channels, out_channels, pool_groups):
        super().__init__()
        n_edges = len(neighbour_list)
        self.residual = nn.Sequential(
            SkeletonConv(neighbour_list, in_channels, out_channels, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(10, out_channels),
        )
        self.shortcut = SkeletonConv(neighbour_list, in_channels, out_channels, kernel_size=1, stride=2, padding=0)
        common = []
        if len(pool_groups) != n_edges:
            common.append(SkeletonPool(pool_groups, n_edges, out_channels // n_edges))
        common.append(nn.Tanh())
        self.common = nn.Sequential(*common)

    def forward(self, x):
        return self.common(self.residual(x) + self.shortcut(x))


class LocalEncoder(nn.Module):
    """Skeleton-conv encoder: (B, T, 6*J) -> (B, T/2^n, channels of the last layer); n = len(channel_growth)."""

    def __init__(self, parents, channel_growth, channel_base=6, skeleton_dist=2):
        super().__init__()
        edges = build_edge_topology(parents)
        channels = [channel_base]
        for g in channel_growth:
            channels.append(channels[-1] * g)
        self.layers = nn.ModuleList()
        for i in range(len(channel_growth)):
            neighbours = find_neighbor(edges, skeleton_dist)
            groups, new_edges = skeleton_pooling_groups(edges, last_pool=(i == len(channel_growth) - 1))
            n = len(edges)
            block = SkeletonResidual(neighbours, channels[i] * n, channels[i + 1] * n, groups)
            self.layers.append(nn.Sequential(block))  # a Sequential, as published: keys layers.<i>.0.*
            edges = new_edges
        self.out_channels = channels[-1] * len(edges)

    def forward(self, x):
        x = x.permute(0, 2, 1)
        for layer in self.layers:
            x = layer(x)
        return x.permute(0, 2, 1)


class VAESKConv(nn.Module):
    """FGD feature extractor: skeleton-conv encoder (one vae_length vector per 16 frames) + conv decoder.

    Hyper-parameters other than vae_layer/vae_grow/vae_length are fixed as in the published model (6 channels per
    edge, neighbours within 2 edges). `args` is only read. Only `map2latent` is used (FGD); `variational` is False in
    the published config, so fc_mu/fc_logvar exist only so the released checkpoint loads.
    """

    def __init__(self, args):
        super().__init__()
        from utils.skeleton import PARENTS
        if args.vae_test_dim != 6 * len(PARENTS):
            raise ValueError(f"VAESKConv needs vae_test_dim = 6 x {len(PARENTS)} joints, got {args.vae_test_dim}")
        grow = list(args.vae_grow)[: args.vae_layer]
        if len(grow) != args.vae_layer:
            raise ValueError(f"VAESKConv: vae_grow {args.vae_grow} is shorter than vae_layer={args.vae_layer}")
        self.encoder = LocalEncoder(PARENTS, grow)
        if self.encoder.out_channels != args.vae_length:
            raise ValueError(f"VAESKConv: the skeleton encoder gives {self.encoder.out_channels} channels, "
                             f"vae_length is {args.vae_length}")
        self.decoder = VQDecoderV3(args.vae_length, args.vae_test_dim, args.vae_layer)
        self.fc_mu = nn.Linear(args.vae_length, args.vae_length)
        self.fc_logvar = nn.Linear(args.vae_length, args.vae_length)

    def map2latent(self, x):
        """(B, T, 330) 6D poses, T a multiple of 16 -> (B, T/16, vae_length)."""
        return self.encoder(x)

    def forward(self, x):
        latent = self.encoder(x)
        return dict(poses_feat=latent, rec_pose=self.decoder(latent))
