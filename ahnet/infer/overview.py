"""The picture of one predicted scan, ``<case>_overview.png``: what the model found, in one image.

Left, a coronal projection locating the findings: the scan's mean along the anterior-posterior index axis (a
radiograph-like image, grey) under the maximum-intensity projection of the probability map (colour, p >= 0.1),
the ``TOP_MARKED`` most probable candidates circled with their rank. Right, up to ``TOP_SLICES`` axial slices,
one through each of the most probable candidates (rank order; a slice is shown once), in a lung window (level
-600, width 1500 HU), every top candidate within ``MARK_SLICES`` slice of it circled and labelled
``#rank p``. A circle's radius is the candidate's estimated radius (ahnet.infer.findings) plus 2 mm, 4 mm at
least; solid red at or above the operating point (the SR threshold), dashed yellow below it. Index orientation:
a standard axial series shows the patient's right on the left, anterior up, and the coronal projection has
the head up. A scan without candidates shows its middle slice.

Cost: one pass over the volume for each projection plus a fixed number of panels (paper_notes/inference.md
measures it). Drawn with matplotlib's Agg canvas (no pyplot state) and written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ahnet.atomic import atomic_path
from ahnet.data.preprocess import scaled_from_hu

TOP_SLICES = 4
TOP_MARKED = 10
MARK_SLICES = 1
LUNG_WINDOW_HU = (-1350.0, 150.0)
PROB_SHOWN = 0.1                     # the projection colours probabilities from here up
ABOVE, BELOW = "#ff2a2a", "#ffd700"
DPI = 100


def _slice_of(f, nz: int) -> int:
    return int(np.clip(round(float(f["centre_zyx"][0])), 0, nz - 1))


def layout(findings: list, nz: int) -> dict:
    """What the overview shows for ranked findings (ahnet.infer.findings.rank_candidates, rank order) of a scan
    with ``nz`` slices: {"slices": axial slice indices, "marks": {slice: [ranks circled]}, "projection":
    [ranks circled on the projection]}."""
    top = [f for f in findings if f["rank"] <= TOP_MARKED]
    slices: list = []
    for f in top:
        z = _slice_of(f, nz)
        if z not in slices and len(slices) < TOP_SLICES:
            slices.append(z)
    if not slices:
        slices = [nz // 2]
    marks = {z: [f["rank"] for f in top if abs(_slice_of(f, nz) - z) <= MARK_SLICES] for z in slices}
    return {"slices": slices, "marks": marks, "projection": [f["rank"] for f in top]}


def _ring(ax, xy, radius_mm, pixel_mm, above: bool):
    """An ellipse that is a circle of radius_mm on screen (pixel_mm: (row mm, col mm) of the panel)."""
    from matplotlib.patches import Ellipse
    ax.add_patch(Ellipse(xy, 2 * radius_mm / pixel_mm[1], 2 * radius_mm / pixel_mm[0], fill=False,
                         lw=1.6 if above else 1.2, ls="-" if above else "--", color=ABOVE if above else BELOW))


def _radius_mm(f) -> float:
    return max(4.0, 0.5 * float(f.get("diameter_mm") or 0.0) + 2.0)


def _label(ax, x, y, text, above):
    ax.text(x, y, text, color="white", fontsize=8, ha="left", va="bottom",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": ABOVE if above else BELOW, "lw": 1.0})


def _projection(ax, image01, prob, spacing, direction, findings, threshold):
    """The coronal panel: mean image and probability MIP over the y index axis, findings circled."""
    sz, _, sx = spacing
    mean = image01.mean(axis=1, dtype=np.float64)
    mip = prob.max(axis=1)
    origin = "upper" if float(np.asarray(direction)[2, 2]) < 0 else "lower"     # the head up
    lo, hi = np.percentile(mean, [1.0, 99.5])
    ax.imshow(mean, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=sz / sx, origin=origin,
              interpolation="bilinear")
    shown = ax.imshow(np.ma.masked_less(mip, PROB_SHOWN), cmap="autumn_r", vmin=0.0, vmax=1.0, alpha=0.8,
                      aspect=sz / sx, origin=origin, interpolation="nearest")
    for f in findings:
        above = float(f["probability"]) >= threshold
        cz, _, cx = f["centre_zyx"]
        _ring(ax, (cx, cz), _radius_mm(f), (sz, sx), above)
        _label(ax, cx + _radius_mm(f) / sx, cz, str(f["rank"]), above)
    ax.set_title("coronal: mean CT (grey), probability MIP (colour)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _axial(ax, image01, z, spacing, findings, threshold, title):
    """One axial slice in the lung window with its findings circled and labelled '#rank p'."""
    _, sy, sx = spacing
    ax.imshow(image01[z], cmap="gray", vmin=scaled_from_hu(LUNG_WINDOW_HU[0]), vmax=scaled_from_hu(LUNG_WINDOW_HU[1]),
              aspect=sy / sx, interpolation="bilinear")
    for f in findings:
        above = float(f["probability"]) >= threshold
        _, cy, cx = f["centre_zyx"]
        _ring(ax, (cx, cy), _radius_mm(f), (sy, sx), above)
        _label(ax, cx + _radius_mm(f) / sx, cy - _radius_mm(f) / sy, f"#{f['rank']} p={float(f['probability']):.2f}",
               above)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _panel_title(z, nz, lead) -> str:
    if lead is None:
        return f"slice {z + 1} of {nz}: no candidate"
    d = f", ~{lead['diameter_mm']:.1f} mm" if lead.get("diameter_mm") is not None else ""
    return f"slice {z + 1} of {nz}: #{lead['rank']} p={float(lead['probability']):.3f}{d}"


def write_overview(path, image01: np.ndarray, prob: np.ndarray, geometry, findings: list, case_id: str,
                   threshold: float) -> dict:
    """Draw the overview (module docstring) of a (z, y, x) image scaled to [0, 1] and its (z, y, x) probability
    map into ``path`` (PNG, atomically). findings: rank_candidates' rows in rank order (with diameter_mm where
    estimated); geometry: the scan's spacing (sz, sy, sx) mm and direction; threshold: the operating point.
    Returns layout()'s dict."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    nz = image01.shape[0]
    plan = layout(findings, nz)
    by_rank = {f["rank"]: f for f in findings}
    fig = Figure(figsize=(14, 8), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, width_ratios=(1.4, 1, 1))
    shown = _projection(fig.add_subplot(grid[:, 0]), image01, prob, geometry.spacing, geometry.direction,
                        [by_rank[r] for r in plan["projection"]], threshold)
    fig.colorbar(shown, ax=fig.axes[0], fraction=0.04, pad=0.02, shrink=0.5,
                 label="probability")
    for k, z in enumerate(plan["slices"]):
        marked = [by_rank[r] for r in plan["marks"][z]]
        lead = next((by_rank[r] for r in plan["projection"] if _slice_of(by_rank[r], nz) == z), None)
        _axial(fig.add_subplot(grid[k // 2, 1 + k % 2]), image01, z, geometry.spacing, marked, threshold,
               _panel_title(z, nz, lead))
    n_above = sum(float(f["probability"]) >= threshold for f in findings)
    fig.suptitle(f"{case_id}: {len(findings)} candidates, {n_above} at p >= {threshold:g} (solid red; dashed yellow "
                 f"below); circles: estimated size + 2 mm", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return plan
