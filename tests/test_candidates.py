"""Candidates from probability maps: component scores/centroids, local maxima, world coordinates."""
import numpy as np
import pytest
import SimpleITK as sitk

from ahnet.infer.candidates import (CandidateInputError, extract_candidates, find_peaks, voxel_to_world,
                              world_to_voxel)

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
    zyx, s, n = find_peaks(p, SP, threshold=0.5)
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
    rows = extract_candidates(p, spacing=SP, origin=ORIGIN, direction=ROT, seriesuid="c1")
    assert [r["probability"] for r in rows] == pytest.approx([0.95, 0.8])
    assert set(rows[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    np.testing.assert_allclose([rows[1]["coordX"], rows[1]["coordY"], rows[1]["coordZ"]],
                               voxel_to_world([[4, 5, 6]], SP, ORIGIN, ROT)[0])

    class Geo:                                  # a Volume-like object with its own converter wins
        spacing, origin, direction = SP, ORIGIN, ROT

        def voxel_to_world(self, zyx):
            return voxel_to_world(zyx, SP, ORIGIN, ROT) + 1000.0
    r2 = extract_candidates(p, Geo(), max_candidates=1)
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
