"""Scan sizes from headers before any voxel is read (ahnet.data.header) and the memory limit built on them
(ahnet.data.budget): what each format's header says, a header that promises more than its file holds, a gzip
bomb, the limit's arithmetic and sentence, and the request check a server calls before decoding."""
from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ahnet.data import budget
from ahnet.data.budget import ScanTooLarge, scan_limit
from ahnet.data.checks import DataError
from ahnet.data.header import read_header
from ahnet.data.io import read_image, write_image

from ._pipeline_synth import make_evaluation_world
from .test_io import write_dicom_series

ROOT = Path(__file__).resolve().parents[2]
ARR = np.random.default_rng(0).integers(-1000, 400, size=(6, 20, 24)).astype(np.int16)


def nifti_header_only(path: Path, shape_xyz, dtype=np.int16, gz: bool = False) -> Path:
    """A NIfTI file whose header says ``shape_xyz`` voxels of ``dtype`` and which holds 2 kB of voxels at most."""
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape_xyz)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((0.7, 0.7, 2.5))
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 2048
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def gzip_bomb(path: Path, shape_xyz=(2048, 2048, 900)) -> Path:
    """A .nii.gz whose voxels really are there: a header member, then gzip members of 64 MiB of zeros each up to
    the header's int16 size (a 7.5 GB scan in about 7 MB, as a scanner's empty air compresses)."""
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape_xyz)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((0.7, 0.7, 0.5))
    need = int(np.prod(shape_xyz)) * 2
    block = 64 << 20
    zeros = gzip.compress(b"\0" * block, compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(hdr.binaryblock + b"\0" * 4))
        for _ in range(need // block):
            f.write(zeros)
        f.write(gzip.compress(b"\0" * (need % block)))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_each_format_gives_shape_dtype_and_spacing_from_its_header(suffix, tmp_path):
    p = write_image(tmp_path / f"s{suffix}", ARR, spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    h = read_header(p)
    assert h.shape == (6, 20, 24) and h.dtype == np.int16 and h.voxels == ARR.size
    np.testing.assert_allclose(h.spacing, (2.5, 0.7, 0.8), rtol=1e-6)
    assert h.describe() == "6 x 20 x 24 int16"


def test_a_dicom_series_header_is_rows_x_columns_x_slices(tmp_path):
    write_dicom_series(tmp_path / "dcm", ARR, (2.5, 0.75, 0.75), (-100.0, -50.0, 20.0), np.eye(3))
    h = read_header(tmp_path / "dcm")
    assert h.shape == (6, 20, 24) and h.dtype == np.int16 and len(h.files) == 6


@pytest.mark.parametrize("gz", [False, True])
def test_a_header_that_promises_more_than_its_file_is_refused_before_reading(gz, tmp_path):
    p = nifti_header_only(tmp_path / ("big.nii.gz" if gz else "big.nii"), (4000, 4000, 4000), gz=gz)
    says = "inflates to at most 1032 x that" if gz else "but the file has"
    with pytest.raises(DataError, match=f"big.nii.*cannot read: the header promises 4000 x 4000 x 4000 int16.*{says}"):
        read_header(p)


def test_the_limit_is_the_memory_available_over_the_commands_bytes_per_voxel(tmp_path):
    p = write_image(tmp_path / "s.nii.gz", ARR, spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    bpv = budget.BYTES_PER_VOXEL["predict"]
    lim = scan_limit("predict", available=(bpv * 1000, "MemAvailable"))
    assert lim.max_voxels == 1000 and lim.flag_voxels is None
    with pytest.raises(ScanTooLarge) as e:
        lim.check(read_header(p))
    msg = str(e.value)
    assert "\n" not in msg and "s.nii.gz: the header says 6 x 20 x 24 int16 (2.88e+03 voxels)" in msg
    assert f"predict holds about {bpv} B per voxel (0.0 GB), more than the 0.0 GB of memory available (MemAvailable)" \
        in msg and "so it is refused before its voxels are read" in msg
    assert "--max-scan-voxels 2880 to try anyway" in msg
    scan_limit("predict", available=(bpv * ARR.size, "MemAvailable")).check(read_header(p))   # exactly enough
    scan_limit("predict", available=(None, "unknown")).check(read_header(p))                # nothing known: no limit
    flag = scan_limit("predict", override=100)
    assert flag.max_voxels == 100
    with pytest.raises(ScanTooLarge, match=r"\(2.88e\+03 voxels\); more than --max-scan-voxels 100\.$"):
        flag.check(read_header(p))
    with pytest.raises(ScanTooLarge, match="more than --max-scan-voxels 100"):
        read_image(p, limit=flag)                      # the reader checks before reading


def test_memory_available_takes_the_smallest_room(monkeypatch):
    real = budget._meminfo_available()
    assert real is None or real > 0
    assert budget._meminfo_available("/nonexistent") is None
    monkeypatch.setattr(budget, "_meminfo_available", lambda: 8 << 30)
    monkeypatch.setattr(budget, "_cgroup_room", lambda: 2 << 30)
    monkeypatch.setattr(budget, "_address_room", lambda: None)
    assert budget.memory_available() == (2 << 30, "cgroup memory.max")
    monkeypatch.setattr(budget, "_address_room", lambda: 1 << 30)
    assert budget.memory_available() == (1 << 30, "address-space limit")


def test_a_request_is_checked_from_its_declared_shape_before_decoding():
    lim = scan_limit("serve", 1000, bytes_per_voxel=8, flag="--max-request-voxels")
    lim.check_request((1, 1, 8, 10, 10), np.float32, nbytes=3200)
    mem = scan_limit("serve", bytes_per_voxel=8, available=(8000, "MemAvailable"), flag="--max-request-voxels")
    with pytest.raises(ScanTooLarge, match=r"serve holds about 8 B per voxel .* pass --max-request-voxels 1600"):
        mem.check_request((1, 1, 16, 10, 10), np.float32)
    with pytest.raises(ScanTooLarge, match=r"request: shape \(1, 1, 16, 10, 10\) \(1.6e\+03 voxels\); more than "
                                           r"--max-request-voxels 1000\."):
        lim.check_request((1, 1, 16, 10, 10), "float32")
    with pytest.raises(DataError, match="100 bytes of data for shape .* which needs 3200"):
        lim.check_request((1, 1, 8, 10, 10), np.float32, nbytes=100)
    with pytest.raises(DataError, match="negative size"):
        lim.check_request((1, -1, 8), np.float32)


def test_a_gzip_bomb_is_refused_from_its_header_in_seconds(tmp_path):
    """A 7 MB .nii.gz that inflates to 900 x 2048 x 2048 int16 (7.5 GB): predict refuses it from its header, one
    line, exit 2, nothing written. An address-space limit of 6 GB guards this machine should the check ever go
    (the reader would then die of a MemoryError, not the kernel)."""
    bomb = gzip_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 10 << 20
    _, _, run = make_evaluation_world(tmp_path / "w", n_cases=1, test_case=0)
    cap = 6 << 30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="true", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "ahnet.predict", "--input", str(bomb), "--runs", str(run), "--out",
                        str(tmp_path / "out"), "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, preexec_fn=limit)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-800:]
    assert lines[0].startswith("ahnet.predict: error: case bomb: ") and "Traceback" not in r.stderr
    assert "bomb.nii.gz: the header says 900 x 2048 x 2048 int16 (3.77e+09 voxels); predict holds about" in lines[0]
    assert "of memory available (address-space limit)" in lines[0] and "--max-scan-voxels 3774873600" in lines[0]
    assert time.time() - t0 < 120 and not (tmp_path / "out").exists()


def test_an_evaluation_counts_every_scan_of_the_split_and_the_one_it_predicts(tmp_path):
    from ahnet.data.budget import ScanLimit
    from ahnet.evaluate import check_split_size, evaluation_limit
    small = write_image(tmp_path / "a.nii.gz", ARR[:3], spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    big = write_image(tmp_path / "b.nii.gz", ARR, spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    entries = [{"image": str(small)}, {"image": str(big)}]
    assert evaluation_limit(3).bytes_per_voxel == 16 + 3 * 4
    need = (ARR.size // 2 + ARR.size) * 20 + ARR.size * 36              # two scans held, the larger in hand
    check_split_size(entries, ScanLimit("evaluate", 20, need, "MemAvailable"), "split 'test'")
    with pytest.raises(ScanTooLarge, match=r"split 'test': its 2 scan\(s\) hold 4.32e\+03 voxels together \(the "
                                           r"largest b.nii.gz, 6 x 20 x 24 int16\) .*holds about 20 B per voxel of "
                                           r"them all and 36 more of the one it predicts"):
        check_split_size(entries, ScanLimit("evaluate", 20, need - 1, "MemAvailable"), "split 'test'")


def test_an_evaluation_counts_the_scan_in_hand_at_its_finest_prediction_grid(tmp_path):
    """A model trained at finer pixels than the scans predicts each scan on a larger grid (ahnet.infer.spacing):
    the evaluation's budget holds that grid for the scan in hand, not the scan's own voxels."""
    from ahnet.data.budget import ScanLimit
    from ahnet.evaluate import check_split_size
    small = write_image(tmp_path / "a.nii.gz", ARR[:3], spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    big = write_image(tmp_path / "b.nii.gz", ARR, spacing=(2.5, 0.7, 0.8), dtype=np.int16)
    entries = [{"image": str(small)}, {"image": str(big)}]
    held = (ARR.size // 2 + ARR.size) * 20
    fine = 6 * 40 * 48                                                   # 20 x 24 pixels at half their size
    need = held + fine * 36
    inplanes = [None, (1.4, 1.6), (0.35, 0.4)]                          # native, coarser, finer: the finest counts
    check_split_size(entries, ScanLimit("evaluate", 20, need, "MemAvailable"), "split 'test'", inplanes)
    with pytest.raises(ScanTooLarge, match=r"\(the largest b.nii.gz, 6 x 20 x 24 int16, predicted on 1.15e\+04 "
                                           r"voxels\) and the evaluation keeps them all"):
        check_split_size(entries, ScanLimit("evaluate", 20, need - 1, "MemAvailable"), "split 'test'", inplanes)
    coarser = [None, (1.4, 1.6)]                                         # a coarser grid holds less than the scan
    check_split_size(entries, ScanLimit("evaluate", 20, held + ARR.size * 36, "MemAvailable"), "split 'test'",
                     coarser)
