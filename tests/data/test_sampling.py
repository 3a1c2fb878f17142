"""PatchDataset: shapes, padding, determinism, positive fraction, negatives-only, DataLoader workers."""
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage
from ._pipeline_synth import make_dataset

from ahnet.data.cache import build_cache
from ahnet.data.sampling import PatchDataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("samp")
    js, csv = make_dataset(root / "ds", n_cases=3, shape=(12, 48, 48))
    return build_cache(js, root / "cache", annotations_csv=csv, progress=False)


def test_shapes_and_values(cache):
    ds = PatchDataset(cache, patch_size=(8, 32, 32), samples_per_epoch=20)
    assert len(ds) == 20
    s = ds[0]
    assert s["image"].shape == (1, 8, 32, 32) and s["image"].dtype == torch.float32
    assert s["label"].shape == (1, 8, 32, 32) and s["label"].dtype == torch.float32
    for i in range(20):
        s = ds[i]
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0}
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    with pytest.raises(IndexError):
        ds[20]


def test_patch_matches_cache_and_pads_with_zero(cache):
    ds = PatchDataset(cache, patch_size=(5, 9, 7), samples_per_epoch=1)
    with h5py.File(cache[1], "r") as f:
        full_img, full_lab = f["image"][...], f["label"][...]
    img, lab = ds.read_patch(1, (6, 20, 24))  # interior: exact crop, start = centre - size // 2
    np.testing.assert_array_equal(img, full_img[4:9, 16:25, 21:28])
    np.testing.assert_array_equal(lab, full_lab[4:9, 16:25, 21:28])
    img, lab = ds.read_patch(1, (0, 47, 0))   # corner: the outside part is 0
    np.testing.assert_array_equal(img[2:, :5, 3:], full_img[0:3, 43:48, 0:4])
    assert np.all(img[:2] == 0) and np.all(img[:, 5:] == 0) and np.all(img[:, :, :3] == 0)


def test_deterministic_in_seed_epoch_index(cache):
    a = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=8, seed=3)
    b = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=8, seed=3)
    for i in [7, 0, 3]:  # order of access does not matter
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    first = [a.plan(i)[1:] for i in range(8)]
    a.set_epoch(1)
    assert [a.plan(i)[1:] for i in range(8)] != first
    a.set_epoch(0)
    assert [a.plan(i)[1:] for i in range(8)] == first
    c = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=8, seed=4)
    assert [c.plan(i)[1:] for i in range(8)] != first


def test_positive_fraction_and_positives_hold_nodules(cache):
    n = 400
    ds = PatchDataset(cache, patch_size=(3, 16, 16), samples_per_epoch=n, pos_fraction=0.3)
    plans = [ds.plan(i) for i in range(n)]
    pos = np.array([p[3] for p in plans])
    assert abs(pos.mean() - 0.3) < 0.07  # binomial sd ~ 0.023
    assert {p[1] for p in plans if p[3]} == {0, 1}  # case_002 has no nodules
    for i in np.flatnonzero(pos)[:60]:
        s = ds[int(i)]
        assert s["label"][0, 1].sum() > 0  # D = 3: the middle slice holds the nodule voxel
    neg_hits = np.mean([ds[int(i)]["label"].sum() > 0 for i in np.flatnonzero(~pos)[:60]])
    assert neg_hits < 0.5


def test_inverse_diameter_weighting_draws_small_nodules_more_often(cache, tmp_path):
    """Each nodule's share of the positives matches 1 / its equivalent diameter, computed from the label maps."""
    cache = [shutil.copy(p, tmp_path / Path(p).name) for p in cache]
    with h5py.File(cache[1], "r+") as f:      # grow nodule 2 of case 1 so the sizes differ
        label = f["label"][...]
        label[(label == 0) & ndimage.binary_dilation(label == 2, iterations=2)] = 2
        f["label"][...] = label
        if "fg_voxels" in f:
            del f["fg_voxels"]
    weights = {}
    for k, path in enumerate(cache):
        with h5py.File(path, "r") as f:
            label = f["label"][...]
            voxel_mm3 = float(np.prod(f.attrs["spacing"]))
        for lab in np.unique(label[label > 0]):
            weights[(k, int(lab))] = (6 * (label == lab).sum() * voxel_mm3 / np.pi) ** (-1 / 3)
    assert len(weights) == 3 and max(weights.values()) > 1.4 * min(weights.values())
    n = 4000
    ds = PatchDataset(cache, patch_size=(3, 16, 16), samples_per_epoch=n, pos_fraction=1.0, jitter=0.0,
                      pos_weighting="inverse-diameter")
    counts = dict.fromkeys(weights, 0)
    for i in range(n):
        _, k, centre, positive = ds.plan(i)
        assert positive
        with h5py.File(cache[k], "r") as f:
            counts[(k, int(f["label"][centre]))] += 1
    total = sum(weights.values())
    for key, w in weights.items():
        assert abs(counts[key] / n - w / total) < 0.03, (key, counts[key] / n, w / total)
    uniform = PatchDataset(cache, patch_size=(3, 16, 16), samples_per_epoch=20, pos_fraction=1.0)
    assert uniform.pos_weighting == "case" and [uniform.plan(i)[1:] for i in range(20)] != \
        [ds.plan(i)[1:] for i in range(20)]
    with pytest.raises(ValueError, match="pos_weighting 'big'; expected one of case, inverse-diameter, "
                                         "inverse-diameter-contrast"):
        PatchDataset(cache, pos_weighting="big")



def test_inverse_diameter_contrast_draws_faint_nodules_more_often(cache, tmp_path):
    """With inverse-diameter-contrast each nodule's share of the positives matches 1 / (diameter x sqrt(contrast)), the
    contrast (its mean HU minus that of a 2-voxel in-plane shell of non-nodule voxels, floored at 50 HU) computed
    here over the whole volume; a nodule made faint (100 HU above its shell) is drawn more often than before."""
    from ahnet.data.preprocess import HU_MAX, HU_MIN
    cache = [shutil.copy(p, tmp_path / Path(p).name) for p in cache]
    plane = np.zeros((1, 3, 3), bool)
    plane[0] = True
    with h5py.File(cache[0], "r+") as f:      # nodule 1 of case 0: 100 HU above its surroundings
        image, label = f["image"][...], f["label"][...]
        nod = label == np.unique(label[label > 0])[0]
        shell = ndimage.binary_dilation(nod, structure=plane, iterations=2) & (label == 0)
        image[nod] = image[shell].mean() + 100.0 / (HU_MAX - HU_MIN)
        f["image"][...] = image
    weights, contrast = {}, {}
    for k, path in enumerate(cache):
        with h5py.File(path, "r") as f:
            image, label = f["image"][...], f["label"][...]
            voxel_mm3 = float(np.prod(f.attrs["spacing"]))
        for lab in np.unique(label[label > 0]):
            nod = label == lab
            shell = ndimage.binary_dilation(nod, structure=plane, iterations=2) & (label == 0)
            c = (image[nod].mean() - image[shell].mean()) * (HU_MAX - HU_MIN)
            contrast[(k, int(lab))] = c
            weights[(k, int(lab))] = (6 * nod.sum() * voxel_mm3 / np.pi) ** (-1 / 3) / np.sqrt(max(c, 50.0))
    faint = (0, int(min(k[1] for k in contrast if k[0] == 0)))
    assert abs(contrast[faint] - 100.0) < 1.0 and min(v for k, v in contrast.items() if k != faint) > 300
    n = 4000
    ds = PatchDataset(cache, patch_size=(3, 16, 16), samples_per_epoch=n, pos_fraction=1.0, jitter=0.0,
                      pos_weighting="inverse-diameter-contrast")
    flat = [c for case in ds.contrast_hu for c in case]
    assert np.allclose(sorted(flat), sorted(contrast.values()), atol=1e-3)
    counts = dict.fromkeys(weights, 0)
    for i in range(n):
        _, k, centre, _ = ds.plan(i)
        with h5py.File(cache[k], "r") as f:
            counts[(k, int(f["label"][centre]))] += 1
    total = sum(weights.values())
    for key, w in weights.items():
        assert abs(counts[key] / n - w / total) < 0.03, (key, counts[key] / n, w / total)
    assert counts[faint] / n > 0.45

def test_negatives_only_when_no_nodules(cache):
    ds = PatchDataset([cache[2]], patch_size=(4, 16, 16), samples_per_epoch=50, pos_fraction=0.9)
    assert all(not ds.plan(i)[3] for i in range(50))
    assert all(ds[i]["label"].sum() == 0 for i in range(10))


def test_augment_hook_gets_rng(cache):
    calls = []

    def aug(img, lab, rng):
        calls.append(rng.random())
        return img[:, ::-1], lab[:, ::-1]

    ds = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=4, augment=aug)
    plain = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=4)
    assert torch.equal(ds[2]["image"], plain[2]["image"].flip(2))
    ds[2]
    assert calls[0] == calls[1]


def test_dataloader_two_workers_matches_serial(cache):
    ds = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=12, seed=1)
    ds[0]  # the parent opens a handle before the fork: workers must not reuse it
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(dl)
    assert len(batches) == 4 and batches[0]["image"].shape == (3, 1, 4, 16, 16)
    got = torch.cat([b["image"] for b in batches])
    ref = torch.stack([ds[i]["image"] for i in range(12)])
    assert torch.equal(got, ref)
    ds.set_epoch(5)
    again = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(again, torch.stack([ds[i]["image"] for i in range(12)]))
    assert not torch.equal(again, got)


def test_bad_arguments(cache, tmp_path):
    with pytest.raises(ValueError, match="pos_fraction"):
        PatchDataset(cache, pos_fraction=1.5)
    with pytest.raises(ValueError, match="cache_paths is empty"):
        PatchDataset([])
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="x.h5: not a readable cache file"):
        PatchDataset([bad])


def test_set_epoch_reaches_persistent_workers(cache):
    ds = PatchDataset(cache, patch_size=(4, 16, 16), samples_per_epoch=6, seed=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        got = torch.cat([b["image"] for b in dl])
        assert torch.equal(got, torch.stack([ds[i]["image"] for i in range(6)])), epoch
