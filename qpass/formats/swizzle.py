"""The block-scale layout of sm100's block-scaled GEMMs (cuBLASLt's, and torch's ``scaled_mm`` with
``SwizzleType.SWIZZLE_32_4_4``; torchao calls it ``to_blocked``), in plain torch.

A scale matrix ``[R, C]`` (one row per GEMM row, one column per scaling block along K) is cut into
tiles of 128 rows x 4 columns, zero padded to whole tiles. Tiles are stored one after another, row
of tiles by row of tiles (``tile = (r // 128) * ceil(C / 4) + c // 4``), 512 bytes each. Inside a
tile, rows ``r``, ``r + 32``, ``r + 64`` and ``r + 96`` sit next to each other: element ``(r, c)``
of the tile is byte ``(r % 32) * 16 + (r // 32) * 4 + c``. So one 16-byte line holds the 4 blocks of
4 rows 32 apart, which is how the tensor cores' 32-lane warps read them.
"""

from __future__ import annotations

import torch

TILE_ROWS, TILE_COLS = 128, 4
LANES = 32  # rows of a tile that one 16-byte line interleaves: r, r + 32, r + 64, r + 96


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swizzled_numel(rows: int, cols: int) -> int:
    """Elements of the swizzled layout of ``[rows, cols]`` scales: whole 128 x 4 tiles."""
    return _round_up(rows, TILE_ROWS) * _round_up(cols, TILE_COLS)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """``scales [..., R, C]`` (one-byte codes: E8M0 or E4M3) in the 32_4_4 layout, each matrix of
    the leading dims on its own: ``[..., round_up(R, 128) * round_up(C, 4)]``, zero padded."""
    *lead, rows, cols = scales.shape
    padded = scales.new_zeros(*lead, _round_up(rows, TILE_ROWS), _round_up(cols, TILE_COLS))
    padded[..., :rows, :cols] = scales
    row_tiles, col_tiles = padded.shape[-2] // TILE_ROWS, padded.shape[-1] // TILE_COLS
    # Row r = tile_row * 128 + group * 32 + lane, column c = tile_col * 4 + j.
    tiles = padded.reshape(*lead, row_tiles, TILE_ROWS // LANES, LANES, col_tiles, TILE_COLS)
    n = len(lead)
    tile_row, group, lane, tile_col, j = range(n, n + 5)
    order = (*range(n), tile_row, tile_col, lane, group, j)  # byte: (tile * 32 + lane) * 16 + group * 4 + j
    return tiles.permute(order).reshape(*lead, -1)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`swizzle_scales`: ``[..., N]`` swizzled back to ``[..., rows, cols]``."""
    *lead, numel = swizzled.shape
    if numel != swizzled_numel(rows, cols):
        raise ValueError(
            f"{numel} swizzled scales cannot hold [{rows}, {cols}]: expected {swizzled_numel(rows, cols)}"
        )
    row_tiles, col_tiles = _round_up(rows, TILE_ROWS) // TILE_ROWS, _round_up(cols, TILE_COLS) // TILE_COLS
    tiles = swizzled.reshape(*lead, row_tiles, col_tiles, LANES, TILE_ROWS // LANES, TILE_COLS)
    n = len(lead)
    tile_row, tile_col, lane, group, j = range(n, n + 5)
    order = (*range(n), tile_row, group, lane, tile_col, j)
    padded = tiles.permute(order).reshape(*lead, row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    return padded[..., :rows, :cols].contiguous()
