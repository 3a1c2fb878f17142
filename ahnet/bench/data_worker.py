"""The data pipeline's measurement: patches per second of PatchDataset from an HDF5 cache of synthetic cases
(in-process and through a DataLoader), the cache build time, and the time to generate one phantom case."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _write_synthetic_dataset(root: Path, n_cases: int, shape, spacing=(2.5, 0.7, 0.7)) -> Path:
    """n_cases CT-like volumes (air + soft-tissue noise + a few spheres as nodules) with instance masks."""
    from ahnet.data.io import Volume, write_image

    rng = np.random.default_rng(0)
    direction = np.eye(3)
    entries = []
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n_cases):
        img = rng.normal(-800, 60, size=shape).astype(np.float32)
        lab = np.zeros(shape, np.int16)
        for k in range(1, 4):
            c = [rng.integers(s // 4, 3 * s // 4) for s in shape]
            r = rng.uniform(3, 8)
            m = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2 <= r * r
            img[m] = 30.0
            lab[m] = k
        cid = f"bench_{i:03d}"
        write_image(root / "imagesTr" / f"{cid}.nii.gz", Volume(img, spacing, (0.0, 0.0, 0.0), direction))
        write_image(root / "labelsTr" / f"{cid}.nii.gz", Volume(lab, spacing, (0.0, 0.0, 0.0), direction))
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz",
                        "case_id": cid, "split": "train"})
    (root / "dataset.json").write_text(json.dumps({"name": "bench", "training": entries}))
    return root / "dataset.json"


def phantom_case_seconds(n: int) -> dict:
    """Seconds to build one CPU-sized phantom case (192 x 192 x 40 at 2.5 mm, LIDC shapes), median of n cases;
    the one-time LIDC shape-pool load is timed apart. The issue's target: under 5 s on one core."""
    from ahnet.data import phantom

    if n <= 0:
        return {}
    opts = phantom.PhantomOptions()
    t = time.perf_counter()
    pool = phantom._get_pool(opts.spacing) if opts.shapes == "lidc" else "procedural"
    pool_s = time.perf_counter() - t
    times = []
    for i in range(n):
        t = time.perf_counter()
        phantom.generate_case(f"bench_{i:03d}", i, opts, n_nodules=2, pool=pool)
        times.append(time.perf_counter() - t)
    return {"phantom_pool_load_s": pool_s, "phantom_case_s": float(np.median(times)),
            "phantom_shape": [opts.slices, opts.size, opts.size]}


def work_data(spec: dict) -> dict:
    """Patches per second of PatchDataset from an HDF5 cache: in-process and through a DataLoader."""
    from ahnet.data.augment import Augment
    from ahnet.data.cache import build_cache
    from ahnet.data.sampling import PatchDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dj = _write_synthetic_dataset(root / "ds", spec["cases"], spec["case_shape"])
        t = time.perf_counter()
        paths = build_cache(dj, root / "cache", progress=False)
        cache_s = time.perf_counter() - t
        out = {"cases": spec["cases"], "case_shape": spec["case_shape"], "patch": spec["patch"],
               "cache_build_s": cache_s}
        out.update(phantom_case_seconds(spec.get("phantom_cases", 2)))
        for name, aug in (("plain", None), ("augment", Augment())):
            ds = PatchDataset(paths, spec["patch"], samples_per_epoch=spec["samples"], augment=aug, seed=0)
            ds[0]
            t = time.perf_counter()
            for i in range(spec["samples"]):
                ds[i]
            out[f"{name}_patches_per_s"] = spec["samples"] / (time.perf_counter() - t)
            ds.close()
        if spec["workers"] > 0:
            ds = PatchDataset(paths, spec["patch"], samples_per_epoch=spec["samples"], augment=Augment(), seed=0)
            dl = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=spec["workers"])
            it = iter(dl)
            next(it)
            t = time.perf_counter()
            n = sum(1 for _ in it)
            out["loader_workers"] = spec["workers"]
            out["loader_augment_patches_per_s"] = n / (time.perf_counter() - t)
    return out
