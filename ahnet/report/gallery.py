"""The gallery drawn: per type a row of crops (hits and misses of the focus model), per model its highest-scoring
false positives (crops from ahnet.evaluate.gallery_crops).

Each crop: the axial slice through the centre in a lung window (level -600, width 1500 HU), the reference
contour in yellow, the model's candidates within one slice as circles: green = on a nodule, red = false
positive, grey = on an irrelevant finding; solid = scored at or above the model's 1 FP/scan threshold (what
the count "found at 1 FP/scan" accepts), dotted = below it.
"""
from __future__ import annotations

import numpy as np

LUNG_WINDOW = (-1350.0, 150.0)      # HU: level -600, width 1500
COLOURS = {"hit": "#2ca02c", "fp": "#d62728", "dropped": "#999999"}
UNTYPED = "untyped"                 # the row of nodules whose annotations give no type


def row_type(t) -> str:
    """A gallery row's type as the report names it: the type code, or "untyped" for nodules without one."""
    return UNTYPED if t is None or str(t).strip() in ("", "None") else str(t)


def row_names(gallery: dict | None, type_names: dict) -> list:
    """The type rows of the gallery figure, top to bottom, each named: "T04 solid 6-10 mm", "untyped (no type in
    the annotations)"."""
    if not gallery:
        return []
    out = []
    for t in _type_rows(gallery):
        name = row_type(t)
        out.append(f"{name} {type_names[t]}" if t in type_names else
                   (f"{name} (no type in the annotations)" if name == UNTYPED else name))
    return out


def _type_rows(gallery: dict) -> list:
    """The type keys with crops, in the figure's order."""
    return [t for t in sorted(gallery["types"], key=lambda t: (t is None, str(t))) if gallery["types"][t]]


def gallery_json(gallery: dict | None) -> dict | None:
    """The gallery without its pixel arrays (report.json keeps what each crop shows, not the pixels)."""
    if not gallery:
        return None
    strip = lambda c: {k: v for k, v in c.items() if k not in ("image", "contour")}
    return {"focus": gallery["focus"], "thresholds": gallery["thresholds"], "half_mm": gallery["half_mm"],
            "types": {row_type(t): [strip(c) for c in row] for t, row in gallery["types"].items()},
            "false_positives": {m: [strip(c) for c in row] for m, row in gallery["false_positives"].items()}}


def _draw(ax, crop, title):
    ax.imshow(crop["image"], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], interpolation="nearest",
              aspect=crop["pixel_mm"][0] / crop["pixel_mm"][1])
    c = crop.get("contour")
    if c is not None and np.any(c):
        ax.contour(np.asarray(c, float), levels=[0.5], colors="yellow", linewidths=0.9)
    r = 3.0 / crop["pixel_mm"][1]                         # 3 mm circles
    for mk in crop["marks"]:
        ax.add_patch(_circle(mk, r))
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _circle(mk, r):
    from matplotlib.patches import Circle
    return Circle((mk["col"], mk["row"]), r, fill=False, lw=1.4 if mk["above_threshold"] else 0.9,
                  ls="-" if mk["above_threshold"] else ":", color=COLOURS.get(mk["status"], "white"))


def _title(crop, n_models):
    s = "–" if crop["score"] is None else f"{crop['score']:.2f}"
    if crop["kind"] == "fp":
        return f"{crop['seriesuid']} z{crop['slice']}: FP p={s}"
    d = f"{crop['diameter_mm']:.1f} mm"
    found = f", found by {len(crop['found_by'])} of {n_models}" if crop.get("found_by") is not None else ""
    word = "hit" if crop["kind"] == "hit" else "miss"
    return f"{word} p={s}, {d}\n{crop.get('location') or ''}{found}"


def _grid(plt, rows: list, labels: list, title: str, n_models: int):
    ncol = max(1, max(len(r) for r in rows))
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol + 1.4, 2.1 * len(rows) + 0.4), squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels)):
        for j in range(ncol):
            ax = axes[i, j]
            if j < len(row):
                _draw(ax, row[j], _title(row[j], n_models))
            else:
                ax.axis("off")
        axes[i, 0].text(-0.08, 0.5, label, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))      # half an inch for the title
    return fig


def gallery_figures(plt, gallery: dict | None, type_names: dict) -> dict:
    """{file name: figure}: gallery_types.png (a row per type) and gallery_false_positives.png (a row per
    model); empty without a gallery."""
    if not gallery:
        return {}
    figs = {}
    n = len(gallery["false_positives"])
    thr = gallery["thresholds"].get(gallery["focus"])
    types = _type_rows(gallery)
    if types:
        figs["gallery_types.png"] = _grid(
            plt, [sorted(gallery["types"][t], key=lambda c: c["kind"] != "hit") for t in types],
            [name.replace(" ", "\n", 1) for name in row_names(gallery, type_names)],
            f"{gallery['focus']}: hits and misses at 1 FP/scan (p >= {'–' if thr is None else f'{thr:.4f}'});"
            f" yellow: reference, circles: candidates (green on a nodule, red FP; solid above that threshold)", n)
    fps = {m: row for m, row in gallery["false_positives"].items() if row}
    if fps:
        figs["gallery_false_positives.png"] = _grid(plt, list(fps.values()), list(fps),
                                                    "Highest-scoring false positives per model", n)
    return figs
