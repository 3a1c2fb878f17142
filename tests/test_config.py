"""TrainConfig layering: defaults < --config FILE < flags; validation messages; config.json contents."""
import json

import pytest

from ahnet.train.config import TrainConfig, build_parser, load_config, read_run_config, save_run_config


def test_layers_defaults_then_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 1e-2, "batch_size": 7, "pfn-depth": 2, "patch_size": [8, 32, 32]}))
    cfg, _ = load_config(["--config", str(f), "--lr", "5e-4"])
    assert cfg.lr == 5e-4                 # flag beats file
    assert cfg.batch_size == 7            # file beats default
    assert cfg.pfn_depth == 2             # dash spelling accepted in files
    assert cfg.patch_size == [8, 32, 32]
    assert cfg.epochs == TrainConfig().epochs
    # a flag equal to the default still overrides the file
    cfg2, _ = load_config(["--config", str(f), "--batch-size", "2"])
    assert cfg2.batch_size == 2


def test_flag_types():
    cfg, _ = load_config(["--patch-size", "3", "32", "48", "--lr-encoder", "none", "--resume",
                          "--model-kwargs", '{"upsample": "transpose"}', "--fold", "1", "--folds", "3"])
    assert cfg.patch_size == [3, 32, 48] and cfg.lr_encoder is None and cfg.resume is True
    assert cfg.model_kwargs == {"upsample": "transpose"} and (cfg.fold, cfg.folds) == (1, 3)


def test_stage_defaults_resolved():
    c2 = TrainConfig(stage="2d").resolved()
    assert c2.model == "mcgcn" and c2.patch_size == [3, 128, 128]
    c3 = TrainConfig().resolved()
    assert c3.model == "ahnet" and c3.patch_size == [32, 128, 128]
    assert c3.cache_dir.endswith("cache/phantom")


@pytest.mark.parametrize("kw, msg", [
    ({"stage": "2d", "model": "ahnet"}, "--model ahnet is trained by --stage 3d, not --stage 2d"),
    ({"model": "mcgcn"}, "use --stage 2d"),
    ({"init": "transfer"}, "needs --init-from"),
    ({"init": "transfer", "init_from": "x", "model": "unet3d"}, "needs --stage 3d --model ahnet"),
    ({"stage": "2d", "patch_size": [4, 32, 32]}, "odd number of slices"),
    ({"fold": 1}, "needs --folds"),
    ({"fold": 3, "folds": 3}, "0 .. 2"),
    ({"encoder": "vgg"}, "encoder must be one of"),
    ({"patch_size": [32, 32]}, "three positive ints"),
])
def test_bad_combinations_name_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw).resolved()


def test_unknown_keys_and_bad_files(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        load_config(["--config", str(f)])
    g = tmp_path / "bad.json"
    g.write_text("{lr: 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(["--config", str(g)])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--amp", "fp8"])


def test_config_json_has_versions_and_round_trips(tmp_path):
    cfg = TrainConfig(lr=1e-3, patch_size=[3, 32, 32]).resolved()
    p = save_run_config(cfg, tmp_path / "run")
    doc = json.loads(p.read_text(encoding="utf-8"))
    for k in ("python", "torch", "cuda", "ahnet", "git"):
        assert k in doc["versions"]
    assert doc["config"]["lr"] == 1e-3
    # a saved config.json works as --config FILE and as the base of --resume
    cfg2, _ = load_config(["--config", str(p)])
    assert cfg2 == cfg
    assert read_run_config(tmp_path / "run")["patch_size"] == [3, 32, 32]
    cfg3, _ = load_config(["--resume", "--out", str(tmp_path / "run"), "--epochs", "99"])
    assert cfg3.lr == 1e-3 and cfg3.epochs == 99 and cfg3.resume


def test_pfn_depth_default_and_range_come_from_the_network():
    import inspect

    from ahnet.nets import AHNet3d
    from ahnet.nets.ahnet3d import PFN_DEPTH, PFN_DEPTH_RANGE
    from ahnet.train.config import LIMITS
    from weights_transfer.__main__ import build_parser as transfer_parser

    assert inspect.signature(AHNet3d).parameters["pfn_depth"].default == PFN_DEPTH == 4
    assert TrainConfig().resolved().pfn_depth == PFN_DEPTH and TrainConfig().pfn_depth is None
    assert LIMITS["pfn_depth"] == (*PFN_DEPTH_RANGE, False, False)
    assert transfer_parser().parse_args([]).pfn_depth == PFN_DEPTH
    lo, hi = PFN_DEPTH_RANGE
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=rf"--pfn-depth must be in \[{lo}, {hi}\], got {bad}"):
            TrainConfig(pfn_depth=bad).resolved()
        with pytest.raises(ValueError, match=f"pfn_depth must be between {lo} and {hi}"):
            AHNet3d("resnet18", pfn_depth=bad)
        with pytest.raises(SystemExit):
            transfer_parser().parse_args(["--pfn-depth", str(bad)])
    assert TrainConfig(pfn_depth=hi).resolved().pfn_depth == hi
    flag = next(a for a in build_parser()._actions if "--pfn-depth" in a.option_strings)
    assert f"{lo} .. {hi}" in flag.help and f"(default: {PFN_DEPTH}, the paper's, for --model ahnet" in flag.help


@pytest.mark.parametrize("kw", [{"model": "unet3d"}, {"stage": "2d", "model": "mcgcn"}])
def test_models_without_a_pyramid_refuse_pfn_depth(kw):
    assert TrainConfig(**kw).resolved().pfn_depth is None
    with pytest.raises(ValueError, match=f"--pfn-depth sets AH-Net's pyramid pooling and --model {kw['model']} "
                                         "has none; drop it"):
        TrainConfig(**kw, pfn_depth=2).resolved()


@pytest.mark.parametrize("kw, key, says", [
    ({}, "pfn_depth", "which --pfn-depth sets; give it there"),
    ({}, "encoder", "which --encoder sets"),
    ({}, "in_channels", "which training fixes at 1"),
    ({"model": "unet3d"}, "out_channels", "which training fixes at 1"),
    ({"stage": "2d"}, "encoder", "which --encoder sets"),
    ({"stage": "2d"}, "in_slices", "which the first --patch-size size sets"),
])
def test_model_kwargs_may_not_set_what_training_sets(kw, key, says):
    with pytest.raises(ValueError, match=f"--model-kwargs sets {key}, {says}"):
        TrainConfig(**kw, model_kwargs={key: 2, "z_pool": "none"}).resolved()


def test_model_kwargs_come_from_the_registry_entry():
    from ahnet.train.model import model_kwargs_for
    ahnet = TrainConfig(encoder="resnet18", pfn_depth=2, model_kwargs={"growth": 4}).resolved()
    assert model_kwargs_for(ahnet) == {"in_channels": 1, "out_channels": 1, "encoder": "resnet18", "pfn_depth": 2,
                                       "growth": 4}
    mcgcn = TrainConfig(stage="2d", encoder="resnet34", patch_size=[5, 64, 64]).resolved()
    assert model_kwargs_for(mcgcn) == {"out_channels": 1, "encoder": "resnet34", "in_slices": 5}
    unet = TrainConfig(model="unet3d", model_kwargs={"base_channels": 4}).resolved()
    assert model_kwargs_for(unet) == {"in_channels": 1, "out_channels": 1, "base_channels": 4}


def test_runs_of_earlier_versions_resume_without_the_pfn_depth_they_recorded(tmp_path):
    """Earlier versions wrote pfn_depth 4 into every run's config.json and checkpoints, U-Net and MC-GCN alike."""
    from ahnet.train.guard import check_resume
    cfg = TrainConfig(model="unet3d", out=str(tmp_path / "run")).resolved()
    p = save_run_config(cfg, tmp_path / "run")
    doc = json.loads(p.read_text(encoding="utf-8"))
    doc["config"]["pfn_depth"] = 4
    p.write_text(json.dumps(doc), encoding="utf-8")
    assert read_run_config(tmp_path / "run")["pfn_depth"] is None
    again, _ = load_config(["--resume", "--out", str(tmp_path / "run")])
    assert again.resolved().pfn_depth is None
    check_resume(doc["config"], cfg, "last.pt")                         # no "pfn_depth was 4 ... now None"
    with pytest.raises(ValueError, match="--pfn-depth sets AH-Net's pyramid pooling"):   # a file a person wrote
        TrainConfig.from_dict({"model": "unet3d", "pfn_depth": 4}).resolved()


def test_every_record_names_the_commit_git_names(monkeypatch):
    """One reader of git (ahnet.code_commit) for run configs, bench notes, the final set's looks and the thickness
    report: the hash git gives for this checkout, short and full; outside a checkout None and "unknown"."""
    import subprocess
    from pathlib import Path

    import ahnet
    root = Path(ahnet.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    c = ahnet.code_commit()
    assert c["commit"] == head.stdout.strip() and c["commit"].startswith(c["short"]) and len(c["short"]) >= 7
    assert ahnet.commit_label() in (c["short"], c["short"] + "+changes")
    assert ahnet.commit_label(with_changes=False) == c["short"]
    from ahnet.train.config import environment_info
    assert environment_info()["git"] == {"commit": c["commit"], "dirty": c["dirty"]}

    def no_git(*a, **k):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    assert ahnet.code_commit() is None and ahnet.commit_label() == "unknown"
