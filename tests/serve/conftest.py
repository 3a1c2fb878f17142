"""Fixtures of the serving tests: a 5-fold AH-Net ensemble, its export, scans, and real Triton servers.

Without the serve extra the TorchScript export and its tests run; what needs pytriton, tritonclient, onnx or
onnxruntime skips with the reason (``needs_serving``).

The ensemble: five fold run folders ``cv-fold0 .. cv-fold4`` laid out as ``ahnet.train --all-folds`` writes them,
each a tiny AH-Net (resnet18 encoder, growth 4, one layer per dense block, pyramid depth 2, z pooled by spacing)
built with its own seed and saved by ahnet.checkpoint.save_checkpoint with the trainer's keys and a real
TrainConfig. Not trained: two training steps per fold took 236 s on this shared 2-core CPU, while what serving
must reproduce (the same probabilities and candidates as ahnet.commands.predict for the same checkpoints) does not depend
on how the weights were reached. Servers run as ``python -m ahnet.serve`` through ahnet.serve.process (their own
session on free ports, a bounded wait for ready, always stopped: SIGTERM, then SIGKILL of the whole group).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ahnet.checkpoint import save_checkpoint
from ahnet.train.config import TrainConfig
from ahnet.data.io import Volume, write_image
from ahnet.nets import build_model
from ahnet.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
SPACING = (2.5, 0.8, 0.8)
KW = dict(encoder="resnet18", growth=4, layers_per_block=1, pfn_depth=2, z_pool="spacing", spacing=list(SPACING))
PATCH = [16, 64, 64]                                   # the training patch: the served default window
FOLDS = 5
START_TIMEOUT_S = 240


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside, as it was after: the in-process references (export verification, ahnet.commands.predict,
    fold runners) while a server works beside them. On this 2-core machine under other jobs' load, two OpenMP
    threads ran the same windows 10-20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    with one_thread():
        yield


def save_fold(run: Path, seed: int, fold: int) -> Path:
    """One fold's run folder with checkpoints/best.pt as ahnet.train writes it (weights from ``seed``)."""
    torch.manual_seed(seed)
    model = build_model("ahnet", **KW)
    cfg = TrainConfig(stage="3d", model="ahnet", encoder="resnet18", patch_size=PATCH, pfn_depth=2,
                      model_kwargs={k: v for k, v in KW.items() if k not in ("encoder", "pfn_depth")},
                      folds=FOLDS, fold=fold, out=str(run), device="cpu", seed=seed)
    save_checkpoint({"model": model.state_dict(), "model_name": "ahnet", "model_kwargs": dict(model.config),
                     "config": cfg.to_dict(), "epoch": 1, "step": 2, "metrics": {}, "stage": "3d", "format": 1},
                    run / "checkpoints" / "best.pt")
    return run


@pytest.fixture(scope="session")
def cv(tmp_path_factory) -> Path:
    """The name ``<tmp>/cv`` of fold folders cv-fold0 .. cv-fold4."""
    root = tmp_path_factory.mktemp("cv")
    for k in range(FOLDS):
        save_fold(root / f"cv-fold{k}", seed=100 + k, fold=k)
    return root / "cv"


@pytest.fixture(scope="session")
def exported(cv, tmp_path_factory) -> Path:
    """models/cv: the five folds exported as TorchScript (the ONNX path has its own test)."""
    from ahnet.serve.export import export_runs
    out = tmp_path_factory.mktemp("models") / "cv"
    with one_thread():                                 # a session fixture: set up before the package's one thread
        export_runs([str(cv)], out, formats=("torchscript",), log=lambda m: None)
    return out


def _rotation(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> Path:
    """A folder of two CT-like scans in HU (an oblique one larger than the window, one smaller)."""
    root = tmp_path_factory.mktemp("scans")
    for i, shape in enumerate([(20, 70, 90), (12, 40, 50)]):
        rng = np.random.default_rng(i)
        z, y, x = np.indices(shape)
        hu = np.full(shape, -850.0) + rng.normal(0, 60, shape)
        hu[:, shape[1] * 2 // 3:, :] = 30.0
        hu[((z - 6) * SPACING[0]) ** 2 + ((y - 20) * SPACING[1]) ** 2 + ((x - 25) * SPACING[2]) ** 2 <= 40] = 60.0
        direction = _rotation((1, 2, 3), 20.0) if i == 0 else np.eye(3)
        write_image(root / f"scan{i}.nii.gz", Volume(hu.astype(np.float32), SPACING, (-100.0, 20.0, 300.0),
                                                     direction))
    return root


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# One intra-op thread: on a 2-core machine that other jobs load, two OpenMP threads ran these windows 20x slower
# than one (4-5 s against 0.2 s per batch of 3), which is what made these tests slow, not the serving.
SERVER_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def needs_serving(*modules: str) -> None:
    """Skip the calling test or fixture, with the reason, unless the serve extra's ``modules`` import."""
    for m in modules or ("pytriton", "tritonclient.http", "tritonclient.grpc"):
        pytest.importorskip(m, reason=f"needs {m}, from the serve extra (bash run.sh test installs it)")


def start_server(models: Path, log: Path, *args: str) -> ServerProcess:
    """python -m ahnet.serve for ``models`` on free ports, one thread, 2 s for in-flight requests at shutdown,
    this checkout's code (skips without the serve extra)."""
    needs_serving()
    return ServerProcess(models, log, ["--threads", "1", "--exit-timeout", "2", *args], env=SERVER_ENV, cwd=ROOT,
                         start_timeout_s=START_TIMEOUT_S)


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    """The 5-fold ensemble served with the PyTorch (TorchScript) backend, max batch 8."""
    s = start_server(exported, tmp_path_factory.mktemp("serverlog") / "serve.log", "--max-batch", "8")
    yield s
    s.stop()
