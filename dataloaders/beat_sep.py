"""Dataset of the face/upper/hands VQ configs (`dataset: beat_sep`): pose = axis-angle of `tar_joints`, no foot
contacts; speaker id s-1 (spec §2, §3.2)."""
from dataloaders.cache import BeatDataset


def speaker_minus_one(speaker):
    return int(speaker) - 1


class CustomDataset(BeatDataset):
    def __init__(self, args, loader_type, whole=None):
        super().__init__(args, loader_type, with_contacts=False, speaker_id=speaker_minus_one, whole=whole)
