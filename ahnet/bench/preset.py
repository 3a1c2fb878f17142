"""A preset's 3D training step, measured (``python -m ahnet.bench --preset cpu --data DATASET.json``): where one
real training step goes, what the validation of an epoch costs, and what each lever gives measured alone.

Every measurement runs the run's own pieces, built from the variant's TrainConfig (the command line makes it with
the experiment's ``variant_config``): the patch dataset from the HDF5 cache with its augmentation
(``make_datasets``), the network (``build_network``, ``place_model``: channels-last as the preset), the depth
guard as training applies it, Adam, scheduler and loss (``make_optimisation``), and the CPM validator
(``make_validator``). An AH-Net "after transfer" is timed as the same network from scratch (the transfer only
sets its starting weights).

- ``step``: per step, the phases of ``train_step`` timed apart: data (the batch's patches sampled, read and
  augmented, then collated, as the preset's in-process DataLoader does: ``num_workers`` 0), forward (autocast),
  loss, backward, optimiser (gradient-norm check, Adam, scheduler). Spec levers, each alone: ``guard`` (pad,
  float32, off: precision.GUARD_MODES), ``fused`` ("off": the BN-ReLU-conv units as three modules),
  ``zpool`` ("maxpool": max_pool3d for the z-pooling), ``batch`` (patches per step), ``compile`` (torch.compile
  of the network, inductor; its first step, which compiles, is reported apart).
- ``validation``: one validation of the run (its validation cases predicted whole and scored) and its parts on
  the same cases, predict_volume and the candidates apart (work_validation: an untrained network, so the
  candidates' share is not a trained model's), eager or ``compile``d for inference (the first pass compiles; it is
  reported apart).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import default_collate

from ahnet.bench.levers import our_levers
from ahnet.bench.measure import mem_peak, rss_mb
from ahnet.precision import guard_cpu_bf16_convs, resolve_amp, to_channels_last

PHASES = ("data", "forward", "loss", "backward", "optimiser")


def build_run(spec: dict, with_data: bool = True):
    """(cfg, model, amp, train dataset or None) of the spec's variant config, the model placed and guarded
    (spec "guard") as ahnet.train.loop.start_session does."""
    from ahnet.train.batches import make_datasets
    from ahnet.train.config import TrainConfig
    from ahnet.train.model import build_network, place_model

    cfg = TrainConfig.from_dict(dict(spec["config"], batch_size=spec.get("batch") or spec["config"]["batch_size"]))
    cfg = cfg.resolved()
    device = torch.device("cpu")
    amp = resolve_amp(cfg.amp, device)
    model, _, _ = build_network(cfg)
    place_model(model, cfg, device)
    our_levers(model, {k: spec[k] for k in ("guard", "fused", "zpool") if k in spec}, amp.name, device)
    train_ds = make_datasets(cfg)[0] if with_data else None
    return cfg, model, amp, train_ds


def _phase_steps(cfg, net, model, amp, train_ds, n: int, start: int) -> list:
    """Run n training steps from sample ``start``; each step's phase times {phase: s} (PHASES) and "step", by the
    wall clock and (``cpu_`` keys) by the process's CPU time, which one thread spends on the work alone, however
    many other processes share the cores."""
    from ahnet.train.batches import prepare_batch
    from ahnet.train.optim import make_optimisation

    device = torch.device("cpu")
    opt, sched, _, loss_fn = make_optimisation(model, cfg, device, amp)
    out = []
    for k in range(n):
        t = [(time.perf_counter(), time.process_time())]
        first = start + k * cfg.batch_size
        batch = default_collate([train_ds[i % len(train_ds)] for i in range(first, first + cfg.batch_size)])
        x, y = prepare_batch(batch, cfg, device)
        t.append((time.perf_counter(), time.process_time()))
        opt.zero_grad(set_to_none=True)
        with amp.autocast(device):
            logits = net(x)
        t.append((time.perf_counter(), time.process_time()))
        loss = loss_fn(logits, y)
        t.append((time.perf_counter(), time.process_time()))
        loss.backward()
        t.append((time.perf_counter(), time.process_time()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if torch.isfinite(norm):
            opt.step()
        sched.step()
        t.append((time.perf_counter(), time.process_time()))
        times = {}
        for clock, prefix in ((0, ""), (1, "cpu_")):
            times.update({prefix + p: t[i + 1][clock] - t[i][clock] for i, p in enumerate(PHASES)})
            times[prefix + "step"] = t[-1][clock] - t[0][clock]
        out.append(times)
    return out


def _summary(steps: list, batch: int) -> dict:
    keys = [*PHASES, "step"]
    med = {p: statistics.median(s[p] for s in steps) for p in keys}
    cpu = {p: statistics.median(s["cpu_" + p] for s in steps) for p in keys}
    step = [s["step"] for s in steps]
    return {"phases_median_s": med, "phases_cpu_median_s": cpu, "step_median_s": med["step"], "step_min_s": min(step),
            "all_s": step, "cpu_per_step_s": cpu["step"], "per_patch_median_s": med["step"] / batch,
            "cpu_per_patch_s": cpu["step"] / batch}


def work_step(spec: dict) -> dict:
    """One variant's training step by phase, under the spec's levers (module docstring)."""
    base = rss_mb()
    torch.manual_seed(0)
    cfg, model, amp, train_ds = build_run(spec)
    net = model
    out = {"variant": spec["variant"], "batch": cfg.batch_size, "guard": spec.get("guard", "pad"),
           "fused": spec.get("fused", "on"), "zpool": spec.get("zpool", "depth"),
           "compile": bool(spec.get("compile")), "amp": amp.name, "channels_last": cfg.channels_last}
    if spec.get("compile"):
        net = torch.compile(model)
        t = time.perf_counter()
        _phase_steps(cfg, net, model, amp, train_ds, 1, 0)
        out["first_step_s"] = time.perf_counter() - t          # compilation of forward and backward included
    train_ds.set_epoch(0)
    _phase_steps(cfg, net, model, amp, train_ds, spec["warmup"], 10_000)
    steps = _phase_steps(cfg, net, model, amp, train_ds, spec["repeats"], 20_000)
    out.update(_summary(steps, cfg.batch_size))
    out.update(mem_peak(torch.device("cpu"), base))
    return out


def work_validation(spec: dict) -> dict:
    """One validation of the variant (its CPM validator on its validation cases), eager or compiled, with its
    parts measured apart on the same cases: predict_volume, then the candidates of each map; the rest of the
    validation (reading, FROC) by difference. The network is untrained (its weights as initialised): the windows
    cost what a trained model's cost, its candidates do not (a fresh network's map holds more peaks). The parts run
    first, so the validation timed after them finds the kernels warm (compiled: its first pass compiles and is
    reported apart)."""
    import h5py

    from ahnet.evaluate.validation import make_validator, validation_window_batch
    from ahnet.infer import Ensemble, Member, predict_volume
    from ahnet.infer.candidates import extract_candidates

    torch.manual_seed(0)
    cfg, model, amp, _ = build_run(spec, with_data=False)
    validator = make_validator(cfg)
    if validator is None:
        return {"error": f"{cfg.data} gives no CPM validator (no validation cases with nodules)"}
    model.eval()
    net = torch.compile(model) if spec.get("compile") else model
    out = {"variant": spec["variant"], "compile": bool(spec.get("compile")), "cases": len(validator.cases)}
    ens = Ensemble([Member(net, cfg.model, 3, dict(model.config), {"patch_size": list(cfg.patch_size)}, cfg.out)])
    for attempt in range(2 if spec.get("compile") else 1):          # compiled: the first pass compiles
        clocks = {"predict": [0.0, 0.0], "candidates": [0.0, 0.0]}
        t_pass = time.perf_counter()
        for c in validator.cases:
            with h5py.File(c.cache_file, "r") as f:
                image = f["image"][...]
            t, c0 = time.perf_counter(), time.process_time()
            prob = predict_volume(ens, image, sw_batch=validation_window_batch(cfg), amp=cfg.amp,
                                  channels_last=cfg.channels_last)
            t1, c1 = time.perf_counter(), time.process_time()
            extract_candidates(prob, c.geometry, seriesuid=c.case_id)
            clocks["predict"] = [clocks["predict"][0] + t1 - t, clocks["predict"][1] + c1 - c0]
            clocks["candidates"] = [clocks["candidates"][0] + time.perf_counter() - t1,
                                    clocks["candidates"][1] + time.process_time() - c1]
        if spec.get("compile") and attempt == 0:
            out["first_pass_s"] = time.perf_counter() - t_pass
    t, c0 = time.perf_counter(), time.process_time()
    out["cpm"] = validator(net)
    out["validation_s"], out["validation_cpu_s"] = time.perf_counter() - t, time.process_time() - c0
    for part, (wall, cpu) in clocks.items():
        out[f"{part}_s"], out[f"{part}_cpu_s"] = wall, cpu
    out["rest_s"] = out["validation_s"] - out["predict_s"] - out["candidates_s"]
    out["rest_cpu_s"] = out["validation_cpu_s"] - out["predict_cpu_s"] - out["candidates_cpu_s"]
    return out


class _WeightGradFloat32(torch.autograd.Function):
    """A conv3d whose forward and input gradient run in the input's dtype and whose weight gradient runs in
    float32: the other cheap guard the issue names, measured here against the pad guard."""

    @staticmethod
    def forward(ctx, x, w, padding):
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        return torch.nn.functional.conv3d(x, w.to(x.dtype), None, 1, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.nn.grad.conv3d_input(x.shape, w.to(g.dtype), g, 1, ctx.padding)
        gw = torch.nn.grad.conv3d_weight(x.float(), w.shape, g.float(), 1, ctx.padding)
        return gx, gw, None


def _affected_shapes(model, cfg, amp) -> list:
    """(name, input shape) of every conv call of one training forward where the depth bug bites."""
    from ahnet.precision import bf16_depth_bug

    found, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv3d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: found.append((name, tuple(inp[0].shape)))
                if bf16_depth_bug(inp[0], mod.kernel_size[0]) else None))
    x = to_channels_last(torch.rand(cfg.batch_size, 1, *cfg.patch_size))
    with amp.autocast(torch.device("cpu")):
        model(x)
    for h in hooks:
        h.remove()
    return found


def _call_seconds(conv, shape, mode: str, repeats: int) -> float:
    """Median seconds of one forward + backward of ``conv`` on a bf16 channels-last input of ``shape``."""
    x = to_channels_last(torch.randn(shape)).bfloat16().requires_grad_(True)
    guard_cpu_bf16_convs(conv, "off" if mode == "wgrad_fp32" else mode)
    ts = []
    for _ in range(repeats + 1):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mode == "wgrad_fp32":
                y = _WeightGradFloat32.apply(x, conv.weight, conv.padding)
            else:
                y = conv(x)
        y.float().sum().backward()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])


def work_guard_calls(spec: dict) -> dict:
    """Where the depth guard bites in one training step of the variant: each affected conv call, and the median
    seconds of its forward + backward alone under each guard (off = the wrong plain kernel, float32, pad, and
    wgrad_fp32 = only the weight gradient in float32)."""
    torch.manual_seed(0)
    cfg, model, amp, _ = build_run(spec, with_data=False)
    modules = dict(model.named_modules())
    calls = []
    for name, shape in _affected_shapes(model, cfg, amp):
        conv = modules[name]
        row = {"conv": name, "input": list(shape), "kernel": list(conv.kernel_size),
               "channels": [conv.in_channels, conv.out_channels]}
        for mode in ("off", "float32", "pad", "wgrad_fp32"):
            row[f"{mode}_s"] = _call_seconds(conv, shape, mode, spec["repeats"])
        calls.append(row)
    totals = {f"{m}_s": sum(r[f"{m}_s"] for r in calls) for m in ("off", "float32", "pad", "wgrad_fp32")}
    return {"variant": spec["variant"], "calls": calls, "totals": totals}
