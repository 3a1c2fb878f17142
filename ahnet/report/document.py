"""The per-type comparison report: report.json (stable keys), report.md and a self-contained report.html.

Rendering (``build_report``): tables, figures and the three files, written atomically.

Optional inputs of ``build_report`` add sections: ``comparisons`` (ahnet.evaluate.froc.paired_bootstrap over the same
models: the paper's claims with paired intervals, a type won only where the interval excludes 0; module
``claims``), ``runs`` ({model: run folder}: learning curves from each log.csv; module ``curves``), ``gallery``
(ahnet.evaluate.gallery_crops: crops of hits, misses and false positives; module ``gallery``) and ``candidates``
(the candidate rule, one line) and ``stages`` (ahnet.evaluate.compare_stages: each first stage alone beside its
system; module ``stages``). Every model's "found" entry says how many nodules it finds at 1 FP/scan.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ahnet import paths
from ahnet.atomic import atomic_paths
from ahnet.data.nodule_types import TYPE_CODES
from ahnet.report.claims import claim_sentence, comparison_tables, found_line
from ahnet.report.curves import budget_table, curves_figure, read_curves
from ahnet.report.forest import FIGURE as CLAIMS_FIGURE, claims_figure
from ahnet.report.gallery import gallery_figures, row_names
from ahnet.report.stages import stage_tables
from ahnet.report.summary import TIE_TOL, summarize


# ----------------------------------------------------------------------------------------------- formatting
def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _ci(ci, nd=3):
    return "" if not ci else f" [{_f(ci[0], nd)}, {_f(ci[1], nd)}]"


def _fr(f):
    return {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}.get(f, f"{f:g}")


def _tables(rep) -> list:
    """[(title, header, rows)] shared by the Markdown and HTML writers."""
    names, types = rep["model_order"], rep["types"]
    out = []
    rows = []
    for m in names:
        r = rep["models"][m]
        d = r["dice"] or {}
        rows.append([m, str(r["n_scans"]), str(r["n_nodules"]), _f(r["cpm"]) + _ci(r["cpm_ci"]),
                     _f(d.get("mean")) + _ci(d.get("ci")), str(rep["wins"][m]), str(rep["wins_outright"][m])])
    out.append(("Overall", ["model", "scans", "nodules", "CPM [95% CI]", "Dice [95% CI]",
                            f"types won (of {len(types)})", "won alone"], rows))
    rows = []
    for t in types:
        n = max(rep["models"][m]["types"][t]["n"] for m in names)
        cells = [f"{t} {rep['type_names'][t]}", str(n)]
        for m in names:
            g = rep["models"][m]["types"][t]
            cells.append(_f(g["cpm"]) + _ci(g["cpm_ci"]))
        w = rep["winners"][t]
        cells.append(", ".join(w["models"]) + (" (tie)" if w["tie"] else "") if w["models"] else "no winner")
        rows.append(cells)
    out.append(("CPM per type (best model per type)", ["type", "n"] + names + ["best"], rows))
    rows = []
    for t in types:
        cells = [t]
        for m in names:
            d = rep["models"][m]["types"][t]["dice"] or {}
            cells.append(_f(d.get("mean")) + _ci(d.get("ci")))
        rows.append(cells)
    out.append(("Dice per type", ["type"] + names, rows))
    for m in names:
        r = rep["models"][m]
        head = ["group", "n"] + [f"sens@{_fr(f)}" for f in rep["fp_rates"]] + ["CPM [95% CI]"]
        rows = [["all", str(r["n_nodules"])] + [_f(s) for s in (r["sensitivity"] or [None] * 7)]
                + [_f(r["cpm"]) + _ci(r["cpm_ci"])]]
        for label, g in list(r["types"].items()) + list(r["locations"].items()):
            sens = g["sensitivity"] or [None] * len(rep["fp_rates"])
            rows.append([label, str(g["n"])] + [_f(s) for s in sens] + [_f(g["cpm"]) + _ci(g["cpm_ci"])])
        out.append((f"Sensitivity per FP/scan: {m}", head, rows))
    return out


def _md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- figures
def _froc_figure(plt, rep):
    """FROC curves of every model with their bootstrap bands, log2 false positives per scan."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(rep["model_order"]):
        r = rep["models"][m]
        c = f"C{i % 10}"
        fr = r.get("froc") or {}
        fps = np.asarray(fr.get("fps", []), float)
        sens = np.array([np.nan if s is None else s for s in fr.get("sensitivity", [])], float)
        if fps.size:
            # step curve up to the last vertex, then held (as the interpolation does)
            fps_p = np.maximum(np.append(fps, 8.0), 1 / 16)
            ax.plot(fps_p, np.append(sens, sens[-1]), color=c, drawstyle="steps-post",
                    label=f"{m} (CPM {_f(r['cpm'])})")
        band = r.get("froc_band") or {}
        if band.get("lower"):
            lo = np.array([np.nan if v is None else v for v in band["lower"]], float)
            hi = np.array([np.nan if v is None else v for v in band["upper"]], float)
            ax.fill_between(band["fps"], lo, hi, color=c, alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rep["fp_rates"], [_fr(f) for f in rep["fp_rates"]])
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("FROC (shaded: 95% bootstrap band)")
    return fig


def _bar_figure(plt, names, get, ylabel, title, groups, group_labels):
    """Grouped bars with CI whiskers: get(model, group) -> (value or None, (low, high) or None)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(groups) * max(1, len(names)) / 2 + 3), 4.2))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(groups))
    for i, m in enumerate(names):
        vals, lo, hi = [], [], []
        for g in groups:
            v, ci = get(m, g)
            vals.append(np.nan if v is None else v)
            lo.append(0 if (v is None or not ci) else max(v - ci[0], 0))
            hi.append(0 if (v is None or not ci) else max(ci[1] - v, 0))
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, yerr=[lo, hi], capsize=2, label=m,
               color=f"C{i % 10}", error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, group_labels, rotation=0 if len(groups) <= 12 else 45, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(names), 4))
    return fig


def _figures(rep, gallery=None) -> dict:
    """{file name: PNG bytes} made with matplotlib (Agg): FROC, per-type CPM, sensitivity and Dice, location CPM,
    learning curves, the gallery and the comparison at a glance (when the report has them)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names, types, models = rep["model_order"], rep["types"], rep["models"]
    tl = [f"{t}\nn={max(models[m]['types'][t]['n'] for m in names)}" for t in types]
    j1 = rep["fp_rates"].index(1.0) if 1.0 in rep["fp_rates"] else len(rep["fp_rates"]) // 2

    def sens_at(m, t):
        g = models[m]["types"][t]
        if not g["sensitivity"]:
            return None, None
        return g["sensitivity"][j1], (g["sensitivity_ci"][j1] if g["sensitivity_ci"] else None)

    def dice_of(m, t):
        d = models[m]["types"][t]["dice"]
        return (d["mean"], d["ci"]) if d else (None, None)

    made = {"froc.png": _froc_figure(plt, rep),
            "type_cpm.png": _bar_figure(plt, names, lambda m, t: (models[m]["types"][t]["cpm"],
                                                                  models[m]["types"][t]["cpm_ci"]),
                                        "CPM (mean sensitivity 1/8..8 FP/scan)", "Per-type detection (95% CI)",
                                        types, tl),
            "type_sensitivity.png": _bar_figure(plt, names, sens_at, f"sensitivity at {_fr(rep['fp_rates'][j1])} "
                                                f"FP/scan", "Per-type sensitivity (95% CI)", types, tl),
            "type_dice.png": _bar_figure(plt, names, dice_of, "Dice", "Dice per type (95% CI)", types, tl)}
    locs = sorted({loc for m in names for loc in models[m]["locations"]})
    if locs:
        made["location_cpm.png"] = _bar_figure(
            plt, names, lambda m, loc: ((models[m]["locations"].get(loc) or {}).get("cpm"),
                                        (models[m]["locations"].get(loc) or {}).get("cpm_ci")),
            "CPM", "Detection by location (95% CI)", locs, locs)
    if rep["learning_curves"]:
        made["learning_curves.png"] = curves_figure(plt, rep["learning_curves"])
    made.update(gallery_figures(plt, gallery, rep["type_names"]))
    glance = claims_figure(plt, rep)
    if glance is not None:
        made[CLAIMS_FIGURE] = glance
    figs = {}
    for name, fig in made.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        figs[name] = buf.getvalue()
    return figs


# ------------------------------------------------------------------------------------------------- writers
def _summary_lines(rep) -> list:
    """The report's opening sentences (plain text)."""
    ow = rep["overall_winner"]
    lines = [f"Best overall CPM: {', '.join(ow['models']) or 'none'}" + (" (tie)" if ow["tie"] else "")
             + f" ({_f(ow['score'])}). Types won on point estimates (of {len(rep['types'])}): "
             + ", ".join(f"{m} {rep['wins'][m]}" for m in rep["model_order"]) + "."]
    lines += [found_line(m, rep["models"][m]["found"]) + "." for m in rep["model_order"] if rep["models"][m]["found"]]
    claim = claim_sentence(rep["comparisons"])
    if claim:
        lines.append(claim)
    if rep["candidates"]:
        lines.append(f"Candidates: {rep['candidates']}.")
    lines.append("Rules: " + rep["rules"]["winner"] + "; intervals: " + rep["rules"]["ci"] + ".")
    return lines


def _blocks(rep, figs) -> list:
    """The report in reading order: ("text", lines) | ("table", title, head, rows) | ("figures", title, names)."""
    tables = _tables(rep)
    fig = lambda *names: [n for n in names if n in figs]
    blocks = [("text", _summary_lines(rep)), ("figures", "Detection", fig("froc.png", "type_cpm.png"))]
    blocks += [("table", *t) for t in tables[:2]]                       # overall, CPM per type
    blocks.append(("figures", "Gallery: what the model finds, misses and flags wrongly",
                   fig("gallery_types.png", "gallery_false_positives.png")))
    if "gallery_types.png" in figs:
        blocks.append(("text", ["Gallery rows, top to bottom: "
                                + "; ".join(row_names(rep["gallery"], rep["type_names"])) + "."]))
    blocks.append(("figures", "The comparison at a glance", fig(CLAIMS_FIGURE)))
    blocks += [("table", *t) for t in comparison_tables(rep["comparisons"], rep["type_names"])]
    blocks += [("table", *t) for t in stage_tables(rep.get("stages"))]
    blocks.append(("figures", "Learning curves", fig("learning_curves.png")))
    budget = budget_table(rep["learning_curves"])
    if budget:
        blocks.append(("table", *budget))
    blocks.append(("figures", "By type and location", fig("type_sensitivity.png", "type_dice.png",
                                                          "location_cpm.png")))
    blocks += [("table", *t) for t in tables[2:]]                       # Dice per type, sensitivities
    return [b for b in blocks if b[0] != "figures" or b[2]]


def _markdown(rep, figs, title) -> str:
    lines = [f"# {title}", ""]
    for b in _blocks(rep, figs):
        if b[0] == "text":
            lines += [x for line in b[1] for x in (line, "")]
        elif b[0] == "table":
            lines += ["", f"## {b[1]}", "", _md_table(b[2], b[3])]
        else:
            lines += ["", f"## {b[1]}", ""] + [f"![{n}]({n})" for n in b[2]]
    return "\n".join(lines) + "\n"


def _html(rep, figs, title) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:0.5em 0;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
             "th{background:#eee}img{max-width:100%}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for b in _blocks(rep, figs):
        if b[0] == "text":
            parts += [f"<p>{esc(line)}</p>" for line in b[1]]
        elif b[0] == "table":
            parts.append(f"<h2>{esc(b[1])}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in b[2]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b[3]]
            parts.append("</table>")
        else:
            parts.append(f"<h2>{esc(b[1])}</h2>")
            parts += [f"<img alt='{esc(n)}' src='data:image/png;base64,{base64.b64encode(figs[n]).decode()}'>"
                      for n in b[2]]
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(results: dict, out_dir, title: str = "AH-Net per-type evaluation", types=TYPE_CODES,
                 tie_tol: float = TIE_TOL, comparisons: dict | None = None, runs: dict | None = None,
                 gallery: dict | None = None, candidates: str | None = None, extra_files: dict | None = None,
                 stages: dict | None = None) -> dict:
    """Write report.json, report.md (with PNGs beside it) and a self-contained report.html into out_dir, with
    ``extra_files`` ({path relative to out_dir: text or bytes}, e.g. the candidate CSVs), all renamed into place
    together once every one is written (a kill or a full disk leaves the old report whole). Returns the
    report.json content. See the module docstring for the inputs and the rules.
    """
    rep = summarize(results, types=types, tie_tol=tie_tol, comparisons=comparisons, curves=read_curves(runs),
                    gallery=gallery, candidates=candidates, stages=stages)
    out = Path(out_dir)
    figs = _figures(rep, gallery)
    files = {**figs, paths.REPORT_JSON: json.dumps(rep, indent=1, allow_nan=False),
             paths.REPORT_MD: _markdown(rep, figs, title), paths.REPORT_HTML: _html(rep, figs, title),
             **(extra_files or {})}
    with atomic_paths([out / name for name in files]) as tmps:
        for tmp, data in zip(tmps, files.values()):
            tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return rep
