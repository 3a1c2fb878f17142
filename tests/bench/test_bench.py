"""ahnet.bench: the pieces that decide its numbers (the inference drivers' equivalence, the plan and its
like-for-like levers, lever parsing and wiring, the ratio table) and one real worker run in a subprocess."""
import json

import pytest
import torch

import ahnet.bench as bench
from ahnet.commands.bench import parse_args
from ahnet.bench import plan as bench_plan


class _WindowSensitive(torch.nn.Module):
    """Output depends on the whole window (x minus the window mean), so window placement matters."""

    def forward(self, x):
        return x - x.mean(dim=(2, 3, 4), keepdim=True)


def test_our_inference_driver_equals_monais_inferer_on_the_same_windows():
    """The inference rows compare like with like: ahnet.infer with uniform blending places the same windows
    and blends them as monai.inferers.sliding_window_inference (checked on a window-sensitive model)."""
    inferers = pytest.importorskip("monai.inferers")
    from ahnet.infer import sliding_window_predict
    from ahnet.bench.layout import from_monai_layout, to_monai_layout

    torch.manual_seed(0)
    vol = torch.rand(1, 1, 12, 40, 40)
    model = _WindowSensitive()
    ours = sliding_window_predict(model, vol, window=(8, 16, 16), overlap=0.5, batch_size=3, amp=False,
                                  blend="constant")
    theirs = inferers.sliding_window_inference(to_monai_layout(vol), (16, 16, 8), 3, model, overlap=0.5,
                                               mode="constant")
    assert torch.allclose(ours, torch.sigmoid(from_monai_layout(theirs)), atol=1e-6)


def _args(*argv):
    return parse_args(["--device", "cpu", *argv])


def test_plan_gives_monai_the_levers_it_can_take(monkeypatch):
    monkeypatch.setattr(bench_plan, "cpu_native_bf16", lambda: True)
    plan = bench.build_plan(_args("--modes", "trilinear", "--skip-2d", "--skip-data"), torch.device("cpu"))
    models = [(s["impl"], s["dtype"], bench.lever_name(s["levers"])) for k, s in plan if k == "model"]
    assert ("ours", "bf16", "-") in models and ("monai", "bf16", "-") in models
    assert ("ours", "bf16", "channels_last+checkpoint=all") in models
    assert ("monai", "bf16", "channels_last") in models and models.count(("monai", "bf16", "channels_last")) == 1
    assert not any(impl == "monai" and "checkpoint" in lv for impl, _, lv in models)
    infers = [(s["impl"], s["dtype"], bench.lever_name(s["levers"])) for k, s in plan if k == "infer"]
    assert ("ours", "bf16", "channels_last") in infers and ("monai", "bf16", "channels_last") in infers
    monkeypatch.setattr(bench_plan, "cpu_native_bf16", lambda: False)
    plan = bench.build_plan(_args("--skip-infer", "--skip-2d", "--skip-data"), torch.device("cpu"))
    assert {s["dtype"] for _, s in plan} == {"fp32"}          # no emulated bfloat16 unless --cpu-bf16
    plan = bench.build_plan(_args("--skip-infer", "--skip-2d", "--skip-data", "--cpu-bf16"), torch.device("cpu"))
    assert {s["dtype"] for _, s in plan} == {"fp32", "bf16"}


def test_lever_parsing():
    assert bench.parse_levers(["channels_last+checkpoint=all", "compile"]) == [
        {"channels_last": True, "checkpoint": "all"}, {"compile": True}]
    assert bench.lever_name({"checkpoint": "decoder", "channels_last": True}) == "channels_last+checkpoint=decoder"
    assert bench.parse_infer_levers(["dtype=bf16+channels_last"]) == [{"dtype": "bf16", "channels_last": True}]
    with pytest.raises(ValueError, match="unknown lever 'fast'"):
        bench.parse_levers(["fast"])


def test_compile_and_channels_last_are_wired(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m: calls.append(m) or m)
    model = torch.nn.Conv3d(1, 2, 1)
    m, x = bench.prepare_model(model, torch.rand(1, 1, 2, 4, 4), {"compile": True, "channels_last": True},
                          torch.device("cpu"))
    assert calls == [model]
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    assert m.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_summary_ratios_and_table():
    def model(impl, t, mem, levers=None):
        r = {"params": 10, "forward": {"median_s": t / 2, "min_s": t / 3, "cpu_median_s": t, "peak_mb": mem},
             "train": {"median_s": t, "min_s": t / 2, "cpu_median_s": t, "peak_mb": 2 * mem}}
        return {"spec": {"kind": "model", "impl": impl, "mode": "trilinear", "dtype": "fp32", "batch": 2,
                         "levers": levers or {}}, "result": r}
    results = [model("ours", 2.0, 100.0), model("monai", 4.0, 200.0), model("ours", 3.0, 50.0, {"checkpoint": "all"}),
               model("ours", 1.0, 100.0, {"channels_last": True, "checkpoint": "all"}),
               model("monai", 1.25, 100.0, {"channels_last": True})]
    rows = {r[0]: r for r in bench.summarise(results)}
    assert rows["train median trilinear/fp32/-"][3] == pytest.approx(0.5)
    assert rows["train peak mem trilinear/fp32/checkpoint=all"][3] == pytest.approx(0.25)
    # a lever MONAI can take is compared with MONAI under that lever
    row = rows["train median trilinear/fp32/channels_last+checkpoint=all (MONAI channels_last)"]
    assert row[2] == pytest.approx(1.25) and row[3] == pytest.approx(0.8)
    assert rows["data needed by training (batch / ours train step)"][1] == pytest.approx(1.0)
    text = bench.format_table(list(rows.values()))
    assert "ours/MONAI" in text and "0.75" in text


def test_worker_runs_in_a_subprocess():
    pytest.importorskip("monai")
    spec = dict(kind="model", impl="ours", mode="trilinear", dtype="fp32", device="cpu", pfn=0, patch=[32, 64, 64],
                batch=1, warmup=0, repeats=1, levers={"checkpoint": "decoder"})
    ballast = torch.ones(2 ** 28)   # 1 GiB in this (parent) process: must not show up as the child's peak
    res = bench.run_worker(spec, timeout=300)
    del ballast
    assert "error" not in res, res
    assert res["params"] == 27_084_956
    assert res["train"]["median_s"] > 0
    assert 100 < res["train"]["peak_mb"] < res["train"]["peak_rss_mb"] < 1024 + res["base_rss_mb"]
    json.dumps(res)
    bad = bench.run_worker(dict(spec, impl="ours", mode="cubic"), timeout=300)
    assert "upsample must be one of" in " ".join(bad["error"])


def test_op_profile_groups_a_steps_cpu_time():
    """--op-profile's grouping: a conv3d step's time lands in the convolution groups, every operator in exactly one
    group (the groups add up to "all"), per call of the function."""
    from ahnet.bench.measure import OP_GROUPS, op_profile

    conv = torch.nn.Conv3d(4, 8, 3, padding=1)
    x = torch.rand(2, 4, 8, 16, 16)

    def step():
        conv.zero_grad()
        torch.where(x > 0.5, x, 0.0)
        conv(x).square().sum().backward()

    once, twice = op_profile(step, 1), op_profile(step, 3)
    for got in (once, twice):
        assert set(got) == {name for name, _ in OP_GROUPS} | {"other", "all"}
        assert got["convolution forward"] > 0 and got["convolution backward"] > 0 and got["where"] > 0
        assert sum(v for k, v in got.items() if k != "all") == pytest.approx(got["all"])
        assert got["max pooling"] == 0
    assert twice["all"] < 2 * once["all"]                   # per call, not summed over the calls


def test_op_profile_rows_compare_ours_with_monai_and_need_a_cpu():
    def model(impl, conv):
        t = {"median_s": 1.0, "min_s": 1.0, "cpu_median_s": 1.0, "peak_mb": 1.0}
        r = {"params": 1, "forward": t, "train": t, "train_ops": {"convolution backward": conv, "all": 2 * conv}}
        return {"spec": {"kind": "model", "impl": impl, "mode": "trilinear", "dtype": "bf16", "batch": 1,
                         "levers": {}}, "result": r}
    rows = {r[0]: r for r in bench.summarise([model("ours", 0.5), model("monai", 1.0)])}
    assert rows["train CPU time in convolution backward trilinear/bf16/-"][1:4] == (0.5, 1.0, 0.5)
    from ahnet.commands.bench import check_args
    with pytest.raises(ValueError, match="--op-profile"):
        check_args(_args("--op-profile", "--skip-model"))
