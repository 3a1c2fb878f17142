"""Findings a person reads: candidates ranked by probability with an estimated diameter (ahnet.infer.findings), and
the overview picture that shows them (ahnet.infer.overview)."""
import math

import numpy as np
import pytest

from ahnet.data.io import Volume
from ahnet.infer.findings import add_diameters, equivalent_diameter_mm, rank_candidates
from ahnet.infer.overview import ABOVE, BELOW, MARK_SLICES, TOP_SLICES, layout, write_overview

SP = (2.5, 0.7, 0.8)


def _dist_mm(shape, centre_zyx, sp=SP):
    z, y, x = np.indices(shape, dtype=float)
    return np.sqrt(((z - centre_zyx[0]) * sp[0]) ** 2 + ((y - centre_zyx[1]) * sp[1]) ** 2
                   + ((x - centre_zyx[2]) * sp[2]) ** 2)


def test_diameter_is_the_sphere_of_the_half_maximum_region():
    shape, c = (20, 64, 60), (9.6, 30.2, 28.7)
    d = _dist_mm(shape, c)
    prob = np.full(shape, 0.3, np.float32)        # background below half the peak
    prob[d <= 8.0] = 0.44                          # a rim just under half of 0.9: not the finding
    prob[d <= 7.0] = 0.5                           # a shoulder above half: part of it
    prob[d <= 5.0] = 0.9
    far = _dist_mm(shape, (9.6, 30.2, 52.0)) <= 3.0
    prob[far] = 0.95                               # another blob, not connected to it
    n = int(np.count_nonzero(d <= 7.0))            # counted here, independently of the module
    want = (6.0 * n * SP[0] * SP[1] * SP[2] / math.pi) ** (1 / 3)
    assert equivalent_diameter_mm(prob, SP, c) == pytest.approx(want, rel=1e-12)
    assert equivalent_diameter_mm(prob, SP, (c[0] + 1, c[1] - 1, c[2])) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(14.0, rel=0.08)   # the shoulder's 7 mm radius, up to the voxel grid
    assert equivalent_diameter_mm(np.zeros(shape, np.float32), SP, c) == 0.0


def test_candidates_are_ranked_by_probability_with_their_voxel_centres():
    vol = Volume(np.zeros((10, 20, 20), np.float32), SP, (-5.0, 12.0, 40.0))
    zyx = [(1, 2, 3), (4.5, 5, 6), (7, 8.25, 9), (2, 3, 4)]
    xyz = vol.voxel_to_world(np.array(zyx, float))
    rows = [{"seriesuid": "c", "coordX": x, "coordY": y, "coordZ": z, "probability": p}
            for (x, y, z), p in zip(xyz, (0.3, 0.9, 0.5, 0.9))]
    ranked = rank_candidates(rows, vol)
    assert [(f["rank"], f["probability"]) for f in ranked] == [(1, 0.9), (2, 0.9), (3, 0.5), (4, 0.3)]
    np.testing.assert_allclose([f["centre_zyx"] for f in ranked], [zyx[1], zyx[3], zyx[2], zyx[0]], atol=1e-9)
    assert ranked[0]["coordX"] == rows[1]["coordX"] and "rank" not in rows[1]      # copies, rows untouched


def _finding(rank, z, p, y=10.0, x=12.0):
    return {"rank": rank, "probability": p, "centre_zyx": [z, y, x], "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0}


def test_the_overview_shows_the_slices_through_the_top_candidates():
    f = [_finding(1, 5.2, .9), _finding(2, 5.4, .8), _finding(3, 11.0, .7), _finding(4, 6.4, .6),
         _finding(5, 0.0, .5), _finding(6, 19.0, .4), _finding(7, 3.0, .3)]
    plan = layout(f, 20)
    assert plan["slices"] == [5, 11, 6, 0][:TOP_SLICES]        # rank order, a slice shown once
    assert MARK_SLICES == 1 and plan["marks"][5] == [1, 2, 4] and plan["marks"][0] == [5]
    assert plan["projection"] == [1, 2, 3, 4, 5, 6, 7]
    assert layout([], 20) == {"slices": [10], "marks": {10: []}, "projection": []}


def _picture_world():
    shape = (16, 64, 72)
    image = np.full(shape, 0.1, np.float32)
    prob = np.zeros(shape, np.float32)
    for c, p in (((8, 30, 20), 0.9), ((4, 40, 50), 0.35)):
        blob = _dist_mm(shape, c) <= 4.0
        image[blob], prob[blob] = 0.75, p
    return Volume(image, SP, (0.0, 0.0, 0.0)), prob


def _pixels_near(png, hex_colour, tol=6):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], float)
    return int(np.count_nonzero(np.all(np.abs(png[..., :3] * 255.0 - rgb) <= tol, axis=-1)))


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_the_overview_is_a_picture_whose_circles_say_above_or_below_the_operating_point(tmp_path, threshold):
    import matplotlib.image as mpimg
    from ahnet.infer import extract_candidates

    vol, prob = _picture_world()
    findings = add_diameters(rank_candidates(extract_candidates(prob, vol, seriesuid="c"), vol), prob, SP)
    assert [round(f["probability"], 2) for f in findings] == [0.9, 0.35]
    path = tmp_path / "c_overview.png"
    plan = write_overview(path, vol.array, prob, vol, findings, "c", threshold)
    assert plan["slices"] == [8, 4]
    png = mpimg.imread(str(path))
    assert png.shape[:2] == (800, 1400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_overview.png"]          # no temporary left
    red, yellow = _pixels_near(png, ABOVE), _pixels_near(png, BELOW)
    assert yellow > 20                                     # p = 0.35 is below either operating point
    assert (red > 20) if threshold == 0.5 else (red == 0)  # p = 0.9 is above 0.5, below 0.95
