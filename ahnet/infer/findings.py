"""Candidates as findings a person reads: ranked by probability, each with its voxel centre and an estimated
diameter in mm (the DICOM SR's measurement and the overview picture's circles; ahnet.infer.scans).

The diameter is that of the sphere with the volume of the candidate's half-maximum region: the 26-connected
voxels with probability >= half the seed's, grown from the seed (the most probable voxel within one voxel of the
rounded centre) inside a box of +-``REGION_HALF_MM`` (20 mm) around it, so a nodule up to 40 mm is measured
whole. It is the probability map's own size of the finding, like the support region that centres a candidate
(ahnet.infer.candidates), and does not depend on the mask's threshold.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ahnet.infer.candidates import REGION_HALF_MM, world_to_voxel

_CONNECT26 = np.ones((3, 3, 3), dtype=bool)


def _seed(prob: np.ndarray, centre_zyx) -> tuple:
    """The most probable voxel (z, y, x) within one voxel of the rounded centre (clipped into the volume)."""
    shape = np.asarray(prob.shape)
    c = np.clip(np.rint(np.asarray(centre_zyx, float)).astype(int), 0, shape - 1)
    lo, hi = np.maximum(c - 1, 0), np.minimum(c + 2, shape)
    sub = prob[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return tuple(int(v) for v in lo + np.unravel_index(int(np.argmax(sub)), sub.shape))


def equivalent_diameter_mm(prob: np.ndarray, spacing, centre_zyx, half_mm: float = REGION_HALF_MM) -> float:
    """Estimated diameter (mm) of the finding at ``centre_zyx`` (fractional voxel, z y x) of a (z, y, x)
    probability map with ``spacing`` (sz, sy, sx) mm: (6 V / pi)^(1/3), V the volume of its half-maximum
    region (module docstring). 0.0 when the seed's probability is 0."""
    sp = np.asarray(spacing, float).reshape(3)
    seed = _seed(prob, centre_zyx)
    peak = float(prob[seed])
    if not peak > 0.0:
        return 0.0
    half = np.ceil(half_mm / sp).astype(int)
    lo = np.maximum(np.asarray(seed) - half, 0)
    hi = np.minimum(np.asarray(seed) + half + 1, prob.shape)
    region = prob[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] >= 0.5 * peak
    labels, _ = ndimage.label(region, structure=_CONNECT26)
    n = int(np.count_nonzero(labels == labels[tuple(np.asarray(seed) - lo)]))
    return float((6.0 * n * float(np.prod(sp)) / math.pi) ** (1.0 / 3.0))


def rank_candidates(rows: list, geometry) -> list:
    """One scan's candidate rows in descending probability (ties keep their order), each a copy with ``rank``
    (1 = most probable) and ``centre_zyx`` (fractional voxel by the scan's ``geometry``: spacing, origin,
    direction)."""
    order = sorted(range(len(rows)), key=lambda i: -float(rows[i]["probability"]))
    out = []
    if not rows:
        return out
    xyz = np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rows])
    zyx = world_to_voxel(xyz, geometry.spacing, geometry.origin, geometry.direction)
    for rank, i in enumerate(order, start=1):
        out.append(dict(rows[i], rank=rank, centre_zyx=[float(v) for v in zyx[i]]))
    return out


def add_diameters(findings: list, prob: np.ndarray, spacing) -> list:
    """Set ``diameter_mm`` (equivalent_diameter_mm) on each finding of rank_candidates; returns them."""
    for f in findings:
        f["diameter_mm"] = equivalent_diameter_mm(prob, spacing, f["centre_zyx"])
    return findings
