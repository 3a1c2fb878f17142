"""Files on a disk that fills up and files damaged at rest (paper_notes/reliability.md):

- disk full: a training checkpoint, the cache, predict's outputs and evaluate's report written on a small tmpfs that
  fills mid-write leave the previous files byte for byte, no temporary, one line naming the place and exit 2
  (skipped, with the reason, where this user cannot mount a tmpfs);
- damaged at rest: any single flipped bit of a checkpoint is refused or changes nothing; a cache file with flipped
  or lost bytes is named and rebuilt from its source, so what the cache returns always equals a fresh build; a
  chunk damaged after the check is an error naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ahnet import failures
from ahnet.atomic import DiskFull, free_bytes, is_temp
from ahnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ahnet.commands import cache as cache_cmd
from ahnet.commands import evaluate as evaluate_cmd
from ahnet.commands import predict as predict_cmd
from ahnet.data.cache import build_cache
from ahnet.data.sampling import PatchDataset
from ahnet.train import train

from .data._pipeline_synth import make_dataset, make_evaluation_world
from .test_train import _cfg, _data, builder


# ---------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs mounted at tmp_path/fs for the test (unmounted after it)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); this user is not")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the filesystem at ``mnt`` with one filler file."""
    with open(mnt / "filler", "wb") as f:
        room = free_bytes(mnt) - leave
        while room > 0:
            f.write(b"\0" * min(room, 1 << 20))
            room -= 1 << 20
        f.flush()
        os.fsync(f.fileno())
    assert free_bytes(mnt) <= leave + 4096


def files(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` but the filler."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if is_temp(p)]


def one_line_error(capsys, prog: str, place: Path) -> str:
    """The one error line (after any progress lines): no space left, naming ``place``; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum(": error: " in ln for ln in lines) == 1, lines
    assert lines[-1].startswith(f"{prog}: error: no space left on the device of "), lines
    assert str(place) in lines[-1] and "the previous file(s) there are kept" in lines[-1], lines[-1]
    return lines[-1]


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one(small_fs, capsys):
    """A run trained for one epoch on the tmpfs, the disk filled to 8 kB, then resumed for a second: the epoch's
    end fails while writing, one line, exit 2; last.pt is the first epoch's, byte for byte, and loads (the small
    files written before the failure, config.json and log.csv, are whole; --resume rewrites them from last.pt)."""
    cfg = _cfg(small_fs, "run", epochs=1)
    train(cfg, datasets=_data(cfg), builder=builder)
    before = files(small_fs / "run")
    fill(small_fs, 8 << 10)
    cfg2 = _cfg(small_fs, "run", epochs=2, resume=True)
    rc = failures.run("ahnet.train", lambda: train(cfg2, datasets=_data(cfg2), builder=builder))
    assert rc == 2
    one_line_error(capsys, "ahnet.train", small_fs / "run")
    after = files(small_fs / "run")
    assert after.keys() == before.keys() and no_temporaries(small_fs)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "progress.png"):
        assert after[name] == before[name], name
    assert load_checkpoint(small_fs / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    json.loads(after["config.json"])
    assert after["log.csv"].decode().startswith(before["log.csv"].decode())


def test_save_checkpoint_on_a_full_disk_is_disk_full_naming_the_file(small_fs):
    save_checkpoint({"model": {"w": torch.zeros(10)}, "model_name": "x", "model_kwargs": {}}, small_fs / "a.pt")
    fill(small_fs, 16 << 10)
    with pytest.raises(DiskFull, match=r"of .*/fs \(writing a\.pt, \d+ KiB left\)"):
        save_checkpoint({"model": {"w": torch.randn(100_000)}, "model_name": "x", "model_kwargs": {}},
                        small_fs / "a.pt")
    assert torch.equal(load_checkpoint(small_fs / "a.pt")["model"]["w"], torch.zeros(10))
    assert sorted(os.listdir(small_fs)) == ["a.pt", "filler"]


def test_the_cache_on_a_full_disk_stays_as_it_was(small_fs, tmp_path, capsys):
    js, _ = make_dataset(tmp_path / "ds", n_cases=3)
    out = small_fs / "cache"
    assert cache_cmd.main(["--data", str(js), "--out", str(out)]) == 0
    before = files(out)
    fill(small_fs, 64 << 10)
    capsys.readouterr()
    assert cache_cmd.main(["--data", str(js), "--out", str(out), "--spacing", "0.4", "0.4"]) == 2
    one_line_error(capsys, "ahnet.commands.cache", out)
    assert files(out) == before and no_temporaries(small_fs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return make_evaluation_world(root, n_cases=3, test_case=1)


def test_predict_outputs_on_a_full_disk_stay_as_they_were(small_fs, world, capsys):
    js, _, run = world
    out = small_fs / "pred"
    argv = ["--input", str(js), "--runs", str(run), "--out", str(out), "--device", "cpu"]
    assert predict_cmd.main(argv) == 0
    before = files(out)
    fill(small_fs, 24 << 10)
    capsys.readouterr()
    assert predict_cmd.main(argv + ["--threshold", "0.3", "--skip-bad"]) == 2    # a full disk is no bad scan
    one_line_error(capsys, "ahnet.predict", out)
    assert files(out) == before and no_temporaries(small_fs)


def test_a_report_on_a_full_disk_stays_as_it_was(small_fs, world, capsys):
    js, _, run = world
    out = small_fs / "report"
    argv = ["--runs", str(run), "--data", str(js), "--out", str(out), "--device", "cpu", "--bootstrap", "5"]
    assert evaluate_cmd.main(argv) == 0
    before = files(out)
    fill(small_fs, 32 << 10)
    capsys.readouterr()
    assert evaluate_cmd.main(argv + ["--title", "second"]) == 2
    one_line_error(capsys, "ahnet.evaluate", out)
    assert files(out) == before and no_temporaries(small_fs)


# ------------------------------------------------------------------------------------------ damaged at rest
def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not (isinstance(y, dict) and _same(x, y)):
                return False
        elif repr(x) != repr(y):
            return False
    return True


def test_any_flipped_bit_of_a_checkpoint_is_refused_or_changes_nothing(tmp_path):
    """Every byte of a small checkpoint (weights, an optimiser state, plain values) with one bit flipped: the load
    raises CheckpointError naming the file, or gives exactly what was saved (a flip in zip padding); a weight is
    never read wrong. Truncations are refused too."""
    net = torch.nn.Conv3d(1, 4, 3)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(1, 1, 4, 4, 4)).sum().backward()
    opt.step()
    path = save_checkpoint({"model": net.state_dict(), "model_name": "x", "model_kwargs": {"k": 1},
                            "optimizer": opt.state_dict(), "epoch": 3, "metrics": {"best": 0.5}}, tmp_path / "c.pt")
    ref = load_checkpoint(path)
    raw = path.read_bytes()
    rng = random.Random(0)
    refused = 0
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        try:
            got = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            refused += 1
            continue
        strip = [{k: v for k, v in d.items() if k != "sha256"} for d in (got, ref)]
        assert _same(*strip), i
    assert refused > len(raw) // 3
    for n in (len(raw) - 1, len(raw) // 2, 100):
        path.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match="c.pt"):
            load_checkpoint(path)


def _content(path: Path) -> tuple:
    with h5py.File(path, "r") as f:
        return ({k: f[k][...].tobytes() for k in f}, {k: np.asarray(f.attrs[k]).tobytes() for k in f.attrs})


def test_a_damaged_cache_file_is_named_and_rebuilt_from_its_source(tmp_path, caplog):
    """Single flipped bits all over a cache file, then the whole file cut short: each time build_cache names the
    damaged file in a warning and rebuilds it, or finds the flip in bytes that hold nothing; what it returns always
    equals a fresh build, and the other cases' files are not touched."""
    js, csv = make_dataset(tmp_path / "ds", n_cases=2)
    build_cache(js, tmp_path / "fresh", annotations_csv=csv, progress=False)
    p0, p1 = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    ref, raw, untouched = _content(p1), p1.read_bytes(), p0.stat().st_mtime_ns
    rng = random.Random(1)
    rebuilt = 0
    for i in rng.sample(range(len(raw)), 60) + [None]:
        bad = bytearray(raw[: len(raw) // 2] if i is None else raw)
        if i is not None:
            bad[i] ^= 1 << rng.randrange(8)
        p1.write_bytes(bytes(bad))
        caplog.clear()
        build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
        assert _content(p1) == ref == _content(tmp_path / "fresh" / p1.name)
        warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        rebuilt += bool(warned)
        assert not warned or (str(p1) in warned[0] and "rebuilding it from" in warned[0]), warned
    assert rebuilt > 30 and p0.stat().st_mtime_ns == untouched


def test_a_chunk_damaged_after_the_check_is_an_error_naming_the_file(tmp_path):
    js, csv = make_dataset(tmp_path / "ds", n_cases=2, empty_cases=())
    paths = build_cache(js, tmp_path / "cache", annotations_csv=csv, progress=False)
    with h5py.File(paths[0], "r") as f:
        first = f["image"][0:4, 0:48, 0:48].tobytes()         # the first chunk as stored
    raw = bytearray(paths[0].read_bytes())
    at = raw.find(first)
    assert at > 0
    raw[at + 100] ^= 0x10
    paths[0].write_bytes(bytes(raw))
    ds = PatchDataset(paths, patch_size=(4, 16, 16), samples_per_epoch=1)
    with pytest.raises(ValueError, match=f"cache file {paths[0]} is damaged .*rebuilds it from its source"):
        ds.read_patch(0, (2, 8, 8))
    with contextlib.suppress(Exception):
        ds.close()
    shutil.rmtree(tmp_path / "cache")
