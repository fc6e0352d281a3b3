"""Autotuning search spaces: a few tile shapes and warp counts per kernel, pruned to the shapes a
spec allows (a tile spans whole scaling blocks and whole Hadamard blocks). Under
``TRITON_INTERPRET=1`` one small config is used: the interpreter gains nothing from tuning and
would run every config."""

from __future__ import annotations

import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BUCKET_CAP = 1 << 14


def size_bucket(n: int) -> int:
    """What an autotuning key holds for a size ``n``: its next power of two, at most 2^14. Keyed on
    exact sizes, every new token count (each decode step, each prompt length) would tune again; the
    best tile changes with the order of magnitude, and past 2^14 rows or columns not at all."""
    return min(triton.next_power_of_2(n), BUCKET_CAP)


def elementwise_configs() -> list[triton.Config]:
    """BLOCK_R x BLOCK_L tiles for the quantize, amax and dequantize kernels."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_L": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_R": rows, "BLOCK_L": cols}, num_warps=warps)
        for rows, cols, warps in (
            (16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8), (128, 128, 8),
        )
    ]


def prune_elementwise(configs, named_args, **kwargs):
    """Keep tiles that hold whole scaling groups and whole Hadamard blocks (and 16-row tiles)."""
    group, hadamard = kwargs.get("GROUP", 0), kwargs.get("HADAMARD", 0)
    tile_rows = 16 if kwargs.get("GRANULARITY") == 3 else 1
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_L"] % max(group, hadamard, 2) == 0
        and c.kwargs["BLOCK_R"] % tile_rows == 0
        and (not hadamard or c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_L"] // hadamard >= 16)
    ]
    if not kept:
        needed = max(group, hadamard, 2)
        kept = [triton.Config({"BLOCK_R": 16, "BLOCK_L": needed}, num_warps=4)]
    return kept


def matmul_configs() -> list[triton.Config]:
    """BLOCK_M x BLOCK_N x BLOCK_K tiles for the quantized matmul (:mod:`qpass.codegen.matmul`)."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in (
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4),
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
        )
    ]


def prune_matmul(configs, named_args, **kwargs):
    """Keep the matmul tiles whose BLOCK_K holds whole activation scaling blocks (the activations are
    quantized per tile, each block's amax taken in registers), and at least one MX block of 32 for
    ``tl.dot_scaled``. Weight blocks need nothing: a K tile smaller than a weight block lies inside
    it. (The kernel also widens BLOCK_K to the block itself, since Triton's autotuner skips pruning
    when there is a single config, as under the interpreter.)"""
    needed = 16  # tl.dot's smallest K
    if kwargs.get("QUANTIZE_X") and kwargs.get("X_GRANULARITY", 0) >= 2:  # activation blocks or tiles
        needed = max(needed, kwargs.get("X_GROUP", 0))
    if kwargs.get("DOT_SCALED"):
        needed = max(needed, 32)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] % needed == 0]
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": needed}, num_warps=4)]
