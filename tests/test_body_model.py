"""Body model: the built-in stand-in (format, geometry, skinning, determinism) and BodyModel's forward."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import smplx
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from utils import standin_body
from utils.body_model import BodyModel, load_body_model
from conftest import Hostile  # noqa: E402

# kintree_table[0] of SMPLX_NEUTRAL_2020.npz (spec §3.1), written out independently of utils/skeleton.py
SPEC_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15, 20, 25, 26,
                20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38, 21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50,
                21, 52, 53]
LEFT_ELBOW, LEFT_WRIST = 18, 20


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("mambatalk_cache")
        mp.setenv("MAMBATALK_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def body(cache_dir):
    return BodyModel()


@pytest.fixture(scope="module")
def npz(body, cache_dir):
    path = standin_body.standin_dir() / "smplx" / standin_body.NPZ_NAME
    return dict(np.load(path))


def random_poses(n, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 165, generator=g) * scale


def test_standin_loads_through_published_smplx_call(body, cache_dir):
    model = smplx.create(str(standin_body.standin_dir()), model_type="smplx",
                         gender="NEUTRAL_2020", num_betas=300, num_expression_coeffs=100, ext="npz",
                         use_pca=False, use_face_contour=False)
    out = model()
    assert out.vertices.shape == (1, body.num_vertices, 3)
    assert out.joints.shape == (1, 127, 3)
    assert body.is_standin and "stand-in" in body.description
    assert body.num_vertices >= 10475
    assert body.faces.dtype == np.int64 and body.faces.shape[1] == 3
    assert body.faces.min() >= 0 and body.faces.max() < body.num_vertices


def test_standin_format(npz):
    V = npz["v_template"].shape[0]
    assert npz["shapedirs"].shape == (V, 3, 400)
    assert npz["posedirs"].shape == (V, 3, 486) and not npz["posedirs"].any()
    assert not npz["shapedirs"][:, :, 1:].any()  # only the first beta (height) does something
    assert npz["J_regressor"].shape == (55, V) and npz["weights"].shape == (V, 55)
    np.testing.assert_allclose(npz["weights"].sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(npz["J_regressor"].sum(1), 1.0, atol=1e-6)
    assert npz["kintree_table"][0, 0] == 2**32 - 1
    assert npz["kintree_table"][0].astype(np.int32).tolist() == SPEC_PARENTS


def test_smplx_parents_match_spec(body):
    assert body.smplx.parents.tolist() == SPEC_PARENTS


def test_rest_pose_proportions(body, npz):
    v = npz["v_template"]
    owner = npz["weights"].argmax(1)
    height = v[:, 1].max() - v[:, 1].min()
    assert 1.6 < height < 1.9
    lowest = np.argsort(v[:, 1])[:50]
    highest = np.argsort(v[:, 1])[-50:]
    assert set(owner[lowest]) <= {7, 8, 10, 11}
    assert set(owner[highest]) == {15}
    joints = body(torch.zeros(1, 165))["joints"][0]
    assert joints[0, 1].abs() < 0.5  # pelvis near the origin like SMPL-X
    assert joints[20, 0] > 0.5 and joints[21, 0] < -0.5  # T-pose: left hand at +x


def test_faces_wound_outward(npz):
    v, f = npz["v_template"].astype(np.float64), npz["f"].astype(np.int64)
    n = len(v)
    edges = coo_matrix((np.ones(2 * len(f)), (f[:, [0, 1]].ravel(), f[:, [1, 2]].ravel())), shape=(n, n))
    _, label = connected_components(edges, directed=False)
    face_label = label[f[:, 0]]
    centre = np.stack([np.bincount(label[np.unique(f)], v[np.unique(f), c], minlength=label.max() + 1)
                       for c in range(3)], 1) / np.maximum(np.bincount(label[np.unique(f)],
                                                                       minlength=label.max() + 1), 1)[:, None]
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = np.einsum("fc,fc->f", normal, tri.mean(1) - centre[face_label])
    assert (outward > 0).all()


def test_rotating_left_elbow_moves_only_forearm_and_hand(body):
    pose = torch.zeros(2, 165)
    pose[1, 3 * LEFT_ELBOW + 1] = -1.2  # bend about y
    out = body(pose)
    verts, joints = out["vertices"], out["joints"]
    moved = (verts[1] - verts[0]).norm(dim=1) > 1e-6
    assert moved.sum() > 500
    elbow_x = joints[0, LEFT_ELBOW, 0]
    assert (verts[0, moved, 0] > elbow_x - 0.05).all()  # only vertices out from the left elbow
    assert torch.allclose(joints[1, LEFT_ELBOW], joints[0, LEFT_ELBOW])
    assert (joints[1, LEFT_WRIST] - joints[0, LEFT_WRIST]).norm() > 0.1


def test_repeated_calls_and_chunking_agree(body):
    poses = random_poses(21)
    trans = torch.randn(21, 3)
    betas = torch.randn(300) * 0.5
    a = body(poses, betas=betas, trans=trans, chunk=1000)
    b = body(poses, betas=betas, trans=trans, chunk=1000)
    c = body(poses, betas=betas, trans=trans, chunk=4)
    assert torch.equal(a["joints"], b["joints"])
    torch.testing.assert_close(a["joints"], c["joints"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["vertices"], c["vertices"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def dense_body(tmp_path_factory, npz):
    """A 'real' model folder with every SMPL-X ingredient non-zero: shape, expression and pose blend shapes,
    dense skinning weights, a hand mean pose."""
    rng = np.random.default_rng(0)
    arrays = dict(npz)
    V = arrays["v_template"].shape[0]
    arrays["shapedirs"] = (rng.standard_normal((V, 3, 400)) * 1e-3).astype(np.float32)
    arrays["posedirs"] = (rng.standard_normal((V, 3, 486)) * 1e-3).astype(np.float32)
    logits = rng.standard_normal((V, 55)) + 4.0 * arrays["weights"]
    arrays["weights"] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    arrays["hands_meanl"] = (rng.standard_normal(45) * 0.1).astype(np.float32)
    arrays["hands_meanr"] = (rng.standard_normal(45) * 0.1).astype(np.float32)
    model_dir = tmp_path_factory.mktemp("dense_smplx")
    (model_dir / "smplx").mkdir()
    standin_body.write_npz(arrays, model_dir / "smplx" / standin_body.NPZ_NAME)
    model = BodyModel(str(model_dir))
    assert not model.is_standin and model.has_pose_correctives and model.has_expression_shapes
    return model


def smplx_reference(body, poses, betas, expressions, trans):
    out = body.smplx(betas=betas, expression=expressions, transl=trans, global_orient=poses[:, :3],
                     body_pose=poses[:, 3:66], jaw_pose=poses[:, 66:69], leye_pose=poses[:, 69:72],
                     reye_pose=poses[:, 72:75], left_hand_pose=poses[:, 75:120], right_hand_pose=poses[:, 120:],
                     return_verts=True)
    return out.joints, out.vertices


@pytest.mark.parametrize("which", ["standin", "dense"])
@pytest.mark.parametrize("shared_betas", [True, False])
def test_forward_matches_smplx(request, which, shared_betas):
    model = request.getfixturevalue("body" if which == "standin" else "dense_body")
    n = 6
    poses, trans, expressions = random_poses(n, seed=4), torch.randn(n, 3), torch.randn(n, 100)
    betas = torch.randn(1, 300).expand(n, -1) if shared_betas else torch.randn(n, 300)
    with torch.no_grad():
        ours = model(poses, betas=betas, expressions=expressions, trans=trans, chunk=4)
        joints, vertices = smplx_reference(model, poses, betas, expressions, trans)
    torch.testing.assert_close(ours["joints"], joints, rtol=0, atol=2e-5)
    torch.testing.assert_close(ours["vertices"], vertices, rtol=0, atol=2e-5)


def test_joint_only_path_equals_full_forward(body):
    poses = random_poses(9, seed=1)
    kwargs = dict(betas=torch.randn(9, 300) * 0.5, expressions=torch.randn(9, 100), trans=torch.randn(9, 3))
    full = body(poses, **kwargs)
    fast = body(poses, return_vertices=False, **kwargs)
    assert fast["vertices"] is None and fast["joints"].shape == (9, 55, 3)
    torch.testing.assert_close(fast["joints"], full["joints"][:, :55], rtol=0, atol=1e-5)


def test_joints_are_the_posed_joint_markers(body, npz):
    """Each joint has a marker vertex (one-hot J_regressor row): posed, it must sit on the posed joint."""
    marker = npz["J_regressor"].argmax(1)
    out = body(random_poses(3, seed=2), trans=torch.randn(3, 3))
    torch.testing.assert_close(out["vertices"][:, marker], out["joints"][:, :55], rtol=0, atol=1e-5)


def test_first_beta_scales_height(body):
    rest = body(torch.zeros(1, 165))["vertices"][0, :, 1]
    betas = torch.zeros(300)
    betas[0] = 1.0
    taller = body(torch.zeros(1, 165), betas=betas)["vertices"][0, :, 1]
    ratio = (taller.max() - taller.min()) / (rest.max() - rest.min())
    assert ratio == pytest.approx(1.0 + standin_body.HEIGHT_SCALE_PER_BETA, abs=1e-5)


def test_forward_is_differentiable_and_accepts_numpy(body):
    poses = random_poses(4, seed=3).requires_grad_(True)
    out = body(poses)
    out["vertices"].sum().backward()
    assert poses.grad is not None and torch.isfinite(poses.grad).all() and poses.grad.abs().sum() > 0
    from_numpy = body(poses.detach().numpy().astype(np.float64))
    torch.testing.assert_close(from_numpy["joints"], out["joints"].detach())


def test_generation_is_deterministic(tmp_path):
    standin_body.write_npz(standin_body.build_standin(), tmp_path / "a.npz")
    standin_body.write_npz(standin_body.build_standin(), tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_damaged_cache_is_rebuilt(tmp_path, body):
    root = standin_body.ensure_standin(tmp_path)
    path = root / "smplx" / standin_body.NPZ_NAME
    good = standin_body.file_sha256(path)
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a half-written or edited file
    assert standin_body.ensure_standin(tmp_path) == root
    assert standin_body.file_sha256(path) == good


def test_real_model_dir_is_preferred(tmp_path, npz, cache_dir):
    model_dir = tmp_path / "smplx_models"
    (model_dir / "smplx").mkdir(parents=True)
    shutil.copy(standin_body.standin_dir() / "smplx" / standin_body.NPZ_NAME,
                model_dir / "smplx" / "SMPLX_NEUTRAL_2020.npz")
    real = BodyModel(str(model_dir))
    assert not real.is_standin and "SMPL-X" in real.description
    fallback = BodyModel(str(tmp_path / "missing"))
    assert fallback.is_standin
    args = SimpleNamespace(smplx_model_dir="", data_path_1=str(tmp_path) + "/")
    assert load_body_model(args) is load_body_model(args)
    assert not load_body_model(args).is_standin


@pytest.mark.parametrize("kwargs, match", [
    (dict(poses=torch.zeros(5, 164)), r"poses must have shape \(N, 165\)"),
    (dict(poses=torch.zeros(165)), r"poses must have shape"),
    (dict(poses=torch.zeros(0, 165)), r"N >= 1"),
    (dict(poses=torch.zeros(5, 165), betas=torch.zeros(10)), r"betas must have shape"),
    (dict(poses=torch.zeros(5, 165), betas=torch.zeros(4, 300)), r"betas must have shape"),
    (dict(poses=torch.zeros(5, 165), expressions=torch.zeros(5, 50)), r"expressions must have shape \(5, 100\)"),
    (dict(poses=torch.zeros(5, 165), trans=torch.zeros(3)), r"trans must have shape \(5, 3\)"),
])
def test_bad_shapes_raise_clear_errors(body, kwargs, match):
    with pytest.raises(ValueError, match=match):
        body(**kwargs)


def test_real_sample_gives_finite_joints_on_the_floor(body, beat2_sample):
    data = np.load(beat2_sample / "smplxflame_30" / "2_scott_0_1_1.npz", allow_pickle=True)
    with torch.no_grad():
        joints = body(data["poses"], data["betas"], data["expressions"], data["trans"],
                      return_vertices=False)["joints"]
        full = body(data["poses"][:64], data["betas"], data["expressions"][:64], data["trans"][:64])
    assert joints.shape == (len(data["poses"]), 55, 3) and torch.isfinite(joints).all()
    assert torch.isfinite(full["vertices"]).all()
    torch.testing.assert_close(full["joints"][:, :55], joints[:64], rtol=0, atol=1e-5)
    # BEAT2 translations put the stand-in's feet on a floor near y = 0
    assert joints[:, [10, 11], 1].min().abs() < 0.1


def smplx_dir(tmp_path, arrays):
    model_dir = tmp_path / "smplx_models"
    (model_dir / "smplx").mkdir(parents=True)
    np.savez(model_dir / "smplx" / "SMPLX_NEUTRAL_2020.npz", **arrays)  # object arrays are pickled into the file
    return model_dir, model_dir / "smplx" / "SMPLX_NEUTRAL_2020.npz"


def test_smplx_file_is_never_unpickled(tmp_path, npz, body, cache_dir):
    """The real SMPL-X npz carries object arrays (name tables) next to the numeric ones. A crafted table must not run:
    the numeric arrays load without pickle (same body as before), and a needed array that is a pickle is refused."""
    marker = tmp_path / "pwned"
    table = np.empty((), dtype=object)
    table[()] = Hostile(marker)
    model_dir, path = smplx_dir(tmp_path / "a", dict(npz, joint2num=table))
    with_table = BodyModel(str(model_dir))
    assert not marker.exists() and not with_table.is_standin
    poses = random_poses(3)
    torch.testing.assert_close(with_table(poses)["vertices"], body(poses)["vertices"], rtol=0, atol=0)
    model_dir, path = smplx_dir(tmp_path / "b", dict(npz, v_template=table))
    with pytest.raises(ValueError, match=rf"{path}: cannot be used as an SMPL-X model: 'v_template' is a pickled "
                                         r"object array, not numbers \(refused"):
        BodyModel(str(model_dir))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "missing", "shape"])
def test_malformed_smplx_file_is_a_message(tmp_path, npz, cache_dir, damage):
    arrays = dict(npz)
    if damage == "missing":
        del arrays["J_regressor"]
    if damage == "shape":
        arrays["weights"] = arrays["weights"][:, :20]
    model_dir, path = smplx_dir(tmp_path, arrays)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100_000])
    expected = {"truncated": "", "missing": r"missing array\(s\) \['J_regressor'\]",
                "shape": r"'weights' has shape \(\d+, 20\) .*expected numbers of shape \('V', 55\)"}[damage]
    with pytest.raises(ValueError, match=rf"{path}: cannot be used as an SMPL-X model: {expected}"):
        BodyModel(str(model_dir))
