"""The ONNX translations of qpass's custom ops, for torch.onnx's ``custom_translation_table``.

Each is traced by the exporter with symbolic inputs and the op's other arguments as Python values,
and builds its result from :mod:`qpass.onnx.numerics`. The dialect decides a quantize-dequantize's
form (arithmetic or QuantizeLinear/DequantizeLinear) and a stored weight's (lookups or
DequantizeLinear).
"""

from __future__ import annotations

import torch

from qpass.onnx import numerics
from qpass.onnx.numerics import UnsupportedExport
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

DIALECTS = ("portable", "qdq")


def _onnx_dtype(dtype):
    from torch.onnx._internal.exporter._core import torch_dtype_to_onnx_dtype

    return torch_dtype_to_onnx_dtype(dtype) if isinstance(dtype, torch.dtype) else numerics.ir.DataType(dtype)


def translation_table(dialect: str, translated: list[dict] | None = None) -> dict:
    """The table for ``dialect``; each activation quantizer and rotation translated is appended to
    ``translated`` with its input and output values (named by the exporter once it is done)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown ONNX dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    quantize = numerics.quantize_dequantize if dialect == "qdq" else numerics.fake_quantize
    translated = [] if translated is None else translated

    def quantize_dequantize(x, quantizer: str, axis: int, state: str = "", sync: bool = False):
        if state:
            raise UnsupportedExport(
                "delayed scaling: its scale comes from an amax history updated at run time"
            )
        out = quantize(x, Quantizer.from_json(quantizer), axis)
        translated.append({"op": "qdq", "input": x, "output": out, "quantizer": quantizer, "axis": axis})
        return out

    def rotate(x, rotation: str, axis: int, inverse: bool = False):
        out = numerics.rotate(x, Rotation.from_json(rotation), axis, inverse)
        translated.append({
            "op": "rotate", "input": x, "output": out, "rotation": rotation, "axis": axis, "inverse": inverse,
        })
        return out

    def dequantize_packed(codes, scales, tensor_scale, quantizer: str, shape, axis: int, dtype):
        return numerics.dequantize_stored(
            codes, scales, tensor_scale, Quantizer.from_json(quantizer), list(shape), axis,
            _onnx_dtype(dtype), dialect,
        )

    return {
        torch.ops.qpass.quantize_dequantize.default: quantize_dequantize,
        torch.ops.qpass.rotate.default: rotate,
        torch.ops.qpass.dequantize_packed.default: dequantize_packed,
    }
