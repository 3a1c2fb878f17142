"""What a DICOM series read keeps for the files written about it (ahnet.data.dicom_out: DICOM SEG and SR), and a
CT series written the way a scanner writes one (the DICOM input of the tests and of the outputs benchmark).

A SEG must reference its source series and each source frame, an SR its study, series and frame of reference;
``DicomSeries`` holds those UIDs and the slice files, one per array z index in the array's order, gathered from
SimpleITK's per-slice metadata while the series is read (no pydicom here: the ``dicom`` extra is optional).
``write_ct_series`` writes a (z, y, x) HU volume as one file per slice with its own SOPInstanceUID, the study,
series and frame-of-reference UIDs, patient and study identity, position and orientation per slice; file names
run against the slice order, so a reader that keeps the files' order instead of the positions' gets it wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet.data.header import kept_locale

# DICOM tags as SimpleITK's metadata keys
SOP_CLASS, SOP_INSTANCE = "0008|0016", "0008|0018"
STUDY, SERIES, FRAME_OF_REFERENCE = "0020|000d", "0020|000e", "0020|0052"
MODALITY = "0008|0060"


@dataclass(frozen=True)
class DicomSeries:
    """A read DICOM series: ``files`` and ``sop_instance_uids`` in array z order (index k = array slice k),
    the series' SOP class, study, series and frame-of-reference UIDs ("" where the files lack one)."""
    files: tuple
    sop_instance_uids: tuple
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str = ""

    def missing(self) -> list:
        """The UIDs a SEG or SR needs that the series lacks (empty when it can be referenced)."""
        need = {"StudyInstanceUID": self.study_instance_uid, "SeriesInstanceUID": self.series_instance_uid,
                "FrameOfReferenceUID": self.frame_of_reference_uid, "SOPClassUID": self.sop_class_uid}
        out = [k for k, v in need.items() if not v]
        if not all(self.sop_instance_uids) or len(set(self.sop_instance_uids)) != len(self.sop_instance_uids):
            out.append("SOPInstanceUID (one per slice, each its own)")
        return out


def _value(reader, i: int, tag: str) -> str:
    """Slice i's value of ``tag`` (padding stripped), "" when absent."""
    if not reader.HasMetaDataKey(i, tag):
        return ""
    return reader.GetMetaData(i, tag).strip().strip("\0").strip()


def _series_value(reader, n: int, tag: str) -> str:
    """The value every slice shares; "" when absent from any slice or when the slices disagree."""
    values = {_value(reader, i, tag) for i in range(n)}
    return values.pop() if len(values) == 1 else ""


def series_from_reader(reader, files) -> DicomSeries:
    """The DicomSeries of a SimpleITK ImageSeriesReader that has read ``files`` (in that order, metadata on:
    MetaDataDictionaryArrayUpdateOn)."""
    n = len(files)
    return DicomSeries(files=tuple(str(Path(f)) for f in files),
                       sop_instance_uids=tuple(_value(reader, i, SOP_INSTANCE) for i in range(n)),
                       sop_class_uid=_series_value(reader, n, SOP_CLASS),
                       study_instance_uid=_series_value(reader, n, STUDY),
                       series_instance_uid=_series_value(reader, n, SERIES),
                       frame_of_reference_uid=_series_value(reader, n, FRAME_OF_REFERENCE),
                       modality=_series_value(reader, n, MODALITY))


# ---------------------------------------------------------------------------------------------------- writing
ROOT_UID = "1.2.826.0.1.3680043.2.1125.7"          # short: the UIDs below stay well under DICOM's 64 characters


def series_uids(tag: int) -> dict:
    """The study, series and frame-of-reference UIDs of series number ``tag`` written by write_ct_series."""
    return {"study": f"{ROOT_UID}.{tag}.1", "series": f"{ROOT_UID}.{tag}.2", "frame": f"{ROOT_UID}.{tag}.3"}


def write_ct_series(folder, hu_zyx, spacing, origin, direction, tag: int = 1, frame_of_reference: bool = True) -> dict:
    """Write (z, y, x) HU as an int16 CT series into ``folder`` (created; module docstring); spacing (sz, sy, sx)
    mm, origin (x, y, z) LPS mm, direction 3x3 (columns: index axes x, y, z). Returns {"study", "series", "frame",
    "sop": [UID of slice k, k = array z index]}; ``frame_of_reference=False`` leaves FrameOfReferenceUID out."""
    with kept_locale():                              # GDCM's writer switches the process locale too
        return _write_series(Path(folder), hu_zyx, spacing, origin, direction, tag, frame_of_reference)


def _slice_tags(uids: dict, k: int, iop: str, position, spacing, tag: int, frame_of_reference: bool) -> list:
    """(SimpleITK key, value) of slice k."""
    tags = [("0008|0060", "CT"), ("0020|000d", uids["study"]), ("0020|000e", uids["series"]), ("0020|0037", iop),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in position)), ("0020|0013", str(k + 1)),
            ("0018|0050", f"{float(spacing[0]):g}"), ("0008|0018", uids["sop"][k]), ("0010|0010", "Phantom^Test"),
            ("0010|0020", f"P{tag}"), ("0020|0010", f"S{tag}"), ("0020|0011", "3"), ("0008|0050", f"A{tag}"),
            ("0008|0090", "")]
    return tags + ([("0020|0052", uids["frame"])] if frame_of_reference else [])


def _write_series(folder: Path, hu_zyx, spacing, origin, direction, tag: int, frame_of_reference: bool) -> dict:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.rint(np.asarray(hu_zyx)).astype(np.int16))
    img.SetSpacing([float(s) for s in np.asarray(spacing, float)[::-1]])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(np.asarray(direction, float).reshape(-1).tolist())
    n = img.GetDepth()
    uids = series_uids(tag)
    uids["sop"] = [f"{uids['series']}.{k + 1}" for k in range(n)]
    d = np.asarray(direction, float).reshape(3, 3)
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        s = img[:, :, k]
        for key, value in _slice_tags(uids, k, iop, img.TransformIndexToPhysicalPoint((0, 0, k)), spacing, tag,
                                      frame_of_reference):
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"im{n - k:04d}.dcm"))          # names against the slice order
        writer.Execute(s)
    return uids
