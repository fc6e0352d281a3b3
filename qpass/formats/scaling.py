"""Scales for a group-arranged tensor, for every kind of scaling a :class:`FormatSpec` names.

Each kind yields the same three things: the factor that takes x to element units (``encode``), the
factor that takes elements back (``decode``), and what :class:`~qpass.formats.qtensor.QTensor`
stores. Keeping them together lets quantize, dequantize and fake-quantize share one code path.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from qpass.formats import mx, nvfp4
from qpass.formats.absmax import absmax_encode, group_amax
from qpass.formats.element import FP8_E4M3, decode, encode
from qpass.formats.spec import FormatSpec


class GroupScales(NamedTuple):
    encode: torch.Tensor  # fp32, broadcastable against [..., G, B]
    decode: torch.Tensor
    stored: torch.Tensor  # absmax: fp32 decode scales; MX: E8M0 codes; NVFP4: E4M3 codes
    tensor_scale: torch.Tensor | None = None  # NVFP4's per-tensor fp32 g


AmaxReduction = Callable[[torch.Tensor], torch.Tensor]


def tensor_amax(groups: torch.Tensor, reduce_amax: AmaxReduction | None = None) -> torch.Tensor:
    """The amax of the whole tensor, passed through ``reduce_amax`` where one is given (the MAX
    across data-parallel ranks that makes every rank's per-tensor scale the same)."""
    amax = group_amax(groups, "tensor")
    return amax if reduce_amax is None else reduce_amax(amax)


def compute_scales(
    groups: torch.Tensor, spec: FormatSpec, reduce_amax: AmaxReduction | None = None
) -> GroupScales:
    """Scales for fp32 ``groups`` shaped ``[..., G, B]`` (NVFP4 tiles: ``[..., R, G, B]``, R the
    other of the tensor's last two dims); ``reduce_amax`` applies to a per-tensor amax."""
    if spec.scaling == "absmax":
        amax = (tensor_amax(groups, reduce_amax) if spec.granularity == "tensor"
                else group_amax(groups, spec.granularity))
        return absmax_group_scales(absmax_encode(amax, spec.element.max_normal, spec.pow2), spec)
    if spec.scaling == "mx":
        codes = mx.e8m0_codes(group_amax(groups, "block"), spec.element, spec.scale_mode)
        return GroupScales(mx.e8m0_encode(codes), mx.e8m0_decode(codes), codes.squeeze(-1))
    if spec.scaling == "nvfp4":
        g = nvfp4.global_scale(tensor_amax(groups, reduce_amax), spec.scale_mode)
        block_amax = group_amax(groups, "block")
        tile_rows = spec.block_size if spec.granularity == "tile" else None
        if tile_rows is not None:
            block_amax = nvfp4.tile_amax(block_amax, tile_rows)
        if spec.scale_mode == nvfp4.FOUR_OVER_SIX:
            s_b = nvfp4.four_over_six_scales(groups, block_amax, g, tile_rows)
        else:
            s_b = nvfp4.block_scales(block_amax, g)
        return GroupScales(nvfp4.element_encode(g, s_b), s_b * g, encode(s_b, FP8_E4M3).squeeze(-1), g)
    raise ValueError(f"unknown scaling {spec.scaling!r}")


def absmax_group_scales(encode: torch.Tensor, spec: FormatSpec) -> GroupScales:
    """Absmax scales from their encode factors (also the way in for delayed scaling)."""
    decode = 1.0 / encode  # a correctly rounded reciprocal: one fp32 division
    return GroupScales(encode, decode, decode if spec.granularity == "tensor" else decode.squeeze(-1))


def stored_decode(spec: FormatSpec, stored: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """The decode factor, ``[..., G, 1]``-broadcastable, recovered from stored scales."""
    if spec.scaling == "absmax":
        return stored if spec.granularity == "tensor" else stored.unsqueeze(-1)
    if spec.scaling == "mx":
        return mx.e8m0_decode(stored).unsqueeze(-1)
    return decode(stored, FP8_E4M3).unsqueeze(-1) * tensor_scale
