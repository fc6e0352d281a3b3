"""GPTQ (Frantar et al., arXiv 2210.17323) on the grid of a site's own weight quantizer.

Given ``H = XᵀX / n`` of a linear site's inputs (as its GEMM sees them: after its rotation),
:func:`gptq_weight` quantizes the weight's columns one at a time and spreads each column's error
over the columns not yet quantized through the Cholesky factor of ``H⁻¹``, so that the output
``X·Wᵀ`` moves as little as the grid allows. Updates are applied lazily, a block of columns at a time.

The grid is exactly the one the site quantizes with at run time, for every format: each scaling
group (an MX or NVFP4 block, an absmax channel, block or tensor) keeps the scales that the
reference (:func:`qpass.formats.scaling.compute_scales`) gives the unchanged weight ("static
groups", so that ``act_order`` can visit columns in any order). Two constraints make the result a
fixed point of that quantizer, which is what lets it replace the weight in the same graph:

- a group's codes never exceed the code of its own amax (the range round-to-nearest gives it), and
  the element the group's amax comes from keeps that code, so the group's scale is unchanged;
- the elements at that top code are stored as the amax itself (sign kept), so quantizing the new
  weight derives each scale from the same amax, bit for bit, and re-rounds every code to itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from qpass.formats import nvfp4
from qpass.formats.element import ElementFormat
from qpass.formats.grouping import from_groups, to_groups
from qpass.formats.rounding import round_to_element
from qpass.formats.scaling import compute_scales
from qpass.quantizer import Quantizer


@dataclass(frozen=True)
class GPTQ:
    """GPTQ's options: ``damp`` (λ, as a fraction of ``mean(diag H)``, added to ``H``'s diagonal),
    ``block_size`` (columns per lazy update) and ``act_order`` (columns in decreasing ``diag H``).
    On SmolLM2-135M act order helps the 4-bit formats and not the 8-bit ones (bench/ptq_real.py
    measures both): it stays off by default, as in the GPTQ paper."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp= must be > 0 (0.01 is typical), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise ValueError(f"block_size= must be a positive int, got {self.block_size!r}")


@dataclass(frozen=True)
class Grid:
    """Per element of an ``[N, K]`` weight: its group's encode and decode factors, the largest code
    magnitude the group may take (its amax's code), the group's amax, and whether the element is
    one the group's amax comes from; and the element format the codes are on."""

    encode: Tensor
    decode: Tensor
    top: Tensor
    amax: Tensor
    pinned: Tensor
    element: ElementFormat

    @staticmethod
    def of(weight: Tensor, quantizer: Quantizer) -> Grid:
        spec = quantizer.spec
        w = weight.float()
        k = w.shape[-1]
        groups = to_groups(w, 1, spec.padded_length(k), spec.group_size(k))  # [N, G, B]
        scales = compute_scales(groups, spec)
        magnitude = groups.abs()
        if spec.scaling == "absmax" and spec.granularity == "tensor":
            amax = magnitude.amax()
        else:
            amax = magnitude.amax(-1, keepdim=True)
            if spec.granularity == "tile":
                amax = nvfp4.tile_amax(amax, spec.block_size)
        top = round_to_element(amax * scales.encode, spec.element)

        def per_element(t: Tensor) -> Tensor:
            return from_groups(torch.broadcast_to(t, groups.shape), 1, k)

        amax = per_element(amax)
        return Grid(per_element(scales.encode), per_element(scales.decode), per_element(top), amax,
                    (w.abs() == amax) & (amax > 0), spec.element)

    def permuted(self, order: Tensor) -> Grid:
        return Grid(*(t[:, order] for t in (self.encode, self.decode, self.top, self.amax, self.pinned)),
                    self.element)

    def codes(self, column: Tensor, j: int, sign: Tensor) -> Tensor:
        """Column ``j``'s codes (element values, fp32) for its current values ``column``."""
        top = self.top[:, j]
        codes = round_to_element(column.float() * self.encode[:, j], self.element)
        codes = torch.maximum(torch.minimum(codes, top), -top)
        return torch.where(self.pinned[:, j], sign * top, codes)

    def stored(self, codes: Tensor) -> Tensor:
        """The weight to store: each code's value, except that top codes are stored as their amax."""
        at_top = (codes.abs() == self.top) & (self.top > 0)
        return torch.where(at_top, codes.sign() * self.amax, codes * self.decode)


class Solution(NamedTuple):
    weight: Tensor  # what to store: quantizing it gives ``values``
    values: Tensor  # GPTQ's quantized weight (the grid points it chose)


def gptq_weight(weight: Tensor, hessian: Tensor, quantizer: Quantizer, config: GPTQ = GPTQ()) -> Solution:
    """GPTQ of the ``[N, K]`` weight (K the reduction axis) for inputs whose ``XᵀX / n`` is
    ``hessian`` ``[K, K]``, on ``quantizer``'s grid."""
    if quantizer.rounding != "rne":
        raise ValueError(f"GPTQ rounds to the nearest point of the grid; {quantizer} rounds "
                         f"{quantizer.rounding!r}")
    if not weight.isfinite().all():
        raise ValueError("GPTQ needs a finite weight: this one holds NaN or Inf")
    n, k = weight.shape
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: nothing to compensate with them
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if config.act_order else torch.arange(k)
    w = weight.double()[:, order].clone()
    h = h[order][:, order]
    grid = Grid.of(weight, quantizer).permuted(order)
    sign = weight.sign().float()[:, order]
    h.diagonal().add_(config.damp * h.diagonal().mean())
    # The upper Cholesky factor of H⁻¹: row j holds column j's error-feedback weights.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float32)
    for start in range(0, k, config.block_size):
        end = min(start + config.block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            j = start + i
            codes[:, j] = grid.codes(block[:, i], j, sign[:, j])
            quantized = (codes[:, j] * grid.decode[:, j]).double()
            errors[:, i] = (block[:, i] - quantized) / u[j, j]
            block[:, i:] -= errors[:, i, None] * u[j, j:end][None, :]
        w[:, end:] -= errors @ u[start:end, end:]
    inverse = torch.argsort(order)
    return Solution(grid.stored(codes)[:, inverse].contiguous(),
                    (codes * grid.decode)[:, inverse].contiguous())
