"""Preprocessing: HU clip and scale, and resampling to a target spacing (in-plane only unless asked).

The resampled grid keeps voxel (0, 0, 0)'s centre at the same world point (origin unchanged) and the same
direction; the new spacing is exactly the target, and the new size is round(old_size * old_spacing / target).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ahnet.data.io import DataError, Volume

HU_MIN, HU_MAX = -1000.0, 400.0
#: the most voxels a resampled volume may have (2^30: 4 GiB as float32); more is a wrong target spacing
MAX_VOXELS = 2 ** 30


HU_SPAN = HU_MAX - HU_MIN            # HU per unit of the scaled image (a difference of scaled values times this)


def scaled_from_hu(hu):
    """An HU value (float or array) on clip_and_scale's default [0, 1] scale, unclipped: HU_MIN -> 0, HU_MAX -> 1."""
    return (hu - HU_MIN) / HU_SPAN


def hu_from_scaled(x):
    """A value (float or array) of the scaled image back in HU: the inverse of scaled_from_hu."""
    return HU_MIN + x * HU_SPAN


def clip_and_scale(hu: np.ndarray, lo: float = HU_MIN, hi: float = HU_MAX) -> np.ndarray:
    """HU array -> float32 clipped to [lo, hi] and mapped linearly to [0, 1] (lo -> 0, hi -> 1)."""
    a = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def target_grid(shape, spacing, target_spacing):
    """New (shape, spacing) for target_spacing (sz, sy, sx); an entry None keeps that axis as it is.

    A 2-tuple (sy, sx) means in-plane only (z kept).
    """
    t = list(target_spacing)
    if len(t) == 2:
        t = [None] + t
    if len(t) != 3:
        raise ValueError(f"target_spacing {target_spacing}: expected (sy, sx) or (sz, sy, sx) in mm.")
    if any(ts is not None and not (isinstance(ts, (int, float)) and math.isfinite(ts) and ts > 0) for ts in t):
        raise ValueError(f"target_spacing {list(target_spacing)}: expected finite values > 0 mm.")
    new_shape, new_spacing = [], []
    for n, s, ts in zip(shape, spacing, t):
        if ts is None or np.isclose(ts, s, rtol=1e-6):
            new_shape.append(int(n))
            new_spacing.append(float(s))
        else:
            new_shape.append(max(1, int(round(n * s / ts))))
            new_spacing.append(float(ts))
    voxels = math.prod(new_shape)
    if voxels > MAX_VOXELS:
        raise ValueError(f"target_spacing {list(target_spacing)} mm turns a {tuple(shape)} volume of spacing "
                         f"{tuple(round(float(v), 4) for v in spacing)} mm into {tuple(new_shape)} = {voxels:.3g} "
                         f"voxels (at most {MAX_VOXELS:.3g}); use a coarser spacing.")
    return tuple(new_shape), tuple(new_spacing)


def resample(vol: Volume, target_spacing, order: int = 1) -> Volume:
    """Resample a Volume to target_spacing ((sy, sx) in-plane only, or (sz, sy, sx) with None = keep).

    order=1 (linear) for images, order=0 (nearest) for label masks (dtype kept). Samples outside the old grid
    take the nearest edge value. Returns a new Volume with the same origin and direction.
    """
    new_shape, new_spacing = target_grid(vol.shape, vol.spacing, target_spacing)
    return resample_onto(vol, new_shape, new_spacing, order)


def resample_onto(vol: Volume, shape, spacing, order: int = 1) -> Volume:
    """``vol`` sampled on the grid of ``shape`` (z, y, x) and ``spacing`` (sz, sy, sx) mm that shares its origin
    (voxel 0's centre) and direction: new index i lies at old index i * spacing / vol.spacing. The way back from a
    resampled grid to the scan's own (a probability map predicted at another spacing). order 0 (nearest, dtype kept)
    or 1 (linear, float32); outside the old grid the nearest edge value. The same grid returns the array as it is."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"resample_onto: shape {shape} and spacing {spacing} must be 3 sizes >= 1 and 3 values > 0 mm")
    if shape == vol.shape and np.allclose(spacing, vol.spacing, rtol=1e-6, atol=0.0):
        return Volume(vol.array, vol.spacing, vol.origin, vol.direction)
    scale = np.asarray(spacing) / np.asarray(vol.spacing)  # old index per new index
    src = vol.array
    if order == 0:
        out = np.empty(shape, dtype=src.dtype)
        idx = [np.clip(np.rint(np.arange(n) * f), 0, m - 1).astype(np.intp)
               for n, f, m in zip(shape, scale, src.shape)]
        out[...] = src[np.ix_(*idx)]
    else:
        a = src.astype(np.float32, copy=False)
        out = ndimage.affine_transform(a, scale, offset=0.0, output_shape=shape, order=order,
                                       mode="nearest", prefilter=order > 1).astype(np.float32)
    return Volume(out, spacing, vol.origin, vol.direction)


def check_label(label: np.ndarray, path) -> np.ndarray:
    """An instance mask must be integer-valued and >= 0; returns it as int16."""
    a = np.asarray(label)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise DataError(f"{path}: mask has non-integer values; expected an integer instance mask.")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int16).max):
        raise DataError(f"{path}: mask values span [{a.min()}, {a.max()}]; expected labels in [0, 32767].")
    return a.astype(np.int16)
