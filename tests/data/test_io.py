"""Readers/writers: geometry conventions, round trips through nibabel and SimpleITK, DICOM, CSVs, bad input."""
import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from ahnet.data.io import (DataError, Volume, kept_locale, load_dataset_json, read_annotations_csv, read_candidates_csv,
                           read_image, write_annotations_csv, write_candidates_csv, write_image)


def rot(ax, deg):
    """Rotation matrix about axis ax (0=x, 1=y, 2=z)."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != ax]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


DIR = rot(2, 30) @ rot(0, 10)          # non-identity, proper rotation
SPACING = (2.5, 0.7, 0.8)              # (sz, sy, sx)
ORIGIN = (-120.5, 33.25, -400.0)       # (x, y, z) LPS


def make_volume(shape=(5, 7, 6), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.normal(-500, 300, size=shape).astype(dtype)
    return Volume(arr, SPACING, ORIGIN, DIR)


def sitk_image(vol):
    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing[::-1])
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction.reshape(-1).tolist())
    return img


def test_world_voxel_matches_sitk_and_roundtrips():
    vol = make_volume()
    img = sitk_image(vol)
    zyx = np.array([[0, 0, 0], [1, 2, 3], [4.5, 6.25, 5.75], [-1, 3, 10]], dtype=float)
    xyz = vol.voxel_to_world(zyx)
    ref = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p[::-1])) for p in zyx])
    np.testing.assert_allclose(xyz, ref, atol=1e-9)
    np.testing.assert_allclose(vol.world_to_voxel(xyz), zyx, atol=1e-9)
    # single point form
    np.testing.assert_allclose(vol.voxel_to_world(zyx[1]), ref[1], atol=1e-9)
    np.testing.assert_allclose(vol.world_to_voxel(ref[1]), zyx[1], atol=1e-9)
    # origin is voxel 0; a step along x moves by sx along the first direction column
    np.testing.assert_allclose(vol.voxel_to_world([0, 0, 1]) - ORIGIN, SPACING[2] * DIR[:, 0], atol=1e-12)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_written_by_nibabel_read_by_sitk(tmp_path, suffix):
    vol = make_volume()
    p = write_image(tmp_path / f"a{suffix}", vol)
    img = sitk.ReadImage(str(p))
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), vol.array)
    for zyx in [(0, 0, 0), (4, 6, 5), (2, 3, 1)]:
        w_sitk = img.TransformIndexToPhysicalPoint(tuple(int(v) for v in zyx[::-1]))
        np.testing.assert_allclose(vol.voxel_to_world(zyx), w_sitk, atol=1e-4)
    back = read_image(p)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, SPACING, atol=1e-5)
    np.testing.assert_allclose(back.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(back.direction, DIR, atol=1e-5)


def test_nifti_written_by_sitk_read_by_nibabel(tmp_path):
    vol = make_volume(shape=(4, 6, 9))
    p = tmp_path / "b.nii.gz"
    sitk.WriteImage(sitk_image(vol), str(p))
    back = read_image(p)
    np.testing.assert_array_equal(back.array, vol.array)
    img = sitk.ReadImage(str(p))
    for zyx in [(0, 0, 0), (3, 5, 8), (1, 2, 7)]:
        np.testing.assert_allclose(back.voxel_to_world(zyx),
                                   img.TransformIndexToPhysicalPoint(tuple(zyx[::-1])), atol=1e-4)
    # and the nibabel affine itself is RAS: x and y of the LPS world negated
    import nibabel as nib
    aff = nib.load(str(p)).affine
    ras = aff @ np.array([8, 5, 3, 1.0])
    lps = back.voxel_to_world((3, 5, 8))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_metaimage_roundtrip(tmp_path, suffix):
    vol = make_volume()
    lab = Volume((vol.array > -500).astype(np.int16), SPACING, ORIGIN, DIR)
    p = write_image(tmp_path / f"c{suffix}", vol)
    q = write_image(tmp_path / f"l{suffix}", lab)
    back = read_image(p)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, SPACING)
    np.testing.assert_allclose(back.origin, ORIGIN)
    np.testing.assert_allclose(back.direction, DIR, atol=1e-12)
    lb = read_image(q, dtype=None)
    assert lb.array.dtype == np.int16
    np.testing.assert_array_equal(lb.array, lab.array)


def test_write_array_like(tmp_path):
    vol = make_volume()
    p = write_image(tmp_path / "m.nii.gz", np.ones(vol.shape, np.uint8), like=vol)
    back = read_image(p, dtype=None)
    assert back.array.dtype == np.uint8
    np.testing.assert_allclose(back.origin, ORIGIN, atol=1e-4)


def write_dicom_series(folder, arr_zyx, spacing, origin, direction):
    """Write an int16 CT series, one file per slice, the way a scanner would (IPP/IOP per slice)."""
    with kept_locale():           # GDCM's writer switches the locale too; later tests must not inherit "C"
        _write_dicom_series(folder, arr_zyx, spacing, origin, direction)


def _write_dicom_series(folder, arr_zyx, spacing, origin, direction):
    folder.mkdir()
    img = sitk.GetImageFromArray(arr_zyx.astype(np.int16))
    img.SetSpacing(spacing[::-1])
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction).reshape(-1).tolist())
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    d = np.asarray(direction)
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, val in [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.41"),
                         ("0020|000e", series), ("0020|0037", iop),
                         ("0020|0032", "\\".join(f"{v:.6f}" for v in pos)),
                         ("0020|0013", str(k + 1)), ("0018|0050", str(spacing[0])),
                         ("0008|0018", f"{series}.{k + 1}")]:
            s.SetMetaData(tag, val)
        w.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        w.Execute(s)


def test_dicom_series_read(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 400, size=(4, 8, 10)).astype(np.int16)
    d = rot(2, 20)  # axial, rotated in-plane: slice normal stays +z
    write_dicom_series(tmp_path / "dcm", arr, (2.5, 0.75, 0.75), (-100.0, -50.0, 20.0), d)
    vol = read_image(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, (2.5, 0.75, 0.75), atol=1e-4)
    np.testing.assert_allclose(vol.origin, (-100.0, -50.0, 20.0), atol=1e-4)
    np.testing.assert_allclose(vol.direction, d, atol=1e-5)
    np.testing.assert_allclose(vol.voxel_to_world((3, 0, 0)), (-100.0, -50.0, 27.5), atol=1e-4)


def test_annotations_csv_roundtrip_keeps_extra_columns(tmp_path):
    rows = [dict(seriesuid="case_000", coordX=-12.5, coordY=40.25, coordZ=-101.0, diameter_mm=7.3, type="T04",
                 location="juxta-pleural", label=1, texture=4.5),
            dict(seriesuid="case_001", coordX=1.0, coordY=2.0, coordZ=3.0, diameter_mm=12.0, type="T09",
                 location="isolated", label=2, texture=None)]
    p = write_annotations_csv(tmp_path / "a.csv", rows)
    back = read_annotations_csv(p)
    assert back[0]["type"] == "T04" and back[0]["location"] == "juxta-pleural"
    assert back[0]["label"] == 1 and isinstance(back[0]["label"], int)
    assert back[0]["coordY"] == 40.25 and back[0]["texture"] == 4.5
    assert back[1]["texture"] is None
    assert list(back[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "type", "location",
                             "label", "texture"]


def test_candidates_csv_roundtrip(tmp_path):
    rows = [dict(seriesuid="s1", coordX=-1.123456789, coordY=2.5, coordZ=-300.0, probability=0.875),
            dict(seriesuid="s2", coordX=0.0, coordY=0.0, coordZ=0.0, probability=1e-7)]
    p = write_candidates_csv(tmp_path / "c.csv", rows)
    assert p.read_text(encoding="utf-8").splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"
    back = read_candidates_csv(p)
    for a, b in zip(rows, back):
        assert a == {k: b[k] for k in a}


def test_csv_missing_column_and_bad_number(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("seriesuid,coordX,coordY,diameter_mm\na,1,2,3\n")
    with pytest.raises(DataError, match=r"bad.csv.*missing columns \['coordZ'\]"):
        read_annotations_csv(p)
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,two,3,4\n")
    with pytest.raises(DataError, match=r"bad.csv: line 2: column coordY"):
        read_annotations_csv(p)


def test_load_dataset_json_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    meta = {"name": "x", "training": [
        {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz", "case_id": "a", "split": "validation"},
        {"image": "imagesTr/b.nii.gz"}]}
    (tmp_path / "sub" / "dataset.json").write_text(json.dumps(meta))
    cases = load_dataset_json(tmp_path / "sub" / "dataset.json")
    assert cases[0]["image"] == str((tmp_path / "sub" / "imagesTr" / "a.nii.gz").resolve())
    assert cases[0]["label"] == str((tmp_path / "sub" / "labelsTr" / "a.nii.gz").resolve())
    assert cases[0]["split"] == "validation"
    assert cases[1] == {"image": str((tmp_path / "sub/imagesTr/b.nii.gz").resolve()), "label": None,
                        "case_id": "b", "split": "train"}


# ------------------------------------------------------------------------------------------ bad input

def test_truncated_nifti(tmp_path):
    p = write_image(tmp_path / "t.nii.gz", make_volume(shape=(8, 16, 16)))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t.nii.gz: cannot read as NIfTI"):
        read_image(p)


def test_garbage_files(tmp_path):
    p = tmp_path / "g.nii.gz"
    p.write_bytes(gzip.compress(b"not a nifti" * 10))
    with pytest.raises(DataError, match="g.nii.gz: cannot read"):
        read_image(p)
    q = tmp_path / "g.mha"
    q.write_text("NDims = 3\nElementSpacing = 1 1 1\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"
                 "ElementDataFile = LOCAL\nshort")
    with pytest.raises(DataError, match="g.mha: cannot read"):
        read_image(q)
    with pytest.raises(DataError, match="nothere.nii.gz: file or folder not found"):
        read_image(tmp_path / "nothere.nii.gz")


def test_2d_and_4d_volumes(tmp_path):
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), str(tmp_path / "two.nii.gz"))
    with pytest.raises(DataError, match=r"two.nii.gz: expected a 3D volume, got 2D"):
        read_image(tmp_path / "two.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(DataError, match=r"four.nii.gz: expected a 3D volume, got 4D"):
        read_image(tmp_path / "four.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(tmp_path / "two.mha"))
    with pytest.raises(DataError, match=r"two.mha: expected a 3D volume, got 2D"):
        read_image(tmp_path / "two.mha")
    # a trailing singleton 4th axis (common in NIfTI) is accepted as 3D
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 1), np.float32), np.eye(4)), str(tmp_path / "t1.nii.gz"))
    assert read_image(tmp_path / "t1.nii.gz").shape == (7, 6, 5)


def test_nan_voxels_raise_or_repair(tmp_path, caplog):
    vol = make_volume()
    vol.array[1, 2, 3] = np.nan
    vol.array[0, 0, 0] = np.inf
    p = write_image(tmp_path / "n.nii.gz", vol)
    with pytest.raises(DataError, match=r"n.nii.gz: 2 voxels are NaN or infinite"):
        read_image(p)
    with caplog.at_level("WARNING"):
        fixed = read_image(p, nan_policy="repair")
    assert np.isfinite(fixed.array).all()
    finite = vol.array[np.isfinite(vol.array)]
    assert fixed.array[1, 2, 3] == finite.min() and fixed.array[0, 0, 0] == finite.min()
    assert "2 NaN/inf voxels replaced" in caplog.text


def test_zero_and_missing_spacing(tmp_path):
    import nibabel as nib
    # sform present but its z column is zero
    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.diag([0.7, 0.7, 2.0, 1.0]))
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "z.nii"))
    raw = bytearray((tmp_path / "z.nii").read_bytes())
    raw[312:328] = np.array([0, 0, 0, -5], "<f4").tobytes()  # srow_z of the NIfTI-1 header
    (tmp_path / "z.nii").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"z.nii: spacing .* expected finite values > 0"):
        read_image(tmp_path / "z.nii")
    # no qform/sform and a zero pixdim: spacing missing (nibabel alone would silently use 1 mm)
    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = [0.7, 0.7, 0.0]
    nib.save(img, str(tmp_path / "m.nii.gz"))
    with pytest.raises(DataError, match=r"m.nii.gz: spacing missing"):
        read_image(tmp_path / "m.nii.gz")
    q = tmp_path / "nospacing.mha"
    q.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                  b"ElementDataFile = LOCAL\n" + bytes(8))
    with pytest.raises(DataError, match="nospacing.mha: MetaImage header has no ElementSpacing"):
        read_image(q)


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no DICOM series"):
        read_image(tmp_path / "empty")


def test_dicom_read_keeps_the_text_encoding(tmp_path):
    """GDCM switches the locale to "C"; after a DICOM read, Python must still write UTF-8 text by default."""
    import locale
    before = locale.getpreferredencoding(False)
    test_dicom_series_read(tmp_path)
    assert locale.getpreferredencoding(False) == before


# --------------------------------------------------------------------------------------------------- atomic writers

class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_write_image_is_atomic(tmp_path, monkeypatch, suffix):
    """A writer that dies half-way leaves the previous file intact and no temporary file behind."""
    import nibabel as nib
    p = write_image(tmp_path / f"a{suffix}", make_volume())
    before = p.read_bytes()

    def dies(img, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise _Boom("killed")
    monkeypatch.setattr(nib, "save", dies)
    monkeypatch.setattr(sitk, "WriteImage", dies)
    with pytest.raises(_Boom):
        write_image(p, make_volume(seed=1))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


def test_write_annotations_csv_and_dataset_json_are_atomic(tmp_path):
    from ahnet.data.io import write_dataset_json
    rows = [dict(seriesuid="a", coordX=1.0, coordY=2.0, coordZ=3.0, diameter_mm=4.0)]
    p = write_annotations_csv(tmp_path / "a.csv", rows)
    before = p.read_bytes()

    class Unprintable:
        def __str__(self):
            raise _Boom("killed while writing")
    with pytest.raises(_Boom):
        write_annotations_csv(p, [dict(rows[0], coordX=9.0), dict(rows[0], coordX=Unprintable())])
    assert p.read_bytes() == before
    q = write_dataset_json(tmp_path / "dataset.json", {"training": [{"image": "x.nii.gz"}]})
    assert json.loads(q.read_text(encoding="utf-8")) == {"training": [{"image": "x.nii.gz"}]}
    with pytest.raises(TypeError):
        write_dataset_json(q, {"training": [object()]})
    assert json.loads(q.read_text(encoding="utf-8")) == {"training": [{"image": "x.nii.gz"}]}
    with pytest.raises(DataError, match="dataset.json content must be a dict"):
        write_dataset_json(q, [1, 2])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.csv", "dataset.json"]
