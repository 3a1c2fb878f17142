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

- attr ``sha256``: SHA-256 over every dataset (name, dtype, shape, bytes) and every other attribute; the chunks
  carry HDF5's Fletcher-32 checksums too, and the file format's metadata its own checksums.

Nothing is written before every input is known good: the annotations are read and checked (ahnet.data.checks)
before any case is, every case to build has its header checked against the memory limit (ahnet.data.budget,
``limit``) before any scan is read, and with ``errors="raise"`` the new files are written to temporaries
(``.<case_id>.h5.tmp-<pid>``, never matching ``*.h5``), flushed and fsynced, and renamed into place together
only when every case has been built (ahnet.atomic.atomic_paths): a bad case, a full disk or a kill leaves the
cache as it was (a kill leaves temporaries, which the next build removes; it also loses that build's work).
With ``errors="skip"`` each good case is renamed into place when it is built. A bad case raises DataError (or
is skipped) and leaves no ``.h5`` (a stale one from an older source is removed).

A file reused as up to date is read whole and its SHA-256 checked first: a file damaged at rest (flipped or lost
bytes) is named in a warning and rebuilt from its source, never read as it is.
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet import paths
from ahnet.atomic import atomic_path, atomic_paths, remove_temps
from ahnet.data.budget import ScanLimit, scan_limit
from ahnet.data.checks import check_inside
from ahnet.data.header import read_header
from ahnet.data.io import DataError, Volume, check_pair, load_dataset_json, read_annotations_csv, read_image, read_scan
from ahnet.data.preprocess import HU_MAX, HU_MIN, check_label, clip_and_scale, resample, target_grid

log = logging.getLogger(__name__)

CACHE_VERSION = 2          # 2: Fletcher-32 chunks and a content sha256 (version-1 files are rebuilt once)
DEFAULT_CHUNKS = (4, 64, 64)
DIGEST_ATTR = "sha256"
_SLAB = 32                 # slices per read when a file is hashed
_VERIFIED: set = set()     # (path, stamp) of the files this process has verified


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
                 nan_policy: str = "raise", limit: ScanLimit | None = None):
    """Read, check and preprocess one case -> (image Volume scaled to [0,1], label int16 array, nodules list).

    Raises DataError on any bad input (see io.read_image, io.check_pair, preprocess.check_label, annotations);
    ``limit``: the voxels a scan may have (default: ahnet.data.budget's "cache" limit).
    """
    limit = limit or scan_limit("cache")
    img = read_scan(case["image"], nan_policy=nan_policy, limit=limit)
    if case.get("label"):
        lab = read_image(case["label"], dtype=None, nan_policy="raise", limit=limit)
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


def content_sha256(f) -> str:
    """SHA-256 (hex) over an open cache file's datasets (name, dtype, shape, bytes; read in slabs) and its other
    attributes (name and value bytes), in sorted order."""
    h = hashlib.sha256()
    for name in sorted(f.keys()):
        d = f[name]
        h.update(f"{name}|{d.dtype.str}|{d.shape};".encode())
        for z in range(0, d.shape[0] if d.ndim else 1, _SLAB):
            h.update(np.ascontiguousarray(d[z:z + _SLAB] if d.ndim else d[()]).data)
    for k in sorted(f.attrs.keys()):
        if k == DIGEST_ATTR:
            continue
        v = f.attrs[k]
        raw = v.encode() if isinstance(v, str) else v if isinstance(v, bytes) else np.asarray(v).tobytes()
        h.update(f"{k}|{np.asarray(v).dtype.str}|{len(raw)};".encode() + raw)
    return h.hexdigest()


def _stamp(path) -> tuple | None:
    """(inode, size, mtime ns) of a file: it has not been rewritten while its stamp stays."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def verify_cache_file(path) -> str | None:
    """Why the cache file at ``path`` cannot be trusted (unreadable, a failing checksum, no digest or one that
    differs from its content), or None when it reads whole and matches its SHA-256. A file this process already
    verified is not read again while its stamp (inode, size, mtime) stays (training opens the cache twice)."""
    import h5py

    key = (str(Path(path).absolute()), _stamp(path))
    if key in _VERIFIED:
        return None
    try:
        with h5py.File(path, "r") as f:
            want = f.attrs.get(DIGEST_ATTR)
            if want is None:
                return "it carries no checksum"
            got = content_sha256(f)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return f"it cannot be read whole ({first})"
    if got != (want.decode() if isinstance(want, bytes) else want):
        return "its content no longer matches the SHA-256 written with it"
    _VERIFIED.add(key)
    return None


def _write_h5(path: Path, img: Volume, label: np.ndarray, attrs: dict, chunks, compression) -> None:
    """Write one cache file at ``path`` (the caller makes it atomic): the datasets with Fletcher-32 chunk
    checksums, the attributes, then the SHA-256 of it all (attr ``sha256``). The file is made in memory and
    written in one piece (HDF5 failing to flush on a full disk prints tracebacks no handler can catch)."""
    import h5py

    ch = tuple(int(min(c, n)) for c, n in zip(chunks, img.shape)) if chunks else None
    fg = foreground_index(label)
    buf = _io.BytesIO()
    with h5py.File(buf, "w", libver="latest") as f:
        f.create_dataset("image", data=img.array.astype(np.float32), chunks=ch or True, compression=compression,
                         fletcher32=True)
        f.create_dataset("label", data=label.astype(np.int16), chunks=ch or True, compression=compression,
                         fletcher32=True)
        f.create_dataset("fg_voxels", data=fg, **({"chunks": True, "fletcher32": True} if len(fg) else {}))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs[DIGEST_ATTR] = content_sha256(f)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())


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
    with atomic_path(path, durable=True) as tmp:
        _write_h5(tmp, vol, label, attrs, chunks, None)
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


def _reusable(path: Path, src: str, key: str, image) -> bool:
    """True when the cache file at ``path`` was built from source ``src`` with ``key`` and reads whole and
    matches its SHA-256; a damaged file is named in a warning (then rebuilt from ``image``)."""
    if not path.exists():
        return False
    old = read_cache_attrs(path)
    if old is not None and (old.get("source_sha1") != src or old.get("build_key") != key):
        return False
    why = verify_cache_file(path) if old is not None else "it cannot be read"
    if why is None:
        return True
    log.warning("cache file %s is damaged (%s); rebuilding it from %s", path, why, image)
    return False


@dataclass
class _Job:
    """One case of a build: its entry, cache file, source sha1 and build key, annotation rows, and the error
    that stops it (None while it is good)."""
    case: dict
    path: Path
    src: str | None
    key: str
    rows: list | None
    err: DataError | None = None


def _plan(cases, cache_dir: Path, settings: dict, by_case) -> tuple[list, list]:
    """(jobs to build, cache files reused as they are) of ``cases``, in dataset order."""
    todo, reused = [], []
    for case in cases:
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
        if src is not None and _reusable(path, src, key, case["image"]):
            reused.append(path)
        else:
            todo.append(_Job(case, path, src, key, rows, err))
    return todo, reused


def _check_sizes(jobs, target_spacing, limit: ScanLimit) -> None:
    """Each job's image and mask headers against ``limit`` (the image at the larger of its own and its resampled
    grid) before any scan is read; a problem becomes the job's error."""
    for job in jobs:
        if job.err is not None:
            continue
        try:
            head = read_header(job.case["image"])
            voxels = head.voxels
            if target_spacing is not None and head.spacing is not None and len(head.shape) == 3:
                voxels = max(voxels, math.prod(target_grid(head.shape, head.spacing, target_spacing)[0]))
            limit.check(head, voxels, None if voxels == head.voxels else
                        f"{head.path}: the header says {head.describe()}, {voxels:.3g} voxels once resampled")
            if job.case.get("label"):
                limit.check(read_header(job.case["label"]))
        except (DataError, ValueError) as e:
            job.err = e if isinstance(e, DataError) else DataError(str(e))


def _build_one(job: _Job, tmp: Path, build: dict) -> None:
    """Read and preprocess one job's case and write its cache file at ``tmp`` (DataError on bad input)."""
    case = job.case
    img, label, nodules = prepare_case(case, build["target_spacing"], job.rows, build["annotations_csv"],
                                       build["nan_policy"], build["limit"])
    attrs = dict(spacing=np.asarray(img.spacing, float), origin=np.asarray(img.origin, float),
                 direction=np.asarray(img.direction, float).reshape(-1), case_id=case["case_id"],
                 split=str(case.get("split", "train")), source_sha1=job.src, build_key=job.key,
                 nodules=json.dumps(nodules), image_path=str(case["image"]),
                 label_path=str(case.get("label") or ""))
    _write_h5(tmp, img, label, attrs, build["chunks"], build["compression"])


def _refuse(job: _Job, errors: str, bad: list) -> None:
    """A bad job: its stale cache file removed; raised (errors "raise") or logged and counted ("skip")."""
    if job.path.exists():
        job.path.unlink()  # a stale entry from an older source must not be read
    if errors == "raise":
        raise job.err
    log.error("skipping case %s: %s", job.case["case_id"], job.err)
    bad.append(job.case["case_id"])


def _build_jobs(todo: list, build: dict, errors: str, progress: bool) -> list:
    """Build every job (errors "raise": all to temporaries, renamed together at the end; "skip": each renamed
    when built, bad ones logged). Returns the jobs built."""
    from tqdm.auto import tqdm

    bad: list = []
    bar = tqdm(todo, desc="cache", unit="case", disable=not progress)
    if errors == "raise":
        for job in todo:
            if job.err is not None:
                _refuse(job, errors, bad)
        with atomic_paths([j.path for j in todo], durable=True) as tmps:
            for job, tmp in zip(bar, tmps):
                try:
                    _build_one(job, tmp, build)
                except DataError as e:
                    job.err = e
                    _refuse(job, errors, bad)
        return todo
    done = []
    for job in bar:
        if job.err is None:
            try:
                with atomic_path(job.path, durable=True) as tmp:
                    _build_one(job, tmp, build)
                done.append(job)
                continue
            except DataError as e:
                job.err = e
        _refuse(job, errors, bad)
    return done


def build_cache(dataset_json, cache_dir, target_spacing=None, annotations_csv=None, progress: bool = True,
                nan_policy: str = "raise", errors: str = "raise", splits: Sequence[str] | None = None,
                chunks=DEFAULT_CHUNKS, compression: str | None = None, limit: ScanLimit | None = None) -> list[Path]:
    """Build (or refresh) the HDF5 cache for the cases of a Decathlon dataset.json.

    target_spacing: None (keep) or (sy, sx) in-plane mm, or (sz, sy, sx) with None entries kept.
    annotations_csv: LUNA16-style CSV (world LPS mm, optional ``label`` column = mask instance); when None the
    nodules attr is derived from the mask (centre of mass, volume-equivalent diameter).
    errors: "raise" stops at the first bad case and writes nothing; "skip" logs it and goes on. splits: keep
    only these splits. limit: the voxels one scan may have (default: ahnet.data.budget's "cache" limit).
    Returns the cache paths of the good cases in dataset order. A case is skipped (not rewritten) when its
    file exists with the same source sha1 and build settings and matches its SHA-256 (module docstring).
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors={errors!r}: expected 'raise' or 'skip'.")
    cases = load_dataset_json(dataset_json)
    by_case: dict[str, list] | None = None
    if annotations_csv is not None:
        by_case = {}
        for r in read_annotations_csv(annotations_csv, [c["case_id"] for c in cases], dataset_json):
            by_case.setdefault(str(r["seriesuid"]), []).append(r)
    if splits is not None:
        cases = [c for c in cases if c["split"] in set(splits)]
    cache_dir = Path(cache_dir)                    # created with its first file: a bad case leaves none
    remove_temps(cache_dir)
    limit = limit or scan_limit("cache")
    settings = dict(version=CACHE_VERSION, target_spacing=None if target_spacing is None else list(target_spacing),
                    hu=[HU_MIN, HU_MAX], nan_policy=nan_policy, chunks=list(chunks) if chunks else None,
                    compression=compression)
    todo, reused = _plan(cases, cache_dir, settings, by_case)
    _check_sizes(todo, target_spacing, limit)
    build = dict(target_spacing=target_spacing, annotations_csv=annotations_csv, nan_policy=nan_policy,
                 chunks=chunks, compression=compression, limit=limit)
    built = {j.path for j in _build_jobs(todo, build, errors, progress)}
    log.info("cache %s: %d built, %d unchanged, %d bad", cache_dir, len(built), len(reused),
             len(todo) - len(built))
    keep = built | set(reused)
    return [p for p in (cache_dir / f"{c['case_id']}.h5" for c in cases) if p in keep]


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
