"""The order of the data: seeds derived from (seed, epoch, ...) and the epoch sampler, both pure functions of
their arguments, which is what makes a resumed run equal an uninterrupted one."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


def mix_seed(*vals: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 steps), independent of PYTHONHASHSEED."""
    x = 0x9E3779B97F4A7C15
    for v in vals:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """``num_samples`` indices into a dataset of ``n`` items, in an order that is a pure function of
    (seed, epoch): concatenated seeded permutations of 0..n-1, cut to ``num_samples``.

    ``set_epoch(epoch, start)`` picks the epoch and skips the first ``start`` samples (a resumed epoch).
    """

    def __init__(self, n: int, num_samples: int | None = None, seed: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got n = {n}.")
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.num_samples = int(n if num_samples is None else num_samples)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        out: list[int] = []
        r = 0
        while len(out) < self.num_samples:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, r, 1))
                out.extend(torch.randperm(self.n, generator=g).tolist())
            else:
                out.extend(range(self.n))
            r += 1
        return out[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
