"""Training loop on CPU-tiny stand-ins: outputs, exact resume, non-finite steps, AMP path, 2D stage, errors.

The stand-ins follow the contracts (build_model(name, **kw) -> module with .encoder and .input_multiple;
PatchDataset items {"image", "label"} of shape (1, D, H, W), pure in (seed, epoch, index), set_epoch).
"""
import csv
import json
import time

import pytest
import torch
import torch.nn as nn

from ahnet.checkpoint import load_checkpoint
from ahnet.train.config import TrainConfig, build_parser, load_config
from ahnet.precision import resolve_amp
from ahnet.commands.train import main
from ahnet.train.optim import WeightAverage
from ahnet.train import (EpochSampler, TrainError, TrainingDiverged, lr_factor, make_optimizer,
                         split_batch_2d, train, train_all_folds)

from ._tiny import TinyPatches


class Tiny3d(nn.Module):
    input_multiple = (1, 4, 4)

    def __init__(self, in_channels=1, out_channels=1, encoder="resnet18", pfn_depth=0, **kw):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(in_channels, 4, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(4),
                                     nn.ReLU())
        self.drop = nn.Dropout3d(0.25)      # consumes the global RNG: resume must restore it
        self.head = nn.Conv3d(4, out_channels, (3, 1, 1), padding=(1, 0, 0))
        self.nan_from = None

    def forward(self, x):
        if x.dim() != 5:
            raise ValueError(f"Tiny3d expects (N, C, D, H, W), got {tuple(x.shape)}")
        out = self.head(self.drop(self.encoder(x)))
        return out


class Tiny2d(nn.Module):
    input_multiple = (4, 4)

    def __init__(self, encoder="resnet18", in_slices=3, out_channels=1, **kw):
        super().__init__()
        self.in_slices = in_slices
        self.encoder = nn.Sequential(nn.Conv2d(in_slices, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, out_channels, 1)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_slices:
            raise ValueError(f"Tiny2d expects (N, {self.in_slices}, H, W), got {tuple(x.shape)}")
        return self.head(self.encoder(x))


class NanModel(Tiny3d):
    def forward(self, x):
        return super().forward(x) * float("nan")


def builder(name, **kw):
    return {"mcgcn": Tiny2d, "ahnet": Tiny3d, "unet3d": Tiny3d, "nan": NanModel}[name](**kw)


def _cfg(tmp_path, name="run", **kw):
    base = dict(stage="3d", model="ahnet", encoder="resnet18", patch_size=[4, 16, 16], batch_size=2, epochs=2,
                steps_per_epoch=2, lr=1e-2, device="cpu", out=str(tmp_path / name), seed=3, val_patches=4)
    base.update(kw)
    return TrainConfig(**base)


def _data(cfg, n_train=6):
    return TinyPatches(n_train, cfg.patch_size, seed=cfg.seed), TinyPatches(4, cfg.patch_size, seed=cfg.seed + 1)


def test_run_folder_contents(tmp_path):
    cfg = _cfg(tmp_path)
    res = train(cfg, datasets=_data(cfg), builder=builder)
    run = tmp_path / "run"
    assert res["step"] == 4 and res["epoch"] == 2
    doc = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert doc["config"]["patch_size"] == [4, 16, 16] and "torch" in doc["versions"]
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["2", "4"]
    for col in ("loss", "lr", "skipped_steps", "samples_per_s", "val_dice"):
        assert rows[-1][col] != ""
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    assert (run / "progress.png").stat().st_size > 1000
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(run / "checkpoints" / name)
        for key in ("model", "model_name", "model_kwargs", "optimizer", "scaler", "scheduler", "epoch", "step",
                    "rng", "config", "metrics"):
            assert key in ck, key
        assert ck["model_name"] == "ahnet" and ck["model_kwargs"]["pfn_depth"] == 4
        torch.load(run / "checkpoints" / name, weights_only=True)
    # cosine schedule: the logged lr is the factor at the step reached
    assert float(rows[0]["lr"]) == pytest.approx(1e-2 * lr_factor(2, 4))


def test_a_finished_run_entered_again_keeps_its_record(tmp_path):
    cfg = _cfg(tmp_path)
    train(cfg, datasets=_data(cfg), builder=builder)
    record = (tmp_path / "run" / "config.json").read_bytes()
    time.sleep(1.1)                                  # a rewrite would carry another "created" second
    res = train(TrainConfig(**{**cfg.to_dict(), "resume": True}), datasets=_data(cfg), builder=builder)
    assert res["step"] == 4 and (tmp_path / "run" / "config.json").read_bytes() == record


def _all_tensors(ck):
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"train_model.{k}": v for k, v in ck.get("train_model", {}).items()})
    for pid, st in ck["optimizer"]["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = v
    return out


@pytest.mark.parametrize("ckpt_every, crash_at, ema", [(1, 3, 0.0), (2, 3, 0.0), (0, 4, 0.0), (1, 3, 0.9)])
def test_resume_is_exact(tmp_path, ckpt_every, crash_at, ema):
    """A run interrupted after step k and resumed equals a run never interrupted, tensor for tensor (with a
    weight average too: the average and the trained weights both)."""
    ref_cfg = _cfg(tmp_path, "ref", epochs=2, steps_per_epoch=3, ckpt_every=ckpt_every, ema_decay=ema)
    ref = train(ref_cfg, datasets=_data(ref_cfg), builder=builder)

    cut_cfg = _cfg(tmp_path, "cut", epochs=2, steps_per_epoch=3, ckpt_every=ckpt_every, ema_decay=ema)

    class Crash(Exception):
        pass

    def crash(step):
        if step == crash_at:
            raise Crash

    with pytest.raises(Crash):
        train(cut_cfg, datasets=_data(cut_cfg), builder=builder, on_step=crash)
    with pytest.raises(TrainError, match="pass --resume"):
        train(cut_cfg, datasets=_data(cut_cfg), builder=builder)
    res = train(TrainConfig(**{**cut_cfg.to_dict(), "resume": True}), datasets=_data(cut_cfg), builder=builder)
    assert res["step"] == ref["step"] == 6

    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert any(k.startswith("train_model.") for k in ta) == (ema > 0)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    drop = ("samples_per_s", "seconds", "val_seconds")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in a["metrics"]["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in b["metrics"]["history"]]


def test_weight_average_equals_a_direct_computation():
    # a Linear + BatchNorm model whose weights jump to new values before each update: the average must equal
    # avg_k = d_k avg_(k-1) + (1 - d_k) w_k with d_k = min(decay, (1 + k) / (10 + k)), integer buffers copied
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightAverage(model, 0.8)
    want = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for k in range(6):
        with torch.no_grad():
            for v in model.state_dict().values():
                v.copy_(torch.randn_like(v.double()).to(v.dtype) if v.is_floating_point() else v + 1)
        ema.update(k)
        d = min(0.8, (1 + k) / (10 + k))
        want = {n: d * a + (1 - d) * model.state_dict()[n].double() for n, a in want.items()}
    got = ema.module.state_dict()
    for n, v in want.items():
        torch.testing.assert_close(got[n].double(), v, rtol=1e-6, atol=1e-6)
    assert int(got["1.num_batches_tracked"]) == int(model.state_dict()["1.num_batches_tracked"]) == 6
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_weight_averaged_run_validates_and_saves_the_average(tmp_path):
    cfg = _cfg(tmp_path, ema_decay=0.5)
    train(cfg, datasets=_data(cfg), builder=builder)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck.keys() >= {"model", "train_model"} and ck["config"]["ema_decay"] == 0.5
    differ = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, ck["train_model"][k])]
    assert differ                  # "model" (what inference and transfer load) is the average, not the weights


def test_max_steps_then_resume_is_exact(tmp_path):
    ref_cfg = _cfg(tmp_path, "ref", epochs=2, steps_per_epoch=3)
    train(ref_cfg, datasets=_data(ref_cfg), builder=builder)
    cfg = _cfg(tmp_path, "cut", epochs=2, steps_per_epoch=3, max_steps=4)
    res = train(cfg, datasets=_data(cfg), builder=builder)
    assert res["step"] == 4 and "max-steps" in res["stopped"]
    # the CLI path: --resume reads the run's config.json and does not inherit --max-steps
    cfg2, _ = load_config(["--resume", "--out", cfg.out])
    assert cfg2.max_steps is None and cfg2.steps_per_epoch == 3
    train(cfg2, datasets=_data(cfg), builder=builder)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for k, v in _all_tensors(a).items():
        assert torch.equal(v, _all_tensors(b)[k]), k


def test_resume_refuses_changed_batch_size(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1)
    train(cfg, datasets=_data(cfg), builder=builder)
    with pytest.raises(TrainError, match="batch_size was 2"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True, "batch_size": 3, "max_steps": None}),
              datasets=_data(cfg), builder=builder)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    cfg = _cfg(tmp_path, model="unet3d", max_bad_steps=3, epochs=3, steps_per_epoch=4)

    def nan_builder(name, **kw):
        return NanModel(**kw)

    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses or gradients in a row.*lower --lr.*--amp bf16"):
        train(cfg, datasets=_data(cfg), builder=nan_builder)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "log.csv").exists()


def test_an_epoch_whose_every_step_was_skipped_stops_the_run_unsaved(tmp_path):
    """Fewer bad steps than --max-bad-steps, but none of the epoch's steps trained: not a success."""
    cfg = _cfg(tmp_path, model="unet3d", max_bad_steps=20, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"every step of epoch 1 \(2\) had a non-finite loss"):
        train(cfg, datasets=_data(cfg), builder=lambda name, **kw: NanModel(**kw))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "log.csv").exists()


def test_one_bad_step_is_skipped_and_counted(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, steps_per_epoch=3)
    calls = {"n": 0}

    class Flaky(Tiny3d):
        def forward(self, x):
            calls["n"] += 1
            out = super().forward(x)
            return out * float("inf") if calls["n"] == 2 else out

    model_ref = {}

    def b(name, **kw):
        model_ref["m"] = Flaky(**kw)
        return model_ref["m"]

    res = train(cfg, datasets=(_data(cfg)[0], None), builder=b)
    assert res["skipped_total"] == 1
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert rows[0]["skipped_steps"] == "1" and rows[0]["val_dice"] == ""
    assert all(torch.isfinite(p).all() for p in model_ref["m"].parameters())


class _InfGradOnce(torch.autograd.Function):
    """Identity forward; an infinite gradient on the backward of the chosen call (the loss stays finite)."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _InfGradOnce.calls += 1
        return g * float("inf") if _InfGradOnce.calls == 2 else g


def test_an_infinite_gradient_under_a_finite_loss_is_skipped(tmp_path):
    """Without a GradScaler (bf16, fp32) one inf gradient would write inf into Adam's moments and every weight:
    the step is skipped and counted, and the weights stay finite."""
    cfg = _cfg(tmp_path, epochs=1, steps_per_epoch=3)
    _InfGradOnce.calls = 0
    model_ref = {}

    class Spiky(Tiny3d):
        def forward(self, x):
            h = _InfGradOnce.apply(self.encoder(x))
            return self.head(self.drop(h))

    def b(name, **kw):
        model_ref["m"] = Spiky(**kw)
        return model_ref["m"]

    res = train(cfg, datasets=(_data(cfg)[0], None), builder=b)
    assert _InfGradOnce.calls == 3
    assert res["skipped_total"] == 1 and res["history"][0]["loss"] is not None
    assert all(torch.isfinite(p).all() for p in model_ref["m"].parameters())


def test_cpu_bf16_autocast_path(tmp_path):
    cfg = _cfg(tmp_path, amp="bf16", epochs=1)
    res = train(cfg, datasets=_data(cfg), builder=builder)
    assert res["history"][0]["loss"] is not None and res["skipped_total"] == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["amp"] == "bf16"


def test_channels_last_run_matches_the_plain_run(tmp_path):
    """--channels-last stores the same values in another order: the same losses up to float rounding (the
    gradients' equality is tests/nets/test_levers.py's), and its checkpoint loads into a plain model."""
    def real(name, **kw):
        from ahnet.nets import AHNet3d
        return AHNet3d("resnet18", pfn_depth=2, growth=4, layers_per_block=1, z_pool="none")

    runs = {}
    for cl in (False, True):
        cfg = _cfg(tmp_path, f"cl{cl}", epochs=1, patch_size=[4, 32, 32], channels_last=cl, lr=1e-3)
        runs[cl] = train(cfg, datasets=_data(cfg), builder=real)
    assert runs[True]["history"][0]["loss"] == pytest.approx(runs[False]["history"][0]["loss"], rel=1e-4)
    b = load_checkpoint(tmp_path / "clTrue" / "checkpoints" / "last.pt")["model"]
    real("ahnet").load_state_dict(b)


def test_channels_last_is_refused_for_the_2d_stage(tmp_path):
    cfg = _cfg(tmp_path, stage="2d", model="mcgcn", patch_size=[3, 16, 16], channels_last=True)
    with pytest.raises(TrainError, match="--channels-last is a lever of the 3D stage"):
        train(cfg, datasets=_data(cfg), builder=builder)


def test_amp_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp("auto", cpu).dtype is None
    a = resolve_amp("auto", cuda)
    assert a.dtype == torch.float16 and a.scaler
    assert resolve_amp("bf16", cpu).dtype == torch.bfloat16 and not resolve_amp("bf16", cpu).scaler
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", cpu)


def test_2d_stage_slices_as_channels_and_middle_label(tmp_path):
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 1, 3, 4, 4)
    lab = torch.zeros(2, 1, 3, 4, 4)
    lab[:, :, 1] = 1
    x, y = split_batch_2d(img, lab)
    assert x.shape == (2, 3, 4, 4) and torch.equal(x[:, 1], img[:, 0, 1])
    assert y.shape == (2, 1, 4, 4) and bool((y == 1).all())
    cfg = _cfg(tmp_path, stage="2d", model=None, patch_size=[3, 16, 16])
    res = train(cfg, datasets=_data(cfg), builder=builder)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["model_name"] == "mcgcn" and ck["model_kwargs"]["in_slices"] == 3 and res["step"] == 4


def test_encoder_learning_rate_group(tmp_path):
    cfg = _cfg(tmp_path, lr=1e-3, lr_encoder=1e-4).resolved()
    opt = make_optimizer(Tiny3d(), cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoder"]["lr"] == 1e-4 and groups["decoder"]["lr"] == 1e-3
    assert len(groups["encoder"]["params"]) == 4   # conv w, b, bn w, b
    res = train(TrainConfig(**{**cfg.to_dict(), "epochs": 1}), datasets=_data(cfg), builder=builder)
    row = res["history"][0]
    assert row["lr_encoder"] == pytest.approx(row["lr"] / 10)


def test_schedules():
    assert lr_factor(0, 100) == 1.0 and lr_factor(100, 100) == pytest.approx(0.01)
    assert lr_factor(50, 100) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(50, 100, "poly") == pytest.approx(0.5 ** 0.9)
    assert lr_factor(0, 100, warmup=10) == pytest.approx(0.01) and lr_factor(10, 100, warmup=10) == 1.0
    assert lr_factor(7, 100, "constant") == 1.0


def test_sampler_is_a_function_of_seed_and_epoch():
    s = EpochSampler(5, num_samples=12, seed=1)
    s.set_epoch(2)
    a = list(s)
    assert len(a) == 12 and sorted(a[:5]) == list(range(5))
    s2 = EpochSampler(5, num_samples=12, seed=1)
    s2.set_epoch(2, start=4)
    assert list(s2) == a[4:]
    s.set_epoch(3)
    assert list(s) != a


def test_patch_size_must_fit_the_model(tmp_path):
    cfg = _cfg(tmp_path, patch_size=[4, 18, 16])
    with pytest.raises(TrainError, match=r"must divide by \(1, 4, 4\); try --patch-size 4 20 16"):
        train(cfg, datasets=_data(cfg), builder=builder)


def test_missing_init_from_is_one_sentence(tmp_path):
    c3 = _cfg(tmp_path, "r3e", init="transfer", init_from=str(tmp_path / "nope"))
    with pytest.raises(TrainError, match=r"--init-from: run .*nope not found"):
        train(c3, datasets=_data(c3), builder=builder)


def _fake_transfer(monkeypatch, ok=True):
    """Stand-ins for the transfer rule (the Tiny2d checkpoint is no ResNet): record what train passes."""
    import types
    import ahnet.train.model as M
    seen = {}

    def load_source(path):
        seen["path"] = str(path)
        return types.SimpleNamespace(depth=18, meta={"model_name": "mcgcn", "step": 2})

    def transfer_and_verify(source, **kw):
        seen["kw"] = kw
        row = types.SimpleNamespace(ok=ok, check="(b) encoder", stage="layer4", shape=(1,), max_abs_value=1.0,
                                    err_float32=0.0 if ok else 1.0, err_float64=0.0)
        return Tiny3d(**kw), [row]

    monkeypatch.setattr(M, "load_source", load_source)
    monkeypatch.setattr(M, "transfer_and_verify", transfer_and_verify)
    return seen


def test_transfer_reads_the_2d_checkpoint_and_prints_the_check(tmp_path, monkeypatch, capsys):
    c2 = _cfg(tmp_path, "r2d", stage="2d", model=None, patch_size=[3, 16, 16], epochs=1)
    train(c2, datasets=_data(c2), builder=builder)
    seen = _fake_transfer(monkeypatch)
    c3 = _cfg(tmp_path, "r3d", init="transfer", init_from=str(tmp_path / "r2d"), pfn_depth=2, lr_encoder=1e-4,
              epochs=1)
    train(c3, datasets=_data(c3), builder=builder)
    assert seen["path"].endswith("r2d/checkpoints/best.pt")
    assert seen["kw"]["pfn_depth"] == 2 and seen["kw"]["encoder"] == "resnet18"
    assert "transfer check" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "r3d" / "checkpoints" / "last.pt")
    assert ck["init"] == {"init": "transfer", "from": seen["path"], "from_step": 2} and ck["model_name"] == "ahnet"


def test_an_inexact_transfer_stops_before_the_run_starts(tmp_path, monkeypatch, capsys):
    c2 = _cfg(tmp_path, "r2d", stage="2d", model=None, patch_size=[3, 16, 16], epochs=1)
    train(c2, datasets=_data(c2), builder=builder)
    _fake_transfer(monkeypatch, ok=False)
    c3 = _cfg(tmp_path, "r3d", init="transfer", init_from=str(tmp_path / "r2d"), epochs=1)
    with pytest.raises(TrainError, match="is not exact"):
        train(c3, datasets=_data(c3), builder=builder)
    assert "FAIL" in capsys.readouterr().out and not (tmp_path / "r3d").exists()


def test_all_folds_write_one_run_each(tmp_path, monkeypatch):
    import ahnet.train.loop as L
    seen = []

    def fake_train(cfg, **kw):
        seen.append((cfg.fold, cfg.out))
        return {}

    monkeypatch.setattr(L, "train", fake_train)
    L.train_all_folds(_cfg(tmp_path, "cv", folds=3))
    assert seen == [(f, str(tmp_path / f"cv-fold{f}")) for f in range(3)]
    with pytest.raises(TrainError, match="--folds K"):
        train_all_folds(_cfg(tmp_path))


def test_help_mentions_every_flag(capsys):
    text = build_parser().format_help()
    for flag in ("--stage", "--model", "--pfn-depth", "--init", "--init-from", "--encoder", "--imagenet-weights",
                 "--patch-size", "--batch-size", "--epochs", "--steps-per-epoch", "--lr", "--lr-encoder", "--loss",
                 "--amp", "--fold", "--folds", "--all-folds", "--resume", "--config", "--out", "--seed", "--data",
                 "--num-workers", "--device"):
        assert flag in text, flag


def test_main_reports_errors_in_one_line(tmp_path, capsys):
    rc = main(["--stage", "2d", "--model", "ahnet", "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model ahnet is trained by --stage 3d, not --stage 2d" in err[0]
