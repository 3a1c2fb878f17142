"""The measurements, each run in a fresh Python subprocess (``python -m ahnet.bench --worker SPEC``) so that the
peak memory of one implementation never includes the other's: a model's forward and training step, sliding-window
inference of a whole volume, the 2D stage, and (``data_worker``) the data pipeline. MONAI is imported inside the
workers only: by every model and inference worker where it is installed (ours too, for the same memory baseline),
and needed by MONAI's rows alone (the GPU check runs ours without it).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from ahnet.precision import to_channels_last

from ahnet.bench.data_worker import work_data
from ahnet.bench.layout import from_monai_layout, to_monai_layout
from ahnet.bench.measure import AMP_MODE, amp_settings, mem_peak, mem_reset, op_profile, rss_mb, timed
from ahnet.bench.levers import our_levers
from ahnet.bench.preset import work_guard_calls, work_step, work_validation
from ahnet.bench.scans import work_scan


def import_peer() -> None:
    """Import MONAI's networks where MONAI is installed, so that both sides' workers start from the same resident
    memory; without MONAI nothing (only our rows can run then: a MONAI row fails in build_net)."""
    try:
        import monai.networks.nets  # noqa: F401
    except ImportError:
        pass


def build_net(impl: str, mode: str, pfn: int, checkpoint: str = "none"):
    """(model, input converter (N, C, D, H, W) -> the model's layout, output converter back)."""
    if impl == "monai":
        from monai.networks.nets import AHNet

        return (AHNet(spatial_dims=3, psp_block_num=pfn, upsample_mode=mode),
                lambda x: to_monai_layout(x).contiguous(), from_monai_layout)
    from ahnet.nets import AHNet3d

    return AHNet3d("resnet50", pfn_depth=pfn, upsample=mode, checkpoint=checkpoint), (lambda x: x), (lambda y: y)


def prepare_model(model, x, levers: dict, device):
    model = model.to(device)
    if levers.get("channels_last"):
        model, x = to_channels_last(model), to_channels_last(x)
    if levers.get("compile"):
        model = torch.compile(model)
    return model, x



def forward_and_step(model, x, target, device: torch.device, dtype: str):
    """Two closures to time: an inference forward pass, and one training step (BCE with logits in fp32,
    backward through a GradScaler that is active only for CUDA float16, Adam at lr 1e-4)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp = amp_settings(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)

    def forward():
        with torch.no_grad(), amp.autocast(device):
            model(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp.autocast(device):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return forward, step


def work_model(spec: dict) -> dict:
    """Forward and training-step figures of one implementation / configuration."""
    device = torch.device(spec["device"])
    import_peer()

    base = rss_mb()
    torch.manual_seed(0)
    levers = spec.get("levers", {})
    net, to_layout, _ = build_net(spec["impl"], spec["mode"], spec["pfn"], levers.get("checkpoint", "none"))
    params = sum(p.numel() for p in net.parameters())
    x = to_layout(torch.rand(spec["batch"], 1, *spec["patch"])).to(device)
    target = (torch.rand_like(x) > 0.99).float()
    if spec["impl"] == "ours":
        our_levers(net, levers, spec["dtype"], device)
    model, x = prepare_model(net, x, levers, device)
    out = {"params": params}
    forward, step = forward_and_step(model, x, target, device, spec["dtype"])
    mem_reset(device)
    model.eval()
    out["forward"] = timed(forward, device, spec["warmup"], spec["repeats"])
    out["forward"].update(mem_peak(device, base))
    mem_reset(device)
    model.train()
    out["train"] = timed(step, device, spec["warmup"], spec["repeats"])
    out["train"].update(mem_peak(device, base))
    if spec.get("op_profile"):
        out["train_ops"] = op_profile(step, spec["repeats"])
    out["base_rss_mb"] = base
    return out


def work_infer(spec: dict) -> dict:
    """Whole-volume sliding-window inference time and peak memory of one implementation: ours through
    ahnet.infer.sliding_window_predict, MONAI's AHNet through monai.inferers.sliding_window_inference; both with
    uniform blending, the same window, overlap, window batch, autocast dtype and memory format."""
    from ahnet.infer import sliding_window_predict, window_starts

    device = torch.device(spec["device"])
    import_peer()

    base = rss_mb()
    torch.manual_seed(0)
    levers = spec.get("levers", {})
    channels_last = bool(levers.get("channels_last"))
    net, to_layout, _ = build_net(spec["impl"], spec["mode"], spec["pfn"])
    net = net.to(device).eval()
    vol = torch.rand(1, 1, *spec["volume"])
    window, overlap, swb = spec["window"], spec["overlap"], spec["sw_batch"]
    out = {"volume": spec["volume"], "window": window, "overlap": overlap, "sw_batch": swb}
    mem_reset(device)
    if spec["impl"] == "monai":
        from monai.inferers import sliding_window_inference

        if channels_last:
            net = to_channels_last(net)
        vm = to_layout(vol)
        roi = tuple(reversed(window))

        def run():
            with torch.no_grad(), amp_settings(device, spec["dtype"]).autocast(device):
                y = sliding_window_inference(vm, roi, swb, net, overlap=overlap, mode="constant",
                                             sw_device=device, device=torch.device("cpu"))
            return torch.sigmoid(y.float())
        out["driver"] = "monai.inferers.sliding_window_inference"
    else:
        def run():
            return sliding_window_predict(net, vol, window=tuple(window), overlap=overlap, batch_size=swb,
                                          amp=AMP_MODE[spec["dtype"]], device=device, out_device="cpu",
                                          blend="constant", channels_last=channels_last)
        out["driver"] = "ahnet.infer.sliding_window_predict"
    out["windows"] = math.prod(len(window_starts(s, w, overlap)) for s, w in zip(spec["volume"], window))
    t = timed(run, device, 0, spec.get("repeats", 1))
    out.update(t)
    out.update(mem_peak(device, base))
    return out


def work_mcgcn(spec: dict) -> dict:
    """2D stage (MC-GCN, ResNet50): slices per second, inference and training."""
    from ahnet.nets import MCGCN

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = MCGCN("resnet50").to(device)
    n, (h, w) = spec["batch"], spec["size"]
    x = torch.rand(n, 3, h, w, device=device)
    target = (torch.rand(n, 1, h, w, device=device) > 0.99).float()
    forward, step = forward_and_step(model, x, target, device, spec["dtype"])
    model.eval()
    f = timed(forward, device, spec["warmup"], spec["repeats"])
    model.train()
    t = timed(step, device, spec["warmup"], spec["repeats"])
    return {"batch": n, "size": [h, w], "params": sum(p.numel() for p in model.parameters()),
            "infer_slices_per_s": n / f["median_s"], "train_slices_per_s": n / t["median_s"],
            "forward": f, "train": t}


WORKERS = {"model": work_model, "infer": work_infer, "mcgcn": work_mcgcn, "data": work_data, "step": work_step,
           "validation": work_validation, "guard_calls": work_guard_calls, "scan": work_scan}


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result ({'error': ...} on failure)."""
    cmd = [sys.executable, "-m", "ahnet.bench", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]}
    return json.loads(lines[-1][len("BENCH_RESULT "):])
