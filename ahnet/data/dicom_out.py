"""DICOM out for a DICOM series in: the mask as a DICOM Segmentation and the findings as a DICOM Structured
Report, so 3D Slicer, OHIF or a PACS can show them over the source series. Written with highdicom, the optional
``dicom`` extra (``pip install 'ahnet[dicom]'``), imported inside the writers only.

- SEG (``write_seg``): a BINARY Segmentation with one segment, "lung nodule" (category Morphologically abnormal
  structure, type Nodule, anatomic region Lung; algorithm type AUTOMATIC, identified by the run's name and
  version), one frame per source slice referencing that slice's SOP instance, in the source's frame of reference;
  empty frames are left out unless the whole mask is empty.
- SR (``write_sr``): a Comprehensive 3D SR holding a TID 1500 Measurement Report: first a TID 1501 group with
  the number of findings ("Number of lesions", SCT 246206008), then one TID 1410 group per finding at or above
  the operating point, in rank order: tracking identifier "candidate <rank>", finding type Nodule, finding site
  Lung, its centre as an SCOORD3D POINT in patient coordinates (LPS mm, the source's frame of reference), its
  estimated diameter (SCT 81827009 Diameter, mm) and its probability (DCM 111012 Certainty of Finding, unitless in
  [0, 1]); the source slices are its evidence.

Each file is written under a temporary name and renamed (ahnet.atomic). The source slices are read again (their
headers, not their pixels) from the files the series was read from (ahnet.data.dicom_source.DicomSeries).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet.atomic import atomic_path
from ahnet.data.checks import DataError
from ahnet.data.dicom_source import DicomSeries

MANUFACTURER = "ahnet (open-source AH-Net replication)"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9101, 9102
INSTALL = "pip install 'ahnet[dicom]' (bash run.sh test installs it)"


class DicomOutError(DataError):
    """DICOM out cannot be written (highdicom missing, a series that cannot be referenced): one sentence."""


@dataclass(frozen=True)
class Algorithm:
    """Who made the files: ``name`` (the run, e.g. "ahnet ahnet_cv"), ``version`` (ahnet's); at most 64
    characters each (DICOM LO)."""
    name: str
    version: str

    def __post_init__(self):
        object.__setattr__(self, "name", str(self.name)[:64])
        object.__setattr__(self, "version", str(self.version)[:64])


def highdicom_missing() -> str | None:
    """Why DICOM out cannot be written here (one sentence), or None when highdicom is importable."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return f"DICOM SEG/SR need highdicom, which is not installed: {INSTALL}"
    return None


def _hd():
    missing = highdicom_missing()
    if missing:
        raise DicomOutError(missing)
    import highdicom
    return highdicom


def source_datasets(series: DicomSeries) -> list:
    """The source slices' headers (pydicom datasets, pixels not read) in array z order, each checked to be the
    slice the series was read from."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if series.missing():
        raise DicomOutError(f"series {series.series_instance_uid or '(no UID)'} cannot be referenced by a DICOM "
                            f"SEG or SR: it lacks {', '.join(series.missing())}")
    out = []
    for f, uid in zip(series.files, series.sop_instance_uids):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as e:
            raise DicomOutError(f"{f}: cannot read the source slice again ({type(e).__name__}: {e})") from None
        if str(getattr(ds, "SOPInstanceUID", "")) != uid:
            raise DicomOutError(f"{f}: the source slice changed since it was read (SOPInstanceUID differs)")
        out.append(ds)
    return out


def write_seg(path, mask: np.ndarray, series: DicomSeries, algorithm: Algorithm, threshold: float,
              sources: list | None = None) -> Path:
    """Write the (z, y, x) mask (bool/uint8, the source's grid) as a DICOM SEG at ``path`` (module docstring);
    ``threshold``: the probability the mask is cut at (named in the segment label). Returns the path."""
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = sources if sources is not None else source_datasets(series)
    mask = np.asarray(mask).astype(bool)
    if mask.shape[0] != len(sources) or mask.shape[1:] != (int(sources[0].Rows), int(sources[0].Columns)):
        raise DicomOutError(f"mask shape {mask.shape} does not fit the {len(sources)} source slices of "
                            f"{sources[0].Rows} x {sources[0].Columns}")
    alg = hd.AlgorithmIdentificationSequence(name=algorithm.name, version=algorithm.version,
                                             family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=f"lung nodule (p >= {threshold:g})",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=alg, tracking_uid=generate_uid(), tracking_id="nodules",
        anatomic_regions=[codes.SCT.Lung])
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name, software_versions=algorithm.version, device_serial_number="0",
        omit_empty_frames=bool(mask.any()), content_label="NODULES",
        content_description=f"AH-Net nodule mask, p >= {threshold:g}"[:64],
        series_description=f"AH-Net nodules (p >= {threshold:g})"[:64])
    return _save(seg, path)


def _finding_group(hd, codes, f: dict, series: DicomSeries, alg):
    """One TID 1410 group: a finding's centre (POINT), diameter and probability."""
    from pydicom.uid import generate_uid

    centre = np.array([[float(f["coordX"]), float(f["coordY"]), float(f["coordZ"])]])
    region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=centre,
                                 frame_of_reference_uid=series.frame_of_reference_uid)
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Diameter, value=float(f["diameter_mm"]), unit=codes.UCUM.Millimeter,
                          algorithm_id=alg),
        hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=float(f["probability"]),
                          unit=codes.UCUM.NoUnits, algorithm_id=alg)]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"candidate {f['rank']}"),
        referenced_region=region, finding_type=codes.SCT.Nodule, algorithm_id=alg,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)], measurements=measurements)


def write_sr(path, findings: list, series: DicomSeries, algorithm: Algorithm, threshold: float,
             sources: list | None = None) -> Path:
    """Write the findings (ahnet.infer.findings rows: rank, coordX/Y/Z world LPS mm, probability, diameter_mm;
    those at or above ``threshold``, the operating point, are reported) as a DICOM SR at ``path`` (module
    docstring). Returns the path."""
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    sources = sources if sources is not None else source_datasets(series)
    kept = sorted((f for f in findings if float(f["probability"]) >= threshold), key=lambda f: f["rank"])
    alg = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    count = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                     identifier=f"findings at p >= {threshold:g}"),
        finding_type=codes.SCT.Nodule, algorithm_id=alg,
        measurements=[hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=len(kept),
                                        unit=Code("{lesions}", "UCUM", "lesions"), algorithm_id=alg)])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm.name, manufacturer_name=MANUFACTURER[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTChestReport,
        imaging_measurements=[count] + [_finding_group(hd, codes, f, series, alg) for f in kept])
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"AH-Net findings (p >= {threshold:g})"[:64])
    return _save(sr, path)


def _save(dataset, path) -> Path:
    """Write a highdicom dataset as a DICOM file (with its file meta) atomically: temporary name, then rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path
