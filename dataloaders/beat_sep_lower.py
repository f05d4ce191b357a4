"""Dataset of the MambaTalk and lower-body configs (`dataset: beat_sep_lower`): pose = axis-angle of `tar_joints`
followed by 4 foot contacts; speaker ids through the BEAT2 id mapping (spec §2, §3.8)."""
from dataloaders.cache import BeatDataset
from utils.skeleton import speaker_index


class CustomDataset(BeatDataset):
    def __init__(self, args, loader_type, whole=None):
        super().__init__(args, loader_type, with_contacts=True, speaker_id=speaker_index, whole=whole)
