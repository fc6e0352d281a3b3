"""The 32_4_4 block-scale layout (:mod:`qpass.formats.swizzle`): where each scale lands, padding, and
the round trip."""

from __future__ import annotations

import pytest
import torch

from qpass.formats.swizzle import swizzle_scales, swizzled_numel, unswizzle_scales


def by_formula(scales: torch.Tensor) -> torch.Tensor:
    """The layout element by element, from cuBLAS's description of it: an independent check."""
    rows, cols = scales.shape
    col_tiles = -(-cols // 4)
    out = torch.zeros(swizzled_numel(rows, cols), dtype=scales.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * col_tiles + c // 4
            out[tile * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4] = scales[r, c]
    return out


def test_hand_checked_positions():
    """A 130 x 5 matrix: 2 x 2 tiles of 128 x 4, 2048 bytes."""
    scales = torch.zeros(130, 5, dtype=torch.uint8)
    scales[0, 0], scales[1, 0], scales[32, 0], scales[0, 1] = 1, 2, 3, 4
    scales[33, 3], scales[127, 2], scales[0, 4], scales[129, 4] = 5, 6, 7, 8
    flat = swizzle_scales(scales)
    assert flat.shape == (2048,) and flat.dtype == torch.uint8
    expected = {
        0: 1,  # (0, 0): first byte of the first tile
        16: 2,  # (1, 0): the next 16-byte line
        4: 3,  # (32, 0): same line as row 0, second group of 4
        1: 4,  # (0, 1)
        16 + 4 + 3: 5,  # (33, 3): line 1, group 1, column 3
        31 * 16 + 3 * 4 + 2: 6,  # (127, 2): the tile's last line, group 3
        512: 7,  # (0, 4): the second tile of the first row of tiles
        3 * 512 + 16: 8,  # (129, 4): tile (1, 1), row 1 of it
    }
    nonzero = {i: int(flat[i]) for i in flat.nonzero().flatten().tolist()}
    assert nonzero == expected


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (128, 4), (130, 9), (300, 2), (256, 12)])
def test_matches_formula_and_round_trips(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    scales = torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8)
    flat = swizzle_scales(scales)
    assert torch.equal(flat, by_formula(scales))
    assert torch.equal(unswizzle_scales(flat, *shape), scales)


def test_padding_is_zero():
    scales = torch.full((130, 5), 0xFF, dtype=torch.uint8)
    flat = swizzle_scales(scales)
    assert int((flat == 0xFF).sum()) == 130 * 5
    assert int((flat == 0).sum()) == flat.numel() - 130 * 5
    assert torch.equal(flat, by_formula(scales))


def test_leading_dims_swizzle_each_matrix():
    gen = torch.Generator().manual_seed(1)
    scales = torch.randint(0, 256, (2, 3, 70, 6), generator=gen, dtype=torch.uint8)
    flat = swizzle_scales(scales)
    assert flat.shape == (2, 3, 128 * 8)
    for i in range(2):
        for j in range(3):
            assert torch.equal(flat[i, j], swizzle_scales(scales[i, j]))
    assert torch.equal(unswizzle_scales(flat, 70, 6), scales)


def test_float8_codes_keep_their_dtype():
    scales = torch.rand(40, 3).to(torch.float8_e4m3fn)
    flat = swizzle_scales(scales)
    assert flat.dtype == torch.float8_e4m3fn
    assert torch.equal(unswizzle_scales(flat, 40, 3).view(torch.uint8), scales.view(torch.uint8))


def test_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="cannot hold"):
        unswizzle_scales(torch.zeros(512, dtype=torch.uint8), 129, 4)
