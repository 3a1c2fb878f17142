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

from ahnet.data.nodule_types import TYPE_CODES, nodule_type, volume_equivalent_diameter
from ahnet.data.phantom.anatomy import Anatomy
from ahnet.data.phantom.constants import LOCATIONS, NODULE, PROC_D
from ahnet.data.phantom.options import Case, PhantomOptions
from ahnet.data.phantom.placement import LUNG_LIKE, footprint, place
from ahnet.data.phantom.shapes import ShapePool, composition_hu, get_pool, procedural_shape

log = logging.getLogger(__name__)


def _draw_shape(rng, pool, split: str, code: str, d_max: float, grid):
    """(mask, ratings, LIDC scan id, annotation id) from the pool, else a procedural shape ("", "")."""
    got = pool.draw(rng, split, code, d_max, grid) if isinstance(pool, ShapePool) else None
    if got is None:
        m, ratings = procedural_shape(rng, code, d_max, grid)
        return m, ratings, "", ""
    return got


def painted_type(anat: Anatomy, m: np.ndarray, c0, ratings: dict):
    """The type code a mask placed at corner c0 gets once painted over lung tissue only."""
    return _painted(anat, m, c0, ratings)[0]


def _painted(anat: Anatomy, m: np.ndarray, c0, ratings: dict):
    """(type code, slices of the box, mask over lung tissue, volume mm3, diameter mm) of mask m at corner c0."""
    sl = tuple(slice(c, c + s) for c, s in zip(c0, m.shape))
    mm = m & LUNG_LIKE[anat.lab[sl]]
    vol = float(mm.sum()) * float(np.prod(anat.grid))
    d = volume_equivalent_diameter(vol)
    calcified = int(ratings["calcification"]) != 6
    code = nodule_type(d, ratings["texture"], ratings["spiculation"], ratings["lobulation"], calcified)
    return code, sl, mm, vol, d


def _paint_nodule(rng, anat: Anatomy, inst: np.ndarray, m: np.ndarray, c0, label: int, ratings: dict) -> dict:
    """Paint mask m at corner c0 over lung tissue only (tissue, HU, instance); returns its record."""
    code, sl, mm, vol, d = _painted(anat, m, c0, ratings)
    nhu = composition_hu(rng, mm, code, ratings, anat.grid)
    anat.hu[sl][mm] = nhu[mm]
    anat.lab[sl][mm] = NODULE
    inst[sl][mm] = label
    return dict(label=label, type=code, volume_mm3=vol, diameter_mm=d, ratings=ratings)


def _insert_nodules(rng, anat: Anatomy, inst: np.ndarray, types, locations, split: str, pool,
                    case_id: str) -> List[dict]:
    """Draw, place and paint one nodule per (type, location); a nodule that cannot be placed is skipped."""
    d_max = anat.largest_nodule_mm()
    nodules, others = [], []
    for j, (code, loc) in enumerate(zip(types, locations)):
        placed = None
        for attempt in range(4):
            m, ratings, scan_id, ann_id = _draw_shape(rng, pool, split, code, d_max, anat.grid)
            if all(s % 2 == 1 for s in m.shape) and m.any():
                placed = place(rng, anat, anat.lab, inst, m, loc, others=others)
            if placed:
                break
        if not placed:
            log.warning("%s: could not place nodule %d (%s, %s); skipped", case_id, j + 1, code, loc)
            continue
        c0, where = placed
        nd = _paint_nodule(rng, anat, inst, m, c0, len(nodules) + 1, ratings)
        nd.update(location=where, lidc_scan_id=scan_id, lidc_annotation_id=ann_id, shape_reuse=0)
        nodules.append(nd)
        centre, radius = footprint(m, anat.grid)
        others.append((np.asarray(c0) * anat.grid + centre, radius))
    return nodules


# exact mode: attempts per nodule, by source (the scheduled one as drawn, then reused, then another lesion)
EXACT_ATTEMPTS = (("scheduled", 1), ("scheduled-reused", 5), ("substitute", 14))


def _exact_shape(rng, pool, source, code: str, split: str, kind: str, d_max: float, grid):
    """(mask, ratings, scan id, annotation id, reused) for one exact-mode attempt."""
    if source is None:                                   # procedural shapes: a new one each attempt
        m, ratings = procedural_shape(rng, code, d_max, grid)
        return m, ratings, "", "", False
    ann_id, reuse = source
    if kind == "substitute":
        ids = pool.eligible(split, code, d_max)
        ann_id, reuse = ids[int(rng.integers(len(ids)))], True
    elif kind == "scheduled-reused":
        reuse = True
    m, ratings, scan_id = pool.source(rng, ann_id, grid, augment=reuse)
    return m, ratings, scan_id, ann_id, reuse


def _insert_exact(rng, anat: Anatomy, inst: np.ndarray, types, locations, sources, split: str, pool,
                  case_id: str) -> List[dict]:
    """Like _insert_nodules, but each nodule comes out with its scheduled type and location class: a draw
    whose placement or painted type misses is repeated (EXACT_ATTEMPTS); RuntimeError if none succeeds."""
    d_max = anat.largest_nodule_mm()
    nodules, others = [], []
    size = [PROC_D[t][1] if s is None else pool.db.annotations[s[0]].diameter_mm
            for t, s in zip(types, sources)]
    for j in sorted(range(len(types)), key=lambda i: -size[i]):          # the largest first: they need room
        code, loc, source = types[j], locations[j], sources[j]
        done, draws = None, 0
        for kind, n in EXACT_ATTEMPTS:
            for _ in range(n):
                draws += 1
                m, ratings, scan_id, ann_id, reuse = _exact_shape(rng, pool, source, code, split, kind, d_max,
                                                                  anat.grid)
                placed = place(rng, anat, anat.lab, inst, m, loc, fallback=False, others=others) \
                    if all(s % 2 == 1 for s in m.shape) and m.any() else None
                if placed and painted_type(anat, m, placed[0], ratings) == code:
                    done = (m, ratings, scan_id, ann_id, reuse, placed[0])
                    break
            if done:
                break
        if not done:
            raise RuntimeError(f"{case_id}: could not place nodule {j + 1} as {code}, {loc} in "
                               f"{sum(n for _, n in EXACT_ATTEMPTS)} draws")
        m, ratings, scan_id, ann_id, reuse, c0 = done
        log.debug("%s: %s %s placed at draw %d (%s)", case_id, code, loc, draws, kind)
        nd = _paint_nodule(rng, anat, inst, m, c0, len(nodules) + 1, ratings)
        nd.update(location=loc, lidc_scan_id=scan_id, lidc_annotation_id=ann_id, shape_reuse=int(reuse))
        nodules.append(nd)
        centre, radius = footprint(m, anat.grid)
        others.append((np.asarray(c0) * anat.grid + centre, radius))
    return nodules


def acquire(rng, opts: PhantomOptions, anat: Anatomy):
    """Thick-slice image (slices, size, size) float32 HU from the fine HU; returns (image, noise std, PSF sigma).

    The PSF blurs the anatomy, not the noise (a reconstruction kernel's edge, the noise texture kept). A
    psf_sigma range is drawn per scan after the noise, so a phantom with a range holds the same anatomy,
    nodules and noise as one with a fixed sigma: only each scan's kernel differs."""
    hu = anat.hu
    img = hu.reshape(opts.slices, anat.k, *hu.shape[1:]).mean(1)
    lo, hi = opts.noise
    noise_std = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    texture = None
    if noise_std > 0:
        wn = rng.normal(0, 1, size=img.shape).astype(np.float32)
        wn = ndi.gaussian_filter(wn, sigma=(0, 0.8, 0.8), mode="wrap")
        texture = wn * (noise_std / max(float(wn.std()), 1e-6))
    psf = opts.psf_sigma
    if isinstance(psf, tuple):
        psf = float(rng.uniform(*psf))
    if psf > 0:
        img = ndi.gaussian_filter(img, sigma=(0, psf, psf), mode="nearest")
    if texture is not None:
        img += texture
    return np.clip(np.round(img + opts.hu_offset), -1024, 3071).astype(np.float32), noise_std, float(psf)


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
                lidc_scan_id=nd["lidc_scan_id"], lidc_annotation_id=nd["lidc_annotation_id"],
                shape_reuse=nd["shape_reuse"])


def generate_case(case_id: str, seed, opts: Optional[PhantomOptions] = None, n_nodules: Optional[int] = None,
                  types: Optional[Sequence[str]] = None, locations: Optional[Sequence[str]] = None,
                  split: str = "train", pool: Optional[object] = None,
                  sources: Optional[Sequence] = None) -> Case:
    """Build one case, deterministic in (seed, options, n_nodules, types, locations, split, sources).

    seed: int or sequence of ints (numpy SeedSequence entropy). types / locations: per nodule (defaults:
    uniform random). opts.exact: every nodule comes out as its type and location (sources: per nodule a
    (LIDC annotation id, reuse) or None; default: a random eligible annotation of the split, as drawn).
    Returns a Case (image, label, nodules as annotation rows, and the fine-grid maps).
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
    if opts.exact:
        pool = pool if isinstance(pool, ShapePool) else None
        if sources is None:
            sources = [_random_source(rng, pool, split, t, anat.largest_nodule_mm()) for t in types]
        nodules = _insert_exact(rng, anat, inst, types, locations, sources, split, pool, case_id)
    else:
        nodules = _insert_nodules(rng, anat, inst, types, locations, split, pool, case_id)
    img, noise_std, psf = acquire(rng, opts, anat)
    label = output_label(inst, nodules, opts.slices, anat.k)
    sz, sp = opts.thickness, opts.spacing
    origin = (-(opts.size - 1) / 2 * sp, -(opts.size - 1) / 2 * sp, -(opts.slices - 1) / 2 * sz)
    case = Case(case_id, img, label, (sz, sp, sp), origin, [], anat.lab, anat.hu, anat.dz, noise_std,
                anat.vessels, psf)
    case.nodules = [annotation_row(case, nd) for nd in nodules]
    return case


def _random_source(rng, pool, split: str, code: str, d_max: float):
    """A random eligible annotation of the split and type, used as drawn; None without a pool."""
    if pool is None:
        return None
    ids = pool.eligible(split, code, d_max)
    if not ids:
        raise ValueError(f"no LIDC annotation of type {code} in the {split} split fits lungs of this size "
                         f"(largest nodule {d_max:.1f} mm): use a larger size or spacing")
    return ids[int(rng.integers(len(ids)))], False
