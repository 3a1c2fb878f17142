"""ahnet.bench: the pieces that decide its numbers (window placement, the local sliding-window loop, lever
parsing and wiring, the ratio table) and one real worker run in a subprocess."""
import json

import pytest
import torch

from ahnet import bench


class _WindowSensitive(torch.nn.Module):
    """Output depends on the whole window (x minus the window mean), so window placement matters."""

    def forward(self, x):
        return x - x.mean(dim=(2, 3, 4), keepdim=True)


def test_window_starts_cover_and_end_flush():
    assert bench.window_starts(256, 128, 0.5) == [0, 64, 128]
    assert bench.window_starts(64, 32, 0.5) == [0, 16, 32]
    assert bench.window_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert bench.window_starts(20, 32, 0.5) == [0]


def test_local_sliding_window_matches_monai():
    inferers = pytest.importorskip("monai.inferers")
    from ahnet.nets.layout import from_monai_layout, to_monai_layout

    torch.manual_seed(0)
    vol = torch.rand(1, 1, 12, 40, 36)
    model = _WindowSensitive()
    ours, n = bench.local_sliding_window(model, vol, (8, 16, 16), 0.5, 3, torch.device("cpu"))
    theirs = inferers.sliding_window_inference(to_monai_layout(vol), (16, 16, 8), 3, model, overlap=0.5,
                                               mode="constant")
    assert n == 2 * 4 * 4
    assert torch.allclose(ours, torch.sigmoid(from_monai_layout(theirs)), atol=1e-6)


def test_local_sliding_window_one_window_is_the_direct_pass():
    vol = torch.rand(1, 1, 8, 16, 16)
    p, n = bench.local_sliding_window(_WindowSensitive(), vol, (8, 16, 16), 0.5, 2, torch.device("cpu"))
    assert n == 1 and torch.allclose(p, torch.sigmoid(_WindowSensitive()(vol)))


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
    m, x = bench._prepare(model, torch.rand(1, 1, 2, 4, 4), {"compile": True, "channels_last": True},
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
    results = [model("ours", 2.0, 100.0), model("monai", 4.0, 200.0), model("ours", 3.0, 50.0, {"checkpoint": "all"})]
    rows = {r[0]: r for r in bench.summarise(results)}
    assert rows["train median trilinear/fp32/-"][3] == pytest.approx(0.5)
    assert rows["train peak mem trilinear/fp32/checkpoint=all"][3] == pytest.approx(0.25)
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
