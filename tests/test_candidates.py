"""Candidates from probability maps: component scores/centroids, local maxima, NMS in world mm with sub-voxel
centres (against direct computations), world coordinates."""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ahnet.infer.candidates import (DEFAULT_RULE, CandidateInputError, CandidateRule, extract_candidates, find_peaks,
                                    voxel_to_world, world_to_voxel)

SP = (2.5, 0.7, 0.8)
ORIGIN = (-150.0, -170.0, -300.0)
ROT = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)     # a 90-degree in-plane rotation


def test_voxel_to_world_matches_simpleitk():
    img = sitk.Image(7, 6, 5, sitk.sitkFloat32)               # sizes (x, y, z)
    img.SetSpacing(SP[::-1])
    img.SetOrigin(ORIGIN)
    img.SetDirection(ROT.ravel().tolist())
    zyx = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.25, 3.75]])
    want = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p[::-1])) for p in zyx])
    got = voxel_to_world(zyx, SP, ORIGIN, ROT)
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(world_to_voxel(got, SP, ORIGIN, ROT), zyx, atol=1e-9)


def test_components_score_is_max_and_centre_is_weighted_centroid():
    p = np.zeros((6, 8, 8), np.float32)
    p[2, 3, 3], p[2, 3, 4] = 0.9, 0.6          # one component (face neighbours)
    p[3, 4, 5] = 0.7                          # diagonal (26-) neighbour of (2,3,4): same component
    p[5, 7, 0] = 0.55                         # another component
    p[0, 0, 7] = 0.4                          # below threshold
    zyx, s, n = find_peaks(p, SP, threshold=0.5, method="components")
    assert s.tolist() == pytest.approx([0.9, 0.55]) and n.tolist() == [3, 1]
    w = np.array([0.9, 0.6, 0.7])
    pts = np.array([[2, 3, 3], [2, 3, 4], [3, 4, 5]], float)
    np.testing.assert_allclose(zyx[0], (w[:, None] * pts).sum(0) / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(zyx[1], [5, 7, 0])


def test_maxima_separate_two_peaks_of_one_blob_and_merge_plateaus():
    z, y, x = np.mgrid[0:10, 0:30, 0:30].astype(float)
    blob = lambda c, s: np.exp(-(((z - c[0]) * SP[0]) ** 2 + ((y - c[1]) * SP[1]) ** 2
                                 + ((x - c[2]) * SP[2]) ** 2) / (2 * s ** 2))
    p = (0.9 * blob((5, 10, 10), 3) + 0.8 * blob((5, 10, 20), 3)).astype(np.float32)
    zc, sc, _ = find_peaks(p, SP, 0.5, "components")
    zm, sm, _ = find_peaks(p, SP, 0.5, "maxima", min_distance_mm=4)
    assert len(sc) == 1 and len(sm) == 2
    np.testing.assert_allclose(zm, [[5, 10, 10], [5, 10, 20]], atol=0.5)
    flat = np.zeros((5, 5, 5), np.float32)
    flat[2, 2, 1:4] = 0.8                    # a plateau of three equal maxima -> one candidate at its middle
    zf, sf, nf = find_peaks(flat, (1, 1, 1), 0.5, "maxima", 1.0)
    assert zf.tolist() == [[2, 2, 2]] and nf.tolist() == [3]


def test_extract_candidates_world_rows_and_geometry_object():
    p = np.zeros((5, 6, 7), np.float32)
    p[4, 5, 6] = 0.8
    p[1, 1, 1] = 0.95
    rows = extract_candidates(p, spacing=SP, origin=ORIGIN, direction=ROT, seriesuid="c1", method="components")
    assert [r["probability"] for r in rows] == pytest.approx([0.95, 0.8])
    assert set(rows[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    np.testing.assert_allclose([rows[1]["coordX"], rows[1]["coordY"], rows[1]["coordZ"]],
                               voxel_to_world([[4, 5, 6]], SP, ORIGIN, ROT)[0])

    class Geo:                                  # a Volume-like object with its own converter wins
        spacing, origin, direction = SP, ORIGIN, ROT

        def voxel_to_world(self, zyx):
            return voxel_to_world(zyx, SP, ORIGIN, ROT) + 1000.0
    r2 = extract_candidates(p, Geo(), max_candidates=1, method="components")
    assert len(r2) == 1 and r2[0]["coordX"] == pytest.approx(rows[0]["coordX"] + 1000)
    assert extract_candidates(np.zeros((3, 3, 3)), spacing=SP) == []


def test_bad_inputs():
    with pytest.raises(CandidateInputError, match="method"):
        find_peaks(np.zeros((2, 2, 2)), method="blobs")
    with pytest.raises(CandidateInputError, match="expected \\(z, y, x\\)"):
        find_peaks(np.zeros((2, 2)))
    with pytest.raises(CandidateInputError, match="spacing"):
        extract_candidates(np.zeros((2, 2, 2)))
    with pytest.raises(CandidateInputError, match="NaN"):
        find_peaks(np.full((2, 2, 2), np.nan))
    with pytest.raises(CandidateInputError, match="threshold 1.5"):
        find_peaks(np.zeros((2, 2, 2)), threshold=1.5)
    with pytest.raises(CandidateInputError, match="min_distance_mm 0"):
        find_peaks(np.zeros((2, 2, 2)), method="nms", min_distance_mm=0)
    with pytest.raises(CandidateInputError, match="max_candidates 0"):
        extract_candidates(np.zeros((2, 2, 2)), spacing=SP, max_candidates=0)
    with pytest.raises(CandidateInputError, match="refine_fraction"):
        CandidateRule(refine_fraction=0.0).check()
    with pytest.raises(CandidateInputError, match="unknown candidate option 'radius'"):
        extract_candidates(np.zeros((2, 2, 2)), spacing=SP, radius=3)


# ------------------------------------------------------------------------------------ NMS in world millimetres
def _blob(shape, centre, sigma_mm, sp=SP, peak=0.9):
    z, y, x = np.indices(shape).astype(float)
    d2 = ((z - centre[0]) * sp[0]) ** 2 + ((y - centre[1]) * sp[1]) ** 2 + ((x - centre[2]) * sp[2]) ** 2
    return peak * np.exp(-d2 / (2 * sigma_mm ** 2))


def _direct_nms(p, sp, threshold, dist_mm):  # plain NMS: merge_fraction=None below
    """Local maxima by explicit comparison with the 26 neighbours, then greedy suppression by a plain loop."""
    peaks = []
    for z, y, x in itertools.product(*map(range, p.shape)):
        v = p[z, y, x]
        nb = p[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
        if v >= threshold and v >= nb.max():
            peaks.append((float(v), (z, y, x)))
    peaks.sort(key=lambda t: (-t[0], t[1]))
    kept = []
    for v, c in peaks:
        if all(sum(((a - b) * s) ** 2 for a, b, s in zip(c, k, sp)) ** 0.5 > dist_mm for _, k in kept):
            kept.append((v, c))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_equals_a_direct_greedy_suppression_on_random_maps(seed):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter(rng.random((8, 14, 14)), 1.0).astype(np.float32)   # distinct values, many peaks
    p = (p - p.min()) / (p.max() - p.min())
    sp = (2.5, 0.7, 0.9)
    want = _direct_nms(p, sp, 0.2, 2.6)
    # refine_fraction 1: the support region is the peak voxel alone, so the centre is the peak voxel itself
    zyx, s, n = find_peaks(p, sp, 0.2, "nms", 2.6, refine_fraction=1.0, max_candidates=None, merge_fraction=None)
    assert len(want) > 3
    assert s.tolist() == pytest.approx([v for v, _ in want])
    np.testing.assert_array_equal(zyx, [c for _, c in want])
    assert (n == 1).all()
    zc, sc, _ = find_peaks(p, sp, 0.2, "nms", 2.6, refine_fraction=1.0, max_candidates=2, merge_fraction=None)
    np.testing.assert_array_equal(zc, zyx[:2])                 # the cap keeps the highest scores


def test_nms_distance_is_euclidean_world_mm_with_anisotropic_spacing():
    shape = (12, 40, 40)
    # two peaks 2 slices apart (5.0 mm at 2.5 mm slices) and two peaks 6 rows apart (4.2 mm at 0.7 mm):
    # in voxels the in-plane pair is 3x farther apart, in mm it is the closer one
    pz = np.maximum(_blob(shape, (4, 20, 20), 1.0), _blob(shape, (6, 20, 20), 1.0, peak=0.8)).astype(np.float32)
    py = np.maximum(_blob(shape, (5, 14, 20), 1.0), _blob(shape, (5, 20, 20), 1.0, peak=0.8)).astype(np.float32)
    for d, nz, ny in [(4.0, 2, 2), (4.5, 2, 1), (5.0, 1, 1), (6.0, 1, 1)]:
        assert len(find_peaks(pz, SP, 0.05, "nms", d, merge_fraction=None)[1]) == nz, d   # within d: one
        assert len(find_peaks(py, SP, 0.05, "nms", d, merge_fraction=None)[1]) == ny, d
    zyx, s, _ = find_peaks(pz, SP, 0.05, "nms", 6.0, merge_fraction=None)
    assert s[0] == pytest.approx(0.9) and zyx[0][0] == pytest.approx(4, abs=0.3)   # the stronger peak survives
    # the same voxels at isotropic 1 mm spacing: 2 slices = 2 mm, so d = 4 mm now merges the slice pair
    assert len(find_peaks(pz, (1, 1, 1), 0.05, "nms", 4.0, merge_fraction=None)[1]) == 1


@pytest.mark.parametrize("centre", [(4.5, 20.0, 17.0), (4.5, 20.5, 17.5), (5.0, 19.5, 17.0)])
def test_subvoxel_centre_of_a_symmetric_blob_is_exact(centre):
    p = _blob((10, 40, 36), centre, 2.0).astype(np.float32)   # 4 mm sigma: a 3-6 mm nodule, 1-2 slices thick
    zyx, s, n = find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=None)
    assert len(s) == 1 and n[0] > 2
    np.testing.assert_allclose(zyx[0], centre, atol=1e-9)
    # components give the same centre; the unrefined peak would be a whole voxel (2.5 mm in z) off
    zc = find_peaks(p, SP, 0.05, "components")[0]
    np.testing.assert_allclose(zc[0], centre, atol=1e-9)
    zr = find_peaks(p, SP, 0.05, "nms", 5.0, refine_fraction=1.0, merge_fraction=None)[0]
    assert np.abs(zr[0] - centre).max() < 0.5 + 1e-9


def test_refined_centres_of_touching_blobs_stay_on_their_own_blob():
    shape = (10, 40, 50)
    a, b = (4.0, 20.0, 18.0), (4.0, 20.0, 30.0)                     # 8.4 mm apart, touching above 0.5 x peak
    p = np.maximum(_blob(shape, a, 3.0), _blob(shape, b, 3.0, peak=0.85)).astype(np.float32)
    zyx, s, _ = find_peaks(p, SP, 0.05, "nms", 5.0, refine_fraction=0.3, merge_fraction=None)
    assert len(s) == 2
    # each centre from its own side of the mid-plane: pulled at most a little, never to the middle
    assert abs(zyx[0][2] - a[2]) < 0.5 and abs(zyx[1][2] - b[2]) < 0.5


def test_size_aware_merging_joins_peaks_of_one_region_above_the_merging_level():
    shape = (10, 30, 70)
    # a vessel-like ridge with two maxima 14 columns (9.8 mm) apart: NMS at 5 mm keeps both, merging keeps one
    p = np.maximum(_blob(shape, (4, 15, 25), 2.5), _blob(shape, (4, 15, 39), 2.5, peak=0.85))
    z, y, x = np.indices(shape)
    ridge = (z == 4) & (y == 15) & (x >= 25) & (x <= 39)           # a line dipping to 0.6 between the maxima
    p = np.maximum(p, np.where(ridge, 0.6 + 0.02 * np.abs(x - 32), 0)).astype(np.float32)
    assert len(find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=None)[1]) == 2
    zyx, s, n = find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=0.5)
    assert len(s) == 1 and s[0] == pytest.approx(0.9)
    # joined only below the merging level (0.7 x 0.9 = 0.63 > the ridge's 0.6): two again
    assert len(find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=0.7)[1]) == 2
    # a separate blob (its support region apart) is not merged
    q = np.maximum(p, _blob(shape, (4, 15, 60), 2.0, peak=0.7).astype(np.float32))
    assert len(find_peaks(q, SP, 0.05, "nms", 5.0, merge_fraction=0.5)[1]) == 2


def test_a_merged_object_is_centred_on_all_its_lobes_not_on_the_first_one():
    # one irregular nodule whose map splits into two equal lobes at half maximum, joined by a ridge at 0.3: the
    # merged candidate's centre is the weighted centroid of both lobes (their midpoint), not the first lobe's
    shape = (14, 30, 60)
    a, b = (5.0, 15.0, 22.0), (7.0, 15.0, 36.0)
    p = np.maximum(_blob(shape, a, 2.5), _blob(shape, b, 2.5))
    z, y, x = np.indices(shape)
    ridge = (z == 6) & (y == 15) & (x > 22) & (x < 36)
    p = np.maximum(p, np.where(ridge, 0.3, 0)).astype(np.float32)
    zyx, s, _ = find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=0.0)
    assert len(s) == 1
    np.testing.assert_allclose(zyx[0], (np.array(a) + b) / 2, atol=0.05)
    # a weaker merged peak below the support level (0.5 x the kept score) pulls nothing
    q = np.maximum(_blob(shape, a, 2.5), _blob(shape, b, 2.5, peak=0.4))
    q = np.maximum(q, np.where(ridge, 0.3, 0)).astype(np.float32)
    zq, sq, _ = find_peaks(q, SP, 0.05, "nms", 5.0, merge_fraction=0.0)
    assert len(sq) == 1 and np.abs(zq[0] - a).max() < 0.05
    # without merging the lobes stay apart, the two strongest candidates each on its own lobe
    zs, ss, _ = find_peaks(p, SP, 0.05, "nms", 5.0, merge_fraction=None)
    assert sorted(round(c[2]) for c in zs[:2]) == [22, 36]


def test_default_rule_is_nms_at_a_low_threshold_with_a_cap():
    assert DEFAULT_RULE.method == "nms" and DEFAULT_RULE.threshold <= 0.1 and DEFAULT_RULE.max_candidates
    assert DEFAULT_RULE.merge_fraction == 0.0                 # merging at the threshold
    p = np.zeros((6, 50, 30), np.float32)
    for i in range(5):
        p[3, 3 + 10 * i, 3] = 0.1 + 0.1 * i                 # five single-voxel peaks 7 mm apart
    rows = extract_candidates(p, spacing=SP, max_candidates=3)
    assert [r["probability"] for r in rows] == pytest.approx([0.5, 0.4, 0.3])
    assert "NMS 5 mm" in DEFAULT_RULE.describe()


@pytest.mark.parametrize("seed, levels, threshold, dense", [(0, 0, 0.02, 1.0), (1, 6, 0.02, 1.0), (2, 3, 0.3, 1.0),
                                                            (3, 2, 0.0, 0.01)])
def test_slab_wise_peaks_are_the_full_size_labelling(seed, levels, threshold, dense, monkeypatch):
    """The "nms" rule's local maxima found slab by slab (3-slice slabs here, so most voxels lie near a slab edge)
    and grouped from the points alone give what the full-size maximum filter and labelling give: the same groups
    (plateaus of tied maxima included: ``levels`` quantises the map so ties are many), centroids, scores and
    sizes; each group's peak voxel is one of its voxels, the one nearest its centroid (where the full-size
    ``maximum_position`` picks a tied voxel by sort order). A flat map (threshold 0 on a two-level map) takes
    the full-size path."""
    from scipy import ndimage

    from ahnet.infer import candidates
    from ahnet.infer.candidates import _groups, _local_maxima, _peak_groups

    monkeypatch.setattr(candidates, "DENSE_PEAKS", dense)       # 1.0: the point grouping for every map here
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random((11, 23, 19)), 1.5).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    if levels:
        prob = (np.round(prob * levels) / levels).astype(np.float32)
    mx = ndimage.maximum_filter(prob, size=3, mode="nearest")
    want = _groups(prob, ((prob >= mx) & (prob >= threshold)).astype(np.float64))
    got = _peak_groups(prob, _local_maxima(prob, threshold, slab=3))
    assert want is not None and got is not None and len(got[1]) == len(want[1]) > 1
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-9)
    for a, b in zip(got[1:3], want[1:3]):
        np.testing.assert_array_equal(a, b)
    if dense < 1.0:                                             # the full-size path: ndimage's own choice
        np.testing.assert_array_equal(got[3], want[3])
        return
    lab, _ = ndimage.label((prob >= mx) & (prob >= threshold), structure=np.ones((3, 3, 3)))
    for centre, seed, score in zip(got[0], got[3], got[1]):
        group = np.argwhere(lab == lab[tuple(seed)])
        assert prob[tuple(seed)] == score and lab[tuple(seed)] > 0
        assert ((seed - centre) ** 2).sum() == ((group - centre) ** 2).sum(1).min()
