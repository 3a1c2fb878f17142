import json

import pytest

from ahnet import experiment
from ahnet.config import load_config
from ahnet.experiment import ALL_VARIANTS, PRESETS, Preset, command_line, parse_variant, variant_config


def test_parse_variant():
    assert parse_variant("mcgcn-2d") == ("mcgcn", "2d", None)
    assert parse_variant("ahnet-transfer") == ("ahnet", "transfer", 4)
    assert parse_variant("ahnet-transfer-pfn0") == ("ahnet", "transfer", 0)
    assert parse_variant("unet3d-scratch") == ("unet3d", "scratch", 4)
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("vnet-scratch")
    with pytest.raises(ValueError, match="no 2D counterpart"):
        parse_variant("unet3d-transfer")


def test_every_preset_variant_is_valid_and_cpu_preset_runs_the_papers_comparisons():
    for preset in PRESETS.values():
        for v in preset.variants:
            parse_variant(v)
    assert set(PRESETS["cpu"].variants) == set(ALL_VARIANTS)


def test_variant_configs_and_their_printed_commands(tmp_path):
    p = PRESETS["demo"]
    js = tmp_path / "d" / "dataset.json"
    cfg = variant_config("ahnet-transfer-pfn2", p, js, tmp_path / "runs", 3, "cpu", [2.5, 0.7, 0.7])
    assert (cfg.stage, cfg.model, cfg.init, cfg.pfn_depth) == ("3d", "ahnet", "transfer", 2)
    assert cfg.init_from == str(tmp_path / "runs/mcgcn-2d") and cfg.cache_dir == "data/cache/d"
    assert cfg.model_kwargs == {"z_pool": "spacing", "spacing": [2.5, 0.7, 0.7]}
    c2d = variant_config("mcgcn-2d", p, js, tmp_path / "runs", 3, "cpu", [2.5, .7, .7])
    assert (c2d.stage, c2d.model, c2d.patch_size) == ("2d", "mcgcn", p.patch_2d)
    cun = variant_config("unet3d-scratch", p, js, tmp_path / "runs", 3, "cpu", [2.5, .7, .7])
    for c in (cfg, c2d, cun):                     # the printed command trains exactly this configuration
        cmd = command_line(c).split(" ", 3)
        assert cmd[:3] == ["python", "-m", "ahnet.train"]
        import shlex
        assert load_config(shlex.split(cmd[3]))[0].resolved() == c


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path, monkeypatch):
    """The demo's chain on a tiny phantom: data -> 2D -> transfer -> 3D -> report (what `run.sh demo` runs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    tiny = Preset(cases=4, size=96, encoder="resnet18", patch_2d=[3, 64, 64], batch_2d=2, epochs_2d=1, steps_2d=2,
                  patch_3d=[16, 64, 64], batch_3d=1, epochs_3d=1, steps_3d=2, lr=1e-3,
                  variants=["ahnet-transfer"], window=[16, 96, 96])
    monkeypatch.setitem(PRESETS, "demo", tiny)
    assert experiment.main(["--preset", "demo", "--bootstrap", "20", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "runs/phantom-demo/report/report.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {"mcgcn-2d", "ahnet-transfer"}
    assert (tmp_path / "runs/phantom-demo/report/report.html").is_file()
    # a second call resumes: nothing is retrained, the report is rebuilt
    assert experiment.main(["--preset", "demo", "--bootstrap", "20", "--device", "cpu"]) == 0
