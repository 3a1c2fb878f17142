"""Benchmarks of this project's AHNet3d against MONAI's AHNet, side by side on one machine.

``python -m ahnet.bench [--patch D H W] [--batch B] [--full-volume] ...`` (``bash run.sh bench``).

Every measurement runs in a fresh Python subprocess (``--worker``), so the peak memory of one implementation
never includes the other's: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process peak RSS
(``VmHWM``; ``ru_maxrss`` where there is no /proc), reported raw and above the RSS right after the imports
(the latter, "model + optimiser + activations", is what the ratios use). Times are medians of ``--repeats`` steps after ``--warmup`` steps; the
minimum is kept too (on a shared machine it is the less noisy figure). MONAI gets its own layout: inputs are
converted with ``to_monai_layout`` outside the timed region.

Rows: parameters; forward (eval, no grad) and training step (train mode, BCE-with-logits, backward, Adam
step) for the paper configuration (ResNet50, 4 pyramid levels) per upsampling mode, fp32 and AMP where the
device has it (CUDA float16 with a GradScaler; CPU bfloat16 where the CPU computes it natively); the same for
this project's levers (``--levers``: channels_last, checkpoint=decoder|encoder|all, compile), with MONAI given the
levers that apply to any module (channels_last, compile) so each ratio compares like with like; sliding-window
inference of a whole volume (ours: ``ahnet.infer.sliding_window_predict``; MONAI:
``monai.inferers.sliding_window_inference``; same window, overlap, window batch, blending, dtype and layout);
the 2D-stage (MC-GCN ResNet50) slices per second; the data pipeline's patches per second from an HDF5 cache
of synthetic cases against what a training step consumes. Output: a table with ratios (ours / MONAI) and
``bench_results/bench-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ahnet.precision import AmpSettings, cpu_native_bf16, resolve_amp, to_channels_last

# ------------------------------------------------------------------------------------------ helpers


def _rss_mb() -> float:
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    ts, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts,
            "cpu_median_s": statistics.median(cpu), "cpu_all_s": cpu}


AMP_MODE = {"fp32": "off", "amp": "fp16", "bf16": "bf16"}     # bench dtype -> ahnet.precision amp mode


def _amp(device, dtype: str) -> AmpSettings:
    return resolve_amp(AMP_MODE[dtype], device)


def _mem_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _mem_peak(device, base_rss: float) -> dict:
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    rss = _rss_mb()
    return {"peak_mb": rss - base_rss, "peak_rss_mb": rss}


def build_net(impl: str, mode: str, pfn: int, checkpoint: str = "none"):
    """(model, input converter (N, C, D, H, W) -> the model's layout, output converter back)."""
    from ahnet.nets.layout import from_monai_layout, to_monai_layout

    if impl == "monai":
        from monai.networks.nets import AHNet

        return (AHNet(spatial_dims=3, psp_block_num=pfn, upsample_mode=mode),
                lambda x: to_monai_layout(x).contiguous(), from_monai_layout)
    from ahnet.nets import AHNet3d

    return AHNet3d("resnet50", pfn_depth=pfn, upsample=mode, checkpoint=checkpoint), (lambda x: x), (lambda y: y)


def _prepare(model, x, levers: dict, device):
    model = model.to(device)
    if levers.get("channels_last"):
        model, x = to_channels_last(model), to_channels_last(x)
    if levers.get("compile"):
        model = torch.compile(model)
    return model, x


# ------------------------------------------------------------------------------------------ workers


def forward_and_step(model, x, target, device: torch.device, dtype: str):
    """Two closures to time: an inference forward pass, and one training step (BCE with logits in fp32,
    backward through a GradScaler that is active only for CUDA float16, Adam at lr 1e-4)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp = _amp(device, dtype)
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
    import monai.networks.nets  # noqa: F401  (same imports in every worker: same RSS baseline)

    base = _rss_mb()
    torch.manual_seed(0)
    levers = spec.get("levers", {})
    net, to_layout, _ = build_net(spec["impl"], spec["mode"], spec["pfn"], levers.get("checkpoint", "none"))
    params = sum(p.numel() for p in net.parameters())
    x = to_layout(torch.rand(spec["batch"], 1, *spec["patch"])).to(device)
    target = (torch.rand_like(x) > 0.99).float()
    model, x = _prepare(net, x, levers, device)
    out = {"params": params}
    forward, step = forward_and_step(model, x, target, device, spec["dtype"])
    _mem_reset(device)
    model.eval()
    out["forward"] = _timed(forward, device, spec["warmup"], spec["repeats"])
    out["forward"].update(_mem_peak(device, base))
    _mem_reset(device)
    model.train()
    out["train"] = _timed(step, device, spec["warmup"], spec["repeats"])
    out["train"].update(_mem_peak(device, base))
    out["base_rss_mb"] = base
    return out


def work_infer(spec: dict) -> dict:
    """Whole-volume sliding-window inference time and peak memory of one implementation: ours through
    ahnet.infer.sliding_window_predict, MONAI's AHNet through monai.inferers.sliding_window_inference; both with
    uniform blending, the same window, overlap, window batch, autocast dtype and memory format."""
    from ahnet.infer import sliding_window_predict, window_starts

    device = torch.device(spec["device"])
    import monai.networks.nets  # noqa: F401

    base = _rss_mb()
    torch.manual_seed(0)
    levers = spec.get("levers", {})
    channels_last = bool(levers.get("channels_last"))
    net, to_layout, _ = build_net(spec["impl"], spec["mode"], spec["pfn"])
    net = net.to(device).eval()
    vol = torch.rand(1, 1, *spec["volume"])
    window, overlap, swb = spec["window"], spec["overlap"], spec["sw_batch"]
    out = {"volume": spec["volume"], "window": window, "overlap": overlap, "sw_batch": swb}
    _mem_reset(device)
    if spec["impl"] == "monai":
        from monai.inferers import sliding_window_inference

        if channels_last:
            net = to_channels_last(net)
        vm = to_layout(vol)
        roi = tuple(reversed(window))

        def run():
            with torch.no_grad(), _amp(device, spec["dtype"]).autocast(device):
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
    t = _timed(run, device, 0, spec.get("repeats", 1))
    out.update(t)
    out.update(_mem_peak(device, base))
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
    f = _timed(forward, device, spec["warmup"], spec["repeats"])
    model.train()
    t = _timed(step, device, spec["warmup"], spec["repeats"])
    return {"batch": n, "size": [h, w], "params": sum(p.numel() for p in model.parameters()),
            "infer_slices_per_s": n / f["median_s"], "train_slices_per_s": n / t["median_s"],
            "forward": f, "train": t}


def _write_synthetic_dataset(root: Path, n_cases: int, shape, spacing=(2.5, 0.7, 0.7)) -> Path:
    """n_cases CT-like volumes (air + soft-tissue noise + a few spheres as nodules) with instance masks."""
    from ahnet.data.io import Volume, write_image

    rng = np.random.default_rng(0)
    direction = np.eye(3)
    entries = []
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n_cases):
        img = rng.normal(-800, 60, size=shape).astype(np.float32)
        lab = np.zeros(shape, np.int16)
        for k in range(1, 4):
            c = [rng.integers(s // 4, 3 * s // 4) for s in shape]
            r = rng.uniform(3, 8)
            m = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2 <= r * r
            img[m] = 30.0
            lab[m] = k
        cid = f"bench_{i:03d}"
        write_image(root / "imagesTr" / f"{cid}.nii.gz", Volume(img, spacing, (0.0, 0.0, 0.0), direction))
        write_image(root / "labelsTr" / f"{cid}.nii.gz", Volume(lab, spacing, (0.0, 0.0, 0.0), direction))
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz",
                        "case_id": cid, "split": "train"})
    (root / "dataset.json").write_text(json.dumps({"name": "bench", "training": entries}))
    return root / "dataset.json"


def phantom_case_seconds(n: int) -> dict:
    """Seconds to build one CPU-sized phantom case (192 x 192 x 40 at 2.5 mm, LIDC shapes), median of n cases;
    the one-time LIDC shape-pool load is timed apart. The issue's target: under 5 s on one core."""
    from ahnet.data import phantom

    if n <= 0:
        return {}
    opts = phantom.PhantomOptions()
    t = time.perf_counter()
    pool = phantom._get_pool(opts.spacing) if opts.shapes == "lidc" else "procedural"
    pool_s = time.perf_counter() - t
    times = []
    for i in range(n):
        t = time.perf_counter()
        phantom.generate_case(f"bench_{i:03d}", i, opts, n_nodules=2, pool=pool)
        times.append(time.perf_counter() - t)
    return {"phantom_pool_load_s": pool_s, "phantom_case_s": float(np.median(times)),
            "phantom_shape": [opts.slices, opts.size, opts.size]}


def work_data(spec: dict) -> dict:
    """Patches per second of PatchDataset from an HDF5 cache: in-process and through a DataLoader."""
    from ahnet.data.augment import Augment
    from ahnet.data.cache import build_cache
    from ahnet.data.sampling import PatchDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dj = _write_synthetic_dataset(root / "ds", spec["cases"], spec["case_shape"])
        t = time.perf_counter()
        paths = build_cache(dj, root / "cache", progress=False)
        cache_s = time.perf_counter() - t
        out = {"cases": spec["cases"], "case_shape": spec["case_shape"], "patch": spec["patch"],
               "cache_build_s": cache_s}
        out.update(phantom_case_seconds(spec.get("phantom_cases", 2)))
        for name, aug in (("plain", None), ("augment", Augment())):
            ds = PatchDataset(paths, spec["patch"], samples_per_epoch=spec["samples"], augment=aug, seed=0)
            ds[0]
            t = time.perf_counter()
            for i in range(spec["samples"]):
                ds[i]
            out[f"{name}_patches_per_s"] = spec["samples"] / (time.perf_counter() - t)
            ds.close()
        if spec["workers"] > 0:
            ds = PatchDataset(paths, spec["patch"], samples_per_epoch=spec["samples"], augment=Augment(), seed=0)
            dl = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=spec["workers"])
            it = iter(dl)
            next(it)
            t = time.perf_counter()
            n = sum(1 for _ in it)
            out["loader_workers"] = spec["workers"]
            out["loader_augment_patches_per_s"] = n / (time.perf_counter() - t)
    return out


WORKERS = {"model": work_model, "infer": work_infer, "mcgcn": work_mcgcn, "data": work_data}


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


# ------------------------------------------------------------------------------------------ plan and report


def parse_levers(items) -> list:
    """['channels_last', 'checkpoint=decoder', 'channels_last+checkpoint=all', 'compile'] -> list of dicts."""
    out = []
    for item in items:
        lv = {}
        for part in item.split("+"):
            if part == "channels_last":
                lv["channels_last"] = True
            elif part == "compile":
                lv["compile"] = True
            elif part.startswith("checkpoint="):
                lv["checkpoint"] = part.split("=", 1)[1]
            else:
                raise ValueError(f"unknown lever {part!r}; expected channels_last, compile or checkpoint=MODE "
                                 "(joined with +)")
        out.append(lv)
    return out


def lever_name(lv: dict) -> str:
    parts = [k if v is True else f"{k}={v}" for k, v in sorted(lv.items())]
    return "+".join(parts) or "-"


PEER_LEVERS = ("channels_last", "compile")   # levers that apply to any nn.Module, MONAI's AHNet included


def peer_levers(lv: dict) -> dict:
    """The part of a lever set that MONAI's AHNet can take too (its like-for-like comparison)."""
    return {k: v for k, v in lv.items() if k in PEER_LEVERS}


def amp_dtypes(args, device: torch.device) -> list:
    """fp32, plus AMP where the device has it: float16 on CUDA, bfloat16 on a CPU that computes it natively
    (--cpu-bf16 forces it elsewhere); --no-amp: fp32 only."""
    if args.no_amp:
        return ["fp32"]
    if device.type == "cuda":
        return ["fp32", "amp"]
    return ["fp32", "bf16"] if (args.cpu_bf16 or cpu_native_bf16()) else ["fp32"]


def build_plan(args, device: torch.device) -> list:
    dtypes = amp_dtypes(args, device)
    base = dict(device=str(device), pfn=args.pfn, patch=list(args.patch), batch=args.batch, warmup=args.warmup,
                repeats=args.repeats)
    plan, seen = [], set()

    def add(kind, spec):
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            plan.append((kind, spec))

    for mode in [] if args.skip_model else args.modes:
        for dtype in dtypes:
            for impl in ("ours", "monai"):   # interleaved, so background load hits both alike
                add("model", dict(base, kind="model", impl=impl, mode=mode, dtype=dtype, levers={}))
    for lv in [] if args.skip_model else parse_levers(args.levers):
        for dtype in dtypes:
            add("model", dict(base, kind="model", impl="ours", mode=args.lever_mode, dtype=dtype, levers=lv))
            if peer_levers(lv):
                add("model", dict(base, kind="model", impl="monai", mode=args.lever_mode, dtype=dtype,
                                  levers=peer_levers(lv)))
    if not args.skip_infer:
        ibase = dict(device=str(device), pfn=args.pfn, volume=list(args.volume), window=list(args.window or args.patch),
                     overlap=args.overlap, sw_batch=args.sw_batch, repeats=1, kind="infer")
        infer_levers = args.infer_levers
        if infer_levers is None:
            infer_levers = ["channels_last"] + [f"channels_last+dtype={d}" for d in dtypes if d != "fp32"]
        for mode in args.infer_modes:
            for lv in [{}] + parse_infer_levers(infer_levers):
                dtype = lv.pop("dtype", "fp32")
                for impl in ("ours", "monai"):
                    add("infer", dict(ibase, impl=impl, mode=mode, dtype=dtype, levers=lv))
    if not args.skip_2d:
        for dtype in dtypes:
            add("mcgcn", dict(device=str(device), kind="mcgcn", batch=args.batch_2d, size=list(args.size_2d),
                              dtype=dtype, warmup=args.warmup, repeats=args.repeats))
    if not args.skip_data:
        add("data", dict(kind="data", cases=3, case_shape=[max(2 * args.patch[0], 48), 256, 256],
                         patch=list(args.patch), samples=args.data_samples, workers=args.data_workers))
    return plan


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device)}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["device_name"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarise(results: list) -> list:
    """Rows (label, ours, monai, ratio, unit) for the printed table."""
    rows = []
    models = [r for r in results if r["spec"]["kind"] == "model" and "error" not in r["result"]]
    def key(r, levers):
        return r["spec"]["mode"], r["spec"]["dtype"], lever_name(levers)

    monai = {key(r, r["spec"]["levers"]): r["result"] for r in models if r["spec"]["impl"] == "monai"}
    for r in models:
        if r["spec"]["impl"] != "ours":
            continue
        peer = peer_levers(r["spec"]["levers"])
        m = monai.get(key(r, peer))
        res = r["result"]
        tag = f"{r['spec']['mode']}/{r['spec']['dtype']}/{lever_name(r['spec']['levers'])}"
        if peer:
            tag += f" (MONAI {lever_name(peer)})"
        rows.append((f"params {tag}", res["params"], m and m["params"], _ratio(res["params"], m and m["params"]), ""))
        for phase in ("forward", "train"):
            a, b = res[phase]["median_s"], m and m[phase]["median_s"]
            rows.append((f"{phase} median {tag}", a, b, _ratio(a, b), "s"))
            a, b = res[phase]["min_s"], m and m[phase]["min_s"]
            rows.append((f"{phase} min {tag}", a, b, _ratio(a, b), "s"))
            a, b = res[phase]["cpu_median_s"], m and m[phase]["cpu_median_s"]
            rows.append((f"{phase} CPU-time median {tag}", a, b, _ratio(a, b), "s"))
            a, b = res[phase]["peak_mb"], m and m[phase]["peak_mb"]
            rows.append((f"{phase} peak mem {tag}", a, b, _ratio(a, b), "MiB"))
    infers = [r for r in results if r["spec"]["kind"] == "infer" and "error" not in r["result"]]
    ikey = lambda r: (r["spec"]["mode"], r["spec"]["dtype"], lever_name(r["spec"]["levers"]))  # noqa: E731
    mi = {ikey(r): r["result"] for r in infers if r["spec"]["impl"] == "monai"}
    for r in infers:
        if r["spec"]["impl"] != "ours":
            continue
        m = mi.get(ikey(r))
        res = r["result"]
        lv = dict(r["spec"]["levers"])
        tag = f"{r['spec']['mode']}/{r['spec']['dtype']}/{lever_name(lv)} {'x'.join(map(str, res['volume']))}"
        rows.append((f"infer time {tag}", res["median_s"], m and m["median_s"], _ratio(res["median_s"], m and m["median_s"]), "s"))
        rows.append((f"infer CPU time {tag}", res["cpu_median_s"], m and m["cpu_median_s"],
                     _ratio(res["cpu_median_s"], m and m["cpu_median_s"]), "s"))
        rows.append((f"infer peak mem {tag}", res["peak_mb"], m and m["peak_mb"], _ratio(res["peak_mb"], m and m["peak_mb"]), "MiB"))
    for r in results:
        res = r["result"]
        if "error" in res:
            rows.append((f"{r['spec']['kind']} {r['spec'].get('impl', '')} ERROR {res['error']}", None, None, None, ""))
        elif r["spec"]["kind"] == "mcgcn":
            tag = f"batch {res['batch']}, {res['size']}, {r['spec'].get('dtype', 'fp32')}"
            rows.append((f"2D MC-GCN infer ({tag})", res["infer_slices_per_s"], None, None, "slices/s"))
            rows.append((f"2D MC-GCN train ({tag})", res["train_slices_per_s"], None, None, "slices/s"))
        elif r["spec"]["kind"] == "data":
            for k in ("plain_patches_per_s", "augment_patches_per_s", "loader_augment_patches_per_s"):
                if k in res:
                    rows.append((f"data {k}", res[k], None, None, "patches/s"))
            if "phantom_case_s" in res:
                rows.append((f"phantom: one {tuple(res['phantom_shape'])} case (target < 5 s)",
                             res["phantom_case_s"], None, None, "s"))
    base = next((r["result"] for r in models if r["spec"]["impl"] == "ours" and not r["spec"]["levers"]
                 and r["spec"]["dtype"] == "fp32"), None)
    if base is not None:
        need = results[0]["spec"]["batch"] / base["train"]["median_s"]
        rows.append(("data needed by training (batch / ours train step)", need, None, None, "patches/s"))
    return rows


def format_table(rows) -> str:
    def f(v):
        if v is None:
            return "-"
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:.4g}"
    w = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'figure'.ljust(w)}  {'ours':>12}  {'MONAI':>12}  {'ours/MONAI':>10}  unit"]
    for label, a, b, ratio, unit in rows:
        lines.append(f"{label.ljust(w)}  {f(a):>12}  {f(b):>12}  {f(ratio):>10}  {unit}")
    return "\n".join(lines)


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m ahnet.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128], metavar=("D", "H", "W"),
                   help="training patch in our (D, H, W); MONAI gets W x H x D")
    p.add_argument("--batch", type=int, default=2 if cuda else 1)
    p.add_argument("--pfn", type=int, default=4, help="pyramid levels (paper 4; MONAI needs H, W >= 128 for 4)")
    p.add_argument("--modes", nargs="+", default=["trilinear", "transpose"])
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--no-amp", action="store_true",
                   help="fp32 only (default: also CUDA float16, or CPU bfloat16 where the CPU computes it natively)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bfloat16 rows on a CPU without native bfloat16 too (emulated there: slower than fp32)")
    p.add_argument("--levers", nargs="*", default=["channels_last", "checkpoint=decoder", "checkpoint=all",
                                                   "channels_last+checkpoint=decoder", "channels_last+checkpoint=all"],
                   help="extra rows for ours: channels_last, compile, checkpoint=encoder|decoder|all, joined by +; "
                        "MONAI runs with the part it can take (channels_last, compile) for a like-for-like ratio")
    p.add_argument("--lever-mode", default="trilinear", help="upsampling mode of the lever rows")
    p.add_argument("--volume", type=int, nargs=3, default=[128, 512, 512] if cuda else [64, 256, 256],
                   metavar=("D", "H", "W"), help="inference volume (the issue's: 128 512 512 at 2.5 x 0.7 x 0.7 mm)")
    p.add_argument("--full-volume", action="store_true", help="inference on 128 x 512 x 512 (slow on a CPU)")
    p.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="default: --patch")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch", type=int, default=4 if cuda else 2)
    p.add_argument("--infer-modes", nargs="+", default=["trilinear"])
    p.add_argument("--infer-levers", nargs="*", default=None,
                   help="extra inference rows, both implementations: channels_last, dtype=amp|bf16, joined by + "
                        "(default: channels_last, and channels_last+dtype=<AMP dtype> where the device has AMP)")
    p.add_argument("--batch-2d", type=int, default=16 if cuda else 4)
    p.add_argument("--size-2d", type=int, nargs=2, default=[256, 256])
    p.add_argument("--data-samples", type=int, default=40)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--skip-model", action="store_true", help="no forward / training-step rows")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--skip-2d", action="store_true")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every worker (1 on a shared CPU: process CPU time then measures the work)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_volume:
        args.volume = [128, 512, 512]
    return args


def parse_infer_levers(items) -> list:
    """['channels_last', 'dtype=bf16', 'channels_last+dtype=amp'] -> list of dicts (dtype: fp32 | amp | bf16)."""
    out = []
    for item in items:
        lv = {}
        for part in item.split("+"):
            if part.startswith("dtype="):
                lv["dtype"] = part.split("=", 1)[1]
            elif part == "channels_last":
                lv["channels_last"] = True
            else:
                raise ValueError(f"unknown inference lever {part!r}; expected channels_last or dtype=amp|bf16")
        out.append(lv)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        res = WORKERS[spec["kind"]](spec)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0
    device = torch.device(args.device)
    try:
        import monai  # noqa: F401
    except ImportError:
        print("ahnet.bench needs MONAI (the optional extra 'peer': pip install -e '.[peer]')", file=sys.stderr)
        return 2
    plan = build_plan(args, device)
    results = []
    t0 = time.time()
    for i, (kind, spec) in enumerate(plan):
        label = f"{kind} {spec.get('impl', '')} {spec.get('mode', '')} {spec.get('dtype', '')} " \
                f"{lever_name(spec.get('levers', {}))}"
        print(f"[bench {i + 1}/{len(plan)}] {label}", flush=True)
        spec["threads"] = args.threads
        res = run_worker(spec, args.timeout)
        if "error" in res:
            print(f"    error: {res['error']}", flush=True)
        results.append({"spec": spec, "result": res})
    rows = summarise(results)
    table = format_table(rows)
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {"machine": machine_info(device), "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "wall_s": time.time() - t0, "results": results,
           "table": [dict(zip(("figure", "ours", "monai", "ratio", "unit"), r)) for r in rows]}
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
