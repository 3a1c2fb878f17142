"""Augmentation: exact flips/rot90, label follows image, z never touched, shapes kept, deterministic."""
import numpy as np
import pytest

from ahnet.data.augment import RANDAUG_OPS, Augment, affine_inplane, flip, rand_augment, rot90


def marker(shape=(5, 24, 24), at=(2, 5, 17), r=2):
    """Image: slice k has a base value 0.1 * k, plus a bright square (value 1) at `at`; label 3 on the square."""
    img = np.zeros(shape, np.float32) + 0.1 * np.arange(shape[0], dtype=np.float32)[:, None, None]
    lab = np.zeros(shape, np.int16)
    z, y, x = at
    img[z, y - r:y + r + 1, x - r:x + r + 1] = 1.0
    lab[z, y - r:y + r + 1, x - r:x + r + 1] = 3
    return img, lab


def test_flips_and_rot90_are_exact():
    img, lab = marker()
    fi, fl = flip(img, lab, 2)
    np.testing.assert_array_equal(fi, img[:, :, ::-1])
    np.testing.assert_array_equal(fl, lab[:, :, ::-1])
    fi, fl = flip(img, lab, 1)
    np.testing.assert_array_equal(fi, img[:, ::-1, :])
    ri, rl = rot90(img, lab, 1)
    # one quarter turn in (y, x): new[z, y, x] = old[z, x, W-1-y]
    np.testing.assert_array_equal(ri, np.stack([s.T[::-1] for s in img]))
    np.testing.assert_array_equal(rl, np.stack([s.T[::-1] for s in lab]))
    ri4, _ = rot90(*rot90(*rot90(ri, rl, 1), 1), 1)
    np.testing.assert_array_equal(ri4, img)
    with pytest.raises(ValueError, match="slice axis 0 is never flipped"):
        flip(img, lab, 0)
    with pytest.raises(ValueError, match="expected H == W"):
        rot90(img[:, :20], lab[:, :20], 1)


def test_affine_keeps_label_on_image_and_z():
    img, lab = marker(shape=(5, 32, 32), at=(3, 9, 20), r=3)
    for ang, sc in [(15, 1.0), (-12, 1.1), (0, 0.85), (30, 1.2)]:
        ai, al = affine_inplane(img, lab, ang, sc)
        assert ai.shape == img.shape and al.dtype == lab.dtype
        assert set(np.unique(al)) <= {0, 3}
        assert np.all(al[[0, 1, 2, 4]] == 0)  # the label stays in its slice
        bright = ai[3] > 0.65
        # the bright square of the image and the label overlap almost exactly
        dice = 2 * (bright & (al[3] == 3)).sum() / (bright.sum() + (al[3] == 3).sum())
        assert dice > 0.8, (ang, sc, dice)
        # slices keep their own base value (no mixing along z): centre pixel of each slice
        np.testing.assert_allclose(ai[[0, 1, 2, 4], 16, 16], [0.0, 0.1, 0.2, 0.4], atol=1e-6)
    # the rotation moves the marker where the rotation matrix says (about the centre (15.5, 15.5))
    ai, al = affine_inplane(img, lab, 90, 1.0)
    cy, cx = np.argwhere(al[3] == 3).mean(0)
    v = np.array([9 - 15.5, 20 - 15.5])
    np.testing.assert_allclose([cy - 15.5, cx - 15.5], [-v[1], v[0]], atol=0.6)


@pytest.mark.parametrize("policy", [Augment(p_flip=0.5, p_rot90=1.0, p_affine=1.0, p_intensity=1.0, p_noise=1.0),
                                    Augment(randaugment=(3, 9))])
def test_policy_shapes_alignment_determinism(policy):
    img, lab = marker(shape=(3, 24, 24), at=(1, 6, 15), r=3)
    outs = []
    for seed in range(20):
        ai, al = policy(img, lab, np.random.default_rng(seed))
        assert ai.shape == img.shape and al.shape == lab.shape and ai.dtype == np.float32
        assert np.all(al[[0, 2]] == 0) and (al[1] == 3).sum() > 15
        ai2, al2 = policy(img, lab, np.random.default_rng(seed))
        np.testing.assert_array_equal(ai, ai2)
        np.testing.assert_array_equal(al, al2)
        outs.append(ai)
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])


def test_geometric_only_policy_label_under_bright_marker():
    # no intensity change: the label's voxels are where the image is bright, through every composition
    pol = Augment(p_flip=0.5, p_rot90=0.7, p_affine=0.7, p_intensity=0.0, p_noise=0.0)
    img, lab = marker(shape=(4, 28, 28), at=(2, 8, 19), r=3)
    for seed in range(15):
        ai, al = pol(img, lab, np.random.default_rng(seed))
        m = al[2] == 3
        bright = ai[2] > 0.65
        assert ai[2][m].mean() > 0.8
        assert 2 * (bright & m).sum() / (bright.sum() + m.sum()) > 0.8
        assert not np.any(al[[0, 1, 3]])


def test_randaugment_every_op_runs_and_magnitude_checked():
    img, lab = marker(shape=(3, 16, 16), at=(1, 8, 8), r=2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ai, al = rand_augment(img, lab, rng, n=2, m=10)
        assert ai.shape == img.shape and set(np.unique(al)) <= {0, 3}
    assert len(RANDAUG_OPS) >= 10
    with pytest.raises(ValueError, match="magnitude 11"):
        rand_augment(img, lab, rng, 1, 11)
    # m = 0: geometric ops are flips/rot90 (exact) or identities; intensity ops are identities except noise sd 0
    ai, al = rand_augment(img, lab, np.random.default_rng(1), n=4, m=0)
    assert sorted(ai.ravel().round(6)) == sorted(img.ravel().round(6))


def test_blur_is_off_by_default_without_a_draw_and_blurs_in_plane_when_on():
    """p_blur = 0 (the standard policy) draws no random number for it, so every patch of an existing recipe is
    unchanged; with p_blur = 1 the image is the standard policy's with its noise step after a Gaussian blur of
    the drawn sigma, in-plane only (the slice axis never mixes), and the label untouched."""
    from scipy import ndimage

    from ahnet.train.batches import make_augment
    from ahnet.train.config import TrainConfig

    img, lab = marker(shape=(3, 24, 24), at=(1, 8, 12), r=3)
    base, off = Augment(), Augment(p_blur=0.0, blur_max=1.0)
    for seed in range(10):
        a, b = base(img, lab, np.random.default_rng(seed)), off(img, lab, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])
    geo = dict(p_flip=0.0, p_rot90=0.0, p_affine=0.0, p_intensity=0.0, p_noise=0.0)
    rng = np.random.default_rng(3)
    on, al = Augment(p_blur=1.0, blur_max=1.0, **geo)(img, lab, rng)
    rng = np.random.default_rng(3)
    rng.random(), rng.random(), rng.random(), rng.random(), rng.random()   # flip y, flip x, rot90, affine, intensity
    assert rng.random() < 1.0
    sigma = rng.uniform(0, 1.0)
    want = ndimage.gaussian_filter(img, (0.0, sigma, sigma), mode="nearest")
    np.testing.assert_allclose(on, want, atol=1e-6)
    np.testing.assert_array_equal(al, lab)
    assert sigma > 0.05 and np.all(on[0] == img[0]) and not np.array_equal(on[1], img[1])   # z not mixed
    assert make_augment(TrainConfig(augment="standard-blur")).p_blur == 0.3
    assert make_augment(TrainConfig()).p_blur == 0.0


def test_coarsen_is_off_by_default_and_resamples_in_plane_when_on():
    """p_coarsen = 0 draws nothing (existing recipes unchanged); coarsen keeps the shape, keeps a linear ramp
    exactly away from the border, damps pixel-scale detail more the coarser it goes, never mixes slices; with
    p_coarsen = 1 the policy applies coarsen at the drawn factor; a factor below 1 is refused."""
    from ahnet.data.augment import coarsen
    from ahnet.train.batches import make_augment
    from ahnet.train.config import TrainConfig

    img, lab = marker(shape=(3, 24, 24), at=(1, 8, 12), r=3)
    base, off = Augment(), Augment(p_coarsen=0.0)
    for seed in range(10):
        np.testing.assert_array_equal(base(img, lab, np.random.default_rng(seed))[0],
                                      off(img, lab, np.random.default_rng(seed))[0])
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (2, 64, 1))
    assert coarsen(ramp, 1.3).shape == ramp.shape
    np.testing.assert_allclose(coarsen(ramp, 1.3)[:, 8:-8, 8:-8], ramp[:, 8:-8, 8:-8], atol=1e-5)
    stripes = np.tile((0.5 + 0.5 * np.sin(2 * np.pi * np.arange(64) / 5)).astype(np.float32), (2, 64, 1))
    amp = [float(np.abs(coarsen(stripes, f) - 0.5)[:, 8:-8, 8:-8].mean()) for f in (1.0, 1.2, 1.4)]
    assert amp[0] > amp[1] > amp[2] and amp[0] == pytest.approx(0.3046, abs=1e-3)   # 5-px stripes fade
    one = coarsen(img, 1.4)
    assert np.all(one[0] == img[0]) and not np.array_equal(one[1], img[1])     # the marker's slice alone moves
    geo = dict(p_flip=0.0, p_rot90=0.0, p_affine=0.0, p_intensity=0.0, p_noise=0.0)
    on, al = Augment(p_coarsen=1.0, coarsen_max=1.4, **geo)(img, lab, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    for _ in range(6):                                   # flip y, flip x, rot90, affine, intensity, coarsen?
        rng.random()
    np.testing.assert_allclose(on, coarsen(img, rng.uniform(1.0, 1.4)), atol=1e-6)
    np.testing.assert_array_equal(al, lab)
    with pytest.raises(ValueError, match="expected >= 1"):
        coarsen(img, 0.8)
    assert make_augment(TrainConfig(augment="standard-coarsen")).p_coarsen == 0.3
    assert make_augment(TrainConfig()).p_coarsen == 0.0


def test_zoom_lever_widens_the_zoom_and_shrinks_a_nodule_as_coarser_pixels_would():
    """--augment standard-zoom: the standard policy with the rotate/zoom more often and zooms down to 0.7, so a
    nodule is drawn as small in voxels as 0.9 mm pixels make it (0.7 / 0.9 = 0.78 of its 0.7 mm size)."""
    from ahnet.train.batches import ZOOM_MAX, ZOOM_MIN, ZOOM_P, make_augment
    from ahnet.train.config import TrainConfig

    zoom, std = make_augment(TrainConfig(augment="standard-zoom")), make_augment(TrainConfig())
    assert (zoom.p_affine, zoom.scale_min, zoom.scale_max) == (ZOOM_P, ZOOM_MIN, ZOOM_MAX) == (0.5, 0.7, 1.3)
    assert (std.p_affine, std.scale_min, std.scale_max) == (0.3, 0.85, 1.15)
    assert ZOOM_MIN < 0.7 / 0.9 < std.scale_min                       # the shift lies inside the lever only
    yy, xx = np.mgrid[:64, :64] - 31.5
    disc = (yy ** 2 + xx ** 2 <= 10.0 ** 2)
    lab = np.zeros((3, 64, 64), np.int16)
    lab[1][disc] = 2
    img = lab.astype(np.float32) / 2
    _, small = affine_inplane(img, lab, 0.0, 0.7 / 0.9)
    area = (small[1] == 2).sum() / disc.sum()                          # areas scale with the zoom squared
    assert area == pytest.approx((0.7 / 0.9) ** 2, rel=0.05)
    assert np.all(small[[0, 2]] == 0)
