"""The shift study's report: every model's CPM on each shifted rendering of the final test set (or of dev) beside
the unshifted one, the paired difference with its interval (ahnet.evaluate.shifts.shift_summary), and a figure.
Written atomically into one folder: report.json, report.md and shifts.png."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ahnet import paths
from ahnet.atomic import atomic_path, write_text_atomic
from ahnet.report.claims import display

FIGURE = "shifts.png"


def shift_rows(summary: dict) -> list:
    """[[shift, model, CPM unshifted, CPM shifted, diff [CI], verdict]] in shift then model order."""
    rows = []
    for shift, by_model in summary["shifts"].items():
        for model, d in by_model.items():
            ci = "" if not d["ci"] else f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            decided = d["ci"] is not None and (d["ci"][0] > 0 or d["ci"][1] < 0)
            verdict = (f"costs > {summary['costly']:g}" if d["costly"] else "within") + (
                "; decided" if decided else "; not decided")
            rows.append([shift, display(model), f"{d['cpm_a']:.3f}", f"{d['cpm_b']:.3f}", f"{d['diff']:+.3f}{ci}",
                         verdict])
    return rows


def _figure(summary: dict) -> bytes:
    """Grouped bars: the CPM difference (shifted - unshifted) per shift and model, with its interval."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    shifts, models = list(summary["shifts"]), summary["models"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shifts) * max(1, len(models)) / 2), 4.0))
    w = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        x = np.arange(len(shifts)) + (j - (len(models) - 1) / 2) * w
        d = [summary["shifts"][s][m] for s in shifts]
        y = [v["diff"] for v in d]
        err = [[v["diff"] - v["ci"][0] for v in d], [v["ci"][1] - v["diff"] for v in d]] if all(v["ci"] for v in d) \
            else None
        ax.bar(x, y, w, yerr=err, capsize=2, label=display(m))
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-summary["costly"], color="r", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(shifts)), shifts, rotation=30, ha="right")
    ax.set_ylabel("CPM shifted - unshifted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_shift_report(summary: dict, out_dir, title: str, where: str = "the final set") -> Path:
    """report.json, report.md and shifts.png of a shift summary of ``where`` (the final set, or dev) into
    ``out_dir``; returns the Markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / FIGURE) as tmp:
        tmp.write_bytes(_figure(summary))
    pct = "95%"
    head = ["shift", "model", "CPM unshifted", "CPM shifted", f"diff [{pct} CI, scans and seeds]", "verdict"]
    lines = [f"# {title}", "", f"Every model evaluated, without retraining, on {where} and on {where} "
             f"rendered with one change at a time; differences paired over {summary['n_bootstrap']} resamples of "
             f"scans and seeds. A shift costs too much when its point estimate is below -{summary['costly']:g}.", "",
             f"![shifts]({FIGURE})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in shift_rows(summary)]
    write_text_atomic(out / paths.REPORT_JSON, json.dumps(summary, indent=1, allow_nan=False))
    return write_text_atomic(out / paths.REPORT_MD, "\n".join(lines) + "\n")
