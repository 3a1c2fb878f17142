"""The bench's table: rows (figure, ours, MONAI, ours / MONAI, unit) from the workers' results, and the
machine they ran on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ahnet.bench.plan import lever_name, peer_levers


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


def _ok(results: list, kind: str) -> list:
    return [r for r in results if r["spec"]["kind"] == kind and "error" not in r["result"]]


def _model_rows(results: list) -> list:
    """Parameters, forward and training-step rows: each of ours against MONAI with the levers it can take."""
    models = _ok(results, "model")

    def key(r, levers):
        return r["spec"]["mode"], r["spec"]["dtype"], lever_name(levers)

    monai = {key(r, r["spec"]["levers"]): r["result"] for r in models if r["spec"]["impl"] == "monai"}
    rows = []
    for r in (r for r in models if r["spec"]["impl"] == "ours"):
        peer = peer_levers(r["spec"]["levers"])
        m = monai.get(key(r, peer))
        res = r["result"]
        tag = f"{r['spec']['mode']}/{r['spec']['dtype']}/{lever_name(r['spec']['levers'])}"
        if peer:
            tag += f" (MONAI {lever_name(peer)})"
        rows.append((f"params {tag}", res["params"], m and m["params"], _ratio(res["params"], m and m["params"]), ""))
        for phase in ("forward", "train"):
            for field, label, unit in (("median_s", "median", "s"), ("min_s", "min", "s"),
                                       ("cpu_median_s", "CPU-time median", "s"), ("peak_mb", "peak mem", "MiB")):
                a, b = res[phase][field], m and m[phase][field]
                rows.append((f"{phase} {label} {tag}", a, b, _ratio(a, b), unit))
        for group, a in res.get("train_ops", {}).items():
            b = m and m.get("train_ops", {}).get(group)
            rows.append((f"train CPU time in {group} {tag}", a, b, _ratio(a, b), "s"))
    return rows


def _infer_rows(results: list) -> list:
    """Whole-volume inference rows, ours against MONAI under the same levers."""
    infers = _ok(results, "infer")

    def key(r):
        return r["spec"]["mode"], r["spec"]["dtype"], lever_name(r["spec"]["levers"])

    monai = {key(r): r["result"] for r in infers if r["spec"]["impl"] == "monai"}
    rows = []
    for r in (r for r in infers if r["spec"]["impl"] == "ours"):
        m = monai.get(key(r))
        res = r["result"]
        tag = f"{r['spec']['mode']}/{r['spec']['dtype']}/{lever_name(r['spec']['levers'])} " \
              f"{'x'.join(map(str, res['volume']))}"
        for field, label, unit in (("median_s", "time", "s"), ("cpu_median_s", "CPU time", "s"),
                                   ("peak_mb", "peak mem", "MiB")):
            a, b = res[field], m and m[field]
            rows.append((f"infer {label} {tag}", a, b, _ratio(a, b), unit))
    return rows


def _other_rows(results: list) -> list:
    """Error rows, the 2D stage's slices per second, the data pipeline's patches per second."""
    rows = []
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
    return rows


def _preset_rows(results: list) -> list:
    """The --preset section's rows (ahnet.bench.preset): steps by phase, validations, the guard per conv call."""
    rows = []
    for r in _ok(results, "step"):
        res = r["result"]
        tag = f"{res['variant']} batch {res['batch']} guard {res['guard']}" + (" compiled" if res["compile"] else "") \
            + ("" if res.get("fused", "on") != "off" else " fused off") \
            + (" z-pool max_pool3d" if res.get("zpool") == "maxpool" else "")
        rows.append((f"step {tag}: median", res["step_median_s"], None, None, "s"))
        rows.append((f"step {tag}: min", res["step_min_s"], None, None, "s"))
        rows.append((f"step {tag}: CPU time per step", res["cpu_per_step_s"], None, None, "s"))
        rows.append((f"step {tag}: per patch", res["per_patch_median_s"], None, None, "s"))
        rows.append((f"step {tag}: CPU time per patch", res["cpu_per_patch_s"], None, None, "s"))
        rows += [(f"step {tag}: {p} (CPU time)", v, None, None, "s")
                 for p, v in res["phases_cpu_median_s"].items() if p != "step"]
        rows.append((f"step {tag}: peak mem", res["peak_mb"], None, None, "MiB"))
        if "first_step_s" in res:
            rows.append((f"step {tag}: first step (compiles)", res["first_step_s"], None, None, "s"))
    for r in _ok(results, "validation"):
        res = r["result"]
        tag = f"{res['variant']} ({res['cases']} cases, untrained weights{', compiled' if res['compile'] else ''})"
        for k in ("validation_s", "validation_cpu_s", "predict_s", "predict_cpu_s", "candidates_s",
                  "candidates_cpu_s", "rest_s", "rest_cpu_s", "first_pass_s"):
            if k in res:
                rows.append((f"validation {tag}: {k[:-2]}", res[k], None, None, "s"))
    for r in _ok(results, "guard_calls"):
        res = r["result"]
        for c in res["calls"]:
            tag = f"{res['variant']} {c['conv']} {c['kernel']} on {c['input']}"
            rows += [(f"guard call {tag}: {m}", c[f"{m}_s"], None, None, "s")
                     for m in ("off", "float32", "pad", "wgrad_fp32")]
        rows += [(f"guard calls {res['variant']}, all per step: {k[:-2]}", v, None, None, "s")
                 for k, v in res["totals"].items()]
    return rows


def _scan_rows(results: list) -> list:
    """The --scans section's rows: each of our runs against MONAI's on the same scan size."""
    scans = _ok(results, "scan")
    monai = {tuple(r["spec"]["shape"]): r["result"] for r in scans if r["spec"]["impl"] == "monai"}
    scans.sort(key=lambda r: (r["spec"]["shape"][0], r["spec"]["impl"], -r["spec"].get("workers", 1)))
    rows = []
    for r in (r for r in scans if r["spec"]["impl"] == "ours"):
        res, m = r["result"], monai.get(tuple(r["spec"]["shape"]))
        tag = f"scan {'x'.join(map(str, res['shape']))} ({res['windows']} windows), {res['workers']} worker(s)" + \
              ("" if res.get("fold", True) else ", BN not folded")
        mt = m and m["total_s"]
        rows += [(f"{tag}: first stage (windows + candidates) vs MONAI's inferer", res["first_stage_s"], mt,
                  _ratio(res["first_stage_s"], mt), "s"),
                 (f"{tag}: windows alone", res["windows_s"], mt, _ratio(res["windows_s"], mt), "s"),
                 (f"{tag}: candidates ({res['candidates']})", res["candidates_s"], None, None, "s"),
                 (f"{tag}: second stage", res["second_stage_s"], None, None, "s"),
                 (f"{tag}: both stages vs MONAI's inferer", res["total_s"], mt, _ratio(res["total_s"], mt), "s"),
                 (f"{tag}: peak memory", res["peak_mb"], m and m["peak_mb"], _ratio(res["peak_mb"],
                                                                                   m and m["peak_mb"]), "MiB")]
    return rows


def summarise(results: list) -> list:
    """Rows (label, ours, monai, ratio, unit) for the printed table."""
    rows = (_model_rows(results) + _infer_rows(results) + _other_rows(results) + _preset_rows(results)
            + _scan_rows(results))
    base = next((r for r in _ok(results, "model") if r["spec"]["impl"] == "ours" and not r["spec"]["levers"]
                 and r["spec"]["dtype"] == "fp32"), None)
    if base is not None:
        need = base["spec"]["batch"] / base["result"]["train"]["median_s"]
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


#: the figures of a section that its block in the notes keeps (the JSON keeps every figure)
NOTE_FIGURES = {"models": ("CPU-time median", "peak mem", "CPU time in"),
                "preset": ("CPU time", "peak mem", "first step", "validation", "guard call"),
                "scans": ("",)}


def run_context() -> dict:
    """The commit (with "+changes" when the work tree differs from it), the date and the load average now: what a
    measurement recorded in the notes carries besides the machine."""
    import datetime

    from ahnet import commit_label
    commit = commit_label()
    return {"commit": commit, "date": datetime.date.today().isoformat(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def markdown_block(rows, section: str, command: str, machine: dict, start: dict, end: dict) -> str:
    """The notes' block of one run: how it was made (command, commit, machine, date, load before and after) and
    the table of the section's figures (NOTE_FIGURES), ours / MONAI where MONAI ran."""
    def f(v):
        return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3g}"
    keep = NOTE_FIGURES[section]
    lines = [f"`{command}` at commit `{start['commit']}`, {start['date']}, on {machine.get('device_name', '?')} "
             f"({machine.get('cpu_count')} cores), torch {machine.get('torch')}, MONAI {machine.get('monai')}; "
             f"load average {start['load_average']} before, {end['load_average']} after "
             f"(other jobs shared the cores when it is above the threads used).", "",
             "| figure | ours | MONAI | ours / MONAI | unit |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {f(a)} | {f(b)} | {f(r)} | {unit} |" for label, a, b, r, unit in rows
              if any(k in label for k in keep)]
    return "\n".join(lines)


def update_notes(path, section: str, block: str) -> bool:
    """Replace the text between ``<!-- bench:SECTION -->`` and ``<!-- /bench:SECTION -->`` in the notes file at
    ``path`` with ``block`` (written atomically); False when the file has no such markers."""
    from ahnet.atomic import write_text_atomic

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    if start not in text or end not in text.split(start, 1)[1]:
        return False
    head, rest = text.split(start, 1)
    write_text_atomic(path, f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}")
    return True
