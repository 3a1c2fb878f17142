"""The paper's claims as paired comparisons, and how many nodules each model finds at 1 FP/scan.

Models are named as the experiment names its variants (ahnet.commands.experiment: ``mcgcn-2d``, ``ahnet-transfer``,
``ahnet-scratch``, ``unet3d-scratch``, ``ahnet-transfer-pfn0`` .. ``pfn3``; pyramid depth 4 is
``ahnet-transfer``). ``CLAIMS`` lists the pairs the paper's claims name; a pair is reported when both models
were evaluated. Each comparison is the CPM difference (first minus second) with its paired bootstrap interval
(ahnet.evaluate.froc.paired_bootstrap); a type is won only where the interval excludes 0, otherwise "no decision".
The claim to test: AH-Net after transfer is best, with a decisive interval against every other model
evaluated, in at least ``CLAIM_TYPES`` of the 12 types.
"""
from __future__ import annotations

import numpy as np

from ahnet.evaluate.crops import FOCUS          # "ahnet-transfer": the model the claim is about

CLAIM_TYPES = 6
DISPLAY = {"mcgcn-2d": "2D MC-GCN", "ahnet-transfer": "AH-Net after transfer", "ahnet-scratch": "AH-Net from scratch",
           "unet3d-scratch": "3D U-Net from scratch",
           **{f"ahnet-transfer-pfn{k}": f"AH-Net after transfer, pyramid depth {k}" for k in range(4)}}
CLAIMS = ([("ahnet-transfer", "mcgcn-2d", "transfer to 3D beats the 2D network it came from"),
           ("ahnet-transfer", "ahnet-scratch", "transfer beats training the same 3D network from scratch"),
           ("ahnet-transfer", "unet3d-scratch", "AH-Net after transfer beats a 3D U-Net from scratch")]
          + [(f"ahnet-transfer-pfn{k}" if k < 4 else "ahnet-transfer", "ahnet-transfer-pfn0",
              f"pyramid depth {k} beats depth 0") for k in range(1, 5)])


def display(model: str) -> str:
    """A reader's name for a model: the experiment's description, else the run's name."""
    return DISPLAY.get(model, model)


def oriented(d: dict | None, swap: bool) -> dict | None:
    """A paired_bootstrap difference, turned round when the claim names the pair the other way."""
    if d is None or not swap:
        return d
    ci = None if d["ci"] is None else [-d["ci"][1], -d["ci"][0]]
    return {**d, "cpm_a": d["cpm_b"], "cpm_b": d["cpm_a"], "diff": None if d["diff"] is None else -d["diff"],
            "ci": ci}


def find_pair(comparisons: dict, a: str, b: str):
    """(the pair of a and b in a paired_bootstrap result or None, whether it is named b - a there)."""
    for p in comparisons["pairs"]:
        if (p["a"], p["b"]) in ((a, b), (b, a)):
            return p, p["a"] != a
    return None, False


def summarize_comparisons(comparisons: dict | None, types, locations) -> dict | None:
    """The report's "comparisons" entry from ahnet.evaluate.froc.paired_bootstrap's result (None when there is none)."""
    if not comparisons:
        return None
    claims = []
    for a, b, claim in CLAIMS:
        p, swap = find_pair(comparisons, a, b)
        if p is None:
            continue
        groups = p["groups"]
        by_type = {t: oriented(groups.get("type", {}).get(t), swap) for t in types}
        by_loc = {loc: oriented(groups.get("location", {}).get(loc), swap) for loc in locations
                  if loc in groups.get("location", {})}
        won = [t for t, d in by_type.items() if d and d["winner"] == a]
        lost = [t for t, d in by_type.items() if d and d["winner"] == b]
        claims.append({"claim": claim, "a": a, "b": b, "overall": oriented(p["overall"], swap), "types": by_type,
                       "locations": by_loc, "types_won_a": won, "types_won_b": lost,
                       "types_no_decision": [t for t, d in by_type.items() if d and d["winner"] is None]})
    best_types = {t: comparisons["best"]["groups"].get("type", {}).get(t) for t in types}
    counts = {m: sum(v == m for v in best_types.values()) for m in comparisons["models"]}
    test = None
    if FOCUS in comparisons["models"]:
        n = counts[FOCUS]
        test = {"model": FOCUS, "types_best_decisive": n, "needed": CLAIM_TYPES, "of": len(types),
                "against": [m for m in comparisons["models"] if m != FOCUS], "holds": n >= CLAIM_TYPES}
    return {"n_bootstrap": comparisons["n_bootstrap"], "confidence": comparisons["confidence"],
            "seed": comparisons["seed"], "claims": claims, "all_pairs": comparisons["pairs"],
            "best_decisive": {"overall": comparisons["best"]["overall"], "types": best_types},
            "best_decisive_counts": counts, "claim_test": test, "seeds": seed_summary(comparisons, types)}


def seed_summary(comparisons: dict, types) -> dict | None:
    """Each model's runs (seeds) when some model has several: {model: {"runs": {run: CPM}, "mean", "ci" (seeds
    and scans resampled together), "sd" (over runs, ddof 1; None for one run), "min", "max", "types": {type:
    {"mean", "ci"}}}}; None when every model was trained once."""
    runs = comparisons.get("runs") or {}
    if not any(len(r) > 1 for r in runs.values()):
        return None
    out = {}
    for m, by_run in runs.items():
        vals = [r["overall"] for r in by_run.values() if r["overall"] is not None]
        ci = comparisons["cpm_ci"][m]
        out[m] = {"runs": {r: v["overall"] for r, v in by_run.items()}, "mean": comparisons["cpm"][m]["overall"],
                  "ci": ci["overall"], "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                  "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                  "types": {t: {"mean": comparisons["cpm"][m]["groups"].get("type", {}).get(t),
                                "ci": ci["groups"].get("type", {}).get(t)} for t in types}}
    return out


def seed_tables(seeds: dict | None, type_names: dict, pct: str) -> list:
    """[(title, header, rows)]: each model's CPM per run, mean, interval and spread; the per-type means."""
    if not seeds:
        return []
    ci = lambda c: "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"
    num = lambda v: "–" if v is None else f"{v:.3f}"
    rows = [[display(m), str(len(s["runs"])), ", ".join(num(v) for v in s["runs"].values()),
             num(s["mean"]) + ci(s["ci"]), num(s["sd"]), f"{num(s['min'])} – {num(s['max'])}"]
            for m, s in seeds.items()]
    out = [(f"Every model over its trainings (seeds): CPM of each, their mean with a {pct} interval that resamples "
            f"seeds and scans together, the spread from one seed to the next",
            ["model", "seeds", "CPM per seed", f"mean [{pct} CI]", "SD", "min – max"], rows)]
    models = list(seeds)
    types = list(next(iter(seeds.values()))["types"])
    rows = [[f"{t} {type_names.get(t, t)}"] + [num(seeds[m]["types"][t]["mean"]) + ci(seeds[m]["types"][t]["ci"])
                                              for m in models] for t in types]
    out.append((f"CPM per type, mean over seeds [{pct} CI over seeds and scans]", ["type"] + [display(m) for m in
                                                                                             models], rows))
    return out


def found_summary(det: dict, types) -> dict | None:
    """How many nodules a model finds at 1 FP/scan (ahnet.evaluate.froc's "found"), and whether every type present was
    found at least once."""
    f = det.get("found")
    if not f:
        return None
    by_type = f["groups"].get("type", {})
    present = [t for t in types if by_type.get(t, [0, 0])[1] > 0]
    hit = [t for t in present if by_type[t][0] > 0]
    return {"fp_rate": f["fp_rate"], "threshold": f["threshold"], "n_found": f["n_found"], "n": f["n"],
            "types": {t: by_type.get(t, [0, 0]) for t in types}, "types_present": len(present),
            "types_found": len(hit), "every_type": bool(present) and len(hit) == len(present)}


def found_line(model: str, f: dict) -> str:
    """ "AH-Net after transfer: 17 of 24 nodules found at 1 false positive per scan, every type at least
    once: yes" """
    return (f"{display(model)}: {f['n_found']} of {f['n']} nodules found at {f['fp_rate']:g} false positive per "
            f"scan, every type at least once: {'yes' if f['every_type'] else 'no'} "
            f"({f['types_found']} of {f['types_present']} types)")


def diff_cell(d, nd=3):
    """A difference with its interval as a table cell: +0.012 [-0.010, +0.034]."""
    if not d or d["diff"] is None:
        return "–"
    ci = "" if not d["ci"] else f" [{d['ci'][0]:+.{nd}f}, {d['ci'][1]:+.{nd}f}]"
    return f"{d['diff']:+.{nd}f}{ci}"


def decision_cell(d, a, b):
    """Whom a difference's interval decides for, as a table cell (a reader's model name or no decision)."""
    if not d or d["diff"] is None:
        return "no nodules"
    if d["ci"] is None:
        return "no interval"
    return display(a) if d["winner"] == a else display(b) if d["winner"] == b else "no decision"


def comparison_tables(comp: dict | None, type_names: dict) -> list:
    """[(title, header, rows)] of the comparisons entry: the claims at a glance, each claim by type and
    location, and the types each model wins against every other one."""
    if not comp:
        return []
    pct = f"{100 * comp['confidence']:g}%"
    out = seed_tables(comp.get("seeds"), type_names, pct)
    over = "seed and scan" if comp.get("seeds") else "scan"
    rows = [[c["claim"], f"{c['a']} - {c['b']}", diff_cell(c["overall"]), decision_cell(c["overall"], c["a"], c["b"]),
             str(len(c["types_won_a"])), str(len(c["types_won_b"])), str(len(c["types_no_decision"]))]
            for c in comp["claims"]]
    out.append((f"Paired comparisons: the paper's claims (CPM difference, paired {pct} bootstrap interval over the "
                f"same {comp['n_bootstrap']} {over} resamples)",
                ["claim", "pair (a - b)", f"overall diff [{pct} CI]", "decision", "types won by a",
                 "types won by b", "no decision"], rows))
    for c in comp["claims"]:
        rows = [["all", _f(c["overall"], "cpm_a"), _f(c["overall"], "cpm_b"), diff_cell(c["overall"]),
                 decision_cell(c["overall"], c["a"], c["b"])]]
        rows += [[f"{t} {type_names.get(t, t)}", _f(d, "cpm_a"), _f(d, "cpm_b"), diff_cell(d),
                  decision_cell(d, c["a"], c["b"])]
                 for t, d in c["types"].items()]
        rows += [[loc, _f(d, "cpm_a"), _f(d, "cpm_b"), diff_cell(d), decision_cell(d, c["a"], c["b"])]
                 for loc, d in c["locations"].items()]
        out.append((f"{display(c['a'])} vs {display(c['b'])} ({c['claim']})",
                    ["group", f"CPM {c['a']}", f"CPM {c['b']}", f"diff [{pct} CI]", "decision"], rows))
    best = comp["best_decisive"]["types"]
    rows = [[f"{t} {type_names.get(t, t)}", display(m) if m else "no decision"] for t, m in best.items()]
    counts = comp["best_decisive_counts"].items()
    rows.append(["types best per model", ", ".join(f"{display(m)} {n}" for m, n in counts)])
    out.append(("Best with a decisive interval against every other model, per type",
                ["type", "best (decisive against all)"], rows))
    return out


def _f(d, key):
    return "–" if not d or d.get(key) is None else f"{d[key]:.3f}"


def claim_sentence(comp: dict | None) -> str | None:
    """One sentence on the claim "best in >= 6 of 12 types", or None without comparisons."""
    if not comp or not comp["claim_test"]:
        return None
    t = comp["claim_test"]
    return (f"Claim 'AH-Net after transfer is best in at least {t['needed']} of {t['of']} types' (best = a "
            f"decisive paired interval against each of {len(t['against'])} other models): best in "
            f"{t['types_best_decisive']} of {t['of']} types -> {'holds' if t['holds'] else 'not shown'}.")
