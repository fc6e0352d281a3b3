"""qpass: low-precision (FP8, MX, FP4) quantization for PyTorch models, as compiler passes."""

from qpass.formats import (
    DelayedScaling,
    FormatSpec,
    QTensor,
    dequantize,
    fake_quantize,
    qsnr,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "DelayedScaling",
    "FormatSpec",
    "QTensor",
    "dequantize",
    "fake_quantize",
    "qsnr",
    "quantize",
]
