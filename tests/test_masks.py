import pytest
import torch

from cgidm_core.errors import ConfigError
from cgidm_core.masks import checkerboard_mask, default_cell, upsample_mask


def test_reference_sd_mask_is_a_32x32_checkerboard_of_2x2_cells():
    mask = checkerboard_mask((4, 64, 64), cell=2)
    assert mask.shape == (1, 1, 64, 64)
    assert mask.mean().item() == 0.5
    # cells of 2x2 are constant, neighbours alternate
    assert torch.equal(mask[0, 0, :2, :2], torch.ones(2, 2))
    assert torch.equal(mask[0, 0, :2, 2:4], torch.zeros(2, 2))
    assert torch.equal(mask[0, 0, 2:4, :2], torch.zeros(2, 2))
    assert torch.equal(mask[0, 0, 2:4, 2:4], torch.ones(2, 2))
    cells = mask[0, 0, ::2, ::2]
    assert torch.equal(cells[1:, :], 1 - cells[:-1, :])
    assert torch.equal(cells[:, 1:], 1 - cells[:, :-1])


def test_mask_is_the_same_on_every_channel_when_broadcast():
    mask = checkerboard_mask((3, 32, 32), cell=4)
    z = torch.randn(2, 3, 32, 32)
    kept = z * mask
    for c in range(3):
        assert torch.equal(kept[:, c] != 0, kept[:, 0] != 0)


@pytest.mark.parametrize("shape,cell", [((4, 64, 64), 2), ((3, 32, 32), 4), ((3, 32, 32), 1)])
def test_exactly_half_is_kept(shape, cell):
    assert checkerboard_mask(shape, cell).sum().item() == shape[1] * shape[2] / 2


@pytest.mark.parametrize("cell", [0, -1, 3, 5])
def test_invalid_cells_are_refused(cell):
    with pytest.raises(ConfigError):
        checkerboard_mask((4, 64, 64), cell)


def test_odd_grid_is_refused_because_it_cannot_keep_exactly_half():
    with pytest.raises(ConfigError, match="50 %"):
        checkerboard_mask((3, 12, 12), cell=4)  # 3x3 cells


def test_default_cells():
    assert default_cell((4, 64, 64), pixels_per_latent=8) == 2
    assert default_cell((3, 32, 32), pixels_per_latent=1) == 4


def test_upsample_mask_to_pixels():
    mask = checkerboard_mask((4, 8, 8), cell=2)
    pixels = upsample_mask(mask, 8)
    assert pixels.shape == (1, 1, 64, 64)
    assert pixels.mean().item() == 0.5
    assert torch.equal(pixels[0, 0, :16, :16], torch.ones(16, 16))
