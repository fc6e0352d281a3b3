"""qpass: low-precision (FP8, MX, FP4) quantization for PyTorch models, as compiler passes."""

from qpass import ops, optim  # noqa: F401 -- ops registers the qpass:: custom ops; qpass.optim.AdamW
from qpass.calibrate import calibrate
from qpass.checkpoint import from_pretrained, save_pretrained
from qpass.compile import compile, export
from qpass.formats import (
    DGE,
    DelayedScaling,
    FormatSpec,
    QTensor,
    dequantize,
    fake_quantize,
    qsnr,
    quantize,
)
from qpass.gptq import GPTQ
from qpass.quantizer import Quantizer
from qpass.recipes import Recipe, get_recipe, recipes
from qpass.report import Report, report
from qpass.rotation import Hadamard, Rotation

__version__ = "0.1.0"


def __getattr__(name: str):
    # The ONNX export needs the onnx extra (onnx, onnxruntime, onnxscript): imported on first use.
    if name in ("export_onnx", "onnx"):
        import qpass.onnx

        return qpass.onnx if name == "onnx" else qpass.onnx.export_onnx
    if name == "dcp":  # torch.distributed.checkpoint: imported on first use
        import qpass.dcp

        return qpass.dcp
    raise AttributeError(f"module 'qpass' has no attribute {name!r}")


__all__ = [
    "DGE",
    "DelayedScaling",
    "FormatSpec",
    "GPTQ",
    "Hadamard",
    "QTensor",
    "Quantizer",
    "Recipe",
    "Report",
    "Rotation",
    "calibrate",
    "compile",
    "dequantize",
    "export",
    "export_onnx",
    "fake_quantize",
    "from_pretrained",
    "get_recipe",
    "qsnr",
    "quantize",
    "recipes",
    "report",
    "save_pretrained",
]
