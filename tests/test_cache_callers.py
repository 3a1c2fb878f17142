"""One cache for a dataset, whoever builds it: training, the experiment's data step and `bash run.sh data`
(python -m ahnet.commands.cache --data) agree on every case's build key, so none rebuilds another's files, and
each nodule keeps the type and location of the annotations beside dataset.json."""
import itertools
import json
from pathlib import Path

import h5py
import pytest

import ahnet.data.cache as cache_mod
from ahnet.commands import cache as cache_cmd
from ahnet.commands import phantoms
from ahnet.commands.presets import PRESETS
from ahnet.train.config import TrainConfig
from ahnet.train import make_datasets

from .data._pipeline_synth import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _via_train(js):
    make_datasets(TrainConfig(data=str(js), patch_size=[4, 32, 32], model_kwargs={}).resolved())


def _via_experiment(js):
    demo = PRESETS["demo"]
    phantoms.prepare_training(js.parent, demo.cases, demo.size, demo.phantom, 0)


def _via_run_sh(js):
    assert cache_cmd.main(["--data", str(js)]) == 0


CALLERS = {"train": _via_train, "experiment": _via_experiment, "run.sh data": _via_run_sh}


def test_run_sh_data_builds_through_the_cache_entry_with_nothing_but_the_dataset():
    text = (ROOT / "run.sh").read_text()
    line = next(ln for ln in text.splitlines() if "ahnet.commands.cache" in ln and "exec" in ln)
    assert line.split("ahnet.commands.cache", 1)[1].split(";")[0].split() == ["--data", '"$out/dataset.json"']


@pytest.mark.parametrize("order", list(itertools.permutations(CALLERS)), ids=lambda o: " > ".join(o))
def test_any_order_builds_once_and_keeps_type_and_location(tmp_path, monkeypatch, order):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    js, _ = make_dataset(tmp_path / "phantom", n_cases=3, shape=(12, 48, 48))
    built = []
    real = cache_mod.prepare_case

    def counting(case, *a, **kw):
        built.append(case["case_id"])
        return real(case, *a, **kw)

    monkeypatch.setattr(cache_mod, "prepare_case", counting)
    for i, name in enumerate(order):
        CALLERS[name](js)
        assert len(built) == 3, name                              # the first builds 3, the others none
    files = sorted((tmp_path / "data" / "cache" / "phantom").glob("*.h5"))
    assert [f.stem for f in files] == ["case_000", "case_001", "case_002"]
    nodules = []
    for f in files:
        with h5py.File(f, "r") as h:
            nodules += json.loads(h.attrs["nodules"])
    assert len(nodules) == 3
    assert all(n["type"] == "T02" and n["location"] == "isolated" and n["diameter_mm"] == 8.0 for n in nodules)
