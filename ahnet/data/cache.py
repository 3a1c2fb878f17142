"""HDF5 cache: one chunked file per case, rebuilt only when its source (or the build settings) change.

File ``<cache_dir>/<case_id>.h5``:
- ``image``: float32 (z, y, x), HU clipped to [-1000, 400] and scaled linearly to [0, 1];
- ``label``: int16 (z, y, x) instance mask (0 background, k = nodule k);
- ``fg_voxels``: int32 (n, 4) rows (z, y, x, label) of every foreground voxel (the sampler's index; an addition
  to the contract's format, recomputed from ``label`` when absent);
- attrs ``spacing`` (sz, sy, sx), ``origin`` (x, y, z) LPS, ``direction`` (9 values), ``case_id``, ``split``,
  ``source_sha1`` (sha1 of the source image bytes then label bytes), ``build_key`` (sha1 of the source sha1,
  the build settings and the case's annotation rows), ``nodules`` (JSON list of
  {label, center_zyx, diameter_mm, type, location}; center in voxels of the cached grid).

Writes are atomic: a temporary file in the same folder (``.<case_id>.h5.tmp-<pid>``, never matching ``*.h5``)
is written, flushed, fsynced and renamed over the target, so a killed build leaves either the old complete
file or none, and the next build removes the temporary files of killed ones. A case whose input is bad raises
DataError (or is skipped with ``errors="skip"``) and leaves no ``.h5`` (a stale one from an older source is
removed). The annotations are read and checked (ahnet.data.checks) before any case is.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet import paths
from ahnet.atomic import atomic_path, remove_temps
from ahnet.data.checks import check_inside
from ahnet.data.io import DataError, Volume, check_pair, load_dataset_json, read_annotations_csv, read_image, read_scan
from ahnet.data.preprocess import HU_MAX, HU_MIN, check_label, clip_and_scale, resample

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CHUNKS = (4, 64, 64)


def file_sha1(paths: Sequence, h=None) -> "hashlib._Hash":
    """sha1 over the bytes of the files (a folder: its files in sorted order), in the given order."""
    h = h or hashlib.sha1()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            with open(q, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h


def _nodules_from_annotations(rows, vol: Volume, csv_path, case_id, label: np.ndarray) -> list[dict]:
    out = []
    present = set(np.unique(label).tolist()) - {0}
    centres = check_inside(rows, vol, case_id, csv_path)
    for k, (r, zyx) in enumerate(zip(rows, centres)):
        lab = r.get("label")
        lab = int(lab) if lab is not None else k + 1
        if present and lab not in present:
            log.warning("%s: annotation label %d of %s has no voxels in the mask.", csv_path, lab, case_id)
        out.append(dict(label=lab, center_zyx=[float(v) for v in zyx],
                        diameter_mm=None if r.get("diameter_mm") is None else float(r["diameter_mm"]),
                        type=r.get("type"), location=r.get("location")))
    return out


def _nodules_from_mask(label: np.ndarray, spacing) -> list[dict]:
    from scipy import ndimage

    labs = [int(v) for v in np.unique(label) if v != 0]
    if not labs:
        return []
    centers = ndimage.center_of_mass(np.ones_like(label, dtype=np.float32), label, labs)
    counts = ndimage.sum_labels(np.ones_like(label, dtype=np.float32), label, labs)
    vox = float(np.prod(spacing))
    return [dict(label=lab, center_zyx=[float(v) for v in c],
                 diameter_mm=float((6.0 * n * vox / np.pi) ** (1.0 / 3.0)), type=None, location=None)
            for lab, c, n in zip(labs, centers, counts)]


def foreground_index(label: np.ndarray) -> np.ndarray:
    """(n, 4) int32 rows (z, y, x, label) of the voxels with label > 0, sorted by label."""
    zyx = np.argwhere(label > 0)
    if len(zyx) == 0:
        return np.zeros((0, 4), np.int32)
    labs = label[tuple(zyx.T)]
    out = np.concatenate([zyx, labs[:, None]], axis=1).astype(np.int32)
    return out[np.argsort(out[:, 3], kind="stable")]


def prepare_case(case: dict, target_spacing=None, annotation_rows=None, annotations_csv=None,
                 nan_policy: str = "raise"):
    """Read, check and preprocess one case -> (image Volume scaled to [0,1], label int16 array, nodules list).

    Raises DataError on any bad input (see io.read_image, io.check_pair, preprocess.check_label, annotations).
    """
    img = read_scan(case["image"], nan_policy=nan_policy)
    if case.get("label"):
        lab = read_image(case["label"], dtype=None, nan_policy="raise")
        check_pair(img, lab, case["image"], case["label"])
        lab.array = check_label(lab.array, case["label"])
    else:
        lab = Volume(np.zeros(img.shape, np.int16), img.spacing, img.origin, img.direction)
    if target_spacing is not None:
        img = resample(img, target_spacing, order=1)
        lab = resample(lab, target_spacing, order=0)
    img.array = clip_and_scale(img.array)
    if annotation_rows is not None:
        nodules = _nodules_from_annotations(annotation_rows, img, annotations_csv, case["case_id"], lab.array)
    else:
        nodules = _nodules_from_mask(lab.array, img.spacing)
    return img, lab.array, nodules


def _write_h5(path: Path, img: Volume, label: np.ndarray, attrs: dict, chunks, compression) -> None:
    import h5py

    ch = tuple(int(min(c, n)) for c, n in zip(chunks, img.shape)) if chunks else None
    with atomic_path(path, durable=True) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=img.array.astype(np.float32), chunks=ch, compression=compression)
            f.create_dataset("label", data=label.astype(np.int16), chunks=ch, compression=compression)
            f.create_dataset("fg_voxels", data=foreground_index(label))
            for k, v in attrs.items():
                f.attrs[k] = v


def write_case_file(path, image: np.ndarray, label: np.ndarray, spacing, case_id: str, split: str = "train",
                    chunks=DEFAULT_CHUNKS) -> Path:
    """One cache file straight from arrays: ``image`` float32 (z, y, x) already scaled to [0, 1], ``label`` int16
    instance mask, ``spacing`` (sz, sy, sx) mm, origin 0 and identity direction, nodules from the mask. For
    data that never had a source file (the GPU check's synthetic cases); build_cache never reuses such a file
    (it has no source sha1). Atomic, like every cache write. Returns the path."""
    path = Path(path)
    label = check_label(np.asarray(label), str(path))
    vol = Volume(np.asarray(image, np.float32), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), np.eye(3))
    attrs = dict(spacing=np.asarray(vol.spacing, float), origin=np.zeros(3), direction=np.eye(3).reshape(-1),
                 case_id=str(case_id), split=str(split), nodules=json.dumps(_nodules_from_mask(label, vol.spacing)))
    _write_h5(path, vol, label, attrs, chunks, None)
    return path


def read_cache_attrs(path) -> dict | None:
    """attrs of a cache file as plain values, or None when it is missing or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                return None
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except Exception:
        return None


def build_cache(dataset_json, cache_dir, target_spacing=None, annotations_csv=None, progress: bool = True,
                nan_policy: str = "raise", errors: str = "raise", splits: Sequence[str] | None = None,
                chunks=DEFAULT_CHUNKS, compression: str | None = None) -> list[Path]:
    """Build (or refresh) the HDF5 cache for the cases of a Decathlon dataset.json.

    target_spacing: None (keep) or (sy, sx) in-plane mm, or (sz, sy, sx) with None entries kept.
    annotations_csv: LUNA16-style CSV (world LPS mm, optional ``label`` column = mask instance); when None the
    nodules attr is derived from the mask (centre of mass, volume-equivalent diameter).
    errors: "raise" stops at the first bad case; "skip" logs it and goes on. splits: keep only these splits.
    Returns the cache paths of the good cases in dataset order. A case is skipped (not rewritten) when its
    file exists with the same source sha1 and build settings.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors={errors!r}: expected 'raise' or 'skip'.")
    from tqdm.auto import tqdm

    cases = load_dataset_json(dataset_json)
    by_case: dict[str, list] | None = None
    if annotations_csv is not None:
        by_case = {}
        for r in read_annotations_csv(annotations_csv, [c["case_id"] for c in cases], dataset_json):
            by_case.setdefault(str(r["seriesuid"]), []).append(r)
    if splits is not None:
        cases = [c for c in cases if c["split"] in set(splits)]
    cache_dir = Path(cache_dir)                    # created with its first file: a bad first case leaves none
    remove_temps(cache_dir)
    settings = dict(version=CACHE_VERSION, target_spacing=None if target_spacing is None else list(target_spacing),
                    hu=[HU_MIN, HU_MAX], nan_policy=nan_policy, chunks=list(chunks) if chunks else None,
                    compression=compression)
    out, n_built, n_skipped, bad = [], 0, 0, []
    bar = tqdm(cases, desc="cache", unit="case", disable=not progress)
    for case in bar:
        cid = case["case_id"]
        path = cache_dir / f"{cid}.h5"
        err = None
        try:
            src = file_sha1([case["image"], case.get("label")]).hexdigest()
        except OSError as e:
            src = None
            err = DataError(f"{case['image']}: cannot read the source files of case {cid} ({e}).")
        rows = by_case.get(cid, []) if by_case is not None else None
        key = hashlib.sha1(json.dumps([src, settings, rows], sort_keys=True, default=str).encode()).hexdigest()
        if src is not None:
            old = read_cache_attrs(path)
            if old is not None and old.get("source_sha1") == src and old.get("build_key") == key:
                n_skipped += 1
                out.append(path)
                continue
            try:
                img, label, nodules = prepare_case(case, target_spacing, rows, annotations_csv, nan_policy)
            except DataError as e:
                err = e
        if err is not None:
            if path.exists():
                path.unlink()  # a stale entry from an older source must not be read
            if errors == "raise":
                raise err
            log.error("skipping case %s: %s", cid, err)
            bad.append(cid)
            continue
        attrs = dict(spacing=np.asarray(img.spacing, float), origin=np.asarray(img.origin, float),
                     direction=np.asarray(img.direction, float).reshape(-1), case_id=cid,
                     split=str(case.get("split", "train")), source_sha1=src, build_key=key,
                     nodules=json.dumps(nodules), image_path=str(case["image"]),
                     label_path=str(case.get("label") or ""))
        _write_h5(path, img, label, attrs, chunks, compression)
        n_built += 1
        out.append(path)
    log.info("cache %s: %d built, %d unchanged, %d bad", cache_dir, n_built, n_skipped, len(bad))
    return out


def cache_dataset(dataset_json, cache_dir=None, progress: bool = True, **build_kw) -> list[Path]:
    """The HDF5 cache of a dataset, built or refreshed: THE way every caller gets it (training, the experiment,
    ``python -m ahnet.commands.cache`` behind ``bash run.sh data``), so all of them agree on each case's build key
    and none rebuilds the others' files.

    cache_dir: default ``paths.cache_dir(dataset_json)`` (data/cache/<dataset folder name>). The annotations are
    ``paths.annotations_csv(dataset_json)`` when that file exists (each nodule's type, location and diameter come
    from it), else the nodules are derived from the masks. ``build_kw``: target_spacing, nan_policy, errors,
    splits, chunks, compression of build_cache. Returns the cache paths of the good cases in dataset order.
    """
    return build_cache(dataset_json, paths.cache_dir(dataset_json) if cache_dir is None else cache_dir,
                       annotations_csv=paths.dataset_annotations(dataset_json), progress=progress, **build_kw)
