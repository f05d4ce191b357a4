"""The 55-joint SMPL-X skeleton as BEAT2 stores it (spec §3.1): joint order, parents, body-part tables.

Joint k occupies axis-angle dims [3k, 3k+3) of the 165-D pose. Part masks select in ascending joint order.
"""
import numpy as np

JOINT_NAMES = [
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "jaw",
    "left_eye_smplhf", "right_eye_smplhf",
    "left_index1", "left_index2", "left_index3", "left_middle1", "left_middle2", "left_middle3",
    "left_pinky1", "left_pinky2", "left_pinky3", "left_ring1", "left_ring2", "left_ring3",
    "left_thumb1", "left_thumb2", "left_thumb3",
    "right_index1", "right_index2", "right_index3", "right_middle1", "right_middle2", "right_middle3",
    "right_pinky1", "right_pinky2", "right_pinky3", "right_ring1", "right_ring2", "right_ring3",
    "right_thumb1", "right_thumb2", "right_thumb3",
]
NUM_JOINTS = len(JOINT_NAMES)  # 55
POSE_DIM = 3 * NUM_JOINTS      # 165

# kintree_table[0] of SMPLX_NEUTRAL_2020.npz, root = -1
PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
           20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
           21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53]

_UPPER = [3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
_HANDS = list(range(25, 55))
_LOWER = [0, 1, 2, 4, 5, 7, 8, 10, 11]

# the table names the configs use (ori_joints / tar_joints); all lists ascending
PART_JOINTS = {
    "beat_smplx_joints": list(range(NUM_JOINTS)),
    "beat_smplx_full": list(range(NUM_JOINTS)),
    "beat_smplx_upper": _UPPER,
    "beat_smplx_hands": _HANDS,
    "beat_smplx_lower": _LOWER,
    "beat_smplx_face": [22],
    "beat_smplx_upall": sorted(_UPPER + _HANDS),
    "beat_smplx_no_eyes": [k for k in range(NUM_JOINTS) if k not in (23, 24)],
}

FOOT_JOINTS = (7, 8, 10, 11)  # left/right ankle, left/right foot: foot contact
BC_UPPER_BODY = [3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # joints used by the beat-consistency metric


def part_joints(table):
    if table not in PART_JOINTS:
        raise ValueError(f"unknown joint table '{table}'; known: {', '.join(PART_JOINTS)}")
    return PART_JOINTS[table]


def joint_mask(table):
    """Boolean (165,) mask of the axis-angle dims of the table's joints."""
    mask = np.zeros(POSE_DIM, dtype=bool)
    for k in part_joints(table):
        mask[3 * k:3 * k + 3] = True
    return mask


def speaker_index(speaker):
    """BEAT2-English speaker number -> 0..24 (spec §2 idmapping: 30->8, 28->14, 27->19, else s-1)."""
    return {30: 8, 28: 14, 27: 19}.get(int(speaker), int(speaker) - 1)


# BEAT2 stores the root translation in its capture frame: y is about 1.3 m for a standing speaker (the real sample:
# 1.11-1.34). A neutral seed stands there.
REST_TRANS = (0.0, 1.3, 0.0)


def rest_pose():
    """A neutral standing pose (165,) float32: identity rotations except the arms lowered to the sides, the seed of
    generation when no seed pose is given."""
    pose = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    pose[JOINT_NAMES.index("left_shoulder")] = (0.0, 0.0, -1.2)   # rotate the T-pose arms down about z
    pose[JOINT_NAMES.index("right_shoulder")] = (0.0, 0.0, 1.2)
    pose[JOINT_NAMES.index("left_elbow")] = (0.0, -0.3, 0.0)
    pose[JOINT_NAMES.index("right_elbow")] = (0.0, 0.3, 0.0)
    return pose.reshape(POSE_DIM)
