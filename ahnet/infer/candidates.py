"""Detection candidates from a foreground probability map, in world LPS millimetres (LUNA16 rows).

Two ways to turn a (z, y, x) probability map into scored points:
- "components": connected components (26-connectivity) of prob >= threshold; score = the component's maximum
  probability; centre = the probability-weighted centroid of the component's voxels.
- "maxima": voxels equal to the maximum of a box around them (half size ``min_distance_mm`` per axis, so
  anisotropic in voxels) and >= threshold; a plateau of equal maxima (26-connected) gives one candidate at its
  centroid; score = the maximum's probability.

Geometry follows SimpleITK: world (x, y, z) = origin + direction @ ((i, j, k) * (sx, sy, sz)), with (i, j, k) =
(x, y, z) voxel indices, i.e. the reverse of the array's (z, y, x) order: ahnet.data.io's conversion, used
here with input checks (the tests check it against SimpleITK).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data import io


class CandidateInputError(ValueError):
    """A probability map, geometry or option that candidate extraction cannot use."""


def _geom(spacing, origin, direction):
    sp = np.asarray(spacing, np.float64).reshape(-1)
    org = np.asarray(origin, np.float64).reshape(-1)
    d = np.asarray(direction, np.float64)
    if sp.size != 3 or (sp <= 0).any():
        raise CandidateInputError(f"spacing {spacing} must be three positive mm values (sz, sy, sx)")
    if org.size != 3:
        raise CandidateInputError(f"origin {origin} must be three world mm values (x, y, z)")
    if d.size != 9:
        raise CandidateInputError("direction must be a 3x3 matrix (or 9 values, row-major as SimpleITK gives)")
    return sp, org, d.reshape(3, 3)


def voxel_to_world(zyx, spacing, origin=(0, 0, 0), direction=np.eye(3)) -> np.ndarray:
    """(n, 3) continuous voxel coordinates (z, y, x) -> (n, 3) world LPS mm (x, y, z); checked inputs."""
    sp, org, d = _geom(spacing, origin, direction)
    return np.atleast_2d(io.voxel_to_world(zyx, sp, org, d))


def world_to_voxel(xyz, spacing, origin=(0, 0, 0), direction=np.eye(3)) -> np.ndarray:
    """(n, 3) world LPS mm (x, y, z) -> (n, 3) continuous voxel coordinates (z, y, x); checked inputs."""
    sp, org, d = _geom(spacing, origin, direction)
    return np.atleast_2d(io.world_to_voxel(xyz, sp, org, d))


def find_peaks(prob, spacing=(1, 1, 1), threshold: float = 0.5, method: str = "components",
               min_distance_mm: float = 5.0):
    """Scored points of a (z, y, x) probability map: (zyx (n, 3) float voxel coords, scores (n,), sizes (n,)).

    Sorted by score descending (ties by position). sizes = voxels per component (or per plateau).
    """
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 3:
        raise CandidateInputError(f"probability map has shape {prob.shape}; expected (z, y, x)")
    if not np.isfinite(prob).all():
        raise CandidateInputError("probability map holds NaN or inf; expected finite probabilities")
    sp = np.asarray(spacing, np.float64)
    full = ndimage.generate_binary_structure(3, 3)
    if method == "components":
        lab, n = ndimage.label(prob >= threshold, structure=full)
        if n == 0:
            return np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64)
        idx = np.arange(1, n + 1)
        scores = np.asarray(ndimage.maximum(prob, lab, idx), np.float64)
        # weights clipped at a tiny positive value so a component of zeros (threshold <= 0) still has a centre
        w = np.maximum(prob, np.float32(1e-12))
        zyx = np.array(ndimage.center_of_mass(w, lab, idx), np.float64).reshape(n, 3)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    elif method == "maxima":
        if min_distance_mm <= 0:
            raise CandidateInputError(f"min_distance_mm {min_distance_mm} must be > 0 for local maxima")
        half = np.floor(min_distance_mm / sp).astype(int)
        mx = ndimage.maximum_filter(prob, size=tuple(2 * half + 1), mode="constant", cval=-np.inf)
        peak = (prob == mx) & (prob >= threshold)
        lab, n = ndimage.label(peak, structure=full)
        if n == 0:
            return np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64)
        idx = np.arange(1, n + 1)
        scores = np.asarray(ndimage.maximum(prob, lab, idx), np.float64)
        zyx = np.array(ndimage.center_of_mass(peak.astype(np.float64), lab, idx), np.float64).reshape(n, 3)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    else:
        raise CandidateInputError(f"method {method!r} is not known; expected 'components' or 'maxima'")
    order = np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0], -scores))
    return zyx[order], scores[order], sizes[order]


def extract_candidates(prob, geometry=None, *, spacing=None, origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                       seriesuid: str = "", threshold: float = 0.5, method: str = "components",
                       min_distance_mm: float = 5.0, max_candidates: int | None = None) -> list:
    """LUNA16 candidate rows {seriesuid, coordX, coordY, coordZ, probability} (world LPS mm) from a map.

    prob: (z, y, x) foreground probabilities. geometry: an object with ``spacing`` (sz, sy, sx), ``origin``
    (x, y, z) and ``direction`` (3x3) such as ahnet.data.io.Volume, or pass spacing/origin/direction directly.
    max_candidates keeps the highest scores.
    """
    if geometry is not None:
        spacing, origin, direction = geometry.spacing, geometry.origin, geometry.direction
    if spacing is None:
        raise CandidateInputError("give a geometry (spacing, origin, direction) or spacing= in mm (sz, sy, sx)")
    _geom(spacing, origin, direction)
    zyx, scores, _ = find_peaks(prob, spacing, threshold, method, min_distance_mm)
    if max_candidates is not None:
        zyx, scores = zyx[:max_candidates], scores[:max_candidates]
    if geometry is not None and hasattr(geometry, "voxel_to_world"):
        xyz = np.asarray(geometry.voxel_to_world(zyx), np.float64).reshape(-1, 3)
    else:
        xyz = voxel_to_world(zyx, spacing, origin, direction).reshape(-1, 3)
    return [{"seriesuid": seriesuid, "coordX": float(x), "coordY": float(y), "coordZ": float(z),
             "probability": float(p)} for (x, y, z), p in zip(xyz, scores)]
