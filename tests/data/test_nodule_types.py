"""The 12-type rule at every boundary (ahnet.data.nodule_types)."""
import math
from fractions import Fraction

import numpy as np
import pytest

from ahnet.data.nodule_types import (TYPE_CODES, TYPE_NAMES, is_calcified, mean_rating, nodule_type,
                                     volume_equivalent_diameter)

SOLID = dict(texture=5, spiculation=1, lobulation=1, calcified=False)


def test_names_cover_twelve_codes():
    assert TYPE_CODES == tuple(f"T{i:02d}" for i in range(1, 13))
    assert set(TYPE_NAMES) == set(TYPE_CODES)


@pytest.mark.parametrize("d,code", [(0.0, "T01"), (5.999, "T01"), (6.0, "T02"), (7.999, "T02"), (8.0, "T03"),
                                    (14.999, "T03"), (15.0, "T04"), (40.0, "T04")])
def test_solid_size_bins(d, code):
    assert nodule_type(d, **SOLID) == code


def test_texture_boundaries_exact_fractions():
    # mean of [2,2,3] = 7/3 exactly -> part-solid; float mean is 2.3333333333333335 or ...0
    assert nodule_type(4, [2, 2, 3], 1, 1, False) == "T07"
    assert nodule_type(4, np.mean([2, 2, 3]), 1, 1, False) == "T07"
    assert nodule_type(4, 7 / 3, 1, 1, False) == "T07"
    assert nodule_type(4, Fraction(7, 3), 1, 1, False) == "T07"
    assert nodule_type(4, 7 / 3 - 1e-12, 1, 1, False) == "T07"   # float noise below 7/3 is snapped
    # just under 7/3: [2,2,2,3] = 9/4 < 7/3 -> ground-glass
    assert nodule_type(4, [2, 2, 2, 3], 1, 1, False) == "T09"
    assert nodule_type(9, [2, 2, 2, 3], 1, 1, False) == "T10"
    assert nodule_type(4, 2.3, 1, 1, False) == "T09"
    # 11/3 = mean of [3,4,4] -> still part-solid; [4,4,4,3] = 15/4 > 11/3 -> solid
    assert nodule_type(6, [3, 4, 4], 1, 1, False) == "T08"
    assert nodule_type(6, sum([3, 4, 4]) / 3, 1, 1, False) == "T08"
    assert nodule_type(6, [4, 4, 4, 3], 1, 1, False) == "T02"
    # single readers: 1-2 GGO, 3 part-solid, 4-5 solid
    assert [nodule_type(5, t, 1, 1, False) for t in (1, 2, 3, 4, 5)] == ["T09", "T09", "T07", "T01", "T01"]


def test_margin_boundaries_and_precedence():
    assert nodule_type(10, 5, 3, 1, False) == "T06"
    assert nodule_type(10, 5, [2, 3, 3, 4], 5, False) == "T06"       # s = 3 exactly -> spiculated first
    assert nodule_type(10, 5, [2, 3, 3], 1, False) == "T03"          # s = 8/3 < 3
    assert nodule_type(10, 5, 1, [3, 3, 3], False) == "T05"
    assert nodule_type(10, 5, 1, 2.9999, False) == "T03"
    assert nodule_type(3, 5, 3, 3, False) == "T06"                   # margin beats the size bins
    # composition beats margin
    assert nodule_type(10, 3, 5, 5, False) == "T08"
    assert nodule_type(10, 1, 5, 5, False) == "T10"
    assert nodule_type(10, 1, 5, 5, True) == "T12"
    assert nodule_type(5.99, 1, 5, 5, True) == "T11"


def test_is_calcified_ties():
    assert is_calcified([6, 6, 3, 1])          # 2 of 4: tie counts
    assert not is_calcified([6, 6, 6, 1])      # 1 of 4
    assert is_calcified([3])
    assert not is_calcified([6])
    assert not is_calcified([])
    assert is_calcified([6, 4])                # 1 of 2
    assert not is_calcified([6, 6, 2])         # 1 of 3
    with pytest.raises(ValueError, match="1..6"):
        is_calcified([0, 6])


def test_volume_equivalent_diameter():
    for d in (3.0, 6.0, 8.0, 15.0):
        assert volume_equivalent_diameter(math.pi * d ** 3 / 6) == pytest.approx(d, rel=1e-12)
    # reference sphere volumes of the doc: 113, 268, 1767 mm3
    assert volume_equivalent_diameter(113.1) == pytest.approx(6.0, abs=0.01)
    assert volume_equivalent_diameter(268.1) == pytest.approx(8.0, abs=0.01)
    assert volume_equivalent_diameter(1767.1) == pytest.approx(15.0, abs=0.01)
    with pytest.raises(ValueError, match="volume_mm3"):
        volume_equivalent_diameter(-1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="d_mm"):
        nodule_type(float("nan"), 5, 1, 1, False)
    with pytest.raises(ValueError, match="texture"):
        nodule_type(5, [], 1, 1, False)
    with pytest.raises(ValueError, match="texture"):
        nodule_type(5, "5", 1, 1, False)
    assert mean_rating([2, 2, 3]) == Fraction(7, 3)
