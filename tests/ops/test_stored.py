"""The ONNX export's stored weight: ``qpass::dequantize_packed`` of codes and scales kept in the graph."""

import pytest
import torch

from qpass import Quantizer


@pytest.mark.parametrize("name, codes_dtype, scales_dtype", [
    ("mxfp4", torch.float4_e2m1fn_x2, None),
    ("nvfp4", torch.float4_e2m1fn_x2, torch.float8_e4m3fn),
    ("mxfp8_e4m3", torch.float8_e4m3fn, None),
    ("mxint8", torch.int8, None),
    ("fp8_e5m2", torch.float8_e5m2, None),
    ("mxfp6_e3m2", None, None),
])
def test_dequantize_packed_is_dequantize_of_the_stored_tensors(name, codes_dtype, scales_dtype):
    """The ONNX export's stored weight: the QTensor's codes (typed views, or fp6 packed four to
    three bytes) and scales as graph constants; the same values as qpass.dequantize."""
    from qpass.formats import dequantize, quantize
    from qpass.formats.packing import pack_fp6

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    quantizer = Quantizer(name)
    qt = quantize(w, quantizer.spec, 0)
    codes = pack_fp6(qt.codes) if codes_dtype is None else qt.codes.view(codes_dtype)
    scales = qt.scales if scales_dtype is None else qt.scales.view(scales_dtype)
    out = torch.ops.qpass.dequantize_packed(
        codes, scales, qt.tensor_scale, quantizer.to_json(), [24, 40], 0, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), dequantize(qt).view(torch.int16))
