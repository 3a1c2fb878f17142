"""The bench's sections beside the MONAI comparison: --preset (a preset's training step, its validation, the levers
alone, the depth guard per conv call) and --scans (whole scans, ours against MONAI's inferer): their options,
their plans, their rows, and the workers on tiny inputs (what they measure, not how fast)."""
import pytest
import torch

from ahnet.bench import report
from ahnet.bench.plan import parse_levers
from ahnet.commands import bench as cli


@pytest.mark.parametrize("argv, words", [
    (["--preset", "cpu"], "--preset cpu needs --data DATASET.json"),
    (["--preset", "cpu", "--data", "nowhere.json"], "needs --data DATASET.json"),
    (["--scans", "--scan-shapes", "40x0x192"], "a scan size is three positive sizes"),
    (["--scans", "--scan-shapes", "40x192"], "a scan size is three positive sizes"),
    (["--levers", "fused=maybe"], "unknown lever 'fused=maybe'"),
])
def test_bad_section_options_are_one_error_line(argv, words, capsys, no_measurement):
    try:
        code = cli.main(["--device", "cpu", *argv])
    except SystemExit as e:                  # the parser's own refusals (a bad --scan-shapes) exit there
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.bench: error: ") and words in err[0], err


def test_our_switched_levers_are_parsed_and_kept_from_monai():
    lv = parse_levers(["channels_last+fused=off", "guard=float32", "zpool=maxpool+channels_last"])
    assert lv == [{"channels_last": True, "fused": "off"}, {"guard": "float32"},
                  {"zpool": "maxpool", "channels_last": True}]
    from ahnet.bench.plan import peer_levers
    assert [peer_levers(v) for v in lv] == [{"channels_last": True}, {}, {"channels_last": True}]


def test_scans_plan_pairs_each_size_with_monai_and_the_levers_alone():
    args = cli.parse_args(["--scans", "--scan-shapes", "40x192x192", "120x512x512"])
    plan = [spec for _, spec in cli.scans_plan(args)]
    got = [(s["impl"], tuple(s["shape"]), s["workers"], s.get("fold", True)) for s in plan]
    assert got == [("ours", (40, 192, 192), 2, True), ("monai", (40, 192, 192), 1, True),
                   ("ours", (40, 192, 192), 1, True), ("ours", (120, 512, 512), 2, True),
                   ("monai", (120, 512, 512), 1, True), ("ours", (120, 512, 512), 1, True),
                   ("ours", (40, 192, 192), 2, False), ("ours", (300, 512, 512), 2, True),
                   ("monai", (300, 512, 512), 1, True)]
    assert {s["threads"] for s in plan} == {2} and {tuple(s["window"]) for s in plan} == {(32, 128, 128)}


def test_scan_rows_put_our_stages_against_monais_inferer():
    ours = {"shape": [40, 192, 192], "windows": 8, "workers": 2, "first_stage_s": 2.0, "windows_s": 1.5,
            "candidates_s": 0.5, "candidates": 50, "second_stage_s": 0.5, "total_s": 2.5, "peak_mb": 300.0}
    monai = {"total_s": 5.0, "peak_mb": 600.0}
    rows = report.summarise([{"spec": {"kind": "scan", "impl": "ours", "shape": [40, 192, 192], "workers": 2},
                              "result": ours},
                             {"spec": {"kind": "scan", "impl": "monai", "shape": [40, 192, 192], "workers": 1},
                              "result": monai}])
    by = {r[0].split(": ", 1)[1]: r for r in rows}
    assert by["first stage (windows + candidates) vs MONAI's inferer"][3] == pytest.approx(0.4)
    assert by["both stages vs MONAI's inferer"][3] == pytest.approx(0.5)
    assert by["peak memory"][3] == pytest.approx(0.5) and by["second stage"][1] == 0.5


def test_scan_worker_runs_both_stages_on_a_small_scan():
    """One window's scan through ours: the 60 painted blobs give candidates up to the rule's cap of 50, each stage
    is timed."""
    from ahnet.bench.scans import work_scan

    threads = torch.get_num_threads()
    try:
        res = work_scan({"impl": "ours", "shape": [32, 128, 128], "window": [32, 128, 128], "overlap": 0.5,
                         "sw_batch": 2, "dtype": "bf16", "channels_last": True, "threads": 1, "workers": 2})
    finally:
        torch.set_num_threads(threads)
    assert res["windows"] == 1 and 30 <= res["candidates"] <= 50      # blobs closer than 5 mm are one candidate
    assert res["total_s"] == pytest.approx(res["windows_s"] + res["candidates_s"] + res["second_stage_s"])
    assert res["peak_mb"] >= 0 and res["fold"] is True          # a high-water mark: 0 in a process that was larger


@pytest.mark.parametrize("z, depth", [(2.5, 16), (5.0, 8)])
def test_preset_plan_trains_the_experiments_configs_at_the_datas_slice_spacing(tmp_path, z, depth):
    """--preset plans each variant's step exactly as the experiment configures it (transfer timed as scratch), with
    the 3D patch over the same depth in mm as the experiment gives that slice spacing."""
    import json
    import numpy as np
    from ahnet.commands.presets import PRESETS, at_slice_spacing, variant_config
    from ahnet.data.io import write_image
    from ahnet.paths import ExperimentPaths

    scan = np.random.default_rng(0).integers(-1000, 400, size=(4, 16, 16)).astype(np.int16)
    write_image(tmp_path / "c.nii.gz", scan, spacing=(z, 0.7, 0.7))
    js = tmp_path / "dataset.json"
    js.write_text(json.dumps({"training": [{"image": "c.nii.gz", "case_id": "c"}]}))
    args = cli.parse_args(["--preset", "cpu", "--data", str(js), "--out", str(tmp_path / "o"),
                           "--preset-variants", "ahnet-transfer", "unet3d-scratch", "--preset-parts", "profile"])
    plan = cli.preset_plan(args)
    assert [(k, s["variant"], s["guard"]) for k, s in plan] == [("step", "ahnet-transfer", "pad"),
                                                                ("step", "unet3d-scratch", "pad")]
    preset = at_slice_spacing(PRESETS["cpu"], z)
    want = variant_config("ahnet-scratch", 0, preset, js, ExperimentPaths("bench-cpu"), 0, "cpu", [z, 0.7, 0.7])
    assert plan[0][1]["config"] == want.to_dict() and want.patch_size == [depth, 64, 64]
    with pytest.raises(ValueError, match="--preset-variants mcgcn-2d is not a 3D training"):
        cli.preset_plan(cli.parse_args(["--preset", "cpu", "--data", str(js), "--preset-variants", "mcgcn-2d"]))


def test_guard_calls_worker_finds_the_depth_two_convolutions():
    """The cpu preset's U-Net kind at 16 x 64 x 64 (spacing z-pooling): the guard bites at the 3 x 3 x 3 convs of
    the depth-2 level only (two in the encoder unit, two in the decoder unit), each timed under every guard."""
    from ahnet.bench.preset import work_guard_calls
    from ahnet.train.config import TrainConfig

    cfg = TrainConfig.from_dict(dict(stage="3d", model="unet3d", patch_size=[16, 64, 64], batch_size=2,
                                     amp="bf16", channels_last=True, data="unused.json",
                                     model_kwargs={"base_channels": 4, "z_pool": "spacing",
                                                   "spacing": [2.5, 0.7, 0.7]})).resolved()
    res = work_guard_calls({"variant": "unet3d", "config": cfg.to_dict(), "repeats": 1})
    assert [c["conv"] for c in res["calls"]] == ["down.4.0", "down.4.3", "up_units.4.0", "up_units.4.3"]
    assert all(c["input"][2] == 2 and c["kernel"] == [3, 3, 3] for c in res["calls"])
    assert all(res["totals"][f"{m}_s"] > 0 for m in ("off", "float32", "pad", "wgrad_fp32"))


def test_notes_block_is_replaced_between_its_markers_only(tmp_path):
    notes = tmp_path / "performance.md"
    notes.write_text("# title\n<!-- bench:scans -->\nold table\n<!-- /bench:scans -->\ntext after\n"
                     "<!-- bench:models -->\nkept\n<!-- /bench:models -->\n")
    rows = [("scan 40x192x192 (8 windows), 2 worker(s): total", 2.5, 5.0, 0.5, "s")]
    ctx = {"commit": "abc1234", "date": "2026-12-06", "load_average": [1.0, 1.0, 1.0]}
    block = report.markdown_block(rows, "scans", "python -m ahnet.bench --scans", {"device_name": "AMD EPYC",
                                  "cpu_count": 2, "torch": "2.13.0", "monai": "1.6.1"}, ctx, ctx)
    assert report.update_notes(notes, "scans", block)
    text = notes.read_text()
    assert "old table" not in text and "| scan 40x192x192 (8 windows), 2 worker(s): total | 2.5 | 5 | 0.5 | s |" in text
    assert "`python -m ahnet.bench --scans` at commit `abc1234`, 2026-12-06, on AMD EPYC (2 cores)" in text
    assert text.startswith("# title\n") and "text after\n<!-- bench:models -->\nkept\n" in text
    assert not report.update_notes(notes, "preset", block)


def test_the_notes_state_the_command_without_the_local_output_folder():
    from ahnet.commands.bench import notes_command
    assert notes_command(["--scans", "--out", "/tmp/x", "--notes", "n.md", "--out=/y"]) == \
        "python -m ahnet.bench --scans --notes n.md"


def test_each_measurement_is_on_disk_as_soon_as_it_is_made(tmp_path, monkeypatch):
    """A bench killed during its last (longest) measurement keeps the others: the JSON is rewritten after each."""
    import json
    from types import SimpleNamespace

    import torch

    from ahnet.commands import bench
    seen = []

    def worker(spec, timeout):
        if seen:                                          # the second measurement: the first is already on disk
            doc = json.loads(path.read_text())
            assert doc["complete"] is False and [r["result"] for r in doc["results"]] == [{"s": 1}]
        seen.append(spec["n"])
        return {"s": spec["n"]}
    monkeypatch.setattr(bench, "run_worker", worker)
    args = SimpleNamespace(out=str(tmp_path), worker=None)
    path = tmp_path / "b.json"
    plan = [("model", {"n": 1}), ("model", {"n": 2})]
    results = bench.run_plan(plan, 1, 10.0, lambda done: bench.write_results(args, torch.device("cpu"), done, [], 0.0,
                                                                            {}, path, complete=False))
    assert seen == [1, 2] and len(json.loads(path.read_text())["results"]) == 2 and len(results) == 2


def test_a_failed_measurement_exits_1_and_leaves_the_notes_alone(tmp_path, monkeypatch, capsys):
    """Workers that fail (here: error replies) must not put a table of errors into the notes: one line on
    stderr, exit 1, the notes unchanged, the results JSON on disk with every measurement."""
    import json

    from ahnet.commands import bench
    notes = tmp_path / "performance.md"
    notes.write_text("<!-- bench:scans -->\nold table\n<!-- /bench:scans -->\n")
    monkeypatch.setattr(bench, "run_worker", lambda spec, timeout: {"error": ["KeyError: 'scan'"]})
    n = len(bench.scans_plan(bench.parse_args(["--scans", "--scan-shapes", "8x16x16"])))
    code = bench.main(["--device", "cpu", "--scans", "--scan-shapes", "8x16x16", "--out", str(tmp_path / "o"),
                       "--notes", str(notes)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"{n} of {n} measurements failed" in err[0] and "KeyError" in err[0], err
    assert notes.read_text() == "<!-- bench:scans -->\nold table\n<!-- /bench:scans -->\n"
    doc = json.loads(next((tmp_path / "o").glob("bench-*.json")).read_text())
    assert doc["complete"] is True and len(doc["results"]) == n


def test_validation_worker_measures_prediction_and_candidates_apart(tmp_path):
    """The validation of an epoch split into its parts on the same cases: the CPM the validator gives, predict and
    candidates each timed, the rest by difference (so the three add up to the validation)."""
    from ahnet.bench.preset import work_validation
    from ahnet.train.config import TrainConfig

    from ..data._pipeline_synth import TINY_UNET, make_dataset
    js, _ = make_dataset(tmp_path / "ds", n_cases=2, shape=(12, 48, 48), empty_cases=())
    cfg = TrainConfig.from_dict(dict(stage="3d", model="unet3d", patch_size=[4, 32, 32], batch_size=1,
                                     data=str(js), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "r"),
                                     validation="cpm", model_kwargs=TINY_UNET)).resolved()
    res = work_validation({"variant": "unet3d-scratch", "config": cfg.to_dict()})
    assert res["cases"] == 1 and 0.0 <= res["cpm"] <= 1.0 and "first_pass_s" not in res
    assert res["predict_s"] > 0 and res["candidates_s"] > 0
    assert res["rest_s"] == pytest.approx(res["validation_s"] - res["predict_s"] - res["candidates_s"])
    rows = report._preset_rows([{"spec": {"kind": "validation"}, "result": res}])
    assert [r[0] for r in rows][:3] == ["validation unet3d-scratch (1 cases, untrained weights): validation",
                                        "validation unet3d-scratch (1 cases, untrained weights): validation_cpu",
                                        "validation unet3d-scratch (1 cases, untrained weights): predict"]
