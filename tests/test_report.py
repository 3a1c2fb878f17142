"""The report on synthetic results: files, stable keys, winners and ties."""
import json
import re

import numpy as np
import pytest

from ahnet.froc import FP_RATES, evaluate_detection
from ahnet.report import ReportInputError, build_report, pick_winners, summarize
from ahnet.segmetrics import aggregate_seg

TYPES = [f"T{k:02d}" for k in range(1, 13)]


def fake_detection(type_cpms, overall=0.5, n=5):
    """A minimal evaluate_detection-like dict with the given per-type CPMs (None = no nodules of that type)."""
    groups = {}
    for t, c in type_cpms.items():
        groups[t] = {"n": 0 if c is None else n, "sensitivity": None if c is None else [c] * 7,
                     "sensitivity_ci": None, "cpm": c, "cpm_ci": None if c is None else [c - .1, c + .1],
                     "n_bootstrap_used": 0}
    return {"n_scans": 10, "n_nodules": 60, "fp_rates": list(FP_RATES), "sensitivity": [overall] * 7,
            "sensitivity_ci": None, "cpm": overall, "cpm_ci": None,
            "froc": {"fps": [0, .5, 2], "sensitivity": [0, overall, overall]}, "froc_band": None,
            "counts": {}, "groups": {"type": groups, "location": {}}}


def test_winners_ties_and_no_nodule_types():
    a = {t: 0.5 for t in TYPES}
    b = {t: 0.4 for t in TYPES}
    c = {t: 0.3 for t in TYPES}
    b["T02"] = b["T03"] = 0.9          # B wins T02, T03
    c["T04"] = 0.7                     # C wins T04
    b["T05"] = 0.5                     # A and B tie on T05
    for m in (a, b, c):
        m["T12"] = None                # no T12 nodules: no winner
    res = {"A": {"detection": fake_detection(a, .6)}, "B": {"detection": fake_detection(b, .6)},
           "C": {"detection": fake_detection(c, .2)}}
    rep = summarize(res)
    assert rep["winners"]["T02"]["models"] == ["B"] and rep["winners"]["T02"]["margin"] == pytest.approx(.4)
    assert rep["winners"]["T04"]["models"] == ["C"]
    assert rep["winners"]["T05"] == {"models": ["A", "B"], "score": .5, "tie": True, "margin": pytest.approx(.2)}
    assert rep["winners"]["T12"]["models"] == []
    # A: T01, T05 (tie), T06..T11 = 8; B: T02, T03, T05 (tie) = 3; C: T04 = 1
    assert rep["wins"] == {"A": 8, "B": 3, "C": 1}
    assert rep["wins_outright"] == {"A": 7, "B": 2, "C": 1}
    assert rep["n_types_with_winner"] == 11
    assert rep["overall_winner"]["models"] == ["A", "B"] and rep["overall_winner"]["tie"]


def test_pick_winners_rules():
    assert pick_winners({"A": None, "B": None})["models"] == []
    assert pick_winners({"A": .3})["margin"] is None
    w = pick_winners({"A": .5, "B": .5 + 1e-12, "C": float("nan")})
    assert w["models"] == ["A", "B"] and w["tie"] and w["margin"] is None


def _random_case(seed):
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(20)]
    nod, cands = [], []
    for s in scans:
        for _ in range(rng.integers(1, 4)):
            c = rng.uniform(-80, 80, 3)
            nod.append({"seriesuid": s, "coordX": c[0], "coordY": c[1], "coordZ": c[2], "diameter_mm": 10,
                        "type": TYPES[rng.integers(0, 11)], "location": ["isolated", "juxta-pleural"][rng.integers(2)]})
            if rng.random() < .7:
                cands.append({"seriesuid": s, "coordX": c[0], "coordY": c[1], "coordZ": c[2],
                              "probability": rng.random()})
        for _ in range(rng.integers(0, 10)):
            c = rng.uniform(-80, 80, 3)
            cands.append({"seriesuid": s, "coordX": c[0], "coordY": c[1], "coordZ": c[2],
                          "probability": rng.random() * .7})
    det = evaluate_detection(nod, cands, scans, n_bootstrap=200, seed=0)
    seg_rows = [dict(status="ok", dice=float(rng.uniform(.3, .9)), hd95_mm=float(rng.uniform(0, 5)),
                     type=n["type"], location=n["location"]) for n in nod]
    return {"detection": det, "segmentation": aggregate_seg(seg_rows, n_bootstrap=200)}


def test_build_report_writes_self_contained_files_with_stable_keys(tmp_path):
    res = {"ahnet": _random_case(1), "unet3d": _random_case(2)}
    rep = build_report(res, tmp_path / "report", title="synthetic")
    d = tmp_path / "report"
    for f in ["report.json", "report.md", "report.html", "froc.png", "type_cpm.png", "type_sensitivity.png",
              "type_dice.png", "location_cpm.png"]:
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    j = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert j == json.loads(json.dumps(rep))
    assert {"version", "fp_rates", "types", "type_names", "models", "winners", "wins", "wins_outright",
            "overall_winner", "rules", "model_order"} <= set(j)
    m = j["models"]["ahnet"]
    assert {"cpm", "cpm_ci", "sensitivity", "sensitivity_ci", "dice", "hd95_mm", "types", "locations",
            "n_scans", "n_nodules"} <= set(m)
    assert list(m["types"]) == TYPES
    t = m["types"]["T01"]
    assert {"n", "sensitivity", "sensitivity_ci", "cpm", "cpm_ci", "dice", "hd95_mm"} == set(t)
    assert m["types"]["T12"]["n"] == 0 and m["types"]["T12"]["cpm"] is None    # no T12 drawn
    assert j["winners"]["T12"]["models"] == []
    assert m["cpm"] == res["ahnet"]["detection"]["cpm"]
    assert m["dice"]["mean"] == res["ahnet"]["segmentation"]["overall"]["dice"]["mean"]
    # winners agree with a direct comparison of the per-type CPMs
    for ty in TYPES[:11]:
        a, b = m["types"][ty]["cpm"], j["models"]["unet3d"]["types"][ty]["cpm"]
        if a is not None and b is not None and a != b:
            assert j["winners"][ty]["models"] == (["ahnet"] if a > b else ["unet3d"])
    html = (d / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 5 and "src='http" not in html and "src='froc" not in html
    md = (d / "report.md").read_text(encoding="utf-8")
    assert "## CPM per type" in md and "![froc.png](froc.png)" in md
    assert re.search(r"\| T01 solid < 6 mm \|", md)


def test_bad_results_raise():
    with pytest.raises(ReportInputError, match="empty"):
        summarize({})
    with pytest.raises(ReportInputError, match="detection"):
        summarize({"A": {"segmentation": None}})


def test_a_type_nobody_detects_has_no_winner():
    from ahnet.report import pick_winners
    assert pick_winners({"a": 0.0, "b": 0.0})["models"] == []
    assert pick_winners({"a": 0.0, "b": 0.1})["models"] == ["b"]
