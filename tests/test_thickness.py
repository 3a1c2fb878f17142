"""The slice-thickness study: its numbers against direct computations, and the command on real tiny final sets."""
import json

import numpy as np
import pytest

from ahnet import paths
from ahnet.commands import thickness as cmd
from ahnet.commands.phantoms import slice_options
from ahnet.data.io import read_annotations_csv, write_candidates_csv
from ahnet.data.nodule_types import TYPE_CODES
from ahnet.data.phantom import generate_test_phantom
from ahnet.evaluate.froc import FROCInputError, evaluate_detection, paired_bootstrap
from ahnet.evaluate.thickness import TYPE_GROUPS, composition, thickness_summary, with_composition

TYPES = list(TYPE_CODES)


def _nodules(n_scans=12):
    scans = [f"s{i}" for i in range(n_scans)]
    nods = [{"seriesuid": s, "coordX": 40.0 * k, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 8.0,
             "type": TYPES[(i * 3 + k) % 12]} for i, s in enumerate(scans) for k in range(3)]
    return nods, scans


def _candidates(nods, scans, skill, seed):
    """A detector that finds each nodule with probability ``skill`` and makes one false positive a scan."""
    rng = np.random.default_rng(seed)
    out = [{"seriesuid": n["seriesuid"], "coordX": float(n["coordX"]) + 1, "coordY": float(n["coordY"]),
            "coordZ": float(n["coordZ"]),
            "probability": round(float(rng.uniform(0.3, 1)), 3)} for n in nods if rng.random() < skill]
    return out + [{"seriesuid": s, "coordX": 900.0, "coordY": 0.0, "coordZ": 0.0,
                   "probability": round(float(rng.uniform(0, 0.8)), 3)} for s in scans]


def test_every_type_has_one_composition_group():
    assert [composition(t) for t in TYPES] == ["solid"] * 6 + ["part-solid"] * 2 + ["ground-glass"] * 2 + \
        ["calcified"] * 2
    assert composition("T13") is None and composition(None) is None


def test_the_summary_matches_direct_computations():
    """CPMs overall and per group equal evaluate_detection's; a one-run pair's interval equals paired_bootstrap's
    on the same resamples; a model's CPM over two runs is the mean of theirs; the interaction is the change of the
    difference, exactly 0 (interval [0, 0]) where the two spacings' candidates are the same."""
    nods, scans = _nodules()
    rows = {"t": _candidates(nods, scans, 0.9, 1), "t-seed1": _candidates(nods, scans, 0.8, 2),
            "u": _candidates(nods, scans, 0.6, 3)}
    thick = dict(rows, u=_candidates(nods, scans, 0.3, 4))
    sets = {2.5: (nods, rows, scans), 5.0: (nods, thick, scans), 1.25: (nods, rows, scans)}
    models = {"ahnet-transfer": ["t", "t-seed1"], "unet3d-scratch": ["u"]}
    s = thickness_summary(sets, models, [("ahnet-transfer", "unet3d-scratch")], n_bootstrap=300, seed=0)
    assert s["spacings"] == [1.25, 2.5, 5.0] and s["groups"] == ["overall", *TYPE_GROUPS]

    direct = evaluate_detection(with_composition(nods), rows["u"], scans, n_bootstrap=0, group_keys=("composition",))
    got = s["cpm"]["2.5"]["unet3d-scratch"]
    assert got["overall"]["value"] == pytest.approx(direct["cpm"], abs=1e-12)
    for g in TYPE_GROUPS:
        assert got[g]["value"] == pytest.approx(direct["groups"]["composition"][g]["cpm"], abs=1e-12)
    two = [evaluate_detection(nods, rows[r], scans, n_bootstrap=0)["cpm"] for r in ("t", "t-seed1")]
    assert s["cpm"]["2.5"]["ahnet-transfer"]["overall"]["value"] == pytest.approx(np.mean(two), abs=1e-12)

    one = thickness_summary({1.25: (nods, rows, scans), 2.5: (nods, rows, scans), 5.0: (nods, thick, scans)},
                            {"ahnet-transfer": ["t"], "unet3d-scratch": ["u"]}, [("ahnet-transfer", "unet3d-scratch")],
                            n_bootstrap=300, seed=0)
    ref = paired_bootstrap(nods, {"ahnet-transfer": rows["t"], "unet3d-scratch": rows["u"]}, scans, n_bootstrap=300,
                           seed=0)["pairs"][0]["overall"]
    d = one["pairs"][0]["by_set"]["2.5"]["overall"]
    assert d["value"] == pytest.approx(ref["diff"], abs=1e-12) and d["ci"] == pytest.approx(ref["ci"], abs=1e-12)

    pair = one["pairs"][0]
    same = pair["interaction"]["2.5"]["overall"]                   # 2.5 mm against 1.25 mm: the same candidates
    assert same["value"] == 0 and same["ci"] == [0.0, 0.0] and not same["decided"]
    unchanged = one["change"]["2.5"]["unet3d-scratch"]["overall"]
    assert unchanged["value"] == 0 and unchanged["ci"] == [0.0, 0.0]
    worse = one["change"]["5"]["unet3d-scratch"]["overall"]
    assert worse["value"] == pytest.approx(one["cpm"]["5"]["unet3d-scratch"]["overall"]["value"]
                                           - one["cpm"]["1.25"]["unet3d-scratch"]["overall"]["value"], abs=1e-12)
    assert worse["decided"] and worse["ci"][1] < 0
    moved = pair["interaction"]["5"]["overall"]                    # the U-Net much worse at 5 mm
    want = (pair["by_set"]["5"]["overall"]["value"] - pair["by_set"]["1.25"]["overall"]["value"])
    assert moved["value"] == pytest.approx(want, abs=1e-12) and moved["value"] > 0.1
    assert moved["decided"] and moved["ci"][0] > 0


def test_the_summary_refuses_sets_it_cannot_pair():
    nods, scans = _nodules()
    rows = {"t": _candidates(nods, scans, 0.9, 1), "u": _candidates(nods, scans, 0.6, 3)}
    models = {"ahnet-transfer": ["t"], "unet3d-scratch": ["u"]}
    with pytest.raises(FROCInputError, match="other scans"):
        thickness_summary({2.5: (nods, rows, scans), 5.0: (nods, rows, scans[:-1])}, models, [], n_bootstrap=0)
    with pytest.raises(FROCInputError, match="two or more slice spacings"):
        thickness_summary({2.5: (nods, rows, scans)}, models, [], n_bootstrap=0)
    with pytest.raises(FROCInputError, match="among the models"):
        thickness_summary({2.5: (nods, rows, scans), 5.0: (nods, rows, scans)}, models, [("ahnet-transfer", "x")])


SMALL = dict(n_cases=2, size=96, spacing=1.2, nodules_per_case=4)


def _final_set(root, spacing, skills, seed=0, name=None):
    """A real tiny final set at ``spacing`` under root/data and the candidates its evaluation would have written
    under root/runs, one CSV per run: {run name: detector skill}; ``name``: the 2.5 mm experiment's --name."""
    ep = paths.ExperimentPaths(paths.experiment_name("cpu", spacing, name))
    ds = generate_test_phantom(root / ep.final, "demo", seed=0, **SMALL, thickness=slice_options(spacing)["thickness"],
                               slices=int(round(60 / spacing)))
    ann = read_annotations_csv(paths.annotations_csv(ds))
    scans = sorted({a["seriesuid"] for a in ann})
    for k, (run, skill) in enumerate(skills.items()):
        write_candidates_csv(paths.report_candidates(root / ep.report(final=True), run),
                             _candidates(ann, scans, skill, seed + k))
    return ds


def test_the_command_writes_the_study_from_two_spacings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _final_set(tmp_path, 2.5, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.7})
    _final_set(tmp_path, 5.0, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.4}, seed=7)
    assert cmd.main(["--preset", "cpu", "--spacings", "2.5", "5", "--bootstrap", "50"]) == 0
    out = tmp_path / paths.ExperimentPaths("phantom-cpu").thickness_report()
    md = (out / paths.REPORT_MD).read_text()
    summary = json.loads((out / paths.REPORT_JSON).read_text())
    assert summary["cpm"]["2.5"]["ahnet-transfer"]["overall"]["value"] > 0.5     # the detectors' hits count
    assert "| AH-Net after transfer - 3D U-Net from scratch | 5 vs 2.5 |" in md
    assert "| 3D U-Net from scratch | 5 vs 2.5 |" in md
    assert "python -m ahnet.thickness --preset cpu --spacings 2.5 5 --bootstrap 50" in md
    for fig in ("thickness_cpm.png", "thickness_pairs.png"):
        assert (out / fig).stat().st_size > 2000


def test_the_command_reads_a_named_experiment_at_each_spacing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _final_set(tmp_path, 2.5, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.7}, name="phantom-cpu-main")
    _final_set(tmp_path, 5.0, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.4}, seed=7, name="phantom-cpu-main")
    assert cmd.main(["--preset", "cpu", "--spacings", "2.5", "5", "--bootstrap", "0"]) == 2   # no phantom-cpu
    err = capsys.readouterr().err
    assert "no final evaluation at 2.5 mm" in err and "--name phantom-cpu --final" in err
    argv = ["--preset", "cpu", "--name", "phantom-cpu-main", "--spacings", "2.5", "5", "--bootstrap", "0"]
    assert cmd.main(argv) == 0
    out = tmp_path / paths.ExperimentPaths("phantom-cpu-main").thickness_report()
    assert set(json.loads((out / paths.REPORT_JSON).read_text())["cpm"]) == {"2.5", "5"}
    assert "runs/phantom-cpu-main-z5/report-final" in (out / paths.REPORT_MD).read_text()


@pytest.mark.parametrize("argv, message", [
    (["--spacings", "2.5"], "two or more slice spacings"),
    (["--spacings", "2.5", "1.25"], "no final evaluation at 1.25 mm"),
    (["--variants", "ahnet-transfer", "ahnet-scratch"], "--variants ahnet-scratch: no final candidates"),
    (["--variants", "unet3d-scratch"], "compares ahnet-transfer with at least one other model"),
    (["--spacings", "2.5", "nan"], "--spacings"),
])
def test_the_command_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    _final_set(tmp_path, 2.5, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.7})
    _final_set(tmp_path, 5.0, {"ahnet-transfer": 0.9, "unet3d-scratch": 0.4})
    try:
        rc = cmd.main(["--preset", "cpu", *argv])
    except SystemExit as e:                       # the parser's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.thickness: error:") and message in err[0]
    assert not (tmp_path / paths.ExperimentPaths("phantom-cpu").thickness_report()).exists()

