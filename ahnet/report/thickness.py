"""The slice-thickness study's report (ahnet.evaluate.thickness.thickness_summary): CPM against slice spacing per
model, overall and per composition group, with intervals (thickness_cpm.png); the paired differences between models
at each spacing and how they move between spacings (thickness_pairs.png and the tables). Written atomically into
one folder: report.json, report.md and the two figures."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ahnet import paths
from ahnet.atomic import atomic_path, write_text_atomic
from ahnet.report.claims import display

CPM_FIGURE = "thickness_cpm.png"
PAIRS_FIGURE = "thickness_pairs.png"


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes (90 dpi); closes it."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def values_and_errors(entries) -> tuple:
    """(values, [below, above]) of estimates {"value", "ci"} for matplotlib's errorbar: NaN for a missing value,
    0 error where there is no interval."""
    y = [float("nan") if e["value"] is None else e["value"] for e in entries]
    lo = [0 if not e["ci"] or e["value"] is None else e["value"] - e["ci"][0] for e in entries]
    hi = [0 if not e["ci"] or e["value"] is None else e["ci"][1] - e["value"] for e in entries]
    return y, [lo, hi]


def _errorbars(ax, xs, entries, label, offset):
    """One model's (or pair's) values with their intervals against spacing, points nudged by ``offset`` (log x)."""
    import numpy as np
    y, yerr = values_and_errors(entries)
    ax.errorbar(np.asarray(xs) * 2 ** offset, y, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, label=label)


def _panels(summary: dict, n: int):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.2), squeeze=False)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["spacings"], [f"{s:g}" for s in summary["spacings"]])
        ax.minorticks_off()
        ax.set_xlim(min(summary["spacings"]) / 1.3, max(summary["spacings"]) * 1.3)
        ax.set_xlabel("slice spacing (mm)")
    return fig, axes[0]


def cpm_figure(summary: dict) -> bytes:
    """One panel per group (overall first): each model's CPM [interval] against slice spacing."""
    fig, axes = _panels(summary, len(summary["groups"]))
    models, xs = summary["models"], summary["spacings"]
    for ax, g in zip(axes, summary["groups"]):
        for j, m in enumerate(models):
            _errorbars(ax, xs, [summary["cpm"][f"{s:g}"][m][g] for s in xs], display(m),
                       0.06 * (j - (len(models) - 1) / 2))
        ax.set_title(g, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("CPM")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return png_bytes(fig)


def pairs_figure(summary: dict) -> bytes:
    """One panel per group: each pair's difference a - b [paired interval] against slice spacing."""
    fig, axes = _panels(summary, len(summary["groups"]))
    pairs, xs = summary["pairs"], summary["spacings"]
    for ax, g in zip(axes, summary["groups"]):
        for j, p in enumerate(pairs):
            _errorbars(ax, xs, [p["by_set"][f"{s:g}"][g] for s in xs],
                       f"{display(p['a'])} - {display(p['b'])}", 0.06 * (j - (len(pairs) - 1) / 2))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(g, fontsize=9)
    axes[0].set_ylabel("CPM difference")
    axes[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return png_bytes(fig)


def cell(e: dict, signed: bool) -> str:
    """A value [interval] as a table cell, signed for a difference, bold when decided; "-" for none."""
    if e["value"] is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    ci = f" [{fmt.format(e['ci'][0])}, {fmt.format(e['ci'][1])}]" if e["ci"] else ""
    text = fmt.format(e["value"]) + ci
    return f"**{text}**" if e.get("decided") else text


def summary_tables(summary: dict) -> list:
    """Markdown lines: CPM per model and spacing, then each pair at each spacing, then each pair's change between
    spacings; a row per (model or pair, spacing), a column per group; decided differences in bold."""
    groups, spacings = summary["groups"], [f"{s:g}" for s in summary["spacings"]]
    head = "| {} | slice spacing (mm) | " + " | ".join(groups) + " |"
    rule = "|---|---|" + "---|" * len(groups)
    lines = ["## CPM [95% CI] per model", "", head.format("model"), rule]
    for m in summary["models"]:
        lines += [f"| {display(m)} | {s} | " + " | ".join(cell(summary["cpm"][s][m][g], False) for g in groups) + " |"
                  for s in spacings]
    first = spacings[0]
    lines += ["", f"## How each model moves with slice spacing: (model at s) - (model at {first} mm), paired by scan",
              "", head.format("model"), rule]
    for m in summary["models"]:
        lines += [f"| {display(m)} | {s} vs {first} | " + " | ".join(cell(summary["change"][s][m][g], True)
                                                                 for g in groups) + " |" for s in spacings[1:]]
    lines += ["", "## Paired differences a - b at each spacing (bold: the interval excludes 0)", "",
              head.format("a - b"), rule]
    for p in summary["pairs"]:
        name = f"{display(p['a'])} - {display(p['b'])}"
        lines += [f"| {name} | {s} | " + " | ".join(cell(p["by_set"][s][g], True) for g in groups) + " |"
                  for s in spacings]
    lines += ["", f"## How each difference moves with slice spacing: (a - b at s) - (a - b at {first} mm)", "",
              head.format("a - b"), rule]
    for p in summary["pairs"]:
        name = f"{display(p['a'])} - {display(p['b'])}"
        lines += [f"| {name} | {s} vs {first} | " + " | ".join(cell(p["interaction"][s][g], True) for g in groups)
                  + " |" for s in spacings[1:]]
    return lines


def write_thickness_report(summary: dict, out_dir, title: str, provenance: str = "") -> Path:
    """report.json, report.md and the two figures of a thickness summary into ``out_dir``; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in ((CPM_FIGURE, cpm_figure(summary)), (PAIRS_FIGURE, pairs_figure(summary))):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(png)
    runs = ", ".join(f"{display(m)} {n} run(s)" for m, n in summary["runs_per_model"].items())
    lines = [f"# {title}", "",
             f"The same final test set ({summary['n_scans']} scans) rendered at "
             f"{', '.join(f'{s:g}' for s in summary['spacings'])} mm slices; every model trained and evaluated at "
             f"each spacing ({runs})."
             f" Intervals: {summary['n_bootstrap']} resamples of the scans (the same draws at every spacing) and of "
             f"each model's seeds. Groups: solid T01-T06, part-solid T07-T08, ground-glass T09-T10, calcified "
             f"T11-T12.", ""]
    if provenance:
        lines += [provenance, ""]
    lines += [f"![CPM against slice spacing]({CPM_FIGURE})", "", f"![paired differences]({PAIRS_FIGURE})", ""]
    lines += summary_tables(summary)
    write_text_atomic(out / paths.REPORT_JSON, json.dumps(summary, indent=1, allow_nan=False))
    return write_text_atomic(out / paths.REPORT_MD, "\n".join(lines) + "\n")
