"""export.py / utils/export_motion.py: BVH and glb files checked by tools that are not the writer (bvhio, the Khronos
glTF Validator, Blender when installed), on the real sample and on a generated result; bad input."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import soundfile as sf
import torch

import export
from dataloaders.beat2 import read_motion
from utils.body_model import BodyModel
from utils.export_motion import build_rig, bvh_text, export_motion, glb_bytes, matrix_to_euler_zxy
from utils.log import run_cli
from utils.rotation import axis_angle_to_matrix
from utils.skeleton import JOINT_NAMES, PARENTS

from test_generate import run_infer, setup  # noqa: F401  (the generation tests' tiny model, a pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "smplxflame_30/2_scott_0_1_1.npz"
VALIDATOR = ROOT / ".dev" / "node_modules" / "gltf-validator"  # .ci/run installs it there (npm)
MM = 1e-3


@pytest.fixture(scope="module")
def body():
    return BodyModel(str(ROOT / "pretrained" / "smplx_models"))


def body_joints(body, npz):
    m = read_motion(npz)
    with torch.no_grad():
        return body(m["poses"], m["betas"], m["expressions"], m["trans"], return_vertices=False)["joints"].numpy()


def bvh_world_joints(path, units=0.01):
    """(N, 55, 3) joint world positions in metres from bvhio, an independent BVH reader (its own parser and FK)."""
    bvhio = pytest.importorskip("bvhio")
    root = bvhio.readAsHierarchy(str(path))
    joints = {j.Name: j for j, _, _ in root.layout()}
    assert set(joints) == set(JOINT_NAMES)
    assert all((joints[n].Parent.Name if PARENTS[k] >= 0 else None) == (JOINT_NAMES[PARENTS[k]] if PARENTS[k] >= 0
               else None) for k, n in enumerate(JOINT_NAMES) if PARENTS[k] >= 0)
    n = len(root.Keyframes)
    out = np.zeros((n, len(JOINT_NAMES), 3))
    for f in range(n):
        root.loadPose(f, recursive=True)
        out[f] = [tuple(joints[name].PositionWorld) for name in JOINT_NAMES]
    return out * units


def validate_glb(path):
    if shutil.which("node") is None or not VALIDATOR.is_dir():
        pytest.skip("node or the npm package gltf-validator (.dev/node_modules) is not installed")
    script = ("const v = require(process.argv[1]); const data = require('fs').readFileSync(process.argv[2]);"
              "v.validateBytes(new Uint8Array(data)).then(r => console.log(JSON.stringify(r.issues)))"
              ".catch(e => { console.error(String(e)); process.exit(1); });")
    r = subprocess.run(["node", "-e", script, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def read_accessor(gltf, blob, index):
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4, "MAT4": 16}[acc.type]
    dtype = {pygltflib.FLOAT: np.float32, pygltflib.UNSIGNED_BYTE: np.uint8, pygltflib.UNSIGNED_SHORT: np.uint16,
             pygltflib.UNSIGNED_INT: np.uint32}[acc.componentType]
    a = np.frombuffer(blob, dtype, acc.count * width, view.byteOffset + (acc.byteOffset or 0))
    return a.reshape(acc.count, width) if width > 1 else a


def quat_matrix(q):
    """glTF (x, y, z, w) -> (N, 3, 3) with numpy: the test's own reading, not utils/rotation.py."""
    x, y, z, w = (q / np.linalg.norm(q, axis=-1, keepdims=True)).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


def glb_world_joints(path):
    """(N, 55, 3) joint world positions from the glb's node hierarchy and animation keys, and the parsed file."""
    gltf = pygltflib.GLTF2.load(str(path))
    blob = gltf.binary_blob()
    anim = gltf.animations[0]
    keys = {}
    for ch in anim.channels:
        sampler = anim.samplers[ch.sampler]
        keys[(ch.target.node, ch.target.path)] = read_accessor(gltf, blob, sampler.output).astype(np.float64)
    n = len(read_accessor(gltf, blob, anim.samplers[0].input))
    parent = {c: i for i, node in enumerate(gltf.nodes) for c in node.children}
    world_rot, world_pos = {}, {}
    for k in range(len(JOINT_NAMES)):  # parents come before children in SMPL-X order
        node = gltf.nodes[k]
        rot = quat_matrix(keys[(k, "rotation")])
        t = keys.get((k, "translation"), np.broadcast_to(np.asarray(node.translation, np.float64), (n, 3)))
        if k in parent:
            p = parent[k]
            world_pos[k] = world_pos[p] + np.einsum("nij,nj->ni", world_rot[p], t)
            world_rot[k] = world_rot[p] @ rot
        else:
            world_pos[k], world_rot[k] = t, rot
    return np.stack([world_pos[k] for k in range(len(JOINT_NAMES))], axis=1), gltf, blob


@pytest.fixture(scope="module")
def sample_export(beat2_sample, body, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    npz = beat2_sample / SAMPLE
    bvh, glb = export_motion(npz, ["bvh", "glb"], out, body)
    return npz, bvh, glb


def test_bvh_exact_on_real_sample(sample_export, body):
    npz, bvh, _ = sample_export
    text = bvh.read_text()
    want = body_joints(body, npz)
    assert f"Frames: {len(want)}\nFrame Time: 0.03333333\n" in text
    assert "CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation" in text
    got = bvh_world_joints(bvh)
    assert got.shape == want.shape
    err = np.linalg.norm(got - want, axis=-1)
    assert err.max() < MM, f"max joint error {err.max() * 1000:.3f} mm"


def test_glb_on_real_sample(sample_export, body):
    npz, _, glb = sample_export
    want = body_joints(body, npz)
    got, gltf, blob = glb_world_joints(glb)
    assert np.linalg.norm(got - want, axis=-1).max() < MM
    skin = gltf.skins[0]
    assert [gltf.nodes[j].name for j in skin.joints] == JOINT_NAMES
    prim = gltf.meshes[0].primitives[0]
    assert read_accessor(gltf, blob, prim.attributes.POSITION).shape == (body.num_vertices, 3)
    assert len(read_accessor(gltf, blob, prim.indices)) == 3 * len(body.faces)
    weights = read_accessor(gltf, blob, prim.attributes.WEIGHTS_0)
    assert np.allclose(weights.sum(1), 1, atol=1e-5)
    ibm = read_accessor(gltf, blob, skin.inverseBindMatrices).reshape(-1, 4, 4)  # column-major: translation in row 3
    rest = np.zeros((len(JOINT_NAMES), 3))
    for k, p in enumerate(PARENTS):
        rest[k] = (rest[p] if p >= 0 else 0) + np.asarray(gltf.nodes[k].translation)
    assert np.allclose(ibm[:, 3, :3], -rest, atol=1e-6) and np.allclose(ibm[:, :3, :3], np.eye(3))
    assert (prim.targets is None or not prim.targets) == (not body.has_expression_shapes)


def test_glb_passes_khronos_validator(sample_export):
    issues = validate_glb(sample_export[2])
    assert issues["numErrors"] == 0, issues["messages"][:10]


def test_glb_expression_morph_targets(body, tmp_path):
    """SMPL-X's expression blend shapes become morph targets driven by the npz's expressions (the stand-in has none:
    give it some)."""
    rng = np.random.default_rng(0)
    n = 20
    motion = dict(poses=0.2 * rng.standard_normal((n, 165)).astype(np.float32), trans=np.zeros((n, 3), np.float32),
                  betas=np.zeros(300, np.float32), expressions=rng.standard_normal((n, 100)).astype(np.float32))
    rig = build_rig(motion, body)
    rig["expr_dirs"] = 1e-3 * rng.standard_normal((len(rig["vertices"]), 3, 100))
    path = tmp_path / "expr.glb"
    path.write_bytes(glb_bytes(rig, 30.0))
    gltf = pygltflib.GLTF2.load(str(path))
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]
    assert len(prim.targets) == 100 and len(gltf.meshes[0].extras["targetNames"]) == 100
    target = read_accessor(gltf, blob, prim.targets[7]["POSITION"])
    assert np.allclose(target, rig["expr_dirs"][..., 7], atol=1e-7)
    weights = [ch for ch in gltf.animations[0].channels if ch.target.path == "weights"]
    assert len(weights) == 1
    keys = read_accessor(gltf, blob, gltf.animations[0].samplers[weights[0].sampler].output).reshape(n, 100)
    assert np.allclose(keys, motion["expressions"], atol=1e-6)
    if shutil.which("node") and VALIDATOR.is_dir():
        assert validate_glb(path)["numErrors"] == 0


def test_joints_moved_by_expressions(body, tmp_path):
    """The real SMPL-X's expression blend shapes move its face joints a little per frame; the files carry that as
    position channels / translation keys. The stand-in has no such shapes: give jaw and eyes some."""
    import copy
    face = copy.deepcopy(body)
    rng = np.random.default_rng(3)
    face.joint_dirs[22:25, :, 300:] = torch.from_numpy(5e-4 * rng.standard_normal((3, 3, 100))).float()
    n = 30
    npz = tmp_path / "faces.npz"
    np.savez(npz, poses=0.3 * rng.standard_normal((n, 165)).astype(np.float32), trans=np.zeros((n, 3), np.float32),
             betas=np.zeros(300, np.float32), expressions=rng.standard_normal((n, 100)).astype(np.float32))
    want = body_joints(face, npz)
    assert np.linalg.norm(want - body_joints(body, npz), axis=-1).max() > 5 * MM  # the shapes matter
    bvh, glb = export_motion(npz, ["bvh", "glb"], tmp_path, face)
    assert bvh.read_text().count("CHANNELS 6") == 4  # the root, the jaw and both eyes
    assert np.linalg.norm(bvh_world_joints(bvh) - want, axis=-1).max() < MM
    assert np.linalg.norm(glb_world_joints(glb)[0] - want, axis=-1).max() < MM


def test_euler_zxy_round_trip():
    rng = np.random.default_rng(1)
    aa = torch.from_numpy(rng.standard_normal((500, 3)) * 1.5)
    R = axis_angle_to_matrix(aa).numpy()
    # gimbal lock: x = +-90 degrees
    lock = [axis_angle_to_matrix(torch.tensor([s * np.pi / 2, 0.0, 0.0], dtype=torch.float64)).numpy() for s in (1, -1)]
    R = np.concatenate([R, np.stack(lock) @ R[:2]])
    z, x, y = np.moveaxis(matrix_to_euler_zxy(R), -1, 0)

    def about(axis, a):
        v = np.zeros((len(a), 3))
        v[:, axis] = a
        return axis_angle_to_matrix(torch.from_numpy(v)).numpy()

    back = about(2, z) @ about(0, x) @ about(1, y)
    assert np.abs(back - R).max() < 1e-9


def test_translation_off_and_frame_rate(body, tmp_path):
    rng = np.random.default_rng(2)
    n = 10
    motion = dict(poses=0.1 * rng.standard_normal((n, 165)).astype(np.float32),
                  trans=np.cumsum(rng.standard_normal((n, 3)), 0).astype(np.float32),
                  betas=np.zeros(300, np.float32), expressions=np.zeros((n, 100), np.float32))
    rig = build_rig(motion, body, translation=False)
    text = bvh_text(rig, fps=60, units="m")
    frames = np.loadtxt(text.split("Frame Time: 0.01666667\n")[1].splitlines())
    assert frames.shape == (n, 3 + 3 * 55)
    assert np.allclose(frames[:, :3], rig["rest_joints"][0] + motion["trans"][0], atol=1e-5)  # stays put, metres


def crafted(tmp_path, name, **changes):
    n = 5
    data = dict(poses=np.zeros((n, 165), np.float32), trans=np.zeros((n, 3), np.float32),
                betas=np.zeros(300, np.float32), expressions=np.zeros((n, 100), np.float32))
    data.update(changes)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


def test_bad_input_names_file_and_writes_nothing(body, tmp_path, capsys):
    nan_poses = np.zeros((5, 165), np.float32)
    nan_poses[2, 7] = np.nan
    cases = {
        "not_beat2.npz": ("missing array", dict(poses=None)),
        "nan.npz": ("NaN", dict(poses=nan_poses)),
        "empty.npz": ("no frames", dict(poses=np.zeros((0, 165), np.float32), trans=np.zeros((0, 3), np.float32),
                                        expressions=np.zeros((0, 100), np.float32))),
    }
    out = tmp_path / "out"
    for name, (words, changes) in cases.items():
        path = crafted(tmp_path, name, **changes)
        with pytest.raises(ValueError, match=words) as err:
            export_motion(path, ["bvh", "glb"], out, body)
        assert str(path) in str(err.value)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot be read"):
        export_motion(garbage, ["bvh"], out, body)
    assert not out.exists() or not any(out.iterdir())
    # the command line (what `python export.py` runs): one line naming the file, exit status 2, nothing in --out
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: export.main(["--npy_path", str(tmp_path / "nan.npz"), "--out", str(out)]))
    assert stop.value.code == 2
    assert f"error: {tmp_path / 'nan.npz'}: 'poses' contains NaN" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_full_disk_leaves_nothing(body, tmp_path, capsys):
    """A real write failure, not a mock: a file-size limit (RLIMIT_FSIZE) that the small BVH fits under and the glb
    does not; the BVH already written by this call is taken back and the error names the file."""
    import resource
    import signal
    npz = crafted(tmp_path, "short.npz")
    out = tmp_path / "out"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
    try:
        with pytest.raises(OSError, match=r"short\.glb: cannot write .*no file written"):
            export_motion(npz, ["bvh", "glb"], out, body)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert out.is_dir() and not any(out.iterdir())
    assert [p.name for p in export_motion(npz, ["bvh"], out, body)] == ["short.bvh"]  # it fits


def test_infer_exports_beside_result(setup, tmp_path, body):
    """`infer.py --export bvh glb` with the generation tests' tiny randomly initialised model: the files land beside
    the result, and the BVH is exact for this generated motion too."""
    args, _, _ = setup
    t = np.arange(16000 * 4) / 16000
    wav = tmp_path / "speech.wav"
    sf.write(wav, (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000)
    out = tmp_path / "res" / "result.npz"
    out.parent.mkdir()
    r = run_infer(args, "--audio", str(wav), "--out", str(out), "--export", "bvh", "glb", "--words", "none")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.bvh", "result.glb", "result.npz"]
    want = body_joints(body, out)
    assert np.abs(np.diff(want, axis=0)).max() > 1e-3  # it moves
    err = np.linalg.norm(bvh_world_joints(out.with_suffix(".bvh")) - want, axis=-1)
    assert err.max() < MM, f"max joint error {err.max() * 1000:.3f} mm"
    got, _, _ = glb_world_joints(out.with_suffix(".glb"))
    assert np.linalg.norm(got - want, axis=-1).max() < MM


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="Blender as a module (pip install bpy==5.0.1)")
def test_blender_imports_both_files(beat2_sample):
    r = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "check_export_blender.py"), "--npy_path",
                        str(beat2_sample / SAMPLE)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith(("BVH:", "glb:"))]
    assert r.returncode == 0 and len(lines) == 2 and all(line.endswith("-> ok") for line in lines), r.stdout + r.stderr
