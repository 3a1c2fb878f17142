"""The project's 12 lung-nodule types and 4 location classes (reference counts per type: paper_notes/data.md).

Composition first (calcified, ground-glass, part-solid, solid), then margin (spiculated, lobulated) for
solid nodules, then the Lung-RADS v1.1 solid size bins (6, 8, 15 mm). First matching row wins:

    T11 calcified and d < 6        T12 calcified and d >= 6
    T09 t < 7/3 and d < 6          T10 t < 7/3 and d >= 6             (ground-glass)
    T07 7/3 <= t <= 11/3, d < 6    T08 7/3 <= t <= 11/3, d >= 6       (part-solid)
    T06 s >= 3 (spiculated)        T05 l >= 3 (lobulated)
    T01 d < 6   T02 6 <= d < 8     T03 8 <= d < 15   T04 d >= 15      (solid)

Ratings are LIDC scales (1..5) averaged over a nodule's readers. The comparisons are done on exact
fractions, so a mean such as (2 + 2 + 3) / 3 = 7/3 counts as part-solid whatever float rounding did to it.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real
from typing import Iterable, Sequence, Union

__all__ = ["TYPE_CODES", "TYPE_NAMES", "LOCATIONS", "nodule_type", "is_calcified", "volume_equivalent_diameter",
           "mean_rating", "sphere_volume"]

TYPE_NAMES = {
    "T01": "solid < 6 mm",
    "T02": "solid 6 to < 8 mm",
    "T03": "solid 8 to < 15 mm",
    "T04": "solid >= 15 mm",
    "T05": "solid lobulated",
    "T06": "solid spiculated",
    "T07": "part-solid < 6 mm",
    "T08": "part-solid >= 6 mm",
    "T09": "ground-glass < 6 mm",
    "T10": "ground-glass >= 6 mm",
    "T11": "calcified < 6 mm",
    "T12": "calcified >= 6 mm",
}
TYPE_CODES = tuple(sorted(TYPE_NAMES))

#: where a nodule sits: alone in the parenchyma, on the pleura, on a vessel, on a fissure
LOCATIONS = ("isolated", "juxta-pleural", "juxta-vascular", "perifissural")

GGO_BELOW = Fraction(7, 3)      # t < 7/3: ground-glass
SOLID_ABOVE = Fraction(11, 3)   # t > 11/3: solid; in between (inclusive): part-solid
MARGIN_AT = 3                   # spiculation / lobulation mean >= 3
CALC_ABSENT = 6                 # LIDC calcification code 6 = absent; 1..5 = a calcification pattern

Rating = Union[Real, Fraction, Sequence[Real]]


def _exact(x: Rating, name: str) -> Fraction:
    """A rating (number or sequence of reader ratings) as an exact fraction.

    A float within 1e-9 of a fraction with denominator <= 12 (every mean of 1..4 integer ratings) is
    snapped to that fraction, so 2.3333333333333335 is 7/3 exactly.
    """
    if isinstance(x, (list, tuple)) or (hasattr(x, "__len__") and not isinstance(x, (str, bytes))):
        return mean_rating(x, name)
    if isinstance(x, bool) or not isinstance(x, Real):
        raise ValueError(f"{name} must be a number or a sequence of ratings, got {x!r}")
    xf = float(x)
    if not math.isfinite(xf):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if isinstance(x, (int, Fraction)):
        return Fraction(x)
    snapped = Fraction(xf).limit_denominator(12)
    return snapped if abs(float(snapped) - xf) < 1e-9 else Fraction(xf)


def mean_rating(ratings: Iterable[Real], name: str = "ratings") -> Fraction:
    """Exact mean of integer reader ratings, e.g. [2, 2, 3] -> Fraction(7, 3)."""
    vals = list(ratings)
    if not vals:
        raise ValueError(f"{name} is empty: expected at least one reader rating")
    total = Fraction(0)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must hold finite numbers, got {v!r}")
        total += _exact(v, name)
    return total / len(vals)


def is_calcified(calcification_ratings: Iterable[int]) -> bool:
    """True when at least half of the readers (and at least one) rate calcification present (code 1..5).

    LIDC code 6 means absent. A tie (2 of 4 readers) counts as calcified.
    """
    vals = [int(v) for v in calcification_ratings]
    for v in vals:
        if not 1 <= v <= 6:
            raise ValueError(f"calcification ratings must be LIDC codes 1..6, got {v}")
    present = sum(1 for v in vals if v != CALC_ABSENT)
    return present >= 1 and 2 * present >= len(vals)


def volume_equivalent_diameter(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere of the given volume: (6 V / pi)^(1/3)."""
    v = float(volume_mm3)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"volume_mm3 must be a finite number >= 0, got {volume_mm3!r}")
    return (6.0 * v / math.pi) ** (1.0 / 3.0)


def sphere_volume(d_mm: float) -> float:
    """Volume (mm3) of a sphere of diameter d_mm."""
    return math.pi * float(d_mm) ** 3 / 6.0


def nodule_type(d_mm: float, texture: Rating, spiculation: Rating, lobulation: Rating,
                calcified: bool) -> str:
    """The 12-type code "T01".."T12" of a nodule.

    d_mm: volume-equivalent diameter in mm. texture, spiculation, lobulation: mean LIDC ratings (numbers,
    Fractions, or the sequences of reader ratings, averaged exactly). calcified: see is_calcified.
    """
    d = float(d_mm)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"d_mm must be a finite diameter >= 0 mm, got {d_mm!r}")
    t = _exact(texture, "texture")
    s = _exact(spiculation, "spiculation")
    lob = _exact(lobulation, "lobulation")
    small = d < 6.0
    if calcified:
        return "T11" if small else "T12"
    if t < GGO_BELOW:
        return "T09" if small else "T10"
    if t <= SOLID_ABOVE:
        return "T07" if small else "T08"
    if s >= MARGIN_AT:
        return "T06"
    if lob >= MARGIN_AT:
        return "T05"
    if small:
        return "T01"
    if d < 8.0:
        return "T02"
    if d < 15.0:
        return "T03"
    return "T04"
