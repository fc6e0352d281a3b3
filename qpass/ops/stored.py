"""``qpass::dequantize_packed``: a weight stored quantized in the graph, what the ONNX export puts in
place of its QDQ."""

from __future__ import annotations

import torch
from torch import Tensor

from qpass.formats import QTensor, dequantize
from qpass.formats.packing import unpack_fp6
from qpass.quantizer import Quantizer


@torch.library.custom_op("qpass::dequantize_packed", mutates_args=())
def dequantize_packed(
    codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, quantizer: str, shape: list[int], axis: int,
    dtype: torch.dtype
) -> Tensor:
    """``dequantize`` of a QTensor whose codes and scales are graph constants: a weight quantized
    once, at export (:mod:`qpass.onnx.prepare`). ``codes`` and ``scales`` may be typed views of the
    stored bytes (float8, float4 x2, int8), which the ONNX exporter writes as those types; fp6 codes
    are packed four to three bytes (:func:`~qpass.formats.packing.pack_fp6`)."""
    spec = Quantizer.from_json(quantizer).spec
    codes = codes.view(torch.uint8)
    if spec.element.bits == 6:
        codes = unpack_fp6(codes, spec.padded_length(shape[axis] if shape else 1))
    qt = QTensor(
        codes=codes, scales=scales if scales.dtype == torch.float32 else scales.view(torch.uint8),
        format=spec, shape=torch.Size(shape), axis=axis, dtype=dtype, tensor_scale=tensor_scale,
    )
    return dequantize(qt)


@dequantize_packed.register_fake
def _(codes, scales, tensor_scale, quantizer, shape, axis, dtype):
    return codes.new_empty(shape, dtype=dtype)
