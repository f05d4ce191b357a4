"""Models: checkpoint-compatible key lists and shapes (spec §4.5, state_dict_*.tsv), parameter counts (§4.2.3),
skeleton topology (§4.3), quantiser, forward shapes, word embeddings and the published weights format."""
import copy
import functools
import hashlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models.layers import PeriodicPositionalEncoding, WavEncoder
from models.mambatalk import MambaTalk
from models.motion_representation import (STAGE1_FILES, Quantizer, SkeletonConv, VAESKConv, VQVAEConvZero,
                                          build_edge_topology, build_stage1_models, find_neighbor,
                                          skeleton_pooling_groups)
from utils.checkpoint import CheckpointMismatchError, load_weights, save_weights
from utils.config import load_config
from utils.skeleton import PARENTS

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec"
CONFIG = REPO / "configs" / "mambatalk.yaml"

# sha256 (first 16 hex) of the "key<TAB>[shape]" lines of the spec's key lists, so the check also runs where
# ../shared/spec is absent; where it is present the lists are compared line by line for a readable failure.
FINGERPRINTS = {
    "mambatalk": (810, "5f3d72b095fd50b3"),
    "vq_face": (27, "9a2c3a03b5d7a28c"),
    "vq_upper": (27, "2ec0581234d357e3"),
    "vq_hands": (27, "7f7a0c886ad4b1b8"),
    "vq_lower": (43, "52a858d0a7de6083"),
    "global_motion": (42, "e2e75847f40619be"),
    "eval VAESKConv": (56, "742e108b0132a56d"),
}
STAGE1_SECTION = dict(face="vq_face", upper="vq_upper", hands="vq_hands", lower="vq_lower",
                      global_motion="global_motion")
SMALL = dict(hidden_size=64, audio_f=64, motion_f=32, vae_codebook_size=32, word_index_num=40, word_dims=16)


def key_lines(model):
    return [f"{k}\t{list(v.shape)}" for k, v in model.state_dict().items()]


def spec_lines(section):
    """Key lines of one model from the spec files, or None where ../shared/spec is absent."""
    if section == "mambatalk":
        path = SPEC / "state_dict_mambatalk.tsv"
        return [l.rstrip("\n") for l in open(path) if l.strip()] if path.is_file() else None
    path = SPEC / "state_dict_stage1.tsv"
    if not path.is_file():
        return None
    lines, current = {}, None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("### "):
            current = line[4:].split(" (")[0]
            lines[current] = []
        elif line.strip():
            lines[current].append(line)
    return lines[section]


def assert_matches_spec(model, section):
    got = key_lines(model)
    expected = spec_lines(section)
    if expected is not None:
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"{section}: entry {i} is {g!r}, spec says {e!r}"
        assert len(got) == len(expected), f"{section}: {len(got)} tensors, spec lists {len(expected)}"
    count, digest = FINGERPRINTS[section]
    assert len(got) == count
    assert hashlib.sha256("\n".join(got).encode()).hexdigest()[:16] == digest


def build(args, vocab=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random word-embedding init warns; tested separately
        return MambaTalk(args, vocab=vocab)


def inputs(batch, frames, words, audio_len=34133, pose_dims=337, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, frames, pose_dims)
    mask[:, :4] = 0
    return dict(in_audio=torch.randn(batch, audio_len, 3, generator=g),
                in_word=torch.randint(0, words, (batch, frames), generator=g),
                mask=mask, in_motion=torch.randn(batch, frames, pose_dims, generator=g),
                in_id=torch.randint(0, 25, (batch, frames, 1), generator=g))


@pytest.fixture(scope="module")
def published_args(tmp_path_factory):
    # data_path without a vocab.pkl: the test does not depend on a local BEAT2 copy
    return load_config(CONFIG, {"data_path": str(tmp_path_factory.mktemp("no_data")) + "/"})


@pytest.fixture(scope="module")
def published_model(published_args):
    return build(published_args)  # ~800 MB fp32: built once per module, never run forward here


@pytest.fixture(scope="module")
def small_args(tmp_path_factory):
    return load_config(CONFIG, dict(SMALL, data_path=str(tmp_path_factory.mktemp("no_data")) + "/"))


@pytest.fixture(scope="module")
def small_model(small_args):
    torch.manual_seed(0)
    return build(small_args).eval()


# ------------------------------------------------------------------------------------------------ key lists

def test_mambatalk_state_dict_matches_published(published_model):
    assert_matches_spec(published_model, "mambatalk")
    sd = published_model.state_dict()
    assert sum(v.numel() for v in sd.values()) == 199_593_931
    assert sum(p.numel() for p in published_model.parameters()) == 199_366_553
    assert {str(v.dtype) for k, v in sd.items() if k.endswith("num_batches_tracked")} == {"torch.int64"}
    assert all(v.dtype == torch.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_mambatalk_block_parameter_counts(published_model):
    """Per-block counts of spec §4.5."""
    expected = {"text_pre_encoder_face": 3_358_500, "text_encoder_body": 154_112,
                "audio_pre_encoder_face": 31_787_264, "audio_pre_encoder_body": 31_783_424,
                "at_attn_face": 1_049_600, "global_scan.motion_encoder": 1_833_984,
                "global_scan.face_q_self_attn": 3_546_624, "global_scan.face_scan": 3_533_312,
                "global_scan.body_scan": 1_094_912, "local_scan.motion_cross_attn": 47_284_224,
                "local_scan.face_scan": 22_765_824, "local_scan.upper_scan": 9_091_584,
                "speaker_encoder_body": 19_200}
    for name, count in expected.items():
        module = published_model.get_submodule(name)
        assert sum(p.numel() for p in module.parameters()) == count, name
    assert published_model.global_scan.position_embeddings.pe.shape == (1, 128, 768)


def test_stage1_models_match_published(published_args):
    before = copy.deepcopy(vars(published_args))
    models = build_stage1_models(published_args)
    assert vars(published_args) == before, "build_stage1_models must not change args"
    assert list(models) == list(STAGE1_FILES) == ["face", "upper", "hands", "lower", "global_motion"]
    counts = dict(face=2_231_168, upper=2_172_648, hands=2_408_472, lower=3_714_325, global_motion=3_648_789)
    for name, model in models.items():
        assert_matches_spec(model, STAGE1_SECTION[name])
        assert sum(p.numel() for p in model.parameters()) == counts[name], name
        assert not model.training
    assert STAGE1_FILES["lower"] == "lower_foot.bin" and STAGE1_FILES["global_motion"] == "foot.bin"


def test_vaeskconv_matches_published(published_args):
    before = copy.deepcopy(vars(published_args))
    model = VAESKConv(published_args).eval()
    assert vars(published_args) == before, "VAESKConv must not write onto args (spec §10.3 #20)"
    assert_matches_spec(model, "eval VAESKConv")
    assert sum(p.numel() for p in model.parameters()) == 4_384_500  # masks and pool matrices included
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("mask"))
    with torch.no_grad():
        assert model.map2latent(torch.randn(2, 64, 330)).shape == (2, 4, 240)
        assert model(torch.randn(1, 32, 330))["rec_pose"].shape == (1, 32, 330)


# ------------------------------------------------------------------------------------------------ skeleton

def test_skeleton_topology_and_pooling_groups():
    edges = build_edge_topology(PARENTS)
    assert len(edges) == 55 and edges[0] == (0, 55) and edges[22] == (15, 22)
    groups0, edges1 = skeleton_pooling_groups(edges, last_pool=False)
    assert groups0 == [[0], [1, 4], [7, 10], [2, 5], [8, 11], [3], [6, 9], [12, 15], [22], [23], [24], [13, 16],
                       [18, 20], [25], [26, 27], [28], [29, 30], [31], [32, 33], [34], [35, 36], [37], [38, 39],
                       [14, 17], [19, 21], [40], [41, 42], [43], [44, 45], [46], [47, 48], [49], [50, 51], [52],
                       [53, 54]]
    groups1, edges2 = skeleton_pooling_groups(edges1, last_pool=False)
    assert groups1 == [[0], [1, 2], [3, 4], [5, 6], [7], [8], [9], [10], [11, 12], [13, 14], [15, 16], [17, 18],
                       [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30], [31, 32], [33, 34]]
    groups2, edges3 = skeleton_pooling_groups(edges2, last_pool=False)
    assert groups2 == [[i] for i in range(20)]
    assert skeleton_pooling_groups(edges3, last_pool=True)[0] == [[i] for i in range(20)]
    # neighbours within 2 hops of the left hip edge (0->1): the other root edges and the left knee edge (1 hop),
    # the edges below those (2 hops)
    nb = find_neighbor(edges, 2)
    assert nb[1] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert all(i in nb[i] for i in range(55))


def test_skeleton_conv_only_mixes_neighbouring_edges():
    edges = build_edge_topology(PARENTS)
    nb = find_neighbor(edges, 2)
    conv = SkeletonConv(nb, 55 * 6, 55 * 6, kernel_size=4, stride=2, padding=1)
    x = torch.randn(1, 330, 16)
    far = [e for e in range(55) if e not in nb[10]]  # edges more than 2 hops from the left foot
    x2 = x.clone()
    for e in far:
        x2[:, 6 * e:6 * e + 6] += 5.0
    with torch.no_grad():
        y, y2 = conv(x), conv(x2)
    assert torch.equal(y[:, 60:66], y2[:, 60:66])
    assert not torch.allclose(y, y2)


def test_skeleton_pool_means_groups(published_args):
    pool = VAESKConv(published_args).encoder.layers[0][0].common[0]
    assert pool.weight.shape == (210, 330)
    assert torch.allclose(pool.weight.sum(1), torch.ones(210))
    x = torch.randn(1, 330, 3)
    y = pool(x)
    assert torch.allclose(y[:, 6:12], (x[:, 6:12] + x[:, 24:30]) / 2)  # group [1, 4]


# ------------------------------------------------------------------------------------------------ quantiser

def test_quantizer_nearest_code_straight_through_and_loss():
    torch.manual_seed(0)
    q = Quantizer(n_e=16, e_dim=8, beta=0.25)
    z = torch.randn(2, 5, 8, requires_grad=True)
    idx = q.map2index(z)
    brute = torch.cdist(z.detach().reshape(-1, 8), q.embedding.weight.detach()).argmin(1).reshape(2, 5)
    assert torch.equal(idx, brute)
    loss, z_q, indices, perplexity = q(z)
    assert torch.equal(indices, idx)
    assert torch.allclose(z_q, q.embedding.weight[idx], atol=1e-6)
    expected = 1.25 * ((q.embedding.weight[idx] - z) ** 2).mean()
    assert torch.allclose(loss, expected)
    (z_q * torch.arange(8.0)).sum().backward()  # straight-through: d z_q / d z = identity
    assert torch.allclose(z.grad, torch.arange(8.0).expand(2, 5, 8))
    # perplexity: 1 when every vector takes the same code, n when n codes are used equally
    assert torch.allclose(q(q.embedding.weight[[3, 3, 3]].detach())[3], torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(q(q.embedding.weight[:4].detach())[3], torch.tensor(4.0), atol=1e-4)


def test_vqvae_index_latent_decode(published_args):
    model = build_stage1_models(published_args)["upper"]
    x = torch.randn(2, 64, 78)
    with torch.no_grad():
        out = model(x)
        idx = model.map2index(x)
        latent = model.map2latent(x)
        assert out["rec_pose"].shape == (2, 64, 78) and out["poses_feat"].shape == (2, 64, 256)
        assert idx.shape == (2, 64) and idx.dtype == torch.long
        assert torch.equal(latent, model.quantizer.embedding.weight[idx])
        assert torch.allclose(model.decode(idx), out["rec_pose"], atol=1e-5)
    assert isinstance(model, VQVAEConvZero)


# ------------------------------------------------------------------------------------------------ generator

@pytest.mark.parametrize("samples", [34133, 34112])
def test_wav_encoder_gives_64_frames(samples):
    encoder = WavEncoder(512, audio_in=3).eval()
    with torch.no_grad():
        assert encoder(torch.randn(1, samples, 3)).shape == (1, 64, 512)


def _block_with_conv_biases(block, x):
    """BasicBlock's maths as the published code computes it: each convolution with its bias, then its BatchNorm."""
    shortcut = x if block.downsample is None else block.downsample(x)
    out = block.act(block.bn1(block.conv1(x)))
    return block.act(block.bn2(block.conv2(out)) + shortcut)


def _large_biases(module, weight_scale, momentum):
    """`module` with random weights of `weight_scale`, biases of scale 2 (large enough that leaving one out where
    it matters would show) and every BatchNorm's momentum set."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (2.0 if name.endswith("bias") else weight_scale))
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = momentum
    return module


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bias_before_training_batchnorm_is_left_out(momentum, layout):
    """In training, BasicBlock runs a convolution that feeds a BatchNorm without its bias (the BatchNorm takes out
    any per-channel constant): output, gradients and running statistics equal those with the biases in the
    convolutions (float64), each such bias gets an exact zero gradient (with the bias in, its gradient is rounding
    noise), and the eval-mode block that uses the running statistics with the biases agrees too."""
    from models.layers import BasicBlock
    torch.manual_seed(0)
    new = _large_biases(BasicBlock(3, 8, 15, stride=5, padding=7, downsample=True).double(), 0.3, momentum)
    ref = copy.deepcopy(new)
    convs = [new.conv1, new.conv2, new.downsample[0]]
    for step in range(2):
        x = torch.randn(2, 3, 400, dtype=torch.float64)
        x_new = x.unsqueeze(2).contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        y_new, y_ref = new(x_new), _block_with_conv_biases(ref, x)
        if layout == "channels_last":
            y_new = y_new.squeeze(2)
        torch.testing.assert_close(y_new, y_ref, rtol=1e-9, atol=1e-10)
        gy = torch.randn_like(y_ref)
        for model, y in ((new, y_new), (ref, y_ref)):
            model.zero_grad()
            (y * gy).sum().backward()
        for (name, p), q in zip(new.named_parameters(), ref.parameters()):
            if any(p is c.bias for c in convs):
                assert p.grad is not None and not p.grad.any(), name
                assert float(q.grad.abs().max()) < 1e-9 * float(gy.abs().sum()), name  # the true gradient is 0
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)
        for (name, a), b in zip(new.named_buffers(), ref.buffers()):
            if name.endswith("num_batches_tracked") and layout == "channels_last" and momentum is not None:
                continue  # advanced by WavEncoder for all its BatchNorms at once
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    new.eval(), ref.eval()
    with torch.no_grad():
        y_new = new(x_new)
        torch.testing.assert_close(y_new.squeeze(2) if layout == "channels_last" else y_new,
                                   _block_with_conv_biases(ref, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_wav_encoder_settles_left_out_biases_at_once(momentum, channels_last):
    """Inside a training WavEncoder the blocks leave the zero gradients and running-mean shifts of their left-out
    conv biases to the encoder, which settles all of them at once: output, gradients and every buffer equal the
    published maths (each convolution with its bias), float64, over two steps; each such bias gets an exact zero."""
    from models.layers import WavEncoder
    torch.manual_seed(0)
    new = _large_biases(WavEncoder(16, audio_in=2).double(), 0.2, momentum)
    new.channels_last = channels_last
    ref = copy.deepcopy(new)
    left_out = {id(b.conv1.bias) for b in new.modules() if hasattr(b, "bn1")}
    left_out |= {id(b.conv2.bias) for b in new.modules() if hasattr(b, "bn2")}
    left_out |= {id(b.downsample[0].bias) for b in new.modules() if getattr(b, "downsample", None) is not None}

    def published(enc, wav):
        run = lambda blocks, x: functools.reduce(lambda h, b: _block_with_conv_biases(b, h), blocks, x)
        fe = list(enc.feat_extractor)
        fine = run(fe[:3], wav.transpose(1, 2))
        mid = run(fe[3:5], fine)
        feats = torch.cat([run(enc.multi_scale[0], fine), run(enc.multi_scale[1], mid), run(fe[5:], mid)], dim=1)
        return enc.out(feats.transpose(1, 2))

    for step in range(2):
        wav = torch.randn(2, 3000, 2, dtype=torch.float64)
        y_new, y_ref = new(wav), published(ref, wav)
        torch.testing.assert_close(y_new, y_ref, rtol=1e-9, atol=1e-10)
        gy = torch.randn_like(y_ref)
        for model, y in ((new, y_new), (ref, y_ref)):
            model.zero_grad()
            (y * gy).sum().backward()
        n_zero = 0
        for (name, p), q in zip(new.named_parameters(), ref.parameters()):
            if id(p) in left_out:
                assert p.grad is not None and not p.grad.any(), name
                n_zero += 1
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=name)
        assert n_zero == len(left_out) == 25  # 9 blocks: 18 convolutions and 7 shortcut convolutions
        for (name, a), b in zip(new.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert all(b.left_out is None for b in new.modules() if hasattr(b, "left_out"))


def test_periodic_positional_encoding():
    pe = PeriodicPositionalEncoding(8, dropout=0.0, period=4, max_seq_len=8)
    assert pe.pe.shape == (1, 12, 8) and "pe" in pe.state_dict()
    assert torch.allclose(pe.pe[0, :4], pe.pe[0, 4:8])
    assert torch.allclose(pe.pe[0, 1, :2], torch.tensor([np.sin(1.0), np.cos(1.0)], dtype=torch.float32))
    with pytest.raises(ValueError):
        pe(torch.zeros(1, 13, 8))


def test_small_forward_shapes(small_model):
    with torch.no_grad():
        out = small_model(**inputs(2, 64, 40), use_word=True, is_test=False)
    assert list(out) == ["rec_face", "rec_upper", "rec_lower", "rec_hands",
                         "cls_face", "cls_upper", "cls_lower", "cls_hands"]
    assert all(v.shape == (2, 64, 32) and torch.isfinite(v).all() for v in out.values())


def test_published_size_forward(published_model):
    """One B=1 window through the published-size model (about 0.1-1 s on CPU)."""
    published_model.eval()
    with torch.no_grad():
        out = published_model(**inputs(1, 64, 11195))
    assert all(v.shape == (1, 64, 256) and torch.isfinite(v).all() for v in out.values())


def test_ssm_backends_agree_inside_the_model(small_model):
    from models import ssm
    x = inputs(1, 64, 40)
    try:
        outs = []
        for backend in ("reference", "torch"):
            ssm.set_ssm_backend(backend)
            with torch.no_grad():
                outs.append(small_model(**x))
    finally:
        ssm.set_ssm_backend("auto")
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-4, rtol=1e-4), k


@pytest.mark.parametrize("samples", [34112, 32000, 36500])
def test_audio_length_mismatch_is_cropped_or_padded(small_model, samples):
    with torch.no_grad():
        out = small_model(**inputs(1, 64, 40, audio_len=samples))
    assert out["rec_face"].shape == (1, 64, 32)


def test_audio_repeat_rule():
    feat = torch.arange(6.0).reshape(1, 6, 1)
    assert MambaTalk.match_length(feat, 4).flatten().tolist() == [0, 1, 2, 3]
    assert MambaTalk.match_length(feat, 8).flatten().tolist() == [0, 1, 2, 3, 4, 5, 4, 5]
    with pytest.raises(ValueError):
        MambaTalk.match_length(feat, 13)


def test_bad_motion_shape_raises(small_model):
    x = inputs(1, 64, 40)
    x["in_motion"] = x["in_motion"][..., :330]
    with pytest.raises(ValueError, match="337"):
        small_model(**x)


def test_discarded_branch_not_computed(small_model):
    calls = []
    hooks = [small_model.global_scan.face_q_self_attn.register_forward_hook(lambda *a: calls.append("face")),
             small_model.global_scan.body_q_self_attn.register_forward_hook(lambda *a: calls.append("body"))]
    try:
        small_model.train()
        out = small_model(**inputs(2, 64, 40))
        sum(v.float().mean() for v in out.values()).backward()
    finally:
        for h in hooks:
            h.remove()
        small_model.eval()
    assert calls == ["body"]
    params = dict(small_model.named_parameters())
    assert all(p.grad is None for n, p in params.items() if n.startswith("global_scan.face_q_self_attn."))
    trained = [n for n, p in params.items() if not n.startswith("global_scan.face_q_self_attn.")]
    assert all(params[n].grad is not None for n in trained if params[n].requires_grad), \
        [n for n in trained if params[n].grad is None]
    small_model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ word embeddings

def test_word_embeddings_from_vocab(small_args):
    from dataloaders.beat2 import Vocab
    vectors = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    vocab = Vocab(["a", "b", "c"], word_embedding_weights=vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = MambaTalk(small_args, vocab=vocab)
    for emb in (model.text_pre_encoder_face, model.text_pre_encoder_body):
        assert torch.equal(emb.weight, torch.from_numpy(vectors)) and emb.weight.requires_grad
    assert model.text_pre_encoder_face.weight.data_ptr() != model.text_pre_encoder_body.weight.data_ptr()


def test_word_embeddings_from_vocab_pkl(small_args, tmp_path):
    from dataloaders.beat2 import Vocab
    vectors = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    (tmp_path / "weights").mkdir()
    with open(tmp_path / "weights" / "vocab.pkl", "wb") as f:
        pickle.dump(Vocab(["x", "y"], word_embedding_weights=vectors), f)
    args = copy.copy(small_args)
    args.data_path = str(tmp_path) + "/"
    model = MambaTalk(args)
    assert torch.equal(model.text_pre_encoder_body.weight, torch.from_numpy(vectors))


def test_word_embeddings_random_init_warns_and_is_seeded(small_args):
    with pytest.warns(UserWarning, match="seeded random init"):
        a = MambaTalk(small_args)
    with pytest.warns(UserWarning):
        b = MambaTalk(small_args)
    assert a.text_pre_encoder_face.weight.shape == (40, 16)  # word_index_num x word_dims
    assert torch.equal(a.text_pre_encoder_face.weight, b.text_pre_encoder_face.weight)
    assert torch.equal(a.text_pre_encoder_face.weight, a.text_pre_encoder_body.weight)


# ------------------------------------------------------------------------------------------------ checkpoints

def test_published_format_round_trip(small_model, small_args, tmp_path):
    path = tmp_path / "mambatalk.bin"
    save_weights(small_model, path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert list(payload) == ["model_state"]
    assert list(payload["model_state"]) == ["module." + k for k in small_model.state_dict()]
    torch.manual_seed(123)
    fresh = build(small_args).eval()
    load_weights(fresh, path)
    for (k, a), b in zip(small_model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    x = inputs(1, 64, 40)
    with torch.no_grad():
        assert torch.allclose(small_model(**x)["cls_upper"], fresh(**x)["cls_upper"])


def test_vaeskconv_round_trip(published_args, tmp_path):
    torch.manual_seed(1)
    a = VAESKConv(published_args)
    save_weights(a, tmp_path / "ae.bin")
    torch.manual_seed(2)
    b = VAESKConv(published_args)
    load_weights(b, tmp_path / "ae.bin")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoint_of_other_config_is_rejected(small_model, small_args, tmp_path):
    path = tmp_path / "small.bin"
    save_weights(small_model, path)
    other = copy.copy(small_args)
    other.hidden_size = 32
    with pytest.raises(CheckpointMismatchError, match="mis-shaped") as err:
        load_weights(build(other), path)
    assert str(path) in str(err.value) and "global_scan.learnable_query" not in str(err.value)
    assert "global_scan.motion_proj1.mlp.0.weight: file (64, 32) vs model (32, 32)" in str(err.value)
