"""Timing and peak memory of one measurement (used inside the worker processes).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process peak RSS (``VmHWM``;
``ru_maxrss`` where there is no /proc), raw and above a baseline taken right after the imports.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from ahnet.precision import AmpSettings, resolve_amp


def rss_mb() -> float:
    """Peak RSS of this process so far, MiB: VmHWM of /proc/self/status where there is one (per address
    space, so fresh after exec), else ru_maxrss (on Linux ru_maxrss starts a spawned process at its parent's
    RSS, so a large parent would hide a smaller child's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    ts, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts,
            "cpu_median_s": statistics.median(cpu), "cpu_all_s": cpu}


#: how --op-profile groups the profiler's operators (the first group whose key a name contains; the rest is "other")
OP_GROUPS = (("convolution backward", ("convolution_backward",)), ("convolution forward", ("convolution",)),
             ("batch norm", ("batch_norm",)), ("max pooling", ("max_pool",)), ("where", ("aten::where",)),
             ("copies and casts", ("copy_", "_to_copy", "clone", "contiguous")))


def op_profile(fn, repeats: int) -> dict:
    """Self CPU time per call of ``fn`` (s), summed by OP_GROUPS over ``repeats`` calls under torch.profiler,
    with "other" and "all" (the sum of every operator's self time): where a step's CPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    out = {name: 0.0 for name, _ in OP_GROUPS}
    out["other"] = out["all"] = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6 / repeats
        group = next((name for name, keys in OP_GROUPS if any(k in e.key for k in keys)), "other")
        out[group] += t
        out["all"] += t
    return out


AMP_MODE = {"fp32": "off", "amp": "fp16", "bf16": "bf16"}     # bench dtype -> ahnet.precision amp mode


def amp_settings(device, dtype: str) -> AmpSettings:
    return resolve_amp(AMP_MODE[dtype], device)


def mem_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mem_peak(device, base_rss: float) -> dict:
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    rss = rss_mb()
    return {"peak_mb": rss - base_rss, "peak_rss_mb": rss}
