"""One case: anatomy -> nodules (shape, placement, composition) -> acquisition -> instance mask -> CSV rows.

Acquisition: each output slice is the mean of its k fine slices (box slice profile, contiguous slices), a
Gaussian in-plane PSF (sigma 0.5 px), correlated noise (white noise blurred in-plane, sigma 0.8 px, scaled to a
std drawn per case), rounded to integer HU in [-1024, 3071]. The output mask keeps a voxel for a nodule when at
least half of its fine voxels belong to it.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..nodule_types import TYPE_CODES, nodule_type, volume_equivalent_diameter
from .anatomy import Anatomy
from .constants import LOCATIONS, NODULE
from .options import Case, PhantomOptions
from .placement import LUNG_LIKE, place
from .shapes import ShapePool, composition_hu, get_pool, procedural_shape

log = logging.getLogger(__name__)


def _draw_shape(rng, pool, split: str, code: str, d_max: float, grid):
    """(mask, ratings, LIDC scan id or "") from the pool, else a procedural shape of the type."""
    got = pool.draw(rng, split, code, d_max, grid) if isinstance(pool, ShapePool) else None
    if got is None:
        m, ratings = procedural_shape(rng, code, d_max, grid)
        return m, ratings, ""
    return got


def _paint_nodule(rng, anat: Anatomy, inst: np.ndarray, m: np.ndarray, c0, label: int, ratings: dict) -> dict:
    """Paint mask m at corner c0 over lung tissue only (tissue, HU, instance); returns its record."""
    sl = tuple(slice(c, c + s) for c, s in zip(c0, m.shape))
    mm = m & LUNG_LIKE[anat.lab[sl]]
    vol = float(mm.sum()) * float(np.prod(anat.grid))
    d = volume_equivalent_diameter(vol)
    calcified = int(ratings["calcification"]) != 6
    code = nodule_type(d, ratings["texture"], ratings["spiculation"], ratings["lobulation"], calcified)
    nhu = composition_hu(rng, mm, code, ratings, anat.grid)
    anat.hu[sl][mm] = nhu[mm]
    anat.lab[sl][mm] = NODULE
    inst[sl][mm] = label
    return dict(label=label, type=code, volume_mm3=vol, diameter_mm=d, ratings=ratings)


def _insert_nodules(rng, anat: Anatomy, inst: np.ndarray, types, locations, split: str, pool,
                    case_id: str) -> List[dict]:
    """Draw, place and paint one nodule per (type, location); a nodule that cannot be placed is skipped."""
    a_lung = min(min(l[2], l[3]) for l in anat.lungs)
    d_max = max(6.5, 1.1 * a_lung)
    nodules = []
    for j, (code, loc) in enumerate(zip(types, locations)):
        placed = None
        for attempt in range(4):
            m, ratings, scan_id = _draw_shape(rng, pool, split, code, d_max, anat.grid)
            if all(s % 2 == 1 for s in m.shape) and m.any():
                placed = place(rng, anat, anat.lab, inst, m, loc)
            if placed:
                break
        if not placed:
            log.warning("%s: could not place nodule %d (%s, %s); skipped", case_id, j + 1, code, loc)
            continue
        c0, where = placed
        nd = _paint_nodule(rng, anat, inst, m, c0, len(nodules) + 1, ratings)
        nd.update(location=where, lidc_scan_id=scan_id)
        nodules.append(nd)
    return nodules


def acquire(rng, opts: PhantomOptions, anat: Anatomy):
    """Thick-slice image (slices, size, size) float32 HU from the fine HU; returns (image, noise std)."""
    hu = anat.hu
    img = hu.reshape(opts.slices, anat.k, *hu.shape[1:]).mean(1)
    img = ndi.gaussian_filter(img, sigma=(0, 0.5, 0.5), mode="nearest")
    lo, hi = opts.noise
    noise_std = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    if noise_std > 0:
        wn = rng.normal(0, 1, size=img.shape).astype(np.float32)
        wn = ndi.gaussian_filter(wn, sigma=(0, 0.8, 0.8), mode="wrap")
        img += wn * (noise_std / max(float(wn.std()), 1e-6))
    return np.clip(np.round(img), -1024, 3071).astype(np.float32), noise_std


def output_label(inst: np.ndarray, nodules: Sequence[dict], slices: int, k: int) -> np.ndarray:
    """Instance mask on the output grid: a voxel belongs to a nodule when >= half its fine voxels do (at least
    the voxels of largest fraction, so that no nodule vanishes); the earlier nodule wins a tie."""
    label = np.zeros((slices,) + inst.shape[1:], np.int16)
    for nd in nodules:
        frac = (inst == nd["label"]).reshape(slices, k, *inst.shape[1:]).mean(1)
        on = frac >= 0.5
        if not on.any():
            on = frac >= frac.max()
        label[on & (label == 0)] = nd["label"]
    return label


def annotation_row(case: Case, nd: dict) -> dict:
    """The annotations-CSV row of one nodule: centre = mask centroid (the nearest mask voxel if the centroid
    falls outside a concave mask), world LPS mm."""
    idx = np.argwhere(case.label == nd["label"])
    cen = idx.mean(0)
    ci = np.round(cen).astype(int)
    if case.label[tuple(ci)] != nd["label"]:
        ci = idx[np.argmin(((idx - cen) ** 2).sum(1))]
        cen = ci.astype(float)
    x, y, z = case.voxel_to_world(cen)[0]
    r = nd["ratings"]
    return dict(seriesuid=case.case_id, coordX=round(float(x), 3), coordY=round(float(y), 3),
                coordZ=round(float(z), 3), diameter_mm=round(nd["diameter_mm"], 3),
                type=nd["type"], location=nd["location"], label=nd["label"],
                volume_mm3=round(nd["volume_mm3"], 2), texture=r["texture"],
                spiculation=r["spiculation"], lobulation=r["lobulation"],
                calcification=r["calcification"], subtlety=r["subtlety"],
                lidc_scan_id=nd["lidc_scan_id"])


def generate_case(case_id: str, seed, opts: Optional[PhantomOptions] = None, n_nodules: Optional[int] = None,
                  types: Optional[Sequence[str]] = None, locations: Optional[Sequence[str]] = None,
                  split: str = "train", pool: Optional[object] = None) -> Case:
    """Build one case, deterministic in (seed, options, n_nodules, types, locations, split).

    seed: int or sequence of ints (numpy SeedSequence entropy). types / locations: per nodule (defaults:
    uniform random). Returns a Case (image, label, nodules as annotation rows, and the fine-grid maps).
    """
    opts = opts or PhantomOptions()
    opts.validate()
    rng = np.random.default_rng(seed)
    anat = Anatomy(opts, rng)
    inst = np.zeros(anat.shape, np.int16)
    if n_nodules is None:
        n_nodules = int(rng.integers(opts.nodules_per_case[0], opts.nodules_per_case[1] + 1))
    if types is None:
        types = [TYPE_CODES[int(rng.integers(12))] for _ in range(n_nodules)]
    if locations is None:
        locations = [LOCATIONS[int(rng.integers(4))] for _ in range(n_nodules)]
    if opts.shapes == "lidc" and pool is None:
        pool = get_pool(opts.spacing)
    nodules = _insert_nodules(rng, anat, inst, types, locations, split, pool, case_id)
    img, noise_std = acquire(rng, opts, anat)
    label = output_label(inst, nodules, opts.slices, anat.k)
    sz, sp = opts.thickness, opts.spacing
    origin = (-(opts.size - 1) / 2 * sp, -(opts.size - 1) / 2 * sp, -(opts.slices - 1) / 2 * sz)
    case = Case(case_id, img, label, (sz, sp, sp), origin, [], anat.lab, anat.hu, anat.dz, noise_std,
                anat.vessels)
    case.nodules = [annotation_row(case, nd) for nd in nodules]
    return case
