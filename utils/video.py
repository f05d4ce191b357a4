"""Headless rendering of a BEAT2-format motion file (with its wav) to an mp4 (spec §9, re-designed for speed).

Layout as published: a face close-up beside the full body (face left, body right); with a ground-truth file the
two pairs stand side by side (ground truth left, result right). The published close-up is a second mesh with every
rotation zeroed, the jaw included, so the mouth never opens. Ours is the same posed mesh seen from the head's own
frame: the head keeps still and faces the camera as in the published one, while jaw, eyes and expressions move,
and the body model runs once per frame instead of twice.

Pipeline, all on CPU and without a display: body model in chunks (a background thread prepares the next chunk)
-> smooth vertex normals (a sparse vertex-face matrix) -> moderngl with a standalone EGL context (Mesa llvmpipe),
every panel drawn into one framebuffer with its own viewport -> RGB frames piped to the ffmpeg binary that
imageio-ffmpeg bundles (a writer thread), which also muxes the wav in the same process. No images touch the disk.
Why moderngl/EGL: it needs no X server, and drawing two 11k-vertex views at 1280x720 and reading them back takes
~10-30 ms here against ~240-340 ms for the published pyrender path on the same machine (run_scripts/bench_render.py).
"""
import queue
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from tqdm import tqdm

from utils.checkpoint import atomic_write
from utils.log import get_logger
from utils.rotation import axis_angle_to_matrix
from utils.skeleton import PARENTS

MOTION_FPS = 30
POSE_DIM = 165  # 55 SMPL-X joints x axis-angle
NUM_BETAS, NUM_EXPRESSIONS = 300, 100
HEAD_JOINT = 15

BACKGROUND = (0.17, 0.18, 0.21)
MESH_COLOR = (0.85, 0.84, 0.82)
LIGHT_DIR = (-0.3, 0.5, 0.8)  # towards the light: in front, above, a little to the body's right
AMBIENT = 0.3
APT_PACKAGES = "libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri"  # Debian/Ubuntu: EGL, libGL.so.1, llvmpipe


class RendererUnavailableError(RuntimeError):
    """No offscreen OpenGL 3.3 context could be created."""


# ---------------------------------------------------------------- input checks

def load_motion(path):
    """Read a BEAT2-format npz -> dict(poses (T,165), trans (T,3), betas (300,), expressions (T,100)), float32.

    Only `poses` is required; missing trans/betas/expressions are zeros."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"motion file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{path}: not a .npz file (no zip header)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = npz.files
            data = {k: np.asarray(npz[k], dtype=np.float32) for k in ("poses", "trans", "betas", "expressions")
                    if k in keys}
    except Exception as e:  # zipfile.BadZipFile, EOFError, a member that is not an array, ...
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if "poses" not in data:
        raise ValueError(f"{path}: no 'poses' array (keys: {', '.join(keys) or 'none'})")
    poses = data["poses"]
    if poses.ndim != 2 or poses.shape[1] != POSE_DIM or poses.shape[0] == 0:
        raise ValueError(f"{path}: 'poses' has shape {poses.shape}, expected (frames, {POSE_DIM}) "
                         f"(55 SMPL-X joints in axis-angle)")
    if not np.isfinite(poses).all():
        raise ValueError(f"{path}: 'poses' contains NaN or inf")
    n = poses.shape[0]
    trans = data.get("trans", np.zeros((n, 3), np.float32))
    expressions = data.get("expressions", np.zeros((n, NUM_EXPRESSIONS), np.float32))
    betas = data.get("betas", np.zeros(NUM_BETAS, np.float32)).reshape(-1)
    for name, arr, width in (("trans", trans, 3), ("expressions", expressions, NUM_EXPRESSIONS)):
        if arr.shape != (n, width):
            raise ValueError(f"{path}: '{name}' has shape {arr.shape}, expected ({n}, {width})")
    if betas.size > NUM_BETAS:
        raise ValueError(f"{path}: 'betas' has {betas.size} values, at most {NUM_BETAS} are supported")
    betas = np.pad(betas, (0, NUM_BETAS - betas.size))
    return dict(poses=poses, trans=trans, betas=betas, expressions=expressions)


def wav_duration(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    import soundfile
    try:
        return soundfile.info(str(path)).duration
    except Exception as e:
        raise ValueError(f"{path}: not a readable audio file ({e})") from e


def check_output_dir(save_dir):
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create output folder {save_dir} ({e.strerror or e})") from e
    try:  # os.access says yes to root even on read-only folders: really try
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as e:
        raise PermissionError(f"output folder {save_dir} is not writable ({e.strerror or e})") from e
    return save_dir


# ---------------------------------------------------------------- text captions (5x7 bitmap font, upper case)

# Each glyph: 7 rows of 5 pixels, one hex byte per row, bit 4 = left column.
FONT_5X7 = {
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1E11111111111E",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F",
    "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E",
    "T": "1F040404040404", "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A",
    "X": "11110A040A1111", "Y": "11110A04040404", "Z": "1F01020408101F",
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E",
    "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    " ": "00000000000000", "-": "0000001F000000", "_": "0000000000001F", ".": "00000000000C0C",
    ",": "000000000C0408", ":": "000C0C000C0C00", "/": "00010204081000", "(": "02040808080402",
    ")": "08040202020408", "?": "0E110102040004", "+": "0004041F040400", "=": "00001F001F0000",
    "%": "18190204081303", "'": "04040800000000",
}


def text_mask(text):
    """Bitmap (7, 6*len-1) bool of `text` in the 5x7 font; lower case is drawn as upper case, unknown chars as '?'."""
    glyphs = []
    for ch in text.upper():
        code = FONT_5X7.get(ch, FONT_5X7["?"])
        rows = [int(code[2 * r:2 * r + 2], 16) for r in range(7)]
        glyph = np.array([[(row >> (4 - c)) & 1 for c in range(5)] for row in rows], bool)
        glyphs += [glyph, np.zeros((7, 1), bool)]
    return np.concatenate(glyphs[:-1] or [np.zeros((7, 0), bool)], axis=1)


def text_patch(text, scale, fg=(255, 255, 255), bg=(30, 32, 38)):
    """RGB uint8 label: the text scaled by an integer factor on a filled box with a margin of one glyph pixel."""
    mask = np.kron(np.pad(text_mask(text), 1), np.ones((scale, scale), bool))
    patch = np.empty(mask.shape + (3,), np.uint8)
    patch[:] = bg
    patch[mask] = fg
    return patch


def paste(image, patch, x, y):
    h = max(0, min(patch.shape[0], image.shape[0] - y))
    w = max(0, min(patch.shape[1], image.shape[1] - x))
    image[y:y + h, x:x + w] = patch[:h, :w]


# ---------------------------------------------------------------- geometry

def vertex_face_matrix(faces, num_vertices):
    """Sparse (V, F) incidence: M @ face_normals sums the (area-weighted) normals of the faces around each vertex."""
    faces = np.asarray(faces, np.int64)
    rows = faces.T.reshape(-1)
    cols = np.tile(np.arange(len(faces)), 3)
    return scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(num_vertices, len(faces)))


def vertex_normals(vertices, faces, incidence):
    """vertices (N, V, 3) -> unnormalised smooth normals (N, V, 3) float32 (the shader normalises)."""
    a, b, c = (vertices[:, faces[:, k]] for k in range(3))
    face_normals = np.cross(b - a, c - a)  # (N, F, 3), length = 2 x area
    n, f = face_normals.shape[:2]
    summed = incidence @ face_normals.transpose(1, 0, 2).reshape(f, n * 3)
    return np.ascontiguousarray(summed.reshape(-1, n, 3).transpose(1, 0, 2), dtype=np.float32)


def ortho_matrix(center, half_width, half_height, half_depth):
    """World -> clip for a camera on +z looking down -z. y is flipped so that glReadPixels returns rows top-down."""
    cx, cy, cz = center
    return np.array([[1 / half_width, 0, 0, -cx / half_width],
                     [0, -1 / half_height, 0, cy / half_height],
                     [0, 0, -1 / half_depth, cz / half_depth],
                     [0, 0, 0, 1]], np.float32)


def frame_box(lo, hi, aspect, margin):
    """Orthographic matrix showing the box [lo, hi] (x, y, z) with `margin` (fraction) around it, panel aspect w/h."""
    center = (lo + hi) / 2
    half_height = (hi[1] - lo[1]) / 2 * (1 + margin)
    half_width = max(half_height * aspect, (hi[0] - lo[0]) / 2 * (1 + margin))
    half_height = half_width / aspect
    half_depth = (hi[2] - lo[2]) / 2 + 1.0  # room for limbs moving towards or away from the camera
    return ortho_matrix(center, half_width, half_height, half_depth)


def head_box(vertices, head):
    """Box around the head of an upright, front-facing mesh: vertices within 15 cm sideways of the head joint,
    from 12 cm below it (chin, open jaw) up to the top of the head."""
    near = vertices[(np.abs(vertices[:, 0] - head[0]) < 0.15) & (vertices[:, 1] > head[1] - 0.12)
                    & (np.abs(vertices[:, 2] - head[2]) < 0.25)]
    if len(near) < 10:  # a body unlike SMPL-X: fall back to a 30 cm box
        near = np.stack([head - 0.15, head + 0.15])
    return near.min(0), near.max(0)


# ---------------------------------------------------------------- one motion file -> meshes

def head_rotation(poses):
    """Global rotation (N, 3, 3) of the head joint: product of the local rotations from the pelvis down to it."""
    chain, joint = [], HEAD_JOINT
    while joint >= 0:
        chain.append(joint)
        joint = PARENTS[joint]
    local = axis_angle_to_matrix(torch.from_numpy(poses).reshape(len(poses), -1, 3)[:, chain[::-1]])
    rotation = local[:, 0]
    for k in range(1, len(chain)):
        rotation = rotation @ local[:, k]
    return rotation.numpy()


def head_frame(rotation, head):
    """World -> head frame (4x4 per frame): origin at the head joint, axes of the head at rest (upright, facing +z).
    Seen from this frame the head keeps still and faces the camera, as in the published close-up (whose every
    rotation is zero), while jaw, eyes and expressions still move."""
    m = np.zeros((len(head), 4, 4), np.float32)
    m[:, :3, :3] = rotation.transpose(0, 2, 1)
    m[:, :3, 3] = -np.einsum("nij,nj->ni", m[:, :3, :3], head)
    m[:, 3, 3] = 1
    return m


class MotionMeshes:
    """Per-frame meshes of one motion (one body-model pass serves both panels) and the fixed cameras."""

    def __init__(self, motion, body_model, translation, chunk):
        self.motion, self.body, self.translation, self.chunk = motion, body_model, translation, chunk
        self.faces = np.asarray(body_model.faces, np.int64)
        self.incidence = vertex_face_matrix(self.faces, body_model.num_vertices)

    def _forward(self, idx):
        """Vertices (N, V, 3) and world -> head frame matrices (N, 4, 4) of motion frames `idx`."""
        m = self.motion
        trans = m["trans"][idx] if self.translation else np.repeat(m["trans"][:1], len(idx), axis=0)
        with torch.inference_mode():
            out = self.body(torch.from_numpy(m["poses"][idx]), torch.from_numpy(m["betas"]),
                            torch.from_numpy(m["expressions"][idx]), torch.from_numpy(trans), chunk=self.chunk)
        head = out["joints"][:, HEAD_JOINT].float().numpy()
        return out["vertices"].float().numpy(), head_frame(head_rotation(m["poses"][idx]), head)

    def cameras(self, face_aspect, body_aspect):
        """Fixed orthographic cameras from the first frame: the head (in the head frame) and the whole body
        (widened by the root's travel when translation is shown)."""
        vertices, to_head = self._forward([0])
        lo, hi = vertices[0].min(0), vertices[0].max(0)
        if self.translation:
            travel = self.motion["trans"] - self.motion["trans"][:1]
            lo, hi = lo + travel.min(0), hi + travel.max(0)
        in_head_frame = vertices[0] @ to_head[0, :3, :3].T + to_head[0, :3, 3]
        face_lo, face_hi = head_box(in_head_frame, np.zeros(3, np.float32))
        return frame_box(face_lo, face_hi, face_aspect, margin=0.15), frame_box(lo, hi, body_aspect, margin=0.08)

    def chunk_arrays(self, idx):
        """Motion frame indices -> vertices (N, V, 3), normals (N, V, 3), world -> head frame (N, 4, 4)."""
        vertices, to_head = self._forward(idx)
        return np.ascontiguousarray(vertices), vertex_normals(vertices, self.faces, self.incidence), to_head


# ---------------------------------------------------------------- OpenGL

VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
uniform mat3 normal_rotation;
in vec3 in_position;
in vec3 in_normal;
out vec3 normal;
void main() {
    gl_Position = mvp * vec4(in_position, 1.0);
    normal = normal_rotation * in_normal;
}
"""
FRAGMENT_SHADER = """
#version 330
uniform vec3 light_dir;
uniform vec3 color;
uniform float ambient;
in vec3 normal;
out vec4 frag_color;
void main() {
    float lambert = max(dot(normalize(normal), light_dir), 0.0);
    frag_color = vec4(color * (ambient + (1.0 - ambient) * lambert), 1.0);
}
"""


def create_gl_context():
    """Standalone OpenGL 3.3 context: EGL first (no X server needed), then the default backend (X11, e.g. under
    xvfb-run)."""
    import moderngl
    errors = []
    for backend in ("egl", None):
        try:
            kwargs = {"backend": backend} if backend else {}
            return moderngl.create_standalone_context(require=330, **kwargs)
        except Exception as e:
            errors.append(f"{backend or 'default'}: {e}")
    raise RendererUnavailableError(
        "no offscreen OpenGL 3.3 context could be created (" + "; ".join(errors) + "). On Debian/Ubuntu install "
        f"Mesa's EGL and software rasteriser: apt-get install -y {APT_PACKAGES} (or run under xvfb-run -a)")


class PanelRenderer:
    """One framebuffer for the whole video frame; every panel is a draw of a mesh into its own viewport."""

    def __init__(self, ctx, width, height, faces, num_vertices, num_meshes):
        import moderngl
        self.ctx, self.width, self.height = ctx, width, height
        self.program = self.ctx.program(vertex_shader=VERTEX_SHADER, fragment_shader=FRAGMENT_SHADER)
        self.program["light_dir"].value = tuple(np.divide(LIGHT_DIR, np.linalg.norm(LIGHT_DIR)))
        self.program["color"].value = MESH_COLOR
        self.program["ambient"].value = AMBIENT
        index_buffer = self.ctx.buffer(np.asarray(faces, np.int32).tobytes())
        self.buffers, self.vaos = [], []
        for _ in range(num_meshes):
            positions = self.ctx.buffer(reserve=num_vertices * 12)
            normals = self.ctx.buffer(reserve=num_vertices * 12)
            self.buffers.append((positions, normals))
            self.vaos.append(self.ctx.vertex_array(
                self.program, [(positions, "3f", "in_position"), (normals, "3f", "in_normal")], index_buffer))
        self.fbo = self.ctx.framebuffer(color_attachments=[self.ctx.renderbuffer((width, height))],
                                        depth_attachment=self.ctx.depth_renderbuffer((width, height)))
        self.fbo.use()
        self.ctx.enable(moderngl.DEPTH_TEST)

    def render(self, meshes, panels):
        """meshes: [(vertices (V,3), normals (V,3))]; panels: [(mesh index, mvp 4x4, model 4x4, (x, width))]
        -> (H, W, 3) uint8, rows top-down. The model matrix's rotation also turns the normals."""
        self.fbo.clear(*BACKGROUND)
        for (vertices, normals), (positions_buf, normals_buf) in zip(meshes, self.buffers):
            positions_buf.write(vertices)
            normals_buf.write(normals)
        for mesh, mvp, model, (x, w) in panels:
            self.program["mvp"].write((mvp @ model).T.copy())  # GL wants column-major
            self.program["normal_rotation"].write(model[:3, :3].T.copy())
            self.ctx.viewport = (x, 0, w, self.height)
            self.vaos[mesh].render()
        image = bytearray(self.width * self.height * 3)
        self.fbo.read_into(image, components=3, alignment=1)
        return np.frombuffer(image, np.uint8).reshape(self.height, self.width, 3)


# ---------------------------------------------------------------- encoding

class Encoder:
    """The bundled ffmpeg reading raw RGB frames from a pipe (fed by a writer thread), muxing the wav in the same
    process: audio padded with silence and everything cut at exactly `duration` seconds."""

    def __init__(self, path, width, height, fps, duration, wav_path=None, preset="veryfast", crf=20):
        import imageio_ffmpeg
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "-"]
        if wav_path is not None:
            cmd += ["-i", str(wav_path), "-map", "0:v", "-map", "1:a", "-af", "apad", "-c:a", "aac", "-b:a", "128k"]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
                "-t", f"{duration:.6f}", "-movflags", "+faststart", "-f", "mp4", str(path)]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self.log)
        self.frames = queue.Queue(maxsize=8)
        self.error = None
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self):
        while (frame := self.frames.get()) is not None:
            if self.error is None:
                try:
                    self.process.stdin.write(frame)
                except OSError as e:  # ffmpeg died: keep draining so the producer never blocks
                    self.error = e

    def write(self, frame):
        if self.error is not None:
            self.close()
        self.frames.put(frame)

    def close(self):
        self.frames.put(None)
        self.thread.join()
        try:
            self.process.stdin.close()
        except OSError:
            pass
        code = self.process.wait()
        if code != 0 or self.error is not None:
            self.log.seek(0)
            message = self.log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"ffmpeg failed (exit code {code}): {message or self.error}")

    def abort(self):
        self.process.kill()
        self.process.wait()
        self.frames.put(None)  # the writer fails fast on the dead pipe, drains the queue and stops
        self.thread.join()


# ---------------------------------------------------------------- the whole thing

def panel_layout(width, num_motions):
    """[(x, width)] of face and body panels, face left of body, motions left to right."""
    n = 2 * num_motions
    edges = [round(i * width / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]


def wrap_words(text, max_chars):
    """Lines of at most `max_chars` characters, broken between words (a longer word gets a line of its own)."""
    lines = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def overlay_patches(width, height, layout, labels, caption):
    """[(RGB patch, x, y)] drawn on every frame: a label over each motion, the body caption, panel separators."""
    scale = max(1, round(height / 360))
    pad = 4 * scale
    patches = [(text_patch(label, scale), layout[2 * i][0] + pad, pad) for i, label in enumerate(labels)]
    # the caption is wrapped to the first panel's width so that it never runs into the next panel
    max_chars = max(1, (layout[0][1] - 2 * pad) // (6 * scale) - 1)
    y = height - pad
    for line in reversed(wrap_words(caption, max_chars)):
        caption_patch = text_patch(line, scale, fg=(230, 230, 160))[:, :layout[0][1] - 2 * pad]
        y -= caption_patch.shape[0]
        patches.append((caption_patch, pad, y))
    separator = np.full((height, scale, 3), 90, np.uint8)
    patches += [(separator, x - scale // 2, 0) for x, _ in layout[1:]]
    return patches


def fixed_panels(meshes, layout, height):
    """[(mesh index, camera, (x, width))]: face close-up then body of each motion, left to right."""
    panels = []
    for i, mesh in enumerate(meshes):
        face_camera, body_camera = mesh.cameras(layout[2 * i][1] / height, layout[2 * i + 1][1] / height)
        panels += [(i, face_camera, layout[2 * i]), (i, body_camera, layout[2 * i + 1])]
    return panels


def render_frame(renderer, panels, arrays, j):
    """Frame j of a chunk: arrays[i] = MotionMeshes.chunk_arrays(...) of motion i. Close-ups (even panels) are seen
    from the head frame, bodies from the world."""
    identity = np.eye(4, dtype=np.float32)
    views = [(i, camera, arrays[i][2][j] if k % 2 == 0 else identity, viewport)
             for k, (i, camera, viewport) in enumerate(panels)]
    return renderer.render([(vertices[j], normals[j]) for vertices, normals, _ in arrays], views)


def render_npz(npz_path, wav_path, save_dir, width=1280, height=720, fps=MOTION_FPS, translation=False,
               gt_npz=None, max_seconds=None, smplx_model_dir="./pretrained/smplx_models/", progress=True,
               body_model=None, chunk=32, preset="veryfast"):
    """Render `npz_path` (BEAT2 format) with `wav_path` (or None: no sound) to `<save_dir>/<npz stem>.mp4`.

    The video lasts exactly as long as the motion (or `max_seconds`); a wav of another length is cut or padded with
    silence (with a warning). Returns the mp4 path. Raises FileNotFoundError / ValueError / PermissionError naming
    the file for bad input, RendererUnavailableError when no OpenGL context can be made."""
    logger = get_logger()
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16 (H.264 4:2:0), got {width}x{height}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    # Left to right: ground truth (when given), then the result.
    motions = ([load_motion(gt_npz)] if gt_npz else []) + [load_motion(npz_path)]
    num_frames = min(len(m["poses"]) for m in motions)
    if len({len(m["poses"]) for m in motions}) > 1:
        logger.warning(f"{npz_path} and {gt_npz} differ in length: rendering the first {num_frames} frames")
    if max_seconds is not None:
        num_frames = min(num_frames, max(1, round(max_seconds * MOTION_FPS)))
    duration = num_frames / MOTION_FPS
    if wav_path is not None:
        audio_seconds = wav_duration(wav_path)
        if abs(audio_seconds - duration) > 1 / MOTION_FPS and max_seconds is None:
            action = "cut" if audio_seconds > duration else "padded with silence"
            logger.warning(f"{wav_path} lasts {audio_seconds:.2f} s but the motion {duration:.2f} s: audio {action}")
    save_dir = check_output_dir(save_dir)
    out_path = save_dir / f"{Path(npz_path).stem}.mp4"

    gl_context = create_gl_context()  # before the slow parts: a machine without OpenGL fails at once
    try:
        if body_model is None:
            from utils.body_model import BodyModel
            body_model = BodyModel(smplx_model_dir)
        logger.info(f"rendering {npz_path} with {body_model.description}")
        layout = panel_layout(width, len(motions))
        meshes = [MotionMeshes(m, body_model, translation, chunk) for m in motions]
        panels = fixed_panels(meshes, layout, height)
        labels = ["ground truth", "result"] if gt_npz else [Path(npz_path).stem]
        body_name = "SMPL-X" if not body_model.is_standin else "stand-in body (no SMPL-X model file)"
        patches = overlay_patches(width, height, layout, labels, f"body: {body_name}")
        renderer = PanelRenderer(gl_context, width, height, body_model.faces, body_model.num_vertices, len(meshes))
        # Output frame k shows the motion frame nearest to its time (the motion is 30 fps).
        num_out = max(1, round(duration * fps))
        sources = np.minimum(np.round(np.arange(num_out) * MOTION_FPS / fps).astype(np.int64), num_frames - 1)
        with atomic_write(out_path) as tmp_path:
            encoder = Encoder(tmp_path, width, height, fps, num_out / fps, wav_path, preset=preset)
            try:
                draw_frames(renderer, meshes, panels, patches, sources, chunk, encoder.write,
                            tqdm(total=num_out, desc=f"render {Path(npz_path).name}", unit="frame",
                                 disable=not progress))
            except BaseException:
                encoder.abort()
                raise
            encoder.close()
    finally:
        gl_context.release()
    return out_path


def draw_frames(renderer, meshes, panels, patches, sources, chunk, write, bar):
    """Draw the frames showing motion frames `sources` and pass each to `write`. The body model of the next chunk
    runs in a background thread while this chunk is drawn."""
    compute = lambda start: [m.chunk_arrays(sources[start:start + chunk]) for m in meshes]
    with ThreadPoolExecutor(1) as prefetch, bar:
        pending = prefetch.submit(compute, 0)
        for start in range(0, len(sources), chunk):
            arrays = pending.result()
            if start + chunk < len(sources):
                pending = prefetch.submit(compute, start + chunk)
            for j in range(len(arrays[0][0])):
                image = render_frame(renderer, panels, arrays, j)
                for patch, x, y in patches:
                    paste(image, patch, x, y)
                write(image.data)
                bar.update(1)
