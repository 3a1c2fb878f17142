"""What a run writes besides checkpoints: log.csv (one row per epoch) and progress.png, both atomically."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ahnet.atomic import atomic_path

LOG_COLUMNS = ("epoch", "step", "loss", "lr", "lr_encoder", "skipped_steps", "skipped_total", "samples_per_s",
               "val_dice", "val_cpm", "seconds", "val_seconds")


def write_log(history: list[dict], path: Path) -> None:
    """log.csv: one row per epoch, columns LOG_COLUMNS (empty cell = no value)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})


def plot_progress(history: list[dict], path: Path, title: str = "") -> None:
    """progress.png: training loss, the validation score (CPM, else patch Dice) and the learning rate against
    optimiser steps, the best epoch marked."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def col(key):
        return [r.get(key) if r.get(key) is not None else np.nan for r in history]

    steps = [r["step"] for r in history]
    key = "val_cpm" if any(r.get("val_cpm") is not None for r in history) else "val_dice"
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(steps, col("loss"), "o-")
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log" if all(
        (r["loss"] or 0) > 0 for r in history) else "linear")
    score = col(key)
    ax[1].plot(steps, score, "o-", color="C2")
    if not np.isnan(score).all():
        best = int(np.nanargmax(score))
        ax[1].plot(steps[best], score[best], "*", ms=14, color="C3", label=f"best (step {steps[best]})")
        ax[1].legend(loc="lower right")
    ax[1].set(xlabel="step", ylabel="validation CPM" if key == "val_cpm" else "validation Dice", ylim=(0, 1))
    ax[2].plot(steps, col("lr"), "o-", color="C1", label="lr")
    if any(r.get("lr_encoder") not in (None, r["lr"]) for r in history):
        ax[2].plot(steps, col("lr_encoder"), "s--", color="C3", label="lr encoder")
        ax[2].legend()
    ax[2].set(xlabel="step", ylabel="learning rate (end of epoch)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
