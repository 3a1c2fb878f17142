"""The real pieces together on a CPU-tiny synthetic dataset: dataset.json -> cache -> PatchDataset -> MC-GCN
(2D stage) -> checked transfer -> AH-Net (3D stage), and an exact resume with real networks and data."""
import csv

import pytest
import torch

from ahnet.checkpoint import load_checkpoint
from ahnet.train.config import TrainConfig
from ahnet.train import train
from ahnet.commands.train import main

from ahnet.infer import load_ensemble
from ahnet.infer.spacing import training_inplane

from .data._pipeline_synth import SPACING, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainint")
    js, _ = make_dataset(root / "ds", n_cases=3, shape=(12, 48, 48))
    return root, js


def _common(root, js, name, **kw):
    d = dict(encoder="resnet18", batch_size=2, epochs=2, steps_per_epoch=2, lr=1e-3, device="cpu", seed=1,
             val_patches=2, data=str(js), cache_dir=str(root / "cache"), out=str(root / name))
    d.update(kw)
    return TrainConfig(**d)


@pytest.mark.slow
def test_2d_stage_then_transfer_then_3d_stage(dataset):
    root, js = dataset
    rc = main(["--stage", "2d", "--encoder", "resnet18", "--patch-size", "3", "32", "32", "--batch-size", "2",
               "--epochs", "1", "--steps-per-epoch", "2", "--lr", "1e-3", "--device", "cpu", "--val-patches", "2",
               "--data", str(js), "--cache-dir", str(root / "cache"), "--out", str(root / "r-2d")])
    assert rc == 0
    ck2 = load_checkpoint(root / "r-2d" / "checkpoints" / "best.pt")
    assert ck2["model_name"] == "mcgcn" and ck2["model_kwargs"]["encoder"] == "resnet18"
    rows = list(csv.DictReader(open(root / "r-2d" / "log.csv")))
    assert len(rows) == 1 and all(float(r["loss"]) > 0 for r in rows)

    cfg3 = _common(root, js, "r-3d", stage="3d", model="ahnet", init="transfer", init_from=str(root / "r-2d"),
                   patch_size=[4, 32, 32], pfn_depth=2, lr_encoder=1e-4, model_kwargs={"z_pool": "none"},
                   epochs=1, batch_size=1, val_patches=1)
    res = train(cfg3)
    assert res["step"] == 2 and res["skipped_total"] == 0
    ck3 = load_checkpoint(root / "r-3d" / "checkpoints" / "last.pt")
    assert ck3["model_name"] == "ahnet" and ck3["init"]["from"].endswith("best.pt")
    assert ck3["model_kwargs"]["pfn_depth"] == 2 and ck3["model_kwargs"]["encoder"] == "resnet18"
    # the training scans' spacing, which inference resamples a scan of other pixels to (ahnet.infer.spacing)
    assert ck3["data_spacing"] == pytest.approx(list(SPACING)) == ck2["data_spacing"]
    assert training_inplane(load_ensemble([root / "r-3d"])) == pytest.approx(SPACING[1:])
    # the checkpoint rebuilds with build_model and its model_kwargs
    from ahnet.nets import build_model
    m = build_model(ck3["model_name"], **ck3["model_kwargs"])
    m.load_state_dict(ck3["model"])
    assert [g["name"] for g in ck3["optimizer"]["param_groups"]] == ["encoder", "decoder"]


@pytest.mark.slow
def test_exact_resume_with_real_networks_and_data(dataset):
    root, js = dataset
    # a small real 3D U-Net keeps the checkpoints light; the data are the real cache + PatchDataset + Augment
    kw = dict(stage="3d", model="unet3d", patch_size=[4, 32, 32], epochs=2, steps_per_epoch=2, augment="standard",
              batch_size=2, val_patches=2,
              model_kwargs={"base_channels": 4, "max_channels": 16, "z_pool": "none"})
    train(_common(root, js, "ref", **kw))
    train(_common(root, js, "cut", max_steps=3, **kw))
    train(_common(root, js, "cut", resume=True, **kw))
    a = load_checkpoint(root / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(root / "cut" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
