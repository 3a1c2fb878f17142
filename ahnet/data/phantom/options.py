"""The phantom's options (PhantomOptions) and one generated case (Case)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ahnet.data.io import voxel_to_world

#: the most voxels of a case's fine grid (size^2 x slices x fine slices per slice): about 1 GiB per float32 copy
MAX_FINE_VOXELS = 2 ** 28


@dataclass
class PhantomOptions:
    """Options of a phantom case and dataset. nodules_per_case: N or (min, max) per case with nodules.

    exact: every nodule comes out exactly as scheduled (its type as painted and its location class; a
    nodule that does not is drawn and placed again), per-type balanced locations, and LIDC shapes drawn
    without replacement across the dataset (distinct lesions first, then rotated / mirrored / rescaled
    reuses); a type that cannot fit the lungs at this size is an error. Off: the original sampling.
    """
    size: int = 192                     # in-plane matrix (square)
    slices: int = 40                    # output slices
    thickness: float = 2.5              # slice thickness = slice spacing (mm)
    spacing: float = 0.7                # in-plane spacing (mm)
    nodules_per_case: Tuple[int, int] = (1, 3)
    negatives: float = 0.15             # fraction of cases without nodules
    shapes: str = "lidc"                # "lidc" or "procedural"
    noise: Tuple[float, float] = (10.0, 40.0)   # noise std range (HU); (0, 0) = off
    vessel_density: float = 1.0         # scales the vessel segment budget
    balance: bool = True                # balanced type schedule (else uniform at random)
    split: Tuple[float, float, float] = (0.7, 0.15, 0.15)
    exact: bool = False                 # see the class docstring
    shape_pool: str = "split"           # LIDC shapes from each case's split ("split") or the sealed "final" pool
    psf_sigma: float = 0.5              # in-plane PSF (reconstruction kernel) sigma, px: smaller = sharper;
    #                                     (min, max): drawn per scan (randomised kernels)
    hu_offset: float = 0.0              # HU added to every voxel after acquisition (a calibration shift)
    vessel_radius: float = 1.0          # scales every vessel's radius (< 1: finer vessels)

    def __post_init__(self):
        npc = self.nodules_per_case
        if isinstance(npc, (int, np.integer)) and not isinstance(npc, bool):
            self.nodules_per_case = (int(npc), int(npc))
        elif isinstance(npc, list):
            self.nodules_per_case = tuple(npc)
        for name in ("noise", "split", "psf_sigma"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        if self.size < 48:
            raise ValueError(f"size must be >= 48 voxels, got {self.size}")
        if self.slices < 4:
            raise ValueError(f"slices must be >= 4, got {self.slices}")
        fine = self.size ** 2 * self.slices * max(1, math.ceil(self.thickness / self.spacing))
        if fine > MAX_FINE_VOXELS:
            raise ValueError(f"size {self.size} x {self.size} x {self.slices} slices builds a fine grid of {fine:.3g} "
                             f"voxels (at most {MAX_FINE_VOXELS:.3g}); use a smaller --size or fewer --slices")
        if not (0.2 <= self.spacing <= 3.0) or not (0.5 <= self.thickness <= 10.0):
            raise ValueError(f"spacing must be 0.2..3 mm and thickness 0.5..10 mm, got {self.spacing}, "
                             f"{self.thickness}")
        npc = self.nodules_per_case
        if not (isinstance(npc, tuple) and len(npc) == 2 and all(isinstance(v, (int, np.integer)) for v in npc)
                and 0 <= npc[0] <= npc[1] <= 50):
            raise ValueError(f"nodules_per_case must be N or (min, max) with 0 <= min <= max <= 50, got {npc}")
        if not 0.0 <= self.negatives <= 1.0:
            raise ValueError(f"negatives must be a fraction in [0, 1], got {self.negatives}")
        if self.shapes not in ("lidc", "procedural"):
            raise ValueError(f"shapes must be 'lidc' or 'procedural', got {self.shapes!r}")
        if len(self.noise) != 2 or not 0.0 <= self.noise[0] <= self.noise[1] <= 1000.0:
            raise ValueError(f"noise must be (min, max) HU with 0 <= min <= max <= 1000, got {self.noise}")
        if not 0.0 <= self.vessel_density <= 10.0:
            raise ValueError(f"vessel_density must be in [0, 10], got {self.vessel_density}")
        if self.shape_pool not in ("split", "final"):
            raise ValueError(f"shape_pool must be 'split' or 'final', got {self.shape_pool!r}")
        psf = self.psf_sigma if isinstance(self.psf_sigma, tuple) else (self.psf_sigma,)
        if not (len(psf) in (1, 2) and all(isinstance(v, (int, float)) and 0.0 <= v <= 3.0 for v in psf)
                and psf[0] <= psf[-1]) or not -200.0 <= self.hu_offset <= 200.0:
            raise ValueError(f"psf_sigma must be a sigma or a (min, max) range in [0, 3] px and hu_offset in "
                             f"[-200, 200] HU, got {self.psf_sigma}, {self.hu_offset}")
        if not 0.2 <= self.vessel_radius <= 3.0:
            raise ValueError(f"vessel_radius must be in [0.2, 3], got {self.vessel_radius}")
        sp = self.split
        if len(sp) != 3 or any(not f >= 0.0 for f in sp) or sum(sp) <= 0:
            raise ValueError(f"split must be three fractions (train, validation, test) >= 0 with a positive "
                             f"sum, got {sp}")


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
    psf_sigma: float = 0.0                       # this scan's in-plane PSF sigma, px

    def voxel_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) voxel (z, y, x) -> (n, 3) world LPS mm (identity direction)."""
        return np.atleast_2d(voxel_to_world(np.asarray(zyx, float).reshape(-1, 3), self.spacing, self.origin))
