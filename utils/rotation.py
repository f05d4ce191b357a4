"""Rotation conversions, plain torch, batched over any leading dimensions.

Conventions (spec §Conventions): quaternions are (w, x, y, z); "6D" is the first two ROWS of the rotation
matrix flattened row-major (R[..., :2, :]); going back normalises row 1, makes row 2 orthogonal to it
(Gram-Schmidt) and takes row 3 as their cross product. Small angles use Taylor series so values and
gradients stay finite at angle 0; matrix -> quaternion picks the best-conditioned branch so angles near pi
are accurate.
"""
import torch
import torch.nn.functional as F

_SMALL = 1e-6  # squared-angle threshold below which Taylor series replace sin(x)/x-type ratios


def _check_last(x, size, name):
    if x.shape[-1] != size:
        raise ValueError(f"{name}: expected last dimension {size}, got shape {tuple(x.shape)}")


def _skew(v):
    """(..., 3) -> (..., 3, 3) cross-product matrix K with K @ u = v x u."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa):
    """Rodrigues: R = I + sin(t)/t K + (1 - cos t)/t^2 K^2, with K = skew(aa), t = |aa|."""
    _check_last(aa, 3, "axis_angle_to_matrix")
    t2 = (aa * aa).sum(-1)
    small = t2 < _SMALL
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))  # safe: no sqrt(0) in the gradient
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    # 1 - cos t = 2 sin^2(t/2) avoids cancellation for small t
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, 2 * torch.sin(t / 2) ** 2 / torch.where(small, 1, t2))
    k = _skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def axis_angle_to_quaternion(aa):
    """q = (cos(t/2), sin(t/2)/t * aa)."""
    _check_last(aa, 3, "axis_angle_to_quaternion")
    t2 = (aa * aa).sum(-1, keepdim=True)
    small = t2 < _SMALL
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    w = torch.where(small, 1 - t2 / 8 + t2 * t2 / 384, torch.cos(t / 2))
    k = torch.where(small, 0.5 - t2 / 48 + t2 * t2 / 3840, torch.sin(t / 2) / t)
    return torch.cat([w, k * aa], dim=-1)


def quaternion_to_axis_angle(q):
    """Inverse of axis_angle_to_quaternion; the result has angle in [0, pi]. q need not be normalised."""
    _check_last(q, 4, "quaternion_to_axis_angle")
    q = F.normalize(q, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)  # q and -q are the same rotation; w >= 0 gives angle <= pi
    w, xyz = q[..., :1], q[..., 1:]
    n2 = (xyz * xyz).sum(-1, keepdim=True)
    small = n2 < _SMALL
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    # angle / |xyz| = 2 atan2(n, w) / n; for small n (then w ~ 1): 2/w (1 - n^2 / (3 w^2))
    w_safe = torch.where(small, w.clamp(min=0.5), torch.ones_like(w))  # w > 0.999 when small
    k = torch.where(small, 2 / w_safe * (1 - n2 / (3 * w_safe * w_safe)), 2 * torch.atan2(n, w) / n)
    return k * xyz


def quaternion_to_matrix(q):
    """(w, x, y, z) -> rotation matrix; q is normalised implicitly."""
    _check_last(q, 4, "quaternion_to_matrix")
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    m = torch.stack([
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ], dim=-1)
    return m.reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(R):
    """Rotation matrix -> (w, x, y, z) with w >= 0.

    Each of the four components can be recovered from the diagonal (4 c^2 = 1 +- m00 +- m11 +- m22); the
    other three follow from off-diagonal sums/differences divided by the largest one, which keeps the
    division well conditioned for every angle, including pi."""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_quaternion: expected (..., 3, 3), got shape {tuple(R.shape)}")
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                           1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)  # 4w^2, 4x^2, 4y^2, 4z^2
    pos = four_sq > 0
    two_abs = torch.where(pos, torch.sqrt(torch.where(pos, four_sq, torch.ones_like(four_sq))), torch.zeros_like(four_sq))
    # row i = 4 c_i * (w, x, y, z)
    rows = torch.stack([
        torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], dim=-1),
    ], dim=-2)
    # dividing row i by 4|c_i| gives +-q; the floor only matters for rows that are not selected
    cands = rows / (2 * two_abs.clamp(min=0.1))[..., None]
    best = two_abs.argmax(dim=-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(R):
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def matrix_to_rotation_6d(R):
    """First two rows of R, flattened row-major: (..., 3, 3) -> (..., 6)."""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_rotation_6d: expected (..., 3, 3), got shape {tuple(R.shape)}")
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def rotation_6d_to_matrix(d6):
    """(..., 6) -> (..., 3, 3): Gram-Schmidt on the two rows, third row = cross product."""
    _check_last(d6, 6, "rotation_6d_to_matrix")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def axis_angle_to_rot6d(x):
    """Flat per-joint conversion: (..., 3J) axis-angle -> (..., 6J) 6D."""
    if x.shape[-1] % 3:
        raise ValueError(f"axis_angle_to_rot6d: last dimension must be 3*J, got shape {tuple(x.shape)}")
    j = x.shape[-1] // 3
    d6 = matrix_to_rotation_6d(axis_angle_to_matrix(x.reshape(*x.shape[:-1], j, 3)))
    return d6.reshape(*x.shape[:-1], 6 * j)


def rot6d_to_axis_angle(x):
    """Flat per-joint conversion: (..., 6J) 6D -> (..., 3J) axis-angle."""
    if x.shape[-1] % 6:
        raise ValueError(f"rot6d_to_axis_angle: last dimension must be 6*J, got shape {tuple(x.shape)}")
    j = x.shape[-1] // 6
    aa = matrix_to_axis_angle(rotation_6d_to_matrix(x.reshape(*x.shape[:-1], j, 6)))
    return aa.reshape(*x.shape[:-1], 3 * j)
