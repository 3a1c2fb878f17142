"""Detection candidates from a foreground probability map, in world LPS millimetres (LUNA16 rows).

Three rules turn a (z, y, x) probability map into scored points (``CandidateRule``; ``DEFAULT_RULE`` is the one
evaluate, predict and the experiment use, chosen by measurement on three models: paper_notes/candidates.md):
- "nms" (the default, merging at the threshold): local maxima (a voxel >= its 26 neighbours; a 26-connected
  plateau of equal maxima is one peak at its centroid) with probability >= ``threshold``, then greedy
  non-maximum suppression in world mm: in descending score, a peak is kept unless it lies within
  ``min_distance_mm`` (Euclidean, with the voxel spacing, so anisotropic voxels are measured right) of a kept
  one. ``merge_fraction`` (None = off) adds size-aware merging: a peak is dropped too, however far, when it
  lies in the region of a stronger kept peak, the 26-connected voxels with prob >= max(threshold,
  merge_fraction x its score) reached from it inside a box of ``REGION_HALF_MM`` around it (so a blob or a
  vessel gives one candidate, and two blobs joined only below that level stay two). Each kept peak's centre
  is then refined to sub-voxel precision: the probability-weighted centroid of its support region (grown the
  same way at ``refine_fraction`` x its score, with the regions of its merged peaks that reach that level: an
  irregular nodule split into two lobes is centred on both), without the voxels closer (in mm) to another
  candidate's peaks.
  Score = the peak's probability. A symmetric blob centred between two slices gets its centre exactly.
- "components": connected components (26-connectivity) of prob >= threshold; score = the component's maximum
  probability; centre = the probability-weighted centroid of the component's voxels.
- "maxima": voxels equal to the maximum of a box around them (half size ``min_distance_mm`` per axis, so
  anisotropic in voxels) and >= threshold; a plateau of equal maxima (26-connected) gives one candidate at its
  centroid; score = the maximum's probability.
``max_candidates`` keeps the highest scores of a scan (None: all).

Geometry follows SimpleITK: world (x, y, z) = origin + direction @ ((i, j, k) * (sx, sy, sz)), with (i, j, k) =
(x, y, z) voxel indices, i.e. the reverse of the array's (z, y, x) order: ahnet.data.io's conversion, used
here with input checks (the tests check it against SimpleITK).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ahnet.data import io

METHODS = ("nms", "components", "maxima")
REGION_HALF_MM = 20.0     # half size of the box in which a peak's support region is grown (a 40 mm nodule fits)


class CandidateInputError(ValueError):
    """A probability map, geometry or option that candidate extraction cannot use."""


@dataclass(frozen=True)
class CandidateRule:
    """How a probability map becomes candidates (module docstring): method, the lowest score kept, the NMS
    distance (mm), the per-scan cap, the support fraction of the sub-voxel centre and of size-aware merging."""
    method: str = "nms"
    threshold: float = 0.02
    min_distance_mm: float = 5.0
    max_candidates: int | None = 50
    refine_fraction: float = 0.5
    merge_fraction: float | None = 0.0      # 0: merge peaks joined above the threshold

    def check(self) -> "CandidateRule":
        """The rule itself, or CandidateInputError naming the first bad field."""
        if self.method not in METHODS:
            raise CandidateInputError(f"candidate method {self.method!r} is not known; expected one of "
                                      f"{', '.join(METHODS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise CandidateInputError(f"candidate threshold {self.threshold} (--candidate-threshold) must be a "
                                      f"probability in [0, 1]")
        if self.method != "components" and not self.min_distance_mm > 0:
            raise CandidateInputError(f"min_distance_mm {self.min_distance_mm} must be > 0 for {self.method}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise CandidateInputError(f"max_candidates {self.max_candidates} must be >= 1 (or None for all; "
                                      f"--max-candidates 0)")
        if not 0.0 < self.refine_fraction <= 1.0:
            raise CandidateInputError(f"refine_fraction {self.refine_fraction} must be in (0, 1]")
        if self.merge_fraction is not None and not 0.0 <= self.merge_fraction <= 1.0:
            raise CandidateInputError(f"merge_fraction {self.merge_fraction} must be in [0, 1] (or None: no merging)")
        return self

    def describe(self) -> str:
        """One line for reports and logs."""
        cap = "all" if self.max_candidates is None else f"at most {self.max_candidates}"
        if self.method == "components":
            return f"connected components of p >= {self.threshold:g}, {cap} per scan"
        if self.method == "maxima":
            return (f"box maxima (half size {self.min_distance_mm:g} mm) with p >= {self.threshold:g}, "
                    f"{cap} per scan")
        merge = ("" if self.merge_fraction is None else ", merging peaks joined above the threshold"
                 if self.merge_fraction == 0 else f", merging peaks joined above {self.merge_fraction:g} x peak")
        return (f"local maxima with p >= {self.threshold:g}, NMS {self.min_distance_mm:g} mm{merge}, centre = "
                f"weighted centroid of p >= {self.refine_fraction:g} x peak, {cap} per scan")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_RULE = CandidateRule()


def candidate_rule(rule: CandidateRule | None = None, **fields) -> CandidateRule:
    """``rule`` (default DEFAULT_RULE) with ``fields`` replaced, checked."""
    base = DEFAULT_RULE if rule is None else rule
    unknown = sorted(set(fields) - set(base.to_dict()))
    if unknown:
        raise CandidateInputError(f"unknown candidate option {unknown[0]!r}; expected "
                                  f"{', '.join(base.to_dict())}")
    return replace(base, **fields).check()


def add_candidate_arguments(parser) -> None:
    """The candidate rule's flags (defaults: DEFAULT_RULE), shared by every command that writes candidates."""
    d = DEFAULT_RULE
    parser.add_argument("--candidates", choices=METHODS, default=d.method,
                        help=f"candidate rule (ahnet.infer.candidates; default {d.method}: {d.describe()})")
    parser.add_argument("--candidate-threshold", type=float, default=d.threshold,
                        help=f"lowest probability a candidate may have (default {d.threshold:g})")
    parser.add_argument("--min-distance-mm", type=float, default=d.min_distance_mm,
                        help=f"nms: suppression distance; maxima: box half size, mm (default {d.min_distance_mm:g})")
    parser.add_argument("--max-candidates", type=int, default=d.max_candidates,
                        help=f"candidates kept per scan, highest scores first; 0 = all (default {d.max_candidates})")


def rule_from_arguments(args) -> CandidateRule:
    """The checked CandidateRule of parsed add_candidate_arguments flags (CandidateInputError names a bad one)."""
    return candidate_rule(method=args.candidates, threshold=args.candidate_threshold,
                          min_distance_mm=args.min_distance_mm,
                          max_candidates=None if args.max_candidates == 0 else args.max_candidates)


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


_FULL = ndimage.generate_binary_structure(3, 3)     # 26-connectivity


def _empty():
    return np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64)


def _groups(prob, mask):
    """26-connected groups of ``mask``: (centroids (n, 3) voxel zyx, max scores (n,), sizes (n,), the voxel of
    each group's maximum (n, 3) int) or None when there is none; centroids weighted by ``mask`` values."""
    lab, n = ndimage.label(mask, structure=_FULL)
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    scores = np.asarray(ndimage.maximum(prob, lab, idx), np.float64)
    zyx = np.array(ndimage.center_of_mass(mask, lab, idx), np.float64).reshape(n, 3)
    seeds = np.array(ndimage.maximum_position(prob, lab, idx), np.int64).reshape(n, 3)
    return zyx, scores, np.bincount(lab.ravel(), minlength=n + 1)[1:], seeds


#: slices per step of the scan-wide filters of the "nms" rule: their temporaries stay this many slices deep
SLAB = 16
#: above this fraction of the voxels, local maxima are grouped by a full-size labelling (a flat map, threshold 0)
DENSE_PEAKS = 0.01


def _local_maxima(prob, threshold: float, slab: int = SLAB) -> np.ndarray:
    """(n, 3) int64 voxel zyx, in raster order, of every voxel >= its 26 neighbours (edges repeated) and >=
    ``threshold``: the 3 x 3 x 3 maximum filter of the whole map, computed ``slab`` slices at a time with one
    slice of halo on each side (the same values; temporaries slab-sized)."""
    out, depth = [np.zeros((0, 3), np.int64)], prob.shape[0]
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        part = prob[lo:hi]
        mx = ndimage.maximum_filter(part, size=3, mode="nearest")[z0 - lo:z1 - lo]
        core = part[z0 - lo:z1 - lo]
        idx = np.argwhere((core >= mx) & (core >= threshold)).astype(np.int64)
        idx[:, 0] += z0
        out.append(idx)
    return np.concatenate(out)


def _peak_groups(prob, coords):
    """``_groups`` of the local maxima ``coords`` (raster order), from the points alone: 26-connected groups (a
    plateau of equal maxima is one), their centroids, scores (the common value) and sizes, and as each group's
    voxel of its maximum the one nearest its centroid (the first in raster order among equally near ones; the
    full-size ``ndimage.maximum_position`` picks a tied voxel by the order of a sort of the whole map, and keeps
    two int64 copies of it); None when there is none. A map with local maxima almost everywhere (flat) is
    grouped by full-size labelling instead."""
    n = len(coords)
    if n == 0:
        return None
    if n > DENSE_PEAKS * prob.size:
        mask = np.zeros(prob.shape, np.float64)
        mask[tuple(coords.T)] = 1.0
        return _groups(prob, mask)
    pairs = cKDTree(coords).query_pairs(1, p=np.inf, output_type="ndarray")      # 26-neighbours
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    k, lab = connected_components(graph, directed=False)         # numbered by first voxel, as ndimage.label
    sizes = np.bincount(lab, minlength=k)
    zyx = np.stack([np.bincount(lab, coords[:, d], minlength=k) for d in range(3)], 1) / sizes[:, None]
    near = np.lexsort((np.arange(n), ((coords - zyx[lab]) ** 2).sum(1), lab))     # by group, distance, order
    seeds = coords[near[np.searchsorted(lab[near], np.arange(k))]]
    return zyx, prob[tuple(seeds.T)].astype(np.float64), sizes, seeds


def _support(prob, seeds, level, half):
    """The region of a peak and of the peaks merged into it: (box slices, bool mask over the box) of the
    26-connected voxels with prob >= level that hold one of ``seeds`` (k, 3), inside the box of ``half`` voxels
    per axis around ``seeds[0]`` (the peak, whose score is >= level; seeds outside the box or below level add
    nothing)."""
    box = tuple(slice(max(int(c) - h, 0), int(c) + h + 1) for c, h in zip(seeds[0], half))
    lab, _ = ndimage.label(prob[box] >= np.float32(level), structure=_FULL)
    local = np.asarray(seeds) - [b.start for b in box]
    ids = np.unique(lab[tuple(local[((local >= 0) & (local < lab.shape)).all(1)].T)])
    return box, np.isin(lab, ids[ids > 0])


def _refine(prob, coords, sp, own_tree, all_tree):
    """Probability-weighted centroid (voxel zyx) and size of the voxels ``coords`` (n, 3) without those nearer
    (mm) to a peak of ``all_tree`` (every kept candidate's peaks) than to the nearest of its own (``own_tree``);
    None when nothing is left."""
    mm = coords * sp
    coords = coords[own_tree.query(mm)[0] <= all_tree.query(mm)[0]]
    if not len(coords):
        return None, 0
    w = prob[tuple(coords.T)].astype(np.float64)
    return (w[:, None] * coords).sum(0) / w.sum(), len(coords)


def _nms(prob, sp, rule: CandidateRule):
    """The "nms" rule (module docstring): refined centres (n, 3), scores, support sizes, unsorted."""
    found = _peak_groups(prob, _local_maxima(prob, rule.threshold))
    if found is None:
        return _empty()
    zyx, scores, _, seeds = found
    mm = zyx * sp
    tree = cKDTree(mm)
    half = np.ceil(REGION_HALF_MM / sp).astype(int)
    reach = float(np.linalg.norm(half * sp))                    # the box's corner, mm
    out_of_play, claimed = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    kept, members = [], {}
    for i in np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0], -scores)):
        if out_of_play[i]:
            continue
        kept.append(i)
        members[i] = [i]
        claimed[i] = True
        out_of_play[tree.query_ball_point(mm[i], rule.min_distance_mm)] = True
        if rule.merge_fraction is not None:                     # peaks inside this peak's merging region
            box, reg = _support(prob, seeds[[i]], max(rule.threshold, rule.merge_fraction * scores[i]), half)
            near = np.asarray(tree.query_ball_point(mm[i], reach), np.int64)
            local = seeds[near] - [b.start for b in box]
            inside = ((local >= 0) & (local < reg.shape)).all(1)
            merged = near[inside][reg[tuple(local[inside].T)]]
            out_of_play[merged] = True
            joins = merged[~claimed[merged] & (scores[merged] >= rule.refine_fraction * scores[i])]
            claimed[joins] = True                   # merged peaks of the same object: their support counts
            members[i] += joins.tolist()
        if rule.max_candidates is not None and len(kept) >= rule.max_candidates:
            break
    kept = np.array(kept, np.int64)
    all_tree = cKDTree(mm[[j for i in kept for j in members[i]]])
    centres, sizes = zyx[kept].copy(), np.zeros(len(kept), np.int64)
    for n, i in enumerate(kept):
        box, region = _support(prob, seeds[members[i]], rule.refine_fraction * scores[i], half)
        coords = np.stack(np.nonzero(region), 1) + np.array([b.start for b in box])
        c, size = _refine(prob, coords, sp, cKDTree(mm[members[i]]), all_tree)
        if c is not None:
            centres[n], sizes[n] = c, size
    return centres, scores[kept], sizes


def find_peaks(prob, spacing=(1, 1, 1), threshold: float = DEFAULT_RULE.threshold,
               method: str = DEFAULT_RULE.method, min_distance_mm: float = DEFAULT_RULE.min_distance_mm, *,
               rule: CandidateRule | None = None, **fields):
    """Scored points of a (z, y, x) probability map: (zyx (n, 3) float voxel coords, scores (n,), sizes (n,)).

    The rule: ``rule`` (default DEFAULT_RULE) with threshold, method, min_distance_mm and any other ``fields``
    (max_candidates, refine_fraction, merge_fraction) replaced. Sorted by score descending (ties by position); sizes =
    voxels per component, plateau or support region.
    """
    rule = candidate_rule(rule, threshold=threshold, method=method, min_distance_mm=min_distance_mm, **fields)
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 3:
        raise CandidateInputError(f"probability map has shape {prob.shape}; expected (z, y, x)")
    if not all(np.isfinite(prob[z:z + SLAB]).all() for z in range(0, prob.shape[0], SLAB)):
        raise CandidateInputError("probability map holds NaN or inf; expected finite probabilities")
    sp = np.asarray(spacing, np.float64)
    if rule.method == "nms":
        zyx, scores, sizes = _nms(prob, sp, rule)
    else:
        if rule.method == "components":
            # weights clipped at a tiny positive value so a component of zeros (threshold <= 0) has a centre
            mask = np.where(prob >= rule.threshold, np.maximum(prob, np.float32(1e-12)), 0).astype(np.float64)
        else:
            half = np.floor(rule.min_distance_mm / sp).astype(int)
            mx = ndimage.maximum_filter(prob, size=tuple(2 * half + 1), mode="constant", cval=-np.inf)
            mask = ((prob == mx) & (prob >= rule.threshold)).astype(np.float64)
        found = _groups(prob, mask)
        zyx, scores, sizes = found[:3] if found is not None else _empty()
    order = np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0], -scores))[:rule.max_candidates]
    return zyx[order], scores[order], sizes[order]


def extract_candidates(prob, geometry=None, *, spacing=None, origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                       seriesuid: str = "", rule: CandidateRule | None = None, **fields) -> list:
    """LUNA16 candidate rows {seriesuid, coordX, coordY, coordZ, probability} (world LPS mm) from a map.

    prob: (z, y, x) foreground probabilities. geometry: an object with ``spacing`` (sz, sy, sx), ``origin``
    (x, y, z) and ``direction`` (3x3) such as ahnet.data.io.Volume, or pass spacing/origin/direction directly.
    The rule: ``rule`` (default DEFAULT_RULE) with ``fields`` (method, threshold, min_distance_mm,
    max_candidates, refine_fraction, merge_fraction) replaced.
    """
    rule = candidate_rule(rule, **fields)
    if geometry is not None:
        spacing, origin, direction = geometry.spacing, geometry.origin, geometry.direction
    if spacing is None:
        raise CandidateInputError("give a geometry (spacing, origin, direction) or spacing= in mm (sz, sy, sx)")
    _geom(spacing, origin, direction)
    zyx, scores, _ = find_peaks(prob, spacing, rule.threshold, rule.method, rule.min_distance_mm, rule=rule)
    if geometry is not None and hasattr(geometry, "voxel_to_world"):
        xyz = np.asarray(geometry.voxel_to_world(zyx), np.float64).reshape(-1, 3)
    else:
        xyz = voxel_to_world(zyx, spacing, origin, direction).reshape(-1, 3)
    return [{"seriesuid": seriesuid, "coordX": float(x), "coordY": float(y), "coordZ": float(z),
             "probability": float(p)} for (x, y, z), p in zip(xyz, scores)]
