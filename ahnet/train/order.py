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

    Data-parallel training (``world_size`` > 1): ``batch_size`` is the global batch B (patches per optimiser
    step over all ranks). Step k's global batch is ``order[k*B:(k+1)*B]``; rank r yields its slice
    ``[r*b, (r+1)*b)`` of it, b = B / world_size. So N ranks with batches of b see exactly the patches that one
    process with batches of B sees, in the same steps. ``start`` is then a step boundary (a multiple of B).
    """

    def __init__(self, n: int, num_samples: int | None = None, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got n = {n}.")
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.num_samples = int(n if num_samples is None else num_samples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size or 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"EpochSampler: rank {rank} outside 0 .. world_size - 1 = {world_size - 1}.")
        if self.world_size > 1 and (self.batch_size % self.world_size or self.num_samples % self.batch_size):
            raise ValueError(f"EpochSampler: the global batch {self.batch_size} must divide by world_size "
                             f"{self.world_size}, and num_samples {self.num_samples} by the batch.")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.world_size > 1 and start % self.batch_size:
            raise ValueError(f"EpochSampler: a sharded epoch resumes at a step boundary (a multiple of "
                             f"{self.batch_size}), got start {start}.")
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        """The epoch's global order (every rank's samples), all ``num_samples`` of it."""
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
        rest = self.order()[self.start:]
        if self.world_size == 1:
            return iter(rest)
        b = self.batch_size // self.world_size
        lo = self.rank * b
        return iter([i for k in range(0, len(rest), self.batch_size) for i in rest[k + lo: k + lo + b]])

    def __len__(self) -> int:
        rest = max(0, self.num_samples - self.start)
        return rest if self.world_size == 1 else rest // self.world_size
