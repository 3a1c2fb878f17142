"""What a training run checks so that it never records what did not happen.

- ``preflight``: before any work, the output places (``--out``, ``--cache-dir``) and the network of the settings
  (built once, so that a wrong ``--model-kwargs``, ``--pfn-depth`` or ``--encoder`` is one line before the data
  are read; the pipeline calls it for the 3D stage before the 2D stage starts).
- ``run_lock``: one writer per run folder (ahnet.atomic.folder_lock); the holder removes the temporary files
  of killed writes (checkpoints, log, figure) first.
- ``check_resume``: a resumed run trains what it trained before. Settings that change what is trained (the
  learning rates, the network, the loss, the data, ...) must stay as the checkpoint says (one line otherwise);
  ``RESUME_MAY_CHANGE`` are applied and recorded (more epochs, another device, ...).
- ``check_finite``: weights that are no longer finite are never saved (TrainingDiverged, exit code 3).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from ahnet import failures, paths
from ahnet.atomic import folder_lock, remove_temps
from ahnet.train.config import TrainConfig, saved_settings
from ahnet.nets import build_model, model_spec

from ahnet.train.errors import TrainError, TrainingDiverged

#: settings a resumed run may change: applied from the resume on and recorded in config.json and the
#: checkpoints (the others must equal the checkpoint's: they decide what is trained)
RESUME_MAY_CHANGE = ("epochs", "max_steps", "resume", "device", "num_workers", "ckpt_every", "cache_dir", "out",
                     "all_folds", "max_bad_steps")


def check_model_kwargs(name: str, kw: dict, builder=None) -> None:
    """TrainError naming the keys model ``name`` does not take (registry models; a stand-in builder: none)."""
    if builder is not None:
        return
    params = inspect.signature(model_spec(name).cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise TrainError(f"--model-kwargs: {name} takes no {', '.join(unknown)}; it takes "
                         f"{', '.join(k for k in params if k not in ('self',))}.")


def build_checked(name: str, kw: dict, builder=None) -> torch.nn.Module:
    """build_model (or ``builder``) with kwargs checked: unknown keys and wrong types as TrainError."""
    check_model_kwargs(name, kw, builder)
    try:
        return (builder or build_model)(name, **kw)
    except TypeError as e:
        raise TrainError(f"--model-kwargs {json.dumps(kw, default=str)[:120]} do not build {name}: "
                         f"{failures.one_line(e)}.") from None


def check_output_places(cfg: TrainConfig) -> None:
    """--out and --cache-dir: folders this user can write (or create), before any work."""
    failures.check_output_dir(cfg.out, "--out")
    if cfg.cache_dir:
        failures.check_output_dir(cfg.cache_dir, "--cache-dir")


def check_network(cfg: TrainConfig, builder=None) -> None:
    """Build the network of ``cfg`` once (global RNG untouched) and fit the patch size to it: TrainError or
    ValueError in one sentence."""
    from ahnet.train.model import check_patch_size, model_kwargs_for
    with torch.random.fork_rng(devices=[]):
        check_patch_size(build_checked(cfg.model, model_kwargs_for(cfg), builder), cfg)


def check_sources(cfg: TrainConfig) -> None:
    """The files a new run starts from exist: --init-from (a run or checkpoint) and --imagenet-weights."""
    if cfg.init == "transfer":
        try:
            paths.resolve_checkpoint(cfg.init_from)
        except paths.LayoutError as e:
            raise TrainError(f"--init-from: {e}") from None
    if cfg.imagenet_weights and not Path(cfg.imagenet_weights).is_file():
        raise TrainError(f"--imagenet-weights {cfg.imagenet_weights} not found (a torchvision ResNet state-dict "
                         f"file; nothing is downloaded).")


def preflight(cfg: TrainConfig, builder=None, sources: bool = True) -> None:
    """Everything about a resolved ``cfg`` that can be checked before the run reads data (module docstring);
    ``sources``: also the files it starts from (the pipeline's 3D stage starts from a 2D run not made yet)."""
    check_output_places(cfg)
    check_network(cfg, builder)
    if sources:
        check_sources(cfg)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def run_lock(out) -> Iterator[None]:
    """Hold the run folder's lock (rank 0 of a torchrun job holds it for all ranks) and remove the temporary
    files killed writes left in it."""
    if _rank() != 0:
        yield
        return
    with folder_lock(out, "run folder"):
        run = paths.run_paths(out)                 # not run/report: an evaluation may be writing there
        for folder in (run.root, run.checkpoints):
            remove_temps(folder, only_dead=False)
        yield


def check_resume(saved: dict, cfg: TrainConfig, where) -> None:
    """TrainError when a setting outside RESUME_MAY_CHANGE differs from the checkpoint's ``saved`` config."""
    now = cfg.to_dict()
    for key, was in saved_settings(saved).items():
        if key in RESUME_MAY_CHANGE or key not in now or now[key] == was:
            continue
        if key == "validation" and now[key] == "auto":    # saved resolved; auto resolves the same way again
            continue
        flag = "--" + key.replace("_", "-")
        raise TrainError(f"--resume: {key} was {was!r} in {where} but is now {now[key]!r}; a resumed run trains "
                         f"what it trained before, so drop {flag} (a resume may change --epochs, --max-steps, "
                         f"--device and where things are) or train a new run into another --out.")


def check_finite(model: torch.nn.Module, step: int, run: paths.RunPaths) -> None:
    """TrainingDiverged when a weight or buffer is NaN or infinite (nothing is saved then)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(
            f"after step {step} {len(bad)} weight tensors (e.g. {bad[0]}) are no longer finite; they were not "
            f"saved ({run.last} holds the last finite state, if any). Try a lower --lr, --warmup-steps or "
            f"--grad-clip 1.0.")
