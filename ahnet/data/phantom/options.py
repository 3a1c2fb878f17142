"""The phantom's options (PhantomOptions) and one generated case (Case)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ..io import voxel_to_world


@dataclass
class PhantomOptions:
    size: int = 192                     # in-plane matrix (square)
    slices: int = 40                    # output slices
    thickness: float = 2.5              # slice thickness = slice spacing (mm)
    spacing: float = 0.7                # in-plane spacing (mm)
    nodules_per_case: Tuple[int, int] = (1, 3)
    negatives: float = 0.15             # fraction of cases without nodules
    shapes: str = "lidc"                # "lidc" or "procedural"
    noise: Tuple[float, float] = (10.0, 40.0)   # noise std range (HU); (0, 0) = off
    vessel_density: float = 1.0         # scales the vessel segment budget
    balance: bool = True                # balanced type sampling (else the LIDC frequencies of the pool)
    split: Tuple[float, float, float] = (0.7, 0.15, 0.15)

    def validate(self) -> None:
        if self.size < 48:
            raise ValueError(f"size must be >= 48 voxels, got {self.size}")
        if self.slices < 4:
            raise ValueError(f"slices must be >= 4, got {self.slices}")
        if not (0.2 <= self.spacing <= 3.0) or not (0.5 <= self.thickness <= 10.0):
            raise ValueError(f"spacing must be 0.2..3 mm and thickness 0.5..10 mm, got {self.spacing}, "
                             f"{self.thickness}")
        lo, hi = self.nodules_per_case
        if not 0 <= lo <= hi:
            raise ValueError(f"nodules_per_case must be (min, max) with 0 <= min <= max, got {self.nodules_per_case}")
        if not 0.0 <= self.negatives <= 1.0:
            raise ValueError(f"negatives must be a fraction in [0, 1], got {self.negatives}")
        if self.shapes not in ("lidc", "procedural"):
            raise ValueError(f"shapes must be 'lidc' or 'procedural', got {self.shapes!r}")


@dataclass
class Case:
    """One generated case. image (z, y, x) float32 HU; label int16 instance mask; fine_* on the fine grid."""
    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]          # (sz, sy, sx)
    origin: Tuple[float, float, float]           # (x, y, z) LPS of voxel (0, 0, 0)
    nodules: List[dict]
    fine_tissue: np.ndarray                      # uint8 (Z, y, x)
    fine_hu: np.ndarray                          # float32 (Z, y, x), before blur/noise
    fine_dz: float
    noise_std: float
    vessel_segments: List[tuple] = field(default_factory=list)

    def voxel_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) voxel (z, y, x) -> (n, 3) world LPS mm (identity direction)."""
        return np.atleast_2d(voxel_to_world(np.asarray(zyx, float).reshape(-1, 3), self.spacing, self.origin))
