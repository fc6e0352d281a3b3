"""The differentiable gradient estimator (DGE) of FP4 training (arXiv 2501.17116, section 3.1).

The straight-through estimator treats quantization as the identity in backward. The DGE instead
differentiates a smooth stand-in for the staircase: on each grid interval of width ``δ`` (in element
units, after scaling), with ``u`` the offset from the interval's lower grid point,

    f(u)  = δ/2 · (1 + sign(2u/δ − 1) · |2u/δ − 1|^(1/k))
    f'(u) = (1/k) · |2u/δ − 1|^(1/k − 1)

which rises from the lower grid point to the upper one as the staircase does, steeply near the
interval's middle (where the staircase jumps). The forward stays hard-quantized; backward multiplies
the incoming gradient by ``f'``, clamped at ``clamp`` because it is infinite at the midpoint. ``k``
controls the sharpness: ``k = 1`` is the straight-through estimator; the paper uses ``k = 5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.formats.api import element_magnitudes, resolve_arguments
from qpass.formats.grouping import from_groups
from qpass.formats.rounding import grid_step
from qpass.formats.spec import FormatSpec


@dataclass(frozen=True)
class DGE:
    k: float = 5.0
    clamp: float = 3.0  # the largest gradient multiplier (f' is unbounded at each interval's middle)

    def __post_init__(self) -> None:
        if not self.k >= 1:
            raise ValueError(f"DGE k must be >= 1 (k = 1 is the straight-through estimator), got {self.k}")
        if not self.clamp > 0:
            raise ValueError(f"DGE clamp must be > 0, got {self.clamp}")


def dge_multiplier(
    x: torch.Tensor, format: str | FormatSpec, axis: int = -1, dge: DGE = DGE(), granularity=None
) -> torch.Tensor:
    """``f'`` at each element of ``x`` quantized as ``format`` along ``axis`` (fp32, ``x``'s shape).

    The scale is the one the forward uses (the group's, from ``x`` itself). A magnitude at or beyond
    max normal sits on the top grid point (``f' = 1/k``); a group holding NaN or Inf gets NaN.
    """
    spec, axis = resolve_arguments(x, format, axis, None, "rne", granularity, None, None)
    magnitude, _, length = element_magnitudes(x, spec, axis)
    magnitude = magnitude.clamp(max=spec.element.max_normal)
    width = grid_step(magnitude, spec.element)  # the interval's: its lower end's binade
    offset = magnitude - (magnitude / width).floor() * width  # exact: the width is a power of two
    multiplier = (1 / dge.k) * (2 * offset / width - 1).abs().pow(1 / dge.k - 1)
    return from_groups(multiplier.clamp(max=dge.clamp), axis, length).reshape(x.shape)
