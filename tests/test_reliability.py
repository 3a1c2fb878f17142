"""What survives a kill, what is refused, what a scan must be: the promises of paper_notes/reliability.md.

- kills: a training run killed at each write of an epoch's end, then --resume, has best.pt and log.csv equal to
  an uninterrupted run's; a write killed by SIGKILL leaves only a hidden temporary (never a half file under the
  final name, never a name that *.h5 / *.pt / *.nii.gz globs return), and the next writer removes it;
- refusals: --resume with a setting that changes what is trained (nothing recorded), a second writer into an
  output folder (a stale lock of a dead process is taken over), an output folder this user cannot write (as an
  unprivileged user), weights that are no longer finite;
- batches: one bad scan among three, with and without --skip-bad; a Decathlon test-only dataset;
- sense: scans, DICOM series with a missing slice, annotations with a byte-order mark.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ahnet.train.loop as loop
from ahnet import failures
from ahnet.commands import predict as pr
from ahnet.atomic import LOCK_NAME, is_temp, remove_temps
from ahnet.checkpoint import load_checkpoint
from ahnet.train.config import TrainConfig
from ahnet.data import checks
from ahnet.data.cache import build_cache
from ahnet.data.io import DataError, Volume, read_annotations_csv, read_image, write_image
from ahnet.nets import build_model
from ahnet.train import TrainError, TrainingDiverged, train

from .data._pipeline_synth import make_dataset
from .test_train import Tiny3d, _cfg, _data, builder

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("samples_per_s", "seconds", "val_seconds")


class Killed(BaseException):
    """Stands for a kill -9 at one point of the epoch end (no handler of the package catches it)."""


def _log(run: Path) -> list:
    with open(run / "log.csv", newline="", encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["epoch"] == cb["epoch"] and ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in ca["metrics"]["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in cb["metrics"]["history"]]
    assert ca["metrics"]["best_epoch"] == cb["metrics"]["best_epoch"]


# ------------------------------------------------------------------------------------------------- kills
KILL_RUN = dict(epochs=2, steps_per_epoch=2, lr=0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 2 epochs x 2 steps (the stand-in model of test_train) whose validation Dice improves
    in epoch 2, so that epoch's end writes best.pt too."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp, "ref", **KILL_RUN)
    res = train(cfg, datasets=_data(cfg), builder=builder)
    assert res["best_epoch"] == 2
    return tmp / "ref"


@pytest.mark.parametrize("point", ["best.pt", "log.csv", "progress.png", "last.pt"])
def test_kill_at_an_epoch_end_then_resume_equals_the_uninterrupted_run(point, reference, tmp_path, monkeypatch):
    """best.pt, log.csv and progress.png are written before last.pt: a kill before last.pt leaves it at the
    previous epoch, and --resume redoes the epoch's end; a kill after it finds everything written."""
    cfg = _cfg(tmp_path, "cut", **KILL_RUN)
    save, write_log, plot = loop.Session.save, loop.write_log, loop.plot_progress

    def at_second_epoch_end(name, s_epoch):
        if name == point and s_epoch == 2:
            raise Killed(point)

    def killing_save(self, path):
        save(self, path)
        at_second_epoch_end(Path(path).name, self.epoch)

    monkeypatch.setattr(loop.Session, "save", killing_save)
    monkeypatch.setattr(loop, "write_log", lambda h, p: (write_log(h, p), at_second_epoch_end("log.csv", len(h))))
    monkeypatch.setattr(loop, "plot_progress", lambda h, p, **k: (plot(h, p, **k),
                                                                  at_second_epoch_end("progress.png", len(h))))
    with pytest.raises(Killed):
        train(cfg, datasets=_data(cfg), builder=builder)
    if point != "last.pt":
        assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 1   # older: redone
    monkeypatch.undo()
    train(TrainConfig(**{**cfg.to_dict(), "resume": True}), datasets=_data(cfg), builder=builder)
    run = tmp_path / "cut"
    assert _log(run) == _log(reference) and len(_log(run)) == 2
    for name in ("best.pt", "last.pt"):
        _same_checkpoint(run / "checkpoints" / name, reference / "checkpoints" / name)
    assert not [p for p in run.rglob("*") if is_temp(p) or p.name == LOCK_NAME]


KILL_WRITE = """
import os, signal, sys
from ahnet.atomic import atomic_path
with atomic_path(sys.argv[1], durable=True) as tmp:
    tmp.write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_write(target: Path) -> None:
    r = subprocess.run([sys.executable, "-c", KILL_WRITE, str(target)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL


@pytest.mark.parametrize("name, pattern", [("case_000.h5", "*.h5"), ("last.pt", "*.pt"),
                                           ("case_prob.nii.gz", "*_prob.nii.gz"), ("progress.png", "*.png"),
                                           ("report.json", "*.json"), ("annotations.csv", "*.csv")])
def test_a_killed_write_leaves_a_hidden_temporary_that_the_next_writer_removes(name, pattern, tmp_path):
    _killed_write(tmp_path / name)
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".{name}.tmp-") and is_temp(left[0])
    assert not (tmp_path / name).exists()
    assert [p for p in tmp_path.glob(pattern) if not p.name.startswith(".")] == []
    if pattern in ("*.h5", "*.pt", "*.json", "*.csv"):
        assert list(tmp_path.glob(pattern)) == []          # not even the hidden temporary matches
    assert remove_temps(tmp_path) == left and list(tmp_path.iterdir()) == []


def test_cache_and_resume_remove_the_temporaries_of_killed_writes(tmp_path):
    js, csv_path = make_dataset(tmp_path / "ds", n_cases=2, shape=(12, 48, 48))
    cache = tmp_path / "cache"
    cache.mkdir()
    _killed_write(cache / "case_000.h5")
    build_cache(js, cache, annotations_csv=csv_path, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["case_000.h5", "case_001.h5"]

    cfg = _cfg(tmp_path, "run", epochs=1)
    train(cfg, datasets=_data(cfg), builder=builder)
    _killed_write(tmp_path / "run" / "checkpoints" / "last.pt")
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 3
    train(TrainConfig(**{**cfg.to_dict(), "resume": True}), datasets=_data(cfg), builder=builder)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


# ------------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run; each test copies it."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = _cfg(tmp, "run", epochs=1)
    train(cfg, datasets=_data(cfg), builder=builder)
    return cfg, tmp / "run"


@pytest.mark.parametrize("change", [{"lr": 0.5}, {"pfn_depth": 2}, {"encoder": "resnet34"}, {"loss": "focal"},
                                    {"model_kwargs": {"dropout": 0.1}}, {"lr_encoder": 1e-4},
                                    {"val_patches": 2}])
def test_resume_refuses_a_setting_that_changes_what_is_trained_and_records_nothing(change, trained, tmp_path):
    cfg, run = trained
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    before = {p.name: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    key = next(iter(change))
    new = TrainConfig(**{**cfg.to_dict(), "out": str(mine), "resume": True, "epochs": 2, **change})
    with pytest.raises(TrainError, match=rf"--resume: {key} was .* but is now .*drop --{key.replace('_', '-')}"):
        train(new, datasets=_data(cfg), builder=builder)
    assert {p.name: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_resume_applies_and_records_more_epochs(trained, tmp_path):
    cfg, run = trained
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    res = train(TrainConfig(**{**cfg.to_dict(), "out": str(mine), "resume": True, "epochs": 2}),
                datasets=_data(cfg), builder=builder)
    assert res["epoch"] == 2 and len(_log(mine)) == 2
    assert json.loads((mine / "config.json").read_text(encoding="utf-8"))["config"]["epochs"] == 2
    assert load_checkpoint(mine / "checkpoints" / "last.pt")["config"]["epochs"] == 2


def test_weights_that_are_no_longer_finite_are_never_saved(tmp_path):
    cfg = _cfg(tmp_path, "run", epochs=2)
    made = {}

    def b(name, **kw):
        made["m"] = Tiny3d(**kw)
        return made["m"]

    def poison(step):
        if step == 1:
            with torch.no_grad():
                made["m"].head.weight.fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match=r"after step 2 .* no longer finite; they were not saved"):
        train(cfg, datasets=_data(cfg), builder=b, on_step=poison)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "log.csv").exists()


HOLD = """
import sys
from ahnet.atomic import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A tiny 3D run and a folder of three scans, the middle one with a NaN voxel (its header is fine: only reading
    it finds the problem); beside them in cut/, the same three with b cut to its first 300 bytes."""
    d = tmp_path_factory.mktemp("scans")
    run = d / "run" / "checkpoints"
    run.mkdir(parents=True)
    kw = {"base_channels": 4, "max_channels": 16, "z_pool": "none"}
    torch.save({"model": build_model("unet3d", **kw).state_dict(), "model_name": "unet3d", "model_kwargs": kw,
                "config": {"patch_size": [4, 32, 32]}}, run / "best.pt")
    rng = np.random.default_rng(0)
    for name in ("a", "c"):
        write_image(d / "in" / f"{name}.nii.gz", Volume(rng.normal(-600, 200, (6, 32, 32)).astype(np.float32),
                                                        (2.5, 0.8, 0.8)))
    nan = rng.normal(-600, 200, (6, 32, 32)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    write_image(d / "in" / "b.nii.gz", Volume(nan, (2.5, 0.8, 0.8)))
    shutil.copytree(d / "in", d / "cut")
    (d / "cut" / "b.nii.gz").write_bytes((d / "in" / "a.nii.gz").read_bytes()[:300])
    return d


def _predict(scans, out, *extra, inp=None):
    return pr.main(["--input", str(inp or scans / "in"), "--runs", str(scans / "run"), "--out", str(out),
                    "--threshold", "0", *extra])


def _seriesuids(out):
    with open(out / "candidates.csv", newline="", encoding="utf-8") as f:
        return sorted({r["seriesuid"] for r in csv.DictReader(f)})


def test_a_second_writer_into_an_output_folder_is_refused_and_a_dead_ones_lock_taken_over(scans, tmp_path,
                                                                                          capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _predict(scans, out, inp=scans / "in" / "a.nii.gz") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"ahnet.predict: error: --out {out} is in use by pid {holder.pid} (a second writer would mix "
                       f"their files); wait for it to finish or choose another folder"]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.communicate("", timeout=60)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(dead.stdout)                 # a lock file of a process that is gone
    assert _predict(scans, out, inp=scans / "in" / "a.nii.gz") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "a_overview.png", "a_prob.nii.gz",
                                                     "candidates.csv"]


def test_one_bad_scan_stops_the_batch_with_the_candidates_of_the_scans_before_it(scans, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("CI", "true")
    out = tmp_path / "out"
    assert _predict(scans, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.predict: error: case b: ") and "--skip-bad" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "a_overview.png", "a_prob.nii.gz",
                                                     "candidates.csv"]            # nothing of the bad scan
    assert _seriesuids(out) == ["a"]


def test_a_scan_whose_header_fails_stops_the_batch_before_anything_is_written(scans, tmp_path, capsys,
                                                                            monkeypatch):
    """Every header is read before the first scan: a cut file among three is one line naming it, and --out is not
    even created (with --skip-bad it is skipped in its turn)."""
    monkeypatch.setenv("CI", "true")
    out = tmp_path / "out"
    assert _predict(scans, out, inp=scans / "cut") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.predict: error: case b: ") and "cannot read as NIfTI" in err[0]
    assert err[0].endswith("(nothing was written)") and not out.exists()
    assert _predict(scans, out, "--skip-bad", inp=scans / "cut") == 1
    assert _seriesuids(out) == ["a", "c"]


def test_skip_bad_goes_on_lists_the_failure_and_exits_1(scans, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    out = tmp_path / "out"
    assert _predict(scans, out, "--skip-bad") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("ahnet.predict: warning: skipped case b: ")
    assert err[1] == f"ahnet.predict: error: 1 of 3 case(s) failed (b); the other 2 are in {out}"
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "a_overview.png", "a_prob.nii.gz",
                                                     "c_mask.nii.gz", "c_overview.png", "c_prob.nii.gz",
                                                     "candidates.csv"]
    assert _seriesuids(out) == ["a", "c"]


def test_a_decathlon_test_only_dataset_is_predicted(scans, tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"name": "x", "test": [str(scans / "in" / "a.nii.gz"),
                                                    {"image": str(scans / "in" / "c.nii.gz")}]}), encoding="utf-8")
    assert [c.case_id for c in pr.find_cases(ds, "test")] == ["a", "c"]
    assert _predict(scans, tmp_path / "out", "--split", "test", inp=ds) == 0
    assert _seriesuids(tmp_path / "out") == ["a", "c"]


def test_output_places_are_checked_with_the_access_the_user_has(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    deny = lambda p, mode: not str(p).startswith(str(ro))       # noqa: E731 - a user without write access to ro
    with pytest.raises(ValueError, match=r"--out .*ro/new: permission denied \(the folder cannot be created: "):
        failures.check_output_dir(ro / "new", access=deny)
    with pytest.raises(ValueError, match=r"permission denied \(the folder is not writable for this user\)"):
        failures.check_output_dir(ro, access=deny)
    with pytest.raises(ValueError, match=r"is a folder; expected a file name"):
        failures.check_output_file(ro, access=deny)
    assert failures.check_output_dir(tmp_path / "a" / "b", access=deny) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


def test_a_read_only_output_folder_as_an_unprivileged_user(tmp_path):
    """The real check: a user who may not write into a 0o555 folder (root may: run as nobody through setpriv)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: the injected check above stands in")
    base = Path(tempfile.mkdtemp(prefix="ahnet-ro-"))           # not under pytest's 0o700 folder: nobody enters it
    try:
        os.chmod(base, 0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        cmd = [sys.executable, "-m", "ahnet.data.phantom", "--out", str(ro / "x"), "--cases", "1", "--size", "48"]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", HOME=str(base), CI="true")
        if os.geteuid() == 0:                    # nobody must be able to read this checkout and its interpreter
            probe = subprocess.run([*cmd[:4], sys.executable, "-c", "import ahnet.data.phantom"], cwd=base, env=env,
                                   capture_output=True, text=True, timeout=300)
            if probe.returncode != 0:
                pytest.skip(f"user nobody cannot import this checkout (a folder above {ROOT} is closed to others, "
                            f"e.g. a `mktemp -d` clone): the injected check above stands in")
        r = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [f"ahnet.data.phantom: error: --out {ro / 'x'}: permission denied "
                                                 f"(the folder cannot be created: {ro} is not writable for this user)"]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- sense
HU = np.random.default_rng(1).normal(-600, 300, (6, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("arr, spacing, says", [
    (HU, (1e30, 0.7, 0.7), r"spacing \(sz, sy, sx\) = \(1e\+30, 0.7, 0.7\) mm is not a CT voxel size"),
    (HU, (2.5, 0.01, 0.01), "is not a CT voxel size"),
    (np.clip(HU / 2000 + 0.5, 0, 1), (2.5, 0.7, 0.7), r"intensities span \[0, 0\.\d+\], not Hounsfield units"),
    (np.full((6, 32, 32), -1000.0, np.float32), (2.5, 0.7, 0.7), "every voxel is -1000; a constant volume"),
    (np.full((1, 1, 1), -1000.0, np.float32), (2.5, 0.7, 0.7), r"shape \(z, y, x\) = \(1, 1, 1\) is too small"),
])
def test_scans_that_make_no_sense_are_refused(arr, spacing, says, tmp_path):
    p = write_image(tmp_path / "s.nii.gz", arr, spacing=spacing)
    with pytest.raises(DataError, match=says):
        checks.check_scan(read_image(p), p)


def test_complex_voxels_are_refused_and_a_scan_without_air_is_a_warning(tmp_path, caplog):
    p = write_image(tmp_path / "c.nii.gz", HU.astype(np.complex64), spacing=(2.5, 0.7, 0.7))
    with pytest.raises(DataError, match=r"complex voxels \(complex64\); expected real intensities"):
        read_image(p)
    q = write_image(tmp_path / "raw.nii.gz", np.clip(HU, -1024, None) + 1024, spacing=(2.5, 0.7, 0.7))  # no intercept
    with caplog.at_level("WARNING"):
        checks.check_scan(read_image(q), q)
    assert "no voxel below" in caplog.text and "assuming Hounsfield units anyway" in caplog.text


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    from .data.test_io import write_dicom_series
    arr = np.random.default_rng(2).integers(-1000, 400, size=(6, 8, 10)).astype(np.int16)
    write_dicom_series(tmp_path / "dcm", arr, (2.5, 0.75, 0.75), (-100.0, -50.0, 20.0), np.eye(3))
    assert read_image(tmp_path / "dcm").spacing[0] == pytest.approx(2.5)
    (tmp_path / "dcm" / "slice003.dcm").unlink()
    with pytest.raises(DataError, match=r"slices 2 and 3 are 5 mm apart where the others are 2.5 mm "
                                        r"\(a missing slice\?\)"):
        read_image(tmp_path / "dcm")


def test_annotations_with_a_byte_order_mark_are_read(tmp_path):
    text = "seriesuid,coordX,coordY,coordZ,diameter_mm\ncase_000,1.5,-2,30,6.5\n"
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    rows = read_annotations_csv(tmp_path / "a.csv", ["case_000"])
    assert rows == [{"seriesuid": "case_000", "coordX": 1.5, "coordY": -2.0, "coordZ": 30.0, "diameter_mm": 6.5}]
