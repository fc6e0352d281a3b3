"""How one matmul operand is quantized: a format and its options, applied with ``fake_quantize``.

A :class:`Quantizer` is what a recipe assigns to each operand role. It is validated when built
(through :func:`qpass.formats.resolve_format`), so a bad format name fails at ``qpass.compile``
rather than mid-training, and it serializes to a short JSON string: that string is how the custom
ops of :mod:`qpass.ops` carry it, which keeps the ops self-describing in exported graphs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qpass.formats import FormatSpec, fake_quantize, resolve_format
from qpass.formats.delayed import DelayedScaling
from qpass.formats.dge import DGE, dge_multiplier
from qpass.formats.rounding import check_rounding
from qpass.formats.scaling import AmaxReduction
from qpass.jsontuple import JsonTuple


@dataclass(frozen=True)
class Quantizer(JsonTuple):
    format: str
    granularity: str | tuple[str, int] | None = None  # fp8/fp6/fp4 absmax formats only
    scale_mode: str | None = None  # MX formats: the E8M0 rule; nvfp4: None or "4over6"
    rounding: str = "rne"
    pow2: bool | None = None  # absmax formats only
    dge: DGE | None = None  # backward: the differentiable gradient estimator instead of straight-through

    def __post_init__(self) -> None:
        if isinstance(self.granularity, list):  # JSON has no tuples
            object.__setattr__(self, "granularity", tuple(self.granularity))
        if isinstance(self.dge, (list, tuple)):  # JSON holds a dataclass as its fields' values
            object.__setattr__(self, "dge", DGE(*self.dge))
        elif isinstance(self.dge, dict):
            object.__setattr__(self, "dge", DGE(**self.dge))
        spec = self.spec  # validates the options now, with the formats library's messages
        check_rounding(self.rounding)
        # Spell out the defaults, so that equal quantizations compare (and serialize) equal.
        if spec.scaling == "absmax":
            granularity = spec.granularity if spec.block_size is None else ("block", spec.block_size)
            object.__setattr__(self, "granularity", granularity)
            object.__setattr__(self, "pow2", spec.pow2)
        elif spec.scaling == "mx":
            object.__setattr__(self, "scale_mode", spec.scale_mode)
        else:  # nvfp4: 1x16 blocks (the default) or 16x16 tiles
            object.__setattr__(
                self, "granularity", ("tile", spec.block_size) if spec.granularity == "tile" else None
            )

    @functools.cached_property
    def spec(self) -> FormatSpec:
        return resolve_format(self.format, self.granularity, self.scale_mode, self.pow2)

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole tensor: the result does not depend on the quantization axis."""
        return self.spec.scaling == "absmax" and self.spec.granularity == "tensor"

    @property
    def scaled_by_tensor_amax(self) -> bool:
        """A scale depends on the whole tensor's amax (per tensor, or NVFP4's global scale): what
        data-parallel ranks agree on (:mod:`qpass.distributed`)."""
        return self.per_tensor or self.spec.scaling == "nvfp4"

    def __call__(self, x: torch.Tensor, axis: int, delayed: DelayedScaling | None = None,
                 reduce_amax: AmaxReduction | None = None) -> torch.Tensor:
        return fake_quantize(
            x, self.spec, axis, rounding=self.rounding, delayed=delayed, reduce_amax=reduce_amax)

    def gradient(self, grad: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
        """The gradient of ``x`` from that of its quantized value: straight through, or times the DGE."""
        if self.dge is None:
            return grad
        return (grad.float() * dge_multiplier(x, self.spec, axis, self.dge)).to(grad.dtype)

    def __str__(self) -> str:
        spec = self.spec
        options = []
        if spec.scaling == "absmax":
            if spec.granularity != "tensor":
                options.append(spec.granularity if spec.block_size is None else f"block{spec.block_size}")
            options += ["pow2"] if spec.pow2 else []
        if spec.scaling == "mx" and spec.scale_mode != "floor":
            options.append(spec.scale_mode)
        if spec.scaling == "nvfp4" and spec.granularity == "tile":
            options.append(f"{spec.block_size}x{spec.block_size}")
        if spec.scaling == "nvfp4" and spec.scale_mode is not None:
            options.append(spec.scale_mode)
        if self.rounding != "rne":
            options.append(self.rounding)
        if self.dge is not None:
            options.append("dge" if self.dge == DGE() else f"dge(k={self.dge.k:g}, clamp={self.dge.clamp:g})")
        return f"{spec.name}({', '.join(options)})" if options else spec.name


def as_quantizer(value) -> Quantizer | None:
    """A :class:`Quantizer` from a Quantizer, a format name, a dict of its fields, or None."""
    if value is None or isinstance(value, Quantizer):
        return value
    if isinstance(value, str):
        return Quantizer(value)
    if isinstance(value, dict):
        return Quantizer(**value)
    raise TypeError(
        f"expected a qpass.Quantizer, a format name, a dict of Quantizer fields or None, got {value!r}"
    )
