"""The public numerics functions of SPEC section 7: quantize, dequantize, fake_quantize, qsnr."""

from __future__ import annotations

import math

import torch

from qpass.formats.bits import FP32_MAX
from qpass.formats.delayed import DelayedScaling
from qpass.formats.element import decode, encode
from qpass.formats.grouping import from_groups, normalize_axis, to_groups
from qpass.formats.packing import pack_codes, unpack_codes
from qpass.formats.qtensor import QTensor
from qpass.formats.rounding import check_rounding, grid_step, make_generator, round_to_element
from qpass.formats.scaling import (
    AmaxReduction,
    GroupScales,
    absmax_group_scales,
    compute_scales,
    stored_decode,
    tensor_amax,
)
from qpass.formats.spec import FormatSpec, resolve_format

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"can only quantize floating-point tensors ({names}), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def resolve_arguments(
    x, format, axis, scale_mode, rounding, granularity, pow2, delayed
) -> tuple[FormatSpec, int]:
    """Check every argument before any work: the spec and the non-negative axis."""
    _check_input(x)
    spec = resolve_format(format, granularity, scale_mode, pow2)
    check_rounding(rounding)
    if delayed is not None and not (spec.scaling == "absmax" and spec.granularity == "tensor"):
        raise ValueError(
            f"delayed scaling needs per-tensor absmax scaling, not {spec.name} ({spec.granularity})"
        )
    if delayed is not None and pow2 is not None:
        raise ValueError("with delayed scaling, set pow2 on the DelayedScaling state, not on the call")
    normalized = normalize_axis(axis, x.ndim)
    # Tiles span the axis and the other of the last two dims, which to_groups leaves at dim -3.
    if spec.granularity == "tile" and not (x.ndim >= 2 and normalized >= x.ndim - 2):
        raise ValueError(
            f"{spec.name} with granularity ('tile', {spec.block_size}) needs a tensor of at least 2 dims "
            f"quantized along one of its last two (axis -1 or -2); got shape {tuple(x.shape)}, axis {axis}"
        )
    return spec, normalized


def _element_values(
    x: torch.Tensor,
    spec: FormatSpec,
    axis: int,
    rounding: str,
    generator: torch.Generator | None = None,
    delayed: DelayedScaling | None = None,
    reduce_amax: AmaxReduction | None = None,
) -> tuple[torch.Tensor, GroupScales]:
    """The element values (fp32 on the element grid, ``[..., G, B]``) and the scales of ``x``."""
    x32 = x.reshape(-1) if x.ndim == 0 else x
    if x32.dtype == torch.float64:
        # Rounded to fp32, where all scale arithmetic happens; finite values beyond fp32's range
        # saturate to its max (as any finite overflow does) rather than turn into Inf.
        x32 = torch.where(x32.isfinite(), x32.clamp(-FP32_MAX, FP32_MAX), x32)
    x32 = x32.to(torch.float32)  # exact for bf16 and fp16
    length = x32.shape[axis]
    groups = to_groups(x32, axis, spec.padded_length(length), spec.group_size(length))
    if delayed is None:
        scales = compute_scales(groups, spec, reduce_amax)
    else:
        current = tensor_amax(groups, reduce_amax)
        scales = absmax_group_scales(delayed.encode_scale(current, spec.element.max_normal), spec)
        delayed.record(current)
    return round_to_element(groups * scales.encode, spec.element, rounding, generator), scales


def _axis_length(shape: torch.Size, axis: int) -> int:
    return shape[axis] if len(shape) else 1  # a 0-dim tensor is quantized as one element


def quantize(
    x: torch.Tensor,
    format: str | FormatSpec,
    axis: int = -1,
    scale_mode: str | None = None,
    rounding: str = "rne",
    generator: torch.Generator | int | None = None,
    granularity=None,
    pow2: bool | None = None,
    delayed: DelayedScaling | None = None,
    reduce_amax: AmaxReduction | None = None,
) -> QTensor:
    """Quantize ``x`` to a named format along ``axis`` (the reduction axis for matmuls).

    ``granularity`` ("tensor", "channel" or ("block", k)) and ``pow2`` apply to the fp8/fp6/fp4
    formats; ``scale_mode`` ("floor", "ceil", "even", "rceil") to the MX formats, and "4over6" to
    nvfp4 (each block's scale maps its amax to 6 or to 4, whichever errs less); ``delayed``, a
    :class:`DelayedScaling`, takes a per-tensor scale from its amax history.
    nvfp4 takes ``granularity=("tile", 16)``: one block scale per 16x16 tile of the last two dims
    (``axis`` must be one of them; leading dims are batch), stored in the 1x16 layout with each
    tile's scale repeated on its 16 rows. ``("block", 16)`` is its default. ``reduce_amax`` maps a
    per-tensor amax (absmax per tensor, delayed scaling's, NVFP4's global one) to the one its scale
    comes from (:mod:`qpass.distributed` passes the MAX across ranks).
    """
    spec, axis = resolve_arguments(x, format, axis, scale_mode, rounding, granularity, pow2, delayed)
    generator = make_generator(generator, x.device)
    values, scales = _element_values(x, spec, axis, rounding, generator, delayed, reduce_amax)
    codes = encode(values, spec.element).reshape(*values.shape[:-2], -1)
    return QTensor(
        codes=pack_codes(codes, spec.element),
        scales=scales.stored,
        format=spec,
        shape=x.shape,
        axis=axis,
        dtype=x.dtype,
        tensor_scale=scales.tensor_scale,
    )


def dequantize(qt: QTensor) -> torch.Tensor:
    """Back to a tensor of the original shape and dtype."""
    spec = qt.format
    codes = unpack_codes(qt.codes, spec.element)
    length = _axis_length(qt.shape, qt.axis)
    values = decode(codes, spec.element).reshape(*codes.shape[:-1], -1, spec.group_size(length))
    x = values * stored_decode(spec, qt.scales, qt.tensor_scale)
    return from_groups(x, qt.axis, length).reshape(qt.shape).to(qt.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(
    x: torch.Tensor,
    format: str | FormatSpec,
    axis: int = -1,
    scale_mode: str | None = None,
    rounding: str = "rne",
    generator: torch.Generator | int | None = None,
    granularity=None,
    pow2: bool | None = None,
    delayed: DelayedScaling | None = None,
    reduce_amax: AmaxReduction | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` without building codes; the gradient passes straight through."""
    spec, axis = resolve_arguments(x, format, axis, scale_mode, rounding, granularity, pow2, delayed)
    with torch.no_grad():
        generator = make_generator(generator, x.device)
        values, scales = _element_values(x, spec, axis, rounding, generator, delayed, reduce_amax)
        out = from_groups(values.mul_(scales.decode), axis, _axis_length(x.shape, axis))
        out = out.reshape(x.shape).to(x.dtype)
    return _StraightThrough.apply(x, out) if x.requires_grad else out


def element_magnitudes(x: torch.Tensor, spec: FormatSpec, axis: int) -> tuple[torch.Tensor, GroupScales, int]:
    """``|x|`` in element units (``[..., G, B]`` groups, scaled as the forward scales them), the
    scales, and the axis' length: what the grid around each element is measured in."""
    length = _axis_length(x.shape, axis)
    groups = to_groups(
        x.detach().reshape(x.shape or (1,)).float(), axis, spec.padded_length(length), spec.group_size(length)
    )
    scales = compute_scales(groups, spec)
    return (groups * scales.encode).abs(), scales, length


def quantization_step(
    x: torch.Tensor,
    format: str | FormatSpec,
    axis: int = -1,
    scale_mode: str | None = None,
    granularity=None,
) -> torch.Tensor:
    """The grid step at each element of ``x`` in ``x``'s units: the gap between the representable
    values around it, at the scale its group gets (outlier channel splitting needs it)."""
    spec, axis = resolve_arguments(x, format, axis, scale_mode, "rne", granularity, None, None)
    magnitude, scales, length = element_magnitudes(x, spec, axis)
    step = grid_step(magnitude, spec.element) * scales.decode
    return from_groups(step, axis, length).reshape(x.shape).to(x.dtype)


def qsnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Quantization signal-to-noise ratio ``20 log10(||x|| / ||x - y||)`` in dB (+inf if equal)."""
    x64, y64 = x.detach().double(), y.detach().double()
    noise = torch.linalg.vector_norm(x64 - y64).item()
    signal = torch.linalg.vector_norm(x64).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)
