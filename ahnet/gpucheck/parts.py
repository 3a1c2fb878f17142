"""Parts (a) and (b) of the GPU check: the CUDA-marked tests, and the benchmark against MONAI's AHNet.

(a) ``pytest -m cuda tests/test_cuda.py`` in a subprocess (CUBLAS_WORKSPACE_CONFIG set before CUDA starts),
    its output and JUnit XML kept; each test's outcome, time and recorded figures are read back. On a CPU
    (``--tiny``) the tests rehearse with AHNET_CUDA_TESTS_ON_CPU=1.
(b) ahnet.bench's workers, one fresh process per measurement (``--tiny``: in this process, a rehearsal of the
    specs and the report, not of the memory isolation): the training step (forward, loss, backward,
    Adam; median of ``repeats`` after ``warmup``) and its peak GPU memory, ours against MONAI's AHNet at the
    paper's size (ResNet50, 4 pyramid levels, 32 x 128 x 128, batch 2, float16 AMP on both sides; plain and
    channels-last), and sliding-window inference of a 128 x 512 x 512 volume (window 32 x 128 x 128, overlap
    0.5, 4 windows per batch, AMP, channels-last). The goals of issue 14 are judged on these rows. Without MONAI
    (not installed, no wheel carried in .whl/) our rows run alone and the report says MONAI's were skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ahnet.atomic import write_text_atomic

#: issue 14's goals: ours / MONAI for the training step time and its peak memory; seconds for inference
GOALS = {"train_time_ratio": 0.8, "train_memory_ratio": 0.7, "infer_seconds": 1.0}
TESTS_LOG, TESTS_XML = "cuda_tests.log", "cuda_tests.xml"


# ------------------------------------------------------------------------------------------- (a) tests
def _cases(xml: Path) -> list[dict]:
    """[{"name", "outcome", "seconds", "message", "properties"}] from a JUnit XML file."""
    cases = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "").strip().splitlines()[0][:300] if el.get("message") else ""
                break
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        cases.append({"name": tc.get("name"), "outcome": outcome, "seconds": float(tc.get("time") or 0),
                      "message": message, "properties": props})
    return cases


def run_tests(root: Path, out: Path, rehearse: bool, timeout: float) -> dict:
    """Run the CUDA-marked tests; their output goes to out/cuda_tests.log and out/cuda_tests.xml."""
    xml_tmp = out / f".{TESTS_XML}.tmp-{os.getpid()}"
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    if rehearse:
        env["AHNET_CUDA_TESTS_ON_CPU"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={xml_tmp}"]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:     # its partial output comes as bytes
        text = "".join(b.decode(errors="replace") if isinstance(b, bytes) else b for b in (e.stdout, e.stderr) if b)
        code, text = None, f"{text}\ntimed out after {timeout:g} s"
    write_text_atomic(out / TESTS_LOG, text)
    cases = []
    if xml_tmp.exists():
        cases = _cases(xml_tmp)
        os.replace(xml_tmp, out / TESTS_XML)
    count = {k + "s" * (k == "error"): sum(c["outcome"] == k for c in cases)
             for k in ("passed", "failed", "error", "skipped")}
    ok = code == 0 and count["failed"] == count["errors"] == 0 and count["passed"] > 0
    return {"ok": ok, "exit_code": code, "rehearsal_on_cpu": rehearse, **count, "cases": cases,
            "seconds": round(time.monotonic() - t0, 1), "command": " ".join(cmd[1:])}


# ------------------------------------------------------------------------------------------- (b) bench
def bench_specs(device: str, tiny: bool, impls: list[str]) -> list[tuple[str, dict]]:
    """The measurements, as ahnet.bench worker specs (kind, spec)."""
    if tiny:       # a CPU rehearsal of the same code: one small step, one window, one thread
        model = dict(pfn=0, patch=[32, 64, 64], batch=1, warmup=0, repeats=1, dtype="fp32", levers=[{}])
        infer = dict(volume=[32, 64, 64], sw_batch=1, repeats=1, levers=[{}])
    else:
        model = dict(pfn=4, patch=[32, 128, 128], batch=2, warmup=3, repeats=10, dtype="amp",
                     levers=[{}, {"channels_last": True}])
        infer = dict(volume=[128, 512, 512], sw_batch=4, repeats=3, levers=[{"channels_last": True}])
    plan = []
    for lv in model["levers"]:
        for impl in impls:
            plan.append(("model", dict(kind="model", impl=impl, mode="trilinear", device=device, pfn=model["pfn"],
                                       patch=model["patch"], batch=model["batch"], warmup=model["warmup"],
                                       repeats=model["repeats"], dtype=model["dtype"], levers=lv)))
    for lv in infer["levers"]:
        for impl in impls:
            plan.append(("infer", dict(kind="infer", impl=impl, mode="trilinear", device=device, pfn=model["pfn"],
                                       volume=infer["volume"], window=model["patch"], overlap=0.5,
                                       sw_batch=infer["sw_batch"], repeats=infer["repeats"], dtype=model["dtype"],
                                       levers=lv)))
    return plan


def _goal_rows(results: list) -> list[dict]:
    """The goals of issue 14 judged on the plain AMP training rows and our fastest inference row."""
    by = {(r["spec"]["kind"], r["spec"]["impl"], bool(r["spec"]["levers"])): r["result"] for r in results
          if "error" not in r["result"]}
    rows = []
    ours, monai = by.get(("model", "ours", False)), by.get(("model", "monai", False))
    if ours and monai:
        for key, field, label in (("train_time_ratio", "median_s", "training step time"),
                                  ("train_memory_ratio", "peak_mb", "training step peak memory")):
            a, b = ours["train"][field], monai["train"][field]
            ratio = a / b if b > 0 else None      # (in one process MONAI's memory above the baseline can be 0)
            rows.append({"goal": key, "figure": f"{label}, ours / MONAI", "ours": a, "monai": b, "value": ratio,
                         "target": GOALS[key], "met": None if ratio is None else ratio <= GOALS[key]})
    infers = [r["result"] for r in results if r["spec"]["kind"] == "infer" and r["spec"]["impl"] == "ours"
              and "error" not in r["result"]]
    if infers:
        best = min(infers, key=lambda r: r["median_s"])
        rows.append({"goal": "infer_seconds", "figure": f"inference of {'x'.join(map(str, best['volume']))}, s",
                     "ours": best["median_s"], "monai": None, "value": best["median_s"],
                     "target": GOALS["infer_seconds"], "met": best["median_s"] <= GOALS["infer_seconds"]})
    return rows


def _in_process(spec: dict, timeout: float) -> dict:
    """A worker's measurement in this process ({"error": ...} when it fails), for the CPU rehearsal."""
    from ahnet.bench.workers import WORKERS
    try:
        return WORKERS[spec["kind"]](spec)
    except Exception as e:
        return {"error": [f"{type(e).__name__}: {e}"]}


def peer_skipped(why: str) -> str:
    """The bench part's note when MONAI is missing (``why``: where the module search ended)."""
    return f"MONAI's rows skipped: MONAI is {why}, so ours ran alone and the goals against MONAI are not judged"


def run_bench(device: str, tiny: bool, peer_missing: str | None, timeout: float, log) -> dict:
    """Every planned measurement in its own process; the bench's table rows, and the goals. ``peer_missing``:
    None when MONAI is importable, else why not: then our rows alone, with the note peer_skipped(why)."""
    from ahnet.bench.report import format_table, summarise
    from ahnet.bench.workers import run_worker

    t0 = time.monotonic()
    results = []
    note = None if peer_missing is None else peer_skipped(peer_missing)
    if note:
        log(f"[gpu-check] bench: {note}")
    plan = bench_specs(device, tiny, ["ours"] if note else ["ours", "monai"])
    for i, (kind, spec) in enumerate(plan):
        log(f"[gpu-check] bench {i + 1}/{len(plan)}: {kind} {spec['impl']} {spec['dtype']} {spec['levers'] or ''}")
        res = (_in_process if tiny else run_worker)(dict(spec, threads=1 if tiny else None), timeout)
        if "error" in res:
            log(f"    error: {res['error']}")
        results.append({"spec": spec, "result": res})
    rows = summarise(results)
    table = format_table(rows)
    errors = [r for r in results if "error" in r["result"]]
    return {"ok": not errors, "in_process": tiny, "results": results, "goals": _goal_rows(results), "table": table,
            "rows": [dict(zip(("figure", "ours", "monai", "ratio", "unit"), r)) for r in rows],
            "peer_skipped": note, "seconds": round(time.monotonic() - t0, 1)}
