"""The first stage alone beside each system (a second stage rescored every candidate): what the networks do
before their second stages, and what each second stage adds, with paired intervals.

Input: ahnet.evaluate.compare_stages's paired_bootstrap over every system ``m`` and its first stage ``m:first``.
``summarize_stages`` turns it into the report's "stages" entry; ``stage_tables`` into two tables: each model's
first stage, system and "system - first stage", and the paper's claims (ahnet.report.claims.CLAIMS) on the first
stages alone.
"""
from __future__ import annotations

from ahnet.evaluate import FIRST
from ahnet.report.claims import CLAIMS, decision_cell, diff_cell, display, find_pair, oriented

VERDICT = {"system": "the second stage helps", "first stage": "the second stage harms", None: "no decision"}


def summarize_stages(comp: dict | None) -> dict | None:
    """{"n_bootstrap", "confidence", "models": {model: {"cpm_first", "ci_first", "cpm", "ci", "added"
    (system - first stage: {"diff", "ci", "winner", ...})}}, "claims": [{"claim", "a", "b", "overall"}] (first
    stages, a - b)}; None without stages."""
    if not comp:
        return None
    systems = [m for m in comp["models"] if not m.endswith(FIRST)]
    models = {}
    for m in systems:
        pair, swap = find_pair(comp, m, m + FIRST)
        added = oriented(pair["overall"], swap)
        models[m] = {"cpm_first": comp["cpm"][m + FIRST]["overall"],
                     "ci_first": comp["cpm_ci"][m + FIRST]["overall"],
                     "cpm": comp["cpm"][m]["overall"], "ci": comp["cpm_ci"][m]["overall"],
                     "added": dict(added, winner=None if added["winner"] is None else
                                   ("system" if added["winner"] == m else "first stage"))}
    claims = []
    for a, b, claim in CLAIMS:
        pair, swap = find_pair(comp, a + FIRST, b + FIRST)
        if pair is not None:
            o = oriented(pair["overall"], swap)
            w = o["winner"]
            claims.append({"claim": claim, "a": a, "b": b,
                           "overall": dict(o, winner=None if w is None else w[:-len(FIRST)])})
    return {"n_bootstrap": comp["n_bootstrap"], "confidence": comp["confidence"], "models": models,
            "claims": claims}


def _cpm(v, ci) -> str:
    return "–" if v is None else f"{v:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def stage_tables(stages: dict | None) -> list:
    """[(title, header, rows)] of the report's "stages" entry (none without it)."""
    if not stages:
        return []
    pct = f"{100 * stages['confidence']:g}%"
    rows = []
    for m, s in stages["models"].items():
        verdict = "no interval" if s["added"]["ci"] is None else VERDICT[s["added"]["winner"]]
        rows.append([display(m), _cpm(s["cpm_first"], s["ci_first"]), _cpm(s["cpm"], s["ci"]), diff_cell(s["added"]),
                     verdict])
    out = [(f"The first stage alone and what each model's second stage adds (CPM; system - first stage paired, "
            f"{pct} bootstrap interval over the same {stages['n_bootstrap']} resamples)",
            ["model", f"first stage alone [{pct} CI]", f"with its second stage [{pct} CI]",
             f"second stage adds [{pct} CI]", "decision"], rows)]
    if stages["claims"]:
        rows = [[c["claim"], f"{c['a']} - {c['b']}", diff_cell(c["overall"]),
                 decision_cell(c["overall"], c["a"], c["b"])]
                for c in stages["claims"]]
        out.append((f"The paper's claims on the networks alone (first stages, before any second stage; paired "
                    f"{pct} interval)", ["claim", "pair (a - b)", f"overall diff [{pct} CI]", "decision"], rows))
    return out
