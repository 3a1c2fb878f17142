import json

import pytest

from ahnet import experiment
from ahnet.experiment import ALL_VARIANTS, PRESETS, Preset, parse_variant, train_argv


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


def test_train_flags(tmp_path):
    p = PRESETS["demo"]
    argv = train_argv("ahnet-transfer-pfn2", p, tmp_path / "d/dataset.json", tmp_path / "runs", 3, "cpu",
                      [2.5, 0.7, 0.7])
    assert argv[argv.index("--pfn-depth") + 1] == "2"
    assert argv[argv.index("--init-from") + 1] == str(tmp_path / "runs/mcgcn-2d")
    assert json.loads(argv[argv.index("--model-kwargs") + 1]) == {"z_pool": "spacing", "spacing": [2.5, 0.7, 0.7]}
    argv2d = train_argv("mcgcn-2d", p, tmp_path / "d/dataset.json", tmp_path / "runs", 3, "cpu", [2.5, .7, .7])
    assert argv2d[argv2d.index("--stage") + 1] == "2d" and "--pfn-depth" not in argv2d


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
