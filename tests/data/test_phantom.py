"""The chest phantom: determinism, tissue HU, the vessel confounder, outputs, types, reserved LIDC scans."""
import csv
import hashlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from ahnet.data import phantom as ph
from ahnet.data.nodule_types import TYPE_CODES

SMALL = dict(size=96, slices=12, thickness=2.5, spacing=1.2)


def small_opts(**kw):
    return ph.PhantomOptions(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def quiet_case():
    types = ["T10", "T08", "T03", "T12"]
    return ph.generate_case("q", 7, small_opts(noise=(0.0, 0.0)), n_nodules=4, types=types,
                            locations=list(ph.LOCATIONS))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    p = ph.generate_dataset(out, 7, seed=3, previews=1, nodules_per_case=(2, 2), negatives=0.15, **SMALL)
    return out, p


def test_deterministic_from_seed():
    a = ph.generate_case("a", 11, small_opts(), n_nodules=2)
    b = ph.generate_case("a", 11, small_opts(), n_nodules=2)
    c = ph.generate_case("a", 12, small_opts(), n_nodules=2)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert a.nodules == b.nodules
    assert a.image.tobytes() != c.image.tobytes()


def test_grid_and_acquisition(quiet_case):
    c = quiet_case
    assert c.image.shape == (12, 96, 96) and c.image.dtype == np.float32 and c.label.dtype == np.int16
    assert c.fine_dz <= 1.2 + 1e-9 and c.fine_tissue.shape[0] * c.fine_dz == pytest.approx(12 * 2.5)
    k = c.fine_tissue.shape[0] // 12
    # with noise off, an output voxel far from edges equals the mean of its fine slices (slice profile)
    z, y, x = 5, 48, 2          # outside the body: air
    assert c.image[z, y, x] == -1000
    box = c.fine_hu.reshape(12, k, 96, 96).mean(1)                  # box slice profile over k fine slices
    expect = np.round(ndi.gaussian_filter(box, sigma=(0, 0.5, 0.5), mode="nearest"))
    assert np.abs(c.image - expect).max() <= 1.0
    # a thin structure loses contrast: the thick-slice image is not just one fine slice
    assert np.abs(c.image - c.fine_hu[k // 2::k]).max() > 100


def test_tissue_hu(quiet_case):
    t, hu = quiet_case.fine_tissue, quiet_case.fine_hu
    T = ph.TISSUE
    for name, lo, hi in [("air", -1000, -1000), ("fat", -115, -85), ("muscle", 30, 50), ("cortical", 700, 1000),
                         ("marrow", 200, 300), ("vessel", 40, 40), ("airway_lumen", -1000, -1000),
                         ("airway_wall", 40, 40), ("fissure", -700, -700), ("lung", -900, -800)]:
        v = hu[t == T[name]]
        assert v.size > 0, name
        assert lo - 1e-3 <= v.min() and v.max() <= hi + 1e-3, (name, v.min(), v.max())
    lung = hu[t == T["lung"]]
    assert abs(lung.mean() + 850) < 15 and 3 < lung.std() < 40      # smooth variation of a few tens of HU
    nod = hu[t == T["nodule"]]
    assert nod.size > 0
    for nd in quiet_case.nodules:
        assert nd["type"] in TYPE_CODES


def test_nodule_compositions():
    cases = {code: ph.generate_case("c", 21, small_opts(noise=(0.0, 0.0)), n_nodules=1, types=[code],
                                    locations=["isolated"]) for code in ("T10", "T08", "T03", "T12")}
    for code, c in cases.items():
        assert len(c.nodules) == 1
        fine_nod = c.fine_hu[c.fine_tissue == ph.TISSUE["nodule"]]
        typ = c.nodules[0]["type"]
        if typ in ("T09", "T10"):
            assert -720 <= np.median(fine_nod) <= -380
        elif typ in ("T07", "T08"):
            assert fine_nod.min() < -380 and fine_nod.max() > 10            # GGO with a solid core
        elif typ in ("T11", "T12"):
            assert fine_nod.max() >= 190
        else:
            assert 5 <= np.median(fine_nod) <= 75


def test_vessel_confounder(quiet_case):
    """Per case, vessel cross-sections of nodule-like in-plane diameter (3-10 mm) in the output slices."""
    c = quiet_case
    k = c.fine_tissue.shape[0] // c.image.shape[0]
    n = 0
    for z in range(c.image.shape[0]):
        lab, nl = ndi.label(c.fine_tissue[z * k + k // 2] == ph.TISSUE["vessel"])
        if nl:
            d = np.sqrt(4 * np.bincount(lab.ravel())[1:] * c.spacing[1] * c.spacing[2] / np.pi)
            n += int(((d >= 3) & (d <= 10)).sum())
    assert n >= 10
    # and the vessels run in all directions: many segments have a large through-plane component
    dirs = np.array([(b - a) / (np.linalg.norm(b - a) + 1e-9) for a, b, _, _ in c.vessel_segments])
    assert (np.abs(dirs[:, 0]) > 0.7).mean() > 0.1 and (np.abs(dirs[:, 0]) < 0.3).mean() > 0.1


def test_outputs_readable_affine_and_annotations(dataset):
    out, p = dataset
    ds = json.loads(p.read_text(encoding="utf-8"))
    assert ds["numTraining"] == 7 and len(ds["training"]) == 7
    assert {e["split"] for e in ds["training"]} == {"train", "validation", "test"}
    rows = list(csv.DictReader(open(out / "annotations.csv")))
    assert list(rows[0].keys()) == ph.CSV_COLUMNS
    per_case = {}
    for r in rows:
        per_case.setdefault(r["seriesuid"], []).append(r)
    assert len(per_case) == 6                                                 # negatives present
    for e in ds["training"]:
        img = nib.load(out / e["image"])
        lab = nib.load(out / e["label"])
        aff = img.affine
        assert np.allclose(np.abs(np.diag(aff)[:3]), [1.2, 1.2, 2.5])
        assert aff[0, 0] < 0 and aff[1, 1] < 0 and aff[2, 2] > 0               # LPS world, RAS affine
        assert np.allclose(aff, lab.affine) and img.shape == (96, 96, 12)
        assert lab.get_data_dtype() == np.int16
        L = np.asarray(lab.dataobj)
        assert set(np.unique(L)) == {0} | {int(r["label"]) for r in per_case.get(e["case_id"], [])}
        for r in per_case.get(e["case_id"], []):
            lps = np.array([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])])
            ras = lps * [-1, -1, 1]
            ijk = np.linalg.solve(aff[:3, :3], ras - aff[:3, 3])
            assert L[tuple(np.round(ijk).astype(int))] == int(r["label"])     # the point lies in its nodule
            assert float(r["diameter_mm"]) > 2.5 and r["location"] in ph.LOCATIONS
    assert list((out / "preview").glob("*.png"))


def test_balanced_types_and_reserved_scans(dataset):
    out, _ = dataset
    rows = list(csv.DictReader(open(out / "annotations.csv")))
    types = [r["type"] for r in rows]
    assert len(rows) == 12                                                  # 6 positive cases x 2
    # 12 scheduled nodules, one of each type; a painted size can cross a bin edge, so allow one miss
    assert len(set(types)) >= 11 and max(types.count(t) for t in set(types)) <= 2
    split_of = {e["case_id"]: e["split"] for e in json.load(open(out / "dataset.json"))["training"]}
    pool = ph._get_pool(1.2)
    for r in rows:
        if r["lidc_scan_id"]:
            sid = int(r["lidc_scan_id"])
            assert sid % 5 != 0
            assert ph.lidc_split_of_scan(sid) == split_of[r["seriesuid"]]     # disjoint LIDC scans per split
            ann = pool.db.annotations[int(r["lidc_annotation_id"])]           # the source annotation is named
            assert ann.scan_id == sid and int(r["shape_reuse"]) == 0
        else:
            assert r["lidc_annotation_id"] == ""


def test_shape_pool_never_reserved():
    """The split pools never draw a reserved scan (id % 5 == 0); only the sealed final pool does."""
    pool = ph._get_pool(1.2)
    if pool == "procedural":
        pytest.skip("no LIDC database")
    ids = [a for s in ph.SPLITS for lst in pool.by[s].values() for a in lst]
    assert ids and all(pool.db.annotations[a].scan_id % 5 != 0 for a in ids)
    final = [a for lst in pool.by["final"].values() for a in lst]
    assert final and all(pool.db.annotations[a].scan_id % 5 == 0 for a in final)
    scans = {s: {pool.db.annotations[a].scan_id for lst in pool.by[s].values() for a in lst} for s in ph.SPLITS}
    assert not (scans["train"] & scans["validation"]) and not (scans["train"] & scans["test"])
    assert all(len(pool.by["train"][c]) > 0 for c in TYPE_CODES)


def test_procedural_fallback_types():
    c = ph.generate_case("p", 5, small_opts(shapes="procedural", noise=(0.0, 0.0)), n_nodules=4,
                         types=["T01", "T05", "T06", "T09"], locations=["isolated"] * 4)
    got = [n["type"] for n in c.nodules]
    assert len(got) >= 3 and all(n["lidc_scan_id"] == "" for n in c.nodules)
    assert sum(g == w for g, w in zip(got, ["T01", "T05", "T06", "T09"])) >= 3


def test_a_kernel_range_draws_one_kernel_per_scan_and_changes_nothing_else(tmp_path):
    """psf_sigma=(min, max) (the randomised-kernel lever): each scan's sigma is drawn in the range after its
    noise, so the scan equals, voxel for voxel, the one a fixed sigma of that value renders (same anatomy,
    nodules, noise); dataset.json records each scan's sigma (and only for a range); the CLI's --psf-sigma."""
    ranged = ph.generate_case("k", 5, small_opts(psf_sigma=(0.25, 1.0)), n_nodules=2)
    assert 0.25 <= ranged.psf_sigma <= 1.0 and ranged.psf_sigma not in (0.25, 0.5, 1.0)
    fixed = ph.generate_case("k", 5, small_opts(psf_sigma=ranged.psf_sigma), n_nodules=2)
    usual = ph.generate_case("k", 5, small_opts(), n_nodules=2)
    np.testing.assert_array_equal(ranged.image, fixed.image)
    assert ranged.nodules == usual.nodules and ranged.noise_std == usual.noise_std and usual.psf_sigma == 0.5
    assert np.array_equal(ranged.label, usual.label) and not np.array_equal(ranged.image, usual.image)
    from ahnet.commands.phantom import main as phantom_cli
    small = ["--cases", "3", "--seed", "1", "--previews", "0", "--nodules-per-case", "1", "--shapes", "procedural",
             "--size", "96", "--slices", "12", "--spacing", "1.2"]
    assert phantom_cli(["--out", str(tmp_path / "k"), "--psf-sigma", "0.3,0.9", *small]) == 0
    doc = json.loads((tmp_path / "k" / "dataset.json").read_text())
    sigmas = [e["psf_sigma"] for e in doc["training"]]
    assert len(set(sigmas)) == 3 and all(0.3 <= s <= 0.9 for s in sigmas) and doc["options"][
        "psf_sigma"] == [0.3, 0.9]
    assert phantom_cli(["--out", str(tmp_path / "f"), "--psf-sigma", "0.5", *small]) == 0
    doc = json.loads((tmp_path / "f" / "dataset.json").read_text())
    assert doc["options"]["psf_sigma"] == 0.5 and "psf_sigma" not in doc["training"][0]
    for bad in ((1.0, 0.5), (0.5, 4.0), (0.1, 0.2, 0.3), -0.5):
        with pytest.raises(ValueError, match="psf_sigma must be a sigma or a"):
            small_opts(psf_sigma=bad).validate()


def test_bad_options():
    with pytest.raises(ValueError, match="shapes"):
        ph.generate_case("b", 0, small_opts(shapes="random"))
    with pytest.raises(ValueError, match="size"):
        ph.generate_case("b", 0, small_opts(size=8))


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "ahnet.data.phantom", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--out", "--cases", "--seed", "--size", "--slices", "--thickness", "--spacing",
                 "--nodules-per-case", "--negatives", "--shapes", "--noise", "--psf-sigma"):
        assert flag in r.stdout


def test_test_only_dataset(tmp_path):
    """split=(0, 0, 1) gives a held-out set: every case in the test split (the experiment's extra test phantom)."""
    import json as _json
    from ahnet.data.phantom import generate_dataset as _gen
    p = _gen(tmp_path / "t", 3, seed=5, size=64, slices=8, split=(0, 0, 1), previews=0, nodules_per_case=(0, 1))
    assert [e["split"] for e in _json.loads(p.read_text(encoding="utf-8"))["training"]] == ["test"] * 3
    # also with fewer than 3 cases (they used to fall back to "train")
    p = _gen(tmp_path / "t2", 2, seed=5, size=64, slices=8, split=(0, 0, 1), previews=0, nodules_per_case=0)
    assert [e["split"] for e in _json.loads(p.read_text(encoding="utf-8"))["training"]] == ["test"] * 2


# ----------------------------------------------------------------------------- pinned output (issue 10 split)
TINY = dict(size=64, slices=10, thickness=2.5, spacing=1.2)
LEGACY_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "type", "location", "label",
                  "volume_mm3", "texture", "spiculation", "lobulation", "calcification", "subtlety", "lidc_scan_id"]
# sha1 digests computed with the single-module phantom.py before it became a package (commit 0bca67a): the
# same seed must give the same arrays and the same annotation rows. Per numpy major version: numpy 1.26 (which the
# serve extra's nvidia-pytriton requires) and 2.x round 146 voxels of the intermediate fine_hu one float32 ulp
# apart (<= 6.1e-5 HU); images, labels, the dataset files and the rows are the same under both.
PINNED = {("procedural", 2): ("70fb9643214ec128e93da3b7fb3615ca121ac888", "6ede5e5f1106d441b872c42e68219c2913274514"),
          ("lidc", 2): ("eaf575bdcd745f75c900ef6358289cc3665af16d", "9328b9ab71ac254bc3f926d97ba068bc1b1d35df"),
          ("procedural", 1): ("d7044f7c2e70453d6d02014cbdf04354c83a5428", "6ede5e5f1106d441b872c42e68219c2913274514"),
          ("lidc", 1): ("d8bed4152c64e909823ac101d0ee32962a967690", "9328b9ab71ac254bc3f926d97ba068bc1b1d35df")}
NUMPY_MAJOR = int(np.__version__.split(".")[0])


def _case_digest(shapes):
    c = ph.generate_case("tiny", 2024, ph.PhantomOptions(**TINY, shapes=shapes), n_nodules=3,
                         types=["T02", "T06", "T12"], locations=["isolated", "juxta-pleural", "juxta-vascular"])
    h = hashlib.sha1()
    for a in (c.image, c.label, c.fine_tissue, c.fine_hu):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([{k: n[k] for k in LEGACY_COLUMNS} for n in c.nodules], sort_keys=True).encode())
    return h.hexdigest()


def _dataset_digest(out, shapes):
    p = ph.generate_dataset(out, 3, seed=0, previews=0, shapes=shapes, nodules_per_case=(1, 2), **TINY)
    h = hashlib.sha1()
    for e in json.loads(p.read_text(encoding="utf-8"))["training"]:
        for k in ("image", "label"):
            img = nib.load(out / e[k])
            h.update(np.asarray(img.dataobj).tobytes())
            h.update(np.round(img.affine, 6).tobytes())
        h.update(e["split"].encode())
    rows = [{k: r[k] for k in LEGACY_COLUMNS} for r in csv.DictReader(open(out / "annotations.csv", newline=""))]
    h.update(json.dumps(rows, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("shapes", ["procedural", "lidc"])
def test_same_seed_same_output_as_before_the_split(tmp_path, shapes):
    if shapes == "lidc" and ph._get_pool(TINY["spacing"]) == "procedural":
        pytest.skip("no LIDC database")
    assert (_case_digest(shapes), _dataset_digest(tmp_path, shapes)) == PINNED[shapes, NUMPY_MAJOR]


def test_files_written_only_through_io():
    """io.py is the one writer of NIfTI, CSV and dataset.json: the phantom package imports no writer library."""
    import ast
    from pathlib import Path
    banned = {"nibabel", "SimpleITK", "csv", "json"}
    for f in Path(ph.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not {n.split(".")[0] for n in names} & banned, (f.name, names)


def test_interrupted_run_leaves_no_finished_looking_dataset(tmp_path, monkeypatch):
    """A run killed half-way into a folder that held a finished dataset: no dataset.json, no annotations, no
    temp files; the next run writes the same files as a run into an empty folder."""
    from ahnet.data.phantom import dataset as dsmod
    out = tmp_path / "d"
    ph.generate_dataset(out, 3, seed=1, previews=0, shapes="procedural", **TINY)
    (out / "imagesTr" / ".phantom_0001.nii.gz.tmp-999.nii.gz").write_bytes(b"left by a kill")
    real = dsmod.generate_case

    def dies_on_second(cid, *a, **k):
        if cid.endswith("1"):
            raise KeyboardInterrupt
        return real(cid, *a, **k)
    monkeypatch.setattr(dsmod, "generate_case", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        ph.generate_dataset(out, 2, seed=1, previews=0, shapes="procedural", **TINY)
    assert not (out / "dataset.json").exists() and not (out / "annotations.csv").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(dsmod, "generate_case", real)
    ph.generate_dataset(out, 2, seed=1, previews=0, shapes="procedural", **TINY)
    fresh = tmp_path / "fresh"
    ph.generate_dataset(fresh, 2, seed=1, previews=0, shapes="procedural", **TINY)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert (out / "annotations.csv").read_bytes() == (fresh / "annotations.csv").read_bytes()
    for f in files:
        if f.endswith(".nii.gz"):
            assert np.array_equal(np.asarray(nib.load(out / f).dataobj), np.asarray(nib.load(fresh / f).dataobj))
