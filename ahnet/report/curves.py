"""Learning curves: each run's training loss and validation score against steps, from its log.csv.

The log is found through ahnet.paths (``run_paths(run).log``; a cross-validation's folds are not read). The
validation score is ``val_cpm`` where the log has that column with at least one value, else ``val_dice`` (empty
or "None" cells are steps without validation). The best step is the one with the highest validation score (the
first on ties): the step ``best.pt`` was saved at when the run chose by that score.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ahnet import paths
from ahnet.train.config import patience_spent, read_run_config, step_cap

VAL_COLUMNS = ("val_cpm", "val_dice")      # preferred first


def _num(v):
    if v is None or str(v).strip() in ("", "None", "nan"):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def read_curve(run) -> dict | None:
    """{"steps", "loss", "val", "val_metric", "best_step", "best_value", "log"} from a run's log.csv, or None
    when the run has no log (a checkpoint file, a cross-validation, a run from elsewhere)."""
    log = paths.run_paths(run).log
    if not Path(log).is_file():
        return None
    with open(log, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    metric = next((c for c in VAL_COLUMNS if any(_num(r.get(c)) is not None for r in rows)), None)
    steps = [int(float(r["step"])) for r in rows]
    loss = [_num(r.get("loss")) for r in rows]
    val = [_num(r.get(metric)) if metric else None for r in rows]
    known = [(v, s) for v, s in zip(val, steps) if v is not None]
    best = max(known, key=lambda t: t[0]) if known else None         # max keeps the first of equal values
    return {"steps": steps, "loss": loss, "val": val, "val_metric": metric, "log": str(log),
            "best_step": best[1] if best else None, "best_value": best[0] if best else None,
            "budget": read_budget(run, rows, best[1] if best else None)}


def read_budget(run, rows: list, best_step) -> dict | None:
    """The run's stopping rule and what ended it, from its config.json and log rows: {"cap" (config.step_cap),
    "patience", "steps_run", "stopped_by": "step cap" | "patience" (config.patience_spent at the last epoch) |
    "not finished"}; None without a config.json (or one without those settings)."""
    cfg = read_run_config(run)
    try:
        cap = step_cap(int(cfg["epochs"]), int(cfg["steps_per_epoch"]), cfg.get("max_steps"))
        epoch = {int(float(r["step"])): int(float(r["epoch"])) for r in rows}
    except (KeyError, TypeError, ValueError):
        return None
    patience, last = cfg.get("patience") or 0, max(epoch)
    stopped = ("step cap" if last >= cap else
               "patience" if best_step is not None and patience_spent(epoch[last], epoch[best_step], patience)
               else "not finished")
    return {"cap": cap, "patience": patience, "steps_run": last, "stopped_by": stopped}


def budget_table(curves: dict):
    """(title, header, rows) of each run's budget and how it ended, or None when no run has a config.json."""
    rows = [[m, str(c["budget"]["steps_run"]), str(c["budget"]["cap"]), str(c["budget"]["patience"] or "none"),
             str(c["best_step"]), "n/a" if c["best_value"] is None else f"{c['best_value']:.3f}",
             c["budget"]["stopped_by"]] for m, c in curves.items() if c.get("budget")]
    if not rows:
        return None
    return (f"Training budget ({paths.BEST} = the best validation score; a run stops after 'patience' validations "
            "without a better one, or at its step cap)",
            ["model", "steps run", "step cap", "patience", "best step", "best validation", "stopped by"], rows)


def read_curves(runs: dict) -> dict:
    """{model: read_curve(run)} for the runs that have a log."""
    out = {}
    for name, run in (runs or {}).items():
        c = read_curve(run)
        if c is not None:
            out[name] = c
    return out


def curves_figure(plt, curves: dict):
    """One panel per model: training loss (left axis; log scale when it spans a decade) and validation score
    (right axis) per step;
    the best step marked."""
    names = list(curves)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        c = curves[name]
        st = np.asarray(c["steps"], float)
        loss = np.array([np.nan if v is None else v for v in c["loss"]], float)
        ax.plot(st, loss, "o-", ms=3, color="C0", label="training loss")
        pos = loss[np.isfinite(loss) & (loss > 0)]
        if pos.size and pos.max() > 10 * pos.min():           # log scale only when the loss spans a decade
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="C0", fontsize=8)
        ax.set_title(name, fontsize=9)
        if c["val_metric"]:
            ax2 = ax.twinx()
            val = np.array([np.nan if v is None else v for v in c["val"]], float)
            ok = ~np.isnan(val)
            ax2.plot(st[ok], val[ok], "s-", ms=3, color="C2")
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel(c["val_metric"].replace("_", " "), color="C2", fontsize=8)
            if c["best_step"] is not None:
                ax2.axvline(c["best_step"], color="C3", ls="--", lw=1)
                ax2.plot([c["best_step"]], [c["best_value"]], "*", ms=11, color="C3")
                ax2.annotate(f"best {c['best_value']:.3f}\nstep {c['best_step']}", (c["best_step"], c["best_value"]),
                             textcoords="offset points", xytext=(-4, -22), ha="right", fontsize=7, color="C3")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Learning curves (star: the best validation step, the run's {paths.BEST})", fontsize=10)
    fig.tight_layout()
    return fig
