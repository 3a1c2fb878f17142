"""A DICOM series read keeps what a SEG or SR about it must reference: its UIDs and slice files, in array order."""
from pathlib import Path

import numpy as np
import pytest

from ahnet.data.io import Volume, read_image, read_scan, write_image
from ahnet.data.dicom_source import write_ct_series

sitk = pytest.importorskip("SimpleITK")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def test_a_series_keeps_each_slices_uid_and_file_in_array_order(tmp_path):
    hu = np.random.default_rng(3).integers(-1000, 400, size=(5, 8, 9)).astype(np.float32)
    uids = write_ct_series(tmp_path / "s", hu, (2.5, 0.8, 0.7), (-100.0, -50.0, 20.0), _rot_z(20), tag=4)
    vol = read_scan(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, hu)               # slice k of the array is slice k as written
    src = vol.dicom
    assert src.sop_instance_uids == tuple(uids["sop"])
    assert (src.study_instance_uid, src.series_instance_uid, src.frame_of_reference_uid) == \
        (uids["study"], uids["series"], uids["frame"])
    assert src.sop_class_uid == CT_IMAGE_STORAGE and src.modality == "CT" and src.missing() == []
    for k, f in enumerate(src.files):                         # each file is that slice (names run backwards)
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        assert r.GetMetaData("0008|0018").strip("\0 ") == uids["sop"][k]
    assert [Path(f).name for f in src.files] == [f"im{5 - k:04d}.dcm" for k in range(5)]


def test_a_series_without_a_frame_of_reference_names_what_it_lacks(tmp_path):
    hu = np.full((3, 4, 4), -700.0, np.float32)
    write_ct_series(tmp_path / "s", hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), frame_of_reference=False)
    assert read_image(tmp_path / "s").dicom.missing() == ["FrameOfReferenceUID"]


def test_other_formats_carry_no_dicom_source(tmp_path):
    p = write_image(tmp_path / "a.nii.gz", Volume(np.zeros((3, 4, 5), np.float32), (2.0, 1.0, 1.0)))
    assert read_image(p).dicom is None
    assert read_image(write_image(tmp_path / "a.mha", read_image(p))).dicom is None
