"""Preprocessing and the HDF5 cache: values, geometry, rebuild/skip, atomic writes, bad input."""
import json
import os

import h5py
import numpy as np
import pytest
from ._pipeline_synth import make_dataset

import ahnet.data.cache as cache_mod
from ahnet.commands import cache as cache_cmd
from ahnet.data.cache import build_cache
from ahnet.data.io import DataError, Volume, read_image, write_image
from ahnet.data.preprocess import clip_and_scale, hu_from_scaled, resample, scaled_from_hu


def test_clip_and_scale_values():
    hu = np.array([-3000, -1000, -300, 400, 2000], np.float32)
    np.testing.assert_allclose(clip_and_scale(hu), [0, 0, 0.5, 1, 1], atol=1e-7)
    assert clip_and_scale(hu).dtype == np.float32


def test_hu_and_the_scaled_image_convert_both_ways():
    """The one conversion every reader of the scaled cache uses (samplers, overviews, gallery crops): equal to
    clip_and_scale inside the window, linear beyond it, and undone by hu_from_scaled."""
    hu = np.array([-1000, -600, -400, 0, 400], np.float64)
    np.testing.assert_allclose(scaled_from_hu(hu), clip_and_scale(hu), atol=1e-7)
    assert scaled_from_hu(-1350.0) == pytest.approx(-0.25) and scaled_from_hu(1100.0) == pytest.approx(1.5)
    np.testing.assert_allclose(hu_from_scaled(scaled_from_hu(hu)), hu, atol=1e-9)


def test_resample_inplane_keeps_z_and_world():
    # a linear ramp in world x is reproduced exactly by linear resampling
    vol = Volume(np.zeros((5, 20, 30), np.float32), (3.0, 0.6, 0.6), (10.0, -5.0, 2.0), np.eye(3))
    vol.array[:] = np.arange(30, dtype=np.float32)[None, None, :] * 0.6
    r = resample(vol, (1.2, 1.2))
    assert r.shape == (5, 10, 15) and r.spacing == (3.0, 1.2, 1.2) and r.origin == vol.origin
    interior = r.array[:, :, :-1]  # last column samples past the old edge (nearest mode)
    np.testing.assert_allclose(interior, (np.arange(14) * 1.2)[None, None, :].repeat(10, 1).repeat(5, 0),
                               atol=1e-5)
    # the same world point maps to corresponding voxels on both grids
    np.testing.assert_allclose(r.voxel_to_world((2, 3, 4)), vol.voxel_to_world((2, 6, 8)))
    # z too when asked; nearest for masks keeps dtype and label values
    lab = Volume((np.arange(5 * 20 * 30) % 3).reshape(5, 20, 30).astype(np.int16), vol.spacing, vol.origin)
    rl = resample(lab, (1.5, 1.2, 1.2), order=0)
    assert rl.shape == (10, 10, 15) and rl.array.dtype == np.int16
    assert set(np.unique(rl.array)) <= {0, 1, 2}
    np.testing.assert_array_equal(rl.array[::2, :, :], lab.array[:, ::2, ::2])


def test_build_cache_contents(tmp_path):
    js, csv = make_dataset(tmp_path / "ds")
    paths = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    assert [p.name for p in paths] == ["case_000.h5", "case_001.h5", "case_002.h5"]
    src = read_image(tmp_path / "ds/imagesTr/case_001.nii.gz")
    with h5py.File(paths[1], "r") as f:
        np.testing.assert_allclose(f["image"][...], clip_and_scale(src.array), atol=1e-6)
        assert f["label"].dtype == np.int16 and f["image"].chunks is not None
        assert set(np.unique(f["label"][...])) == {0, 1, 2}
        np.testing.assert_allclose(f.attrs["spacing"], src.spacing)
        np.testing.assert_allclose(f.attrs["origin"], src.origin)
        np.testing.assert_allclose(np.reshape(f.attrs["direction"], (3, 3)), src.direction)
        assert f.attrs["case_id"] == "case_001" and f.attrs["split"] == "train"
        nod = json.loads(f.attrs["nodules"])
        assert [n["label"] for n in nod] == [1, 2] and nod[0]["type"] == "T02"
        np.testing.assert_allclose(nod[0]["center_zyx"], (6, 20, 24), atol=1e-6)
        np.testing.assert_allclose(nod[1]["center_zyx"], (4, 36, 12), atol=1e-6)
        fg = f["fg_voxels"][...]
        assert len(fg) == int((f["label"][...] > 0).sum())
        assert np.all(f["label"][...][tuple(fg[:, :3].T)] == fg[:, 3])
    with h5py.File(paths[2], "r") as f:
        assert json.loads(f.attrs["nodules"]) == [] and f["fg_voxels"].shape == (0, 4)


def test_build_cache_resampled_and_nodules_from_mask(tmp_path):
    js, _ = make_dataset(tmp_path / "ds", n_cases=2)
    paths = build_cache(js, tmp_path / "cache", target_spacing=(1.6, 1.6), progress=False)
    with h5py.File(paths[1], "r") as f:
        assert f["image"].shape == (12, 24, 24)
        np.testing.assert_allclose(f.attrs["spacing"], (2.5, 1.6, 1.6))
        nod = json.loads(f.attrs["nodules"])
        # centre of mass on the coarser grid: (6, 20, 24) -> (6, 10, 12) within half a voxel
        np.testing.assert_allclose(nod[0]["center_zyx"], (6, 10, 12), atol=0.5)
        assert 6.0 < nod[0]["diameter_mm"] < 10.0


def target_name(tmp) -> str:
    """The file a temporary of ahnet.atomic stands for (``.case_001.h5.tmp-123`` -> ``case_001.h5``)."""
    return tmp.name[1:].split(".tmp-")[0]


def test_rebuild_on_change_skip_when_unchanged(tmp_path, monkeypatch):
    js, csv = make_dataset(tmp_path / "ds")
    build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    written = []
    real = cache_mod._write_h5
    monkeypatch.setattr(cache_mod, "_write_h5", lambda p, *a, **k: (written.append(target_name(p)), real(p, *a, **k)))
    build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    assert written == []
    # change one source image: only that case is rebuilt, and the content follows the new source
    img = read_image(tmp_path / "ds/imagesTr/case_001.nii.gz")
    img.array[0, 0, 0] = 400.0
    write_image(tmp_path / "ds/imagesTr/case_001.nii.gz", img)
    build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    assert written == ["case_001.h5"]
    with h5py.File(tmp_path / "cache/case_001.h5", "r") as f:
        assert f["image"][0, 0, 0] == 1.0
    # a change of build settings rebuilds everything
    written.clear()
    build_cache(js, tmp_path / "cache", annotations_csv=csv, target_spacing=(1.6, 1.6), progress=False)
    assert written == ["case_000.h5", "case_001.h5", "case_002.h5"]


def test_killed_write_leaves_the_old_cache_as_it_was(tmp_path, monkeypatch):
    """A build is renamed into place as a whole: a kill while case_001 is written (the settings changed, so all
    three are rebuilt) leaves the three old files byte for byte and no temporary; a first build killed leaves no
    folder at all."""
    js, csv = make_dataset(tmp_path / "ds")
    build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    import h5py as h5

    class Killed(BaseException):  # like KeyboardInterrupt: not swallowed by except Exception
        pass

    real_create = h5.Group.create_dataset
    labels = []

    def dying(self, name, *a, **k):          # the second case's label: case_001 (the files are made in memory)
        if name == "label":
            labels.append(1)
            if len(labels) == 2:
                raise Killed()
        return real_create(self, name, *a, **k)

    monkeypatch.setattr(h5.Group, "create_dataset", dying)
    for folder, kw in (("cache", {"target_spacing": (1.6, 1.6)}), ("first", {})):
        labels.clear()
        with pytest.raises(Killed):
            build_cache(js, tmp_path / folder, annotations_csv=csv, progress=False, **kw)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    assert not (tmp_path / "first").exists()
    monkeypatch.undo()
    # a really killed process would leave its tmp file: it never matches *.h5 and the next build is complete
    (tmp_path / "cache/.case_001.h5.tmp-99999").write_bytes(b"half")
    paths = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    assert [p.name for p in paths] == ["case_000.h5", "case_001.h5", "case_002.h5"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [p.name for p in paths]


def test_truncated_cache_file_is_rebuilt(tmp_path):
    js, csv = make_dataset(tmp_path / "ds", n_cases=1, empty_cases=())
    (p,) = build_cache(js, tmp_path / "cache", progress=False)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    (p,) = build_cache(js, tmp_path / "cache", progress=False)
    with h5py.File(p, "r") as f:
        assert f["image"].shape == (12, 48, 48)


def _break(root, how):
    img_p, lab_p = root / "imagesTr/case_001.nii.gz", root / "labelsTr/case_001.nii.gz"
    img, lab = read_image(img_p), read_image(lab_p, dtype=None)
    if how == "truncated":
        b = img_p.read_bytes()
        img_p.write_bytes(b[: len(b) // 2])
    elif how == "2d":
        import nibabel as nib
        nib.save(nib.Nifti1Image(np.zeros((48, 48), np.float32), np.eye(4)), str(img_p))
    elif how == "4d":
        import nibabel as nib
        nib.save(nib.Nifti1Image(np.zeros((48, 48, 12, 3), np.float32), np.eye(4)), str(img_p))
    elif how == "nan":
        img.array[3, 3, 3] = np.nan
        write_image(img_p, img)
    elif how == "mask_shape":
        write_image(lab_p, lab.array[:, :, :-2], like=lab)
    elif how == "zero_spacing":
        write_image(img_p.with_suffix("").with_suffix(".nii"), img)
        img_p.unlink()
        p = img_p.with_suffix("").with_suffix(".nii")
        raw = bytearray(p.read_bytes())
        raw[312:328] = np.array([0, 0, 0, -100], "<f4").tobytes()  # srow_z: z spacing 0
        raw[252:254] = np.array([0], "<i2").tobytes()                  # qform_code 0: sform is used
        p.write_bytes(bytes(raw))
        js = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        js["training"][1]["image"] = "./imagesTr/case_001.nii"
        (root / "dataset.json").write_text(json.dumps(js))
    elif how == "outside":
        with open(root / "annotations.csv", "a") as f:
            f.write("case_001,500.0,0.0,-100.0,6.0,T01,isolated,3\n")


BAD = {"truncated": r"case_001.nii.gz: cannot read as NIfTI",
       "2d": r"case_001.nii.gz: expected a 3D volume, got 2D",
       "4d": r"case_001.nii.gz: expected a 3D volume, got 4D",
       "nan": r"case_001.nii.gz: 1 voxels are NaN",
       "mask_shape": r"labelsTr/case_001.nii.gz: mask shape \(z, y, x\) \(12, 48, 46\) differs from image",
       "zero_spacing": r"case_001.nii: spacing .* expected finite values > 0",
       "outside": r"annotations.csv: the nodule of case_001 at world .* lies outside its scan"}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_input_clear_error_and_no_entry(tmp_path, how):
    js, csv = make_dataset(tmp_path / "ds")
    good = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    assert (tmp_path / "cache/case_001.h5").exists()
    _break(tmp_path / "ds", how)
    with pytest.raises(DataError, match=BAD[how]):
        build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    # the stale entry of the broken case is gone; a fresh cache dir gets no entry either
    assert not (tmp_path / "cache/case_001.h5").exists()
    paths = build_cache(js, tmp_path / "fresh", annotations_csv=csv, progress=False, errors="skip")
    assert [p.name for p in paths] == [good[0].name, good[2].name]
    assert sorted(os.listdir(tmp_path / "fresh")) == ["case_000.h5", "case_002.h5"]


def test_nan_repair_policy_builds(tmp_path):
    js, csv = make_dataset(tmp_path / "ds")
    _break(tmp_path / "ds", "nan")
    paths = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False, nan_policy="repair")
    with h5py.File(paths[1], "r") as f:
        assert np.isfinite(f["image"][...]).all()


def test_cli_builds_and_reports_bad_input(tmp_path, capsys):
    js, csv = make_dataset(tmp_path / "ds", n_cases=2)
    assert cache_cmd.main(["--data", str(js), "--out", str(tmp_path / "c")]) == 0
    assert "2 cases cached" in capsys.readouterr().out
    _break(tmp_path / "ds", "nan")
    assert cache_cmd.main(["--data", str(js), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ahnet.commands.cache: error: ") and "case_001.nii.gz: 1 voxels are NaN" in err
    assert err.count("\n") == 1
