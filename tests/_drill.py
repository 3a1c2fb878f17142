"""The bad-input drill's shared world and row helpers (tests/test_bad_inputs.py): a module-scoped world of
read-only inputs, each row's folder (Ctx) with the bad inputs it can make, and the argument builders of every
command line."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ahnet.atomic import folder_lock
from ahnet.data.io import write_image
from ahnet.nets import build_model

from .data._pipeline_synth import TINY_UNET as UNET
from .data._pipeline_synth import make_evaluation_world


@dataclass
class World:
    """Shared inputs (read-only for every row): a 3-case dataset, its annotations, a tiny trained-run folder."""
    root: Path
    ds: Path
    ann_rows: list
    run: Path

    def image(self, k: int) -> Path:
        return self.root / "ds" / "imagesTr" / f"case_{k:03d}.nii.gz"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("drill")
    js, ann, run = make_evaluation_world(root, n_cases=3, test_case=1)     # case 1: evaluate's default split
    with open(ann, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return World(root, js, rows, run)


# ------------------------------------------------------------------------------------------ row helpers
@dataclass
class Ctx:
    """One row's folder ``t``: inputs it makes, and ``out`` (t/out_parent/x) where outputs would go."""
    t: Path
    w: World
    stack: contextlib.ExitStack
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.t / "out_parent" / "x"

    def file(self, name="afile", text: str | bytes = "x") -> Path:
        p = self.t / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return p

    def run_with_rescorer(self, content: bytes) -> Path:
        """A copy of the world's run holding ``content`` as its rescorer.pt."""
        run = self.t / "run2"
        shutil.copytree(self.w.run, run)
        (run / "rescorer.pt").write_bytes(content)
        return run

    def truncated(self) -> Path:
        """The first 400 bytes of a real scan (a copy cut short)."""
        return self.file("cut.nii.gz", self.w.image(0).read_bytes()[:400])

    def read_only(self) -> Path:
        """A folder that os.access reports as not writable (what a non-root user sees for a 0o555 folder)."""
        ro = self.t / "ro"
        ro.mkdir()
        real = os.access
        self.monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p).startswith(str(ro))
                                 and mode & os.W_OK else real(p, mode, *a, **k))
        return ro / "x"

    def dataset(self, meta=None, raw: bytes | None = None, ann: str | bytes | None = None, name="bad") -> Path:
        """A dataset.json in t/<name>: ``meta`` (default: the world's, images by absolute path) or raw bytes;
        ``ann`` the content of the annotations.csv beside it (default: the world's; "" for none)."""
        d = self.t / name
        d.mkdir()
        if meta is None and raw is None:
            meta = json.loads(self.w.ds.read_text(encoding="utf-8"))
            for e in meta["training"]:
                e["image"] = str(self.w.ds.parent / e["image"])
                e["label"] = str(self.w.ds.parent / e["label"])
        (d / "dataset.json").write_bytes(raw if raw is not None else json.dumps(meta).encode("utf-8"))
        if ann is None:
            shutil.copy(self.w.ds.parent / "annotations.csv", d / "annotations.csv")
        elif ann:
            (d / "annotations.csv").write_bytes(ann if isinstance(ann, bytes) else ann.encode("utf-8"))
        return d / "dataset.json"

    def ann(self, row=0, **change) -> Path:
        """A copy of the world's dataset whose annotations CSV has one row, row ``row`` with ``change``."""
        r = dict(self.w.ann_rows[row], **{k: str(v) for k, v in change.items()})
        cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
        return self.dataset(ann=",".join(cols) + "\n" + ",".join(r[c] for c in cols) + "\n")

    def scan(self, arr, spacing=(2.5, 0.8, 0.8), name="scan.nii.gz") -> Path:
        return write_image(self.t / name, np.asarray(arr), spacing=spacing)

    def scan_dataset(self, arr, spacing=(2.5, 0.8, 0.8)) -> Path:
        """A one-case dataset (no label, no annotations) whose scan is ``arr``."""
        img = self.scan(arr, spacing)
        return self.dataset({"training": [{"image": str(img), "case_id": "s", "split": "test"}]}, ann="")

    def dicom_missing_slice(self) -> Path:
        from .data.test_io import write_dicom_series
        arr = np.random.default_rng(2).integers(-1000, 400, size=(6, 16, 16)).astype(np.int16)
        write_dicom_series(self.t / "dcm", arr, (2.5, 0.75, 0.75), (-100.0, -50.0, 20.0), np.eye(3))
        (self.t / "dcm" / "slice003.dcm").unlink()
        return self.t / "dcm"

    def negative_label(self) -> Path:
        lab = self.t / "lab.nii.gz"
        write_image(lab, -np.ones((12, 48, 48), np.int16), spacing=(2.5, 0.8, 0.8))
        img = self.scan(HU)
        return self.dataset({"training": [{"image": str(img), "label": str(lab), "case_id": "s"}]}, ann="")

    def run_with(self, content: bytes) -> Path:
        """A run folder whose checkpoints/last.pt holds ``content``."""
        (self.t / "r" / "checkpoints").mkdir(parents=True)
        (self.t / "r" / "checkpoints" / "last.pt").write_bytes(content)
        return self.t / "r"

    def flipped_run(self) -> Path:
        """A copy of the world's run whose best.pt (saved with its digest) has one bit flipped in a weight."""
        from ahnet.checkpoint import load_checkpoint, save_checkpoint
        ck = load_checkpoint(self.w.run / "checkpoints" / "best.pt")
        path = save_checkpoint(ck, self.t / "flip" / "checkpoints" / "best.pt")
        return flip_in(path, max(ck["model"].values(), key=lambda t: t.numel())).parent.parent

    def flipped_rescorer(self) -> Path:
        """A copy of the world's run with a trained-looking rescorer.pt (digest) that has one bit flipped."""
        from ahnet.checkpoint import save_checkpoint
        from ahnet.nets.candidate_net import CandidateNet
        run = self.run_with_rescorer(b"")
        state = CandidateNet().state_dict()
        save_checkpoint({"format": 1, "state_dict": state, "settings": {}}, run / "rescorer.pt")
        flip_in(run / "rescorer.pt", max(state.values(), key=lambda t: t.numel()))
        return run

    def only_validation(self) -> Path:
        """The world's dataset with every case in split "validation" (no training case)."""
        meta = json.loads(self.w.ds.read_text(encoding="utf-8"))
        for e in meta["training"]:
            e.update(image=str(self.w.ds.parent / e["image"]), label=str(self.w.ds.parent / e["label"]),
                     split="validation")
        return self.dataset(meta)

    def last_case_nan(self) -> Path:
        """The world's three cases, then a fourth whose scan has a NaN voxel (the first three are good)."""
        meta = json.loads(self.w.ds.read_text(encoding="utf-8"))
        for e in meta["training"]:
            e.update(image=str(self.w.ds.parent / e["image"]), label=str(self.w.ds.parent / e["label"]))
        nan = self.scan(np.where(HU == HU.max(), np.nan, HU), name="nan.nii.gz")
        meta["training"].append({"image": str(nan), "case_id": "nan", "split": "train"})
        return self.dataset(meta)

    def folder_second_bad(self) -> Path:
        """A folder of two scans: a good one, then one whose header promises 4000^3 voxels in 2 kB."""
        from .data.test_header import nifti_header_only
        (self.t / "scans").mkdir()
        write_image(self.t / "scans" / "a.nii.gz", HU, spacing=(2.5, 0.8, 0.8))
        nifti_header_only(self.t / "scans" / "b.nii", (4000, 4000, 4000))
        return self.t / "scans"

    def header_4000(self, suffix: str = ".nii") -> Path:
        """A 2 kB NIfTI (or .nii.gz) whose header claims 4000 x 4000 x 4000 int16 voxels (128 GB)."""
        from .data.test_header import nifti_header_only
        return nifti_header_only(self.t / f"big{suffix}", (4000, 4000, 4000), gz=suffix == ".nii.gz")

    def diverged_run(self) -> Path:
        """A run folder whose best.pt holds a NaN weight (what a diverged run saved before training refused to)."""
        m = build_model("unet3d", **UNET)
        state = m.state_dict()
        next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
        (self.t / "nan" / "checkpoints").mkdir(parents=True)
        torch.save({"model": state, "model_name": "unet3d", "model_kwargs": m.config},
                   self.t / "nan" / "checkpoints" / "best.pt")
        return self.t / "nan"

    def checkpoint_3d(self) -> Path:
        torch.save({"model": {}, "model_name": "unet3d", "model_kwargs": {}}, self.t / "u.pt")
        return self.t / "u.pt"

    def four_d(self) -> Path:
        import nibabel as nib
        nib.save(nib.Nifti1Image(np.full((16, 16, 4, 3), -500, np.float32), np.eye(4)), str(self.t / "f.nii.gz"))
        return self.t / "f.nii.gz"

    def latin1(self) -> Path:
        text = json.dumps({"training": [{"image": str(self.w.image(0)), "case_id": "caf\u00e9"}]}, ensure_ascii=False)
        return self.dataset(raw=text.encode("latin-1"))


HU = np.random.default_rng(0).normal(-500, 300, (12, 48, 48)).astype(np.float32)


def flip_in(path: Path, tensor: torch.Tensor) -> Path:
    """Flip one bit in the middle of ``tensor``'s bytes inside the torch file at ``path`` (found by content)."""
    raw = bytearray(path.read_bytes())
    data = tensor.detach().contiguous().view(-1).numpy().tobytes()
    at = raw.find(data)
    assert at > 0, "tensor bytes not found in the file"
    raw[at + len(data) // 2] ^= 0x08
    path.write_bytes(bytes(raw))
    return path
TINY_3D = ["--model", "unet3d", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--patch-size", "4",
           "32", "32", "--device", "cpu", "--val-patches", "1", "--model-kwargs", json.dumps(UNET)]


def ph(c: Ctx, *extra):
    return ["--out", c.out, "--cases", "1", "--size", "48", "--shapes", "procedural", "--previews", "0", *extra]


def ca(c: Ctx, *extra, data=None):
    return ["--data", data or c.w.ds, "--out", c.out, *extra]


def tr(c: Ctx, *extra, data=None, tiny=TINY_3D):
    return ["--data", data or c.w.ds, "--out", c.out, "--cache-dir", c.t / "out_parent" / "cache", *tiny, *extra]


def tr_ahnet(c: Ctx, *extra):
    return tr(c, "--model", "ahnet", "--encoder", "resnet18", "--model-kwargs", '{"growth": 4, "z_pool": "none"}',
              *extra, tiny=TINY_3D[2:])


def pl(c: Ctx, *extra):
    return ["--runs-dir", c.t / "out_parent", "--name", "x", "--data", c.w.ds, "--cache-dir", c.t / "out_parent" / "c",
            "--encoder", "resnet18", "--epochs-2d", "1", "--epochs-3d", "1", "--steps-per-epoch", "1",
            "--batch-size", "2", "--patch-2d", "32", "32", "--patch-3d", "4", "32", "32", "--device", "cpu", *extra]


def pr(c: Ctx, *extra, inp=None, runs=None):
    return ["--input", inp or c.w.ds, "--runs", runs or c.w.run, "--out", c.out, "--device", "cpu", *extra]


def ev(c: Ctx, *extra, data=None):
    return ["--runs", c.w.run, "--data", data or c.w.ds, "--out", c.out, "--device", "cpu", "--bootstrap", "10",
            *extra]


def wt(c: Ctx, *extra, out=None):
    return ["--runs-dir", c.t / "none", "--out", out or c.t / "out_parent" / "x.pt", "--fresh-encoder", "resnet18",
            "--check-size", "3", "32", "32", *extra]


def busy(c: Ctx) -> Path:
    """An --out folder whose lock another writer holds (an flock on its own open file: refused as a process's)."""
    c.out.mkdir(parents=True)
    c.stack.enter_context(folder_lock(c.out))
    return c.out
