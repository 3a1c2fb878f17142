"""The exact schedule and the held-out test phantoms: balanced types and locations, LIDC test shapes only,
distinct lesions before reuse, nodules apart from each other, the CLI flags."""
import collections
import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from ahnet.commands import phantom as phantom_cmd
from ahnet.data import phantom as ph
from ahnet.data.nodule_types import TYPE_CODES
from ahnet.data.phantom import schedule as sch
from ahnet.data.phantom.anatomy import largest_nodule_bound_mm

# the smallest phantom that holds every type (T04 needs >= 15 mm): 96 x 1.2 mm = 115 mm field of view
SMALL = dict(size=96, spacing=1.2, slices=16, thickness=2.5)


def lidc_pool():
    pool = ph._get_pool(0.7)
    if pool == "procedural":
        pytest.skip("no LIDC database")
    return pool


@pytest.fixture(scope="module")
def small_test_phantom(tmp_path_factory):
    """The demo test phantom through the CLI, shrunk: 2 scans x 6 nodules (each type once)."""
    lidc_pool()
    out = tmp_path_factory.mktemp("heldout")
    assert phantom_cmd.main(["--out", str(out), "--test-phantom", "demo", "--cases", "2", "--size", "96", "--spacing",
                    "1.2", "--slices", "16", "--previews", "0"]) == 0
    ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(out / "annotations.csv", newline="", encoding="utf-8")))
    return out, ds, rows


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("total", [240, 24, 12, 30, 7])
def test_balanced_types_exact_counts(total):
    types = sch.balanced_types(np.random.default_rng(total), total)
    counts = collections.Counter(types)
    assert len(types) == total
    assert sum(counts.values()) == total and set(counts) <= set(TYPE_CODES)
    assert all(counts[t] in (total // 12, total // 12 + 1) for t in TYPE_CODES)
    assert types == sch.balanced_types(np.random.default_rng(total), total)          # deterministic
    for start in range(0, total - total % 12, 12):                                    # each block: all 12
        assert sorted(types[start:start + 12]) == list(TYPE_CODES)


@pytest.mark.parametrize("total", [240, 24])
def test_balanced_locations(total):
    types = sch.balanced_types(np.random.default_rng(1), total)
    locs = sch.balanced_locations(np.random.default_rng(2), types)
    assert locs == sch.balanced_locations(np.random.default_rng(2), types)
    cell = collections.Counter(zip(types, locs))
    for t in TYPE_CODES:
        allowed = sch.LOCATIONS_OF_TYPE[t]
        got = [cell[t, l] for l in allowed]
        assert sum(got) == total // 12 and max(got) - min(got) <= 1, (t, got)
        assert all(cell[t, l] == 0 for l in ph.LOCATIONS if l not in allowed)
    assert cell["T04", "isolated"] == 0
    overall = collections.Counter(locs)
    assert set(overall) == set(ph.LOCATIONS)
    if total == 24:
        assert all(v == 6 for v in overall.values())
    else:                      # T04 is never isolated: 11 x 5 isolated, the other classes share the rest
        assert overall["isolated"] == 55 and sorted(overall.values())[1:] == [61, 62, 62]


def test_test_phantom_sizes_meet_the_targets():
    """cpu: >= 240 nodules, >= 20 of each type; demo: every type at least twice; all four classes present."""
    for name, need in (("cpu", 20), ("demo", 2)):
        kw = ph.heldout.test_phantom_options(name)
        total = kw["n_cases"] * kw["nodules_per_case"]
        assert total >= (240 if name == "cpu" else 24)
        types = sch.balanced_types(np.random.default_rng(0), total)
        assert min(collections.Counter(types).values()) >= need
        assert set(sch.balanced_locations(np.random.default_rng(0), types)) == set(ph.LOCATIONS)
        assert kw["split"] == (0.0, 0.0, 1.0) and kw["negatives"] == 0 and kw["exact"]
        o = ph.PhantomOptions(**{k: v for k, v in kw.items() if k != "n_cases"})
        o.validate()
        assert (o.size, o.spacing, o.slices, o.thickness) == (192, 0.7, 40, 2.5)
    with pytest.raises(ValueError, match="fixes split"):
        ph.heldout.test_phantom_options("cpu", split=(1, 0, 0))
    with pytest.raises(ValueError, match="unknown test phantom"):
        ph.heldout.test_phantom_options("gpu")


def test_shape_sources_distinct_lesions_first_then_reuse():
    pool = lidc_pool()
    d_max = largest_nodule_bound_mm(ph.PhantomOptions())
    for t in ("T04", "T07", "T09", "T01"):
        ids = pool.eligible("test", t, d_max)
        n_lesions = len({pool.lesion_of(i) for i in ids})
        n = 2 * n_lesions + 3
        src = sch.shape_sources(np.random.default_rng(0), pool, [t] * n, ["test"] * n, d_max)
        first = [a for a, reuse in src[:n_lesions]]
        assert not any(reuse for _, reuse in src[:n_lesions]) and all(reuse for _, reuse in src[n_lesions:])
        assert len({pool.lesion_of(a) for a in first}) == n_lesions               # each lesion once
        assert {a for a, _ in src} <= set(ids)
        for a, _ in src:
            assert pool.db.annotations[a].scan_id % 10 == 4 and ph.lidc_split_of_scan(
                pool.db.annotations[a].scan_id) == "test"
    with pytest.raises(ValueError, match="no LIDC annotation of type T04"):
        sch.shape_sources(np.random.default_rng(0), pool, ["T04"], ["test"], 12.0)


# ----------------------------------------------------------------------------- a generated test phantom
def test_every_type_and_location_exactly_as_scheduled(small_test_phantom):
    out, ds, rows = small_test_phantom
    assert [e["split"] for e in ds["training"]] == ["test", "test"]
    assert ds["seed"] == ph.held_out_seed(0) == 1_000_003 and ds["options"]["exact"] is True
    assert sorted(r["type"] for r in rows) == list(TYPE_CODES)                      # each type once
    assert collections.Counter(r["location"] for r in rows) == {l: 3 for l in ph.LOCATIONS}
    assert collections.Counter(r["seriesuid"] for r in rows) == {"phantom_0000": 6, "phantom_0001": 6}
    for r in rows:                       # the CSV type is the one the 12-type rule gives the painted nodule
        d = float(r["diameter_mm"])
        assert (d < 6) == (r["type"] in ("T01", "T07", "T09", "T11")) or r["type"] in ("T05", "T06")


def test_shapes_only_from_test_reserved_lidc_scans(small_test_phantom):
    pool = lidc_pool()
    _, _, rows = small_test_phantom
    for r in rows:
        a = pool.db.annotations[int(r["lidc_annotation_id"])]
        assert a.scan_id == int(r["lidc_scan_id"]) and a.scan_id % 5 != 0
        assert ph.lidc_split_of_scan(a.scan_id) == "test"
        assert int(r["lidc_annotation_id"]) in pool.by["test"][a.type_code(pool.db.scans[a.scan_id])]


def _assert_apart(label: np.ndarray, rows):
    """Output masks of different nodules do not touch (26-neighbourhood), and no point lies within the hit
    radius (diameter / 2 of the CSV centre) of two nodules."""
    labs = [int(r["label"]) for r in rows]
    for lab in labs:
        grown = ndi.binary_dilation(label == lab, np.ones((3, 3, 3), bool))
        assert set(np.unique(label[grown])) <= {0, lab}
    xyz = np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in rows])
    rad = np.array([float(r["diameter_mm"]) / 2 for r in rows])
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert np.linalg.norm(xyz[i] - xyz[j]) > rad[i] + rad[j], (rows[i], rows[j])


def test_no_overlapping_nodules_in_the_test_phantom(small_test_phantom):
    out, ds, rows = small_test_phantom
    for e in ds["training"]:
        label = np.asarray(nib.load(out / e["label"]).dataobj).transpose(2, 1, 0)
        mine = [r for r in rows if r["seriesuid"] == e["case_id"]]
        assert sorted(np.unique(label)[1:].tolist()) == sorted(int(r["label"]) for r in mine)
        _assert_apart(label, mine)


def test_no_overlapping_nodules_in_a_crowded_case():
    """Ten nodules in a small case (the training sampler): each keeps its gap to the others."""
    c = ph.generate_case("crowd", 3, ph.PhantomOptions(**SMALL, shapes="procedural"), n_nodules=10,
                         types=["T01", "T09", "T11", "T07", "T02"] * 2,
                         locations=list(ph.LOCATIONS) * 2 + ["isolated"] * 2)
    assert len(c.nodules) >= 6
    _assert_apart(c.label, c.nodules)


def test_exact_mode_refuses_a_size_too_small_for_a_type(tmp_path):
    with pytest.raises(ValueError, match="T04"):
        ph.generate_dataset(tmp_path / "x", 2, nodules_per_case=6, split=(0, 0, 1), negatives=0, exact=True,
                            size=64, slices=8, spacing=1.0, shapes="procedural")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ahnet.data.phantom", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, says", [
    (["--split", "1,2"], "--split: expected three fractions"),
    (["--split", "0,-1,1"], "split must be three fractions"),
    (["--split", "0,0,0"], "split must be three fractions"),
    (["--nodules-per-case", "3,1"], "nodules_per_case must be N or (min, max)"),
    (["--nodules-per-case", "x"], "--nodules-per-case: expected N or MIN,MAX"),
    (["--test-phantom", "gpu"], "--test-phantom: invalid choice"),
    (["--test-phantom", "cpu", "--split", "0.7,0.15,0.15"], "--split cannot be combined with --test-phantom"),
    (["--test-phantom", "demo", "--negatives", "0.1", "--exact"], "--negatives, --exact cannot be combined"),
    (["--exact", "--size", "64", "--spacing", "1", "--shapes", "procedural"], "type T04 needs"),
    (["--cases", "0"], "--cases must be >= 1"),
    (["--noise", "40,10"], "noise must be (min, max)"),
    (["--previews", "-1"], "--previews must be >= 0"),
])
def test_cli_bad_values_one_error_line(tmp_path, args, says):
    r = _cli("--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ahnet.data.phantom: error: ") and says in lines[0], r.stderr
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_cli_help_lists_the_new_flags():
    r = _cli("--help")
    assert r.returncode == 0
    for flag in ("--test-phantom", "--split", "--exact", "--nodules-per-case"):
        assert flag in r.stdout


# ----------------------------------------------------------------------------- the sealed final test set
def test_the_final_pool_shares_no_patient_with_any_other_pool():
    """Every shape a final set can draw comes from a reserved scan of a patient all of whose scans are reserved,
    so no patient of it ever gave a shape to training, validation or dev; every type is there to draw."""
    pool = lidc_pool()
    patient = {i: s.patient_id for i, s in pool.db.scans.items()}
    patients = {name: {patient[pool.db.annotations[a].scan_id] for ids in by.values() for a in ids}
                for name, by in pool.by.items()}
    assert patients["final"] and all(not (patients["final"] & patients[s]) for s in ph.SPLITS)
    reserved = {i for i in patient if i % 5 == 0}
    for p in patients["final"]:
        assert {i for i, q in patient.items() if q == p} <= reserved
    assert all(pool.by["final"][t] for t in TYPE_CODES)
    # LIDC-IDRI-0332 spans the train and dev pools (the scan-level split's known leak); the final pool has none
    assert "LIDC-IDRI-0332" in patients["train"] and "LIDC-IDRI-0332" in patients["test"]


def test_generated_phantoms_provenance_the_final_set_is_sealed(tmp_path, small_test_phantom):
    """A training phantom, the dev set (small_test_phantom) and a final set generated as the experiment does, their
    provenance read back from each annotations.csv: the final set's LIDC patients are none of the others'; the
    same check refuses a set against itself."""
    from ahnet.commands.phantoms import check_sealed
    lidc_pool()
    dev = small_test_phantom[0] / "dataset.json"
    train = ph.generate_dataset(tmp_path / "train", 2, seed=0, previews=0, nodules_per_case=(4, 4), negatives=0.0,
                                **SMALL)
    final = ph.generate_test_phantom(tmp_path / "final", "cpu-final", seed=0, n_cases=2, size=160)  # 112 mm FOV
    rows = list(csv.DictReader(open(tmp_path / "final" / "annotations.csv", newline="", encoding="utf-8")))
    assert sorted(r["type"] for r in rows) == list(TYPE_CODES)
    pool = lidc_pool()
    assert all(int(r["lidc_annotation_id"]) in pool.by["final"][r["type"]] for r in rows)
    assert json.loads(final.read_text())["seed"] == ph.held_out_seed(0, "cpu-final") != ph.held_out_seed(0)
    assert check_sealed(final, [train, dev]) >= 1
    with pytest.raises(ValueError, match="shares LIDC patients with .*; it is not sealed"):
        check_sealed(dev, [dev])
