"""What a DICOM series read keeps for the files written about it (ahnet.data.dicom_out: DICOM SEG and SR).

A SEG must reference its source series and each source frame, an SR its study, series and frame of reference;
``DicomSeries`` holds those UIDs and the slice files, one per array z index in the array's order, gathered from
SimpleITK's per-slice metadata while the series is read (no pydicom here: the ``dicom`` extra is optional).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
