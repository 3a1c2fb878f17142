"""Each run's evaluation stored beside the report (ahnet.evaluate.store): a rerun with a run added predicts only
the new run and reports the old one exactly as a fresh evaluation does; a changed setting, checkpoint, scan or
source file predicts again."""
import json
import shutil

import numpy as np
import pytest
import torch

import ahnet.evaluate as evaluate
from ahnet import paths
from ahnet.commands.evaluate import evaluate_and_report
from ahnet.evaluate import store

from .data._pipeline_synth import TINY_UNET, make_evaluation_world


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Two untrained tiny U-Nets (seeds 0 and 1) and a 3-case dataset; every call counted by the runs it predicts."""
    from ahnet.nets import build_model
    js, _, run = make_evaluation_world(tmp_path, n_cases=3, test_case=1)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    torch.manual_seed(1)
    m = build_model("unet3d", **TINY_UNET)
    torch.save({"model": m.state_dict(), "model_name": "unet3d", "model_kwargs": m.config,
                "config": {"patch_size": [4, 32, 32]}}, other / "checkpoints" / "best.pt")
    predicted = []
    real = evaluate.predict_run_rows

    def counting(run, *a, **k):
        predicted.append(__import__("pathlib").Path(run).name)
        return real(run, *a, **k)
    monkeypatch.setattr(evaluate, "predict_run_rows", counting)
    return js, run, other, predicted


def _evaluate(js, runs, out, **kw):
    return evaluate_and_report(runs, js, out, device="cpu", n_bootstrap=50, **kw)


def test_a_run_added_predicts_only_the_new_run_and_reports_the_old_exactly(world, tmp_path):
    js, run, other, predicted = world
    fresh = _evaluate(js, [run, other], tmp_path / "fresh")
    assert predicted == ["run", "other"] and paths.report_evaluated(tmp_path / "fresh", "other").is_file()
    predicted.clear()
    _evaluate(js, [run], tmp_path / "out")
    again = _evaluate(js, [run, other], tmp_path / "out")
    assert predicted == ["run", "other"]                # the first call: run; the second: other only
    for name in ("run", "other"):
        assert json.dumps(again["models"][name], sort_keys=True) == json.dumps(fresh["models"][name], sort_keys=True)
    assert json.dumps(again["comparisons"], sort_keys=True, default=str) == \
        json.dumps(fresh["comparisons"], sort_keys=True, default=str)
    for name in ("run", "other"):                       # the candidate CSVs too, byte for byte
        assert paths.report_candidates(tmp_path / "out", name).read_bytes() == \
            paths.report_candidates(tmp_path / "fresh", name).read_bytes()


def test_what_changes_a_number_predicts_again(world, tmp_path, monkeypatch):
    js, run, other, predicted = world
    out = tmp_path / "out"
    _evaluate(js, [run], out)
    _evaluate(js, [run], out, threshold=0.4)                       # a setting
    ck = run / "checkpoints" / "best.pt"
    state = torch.load(ck, weights_only=True)
    state["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ck)
    _evaluate(js, [run], out, threshold=0.4)                       # the weights
    img = json.loads(js.read_text())["training"][1]["image"]
    from ahnet.data.io import read_image, write_image
    path = js.parent / img
    vol = read_image(path)
    write_image(path, vol.array + np.float32(1.0), like=vol)
    _evaluate(js, [run], out, threshold=0.4)                       # the scan
    _evaluate(js, [run], out, threshold=0.4)                       # nothing: reused
    assert predicted == ["run"] * 4 and paths.report_evaluated(out, "run").is_file()
    predicted.clear()
    digest = store.code_digest()
    monkeypatch.setattr(store, "code_digest", lambda *a: digest[::-1])       # a source file changed
    _evaluate(js, [run], out, threshold=0.4)
    assert predicted == ["run"]


def test_a_damaged_store_is_recomputed(world, tmp_path):
    js, run, other, predicted = world
    out = tmp_path / "out"
    first = _evaluate(js, [run], out)
    paths.report_evaluated(out, "run").write_text("{not json")
    second = _evaluate(js, [run], out)
    assert predicted == ["run", "run"]
    assert json.dumps(second["models"]["run"], sort_keys=True) == json.dumps(first["models"]["run"], sort_keys=True)


def test_the_code_an_evaluation_depends_on_is_the_stages_it_can_import(tmp_path):
    """The store's code digest covers the top-level modules and the data .. evaluate folders: editing one of them
    predicts again; editing the report (a later stage, which evaluate never imports) does not."""
    pkg = tmp_path / "ahnet"
    files = {"paths.py": "A = 1\n", "infer/windows.py": "B = 2\n", "evaluate/froc.py": "C = 3\n",
             "report/stages.py": "D = 4\n", "commands/evaluate.py": "E = 5\n"}
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)

    def digests():
        return store.code_digest(store.EVALUATION_SOURCES, root=pkg), store.code_digest(root=pkg)

    before = digests()
    for name, moves in (("report/stages.py", False), ("commands/evaluate.py", False), ("paths.py", True),
                        ("infer/windows.py", True), ("evaluate/froc.py", True)):
        (pkg / name).write_text(files[name] + "# changed\n")
        now = digests()
        assert (now[0] != before[0]) == moves, name
        assert now[1] != before[1], name                       # the whole package's digest sees every change
        before = now
