"""A scan's size from its header alone: shape, voxel type and voxel count, read before any voxel is.

``read_header(path)`` reads the header of a NIfTI file (.nii, .nii.gz: nibabel reads the 348-byte header and
stops; a gzip file is inflated only that far), of a MetaImage or NRRD (SimpleITK's ReadImageInformation), of a
single DICOM file, or of a DICOM series folder (the slices' headers: the series is the largest one, or
``series_uid``; its size is rows x columns x slices). It also catches a header that promises more voxel bytes
than the file can hold (an uncompressed file shorter than its voxels, or a gzip file that would have to inflate
by more than deflate's 1032:1 at most), which the readers would otherwise find only after allocating them.
What a command may then hold is ahnet.data.budget's business.

Every problem raises :class:`DataError` naming the file, as the readers of ahnet.data.io do.
"""
from __future__ import annotations

import contextlib
import locale
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ahnet.data.checks import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd")
#: every image file the project reads and writes (a DICOM series is a folder); ahnet.data.io re-exports it
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
#: deflate cannot inflate one compressed byte to more than 1032 (RFC 1951's longest match per bit), so a gzip
#: file of n bytes holds at most about 1032 x n bytes
MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class ScanHeader:
    """What a scan's header says. shape: the voxel grid as stored, (z, y, x) first then any further axes (t,
    components); dtype: one voxel component's numpy type; spacing: (sz, sy, sx) mm, or None where the header
    gives none; files and series: the DICOM slices (in order) and series uid of a series folder, else () and
    None."""
    path: Path
    shape: tuple
    dtype: np.dtype
    spacing: tuple | None = None
    files: tuple = field(default=(), repr=False)
    series: str | None = None

    @property
    def voxels(self) -> int:
        """Voxels (components included): the count the readers allocate."""
        return math.prod(int(s) for s in self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the voxels as stored (voxels x the dtype's size)."""
        return self.voxels * self.dtype.itemsize

    def describe(self) -> str:
        """'900 x 2048 x 2048 int16' (the shape as stored, z first)."""
        return " x ".join(str(int(s)) for s in self.shape) + f" {self.dtype.name}"


def image_suffix(path: Path) -> str:
    """The image suffix of a file name (.nii.gz before .gz), lower case; the plain suffix otherwise."""
    name = Path(path).name.lower()
    for s in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix.lower()


@contextlib.contextmanager
def kept_locale():
    """Put the process locale back on exit. GDCM (SimpleITK's DICOM reader and writer) sets it to "C", which
    turns Python's default text encoding into ASCII for the rest of the process (text files, and libraries
    such as torch.compile that read their own UTF-8 files)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


# --------------------------------------------------------------------------------------------------- NIfTI
def _nifti_header(path: Path) -> ScanHeader:
    import nibabel as nib

    try:
        img = nib.load(str(path))                 # header only: the voxels stay behind a lazy proxy
        hdr = img.header
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(img.dataobj.offset)
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}).") from e
    if not shape or min(shape) < 1:
        raise DataError(f"{path}: the NIfTI header gives the shape {shape}; expected a 3D volume.")
    stored = (shape[:3][::-1] + shape[3:]) if len(shape) >= 3 else shape[::-1]
    head = ScanHeader(path, stored, dtype, tuple(zooms[::-1]) if len(zooms) == 3 else None)
    _check_room(head, offset, path.stat().st_size, compressed=image_suffix(path) == ".nii.gz")
    return head


def _check_room(head: ScanHeader, offset: int, file_bytes: int, compressed: bool) -> None:
    """DataError when a file of ``file_bytes`` cannot hold the header's voxels after ``offset`` bytes."""
    need = offset + head.nbytes
    if not compressed and file_bytes < need:
        raise DataError(f"{head.path}: cannot read: the header promises {head.describe()} voxels ({head.nbytes} "
                        f"bytes after byte {offset}) but the file has {file_bytes} bytes (truncated or a wrong "
                        f"header).")
    if compressed and need > MAX_DEFLATE_RATIO * file_bytes + 1024:
        raise DataError(f"{head.path}: cannot read: the header promises {head.describe()} voxels ({head.nbytes} "
                        f"bytes) but a gzip file of {file_bytes} bytes inflates to at most {MAX_DEFLATE_RATIO} x that "
                        f"(truncated or a wrong header).")


# ---------------------------------------------------------------------------------------- MetaImage, NRRD
def _sitk_dtype(pixel_id: int) -> np.dtype:
    import SimpleITK as sitk

    names = {"UInt8": np.uint8, "Int8": np.int8, "UInt16": np.uint16, "Int16": np.int16, "UInt32": np.uint32,
             "Int32": np.int32, "UInt64": np.uint64, "Int64": np.int64, "Float32": np.float32,
             "Float64": np.float64, "ComplexFloat32": np.complex64, "ComplexFloat64": np.complex128}
    for name, dt in names.items():
        for prefix in ("sitk", "sitkVector"):
            if getattr(sitk, prefix + name, None) == pixel_id:
                return np.dtype(dt)
    raise DataError(f"SimpleITK pixel type {sitk.GetPixelIDValueAsString(pixel_id)} has no numpy type")


def check_meta_header(path: Path) -> dict:
    """MetaImage: the header's key = value lines up to ElementDataFile. ITK silently assumes 1 mm when
    ElementSpacing is missing; refuse that (DataError), and a header without NDims."""
    with open(path, "rb") as f:
        head = f.read(65536).decode("latin-1", errors="replace")
    keys = {}
    for line in head.splitlines():
        if "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            keys[k] = v
            if k == "ElementDataFile":
                break
    if "NDims" not in keys:
        raise DataError(f"{path}: not a MetaImage header (no NDims line).")
    if "ElementSpacing" not in keys and "ElementSize" not in keys:
        raise DataError(f"{path}: MetaImage header has no ElementSpacing; expected the voxel spacing in mm.")
    return keys


def _meta_room(head: ScanHeader, keys: dict) -> None:
    """An uncompressed MetaImage's data (LOCAL: after the header in the .mha; else the file the header names)
    must hold its voxels."""
    if keys.get("CompressedData", "False").lower() == "true":
        return
    data = keys.get("ElementDataFile", "")
    if data == "LOCAL":
        _check_room(head, 0, head.path.stat().st_size, compressed=False)
    elif data and " " not in data and data.upper() != "LIST":
        target = head.path.parent / data
        if target.is_file():
            _check_room(ScanHeader(target, head.shape, head.dtype), 0, target.stat().st_size, compressed=False)


def _itk_header(path: Path) -> ScanHeader:
    import SimpleITK as sitk

    keys = check_meta_header(path) if image_suffix(path) in (".mha", ".mhd") else {}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with kept_locale():
            reader.ReadImageInformation()
    except Exception as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).strip().splitlines()[-1]}).") from e
    size = tuple(int(s) for s in reader.GetSize())           # (x, y, z, ...)
    comps = int(reader.GetNumberOfComponents())
    shape = size[:3][::-1] + size[3:] + ((comps,) if comps > 1 else ())
    spacing = tuple(float(s) for s in reader.GetSpacing()[:3][::-1]) if len(size) >= 3 else None
    head = ScanHeader(path, shape, _sitk_dtype(reader.GetPixelID()), spacing)
    if keys:
        _meta_room(head, keys)
    return head


# --------------------------------------------------------------------------------------------------- DICOM
def dicom_series(path: Path, series_uid: str | None = None) -> tuple[str, tuple]:
    """(series uid, its slice files) of a DICOM folder: ``series_uid``, else the series with the most files (a
    warning names it when there are several). DataError for a folder without one."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    with kept_locale():
        ids = list(reader.GetGDCMSeriesIDs(str(path)) or [])
        if not ids:
            raise DataError(f"{path}: folder holds no DICOM series.")
        if series_uid is not None and series_uid not in ids:
            raise DataError(f"{path}: no DICOM series {series_uid}; found {ids}.")
        files_by_id = {i: tuple(reader.GetGDCMSeriesFileNames(str(path), i)) for i in
                       ([series_uid] if series_uid is not None else ids)}
    if series_uid is None:
        series_uid = max(ids, key=lambda i: len(files_by_id[i]))
        if len(ids) > 1:
            log.warning("%s: %d DICOM series found; reading the largest, %s (pass series_uid to choose).",
                        path, len(ids), series_uid)
    return series_uid, files_by_id[series_uid]


def _dicom_header(path: Path, series_uid: str | None) -> ScanHeader:
    uid, files = dicom_series(path, series_uid)
    if len(files) < 2:
        raise DataError(f"{path}: DICOM series {uid} has {len(files)} slice; expected a 3D series.")
    first = _itk_header(Path(files[0]))
    rows_cols = first.shape[1:] if len(first.shape) >= 3 else first.shape
    return ScanHeader(path, (len(files),) + tuple(rows_cols), first.dtype, None, files, uid)


def read_header(path, series_uid: str | None = None) -> ScanHeader:
    """The header of a scan or mask (module docstring), without reading its voxels. DataError naming the file
    when it is missing, of an unknown format, unreadable, or shorter than its header promises."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file or folder not found.")
    if path.is_dir():
        return _dicom_header(path, series_uid)
    suf = image_suffix(path)
    if suf in NIFTI_SUFFIXES:
        return _nifti_header(path)
    if suf in ITK_SUFFIXES or suf in (".dcm", ""):
        return _itk_header(path)
    raise DataError(f"{path}: unknown image format '{suf}'; expected {', '.join(IMAGE_SUFFIXES)} or a DICOM folder.")
