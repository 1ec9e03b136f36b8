"""The checkerboard mask: which part of an image is kept and which part is recovered."""

from __future__ import annotations

import torch

from .errors import ConfigError


def checkerboard_mask(latent_shape: tuple[int, int, int], cell: int) -> torch.Tensor:
    """A ``(1, 1, H, W)`` float mask, 1 where the latent is kept, in ``cell``x``cell`` squares.

    The same pattern applies to every channel (a latent cell is either known or not). The grid must
    have an even number of cells along each side so that exactly half of the image is kept: an
    odd grid would keep one more cell than it removes and bias scores by image size.
    """
    _, height, width = latent_shape
    if cell < 1:
        raise ConfigError(f"mask cell must be >= 1 latent pixel, got {cell}")
    if height % cell or width % cell:
        raise ConfigError(
            f"mask cell {cell} does not divide the latent size {height}x{width}; "
            "choose a cell size that divides it"
        )
    rows, cols = height // cell, width // cell
    if (rows * cols) % 2:
        raise ConfigError(
            f"mask cell {cell} gives a {rows}x{cols} grid, which cannot keep exactly 50 %; "
            "choose a cell size giving an even number of cells"
        )
    ys = torch.arange(rows).view(-1, 1)
    xs = torch.arange(cols).view(1, -1)
    grid = ((ys + xs) % 2 == 0).float()
    mask = grid.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return mask.view(1, 1, height, width)


def default_cell(latent_shape: tuple[int, int, int], pixels_per_latent: int) -> int:
    """The cell size that keeps the reference's geometry: a 16x16 grid of cells at any size.

    The reference uses 2x2 latent cells on a 64x64 SD latent (16x16 px cells on 512 px), i.e. a
    32x32 checkerboard. For pixel models the same 32-cells-per-side grid would make one-pixel cells
    at 32 px, which plain interpolation fills in; we keep cells at least 4 px wide there.
    """
    side = latent_shape[1]
    if pixels_per_latent > 1:
        return max(1, side // 32)
    return max(1, side // 8)


def upsample_mask(mask: torch.Tensor, pixels_per_latent: int) -> torch.Tensor:
    """The latent mask in pixel space, so that similarity is measured on the recovered pixels."""
    if pixels_per_latent == 1:
        return mask
    return mask.repeat_interleave(pixels_per_latent, 2).repeat_interleave(pixels_per_latent, 3)
