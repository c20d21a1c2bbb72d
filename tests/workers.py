"""A dataset defined in an importable module, so DataLoader workers can unpickle it under spawn."""

import torch

import qwen_vl_utils as q


class VideoDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return q.fetch_video({"video": self.paths[i], "nframes": 4}, return_video_metadata=True)
