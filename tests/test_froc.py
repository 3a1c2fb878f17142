"""FROC / CPM by the LUNA16 rules on hand-made cases whose answers are worked out in the comments."""
import time

import numpy as np
import pytest

from ahnet.evaluate.froc import (FP_RATES, FROCInputError, bootstrap_weights, cpm_from_curve, evaluate_detection,
                        found_at, froc_curve, interp_curve, match_candidates, paired_bootstrap)


def nod(s, x, y, z, d, t=None, irrelevant=False, loc=None):
    return {"seriesuid": s, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": d, "type": t,
            "irrelevant": irrelevant, "location": loc}


def cand(s, x, y, z, p):
    return {"seriesuid": s, "coordX": str(x), "coordY": str(y), "coordZ": str(z), "probability": str(p)}


# Four scans. A: N1 (d 10, T01), N2 (d 6, T02, missed). B: N3 (d 8, T01), an irrelevant finding I1 (d 4).
# C: no nodules. D: N4 (d 20, T03, no candidates -> missed).
NODULES = [nod("A", 0, 0, 0, 10, "T01", loc="isolated"), nod("A", 50, 0, 0, 6, "T02", loc="juxta-pleural"),
           nod("B", 0, 0, 0, 8, "T01", loc="isolated"), nod("B", 30, 0, 0, 4, None, irrelevant="1"),
           nod("D", 0, 0, 0, 20, "T03")]
CANDS = [cand("A", 5, 0, 0, 0.9),      # exactly on N1's radius (5 mm): hit
         cand("A", 3, 0, 0, 0.6),      # second hit on N1: duplicate, neither TP nor FP
         cand("A", 100, 0, 0, 0.8),    # FP
         cand("B", 30, 1, 0, 0.95),    # on the irrelevant finding: dropped
         cand("B", 0, 4, 0, 0.4),      # exactly on N3's radius (4 mm): hit
         cand("C", 0, 0, 0, 0.7),      # FP in a scan without nodules
         cand("C", 1, 1, 1, 0.3)]      # FP
SCANS = ["A", "B", "C", "D"]
# Entries by score: .9 TP, .8 FP, .7 FP, .4 TP, .3 FP with 4 relevant nodules and 4 scans. FROC vertices:
# (0,0) (0,.25) (.25,.25) (.5,.25) (.5,.5) (.75,.5). Sensitivity at 1/8, 1/4: .25; at 1/2 and above: .5.
EXPECTED_SENS = [0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_hand_case_sensitivities_counts_and_cpm():
    r = evaluate_detection(NODULES, CANDS, SCANS, n_bootstrap=0)
    assert r["n_scans"] == 4 and r["n_nodules"] == 4
    np.testing.assert_allclose(r["sensitivity"], EXPECTED_SENS)
    assert r["cpm"] == pytest.approx(3.0 / 7)
    c = r["counts"]
    assert (c["fp"], c["dropped"], c["duplicates"], c["detected"], c["tp_candidates"], c["multi_hits"]) == \
        (3, 1, 1, 2, 3, 0)
    assert c["irrelevant_nodules"] == 1
    np.testing.assert_allclose(r["froc"]["fps"], [0, 0, .25, .5, .5, .75])
    np.testing.assert_allclose(r["froc"]["sensitivity"], [0, .25, .25, .25, .5, .5])
    t = r["groups"]["type"]
    assert set(t) == {"T01", "T02", "T03"}          # the irrelevant finding's missing type makes no group
    assert t["T01"]["n"] == 2 and t["T02"]["n"] == 1 and t["T03"]["n"] == 1
    # T01 = N1 (score .9) and N3 (.4): 1/2 until the threshold passes .4 at 1/2 FP/scan
    np.testing.assert_allclose(t["T01"]["sensitivity"], [.5, .5, 1, 1, 1, 1, 1])
    assert t["T01"]["cpm"] == pytest.approx(6 / 7)
    assert t["T02"]["sensitivity"] == [0.0] * 7 and t["T03"]["cpm"] == 0.0
    loc = r["groups"]["location"]
    assert loc["isolated"]["n"] == 2 and loc["juxta-pleural"]["n"] == 1
    assert r["sensitivity_ci"] is None and r["cpm_ci"] is None
    # at 1 FP/scan (vertex (.75, .5), threshold .3): N1 (.9) and N3 (.4) found, N2 and N4 missed
    f = r["found"]
    assert (f["threshold"], f["n_found"], f["n"]) == (0.3, 2, 4)
    assert f["groups"]["type"] == {"T01": [2, 2], "T02": [0, 1], "T03": [0, 1]}
    m = match_candidates(NODULES, CANDS, SCANS)
    assert found_at(m, 0.25) == (0.8, pytest.approx(np.array([True, False, False, False])))   # vertex (.25, .25)
    assert found_at(m, 0.1)[0] == 0.9                    # the first vertex above 0 FP/scan holds N1 alone
    # which candidate rows: N1's best hit is row 0 (.9), N3's row 4; FPs rows 2, 5, 6; row 3 dropped
    assert m.nod_hit_row.tolist() == [0, -1, 4, -1] and sorted(m.fp_row.tolist()) == [2, 5, 6]
    assert m.dropped_row.tolist() == [3]


def test_radius_is_inclusive_and_just_outside_is_fp():
    on = [cand("S", 3, 4, 0, 0.5)]                  # distance 5 = radius exactly
    out = [cand("S", 3, 4.000001, 0, 0.5)]
    n = [nod("S", 0, 0, 0, 10, "T01")]
    r_on = evaluate_detection(n, on, ["S"], n_bootstrap=0)
    r_out = evaluate_detection(n, out, ["S"], n_bootstrap=0)
    assert r_on["counts"]["detected"] == 1 and r_on["counts"]["fp"] == 0 and r_on["cpm"] == 1.0
    assert r_out["counts"]["detected"] == 0 and r_out["counts"]["fp"] == 1 and r_out["cpm"] == 0.0


def test_no_candidates():
    r = evaluate_detection(NODULES, [], SCANS, n_bootstrap=50)
    assert r["sensitivity"] == [0.0] * 7 and r["cpm"] == 0.0 and r["counts"]["fp"] == 0
    assert r["froc"]["fps"] == [0.0] and r["cpm_ci"] == [0.0, 0.0]


def test_no_nodules_gives_none_not_nan_and_counts_fp():
    r = evaluate_detection([], [cand("X", 0, 0, 0, .5)], ["X", "Y"], n_bootstrap=20)
    assert r["n_nodules"] == 0 and r["sensitivity"] == [None] * 7 and r["cpm"] is None
    assert r["cpm_ci"] is None and r["counts"]["fp"] == 1
    assert r["froc"]["fps"] == [0.0, 0.5]


def test_only_irrelevant_hits_dropped_and_relevant_wins_over_irrelevant():
    n = [nod("S", 0, 0, 0, 10, "T01"), nod("S", 2, 0, 0, 10, None, irrelevant=True)]
    r = evaluate_detection(n, [cand("S", 1, 0, 0, .7), cand("S", 6.5, 0, 0, .9)], ["S"], n_bootstrap=0)
    # (1,0,0) hits both -> hit (not dropped); (6.5,0,0) is 6.5 from N (outside) and 4.5 from I (inside) -> dropped
    assert r["counts"]["detected"] == 1 and r["counts"]["dropped"] == 1 and r["counts"]["fp"] == 0


def test_candidate_within_two_nodules_counts_for_each():
    n = [nod("S", 0, 0, 0, 10, "T01"), nod("S", 6, 0, 0, 10, "T02")]
    r = evaluate_detection(n, [cand("S", 3, 0, 0, .5)], ["S"], n_bootstrap=0)
    assert r["counts"]["detected"] == 2 and r["counts"]["multi_hits"] == 1 and r["counts"]["fp"] == 0
    assert r["cpm"] == 1.0


def test_duplicate_hits_use_highest_score():
    n = [nod("S", 0, 0, 0, 10, "T01")]
    c = [cand("S", 1, 0, 0, .2), cand("S", 0, 1, 0, .9), cand("S", 50, 0, 0, .5)]
    m = match_candidates(n, c, ["S"])
    assert m.nod_score.tolist() == [0.9] and m.fp_score.tolist() == [0.5] and m.counts["duplicates"] == 1


def test_tie_between_tp_and_fp_interpolates_linearly():
    # one scan; hit and FP share p=.5 -> vertices (0,0) (1,1): sensitivity = f up to 1 FP/scan
    r = evaluate_detection([nod("S", 0, 0, 0, 10, "T01")], [cand("S", 0, 0, 0, .5), cand("S", 40, 0, 0, .5)],
                           ["S"], n_bootstrap=0)
    np.testing.assert_allclose(r["sensitivity"], [.125, .25, .5, 1, 1, 1, 1])
    assert r["cpm"] == pytest.approx(4.875 / 7)


def test_cpm_on_constructed_curve():
    fps = [0, 0, .25, .25, 1, 2, 2, 10]
    sens = [0, .4, .4, .6, .6, .7, .8, .9]
    # at 1/8: between (0,.4) and (.25,.4) -> .4; 1/4 -> top .6; 1/2 -> .6; 1 -> .6; 2 -> top .8;
    # 4 -> .8 + (2/8)*.1 = .825; 8 -> .8 + (6/8)*.1 = .875
    want = [.4, .6, .6, .6, .8, .825, .875]
    np.testing.assert_allclose(interp_curve(fps, sens), want)
    assert cpm_from_curve(fps, sens) == pytest.approx(np.mean(want))
    # beyond the last vertex the last sensitivity is held (np.interp's behaviour)
    assert interp_curve([0, 1], [0, .5], [8.0]).tolist() == [.5]
    with pytest.raises(FROCInputError, match="non-decreasing"):
        cpm_from_curve([1, 0], [0, 1])


def test_engine_agrees_with_froc_curve_vertices():
    r = evaluate_detection(NODULES, CANDS, SCANS, n_bootstrap=0)
    m = match_candidates(NODULES, CANDS, SCANS)
    fps, sens, thr = froc_curve(m)
    np.testing.assert_allclose(interp_curve(fps, sens, FP_RATES), r["sensitivity"])
    assert thr[0] == np.inf and thr[1] == 0.9


def test_bad_inputs_raise_actionable_errors():
    with pytest.raises(FROCInputError, match="not in scan_ids"):
        evaluate_detection(NODULES, CANDS, ["A", "B"], n_bootstrap=0)
    with pytest.raises(FROCInputError, match="diameter_mm"):
        evaluate_detection([nod("A", 0, 0, 0, 0)], [], ["A"], n_bootstrap=0)
    with pytest.raises(FROCInputError, match="probability"):
        evaluate_detection([], [{"seriesuid": "A", "coordX": 0, "coordY": 0, "coordZ": 0}], ["A"], n_bootstrap=0)
    with pytest.raises(FROCInputError, match="duplicates"):
        evaluate_detection([], [], ["A", "A"], n_bootstrap=0)


def _random_set(rng, n_scans=50):
    scans = [f"s{i}" for i in range(n_scans)]
    nodules, cands = [], []
    types = [f"T{k:02d}" for k in range(1, 13)]
    for s in scans:
        for _ in range(rng.integers(0, 4)):
            c = rng.uniform(-100, 100, 3)
            d = rng.uniform(3, 25)
            nodules.append(nod(s, *c, d, types[rng.integers(12)], irrelevant=bool(rng.random() < .1)))
            if rng.random() < .75:
                cands.append(cand(s, *(c + rng.normal(0, d / 4, 3)), round(rng.random(), 2)))
        for _ in range(rng.integers(0, 25)):
            cands.append(cand(s, *rng.uniform(-100, 100, 3), round(rng.random() * .8, 2)))
    return nodules, cands, scans


def test_bootstrap_matches_naive_resampling_loop():
    rng = np.random.default_rng(1)
    nodules, cands, scans = _random_set(rng, 12)
    B, seed = 40, 3
    r = evaluate_detection(nodules, cands, scans, n_bootstrap=B, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(scans), size=(B, len(scans)))
    W = bootstrap_weights(len(scans), B, seed)
    assert (W.sum(1) == len(scans)).all()
    cpms, t01 = [], []
    for b in range(B):        # a resample = copies of the drawn scans under new names
        names = [f"{scans[i]}#{j}" for j, i in enumerate(idx[b])]
        nb = [dict(n, seriesuid=f"{n['seriesuid']}#{j}") for j, i in enumerate(idx[b]) for n in nodules
              if n["seriesuid"] == scans[i]]
        cb = [dict(c, seriesuid=f"{c['seriesuid']}#{j}") for j, i in enumerate(idx[b]) for c in cands
              if c["seriesuid"] == scans[i]]
        rb = evaluate_detection(nb, cb, names, n_bootstrap=0)
        cpms.append(rb["cpm"] if rb["cpm"] is not None else np.nan)
        g = rb["groups"]["type"].get("T01")
        t01.append(g["sensitivity"][3] if g else np.nan)
    cpms, t01 = np.array(cpms), np.array(t01)
    np.testing.assert_allclose(r["cpm_ci"], np.nanpercentile(cpms, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(r["groups"]["type"]["T01"]["sensitivity_ci"][3],
                               np.nanpercentile(t01, [2.5, 97.5]), atol=1e-12)
    assert r["groups"]["type"]["T01"]["n_bootstrap_used"] == int((~np.isnan(t01)).sum())
    lo, hi = r["cpm_ci"]
    assert lo <= r["cpm"] <= hi


def test_bootstrap_seeded_and_fast():
    rng = np.random.default_rng(0)
    nodules, cands, scans = _random_set(rng, 50)
    t = time.perf_counter()
    r1 = evaluate_detection(nodules, cands, scans, n_bootstrap=1000, seed=7)
    dt = time.perf_counter() - t
    r2 = evaluate_detection(nodules, cands, scans, n_bootstrap=1000, seed=7)
    r3 = evaluate_detection(nodules, cands, scans, n_bootstrap=1000, seed=8)
    assert r1["cpm_ci"] == r2["cpm_ci"] and r1["cpm_ci"] != r3["cpm_ci"]
    assert len(r1["groups"]["type"]) == 12
    assert dt < 5.0, f"1000 resamples over 50 scans took {dt:.2f} s"
    band = r1["froc_band"]
    assert all(lo <= hi for lo, hi in zip(band["lower"], band["upper"]))


# ------------------------------------------------------------------------------------------ paired bootstrap
def _three_models(seed, n_scans=10):
    """Nodules of three types and two locations, and three models' candidates (hits at random scores, FPs)."""
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(n_scans)]
    nods, cands = [], {"A": [], "B": [], "C": []}
    for s in scans:
        for k in range(rng.integers(0, 4)):
            t = ["T01", "T02", "T03"][rng.integers(0, 3)]
            nods.append(nod(s, 40.0 * k, 0, 0, 8, t, loc=["isolated", "juxta-pleural"][k % 2]))
        for name, skill in (("A", 0.8), ("B", 0.4), ("C", 0.4)):
            for n in [n for n in nods if n["seriesuid"] == s]:
                if rng.random() < skill:
                    cands[name].append(cand(s, n["coordX"] + 1, 0, 0, round(rng.random(), 2)))
            for _ in range(rng.integers(0, 5)):
                cands[name].append(cand(s, 500 + 10 * rng.random(), 0, 0, round(rng.random(), 2)))
    return nods, cands, scans


def _direct_resample_cpms(nods, cands, scans, idx):
    """One resample by hand: the drawn scans copied under new names, every model evaluated from scratch."""
    pos = {s: [k for k, i in enumerate(idx) if scans[i] == s] for s in scans}
    copy = lambda rows: [dict(r, seriesuid=f"r{k}") for r in rows for k in pos[r["seriesuid"]]]
    out = {}
    for name, rows in cands.items():
        r = evaluate_detection(copy(nods), copy(rows), [f"r{k}" for k in range(len(idx))], n_bootstrap=0)
        out[name] = {"overall": r["cpm"], **{t: g["cpm"] for t, g in r["groups"]["type"].items()}}
    return out


def test_paired_bootstrap_equals_a_direct_loop_over_the_same_resamples():
    nods, cands, scans = _three_models(3)
    B, seed = 40, 7
    res = paired_bootstrap(nods, cands, scans, n_bootstrap=B, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(scans), size=(B, len(scans)))   # bootstrap_weights' draws
    per = [_direct_resample_cpms(nods, cands, scans, idx[b]) for b in range(B)]
    full = {n: evaluate_detection(nods, rows, scans, n_bootstrap=0) for n, rows in cands.items()}
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("A", "B"), ("A", "C"), ("B", "C")]
    for p in res["pairs"]:
        a, b = p["a"], p["b"]
        for group in ["overall", "T01", "T02", "T03"]:
            d = np.array([np.nan if r[a].get(group) is None else r[a][group] - r[b][group] for r in per])
            ok = ~np.isnan(d)
            got = p["overall"] if group == "overall" else p["groups"]["type"][group]
            want_pt = (full[a]["cpm"] - full[b]["cpm"] if group == "overall"
                       else full[a]["groups"]["type"][group]["cpm"] - full[b]["groups"]["type"][group]["cpm"])
            assert got["diff"] == pytest.approx(want_pt, abs=1e-12)
            assert got["n_bootstrap_used"] == ok.sum()
            np.testing.assert_allclose(got["ci"], np.percentile(d[ok], [2.5, 97.5]), atol=1e-12)
            lo, hi = got["ci"]
            assert got["winner"] == (a if lo > 0 else b if hi < 0 else None)
    assert res["cpm"]["A"]["overall"] == pytest.approx(full["A"]["cpm"])
    # the same draws as each model's own interval in evaluate_detection with that seed
    own = evaluate_detection(nods, cands["A"], scans, n_bootstrap=B, seed=seed)
    cpm_a = np.array([r["A"]["overall"] for r in per])
    np.testing.assert_allclose(own["cpm_ci"], np.percentile(cpm_a, [2.5, 97.5]), atol=1e-12)


def test_paired_bootstrap_decisions_and_best_model():
    nods, cands, scans = _three_models(5, n_scans=30)
    cands["A"] = [cand(n["seriesuid"], n["coordX"], 0, 0, 0.99) for n in nods]   # finds everything, no FP
    res = paired_bootstrap(nods, cands, scans, n_bootstrap=200, seed=0)
    ab = res["pairs"][0]
    assert ab["overall"]["winner"] == "A" and ab["overall"]["ci"][0] > 0
    assert res["best"]["overall"] == "A"
    assert res["best_counts"]["A"]["type"] == sum(v == "A" for v in res["best"]["groups"]["type"].values())
    same = paired_bootstrap(nods, {"X": cands["B"], "Y": cands["B"]}, scans, n_bootstrap=50)
    d = same["pairs"][0]["overall"]
    assert d["diff"] == 0 and d["ci"] == [0.0, 0.0] and d["winner"] is None and same["best"]["overall"] is None
    none = paired_bootstrap(nods, cands, scans, n_bootstrap=0)
    assert none["pairs"][0]["overall"]["ci"] is None and none["best"]["overall"] is None
    with pytest.raises(FROCInputError, match="two or more models"):
        paired_bootstrap(nods, {"A": cands["A"]}, scans)


# ------------------------------------------------------------------------------- seeds: hierarchical bootstrap
def test_hierarchical_bootstrap_over_seeds_and_scans_equals_a_direct_loop():
    """A model trained three times (A: runs a0, a1, a2) against one trained once (B) and one twice (C): each
    resample draws the scans (bootstrap_weights' draws) and, per model with several runs, its runs with
    replacement (rng [seed, 1], in model order); the model's score is the mean CPM of the drawn runs, every run
    evaluated from scratch on the resampled scans here."""
    nods, base, scans = _three_models(11, n_scans=8)
    _, other, _ = _three_models(12, n_scans=8)
    _, third, _ = _three_models(13, n_scans=8)
    runs = {"A": {"a0": base["A"], "a1": other["A"], "a2": third["A"]}, "B": base["B"],
            "C": {"c0": base["C"], "c1": other["B"]}}
    B, seed = 30, 5
    res = paired_bootstrap(nods, runs, scans, n_bootstrap=B, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(scans), size=(B, len(scans)))
    rng = np.random.default_rng([seed, 1])
    pick = {"A": rng.integers(0, 3, size=(B, 3)), "C": rng.integers(0, 2, size=(B, 2))}
    flat = {"a0": base["A"], "a1": other["A"], "a2": third["A"], "B": base["B"], "c0": base["C"], "c1": other["B"]}
    per = [_direct_resample_cpms(nods, flat, scans, idx[b]) for b in range(B)]
    names = {"A": ["a0", "a1", "a2"], "B": ["B"], "C": ["c0", "c1"]}

    def score(model, b, group):
        vals = [per[b][names[model][j]].get(group) for j in (pick[model][b] if model in pick else [0])]
        return np.nan if any(v is None for v in vals) else float(np.mean(vals))

    full = {r: evaluate_detection(nods, rows, scans, n_bootstrap=0) for r, rows in flat.items()}
    for p in res["pairs"]:
        a, b = p["a"], p["b"]
        for group in ["overall", "T01", "T02", "T03"]:
            d = np.array([score(a, k, group) - score(b, k, group) for k in range(B)])
            ok = ~np.isnan(d)
            got = p["overall"] if group == "overall" else p["groups"]["type"][group]
            np.testing.assert_allclose(got["ci"], np.percentile(d[ok], [2.5, 97.5]), atol=1e-12)
            assert got["n_bootstrap_used"] == ok.sum()
    # point estimates: the mean over a model's runs of each run's CPM on all scans
    assert res["cpm"]["A"]["overall"] == pytest.approx(np.mean([full[r]["cpm"] for r in names["A"]]), abs=1e-12)
    assert res["runs"]["A"]["a1"]["overall"] == pytest.approx(full["a1"]["cpm"], abs=1e-12)
    assert res["pairs"][0]["overall"]["diff"] == pytest.approx(
        np.mean([full[r]["cpm"] for r in names["A"]]) - full["B"]["cpm"], abs=1e-12)
    # each model's own interval under the same two-level resampling
    own = np.array([score("A", k, "overall") for k in range(B)])
    np.testing.assert_allclose(res["cpm_ci"]["A"]["overall"], np.percentile(own, [2.5, 97.5]), atol=1e-12)


def test_one_run_per_model_gives_the_plain_paired_bootstrap():
    nods, cands, scans = _three_models(3)
    plain = paired_bootstrap(nods, cands, scans, n_bootstrap=40, seed=7)
    wrapped = paired_bootstrap(nods, {m: {f"{m}-run": rows} for m, rows in cands.items()}, scans, n_bootstrap=40,
                               seed=7)
    assert plain["pairs"] == wrapped["pairs"] and plain["cpm"] == wrapped["cpm"]
    with pytest.raises(FROCInputError, match="at least one run"):
        paired_bootstrap(nods, {"A": {}, "B": cands["B"]}, scans)


def test_paired_across_sets_equals_a_direct_loop_over_shared_scan_and_run_draws():
    """The same two runs on two renderings of the same scans (other nodules in b): the difference b - a of the
    mean CPM over the runs, each resample drawing the scans and the runs once for both sets."""
    from ahnet.evaluate.froc import paired_across_sets
    nods_a, ca, scans = _three_models(21, n_scans=8)
    nods_b, cb, _ = _three_models(22, n_scans=8)
    runs_a, runs_b = {"r0": ca["A"], "r1": ca["B"]}, {"r0": cb["A"], "r1": cb["C"]}
    B, seed = 25, 4
    res = paired_across_sets(nods_a, runs_a, nods_b, runs_b, scans, n_bootstrap=B, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(scans), size=(B, len(scans)))
    pick = np.random.default_rng([seed, 1]).integers(0, 2, size=(B, 2))

    def cpm(nods, rows, b):
        return _direct_resample_cpms(nods, {"m": rows}, scans, idx[b])["m"]["overall"]
    d = [np.mean([cpm(nods_b, runs_b[f"r{j}"], b) for j in pick[b]])
         - np.mean([cpm(nods_a, runs_a[f"r{j}"], b) for j in pick[b]]) for b in range(B)]
    np.testing.assert_allclose(res["ci"], np.percentile(d, [2.5, 97.5]), atol=1e-12)
    full = lambda nods, runs: np.mean([evaluate_detection(nods, r, scans, n_bootstrap=0)["cpm"] for r in runs.values()])
    assert res["diff"] == pytest.approx(full(nods_b, runs_b) - full(nods_a, runs_a), abs=1e-12)
    with pytest.raises(FROCInputError, match="the same runs"):
        paired_across_sets(nods_a, runs_a, nods_b, {"r0": cb["A"]}, scans)
