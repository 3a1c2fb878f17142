"""Dice and HD95 against analytic values and a brute-force pairwise-distance computation."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from ahnet.evaluate.segmetrics import (SegMetricsInputError, aggregate_seg, dice, hausdorff, hd95, mean_ci,
                              nodule_seg_metrics, surface)

SP = (2.5, 0.7, 0.8)   # (sz, sy, sx) mm, anisotropic on purpose


def cube(shape, centre, half):
    m = np.zeros(shape, bool)
    m[tuple(slice(c - half, c + half + 1) for c in centre)] = True
    return m


def sphere(shape, centre, r_mm, sp):
    g = np.indices(shape).astype(float)
    d2 = sum(((g[i] - centre[i]) * sp[i]) ** 2 for i in range(3))
    return d2 <= r_mm ** 2


def brute_hd(a, b, sp, q):
    pa = np.argwhere(surface(a)) * np.array(sp)
    pb = np.argwhere(surface(b)) * np.array(sp)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


def test_surface_of_cube_is_its_shell():
    c = cube((9, 9, 9), (4, 4, 4), 2)
    assert surface(c).sum() == 5 ** 3 - 3 ** 3


def test_dice_concentric_cubes_analytic():
    a, b = 2, 3
    p, g = cube((11, 11, 11), (5, 5, 5), a), cube((11, 11, 11), (5, 5, 5), b)
    va, vb = (2 * a + 1) ** 3, (2 * b + 1) ** 3
    assert dice(p, g) == pytest.approx(2 * va / (va + vb))
    assert dice(np.zeros_like(p), np.zeros_like(g)) == 1.0
    assert dice(p, np.zeros_like(g)) == 0.0


def test_hausdorff_concentric_cubes_analytic_anisotropic():
    a, b = 2, 4
    p, g = cube((13, 13, 13), (6, 6, 6), a), cube((13, 13, 13), (6, 6, 6), b)
    # the outer corner's nearest inner surface voxel is the inner corner: (b - a) * |spacing|
    assert hausdorff(p, g, SP, 100) == pytest.approx((b - a) * np.linalg.norm(SP))
    assert hausdorff(p, p, SP, 95) == 0.0


def test_hd95_matches_brute_force_on_spheres_and_shifted_cubes():
    sh = (14, 30, 30)
    s1 = sphere(sh, (6.5, 14, 15), 7.0, SP)
    s2 = sphere(sh, (7.2, 16, 13), 6.0, SP)
    assert hd95(s1, s2, SP) == pytest.approx(brute_hd(s1, s2, SP, 95), abs=1e-9)
    c1 = cube(sh, (6, 14, 14), 4)
    c2 = np.roll(c1, 3, axis=2)
    assert hd95(c1, c2, SP) == pytest.approx(brute_hd(c1, c2, SP, 95), abs=1e-9)
    assert hausdorff(c1, c2, SP, 100) == pytest.approx(3 * SP[2])   # a shift of 3 voxels along x
    assert dice(c1, c2) == pytest.approx(2 * 9 * 9 * 6 / (2 * 9 ** 3))


def test_empty_masks_give_none_and_bad_input_raises():
    z = np.zeros((4, 4, 4), bool)
    assert hd95(z, cube((4, 4, 4), (2, 2, 2), 1), SP) is None
    with pytest.raises(SegMetricsInputError, match="same shape"):
        dice(z, np.zeros((4, 4, 5)))
    with pytest.raises(SegMetricsInputError, match="spacing"):
        hd95(z, z, (1, 1))


def test_per_nodule_box_other_nodules_missed_and_absent():
    sh = (20, 40, 40)
    inst = np.zeros(sh, np.int16)
    inst[cube(sh, (5, 10, 10), 2)] = 1
    inst[cube(sh, (5, 10, 17), 2)] = 2            # close neighbour inside nodule 1's box
    inst[cube(sh, (14, 30, 30), 2)] = 3           # not predicted
    pred = (inst == 1) | (inst == 2)              # nodule 1 and 2 predicted exactly
    pred |= cube(sh, (15, 5, 35), 1)              # a far FP outside every box
    rows = {r["label"]: r for r in nodule_seg_metrics(pred, inst, SP, margin_mm=5.0, labels=[1, 2, 3, 4])}
    assert rows[1]["status"] == "ok" and rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] == 0.0
    assert rows[2]["dice"] == 1.0
    assert rows[3]["status"] == "missed" and rows[3]["dice"] == 0.0 and rows[3]["hd95_mm"] is None
    assert rows[4]["status"] == "no_gt" and rows[4]["dice"] is None
    # box = bbox grown by ceil(5 / s) voxels: z 2, y 8, x 7
    assert rows[1]["box"] == [3 - 2, 8 + 2, 0, 13 + 8, 8 - 7, 13 + 7]
    # an over-segmentation inside the box lowers Dice: grow nodule 1 by one voxel in x on one side
    pred2 = pred.copy()
    pred2[3:8, 8:13, 13] = True
    r1 = nodule_seg_metrics(pred2, inst, SP, labels=[1])[0]
    assert r1["dice"] == pytest.approx(2 * 125 / (125 + 150))


def test_aggregate_counts_missed_as_zero_dice_and_reports_undefined_hd():
    rows = [dict(status="ok", dice=0.8, hd95_mm=1.0, type="T01"),
            dict(status="missed", dice=0.0, hd95_mm=None, type="T01"),
            dict(status="no_gt", dice=None, hd95_mm=None, type="T02"),
            dict(status="ok", dice=0.6, hd95_mm=3.0, type=None)]
    a = aggregate_seg(rows, group_keys=("type",), n_bootstrap=200)
    o = a["overall"]
    assert (o["n"], o["n_no_gt"], o["n_missed"]) == (4, 1, 1)
    assert o["dice"]["mean"] == pytest.approx(1.4 / 3) and o["dice"]["n"] == 3
    assert o["hd95_mm"]["mean"] == pytest.approx(2.0) and o["hd95_mm"]["n"] == 2
    t = a["groups"]["type"]
    assert t["T01"]["dice"]["mean"] == pytest.approx(0.4)
    assert t["T02"]["dice"] == {"n": 0, "mean": None, "ci": None}
    lo, hi = t["T01"]["dice"]["ci"]
    assert 0.0 <= lo <= 0.4 <= hi <= 0.8


def test_mean_ci_seeded_and_degenerate():
    assert mean_ci([0.5], 100)["ci"] == [0.5, 0.5]
    v = list(np.linspace(0, 1, 30))
    assert mean_ci(v, 500, seed=1) == mean_ci(v, 500, seed=1)
