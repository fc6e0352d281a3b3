"""qpass's numerics: one readable, bit-exact reference implementation of every format.

Everything else in qpass (graph passes, Triton kernels, ONNX graphs) is tested against this.
"""

from qpass.formats.api import dequantize, fake_quantize, qsnr, quantize
from qpass.formats.delayed import DelayedScaling
from qpass.formats.dge import DGE, dge_multiplier
from qpass.formats.element import ELEMENT_FORMATS, ElementFormat
from qpass.formats.qtensor import QTensor
from qpass.formats.rounding import ROUNDING_MODES, round_to_element
from qpass.formats.spec import NAMED_FORMATS, NVFP4_SCALE_MODES, SCALE_MODES, FormatSpec, resolve_format

__all__ = [
    "ELEMENT_FORMATS",
    "NAMED_FORMATS",
    "NVFP4_SCALE_MODES",
    "ROUNDING_MODES",
    "SCALE_MODES",
    "DGE",
    "DelayedScaling",
    "ElementFormat",
    "FormatSpec",
    "QTensor",
    "dequantize",
    "dge_multiplier",
    "fake_quantize",
    "qsnr",
    "quantize",
    "resolve_format",
    "round_to_element",
]
