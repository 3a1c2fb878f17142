"""An anisotropic chest-CT phantom with real LIDC-IDRI nodule shapes (the science: paper_notes/data.md).

A case is built on a fine grid (in-plane spacing `spacing`, z step = thickness / ceil(thickness / spacing),
never coarser than in-plane) as a tissue label map plus HU values, then acquired: each output slice is the
mean of the fine slices inside its slice profile (a box of width `thickness`, contiguous slices), a slight
in-plane blur (PSF), and correlated noise of 10-40 HU. Anatomy: air, body wall fat and muscle, oblique ribs
and a spine (cortical shell, marrow, discs), lungs with smooth HU variation, a branching tapering vessel tree
(8 mm at the hilum to < 1 mm, all directions: the vessel cut across that looks like a nodule in one thick
slice), airways (air lumen, 1-2 mm wall), fissures (thin -700 HU sheets), and nodules of the 12 types of
ahnet.data.nodule_types in four location classes (isolated, juxta-pleural, juxta-vascular, perifissural).

Nodule shapes: by default single LIDC-IDRI reader annotations (CC BY 3.0) resampled to the fine grid and
typed by the 12-type rule from their own ratings and their volume as painted; scans with database id % 5 == 0
are never used, and train / validation / test draw shapes from disjoint LIDC scans (scan id % 10 in
{1,2,3,6,7,8} / {9} / {4}). Fallback `shapes="procedural"`: ellipsoids with lobulation harmonics and
spicules, sized from the LIDC size priors, with pseudo-ratings that the same rule types.

Coordinates: arrays (z, y, x); direction identity in LPS; NIfTI affine = diag(-sx, -sy, sz) with the
origin's x and y negated (RAS).  CLI: `python -m ahnet.data.phantom --help`.

Modules: constants (tissues, HU, locations, CSV columns, LIDC splits), options (PhantomOptions, Case),
geometry (capsules, vessel trees), anatomy (the anatomy in named steps), shapes (LIDC pool, procedural shapes,
composition HU), placement (location classes, gaps), case (one case), schedule (the exact schedule), dataset
(many cases and their files), heldout (the test-only phantoms the experiment evaluates on), cli.
"""
from ahnet.data.phantom.case import generate_case
from ahnet.data.phantom.constants import CSV_COLUMNS, LOCATIONS, SPLITS, TISSUE, TISSUE_HU, lidc_split_of_scan
from ahnet.data.phantom.dataset import generate_dataset
from ahnet.data.phantom.heldout import HELD_OUT_SEED_OFFSET, TEST_PHANTOMS, generate_test_phantom, held_out_seed
from ahnet.data.phantom.options import Case, PhantomOptions
from ahnet.data.phantom.shapes import get_pool as _get_pool  # noqa: F401  (ahnet.bench times the pool load through this name)

__all__ = ["generate_dataset", "generate_case", "PhantomOptions", "Case", "TISSUE", "TISSUE_HU",
           "LOCATIONS", "lidc_split_of_scan", "CSV_COLUMNS", "SPLITS", "TEST_PHANTOMS",
           "generate_test_phantom", "held_out_seed", "HELD_OUT_SEED_OFFSET"]
