import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from utils.rotation import (axis_angle_to_matrix, axis_angle_to_quaternion, axis_angle_to_rot6d,
                            matrix_to_axis_angle, matrix_to_quaternion, matrix_to_rotation_6d,
                            quaternion_to_axis_angle, quaternion_to_matrix, rot6d_to_axis_angle,
                            rotation_6d_to_matrix)


def random_axis_angle(n, max_angle=math.pi, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    angle = torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle
    return axis * angle


def scipy_wxyz(rot):
    q = rot.as_quat()  # xyzw
    q = np.concatenate([q[:, 3:], q[:, :3]], axis=1)
    return q * np.where(q[:, :1] < 0, -1, 1)


def test_axis_angle_matrix_quaternion_match_scipy():
    aa = random_axis_angle(2000)
    ref = Rotation.from_rotvec(aa.numpy())
    R = axis_angle_to_matrix(aa)
    np.testing.assert_allclose(R.numpy(), ref.as_matrix(), atol=1e-12)
    q = axis_angle_to_quaternion(aa)
    np.testing.assert_allclose(q.numpy(), scipy_wxyz(ref), atol=1e-12)  # angle <= pi -> w >= 0
    np.testing.assert_allclose(matrix_to_quaternion(R).numpy(), scipy_wxyz(ref), atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), ref.as_matrix(), atol=1e-12)
    np.testing.assert_allclose(matrix_to_axis_angle(R).numpy(), aa.numpy(), atol=1e-10)
    np.testing.assert_allclose(quaternion_to_axis_angle(q).numpy(), aa.numpy(), atol=1e-10)


def test_matrix_to_axis_angle_of_scipy_matrices():
    R = torch.from_numpy(Rotation.random(500, random_state=1).as_matrix())
    np.testing.assert_allclose(matrix_to_axis_angle(R).numpy(), Rotation.from_matrix(R.numpy()).as_rotvec(),
                               atol=1e-10)


def test_quaternion_sign_and_scale_do_not_matter():
    aa = random_axis_angle(100, max_angle=3.0)
    q = axis_angle_to_quaternion(aa)
    np.testing.assert_allclose(quaternion_to_axis_angle(-2.5 * q).numpy(), aa.numpy(), atol=1e-10)
    np.testing.assert_allclose(quaternion_to_matrix(3 * q).numpy(), axis_angle_to_matrix(aa).numpy(), atol=1e-12)


def test_6d_is_first_two_rows():
    R = axis_angle_to_matrix(random_axis_angle(50))
    d6 = matrix_to_rotation_6d(R)
    assert d6.shape == (50, 6)
    np.testing.assert_array_equal(d6[:, :3].numpy(), R[:, 0, :].numpy())
    np.testing.assert_array_equal(d6[:, 3:].numpy(), R[:, 1, :].numpy())
    np.testing.assert_allclose(rotation_6d_to_matrix(d6).numpy(), R.numpy(), atol=1e-12)


def test_6d_to_matrix_gram_schmidt_on_rows():
    d6 = torch.tensor([[2.0, 0.0, 0.0, 1.0, 3.0, 0.0]], dtype=torch.float64)
    R = rotation_6d_to_matrix(d6)[0]
    expected = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    np.testing.assert_allclose(R.numpy(), expected.numpy(), atol=1e-12)
    # any input gives a proper rotation whose first row is the normalised first vector
    d6 = torch.randn(100, 6, dtype=torch.float64)
    R = rotation_6d_to_matrix(d6)
    np.testing.assert_allclose((R @ R.transpose(-1, -2)).numpy(), np.broadcast_to(np.eye(3), (100, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(torch.linalg.det(R).numpy(), np.ones(100), atol=1e-12)
    np.testing.assert_allclose(R[:, 0].numpy(), (d6[:, :3] / d6[:, :3].norm(dim=-1, keepdim=True)).numpy(), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_near_pi_and_zero(dtype, tol):
    g = torch.Generator().manual_seed(3)
    axis = torch.nn.functional.normalize(torch.randn(64, 3, generator=g, dtype=torch.float64), dim=-1)
    for angle in [0.0, 1e-9, 1e-6, 1e-4, 1e-2, math.pi - 1e-2, math.pi - 1e-5, math.pi - 1e-7, math.pi]:
        aa = (axis * angle).to(dtype)
        R = axis_angle_to_matrix(aa)
        ref = Rotation.from_rotvec(aa.double().numpy()).as_matrix()
        np.testing.assert_allclose(R.double().numpy(), ref, atol=tol, err_msg=f"angle {angle}")
        back = matrix_to_axis_angle(R)
        assert torch.isfinite(back).all()
        # near pi, aa and -aa are the same rotation: compare through matrices
        np.testing.assert_allclose(axis_angle_to_matrix(back).double().numpy(), ref, atol=5 * tol,
                                   err_msg=f"angle {angle}")
        via_q = quaternion_to_axis_angle(axis_angle_to_quaternion(aa))
        np.testing.assert_allclose(axis_angle_to_matrix(via_q).double().numpy(), ref, atol=5 * tol)
        if angle < 3.0:
            np.testing.assert_allclose(back.double().numpy(), aa.double().numpy(), atol=5 * tol)
            np.testing.assert_allclose(via_q.double().numpy(), aa.double().numpy(), atol=5 * tol)


def test_gradients_finite_at_zero():
    for fn in (lambda x: axis_angle_to_matrix(x),
               lambda x: matrix_to_axis_angle(axis_angle_to_matrix(x)),
               lambda x: quaternion_to_axis_angle(axis_angle_to_quaternion(x)),
               lambda x: rot6d_to_axis_angle(axis_angle_to_rot6d(x))):
        x = torch.zeros(4, 3, requires_grad=True)
        fn(x).sum().backward()
        assert torch.isfinite(x.grad).all()


def test_batched_shapes_and_flat_helpers():
    aa = random_axis_angle(2 * 5 * 55, max_angle=3.0).reshape(2, 5, 165)
    assert axis_angle_to_matrix(aa.reshape(2, 5, 55, 3)).shape == (2, 5, 55, 3, 3)
    assert axis_angle_to_quaternion(aa.reshape(2, 5, 55, 3)).shape == (2, 5, 55, 4)
    d6 = axis_angle_to_rot6d(aa)
    assert d6.shape == (2, 5, 330)
    R = axis_angle_to_matrix(aa.reshape(2, 5, 55, 3))
    np.testing.assert_array_equal(d6.reshape(2, 5, 55, 6).numpy(), R[..., :2, :].reshape(2, 5, 55, 6).numpy())
    back = rot6d_to_axis_angle(d6)
    assert back.shape == (2, 5, 165)
    np.testing.assert_allclose(back.numpy(), aa.numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="3\\*J"):
        axis_angle_to_rot6d(torch.zeros(4, 7))
    with pytest.raises(ValueError):
        rotation_6d_to_matrix(torch.zeros(4, 5))
