"""Tiny synthetic cases for the cache / sampling tests: spheres of +40 HU in air, with instance masks."""
import json

import numpy as np

from ahnet.data.io import Volume, write_annotations_csv, write_image

SPACING = (2.5, 0.8, 0.8)
ORIGIN = (-60.0, -50.0, -100.0)
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # in-plane 90 degrees


def make_case(shape=(12, 48, 48), centers=((6, 20, 24),), radius_mm=4.0, seed=0):
    """(image Volume in HU, label Volume int16) with one sphere per centre (z, y, x voxels)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(-850, 20, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for k, (cz, cy, cx) in enumerate(centers, start=1):
        d2 = ((zz - cz) * SPACING[0]) ** 2 + ((yy - cy) * SPACING[1]) ** 2 + ((xx - cx) * SPACING[2]) ** 2
        m = d2 <= radius_mm ** 2
        img[m] = 40.0
        lab[m] = k
    return Volume(img, SPACING, ORIGIN, DIRECTION), Volume(lab, SPACING, ORIGIN, DIRECTION)


def make_dataset(root, n_cases=3, shape=(12, 48, 48), empty_cases=(2,), suffix=".nii.gz"):
    """Write imagesTr/labelsTr/annotations.csv/dataset.json under root; returns (json path, csv path)."""
    root.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        centers = () if i in empty_cases else ((6, 20, 24), (4, 36, 12))[: 1 + i % 2]
        img, lab = make_case(shape, centers, seed=i)
        write_image(root / "imagesTr" / f"{cid}{suffix}", img)
        write_image(root / "labelsTr" / f"{cid}{suffix}", lab)
        for k, c in enumerate(centers, start=1):
            x, y, z = img.voxel_to_world(c)
            rows.append(dict(seriesuid=cid, coordX=x, coordY=y, coordZ=z, diameter_mm=8.0, type="T02",
                             location="isolated", label=k))
        entries.append({"image": f"./imagesTr/{cid}{suffix}", "label": f"./labelsTr/{cid}{suffix}",
                        "case_id": cid, "split": "train" if i else "validation"})
    (root / "dataset.json").write_text(json.dumps({"name": "synth", "training": entries}, indent=1))
    csv = write_annotations_csv(root / "annotations.csv", rows)
    return root / "dataset.json", csv


#: the tiny 3D U-Net of the evaluation worlds (untrained; 4 x 32 x 32 windows)
TINY_UNET = {"base_channels": 4, "max_channels": 16, "z_pool": "none"}


def make_evaluation_world(root, n_cases, test_case, empty_cases=(2,)):
    """make_dataset under root/ds with case ``test_case`` moved to split "test", and beside it root/run: an
    untrained TINY_UNET (seed 0) saved as a trained run's checkpoints/best.pt. Returns (json, csv, run)."""
    import torch

    from ahnet.nets import build_model
    js, ann = make_dataset(root / "ds", n_cases=n_cases, shape=(12, 48, 48), empty_cases=empty_cases)
    meta = json.loads(js.read_text(encoding="utf-8"))
    meta["training"][test_case]["split"] = "test"
    js.write_text(json.dumps(meta), encoding="utf-8")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    m = build_model("unet3d", **TINY_UNET)
    torch.save({"model": m.state_dict(), "model_name": "unet3d", "model_kwargs": m.config,
                "config": {"patch_size": [4, 32, 32]}}, run / "checkpoints" / "best.pt")
    return js, ann, run

