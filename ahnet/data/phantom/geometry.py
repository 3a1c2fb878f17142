"""Geometry helpers of the phantom: tapered capsules painted into a label map, random directions, vessel trees.

Positions are (z, y, x) in mm from the fine grid's voxel (0, 0, 0); a grid is its spacing (dz, dy, dx) mm.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def paint_segments(label: np.ndarray, segs: Sequence[tuple], grid: Tuple[float, float, float], value: int,
                   allowed: Optional[np.ndarray] = None, wall: float = 0.0, wall_value: int = 0,
                   wall_allowed: Optional[np.ndarray] = None) -> None:
    """Paint tapered capsules (a_zyx_mm, b_zyx_mm, r0, r1) into label (in place), optionally with a wall.

    Distance of each voxel in the capsule's bounding box to the segment; inside where d < r(t).
    allowed: a lookup over tissue labels (bool array of length 256) of what may be overwritten.
    """
    dz, dy, dx = grid
    shp = label.shape
    for a, b, r0, r1 in segs:
        a = np.asarray(a, float)
        b = np.asarray(b, float)
        rmax = max(r0, r1) + wall
        lo = np.minimum(a, b) - rmax
        hi = np.maximum(a, b) + rmax
        i0 = np.maximum(np.floor(lo / (dz, dy, dx)).astype(int), 0)
        i1 = np.minimum(np.ceil(hi / (dz, dy, dx)).astype(int) + 1, shp)
        if np.any(i1 <= i0):
            continue
        zz = (np.arange(i0[0], i1[0]) * dz)[:, None, None] - a[0]
        yy = (np.arange(i0[1], i1[1]) * dy)[None, :, None] - a[1]
        xx = (np.arange(i0[2], i1[2]) * dx)[None, None, :] - a[2]
        v = b - a
        vv = float(v @ v) or 1e-9
        t = np.clip((zz * v[0] + yy * v[1] + xx * v[2]) / vv, 0.0, 1.0)
        d2 = (zz - t * v[0]) ** 2 + (yy - t * v[1]) ** 2 + (xx - t * v[2]) ** 2
        r = r0 + t * (r1 - r0)
        sub = label[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]]
        if wall > 0:
            m = d2 < (r + wall) ** 2
            if wall_allowed is not None:
                m &= wall_allowed[sub]
            sub[m & (d2 >= r * r)] = wall_value
        m = d2 < r * r
        if allowed is not None:
            m &= allowed[sub]
        sub[m] = value


def lut(*labels: int) -> np.ndarray:
    """A lookup over tissue labels (bool, length 256), True for the given labels."""
    out = np.zeros(256, bool)
    out[list(labels)] = True
    return out


def rand_unit(rng: np.random.Generator) -> np.ndarray:
    """A random unit vector (3,), uniform on the sphere."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def perturb(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector d by `angle` (rad) about a random perpendicular axis."""
    p = np.cross(d, rand_unit(rng))
    p /= np.linalg.norm(p) + 1e-12
    out = math.cos(angle) * d + math.sin(angle) * p
    return out / np.linalg.norm(out)


def grow_tree(rng, roots, inside, budget: int, r_min: float, length_factor: float = 7.0):
    """Branching tapering tree, breadth first. roots: [(start_zyx_mm, dir, radius)].

    Each segment of radius r has length ~ length_factor * r (+ 3 mm); it ends by splitting into a main
    branch (r * 0.8-0.9) and a side branch (r * 0.55-0.75) turned 25-60 degrees. Segments whose end leaves
    the region (inside(p) False) are retried in another direction, then dropped. Returns [(a, b, r0, r1)].
    """
    segs = []
    queue = list(roots)
    while queue and len(segs) < budget:
        p, d, r = queue.pop(0)
        if r < r_min:
            continue
        for _ in range(8):
            L = length_factor * r * rng.uniform(0.7, 1.3) + 3.0
            r_end = r * rng.uniform(0.85, 0.95)
            q = p + d * L
            if inside(q):
                break
            d = perturb(d, rng.uniform(0.4, 1.2), rng)
        else:
            continue
        segs.append((p, q, r, r_end))
        main_d = perturb(d, rng.uniform(0.1, 0.4), rng)
        side_d = perturb(d, rng.uniform(0.45, 1.05), rng)
        queue.append((q, main_d, r_end * rng.uniform(0.82, 0.92)))
        queue.append((q, side_d, r_end * rng.uniform(0.55, 0.75)))
    return segs
