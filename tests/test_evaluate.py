"""End-to-end evaluation pieces with synthetic volumes and stand-in models."""
import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from ahnet import evaluate as ev
from ahnet.commands import evaluate as ev_cli
from ahnet.infer.candidates import voxel_to_world

SP = (2.5, 0.7, 0.7)


class Geo:
    def __init__(self, origin=(-10.0, 5.0, 100.0)):
        self.spacing, self.origin, self.direction = SP, origin, np.eye(3)


def _case(cid, centres, shape=(12, 40, 40), r_mm=3.0):
    """A case with spherical nodules at voxel centres; returns (case dict, annotation rows, perfect prob map)."""
    g = np.indices(shape).astype(float)
    lab = np.zeros(shape, np.int32)
    rows = []
    geo = Geo()
    for k, c in enumerate(centres, 1):
        d2 = sum(((g[i] - c[i]) * SP[i]) ** 2 for i in range(3))
        lab[d2 <= r_mm ** 2] = k
        x, y, z = voxel_to_world([c], SP, geo.origin)[0]
        rows.append({"seriesuid": cid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 2 * r_mm,
                     "type": "T01" if k == 1 else "T03", "location": "isolated", "label": k})
    return {"case_id": cid, "geometry": geo, "label": lab}, rows, (lab > 0).astype(np.float32) * 0.9


def test_perfect_and_empty_predictions():
    c1, a1, p1 = _case("c1", [(5, 10, 10), (6, 28, 30)])
    c2, a2, p2 = _case("c2", [(6, 20, 20)])
    c3, _, p3 = _case("c3", [])
    fp = p3.copy()
    fp[2:4, 5:8, 5:8] = 0.7                                      # one false positive in a nodule-free scan
    probs = {"perfect": {"c1": p1, "c2": p2, "c3": fp}, "empty": {"c1": p1 * 0, "c2": p2 * 0, "c3": p3}}
    res = ev.evaluate_predictions(probs, [c1, c2, c3], a1 + a2, n_bootstrap=100)
    d = res["perfect"]["detection"]
    assert d["n_nodules"] == 3 and d["counts"]["fp"] == 1 and d["counts"]["detected"] == 3
    assert d["cpm"] == 1.0 and d["groups"]["type"]["T01"]["n"] == 2
    s = res["perfect"]["segmentation"]
    assert s["overall"]["dice"]["mean"] == 1.0 and s["overall"]["hd95_mm"]["mean"] == 0.0
    e = res["empty"]
    assert e["detection"]["cpm"] == 0.0 and e["candidates"] == []
    assert e["segmentation"]["overall"]["n_missed"] == 3 and e["segmentation"]["overall"]["dice"]["mean"] == 0.0
    assert e["segmentation"]["overall"]["hd95_mm"]["n"] == 0
    with pytest.raises(ev.EvaluateInputError, match="no prediction"):
        ev.evaluate_predictions({"x": {"c1": p1}}, [c1, c2], a1 + a2, n_bootstrap=0)


def test_cli_end_to_end(tmp_path, monkeypatch):
    import json

    import ahnet.infer.ensemble as E
    from ahnet.data import io
    c1, a1, _ = _case("c1", [(5, 10, 10)])
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    hu = np.where(c1["label"] > 0, 50.0, -900.0).astype(np.float32)
    io.write_image(data / "imagesTr" / "c1.nii.gz", io.Volume(hu, SP, c1["geometry"].origin))
    io.write_image(data / "labelsTr" / "c1.nii.gz", io.Volume(c1["label"].astype(np.int16), SP,
                                                              c1["geometry"].origin))
    io.write_annotations_csv(data / "annotations.csv", a1)
    (data / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz", "case_id": "c1", "split": "test"}]}))

    def build(name, **kw):                       # a stand-in: logits = 40 * (x - 0.5) -> nodule voxels
        m = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            m.weight.fill_(40.0)
            m.bias.fill_(-20.0)
        return m
    monkeypatch.setattr(E, "build_model", build)
    run = tmp_path / "runs" / "ahnet_a"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": build("ahnet").state_dict(), "model_name": "ahnet", "model_kwargs": {},
                "config": {"patch_size": [4, 16, 16]}}, run / "checkpoints" / "best.pt")
    out = tmp_path / "report"
    assert ev_cli.main(["--runs", str(run), "--data", str(data / "dataset.json"), "--out", str(out),
                        "--bootstrap", "50"]) == 0
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["models"]["ahnet_a"]["cpm"] == 1.0
    assert rep["models"]["ahnet_a"]["types"]["T01"]["dice"]["mean"] == pytest.approx(1.0)
    assert (out / "candidates" / "ahnet_a.csv").read_text(encoding="utf-8").startswith("seriesuid,coordX,coordY,coordZ,probability")


@pytest.mark.parametrize("extra, want", [([], "absent not found"), (["--device", "bogus"], "not a torch device"),
                                         (["--threshold", "2"], "expected a probability in [0, 1], got '2'"),
                                         (["--sw-batch", "x"],
                                          "argument --sw-batch: expected an integer in [1, 4096], got 'x'")])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, want):
    ds = tmp_path / "dataset.json"
    ds.write_text('{"training": []}', encoding="utf-8")
    usage = {"--sw-batch", "--threshold"} & set(extra)              # argparse errors: SystemExit(2)
    with pytest.raises(SystemExit) if usage else contextlib.nullcontext() as e:
        rc = ev_cli.main(["--runs", str(tmp_path / "absent"), "--data", str(ds), *extra])
    assert (e.value.code if e else rc) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ahnet.evaluate: error:") and len(err.splitlines()) == 1 and want in err


def test_gallery_crops_show_the_nodule_its_contour_and_the_candidates():
    c1, a1, p1 = _case("c1", [(5, 10, 10), (6, 28, 30)])
    c2, a2, p2 = _case("c2", [(6, 20, 20)])
    fp = np.zeros_like(p2)
    fp[2:4, 30:33, 5:8] = 0.95                                  # a false positive scoring above every nodule
    p1 = p1.copy()
    p1[c1["label"] == 2] = 0.0                                  # the second nodule of c1 is missed
    probs = {"ahnet-transfer": {"c1": p1, "c2": np.maximum(p2, fp)}, "other": {"c1": p1 * 0, "c2": p2}}
    cases = [c1, c2]
    images = {"c1": (c1["label"] > 0).astype(np.float32), "c2": (c2["label"] > 0).astype(np.float32)}
    res = ev.evaluate_predictions(probs, cases, a1 + a2, n_bootstrap=0)
    g = ev.gallery_crops(res, cases, images, a1 + a2, n_hits=2, n_misses=2, n_false_positives=3, half_mm=7.0)
    assert g["focus"] == "ahnet-transfer"                       # AH-Net after transfer, not the first model
    assert g["thresholds"]["ahnet-transfer"] == pytest.approx(0.9)   # 1 FP over 2 scans: the nodules' 0.9 passes
    t01, t03 = g["types"]["T01"], g["types"]["T03"]
    assert [c["kind"] for c in t01] == ["hit", "hit"] and [c["kind"] for c in t03] == ["miss"]
    hit, (miss,) = t01[1], t03                                   # c2's nodule (label 1, T01); c1's label 2 (T03)
    assert (hit["seriesuid"], miss["seriesuid"]) == ("c2", "c1") and miss["score"] is None
    assert hit["found_by"] == ["ahnet-transfer", "other"] and miss["found_by"] == []
    assert hit["slice"] == 6 and hit["image"].shape == hit["contour"].shape == (21, 21)   # 7 mm / 0.7 mm each side
    np.testing.assert_array_equal(hit["contour"], c2["label"][6, 10:31, 10:31] == 1)
    assert hit["image"].max() == pytest.approx(400.0) and hit["image"].min() == pytest.approx(-1000.0)   # HU
    (mk,) = hit["marks"]                                         # the candidate at the nodule's centre
    assert (mk["row"], mk["col"], mk["status"], mk["above_threshold"]) == (pytest.approx(10), pytest.approx(10),
                                                                            "hit", True)
    (f,) = g["false_positives"]["ahnet-transfer"]
    assert f["kind"] == "fp" and f["score"] == pytest.approx(0.95) and f["seriesuid"] == "c2"
    assert f["marks"][0]["status"] == "fp" and f["slice"] in (2, 3)
    assert g["false_positives"]["other"] == []


def _dataset(tmp_path, cases):
    """A dataset.json of the test split with its annotations.csv; ``cases``: [(case dict, annotation rows, HU)]."""
    import json

    from ahnet.data import io
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    entries, ann = [], []
    for c, rows, hu in cases:
        cid = c["case_id"]
        io.write_image(data / "imagesTr" / f"{cid}.nii.gz", io.Volume(hu.astype(np.float32), SP, c["geometry"].origin))
        io.write_image(data / "labelsTr" / f"{cid}.nii.gz", io.Volume(c["label"].astype(np.int16), SP,
                                                                       c["geometry"].origin))
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz", "case_id": cid,
                        "split": "test"})
        ann += rows
    io.write_annotations_csv(data / "annotations.csv", ann)
    (data / "dataset.json").write_text(json.dumps({"training": entries}))
    return data / "dataset.json"


def test_a_report_from_kept_candidates_equals_the_evaluations_own(tmp_path, monkeypatch):
    """--from-candidates on the candidates an evaluation wrote gives that evaluation's detection report: every CPM,
    interval, per-type figure and paired comparison, from the plain and from the gzipped files alike."""
    import gzip
    import json

    import ahnet.infer.ensemble as E
    cases = []
    for k, centres in enumerate([[(5, 10, 10), (6, 28, 30)], [(6, 20, 20)], [(4, 12, 30)]]):
        c, rows, _ = _case(f"c{k}", centres)
        hu = np.where(c["label"] == 1, 60.0, np.where(c["label"] > 1, -450.0, -900.0))   # a bright and faint one
        hu[1:3, 34:37, 2:5] = -300.0                                                       # a nodule-like blob
        cases.append((c, rows, hu))
    data = _dataset(tmp_path, cases)

    def build(name, cut=0.5, **kw):              # logits = 40 * (x - cut): the cut decides what each one sees
        m = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            m.weight.fill_(40.0)
            m.bias.fill_(-40.0 * cut)
        return m
    monkeypatch.setattr(E, "build_model", build)
    runs = []
    for cut in ("0.3", "0.6"):
        run = tmp_path / "runs" / f"net_{cut}"
        (run / "checkpoints").mkdir(parents=True)
        torch.save({"model": build("ahnet", float(cut)).state_dict(), "model_name": "ahnet",
                    "model_kwargs": {"cut": float(cut)},
                    "config": {"patch_size": [4, 16, 16]}}, run / "checkpoints" / "best.pt")
        runs.append(str(run))
    out = tmp_path / "report"
    assert ev_cli.main(["--runs", *runs, "--data", str(data), "--out", str(out), "--bootstrap", "200"]) == 0
    own = json.loads((out / "report.json").read_text(encoding="utf-8"))
    cpms = [own["models"][m]["cpm"] for m in own["model_order"]]
    assert len(set(cpms)) == 2 and min(cpms) < 1.0                       # two different, imperfect detectors
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "net_0.3.csv.gz").write_bytes(gzip.compress((out / "candidates" / "net_0.3.csv").read_bytes()))
    (kept / "net_0.6.csv").write_bytes((out / "candidates" / "net_0.6.csv").read_bytes())
    again = tmp_path / "again"
    assert ev_cli.main(["--from-candidates", str(kept), "--data", str(data), "--out", str(again),
                        "--bootstrap", "200"]) == 0
    rep = json.loads((again / "report.json").read_text(encoding="utf-8"))
    assert rep["model_order"] == own["model_order"]
    for m in own["model_order"]:
        a, b = own["models"][m], rep["models"][m]
        assert (b["cpm"], b["cpm_ci"], b["found"]) == (a["cpm"], a["cpm_ci"], a["found"])
        assert {t: v["cpm"] for t, v in b["types"].items()} == {t: v["cpm"] for t, v in a["types"].items()}
    assert rep["comparisons"] == own["comparisons"] and rep["wins"] == own["wins"]
    assert "no prediction" in (again / "report.md").read_text(encoding="utf-8")


def _rows(ann, scans, skill, seed):
    """Candidates of a detector of ``skill``: each nodule found with that probability, plus false positives; the
    first stage's score kept as probability_stage1 (a second stage that sharpens it)."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in ann:
        p1 = float(np.clip(skill + rng.normal(0, 0.2), 0.01, 0.99))
        rows.append({"seriesuid": a["seriesuid"], "coordX": a["coordX"], "coordY": a["coordY"], "coordZ": a["coordZ"],
                     "probability": p1 ** 0.5, "probability_stage1": p1})
    for s in scans:
        for _ in range(3):
            p1 = float(rng.uniform(0.05, 0.9))
            rows.append({"seriesuid": s, "coordX": 500.0 + rng.normal(), "coordY": 0.0, "coordZ": 0.0,
                         "probability": p1 ** 2, "probability_stage1": p1})
    return rows


def test_kept_candidates_of_several_seeds_are_compared_over_seeds_and_stages(tmp_path):
    """--group-seeds compares <model> and <model>-seed<k> as one model over seeds and scans (the experiment's
    paired_bootstrap with groups, computed here directly) and shows each first stage beside its system."""
    import json

    from ahnet.data.io import candidates_csv_text
    from ahnet.evaluate.froc import paired_bootstrap
    cases = []
    for k in range(4):
        c, rows, _ = _case(f"c{k}", [(5, 10, 10), (6, 28, 30)])
        cases.append((c, rows, np.where(c["label"] > 0, 50.0, -900.0)))
    data = _dataset(tmp_path, cases)
    ann = [r for _, rows, _ in cases for r in rows]
    scans = [c["case_id"] for c, _, _ in cases]
    kept = tmp_path / "kept"
    kept.mkdir()
    cands = {}
    for i, (run, skill) in enumerate({"a": 0.8, "a-seed1": 0.75, "b": 0.5, "b-seed1": 0.55}.items()):
        cands[run] = _rows(ann, scans, skill, i)
        (kept / f"{run}.csv").write_text(candidates_csv_text(cands[run], ["probability_stage1"]))
    out = tmp_path / "report"
    assert ev_cli.main(["--from-candidates", str(kept), "--data", str(data), "--out", str(out), "--bootstrap", "100",
                        "--group-seeds"]) == 0
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    from ahnet.data.io import read_candidates_csv
    back = {r: read_candidates_csv(kept / f"{r}.csv") for r in cands}
    direct = paired_bootstrap(ann, {"a": {r: back[r] for r in ("a", "a-seed1")},
                                    "b": {r: back[r] for r in ("b", "b-seed1")}}, scans, n_bootstrap=100, seed=0)
    assert rep["comparisons"]["all_pairs"] == json.loads(json.dumps(direct["pairs"]))
    assert set(rep["comparisons"]["seeds"]["a"]["runs"]) == {"a", "a-seed1"}
    from ahnet.evaluate.froc import evaluate_detection
    first = {m: np.mean([evaluate_detection(ann, [dict(c, probability=c["probability_stage1"]) for c in back[r]],
                                            scans, n_bootstrap=0)["cpm"] for r in (m, m + "-seed1")])
             for m in ("a", "b")}                 # each model's first stage alone: the mean over its seeds
    assert {m: rep["stages"]["models"][m]["cpm_first"] for m in ("a", "b")} == pytest.approx(first)
    assert "first stage" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("setup, extra, want", [
    ("stray", [], "candidates on 1 scan(s) not in split 'test'"),
    ("uneven", ["--group-seeds"], "--group-seeds: the models hold different numbers of runs"),
    ("ok", ["--tta", "--overlap", "0.3"], "--overlap, --tta: no effect with --from-candidates"),
    ("empty", [], "no <run>.csv or <run>.csv.gz in it"),
    ("ok", ["--candidate-threshold", "0.5"], "--candidate-threshold: no effect"),
    ("no score", [], "missing columns ['probability']"),
])
def test_from_candidates_refuses_bad_input_in_one_line(tmp_path, capsys, setup, extra, want):
    from ahnet.data.io import candidates_csv_text
    c, rows, _ = _case("c0", [(5, 10, 10)])
    data = _dataset(tmp_path, [(c, rows, np.where(c["label"] > 0, 50.0, -900.0))])
    kept = tmp_path / "kept"
    kept.mkdir()
    good = _rows(rows, ["c0"], 0.8, 0)
    if setup in ("ok", "stray", "uneven"):
        (kept / "a.csv").write_text(candidates_csv_text(good, ["probability_stage1"]))
    if setup == "no score":
        (kept / "a.csv").write_text("seriesuid,coordX,coordY,coordZ\nc0,1,2,3\n")
    if setup == "stray":
        (kept / "b.csv").write_text(candidates_csv_text([dict(good[0], seriesuid="elsewhere")]))
    if setup == "uneven":
        for r in ("a-seed1", "b"):
            (kept / f"{r}.csv").write_text(candidates_csv_text(good))
    rc = ev_cli.main(["--from-candidates", str(kept), "--data", str(data), "--out", str(tmp_path / "out"), *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.evaluate: error:") and want in err[0], err
    assert not (tmp_path / "out" / "report.json").exists()


def test_kept_runs_come_in_the_experiments_order():
    """The experiment's variants first, in its order, then other models by name, each model's seeds by number
    (seed 10 after seed 2): the order the hierarchical bootstrap draws seeds in."""
    names = ["unet3d-scratch-seed1", "zeta", "ahnet-transfer-seed10", "mcgcn-2d", "ahnet-transfer-seed2", "alpha",
             "ahnet-transfer", "unet3d-scratch"]
    assert sorted(names, key=ev_cli._run_order) == [
        "mcgcn-2d", "ahnet-transfer", "ahnet-transfer-seed2", "ahnet-transfer-seed10", "unet3d-scratch",
        "unet3d-scratch-seed1", "alpha", "zeta"]
