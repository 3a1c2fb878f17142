"""The phantom's fixed facts: tissue labels and their HU, nodule location classes, CSV columns, LIDC splits."""
from __future__ import annotations

from typing import Dict, Optional, Set
from ahnet.data.nodule_types import LOCATIONS  # noqa: F401  (nodule location classes: one owner)

# tissue labels of the fine label map
TISSUE = dict(air=0, fat=1, muscle=2, cortical=3, marrow=4, lung=5, vessel=6, airway_wall=7, airway_lumen=8,
              fissure=9, nodule=10)
AIR, FAT, MUSCLE, CORTICAL, MARROW, LUNG, VESSEL, AW_WALL, AW_LUMEN, FISSURE, NODULE = range(11)
# nominal HU (ranges the test checks): cortical and marrow are drawn per case inside these ranges
TISSUE_HU = {AIR: -1000.0, FAT: -100.0, MUSCLE: 40.0, CORTICAL: (750.0, 950.0), MARROW: (220.0, 280.0),
             LUNG: -850.0, VESSEL: 40.0, AW_WALL: 40.0, AW_LUMEN: -1000.0, FISSURE: -700.0}
CSV_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "type", "location", "label",
               "volume_mm3", "texture", "spiculation", "lobulation", "calcification", "subtlety", "lidc_scan_id",
               "lidc_annotation_id", "shape_reuse"]
# lidc_annotation_id: the LIDC-IDRI annotation the shape came from ("" for a procedural shape); shape_reuse: 1
# when the shape is a rotated / mirrored / rescaled reuse of an annotation already drawn (exact mode), else 0
SPLITS = ("train", "validation", "test")
# the LIDC shape pools: one per split, and the sealed "final" pool that only the final test phantom draws from
SHAPE_POOLS = SPLITS + ("final",)
GGO_TYPES, PART_TYPES, CALC_TYPES = {"T09", "T10"}, {"T07", "T08"}, {"T11", "T12"}
# size ranges (mm) for procedural shapes per type, inside the type's bin and the p10..p90 priors
PROC_D = {"T01": (3.6, 5.7), "T02": (6.2, 7.7), "T03": (8.4, 13.5), "T04": (15.6, 24.0), "T05": (6.2, 20.0),
          "T06": (6.2, 22.0), "T07": (3.6, 5.7), "T08": (6.4, 16.0), "T09": (3.8, 5.7), "T10": (6.4, 14.0),
          "T11": (3.6, 5.7), "T12": (6.4, 12.0)}
# LIDC calcification code -> painted pattern
CALC_PATTERN = {1: "popcorn", 2: "laminated", 3: "whole", 4: "popcorn", 5: "central"}


def lidc_split_of_scan(scan_id: int) -> Optional[str]:
    """Split that may draw shapes from this LIDC scan; None for reserved scans (id % 5 == 0).

    scan id % 10 in {1, 2, 3, 6, 7, 8}: train; {9}: validation; {4}: test (the development set); {0, 5}: reserved.
    The sealed final pool takes its shapes from reserved scans only, and only from patients all of whose scans
    are reserved (``final_pool_scans``), so it shares no patient with any other pool.
    """
    r = int(scan_id) % 10
    if r in (0, 5):
        return None
    return "test" if r == 4 else "validation" if r == 9 else "train"


def final_pool_scans(patient_of_scan: Dict[int, str]) -> Set[int]:
    """The LIDC scans of the sealed final pool: every scan of each patient whose scans are all reserved
    (id % 5 == 0). ``patient_of_scan``: {scan id: patient id} of the whole database."""
    scans_of: Dict[str, list] = {}
    for scan_id, patient in patient_of_scan.items():
        scans_of.setdefault(patient, []).append(int(scan_id))
    return {s for ids in scans_of.values() if all(lidc_split_of_scan(s) is None for s in ids) for s in ids}
