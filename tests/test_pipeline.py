"""python -m ahnet.pipeline: flag mapping onto the two stages, and a CPU-tiny end-to-end run."""
import json

import pytest

from ahnet.checkpoint import load_checkpoint
from ahnet.commands.pipeline import build_parser, main, stage_configs

from .data._pipeline_synth import make_dataset


def test_flags_map_onto_both_stages(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"common": {"batch_size": 5}, "3d": {"pfn_depth": 1, "lr": 7e-4}}))
    args = build_parser().parse_args([
        "--name", "exp", "--runs-dir", str(tmp_path), "--config", str(f), "--encoder", "resnet34", "--seed", "4",
        "--epochs-2d", "3", "--epochs-3d", "5", "--lr-2d", "1e-3", "--lr-encoder", "1e-5", "--patch-2d", "64", "64",
        "--patch-3d", "8", "64", "64", "--pfn-depth", "2", "--model-kwargs-3d", '{"z_pool": "none"}',
        "--channels-last", "--amp", "bf16"])
    c2, c3 = stage_configs(args)
    assert (c2.stage, c2.model, c2.out) == ("2d", "mcgcn", str(tmp_path / "exp-2d"))
    assert (c3.stage, c3.model, c3.init, c3.init_from) == ("3d", "ahnet", "transfer", str(tmp_path / "exp-2d"))
    assert c3.out == str(tmp_path / "exp-3d")
    assert c2.encoder == c3.encoder == "resnet34" and c2.seed == c3.seed == 4
    assert c2.batch_size == c3.batch_size == 5                        # common section of the file
    assert (c2.epochs, c3.epochs, c2.lr, c3.lr, c3.lr_encoder) == (3, 5, 1e-3, 7e-4, 1e-5)
    assert c2.patch_size == [3, 64, 64] and c3.patch_size == [8, 64, 64]
    assert c3.pfn_depth == 2                                          # flag beats file
    assert c3.model_kwargs == {"z_pool": "none"}
    assert c3.channels_last and not c2.channels_last                  # a 3D-stage lever only
    assert c2.amp == c3.amp == "bf16"


def test_bad_config_sections(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"lr": 1}))
    assert main(["--config", str(f)]) == 2
    assert "top-level keys must be common, 2d, 3d" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path, capsys):
    js, _ = make_dataset(tmp_path / "ds", n_cases=3, shape=(12, 48, 48))
    argv = ["--name", "demo", "--runs-dir", str(tmp_path / "runs"), "--encoder", "resnet18", "--data", str(js),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--batch-size", "2", "--steps-per-epoch", "1",
            "--val-patches", "1", "--epochs-2d", "1", "--epochs-3d", "1", "--patch-2d", "32", "32",
            "--patch-3d", "4", "32", "32", "--pfn-depth", "1", "--model-kwargs-3d", '{"z_pool": "none"}']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "transfer check" in out and "FAIL" not in out
    ck3 = load_checkpoint(tmp_path / "runs" / "demo-3d" / "checkpoints" / "last.pt")
    assert ck3["model_name"] == "ahnet" and ck3["init"]["from"].endswith("demo-2d/checkpoints/best.pt")
    # a second call with --resume finds both stages finished
    assert main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "2D stage already finished" in out and "3D stage already finished" in out
    # without --resume the existing runs are not overwritten
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
