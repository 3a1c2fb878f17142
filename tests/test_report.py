"""The report on synthetic results: files, stable keys, winners and ties."""
import json
import re

import numpy as np
import pytest

from ahnet.evaluate.froc import FP_RATES, evaluate_detection
from ahnet.report import ReportInputError, build_report, pick_winners, summarize
from ahnet.evaluate.segmetrics import aggregate_seg

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


# ------------------------------------------------------------------ paired comparisons, learning curves, gallery
def _three_models(seed=3, n_scans=24):
    """Nodules of every type and three models' candidates: ahnet-transfer finds most, the others fewer."""
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(n_scans)]
    nod, cands = [], {"mcgcn-2d": [], "ahnet-transfer": [], "unet3d-scratch": []}
    for s in scans:
        for k in range(3):
            nod.append({"seriesuid": s, "coordX": 40.0 * k, "coordY": 0, "coordZ": 0, "diameter_mm": 8,
                        "type": TYPES[rng.integers(0, 12)], "location": ["isolated", "juxta-pleural"][k % 2]})
        for name, skill in (("ahnet-transfer", .9), ("mcgcn-2d", .5), ("unet3d-scratch", .4)):
            for n in nod[-3:]:
                if rng.random() < skill:
                    cands[name].append({"seriesuid": s, "coordX": n["coordX"], "coordY": 1, "coordZ": 0,
                                        "probability": rng.uniform(.5, 1)})
            for _ in range(rng.integers(0, 4)):
                cands[name].append({"seriesuid": s, "coordX": 500, "coordY": 0, "coordZ": rng.random() * 99,
                                    "probability": rng.random() * .8})
    return nod, cands, scans


def _log(run, rows, columns):
    (run / "checkpoints").mkdir(parents=True)
    lines = [",".join(columns)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    (run / "log.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("config, stopped_by", [
    ({"epochs": 8, "steps_per_epoch": 10, "max_steps": None, "patience": 2}, "patience"),    # 2 after best 20
    ({"epochs": 4, "steps_per_epoch": 10, "max_steps": None, "patience": 3}, "step cap"),    # 40 = 4 x 10
    ({"epochs": 8, "steps_per_epoch": 10, "max_steps": None, "patience": 3}, "not finished"),
    ({"epochs": 8, "steps_per_epoch": 10, "max_steps": 40, "patience": 0}, "step cap")])
def test_the_report_states_each_runs_step_cap_and_what_stopped_it(tmp_path, config, stopped_by):
    from ahnet.report.curves import budget_table, read_curves
    run = tmp_path / "run"
    _log(run, [(1, 10, .9, .2), (2, 20, .7, .5), (3, 30, .6, .3), (4, 40, .5, .4)], ["epoch", "step", "loss", "val_cpm"])
    assert read_curves({"m": run})["m"]["budget"] is None and budget_table(read_curves({"m": run})) is None
    from ahnet.train.config import TrainConfig, save_run_config
    save_run_config(TrainConfig(out=str(run), **config), run)                # the trainer's own config.json
    title, head, rows = budget_table(read_curves({"m": run}))
    cap = str(config["max_steps"] or config["epochs"] * 10)
    assert "step cap" in title and rows == [["m", "40", cap, str(config["patience"] or "none"), "20", "0.500",
                                             stopped_by]]


def test_report_sections_claims_curves_found_and_gallery(tmp_path):
    from ahnet.evaluate.froc import paired_bootstrap
    nod, cands, scans = _three_models()
    res = {m: {"detection": evaluate_detection(nod, c, scans, n_bootstrap=200, seed=0), "segmentation": None}
           for m, c in cands.items()}
    comp = paired_bootstrap(nod, cands, scans, n_bootstrap=200, seed=0)      # pairs in this model order
    runs = {m: tmp_path / "runs" / m for m in cands}
    _log(runs["ahnet-transfer"], [(1, 10, .9, "", .2), (2, 20, .7, .4, .5), (3, 30, .6, .6, .3), (4, 40, .5, .6, .4)],
         ["epoch", "step", "loss", "val_dice", "val_cpm"])                   # val_cpm present: it is the score
    _log(runs["mcgcn-2d"], [(1, 5, .9, .1), (2, 10, .8, "None")], ["epoch", "step", "loss", "val_dice"])
    gallery = {"focus": "ahnet-transfer", "thresholds": {"ahnet-transfer": .9}, "half_mm": 5.0,
               "types": {"T01": [_crop("hit"), _crop("miss")]}, "false_positives": {"mcgcn-2d": [_crop("fp")]}}
    rep = build_report(res, tmp_path / "rep", comparisons=comp, runs=runs, gallery=gallery, candidates="a rule")
    j = json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))
    assert j == json.loads(json.dumps(rep))
    c = j["comparisons"]
    assert [(k["a"], k["b"]) for k in c["claims"]] == [("ahnet-transfer", "mcgcn-2d"),
                                                        ("ahnet-transfer", "unet3d-scratch")]
    raw = comp["pairs"][0]                                       # (mcgcn-2d, ahnet-transfer): turned round
    assert (raw["a"], raw["b"]) == ("mcgcn-2d", "ahnet-transfer")
    first = c["claims"][0]
    assert first["overall"]["diff"] == pytest.approx(-raw["overall"]["diff"])
    assert first["overall"]["ci"] == pytest.approx([-raw["overall"]["ci"][1], -raw["overall"]["ci"][0]])
    assert first["overall"]["winner"] == "ahnet-transfer" and first["overall"]["ci"][0] > 0
    for t, d in first["types"].items():                          # "won" only where the interval excludes 0
        if d and d["ci"]:
            assert (t in first["types_won_a"]) == (d["ci"][0] > 0) and (t in first["types_won_b"]) == (d["ci"][1] < 0)
    n_best = sum(v == "ahnet-transfer" for v in c["best_decisive"]["types"].values())
    assert c["claim_test"] == {"model": "ahnet-transfer", "types_best_decisive": n_best, "needed": 6, "of": 12,
                               "against": ["mcgcn-2d", "unet3d-scratch"], "holds": n_best >= 6}
    cur = j["learning_curves"]
    assert set(cur) == {"ahnet-transfer", "mcgcn-2d"}            # unet3d-scratch has no log
    assert cur["ahnet-transfer"]["val_metric"] == "val_cpm" and cur["ahnet-transfer"]["best_step"] == 20
    assert cur["mcgcn-2d"]["val_metric"] == "val_dice" and cur["mcgcn-2d"]["val"] == [.1, None]
    f = j["models"]["ahnet-transfer"]["found"]
    assert f["n"] == len(nod) and f["n_found"] == res["ahnet-transfer"]["detection"]["found"]["n_found"]
    assert "image" not in j["gallery"]["types"]["T01"][0] and j["gallery"]["types"]["T01"][0]["kind"] == "hit"
    d = tmp_path / "rep"
    for name in ("learning_curves.png", "gallery_types.png", "gallery_false_positives.png", "claims.png"):
        assert (d / name).stat().st_size > 0
    html = (d / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 9
    md = (d / "report.md").read_text(encoding="utf-8")
    want = (f"AH-Net after transfer: {f['n_found']} of {f['n']} nodules found at 1 false positive per scan, every "
            f"type at least once: {'yes' if f['every_type'] else 'no'}")
    assert want in md and want in html
    assert "no decision" in md or all(k["types_no_decision"] == [] for k in c["claims"])
    assert "![gallery_types.png](gallery_types.png)" in md and "Candidates: a rule." in md
    assert "Training budget" not in md                           # the logs have no config.json: no rule to state


def _crop(kind):
    img = np.full((15, 15), -800.0, np.float32)
    img[5:10, 5:10] = 40.0
    return {"model": "m", "kind": kind, "seriesuid": "s0", "centre_zyx": [1.0, 7.0, 7.0], "slice": 1,
            "pixel_mm": [0.7, 0.7], "image": img, "contour": img > 0, "type": "T01", "location": "isolated",
            "diameter_mm": 3.5, "score": None if kind == "miss" else .95, "found_by": ["m"],
            "marks": [{"row": 7.0, "col": 7.0, "score": .95, "status": "fp" if kind == "fp" else "hit",
                       "above_threshold": True}]}


def test_each_gallery_row_is_named_by_its_type_and_an_untyped_row_says_so():
    """A nodule whose annotations give no type is in the row 'untyped', never 'None'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ahnet.data.nodule_types import TYPE_NAMES
    from ahnet.report.gallery import gallery_figures, gallery_json, row_names

    gallery = {"focus": "m", "thresholds": {"m": .9}, "half_mm": 5.0,
               "types": {None: [dict(_crop("miss"), type=None)], "T04": [_crop("hit")]}, "false_positives": {}}
    fig = gallery_figures(plt, gallery, TYPE_NAMES)["gallery_types.png"]
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    plt.close(fig)
    assert labels == [f"T04\n{TYPE_NAMES['T04']}", "untyped\n(no type in the annotations)"]
    assert row_names(gallery, TYPE_NAMES) == [f"T04 {TYPE_NAMES['T04']}", "untyped (no type in the annotations)"]
    assert list(gallery_json(gallery)["types"]) == ["untyped", "T04"]
    assert row_names(gallery_json(gallery), TYPE_NAMES) == row_names(gallery, TYPE_NAMES)   # what report.json keeps


def _rescored(cands, seed=5):
    """Each row rescored as a second stage does: the first stage's score kept as probability_stage1."""
    rng = np.random.default_rng(seed)
    return {m: [dict(r, probability=float(np.sqrt(r["probability"] * rng.random())),
                     probability_stage1=r["probability"]) for r in rows] for m, rows in cands.items()}


@pytest.mark.parametrize("seeds", [False, True])
def test_the_report_puts_each_first_stage_beside_its_system_with_paired_intervals(tmp_path, seeds):
    """With a second stage the report states each network alone (the first stage's scores, kept in the candidate
    rows) beside its system, "system - first stage" and the paper's claims on the first stages, each point
    estimate equal to evaluate_detection on those rows (seeds: the mean over a model's runs)."""
    from ahnet.evaluate import compare_stages
    nod, cands, scans = _three_models()
    system = _rescored(cands)
    results = {m: {"candidates": rows} for m, rows in system.items()}
    groups = None
    if seeds:                                                  # two runs a model: the second a copy, shifted
        results.update({m + "-seed1": {"candidates": _rescored(cands, seed=9)[m]} for m in cands})
        groups = {m: [m, m + "-seed1"] for m in cands}
    cases = [{"case_id": s} for s in scans]
    comp = compare_stages(results, cases, nod, n_bootstrap=200, seed=0, groups=groups)
    res = {m: {"detection": evaluate_detection(nod, system[m], scans, n_bootstrap=0), "segmentation": None}
           for m in cands}
    rep = build_report(res, tmp_path / "rep", stages=comp)

    def cpm(rows, stage1=False):
        rows = [dict(r, probability=r["probability_stage1"]) for r in rows] if stage1 else rows
        return evaluate_detection(nod, rows, scans, n_bootstrap=0)["cpm"]

    def mean(m, stage1=False):
        runs = groups[m] if seeds else [m]
        return np.mean([cpm(results[r]["candidates"], stage1) for r in runs])

    st = rep["stages"]
    for m in cands:
        s = st["models"][m]
        assert s["cpm_first"] == pytest.approx(mean(m, True)) and s["cpm"] == pytest.approx(mean(m))
        assert s["added"]["diff"] == pytest.approx(mean(m) - mean(m, True))
        lo, hi = s["added"]["ci"]
        assert lo <= s["added"]["diff"] <= hi
        assert s["added"]["winner"] == ("system" if lo > 0 else "first stage" if hi < 0 else None)
    claim = {(c["a"], c["b"]): c["overall"] for c in st["claims"]}
    d = claim[("ahnet-transfer", "mcgcn-2d")]
    assert d["diff"] == pytest.approx(mean("ahnet-transfer", True) - mean("mcgcn-2d", True))
    assert d["winner"] in (None, "ahnet-transfer", "mcgcn-2d")
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "## The first stage alone and what each model's second stage adds" in md
    assert "## The paper's claims on the networks alone" in md
    s = st["models"]["ahnet-transfer"]
    assert f"| AH-Net after transfer | {s['cpm_first']:.3f} [{s['ci_first'][0]:.3f}, {s['ci_first'][1]:.3f}] |" in md
    assert json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))["stages"] == \
        json.loads(json.dumps(st))


def test_without_a_second_stage_the_report_has_no_stage_section(tmp_path):
    from ahnet.evaluate import compare_stages
    nod, cands, scans = _three_models()
    assert compare_stages({m: {"candidates": c} for m, c in cands.items()}, [{"case_id": s} for s in scans],
                          nod) is None
    res = {m: {"detection": evaluate_detection(nod, c, scans, n_bootstrap=0), "segmentation": None}
           for m, c in cands.items()}
    build_report(res, tmp_path / "rep")
    assert "first stage alone" not in (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")


def test_the_comparison_at_a_glance_draws_the_reports_own_numbers(tmp_path):
    """claims.png: each model's mean over seeds with its interval and each seed's CPM, its first stage, and every
    claim's paired difference coloured by what its interval decides; absent with one model."""
    from ahnet.evaluate import compare_models, compare_stages
    from ahnet.report.forest import FIGURE, claim_points, model_points
    nod, cands, scans = _three_models()
    results = {m: {"candidates": rows} for m, rows in _rescored(cands).items()}
    results.update({m + "-seed1": {"candidates": _rescored(cands, seed=9)[m]} for m in cands})
    groups = {m: [m, m + "-seed1"] for m in cands}
    cases = [{"case_id": s} for s in scans]
    res = {r: {"detection": evaluate_detection(nod, v["candidates"], scans, n_bootstrap=0), "segmentation": None}
           for r, v in results.items()}
    rep = build_report(res, tmp_path / "rep", comparisons=compare_models(results, cases, nod, 200, 0, groups),
                       stages=compare_stages(results, cases, nod, 200, 0, groups))
    points = {p[0]: p for p in model_points(rep)}
    assert set(points) == set(cands)
    for m, (_, cpm, ci, runs, first, first_ci) in points.items():
        assert sorted(runs) == sorted(res[r]["detection"]["cpm"] for r in groups[m])
        assert cpm == pytest.approx(np.mean(runs)) and ci[0] <= cpm <= ci[1]
        assert (first, first_ci) == (rep["stages"]["models"][m]["cpm_first"], rep["stages"]["models"][m]["ci_first"])
    drawn = claim_points(rep)
    claims = rep["comparisons"]["claims"] + rep["stages"]["claims"]
    assert [d[1] for d in drawn] == [c["overall"]["diff"] for c in claims]
    for (_, diff, (lo, hi), side), c in zip(drawn, claims):
        assert side == ("a" if lo > 0 else "b" if hi < 0 else None)
    assert (tmp_path / "rep" / FIGURE).stat().st_size > 5000
    assert f"![{FIGURE}]({FIGURE})" in (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    one = {"ahnet-transfer": res["ahnet-transfer"]}
    build_report(one, tmp_path / "one")
    assert not (tmp_path / "one" / FIGURE).exists()
