"""The comparison at a glance (claims.png): each model's CPM with its interval, its seeds as dots, its first stage
beside it; and the paper's claims as paired differences with their intervals against the line of no difference.

Input: the report's "models", "comparisons" (ahnet.report.claims.summarize_comparisons, with "seeds" when models
were trained several times) and "stages" (ahnet.report.stages.summarize_stages) entries. A difference decided for
the claim's first model is drawn green, for its second red, undecided grey.
"""
from __future__ import annotations

from ahnet.report.claims import display

FIGURE = "claims.png"
COLOURS = {"a": "tab:green", "b": "tab:red", None: "0.45"}


def model_points(rep: dict) -> list:
    """[(model, CPM, interval, [CPM of each seed], first-stage CPM or None, its interval or None)], one per model:
    over seeds when the comparison has them, else each run as a model."""
    comp, stages = rep.get("comparisons") or {}, (rep.get("stages") or {}).get("models", {})
    seeds = comp.get("seeds")
    out = []
    for m in (seeds or rep["model_order"]):
        cpm, ci, runs = ((seeds[m]["mean"], seeds[m]["ci"], list(seeds[m]["runs"].values())) if seeds else
                         (rep["models"][m]["cpm"], rep["models"][m]["cpm_ci"], []))
        s = stages.get(m) or {}
        out.append((m, cpm, ci, runs, s.get("cpm_first"), s.get("ci_first")))
    return out


def claim_points(rep: dict) -> list:
    """[(label, diff, interval, "a" | "b" | None: whom the interval decides for)], systems then first stages;
    every pair of models when the report holds none of the paper's pairs."""
    comp = rep.get("comparisons") or {}
    out = []
    for entry, what in ((comp.get("claims") or comp.get("all_pairs") or [], ""),
                        ((rep.get("stages") or {}).get("claims") or [], ", first stages")):
        for c in entry:
            o, w = c["overall"], c["overall"]["winner"]
            out.append((f"{display(c['a'])} - {display(c['b'])}{what}", o["diff"], o["ci"],
                        None if w is None else ("a" if w == c["a"] else "b")))
    return [p for p in out if p[1] is not None]


def _errorbar(ax, y, value, ci, **kw):
    err = None if not ci else [[max(value - ci[0], 0)], [max(ci[1] - value, 0)]]
    ax.errorbar([value], [y], xerr=err, capsize=3, **kw)


def claims_figure(plt, rep: dict):
    """The figure (matplotlib) or None when the report holds no paired comparison (fewer than two models)."""
    if not rep.get("comparisons"):
        return None
    models, claims = model_points(rep), claim_points(rep)
    n = max(len(models), len(claims), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 1.2 + 0.42 * n), gridspec_kw={"width_ratios": [1, 1.3]})
    for i, (m, cpm, ci, runs, first, first_ci) in enumerate(models):
        y = len(models) - 1 - i
        _errorbar(left, y, cpm, ci, fmt="o", color="C0", label="system" if i == 0 else None)
        if first is not None:
            _errorbar(left, y - 0.22, first, first_ci, fmt="o", mfc="white", color="C1",
                      label="first stage alone" if i == 0 else None)
        if runs:
            left.plot(runs, [y + 0.18] * len(runs), "|", color="k", ms=9, label="each seed" if i == 0 else None)
    left.set_yticks(range(len(models)), [display(m[0]) for m in reversed(models)], fontsize=8)
    left.set_xlabel("CPM (95% interval)")
    left.set_title("Each model", fontsize=10, pad=20)
    left.grid(axis="x", alpha=0.3)
    left.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    for i, (label, diff, ci, side) in enumerate(claims):
        _errorbar(right, len(claims) - 1 - i, diff, ci, fmt="s", color=COLOURS[side])
    right.axvline(0.0, color="k", lw=0.8)
    right.set_yticks(range(len(claims)), [c[0] for c in reversed(claims)], fontsize=8)
    right.yaxis.tick_right()
    right.set_xlabel("CPM difference a - b (paired 95% interval)")
    right.set_title(("The paper's claims" if rep["comparisons"].get("claims") else "Every pair")
                    + " (green: decided for a, red: for b, grey: no decision)", fontsize=10, pad=20)
    right.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
