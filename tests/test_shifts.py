"""The shift study: the shifted renderings change one thing at a time, and the summary's numbers and report."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from ahnet.commands.phantoms import SHIFTS
from ahnet.data.phantom import PhantomOptions, generate_test_phantom
from ahnet.evaluate.froc import paired_across_sets
from ahnet.evaluate.shifts import shift_summary
from ahnet.report.shifts import write_shift_report

SMALL = dict(n_cases=1, size=96, spacing=1.2, slices=16, thickness=2.5, nodules_per_case=3)


def test_every_shift_is_a_valid_phantom_option():
    for name, change in SHIFTS.items():
        PhantomOptions(**change).validate()
    assert {"noise2x", "sharp", "smooth", "inplane0.6", "inplane0.9", "vessels-dense", "vessels-fine", "hu+30",
            "hu-30"} == set(SHIFTS)
    for a, b in (("inplane0.6", "inplane0.9"),):       # the same field of view within a pixel
        assert abs(SHIFTS[a]["size"] * SHIFTS[a]["spacing"] - SHIFTS[b]["size"] * SHIFTS[b]["spacing"]) < 1.0


@pytest.mark.parametrize("shift", ["hu+30", "sharp", "noise2x", "vessels-fine"])
def test_a_shift_keeps_the_cases_nodules_and_masks(tmp_path, shift):
    """The same seed: the same nodules (types, shapes, places) and masks; only the image changes (hu+30: by
    exactly 30 HU where nothing clips). Finer vessels change where nodules fit beside them: the same schedule
    (types and locations), other places and, where a shape no longer fits, another shape."""
    base = generate_test_phantom(tmp_path / "a", "demo", seed=0, **SMALL)
    other = generate_test_phantom(tmp_path / "b", "demo", seed=0, **SMALL, **SHIFTS[shift])
    rows = [list(csv.DictReader(open(p.parent / "annotations.csv"))) for p in (base, other)]
    if shift == "vessels-fine":
        keys = ("seriesuid", "type", "location")
        assert [[{k: r[k] for k in keys} for r in rs] for rs in rows] == [[{k: r[k] for k in keys}
                                                                            for r in rows[0]]] * 2
        return
    assert rows[0] == rows[1]
    case = json.loads(base.read_text())["training"][0]
    img = [nib.load(str(p.parent / case["image"])).get_fdata() for p in (base, other)]
    lab = [nib.load(str(p.parent / case["label"])).get_fdata() for p in (base, other)]
    assert np.array_equal(lab[0], lab[1]) and not np.array_equal(img[0], img[1])
    if shift == "hu+30":
        inside = (img[0] > -990) & (img[0] < 3000)
        assert np.all(img[1][inside] - img[0][inside] == 30)


def _sets(seed, n_scans=10):
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(n_scans)]
    nods = [{"seriesuid": s, "coordX": 40.0 * k, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 8.0, "type": "T01"}
            for s in scans for k in range(2)]

    def cands(skill):
        out = []
        for n in nods:
            if rng.random() < skill:
                out.append({"seriesuid": n["seriesuid"], "coordX": n["coordX"] + 1, "coordY": 0, "coordZ": 0,
                            "probability": round(float(rng.random()), 2)})
        out += [{"seriesuid": s, "coordX": 500.0, "coordY": 0, "coordZ": 0, "probability": 0.5} for s in scans]
        return out
    return nods, scans, cands


def test_the_shift_summary_flags_a_costly_shift_and_writes_its_report(tmp_path):
    nods, scans, cands = _sets(1)
    base = (nods, {"r0": cands(0.9), "r1": cands(0.9), "u0": cands(0.6)}, scans)
    worse = (nods, {"r0": cands(0.3), "r1": cands(0.3), "u0": cands(0.6)}, scans)
    groups = {"ahnet-transfer": ["r0", "r1"], "unet3d-scratch": ["u0"]}
    s = shift_summary(base, {"noise2x": worse}, groups, n_bootstrap=200)
    d = s["shifts"]["noise2x"]["ahnet-transfer"]
    want = paired_across_sets(nods, {"r0": base[1]["r0"], "r1": base[1]["r1"]}, nods,
                              {"r0": worse[1]["r0"], "r1": worse[1]["r1"]}, scans, n_bootstrap=200)
    assert d["diff"] == want["diff"] and d["ci"] == want["ci"] and d["costly"] == (want["diff"] < -0.05)
    assert d["costly"] and d["ci"][1] < 0
    md = write_shift_report(s, tmp_path / "rep", "shifts").read_text()
    assert "| noise2x | AH-Net after transfer |" in md and "costs > 0.05; decided" in md
    assert (tmp_path / "rep" / "shifts.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["shifts"]["noise2x"]["unet3d-scratch"]
    assert "on dev and on dev rendered with one change" in write_shift_report(s, tmp_path / "d", "s", "dev").read_text()
    with pytest.raises(ValueError, match="other scans"):
        shift_summary(base, {"x": (nods, worse[1], scans[:-1])}, groups, n_bootstrap=10)
