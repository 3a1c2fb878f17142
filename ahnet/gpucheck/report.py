"""The GPU check's figures in one JSON document and one Markdown page (both written atomically)."""
from __future__ import annotations

import json
from pathlib import Path

from ahnet.atomic import write_text_atomic

from ahnet.gpucheck.parts import TESTS_LOG, TESTS_XML
from ahnet.gpucheck.training import CURVE_CSV, CURVE_PNG

JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
#: every file a check may write under --out
OUTPUTS = (JSON_NAME, MD_NAME, TESTS_LOG, TESTS_XML, CURVE_CSV, CURVE_PNG)


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _machine(doc: dict) -> list[str]:
    m = doc["machine"]
    rows = [("GPU", m.get("gpu")), ("GPUs", m.get("gpu_count")), ("GPU memory (GiB)", m.get("gpu_memory_gib")),
            ("compute capability", m.get("gpu_capability")), ("driver", m.get("driver")),
            ("CUDA (torch)", m.get("cuda")),
            ("cuDNN", m.get("cudnn")), ("torch", m.get("torch")), ("Python", m.get("python")),
            ("CPUs", m.get("cpu_count")), ("commit", (m.get("git") or {}).get("commit"))]
    out = ["| | |", "|---|---|"] + [f"| {k} | {_f(v)} |" for k, v in rows]
    out += ["", "Modules: " + ", ".join(f"{k} {v['version'] or '-'} ({v['source']})"
                                        for k, v in doc["modules"].items())]
    return out


def _tests(part: dict) -> list[str]:
    if "error" in part:
        return [f"Did not run: {part['error']}"]
    head = (f"{part['passed']} passed, {part['failed']} failed, {part['errors']} errors, {part['skipped']} skipped "
            f"in {part['seconds']} s" + (" (CPU rehearsal: AHNET_CUDA_TESTS_ON_CPU=1)" if part["rehearsal_on_cpu"]
                                          else "") + f"; output in `{TESTS_LOG}`, `{TESTS_XML}`.")
    out = [head, "", "| test | outcome | s | notes |", "|---|---|---|---|"]
    for c in part["cases"]:
        notes = "; ".join([c["message"]] * bool(c["message"]) + [f"{k}: {v}" for k, v in c["properties"].items()])
        out.append(f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {notes} |")
    return out


def _bench(part: dict) -> list[str]:
    if "error" in part:
        return [f"Did not run: {part['error']}"]
    out = [f"**{part['peer_skipped']}.**", ""] if part.get("peer_skipped") else []
    out += ["Goals of issue 14" + (" (a rehearsal: measured in one process at toy sizes, so peak memory is not "
                                   "isolated and no figure here means anything)" if part.get("in_process") else "")
           + ":", "", "| figure | ours | MONAI | value | goal | met |", "|---|---|---|---|---|---|"]
    for g in part["goals"]:
        out.append(f"| {g['figure']} | {_f(g['ours'])} | {_f(g['monai'])} | {_f(g['value'], 3)} | "
                   f"<= {g['target']} | {_f(g['met'])} |")
    out += ["", f"All rows (ahnet.bench's table; {part['seconds']} s):", "", "```", part["table"], "```"]
    return out


def _train(part: dict) -> list[str]:
    if "error" in part:
        return [f"Did not run: {part['error']}"]
    c = part["config"]
    out = [f"AH-Net {c['encoder']}, pyramid {c['pfn_depth']}, patch {c['patch_size']}, batch {c['batch_size']}, "
           f"amp {c['amp']}, lr {c['lr']} ({c['schedule']}), on {part['data']['train_cases']} + "
           f"{part['data']['validation_cases']} synthetic cases of {part['data']['shape']}: {part['epochs']} epochs, "
           f"{part['steps']} steps in {part['train_seconds']} s (data written in {part['data_seconds']} s); "
           f"best validation Dice {_f(part['best_val_dice'], 3)}; peak GPU memory {_f(part['peak_gpu_mb'], 5)} MiB. "
           f"Curve: `{CURVE_CSV}`, `{CURVE_PNG}`.", "",
           "| epoch | step | loss | val Dice | samples/s |", "|---|---|---|---|---|"]
    for r in part["curve"]:
        out.append(f"| {_f(r['epoch'], 3)} | {_f(r['step'], 6)} | {_f(r['loss'])} | {_f(r['val_dice'], 3)} | "
                   f"{_f(r['samples_per_s'], 3)} |")
    return out


def summary(doc: dict) -> str:
    """One sentence on the parts run: "every part passed", or which did NOT pass (and which did)."""
    failed = [k for k, v in doc["parts"].items() if not v.get("ok")]
    if not failed:
        return "every part passed" if doc["parts"] else "no part has run yet"
    passed = [k for k in doc["parts"] if k not in failed]
    return (f"{' and '.join(failed)} did NOT pass" + (f" ({' and '.join(passed)} passed)" if passed else ""))


def markdown(doc: dict) -> str:
    parts = doc["parts"]
    lines = [f"# GPU check ({doc['created']}{', tiny CPU rehearsal' if doc['tiny'] else ''})", "",
             f"`{doc['command']}`: {doc['wall_seconds']} s in all; {summary(doc)}.", "",
             "## Machine", ""] + _machine(doc)
    for key, title, fn in (("tests", "(a) CUDA tests", _tests), ("bench", "(b) Against MONAI's AHNet", _bench),
                           ("train", "(c) Training for a fixed time", _train)):
        if key in parts:
            lines += ["", f"## {title}", ""] + fn(parts[key])
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> None:
    write_text_atomic(Path(out) / JSON_NAME, json.dumps(doc, indent=1, default=str) + "\n")
    write_text_atomic(Path(out) / MD_NAME, markdown(doc))
