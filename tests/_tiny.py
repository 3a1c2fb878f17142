"""The tests' tiny training data: a bright block on noise, item i a pure function of (seed, epoch, i).

Shared by the training tests (tests/test_train.py), the data-parallel worker (tests/_ddp_worker.py) and the CUDA
tests; it follows the PatchDataset contract (items {"image", "label"} of shape (1, D, H, W), ``set_epoch``).
"""
import torch


class TinyPatches(torch.utils.data.Dataset):
    """``n`` patches of size ``patch`` (D, H, W); each holds one block of ``block`` (d, h, h) voxels labelled 1
    and brighter by 0.7 than the noise in [0, 0.3)."""

    def __init__(self, n, patch, seed=0, block=(3, 8, 8)):
        self.n, self.patch, self.seed, self.epoch = n, tuple(patch), seed, 0
        self.block = tuple(block)

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        d, h, w = self.patch
        bd, bh, bw = self.block
        img = torch.rand(1, d, h, w, generator=g) * 0.3
        lab = torch.zeros(1, d, h, w)
        z = int(torch.randint(0, max(1, d - 2), (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, h - bh, (2,), generator=g))
        lab[:, z:z + bd, y:y + bh, x:x + bw] = 1
        return {"image": img + 0.7 * lab, "label": lab}
