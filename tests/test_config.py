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
