"""``python -m ahnet.lever``: a lever against its base on real tiny dev sets, its numbers against direct
computations, and its refusals."""
import json
import shutil

import pytest

from ahnet import paths
from ahnet.commands import lever as cmd
from ahnet.data.io import read_annotations_csv, write_candidates_csv
from ahnet.data.phantom import generate_test_phantom
from ahnet.evaluate.froc import evaluate_detection
from tests.test_thickness import _candidates

SMALL = dict(n_cases=2, size=96, spacing=1.2, nodules_per_case=4, slices=24)


def _evaluated(root, name, shift, skills, seed, phantom_seed=0):
    """A real tiny dev set (or its rendering with ``shift``: here the same scans) of experiment ``name`` under
    root/data, and the candidates its evaluation would have written under root/runs: {run: detector skill}.
    Returns {run: candidate rows}, the annotations and the scan ids."""
    ep = paths.ExperimentPaths(name)
    folder = root / ep.held_out(False, shift)
    cached = root / f"phantom-{phantom_seed}"
    if not cached.is_dir():
        generate_test_phantom(cached, "demo", seed=phantom_seed, **SMALL)
    shutil.copytree(cached, folder)
    ann = read_annotations_csv(paths.annotations_csv(folder / paths.DATASET))
    scans = sorted({a["seriesuid"] for a in ann})
    rows = {}
    for k, (run, skill) in enumerate(skills.items()):
        rows[run] = _candidates(ann, scans, skill, seed + k)
        write_candidates_csv(paths.report_candidates(root / ep.report(False, shift), run), rows[run])
    return rows, ann, scans


def _two_experiments(root):
    base = {s: _evaluated(root, "base", s, {"mcgcn-2d": sk}, seed)
            for s, sk, seed in ((None, 0.9, 1), ("smooth", 0.4, 2))}
    lever = {s: _evaluated(root, "blur", s, {"mcgcn-2d": sk}, seed)
             for s, sk, seed in ((None, 0.8, 3), ("smooth", 0.7, 4))}
    return base, lever


def _cpm(ev):
    rows, ann, scans = ev
    return evaluate_detection(ann, rows["mcgcn-2d"], scans, n_bootstrap=0)["cpm"]


def test_the_comparison_matches_direct_computations(tmp_path, monkeypatch):
    """CPMs equal evaluate_detection's; lever - base, each shift's cost and what the lever recovers are the
    differences of those CPMs; the report names the command and holds the figure."""
    monkeypatch.chdir(tmp_path)
    base, lever = _two_experiments(tmp_path)
    assert cmd.main(["--base", "base", "--lever", "blur", "--bootstrap", "50"]) == 0
    out = tmp_path / paths.ExperimentPaths("blur").lever_report("base")
    s = json.loads((out / paths.REPORT_JSON).read_text())
    assert s["sets"] == ["dev", "smooth"] and s["variants"] == ["mcgcn-2d"]
    cpm = {(e, k): _cpm(ev[k]) for e, ev in (("base", base), ("blur", lever)) for k in (None, "smooth")}
    for (e, k), want in cpm.items():
        assert s["cpm"][k or "dev"][f"{e}/mcgcn-2d"]["overall"]["value"] == pytest.approx(want, abs=1e-12)
    pair = s["pairs"][0]
    assert (pair["a"], pair["b"]) == ("blur/mcgcn-2d", "base/mcgcn-2d")
    gain = {k: cpm["blur", k] - cpm["base", k] for k in (None, "smooth")}
    assert pair["by_set"]["dev"]["overall"]["value"] == pytest.approx(gain[None], abs=1e-12)
    assert pair["interaction"]["smooth"]["overall"]["value"] == pytest.approx(gain["smooth"] - gain[None], abs=1e-12)
    cost = s["change"]["smooth"]["base/mcgcn-2d"]["overall"]
    assert cost["value"] == pytest.approx(cpm["base", "smooth"] - cpm["base", None], abs=1e-12)
    lo, hi = cost["ci"]
    assert lo <= cost["value"] <= hi
    md = (out / paths.REPORT_MD).read_text()
    assert "python -m ahnet.lever --base base --lever blur --bootstrap 50" in md
    assert "What the lever changes: not read here" in md and s["changes"] is None
    assert "| smooth |" in md and "recovered by the lever" in md
    assert (out / "lever_cpm.png").stat().st_size > 2000


def test_a_lever_that_changes_nothing_recovers_exactly_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("base", "same"):
        for shift, skill, seed in ((None, 0.9, 1), ("smooth", 0.5, 2)):
            _evaluated(tmp_path, name, shift, {"mcgcn-2d": skill}, seed)
    assert cmd.main(["--base", "base", "--lever", "same", "--bootstrap", "40"]) == 0
    s = json.loads((tmp_path / paths.ExperimentPaths("same").lever_report("base") / paths.REPORT_JSON).read_text())
    for d in (s["pairs"][0]["by_set"]["dev"]["overall"], s["pairs"][0]["interaction"]["smooth"]["overall"]):
        assert d["value"] == 0 and d["ci"] == [0, 0] and not d["decided"]


@pytest.mark.parametrize("argv, message", [
    (["--base", "base", "--lever", "base"], "both name base"),
    (["--base", "base", "--lever", "nothing"], "--lever nothing: no evaluation on its dev set"),
    (["--base", "base", "--lever", "blur", "--final"], "no evaluation on its final set"),
    (["--base", "base", "--lever", "blur", "--shifts", "noise2x"], "--shifts noise2x: not evaluated"),
    (["--base", "base", "--lever", "blur", "--variants", "ahnet-transfer"], "--variants ahnet-transfer: its 1 run"),
    (["--base", "base", "--lever", "other"], "the dev set differs between the two experiments"),
    (["--base", "base", "--lever", "blur", "--shifts", "blurry"], "--shifts"),
    (["--base", "base", "--lever", "blur", "--bootstrap", "-1"], "--bootstrap"),
])
def test_the_command_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    _two_experiments(tmp_path)
    _evaluated(tmp_path, "other", None, {"mcgcn-2d": 0.9}, 1, phantom_seed=5)
    try:
        rc = cmd.main(argv)
    except SystemExit as e:                       # the parser's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.lever: error:") and message in err[0], err
    assert not any(p.name.startswith("report-vs") for p in (tmp_path / "runs").rglob("*"))


def test_the_report_says_what_the_lever_changes(tmp_path, monkeypatch):
    """Read from the first model's runs: each training setting and training phantom option that differs, base ->
    lever, and nothing about the folders that name the experiments."""
    monkeypatch.chdir(tmp_path)
    _two_experiments(tmp_path)
    for name, augment, psf in (("base", "standard", 0.5), ("blur", "standard-coarsen", [0.25, 1.0])):
        ep = paths.ExperimentPaths(name)
        data = ep.train / paths.DATASET
        data.parent.mkdir(parents=True)
        data.write_text(json.dumps({"options": {"psf_sigma": psf, "noise": [10.0, 40.0]}}))
        run = paths.run_paths(ep.run("mcgcn-2d"))
        run.root.mkdir(parents=True)
        run.config.write_text(json.dumps({"config": {"data": str(data), "out": str(run.root), "augment": augment,
                                                     "lr": 0.001}}))
    assert cmd.main(["--base", "base", "--lever", "blur", "--bootstrap", "0"]) == 0
    out = tmp_path / paths.ExperimentPaths("blur").lever_report("base")
    s = json.loads((out / paths.REPORT_JSON).read_text())
    assert s["changes"] == ['augment: "standard" -> "standard-coarsen"', "phantom psf_sigma: 0.5 -> [0.25, 1.0]"]
    assert ('What the lever changes (mcgcn-2d runs\' settings and training phantoms): `augment: "standard" -> '
            '"standard-coarsen"`; `phantom psf_sigma: 0.5 -> [0.25, 1.0]`.') in (out / paths.REPORT_MD).read_text()
