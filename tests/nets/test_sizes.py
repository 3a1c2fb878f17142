import pytest
import torch

from ahnet.nets.sizes import check_input, input_multiple, pad_to, padded_shape, z_pool_schedule


def test_paper_and_none_schedules():
    assert z_pool_schedule("paper") == (True,) * 5
    assert z_pool_schedule("none") == (False,) * 5
    assert input_multiple(z_pool_schedule("paper")) == (32, 32, 32)
    assert input_multiple(z_pool_schedule("none")) == (1, 32, 32)


@pytest.mark.parametrize("spacing, expected", [
    ((0.7, 0.7, 0.7), (True, True, True, True, True)),      # isotropic: pool z everywhere (as the paper)
    ((2.5, 0.7, 0.7), (False, True, True, True, True)),     # 2.5 mm: first level only in-plane -> 16 slices
    ((5.0, 0.7, 0.7), (False, False, True, True, True)),    # 5 mm: 8 slices
    ((1.25, 0.7, 0.7), (True, True, True, True, True)),     # aspect 1.8 before the first halving
])
def test_spacing_schedule_by_hand(spacing, expected):
    assert z_pool_schedule("spacing", spacing) == expected


@pytest.mark.parametrize("bad", [None, (0, 0.7, 0.7), (2.5, 0.7)])
def test_spacing_schedule_needs_valid_spacing(bad):
    with pytest.raises(ValueError, match="spacing"):
        z_pool_schedule("spacing", bad)


def test_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="z_pool"):
        z_pool_schedule("sometimes")
    with pytest.raises(ValueError, match="5 booleans|booleans"):
        z_pool_schedule([True, False])


def test_padded_shape_and_pad_to():
    assert padded_shape((32, 32, 32), (30, 100, 129)) == (32, 128, 160)
    assert padded_shape((16, 32, 32), (16, 64, 64)) == (16, 64, 64)
    x = torch.ones(1, 1, 3, 5, 7)
    y = pad_to(x, (4, 8, 8))
    assert y.shape == (1, 1, 4, 8, 8) and y.sum() == x.sum() and torch.equal(y[..., :3, :5, :7], x)


def test_check_input_messages():
    with pytest.raises(ValueError, match=r"divisible by \(32, 32, 32\).*\(1, 1, 30, 64, 64\).*\(32, 64, 64\)"):
        check_input(torch.zeros(1, 1, 30, 64, 64), (32, 32, 32), 1, "AHNet3d")
    with pytest.raises(ValueError, match="1 input channel"):
        check_input(torch.zeros(1, 2, 32, 64, 64), (32, 32, 32), 1, "AHNet3d")
    with pytest.raises(ValueError, match="5D tensor"):
        check_input(torch.zeros(1, 32, 64, 64), (32, 32, 32), 1, "AHNet3d")
