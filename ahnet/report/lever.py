"""A lever's report (ahnet.commands.lever; numbers from ahnet.evaluate.across): each model's CPM with and without
the lever on the unshifted set and its shifted renderings, with intervals (lever_cpm.png); the paired differences
lever - base on each set, what each shift costs with and without the lever, and how much of that cost the lever
recovers (the tables). Written atomically into one folder: report.json, report.md and the figure."""
from __future__ import annotations

import json
from pathlib import Path

from ahnet import paths
from ahnet.atomic import atomic_path, write_text_atomic
from ahnet.report.claims import display
from ahnet.report.thickness import cell, png_bytes, values_and_errors

CPM_FIGURE = "lever_cpm.png"


def cpm_figure(summary: dict) -> bytes:
    """One panel per model: its CPM [interval] on each set, without and with the lever, side by side."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    sets, variants = summary["sets"], summary["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(0.9 * len(sets) + 2.2, 3.2) if len(variants) == 1 else
                             (3.4 * len(variants), 3.2), squeeze=False)
    for ax, v in zip(axes[0], variants):
        for j, exp in enumerate((summary["base"], summary["lever"])):
            y, yerr = values_and_errors([summary["cpm"][s][f"{exp}/{v}"]["overall"] for s in sets])
            ax.errorbar(np.arange(len(sets)) + 0.15 * (2 * j - 1), y, yerr=yerr, fmt="o", ms=4, capsize=2, label=exp)
        ax.set_xticks(range(len(sets)), sets, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(sets) - 0.5)
        ax.set_ylim(0, 1)
        ax.set_title(display(v), fontsize=9)
    axes[0][0].set_ylabel("CPM")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return png_bytes(fig)


def variant_table(summary: dict, v: str) -> list:
    """Markdown lines for one model: a row per set; CPM without and with the lever, their difference, the shift's
    cost to each (against the unshifted set) and what the lever recovers of it."""
    base, lever = f"{summary['base']}/{v}", f"{summary['lever']}/{v}"
    pair = next(p for p in summary["pairs"] if p["a"] == lever and p["b"] == base)
    first = summary["sets"][0]
    lines = [f"## {display(v)}", "",
             f"| set | CPM {summary['base']} | CPM {summary['lever']} | lever - base | shift's cost, base | "
             f"shift's cost, lever | recovered by the lever |", "|---|---|---|---|---|---|---|"]
    for s in summary["sets"]:
        moved = ["-", "-", "-"] if s == first else [
            cell(summary["change"][s][base]["overall"], True), cell(summary["change"][s][lever]["overall"], True),
            cell(pair["interaction"][s]["overall"], True)]
        lines.append(f"| {s} | {cell(summary['cpm'][s][base]['overall'], False)} | "
                     f"{cell(summary['cpm'][s][lever]['overall'], False)} | {cell(pair['by_set'][s]['overall'], True)}"
                     f" | " + " | ".join(moved) + " |")
    groups = summary["groups"]
    lines += ["", f"lever - base per composition group, and what the lever recovers of each shift's cost ({first} "
                  f"as the reference):", "", "| | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    lines += [f"| lever - base, {s} | " + " | ".join(cell(pair["by_set"][s][g], True) for g in groups) + " |"
              for s in summary["sets"]]
    lines += [f"| recovered, {s} | " + " | ".join(cell(pair["interaction"][s][g], True) for g in groups) + " |"
              for s in summary["sets"][1:]]
    return lines + [""]


def changes_line(summary: dict) -> str:
    """The report's sentence on what the lever changes (its training settings and training phantom's options)."""
    changes, of = summary.get("changes"), summary.get("changes_of", "the first model")
    if changes is None:
        return (f"What the lever changes: not read here (the {of} runs' config.json or training phantoms are "
                f"absent, as in a copy kept as evidence).")
    if not changes:
        return f"What the lever changes: nothing in the {of} runs' training settings or training phantom."
    return f"What the lever changes ({of} runs' settings and training phantoms): " + "; ".join(
        f"`{c}`" for c in changes) + "."


def write_lever_report(summary: dict, out_dir, title: str, provenance: str = "") -> Path:
    """report.json, report.md and the figure of a lever summary into ``out_dir``; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CPM_FIGURE) as tmp:
        tmp.write_bytes(cpm_figure(summary))
    runs = ", ".join(f"{n} run(s)" for n in sorted(set(summary["runs_per_model"].values())))
    shifted = ", ".join(summary["sets"][1:]) or "none"
    lines = [f"# {title}", "",
             f"{summary['lever']} (the lever) against {summary['base']} (the base) on the same {summary['n_scans']} "
             f"scans, unshifted ({summary['sets'][0]}) and rendered with each shift ({shifted}); {runs} per model. "
             f"A shift's cost is the model on the shifted set minus the model on the unshifted one; what the lever "
             f"recovers is (lever - base, shifted) - (lever - base, unshifted): positive where the lever makes the "
             f"shift cost less. Intervals: {summary['n_bootstrap']} resamples of the scans (the same draws on every "
             f"set) and of each model's seeds; bold: the interval excludes 0. Groups: solid T01-T06, part-solid "
             f"T07-T08, ground-glass T09-T10, calcified T11-T12.", ""]
    if provenance:
        lines += [provenance, ""]
    lines += [changes_line(summary), "", f"![CPM with and without the lever]({CPM_FIGURE})", ""]
    for v in summary["variants"]:
        lines += variant_table(summary, v)
    write_text_atomic(out / paths.REPORT_JSON, json.dumps(summary, indent=1, allow_nan=False))
    return write_text_atomic(out / paths.REPORT_MD, "\n".join(lines) + "\n")
