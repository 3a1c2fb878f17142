"""Readers and writers for scans, masks, LUNA16-style CSVs and Decathlon ``dataset.json``.

Conventions (the only place where they are converted):
- arrays are (z, y, x); spacing is (sz, sy, sx) in mm;
- origin is (x, y, z) in LPS mm and direction is the 3x3 matrix SimpleITK reports (column k = the LPS direction
  of index axis k, with index axes ordered (x, y, z));
- NIfTI files (nibabel) hold (x, y, z) arrays with a RAS affine: x and y of the world are negated here, on the way
  in and on the way out, and the array is transposed.

Every problem with an input file raises :class:`DataError` (a ``ValueError``) whose message names the file and
what was expected; what the content must be (dataset.json entries, annotation rows, a scan that makes sense as
CT) is ahnet.data.checks'.
"""
from __future__ import annotations

import csv
import gzip
import io as _io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ahnet.atomic import atomic_path
from ahnet.data.budget import ScanLimit, scan_limit
from ahnet.data.checks import (SECTION_SPLIT, DataError, check_annotation_rows, check_scan, check_slice_positions,
                     dataset_entries, decode_utf8, read_json)
from ahnet.data.dicom_source import DicomSeries, series_from_reader
from ahnet.data.header import (IMAGE_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, ScanHeader, check_meta_header,  # noqa: F401
                               image_suffix, kept_locale, read_header)

log = logging.getLogger(__name__)

# LPS <-> RAS: negate x and y.
_FLIP = np.diag([-1.0, -1.0, 1.0])

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_INT_COLUMNS = {"label", "class"}
_FLOAT_COLUMNS = {"coordX", "coordY", "coordZ", "diameter_mm", "probability", "probability_stage1", "volume_mm3",
                  "texture", "spiculation", "lobulation", "calcification", "subtlety", "malignancy", "sphericity",
                  "margin", "internalStructure"}


def index_to_world_matrix(spacing, direction=np.eye(3)) -> np.ndarray:
    """3x3 matrix M with world_xyz = origin + M @ index_xyz, for spacing (sz, sy, sx) and a 3x3 direction."""
    sz, sy, sx = (float(v) for v in np.asarray(spacing, dtype=float).reshape(3))
    return np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag([sx, sy, sz])


def voxel_to_world(zyx, spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3)) -> np.ndarray:
    """(n, 3) or (3,) voxel coordinates (z, y, x), fractional allowed -> world (x, y, z) LPS mm."""
    zyx = np.asarray(zyx, dtype=float)
    single = zyx.ndim == 1
    ijk = np.atleast_2d(zyx)[:, ::-1]
    xyz = ijk @ index_to_world_matrix(spacing, direction).T + np.asarray(origin, dtype=float).reshape(3)
    return xyz[0] if single else xyz


def world_to_voxel(xyz, spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3)) -> np.ndarray:
    """(n, 3) or (3,) world (x, y, z) LPS mm -> fractional voxel coordinates (z, y, x)."""
    xyz = np.asarray(xyz, dtype=float)
    single = xyz.ndim == 1
    rel = np.atleast_2d(xyz) - np.asarray(origin, dtype=float).reshape(3)
    ijk = np.linalg.solve(index_to_world_matrix(spacing, direction), rel.T).T
    zyx = ijk[:, ::-1]
    return zyx[0] if single else zyx


@dataclass
class Volume:
    """A 3D scan or mask with its geometry.

    array: (z, y, x) array (float32 for images); spacing: (sz, sy, sx) mm; origin: (x, y, z) LPS mm of voxel
    (0, 0, 0)'s centre; direction: 3x3, column k = LPS unit vector of index axis k (x, y, z order, as SimpleITK);
    dicom: for a DICOM series read, its UIDs and slice files (ahnet.data.dicom_source.DicomSeries, what a DICOM
    SEG or SR about the scan references), else None.
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    dicom: DicomSeries | None = None

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=float).reshape(3))
        self.origin = tuple(float(o) for o in np.asarray(self.origin, dtype=float).reshape(3))
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    def index_to_world_matrix(self) -> np.ndarray:
        """3x3 matrix M with world_xyz = origin + M @ index_xyz."""
        return index_to_world_matrix(self.spacing, self.direction)

    def voxel_to_world(self, zyx) -> np.ndarray:
        """(n, 3) or (3,) voxel coordinates (z, y, x), fractional allowed -> world (x, y, z) LPS mm."""
        return voxel_to_world(zyx, self.spacing, self.origin, self.direction)

    def world_to_voxel(self, xyz) -> np.ndarray:
        """(n, 3) or (3,) world (x, y, z) LPS mm -> fractional voxel coordinates (z, y, x)."""
        return world_to_voxel(xyz, self.spacing, self.origin, self.direction)

    def contains_voxel(self, zyx, margin: float = 0.5) -> np.ndarray:
        """True where fractional voxel coordinates lie inside the volume (voxel centres +- margin)."""
        zyx = np.atleast_2d(np.asarray(zyx, dtype=float))
        hi = np.asarray(self.shape, dtype=float) - 1 + margin
        return np.all((zyx >= -margin) & (zyx <= hi), axis=1)


# --------------------------------------------------------------------------------------------------- checks

def validate_volume(vol: Volume, path, nan_policy: str = "raise") -> Volume:
    """Check a freshly read volume; raise DataError naming ``path`` on a problem.

    Checks: 3 dimensions, non-empty, spacing finite and > 0, direction invertible, origin finite, no NaN/inf.
    nan_policy: "raise" (default) or "repair" (NaN/inf replaced by the array's finite minimum, a warning logged).
    """
    a = vol.array
    if np.iscomplexobj(a):
        raise DataError(f"{path}: complex voxels ({a.dtype}); expected real intensities.")
    if a.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got {a.ndim}D with shape {tuple(a.shape)}.")
    if min(a.shape) < 1:
        raise DataError(f"{path}: the volume is empty (shape {tuple(a.shape)}).")
    sp = np.asarray(vol.spacing, dtype=float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(f"{path}: spacing (sz, sy, sx) = {tuple(sp)} mm; expected finite values > 0.")
    if not np.all(np.isfinite(vol.origin)):
        raise DataError(f"{path}: origin {vol.origin} is not finite.")
    d = vol.direction
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise DataError(f"{path}: direction matrix is singular or not finite: {d.tolist()}.")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        n_bad = int(bad.sum())
        if n_bad:
            if nan_policy == "repair":
                finite = a[~bad]
                if finite.size == 0:
                    raise DataError(f"{path}: every voxel is NaN or infinite.")
                fill = finite.min()
                log.warning("%s: %d NaN/inf voxels replaced by the minimum finite value %g (nan_policy='repair').",
                            path, n_bad, fill)
                a = a.copy()
                a[bad] = fill
                vol.array = a
            else:
                raise DataError(f"{path}: {n_bad} voxels are NaN or infinite; expected finite intensities "
                                f"(pass nan_policy='repair' to replace them by the minimum).")
    return vol


def check_pair(image: Volume, label: Volume, image_path, label_path, tol_mm: float = 1e-3) -> None:
    """Raise DataError when a mask's grid differs from its image's (shape, spacing, origin, direction)."""
    if image.shape != label.shape:
        raise DataError(f"{label_path}: mask shape (z, y, x) {label.shape} differs from image {image_path} "
                        f"shape {image.shape}.")
    if not np.allclose(image.spacing, label.spacing, atol=tol_mm, rtol=1e-4):
        raise DataError(f"{label_path}: mask spacing {label.spacing} differs from image {image_path} spacing "
                        f"{image.spacing}.")
    if not np.allclose(image.origin, label.origin, atol=max(tol_mm, 1e-2 * min(image.spacing))):
        raise DataError(f"{label_path}: mask origin {label.origin} differs from image {image_path} origin "
                        f"{image.origin}.")
    if not np.allclose(image.direction, label.direction, atol=1e-4):
        raise DataError(f"{label_path}: mask direction differs from image {image_path} direction.")


# --------------------------------------------------------------------------------------------------- images

def _raw_nifti_header(path: Path, img):
    """The header as stored (nibabel's loader silently 'fixes' a zero pixdim to 1)."""
    import gzip

    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:
        return img.header


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # forces the read: a truncated file fails here
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}).") from e
    hdr = _raw_nifti_header(path, img)
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        # no orientation: nibabel falls back to pixdim (and silently turns a 0 into 1); refuse missing spacing
        pix = np.asarray(hdr["pixdim"][1:4], dtype=float)
        if np.any(~np.isfinite(pix)) or np.any(pix <= 0):
            raise DataError(f"{path}: spacing missing (pixdim (x, y, z) = {tuple(pix)}, no qform/sform); "
                            f"expected voxel sizes in mm > 0.")
        log.warning("%s: no qform/sform; using pixdim spacing and nibabel's default orientation.", path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}.")
    aff = np.asarray(img.affine, dtype=float)
    m_lps = _FLIP @ aff[:3, :3]
    spacing_xyz = np.linalg.norm(m_lps, axis=0)
    if np.any(~np.isfinite(spacing_xyz)) or np.any(spacing_xyz <= 0):
        raise DataError(f"{path}: spacing (sz, sy, sx) = {tuple(spacing_xyz[::-1])} mm from the affine; "
                        f"expected finite values > 0.")
    direction = m_lps / spacing_xyz
    origin = _FLIP @ aff[:3, 3]
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(arr, tuple(spacing_xyz[::-1]), tuple(origin), direction)


def _sitk_to_volume(img, path) -> Volume:
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components "
                        f"per voxel.")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise DataError(f"{path}: expected a 3D volume, got {dim}D with size (x, y, z...) {img.GetSize()}.")
    arr = sitk.GetArrayFromImage(img)
    return Volume(arr, tuple(img.GetSpacing()[::-1]), tuple(img.GetOrigin()),
                  np.asarray(img.GetDirection(), dtype=float).reshape(3, 3))


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).strip().splitlines()[-1]}).") from e
    return _sitk_to_volume(img, path)


def _read_dicom_dir(path: Path, head: ScanHeader) -> Volume:
    with kept_locale():
        return _read_dicom_series(path, head.files, head.series)


def _read_dicom_series(path: Path, files, series_uid: str) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)     # ITK's own multi-line warning; check_slice_positions says it
    try:
        img = reader.Execute()
    except Exception as e:
        raise DataError(f"{path}: cannot read DICOM series {series_uid} ({type(e).__name__}: {e}).") from e
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    normal = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = []
    for i in range(len(files)):
        ipp = reader.GetMetaData(i, "0020|0032") if reader.HasMetaDataKey(i, "0020|0032") else ""
        try:
            positions.append(float(np.dot(normal, [float(v) for v in ipp.split("\\")])))
        except ValueError:
            positions = []
            break
    check_slice_positions(positions, path, series_uid)
    vol = _sitk_to_volume(img, path)
    vol.dicom = series_from_reader(reader, files)
    return vol


def read_image(path, dtype=np.float32, nan_policy: str = "raise", series_uid: str | None = None,
               limit: ScanLimit | None = None, header: ScanHeader | None = None) -> Volume:
    """Read a 3D scan or mask: NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd), NRRD, or a DICOM series folder.

    Its header first (ahnet.data.header.read_header, or ``header``: this path's, read up front by the caller and
    not read again): a scan with more voxels than ``limit`` (default: what the memory available holds at
    ahnet.data.budget's "read" bytes per voxel) is refused before its voxels are read.
    Returns a validated :class:`Volume` with array (z, y, x) cast to ``dtype`` (None keeps the file's dtype).
    Raises DataError naming the file on a missing/corrupt file, a non-3D volume, bad spacing, or NaN voxels
    (unless nan_policy="repair").
    """
    path = Path(path)
    if header is not None and Path(header.path) != path:
        raise ValueError(f"read_image({path}) was given the header of {header.path}")
    head = header if header is not None else read_header(path, series_uid)
    (limit or scan_limit("read")).check(head)
    if path.is_dir():
        vol = _read_dicom_dir(path, head)
    elif image_suffix(path) in NIFTI_SUFFIXES:
        vol = _read_nifti(path)
    else:
        vol = _read_itk(path)
    vol = validate_volume(vol, path, nan_policy=nan_policy)
    if dtype is not None and vol.array.dtype != dtype:
        vol.array = vol.array.astype(dtype)
    return vol


def read_scan(path, nan_policy: str = "raise", series_uid: str | None = None,
              limit: ScanLimit | None = None, header: ScanHeader | None = None) -> Volume:
    """A CT scan: read_image (float32, ``limit`` and ``header`` as there), then checked for sense as CT in HU
    (ahnet.data.checks.check_scan)."""
    vol = read_image(path, nan_policy=nan_policy, series_uid=series_uid, limit=limit, header=header)
    check_scan(vol, path)
    return vol


def nifti_affine(vol: Volume) -> np.ndarray:
    """4x4 RAS affine (nibabel, index order x, y, z) for a Volume's geometry."""
    aff = np.eye(4)
    aff[:3, :3] = _FLIP @ vol.index_to_world_matrix()
    aff[:3, 3] = _FLIP @ np.asarray(vol.origin)
    return aff


def write_image(path, volume_or_array, like: Volume | None = None, spacing=None, origin=None, direction=None,
                dtype=None, compress: bool = True) -> Path:
    """Write a (z, y, x) array or Volume as NIfTI (.nii/.nii.gz, nibabel) or .mha/.mhd/.nrrd (SimpleITK).

    Geometry comes from the Volume, else ``like``, overridden by explicit spacing (sz, sy, sx), origin (x, y, z)
    LPS and direction. float64 is stored as float32 unless ``dtype`` is given. Written under a temporary name
    and renamed (a kill leaves the old file or none), except .mhd (two files). Returns the path.
    """
    path = Path(path)
    if isinstance(volume_or_array, Volume):
        vol = volume_or_array
        arr = vol.array
        geo = vol
    else:
        arr = np.asarray(volume_or_array)
        geo = like
    if arr.ndim != 3:
        raise DataError(f"{path}: can only write 3D (z, y, x) arrays, got shape {tuple(arr.shape)}.")
    vol = Volume(arr,
                 spacing if spacing is not None else (geo.spacing if geo is not None else (1.0, 1.0, 1.0)),
                 origin if origin is not None else (geo.origin if geo is not None else (0.0, 0.0, 0.0)),
                 direction if direction is not None else (geo.direction if geo is not None else np.eye(3)))
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    suf = image_suffix(path)
    if suf in NIFTI_SUFFIXES:
        import nibabel as nib

        aff = nifti_affine(vol)
        img = nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        img.header.set_xyzt_units("mm", "sec")
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    elif suf in ITK_SUFFIXES:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(tuple(float(s) for s in vol.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in vol.origin))
        img.SetDirection(tuple(float(d) for d in vol.direction.reshape(-1)))
        if suf == ".mhd":        # header + data file: the header names the data file, so no temp name
            sitk.WriteImage(img, str(path), compress)
        else:
            with atomic_path(path) as tmp:
                sitk.WriteImage(img, str(tmp), compress)
    else:
        raise DataError(f"{path}: unknown output format '{suf}'; expected one of {', '.join(IMAGE_SUFFIXES)}.")
    return path


# --------------------------------------------------------------------------------------------------- CSVs

def _convert(col: str, value: str, path, lineno: int):
    if col in _FLOAT_COLUMNS or col in _INT_COLUMNS:
        if value is None or value.strip() == "":
            return None
        try:
            f = float(value)
        except ValueError:
            if col in ("coordX", "coordY", "coordZ", "probability", "diameter_mm"):
                raise DataError(f"{path}: line {lineno}: column {col} = {value!r} is not a number.") from None
            return value
        if col in _INT_COLUMNS and f.is_integer():
            return int(f)
        return f
    return value


def _read_csv(path, required: Sequence[str]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found.")
    raw = path.read_bytes()
    if path.suffix == ".gz":                     # the candidates kept in paper_notes/evidence are gzipped
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    with _io.StringIO(decode_utf8(raw, path), newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; expected at least {list(required)}.")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if None in row:
                raise DataError(f"{path}: line {lineno} has more fields than the header.")
            rows.append({k: _convert(k, v, path, lineno) for k, v in row.items()})
    for lineno, r in enumerate(rows, start=2):
        for c in required:
            if r[c] is None or r[c] == "":
                raise DataError(f"{path}: line {lineno}: column {c} is empty.")
    return rows


def read_annotations_csv(path, case_ids: Iterable[str] | None = None, dataset=None) -> list[dict]:
    """LUNA16 annotations (seriesuid, coordX, coordY, coordZ, diameter_mm; world LPS mm) plus any extra columns,
    checked (ahnet.data.checks.check_annotation_rows: finite coordinates, diameter > 0, and with ``case_ids`` a
    seriesuid that is a case of ``dataset``). The one reader of annotations: cache, evaluation and experiment.

    Returns one dict per row; known numeric columns as float (``label`` as int), others as str.
    """
    return check_annotation_rows(_read_csv(path, ANNOTATION_COLUMNS), path, case_ids, dataset)


def read_candidates_csv(path) -> list[dict]:
    """LUNA16 candidates (seriesuid, coordX, coordY, coordZ, probability) plus any extra columns (e.g. class)."""
    return _read_csv(path, ("seriesuid", "coordX", "coordY", "coordZ", "probability"))


def candidates_csv_text(rows: Iterable[dict], extra_columns: Sequence[str] = ()) -> str:
    """Candidates as CSV text: seriesuid,coordX,coordY,coordZ,probability (+ extra_columns), world LPS mm."""
    cols = list(CANDIDATE_COLUMNS) + [c for c in extra_columns if c not in CANDIDATE_COLUMNS]
    f = _io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        out = dict(r)
        for c in ("coordX", "coordY", "coordZ", "probability"):
            if c in out and out[c] is not None:
                out[c] = repr(float(out[c]))
        w.writerow(out)
    return f.getvalue()


def write_candidates_csv(path, rows: Iterable[dict], extra_columns: Sequence[str] = ()) -> Path:
    """Write candidates_csv_text atomically at ``path``; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(candidates_csv_text(rows, extra_columns), encoding="utf-8", newline="")
    return path


def write_annotations_csv(path, rows: Iterable[dict], columns: Sequence[str] | None = None) -> Path:
    """Write LUNA16-style annotations (the 5 LUNA16 columns first, then ``columns`` or the rows' other keys),
    atomically (temporary name, then rename)."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        extra: list[str] = []
        for r in rows:
            extra += [k for k in r if k not in ANNOTATION_COLUMNS and k not in extra]
        columns = list(ANNOTATION_COLUMNS) + extra
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return path


# --------------------------------------------------------------------------------------------------- dataset.json

def load_dataset_json(path, section: str | Sequence[str] = "training") -> list[dict[str, Any]]:
    """Decathlon-style dataset.json -> [{"case_id", "image" (abs path str), "label" (abs str or None), "split"}].

    section: the list(s) of cases to read, "training" (default) or e.g. ("training", "test") (a Decathlon test
    list holds paths or objects; its cases' split defaults to "test"). Relative paths resolve against the json's
    folder. case_id defaults to the image file name without suffix; split defaults to "train". Extra keys of
    each entry are kept. Content errors: ahnet.data.checks.dataset_entries.
    """
    path = Path(path)
    sections = (section,) if isinstance(section, str) else tuple(section)
    root = path.resolve().parent
    out, seen = [], set()
    for sec, i, e in dataset_entries(read_json(path), path, sections):
        img = (root / e["image"]).resolve()
        lab = e.get("label")
        lab = (root / lab).resolve() if lab else None
        name = img.name
        for s in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
            if name.lower().endswith(s):
                name = name[: -len(s)]
                break
        cid = str(e["case_id"]) if e.get("case_id") is not None else name
        if cid in seen:
            raise DataError(f"{path}: case_id {cid!r} appears twice.")
        seen.add(cid)
        entry = dict(e)
        entry.update(case_id=cid, image=str(img), label=str(lab) if lab else None,
                     split=e.get("split", SECTION_SPLIT.get(sec, "train")))
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------- generated datasets
# Writers for datasets that the package generates (the phantom): atomic, like the writers above (but .mhd).

def write_dataset_json(path, meta: dict) -> Path:
    """Write a Decathlon-style dataset.json (``meta``: a JSON-able dict, one space indent) atomically."""
    path = Path(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: dataset.json content must be a dict, got {type(meta).__name__}.")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path
