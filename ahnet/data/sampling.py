"""Patch sampling from the HDF5 cache with a positive / negative balance.

``ds[i]`` is a pure function of (seed, epoch, i): the random generator is ``np.random.default_rng([seed, epoch,
i])`` and it decides, in order, positive or negative, the case, the centre, then the augmentation.

- positive (probability pos_fraction, when any case has nodule voxels): a nodule instance, one voxel of it
  (uniform), and the patch centre = that voxel + an integer jitter (below). The instance: with ``pos_weighting``
  "case", a case with nodules (uniform), then one of its instances (uniform, so small nodules count as much as
  large ones); with "inverse-diameter", any instance of any case with probability proportional to 1 / its
  equivalent-sphere diameter (from its voxel count and the case's spacing), so a 4 mm nodule is drawn 5 times as
  often as a 20 mm one; with "inverse-diameter-contrast", proportional to 1 / (diameter x sqrt(contrast)), the
  contrast being the nodule's mean HU minus the mean HU of a 2-voxel in-plane shell around it (other nodules left
  out), floored at 50 HU: a faint ground-glass nodule (~100 HU), or one against the pleura or a vessel, is drawn
  about twice as often as a solid one of its size in open lung (~500 HU). The jitter is at most
  ``jitter * ((size - 1) // 2)`` per axis: the nodule voxel is always inside the patch (for D = 3 the z jitter is
  0, so the middle slice holds it).
- negative: any case (uniform); with probability ``hard_fraction`` the centre is one of the case's hard
  voxels (``hard_negative_index``: vessels, airway walls, fissures, pleura), else uniform over the volume's
  voxels. It may touch a nodule by chance.
- the patch is read from the chunked ``image`` / ``label`` datasets and padded with 0 (air after scaling) where
  it passes a border.

HDF5 files are opened lazily, once per process (keyed by pid), so no h5py handle crosses a DataLoader fork.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ahnet.data.cache import foreground_index


#: how a positive patch picks its nodule (module docstring)
POS_WEIGHTINGS = ("case", "inverse-diameter", "inverse-diameter-contrast")
CONTRAST_FLOOR_HU = 50.0     # inverse-diameter-contrast: a lower (or negative) contrast counts as this
CONTRAST_SHELL = 2           # in-plane voxels of the shell a nodule's contrast is measured against


class PatchDataset(Dataset):
    """Patches (1, D, H, W) from cached cases.

    cache_paths: .h5 files from build_cache. patch_size: (D, H, W) voxels, D along the slice axis.
    samples_per_epoch: len(ds). pos_fraction: probability that a sample is centred near a nodule voxel.
    pos_weighting: how a positive sample picks its nodule (POS_WEIGHTINGS, module docstring).
    augment: None or callable(image (D,H,W) float32, label (D,H,W) int16, rng) -> (image, label).
    ``ds[i]`` -> {"image": float32 (1, D, H, W), "label": float32 (1, D, H, W) in {0, 1}}.
    For the 2D stage use patch_size (3, H, W): take image[0] as 3 channels and label[:, 1] as the target.
    """

    def __init__(self, cache_paths: Sequence, patch_size=(16, 96, 96), samples_per_epoch: int = 1000,
                 pos_fraction: float = 0.5, augment: Callable | None = None, seed: int = 0, jitter: float = 0.5,
                 hard_fraction: float = 0.0, pos_weighting: str = "case"):
        import h5py

        self.paths = [str(p) for p in cache_paths]
        if not self.paths:
            raise ValueError("PatchDataset: cache_paths is empty; expected at least one .h5 file from build_cache.")
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"PatchDataset: patch_size {patch_size}; expected (D, H, W) positive ints.")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"PatchDataset: pos_fraction {pos_fraction}; expected a value in [0, 1].")
        self.samples_per_epoch = int(samples_per_epoch)
        self.pos_fraction = float(pos_fraction)
        self.augment = augment
        self.seed = int(seed)
        # shared memory: set_epoch in the main process reaches persistent DataLoader workers too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.jitter_max = np.array([int(jitter * ((s - 1) // 2)) for s in self.patch_size])
        if pos_weighting not in POS_WEIGHTINGS:
            raise ValueError(f"PatchDataset: pos_weighting {pos_weighting!r}; expected one of "
                             f"{', '.join(POS_WEIGHTINGS)}.")
        self.pos_weighting = pos_weighting
        self.shapes, self.spacings, self.nodules = [], [], []
        self._fg, self._inst = [], []  # per case: fg rows (n,4) sorted by label; [(start, stop)] per instance
        self.contrast_hu = []          # inverse-diameter-contrast: per case, each instance's contrast (HU)
        for p in self.paths:
            try:
                with h5py.File(p, "r") as f:
                    self.shapes.append(tuple(f["image"].shape))
                    self.spacings.append(tuple(np.asarray(f.attrs.get("spacing", (1.0, 1.0, 1.0)), float)))
                    self.nodules.append(json.loads(f.attrs.get("nodules", "[]")))
                    fg = f["fg_voxels"][...] if "fg_voxels" in f else foreground_index(f["label"][...])
                    fg = fg[np.argsort(fg[:, 3], kind="stable")] if len(fg) else fg
                    starts = np.unique(fg[:, 3], return_index=True)[1] if len(fg) else []
                    bounds = list(zip(starts, list(starts[1:]) + [len(fg)])) if len(fg) else []
                    if pos_weighting == "inverse-diameter-contrast":
                        self.contrast_hu.append(instance_contrast(f["image"][...], f["label"][...], fg, bounds))
            except (OSError, KeyError) as e:
                raise ValueError(f"{p}: not a readable cache file ({e}); rebuild it with build_cache.") from e
            self._fg.append(fg[:, :3].astype(np.int64))
            self._inst.append(bounds)
        self.pos_cases = [k for k, b in enumerate(self._inst) if b]
        self._inst_flat, self._inst_p = self._instance_weights() if pos_weighting != "case" else ([], None)
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"PatchDataset: hard_fraction {hard_fraction}; expected a value in [0, 1].")
        self.hard_fraction = float(hard_fraction)
        self._hard = [hard_negative_index(p) for p in self.paths] if self.hard_fraction > 0 else []
        self._pid = None
        self._files: dict = {}

    def _instance_weights(self):
        """([(case k, instance j)], probabilities) over every nodule instance, each weighted by 1 / its
        equivalent-sphere diameter in mm (voxels x voxel volume = pi d^3 / 6), and with inverse-diameter-contrast
        by 1 / sqrt(max(its contrast, CONTRAST_FLOOR_HU)) too; None when there is none."""
        flat, weights = [], []
        for k, bounds in enumerate(self._inst):
            voxel_mm3 = float(np.prod(self.spacings[k]))
            for j, (a, b) in enumerate(bounds):
                flat.append((k, j))
                w = (6.0 * (b - a) * voxel_mm3 / np.pi) ** (-1.0 / 3.0)
                if self.contrast_hu:
                    w /= np.sqrt(max(self.contrast_hu[k][j], CONTRAST_FLOOR_HU))
                weights.append(w)
        if not flat:
            return [], None
        return flat, np.asarray(weights) / np.sum(weights)

    # ----------------------------------------------------------------------------------------- plumbing
    def __len__(self) -> int:
        return self.samples_per_epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; with a DataLoader, call before iterating it (works with persistent workers)."""
        self._epoch.fill_(int(epoch))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _file(self, k: int):
        import h5py

        pid = os.getpid()
        if self._pid != pid:  # a forked worker: never reuse the parent's handles
            self._files, self._pid = {}, pid
        f = self._files.get(k)
        if f is None:
            f = h5py.File(self.paths[k], "r", rdcc_nbytes=8 << 20)
            self._files[k] = f
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}

    # ----------------------------------------------------------------------------------------- sampling
    def plan(self, index: int):
        """(rng, case k, centre (z, y, x), positive) for sample ``index`` of the current epoch."""
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"PatchDataset index {index} out of range [0, {self.samples_per_epoch}).")
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        positive = bool(rng.random() < self.pos_fraction) and bool(self.pos_cases)
        if positive:
            if self._inst_p is not None:
                k, j = self._inst_flat[int(rng.choice(len(self._inst_flat), p=self._inst_p))]
            else:
                k = self.pos_cases[int(rng.integers(len(self.pos_cases)))]
                j = int(rng.integers(len(self._inst[k])))
            a, b = self._inst[k][j]
            voxel = self._fg[k][int(rng.integers(a, b))]
            centre = voxel + rng.integers(-self.jitter_max, self.jitter_max + 1)
        else:
            k = int(rng.integers(len(self.paths)))
            hard = self._hard[k] if self.hard_fraction > 0 else ()
            if len(hard) and rng.random() < self.hard_fraction:
                centre = hard[int(rng.integers(len(hard)))]
            else:
                centre = rng.integers(0, np.asarray(self.shapes[k]))
        return rng, k, tuple(int(c) for c in centre), positive

    def read_patch(self, k: int, centre) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 (D,H,W), label int16 (D,H,W)) of case k around centre, zero-padded at borders."""
        f = self._file(k)
        size = np.asarray(self.patch_size)
        start = np.asarray(centre) - size // 2
        shape = np.asarray(self.shapes[k])
        lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
        img = np.zeros(self.patch_size, np.float32)
        lab = np.zeros(self.patch_size, np.int16)
        if np.all(hi > lo):
            src = tuple(slice(a, b) for a, b in zip(lo, hi))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
            try:
                img[dst] = f["image"][src]
                lab[dst] = f["label"][src]
            except OSError as e:          # a chunk whose Fletcher-32 checksum fails: damaged since it was built
                raise ValueError(f"cache file {self.paths[k]} is damaged ({str(e).strip().splitlines()[0][:100]}); "
                                 f"run again: the cache check finds it and rebuilds it from its source") from None
        return img, lab

    def __getitem__(self, index: int) -> dict:
        rng, k, centre, _ = self.plan(index)
        img, lab = self.read_patch(k, centre)
        if self.augment is not None:
            img, lab = self.augment(img, lab, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None],
                "label": torch.from_numpy((np.asarray(lab) > 0).astype(np.float32))[None]}


def inplane_square(reach: int) -> np.ndarray:
    """Structuring element (1, 2 reach + 1, 2 reach + 1), all True: every voxel within ``reach`` in-plane voxels
    (Chebyshev distance) of a slice, none of another."""
    return np.ones((1, 2 * reach + 1, 2 * reach + 1), bool)


def instance_contrast(image: np.ndarray, label: np.ndarray, fg: np.ndarray, bounds: list) -> list:
    """Each instance's contrast in HU: its mean minus the mean of the voxels within CONTRAST_SHELL in-plane
    voxels of it that belong to no nodule (0 when there are none). ``image`` scaled (D, H, W) as cached,
    ``label`` (D, H, W) instances, ``fg`` (n, 4) rows (z, y, x, label) sorted by label, ``bounds`` each
    instance's [start, stop) rows."""
    from scipy import ndimage

    from ahnet.data.preprocess import HU_SPAN

    s, plane = CONTRAST_SHELL, inplane_square(CONTRAST_SHELL)
    out = []
    for a, b in bounds:
        zyx = fg[a:b, :3].astype(np.int64)
        lo = np.maximum(zyx.min(0) - [0, s, s], 0)
        hi = np.minimum(zyx.max(0) + [1, s + 1, s + 1], image.shape)
        box = tuple(slice(i, j) for i, j in zip(lo, hi))
        inside = np.zeros(hi - lo, bool)
        inside[tuple((zyx - lo).T)] = True
        shell = ndimage.binary_dilation(inside, structure=plane) & (label[box] == 0)
        img = image[box]
        out.append(float(img[inside].mean() - img[shell].mean()) * HU_SPAN if shell.any() else 0.0)
    return out


def hard_negative_index(path, dense_hu: float = -400.0, aerated_hu: float = -600.0, reach: int = 3,
                        margin: int = 4, max_voxels: int = 50_000) -> np.ndarray:
    """(n, 3) int64 voxels (z, y, x) of one cached case where a detector is most easily fooled: dense tissue
    (> ``dense_hu``) within ``reach`` in-plane voxels of aerated lung (< ``aerated_hu``), more than ``margin``
    voxels from any nodule voxel: vessels, airway walls, fissures and the pleura. The two thresholds are the
    textbook soft-tissue / aerated-lung boundary of any chest CT, not constants of a generator. At most
    ``max_voxels`` rows (a seeded subsample)."""
    import h5py
    from scipy import ndimage

    from ahnet.data.preprocess import scaled_from_hu as scaled

    with h5py.File(path, "r") as f:
        img = f["image"][...]
        nodule = f["label"][...] > 0
    near_air = ndimage.binary_dilation(img < scaled(aerated_hu), structure=inplane_square(reach))
    cand = (img > scaled(dense_hu)) & near_air
    if nodule.any():
        cand &= ~ndimage.binary_dilation(nodule, iterations=margin)
    zyx = np.argwhere(cand)
    if len(zyx) > max_voxels:
        zyx = zyx[np.sort(np.random.default_rng(0).choice(len(zyx), max_voxels, replace=False))]
    return zyx.astype(np.int64)
