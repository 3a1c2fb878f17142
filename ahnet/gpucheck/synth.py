"""Chest-like synthetic cases written straight into the project's HDF5 cache format (ahnet.data.cache), for the
GPU check's training part: no source images, so no NIfTI / MHD readers and no LIDC shapes are needed.

A case (z, y, x) at spacing (sz, sy, sx) mm, intensities on the cache's [0, 1] scale (HU -1000..400): air 0,
a body ellipse of soft tissue (40 HU -> 0.74), two lungs (-850 HU -> 0.11), Gaussian noise, and nodules
inside the lungs: ellipsoids of 3-10 mm radius, solid (0 HU -> 0.71) or ground glass (-500 HU -> 0.36), each
its own label. Deterministic in the seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet.data.cache import write_case_file

AIR, LUNG, TISSUE, SOLID, GROUND_GLASS = 0.0, 0.107, 0.743, 0.714, 0.357


def _lungs(shape) -> np.ndarray:
    """Body (1) and lung (2) regions of a (z, y, x) grid: ellipses in-plane, the lungs tapering at both ends."""
    z, y, x = shape
    zz = np.linspace(-1, 1, z)[:, None, None]
    yy = np.linspace(-1, 1, y)[None, :, None]
    xx = np.linspace(-1, 1, x)[None, None, :]
    region = np.zeros(shape, np.uint8)
    region[np.broadcast_to((yy / 0.75) ** 2 + (xx / 0.92) ** 2 <= 1, shape)] = 1
    taper = np.sqrt(np.clip(1 - zz ** 2 / 1.1, 0.05, 1))
    for side in (-1, 1):
        lung = ((yy + 0.05) / (0.55 * taper)) ** 2 + ((xx - side * 0.42) / (0.33 * taper)) ** 2 <= 1
        region[lung] = 2
    return region


def _add_nodule(img, lab, region, k, spacing, rng) -> None:
    """Nodule k: an ellipsoid centred on a lung voxel, inside the lungs, solid or ground glass."""
    lung = np.argwhere(region == 2)
    c = lung[rng.integers(len(lung))]
    r_mm = rng.uniform(3.0, 10.0) * np.array([1.0, rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25)])
    half = np.ceil(r_mm / np.asarray(spacing)).astype(int)
    lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, img.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[(np.arange(a, b) - cc) * s / r for a, b, cc, s, r in zip(lo, hi, c, spacing, r_mm)],
                        indexing="ij")
    m = (sum(g ** 2 for g in grids) <= 1) & (region[box] == 2)
    value = SOLID if rng.random() < 0.7 else GROUND_GLASS
    img[box][m] = value + rng.normal(0, 0.02, int(m.sum()))
    lab[box][m] = k


def synthetic_case(shape: Sequence[int], spacing: Sequence[float], seed: int,
                   n_nodules: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (z, y, x) in [0, 1], label int16 instance mask) of one synthetic case."""
    rng = np.random.default_rng(seed)
    region = _lungs(tuple(shape))
    img = np.choose(region, (AIR, TISSUE, LUNG)).astype(np.float32)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    for k in range(1, n_nodules + 1):
        _add_nodule(img, lab, region, k, spacing, rng)
    return np.clip(img, 0, 1).astype(np.float32), lab


def write_cases(folder: Path, n: int, shape: Sequence[int], spacing: Sequence[float], seed: int,
                split: str) -> list[Path]:
    """n cases into folder/<split>_<i>.h5 (the cache format); returns their paths."""
    out = []
    for i in range(n):
        img, lab = synthetic_case(shape, spacing, seed + i, n_nodules=2 + i % 3)
        out.append(write_case_file(Path(folder) / f"{split}_{i:03d}.h5", img, lab, spacing, f"{split}_{i:03d}",
                                   split))
    return out
