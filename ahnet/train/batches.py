"""The data of a run: the case split (dataset.json split column or K folds), the patch datasets read from the
dataset's HDF5 cache (ahnet.data.cache.cache_dataset), and a loader batch turned into the network's input and
target (the one place that does it, for training steps and validation alike)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ahnet import paths
from ahnet.failures import quiet
from ahnet.train.config import TrainConfig
from ahnet.data.augment import Augment
from ahnet.data.cache import cache_dataset, read_cache_attrs
from ahnet.data.io import load_dataset_json
from ahnet.data.sampling import PatchDataset
from ahnet.data.folds import groups_from_annotations, make_folds
from ahnet.nets import MODELS
from ahnet.precision import to_channels_last

from ahnet.train.errors import TrainError
from ahnet.train.order import mix_seed


def split_cases(cfg: TrainConfig, cases: list[dict]) -> tuple[list[str], list[str]]:
    """(train case ids, validation case ids): the dataset.json split, or fold cfg.fold of cfg.folds (cases
    sharing an LIDC scan, by the annotations beside dataset.json, stay on one side)."""
    if cfg.folds >= 2:
        pool = [c["case_id"] for c in cases if c.get("split", "train") != "test"]
        shared = groups_from_annotations(paths.annotations_csv(cfg.data))
        folds = make_folds(pool, cfg.folds, seed=cfg.seed, shared=shared)
        return folds[cfg.fold or 0]
    train = [c["case_id"] for c in cases if c.get("split", "train") == "train"]
    val = [c["case_id"] for c in cases if c.get("split") == "validation"]
    return train, val


BLUR_P, BLUR_MAX_VOXELS = 0.3, 1.0    # --augment standard-blur: how often, and the largest in-plane sigma
COARSEN_P, COARSEN_MAX = 0.3, 1.4     # --augment standard-coarsen: how often, and the coarsest pixels (x this grid's)
ZOOM_P, ZOOM_MIN, ZOOM_MAX = 0.5, 0.7, 1.3   # --augment standard-zoom: how often, and the zoom range (< 1: the
                                             # nodules smaller in voxels, as in 0.9 mm pixels against 0.7 mm: 0.78)
#: --augment standard-<lever>: the Augment settings each lever changes from the standard policy's
STANDARD_LEVERS = {"standard-blur": dict(p_blur=BLUR_P, blur_max=BLUR_MAX_VOXELS),
                   "standard-coarsen": dict(p_coarsen=COARSEN_P, coarsen_max=COARSEN_MAX),
                   "standard-zoom": dict(p_affine=ZOOM_P, scale_min=ZOOM_MIN, scale_max=ZOOM_MAX)}


def make_augment(cfg: TrainConfig):
    """The training augmentation callable (image, label, rng) -> (image, label), or None."""
    if cfg.augment == "none":
        return None
    if cfg.augment == "randaugment":
        n, m = cfg.randaugment
        return Augment(randaugment=(int(n), float(m)))
    return Augment(**STANDARD_LEVERS.get(cfg.augment, {}))


def _cache_paths_by_case(cache_paths: Sequence[Path]) -> dict[str, Path]:
    """{case_id: cache file}: the case_id attribute of each file, else its name."""
    out = {}
    for p in cache_paths:
        cid = (read_cache_attrs(p) or {}).get("case_id")
        out[str(cid) if cid else Path(p).stem] = Path(p)
    return out


def make_datasets(cfg: TrainConfig):
    """(train PatchDataset, validation PatchDataset or None) from dataset.json via the HDF5 cache."""
    if not Path(cfg.data).is_file():
        raise TrainError(f"--data {cfg.data} does not exist (expected a dataset.json; make one with "
                         f"python -m ahnet.data.phantom --out {paths.DATA_ROOT / 'phantom'}).")
    train_ids, val_ids = split_cases(cfg, load_dataset_json(cfg.data))
    if not train_ids:                                  # before the cache is built: a refusal writes nothing
        raise TrainError(f"{cfg.data} has no training cases (split 'train').")
    by_case = _cache_paths_by_case(cache_dataset(cfg.data, cfg.cache_dir, progress=not quiet()))
    missing = [c for c in train_ids + val_ids if c not in by_case]
    if missing:
        raise TrainError(f"the cache {cfg.cache_dir} lacks cases {missing[:5]} listed in {cfg.data}.")
    train_ds = PatchDataset([by_case[c] for c in train_ids], patch_size=tuple(cfg.patch_size),
                            samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
                            pos_fraction=cfg.pos_fraction, augment=make_augment(cfg), seed=cfg.seed,
                            hard_fraction=cfg.hard_fraction, pos_weighting=cfg.pos_weighting)
    val_ds = None
    if val_ids and cfg.val_patches > 0:
        val_ds = PatchDataset([by_case[c] for c in val_ids], patch_size=tuple(cfg.patch_size),
                              samples_per_epoch=cfg.val_patches, pos_fraction=0.5, augment=None,
                              seed=mix_seed(cfg.seed, 99) % (2 ** 31))
    return train_ds, val_ds


def median_spacing(ds) -> tuple | None:
    """(sz, sy, sx) mm: the median spacing over a PatchDataset's cases, which a checkpoint records and inference
    resamples scans to (ahnet.infer.spacing); None for a dataset that keeps no spacings."""
    spacings = getattr(ds, "spacings", None)
    if not spacings:
        return None
    return tuple(float(v) for v in np.median(np.asarray(spacings, float), axis=0))


def split_batch_2d(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D stage: image (N, 1, S, H, W) -> (N, S, H, W) slices as channels; label -> middle slice (N, 1, H, W)."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"2D stage expects patches (N, 1, S, H, W), got image {tuple(image.shape)}.")
    mid = image.shape[2] // 2
    return image[:, 0], label[:, :, mid]


def prepare_batch(batch: dict, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch {"image", "label"} of (N, 1, D, H, W) patches -> (network input, target) on ``device``:
    slice stacks as channels and the middle slice's label for a 2D model (registry dims 2), the volumes
    themselves for a 3D model (channels-last 3D with --channels-last)."""
    x = batch["image"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    if MODELS[cfg.model].dims == 2:
        return split_batch_2d(x, y)
    return (to_channels_last(x) if cfg.channels_last else x), y
