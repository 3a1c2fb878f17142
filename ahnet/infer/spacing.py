"""Predicting at the models' training pixel spacing (nnU-Net's rule, in-plane only).

A network learns nodules at the pixel size of its training scans; a scan with coarser pixels draws them smaller
and the detector loses some (paper_notes/results.md, part Q: 0.9 mm pixels cost models trained at 0.7 mm ~0.05
CPM, and resampling the scans before inference won it back). So a scan whose in-plane spacing differs from the
training spacing by more than ``RTOL`` is resampled in-plane to it (linear, ahnet.data.preprocess.resample: voxel
0's centre and the direction kept), predicted there, its candidates and second stage taken on that grid (they are
in world mm), and its probability map brought back to the scan's own grid (linear, resample_onto) for the mask,
Dice and the files. Slices are never resampled: thick slices are what AH-Net is for, predicted as they are.

- ``add_inplane_argument(ap)``: ``--inplane-spacing auto|native|MM``; ``parse_inplane`` is its type.
- ``training_inplane(ens)`` -> (sy, sx) mm or None: the training scans' median in-plane spacing that every
  member's checkpoint records (``data_spacing``); None when none records it (trained before it was recorded).
- ``resolve_inplane(setting, ens)`` -> (sy, sx) or None (no resampling); ``inplane_from(setting, recorded)`` the
  same for a recorded spacing from elsewhere (a served model.json).
- ``PredictionGrid.for_scan(geometry, inplane)``: the grid a scan is predicted on; ``working(image)`` the image
  there as a Volume, ``to_native(prob)`` a map back on the scan's grid; ``grid_at`` the same from a header's
  shape and spacing, ``prediction_voxels`` the voxels a header's scan is held at (memory checks before a scan is
  read).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from ahnet.data.io import Volume
from ahnet.data.preprocess import resample_onto, target_grid
from ahnet.infer.windows import InferenceInputError

#: a scan is resampled when its in-plane spacing differs from the target's by more than this fraction
RTOL = 0.01
AUTO, NATIVE = "auto", "native"


def parse_inplane(text) -> str | float:
    """``auto``, ``native`` or a spacing in mm in (0, 100] (an argparse type: ArgumentTypeError otherwise)."""
    s = str(text).strip().lower()
    if s in (AUTO, NATIVE):
        return s
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 100):
        raise argparse.ArgumentTypeError(f"expected auto, native or a pixel spacing in mm in (0, 100], got {text!r}")
    return v


def add_inplane_argument(ap) -> None:
    """``--inplane-spacing`` (dest inplane_spacing, default auto) on parser ``ap``."""
    ap.add_argument("--inplane-spacing", type=parse_inplane, default=AUTO, metavar="auto|native|MM",
                    help="predict each scan resampled in-plane to this pixel spacing (mm), its maps brought back "
                         "to its own grid: auto (default) = the models' training spacing recorded in their "
                         "checkpoints (none recorded: native); native = each scan's own grid; slices are never "
                         f"resampled; a scan within {RTOL * 100:g}%% of the target is left as it is")


def training_inplane(ens) -> tuple | None:
    """(sy, sx) mm that every member of ``ens`` records as its training scans' median spacing; None when no member
    records one; InferenceInputError when members record different ones or only some record one."""
    found = {m.path: m.data_spacing for m in ens.members}
    known = {tuple(round(float(v), 6) for v in s[1:]) for s in found.values() if s is not None}
    if not known:
        return None
    if len(known) > 1 or any(s is None for s in found.values()):
        what = ", ".join(f"{p.name}: {'none' if s is None else list(s)}" for p, s in found.items())
        raise InferenceInputError(f"the ensemble's checkpoints record different training spacings ({what}); "
                                  f"give --inplane-spacing MM or native")
    return known.pop()


def inplane_from(setting, recorded: tuple | None) -> tuple | None:
    """The (sy, sx) mm scans are predicted at under ``setting`` (auto, native, or mm; None = native), auto taking
    ``recorded`` (the models' training spacing, as training_inplane or a served model.json gives it); None: each
    scan on its own grid."""
    if setting is None or setting == NATIVE:
        return None
    if setting == AUTO:
        return recorded
    v = float(parse_inplane(setting))
    return (v, v)


def resolve_inplane(setting, ens) -> tuple | None:
    """inplane_from for the ensemble ``ens``: auto = its checkpoints' record (none recorded: each scan's own grid)."""
    return inplane_from(setting, training_inplane(ens) if setting == AUTO else None)


def grid_at(shape, spacing, inplane: tuple | None) -> tuple:
    """(shape, spacing) of a scan of ``shape`` (z, y, x) and ``spacing`` (sz, sy, sx) mm predicted at ``inplane``
    (sy, sx) mm (None: its own grid); an axis within RTOL of its target is kept."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(v) for v in spacing)
    if inplane is None:
        return shape, spacing
    keep = [None if abs(s / t - 1.0) <= RTOL else float(t) for s, t in zip(spacing[1:], inplane)]
    new_shape, new_spacing = target_grid(shape, spacing, keep)
    return tuple(new_shape), tuple(new_spacing)


def prediction_voxels(header, inplanes=()) -> int:
    """The voxels a scan of ``header`` (ahnet.data.header.ScanHeader) is held at while predicted at each of
    ``inplanes`` ((sy, sx) mm or None): the larger of its own grid and every prediction grid."""
    voxels = int(header.voxels)
    if header.spacing is None or len(header.shape) != 3:
        return voxels
    grids = [math.prod(grid_at(header.shape, header.spacing, p)[0]) for p in inplanes if p is not None]
    return max([voxels] + grids)


@dataclass(frozen=True)
class PredictionGrid:
    """The grid a scan of geometry ``native`` (a Volume; its array unused) is predicted on: ``shape`` (z, y, x),
    ``spacing`` (sz, sy, sx) mm, the same origin and direction. ``resamples``: False when it is the scan's own."""
    native: Volume
    shape: tuple
    spacing: tuple

    @classmethod
    def for_scan(cls, geometry: Volume, inplane: tuple | None) -> "PredictionGrid":
        """The grid of ``geometry`` at in-plane spacing ``inplane`` (sy, sx) mm (None: its own); an axis within
        RTOL of its target is kept."""
        return cls(geometry, *grid_at(geometry.shape, geometry.spacing, inplane))

    @property
    def resamples(self) -> bool:
        return self.shape != tuple(self.native.shape) or self.spacing != tuple(self.native.spacing)

    def working(self, image: np.ndarray) -> Volume:
        """``image`` (z, y, x) on the scan's grid -> a Volume on this grid (linear; the same array when it is the
        scan's own), with the scan's origin and direction."""
        vol = Volume(image, self.native.spacing, self.native.origin, self.native.direction)
        return resample_onto(vol, self.shape, self.spacing, order=1) if self.resamples else vol

    def to_native(self, prob: np.ndarray) -> np.ndarray:
        """A (z, y, x) map on this grid -> float32 on the scan's own grid (linear; as it is when they agree)."""
        if tuple(prob.shape) != self.shape:
            raise InferenceInputError(f"a map of shape {tuple(prob.shape)} on a prediction grid of {self.shape}")
        if not self.resamples:
            return prob
        vol = Volume(prob, self.spacing, self.native.origin, self.native.direction)
        return resample_onto(vol, self.native.shape, self.native.spacing, order=1).array
