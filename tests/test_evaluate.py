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
