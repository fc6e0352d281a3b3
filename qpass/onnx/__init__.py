"""ONNX export of qpass inference recipes (needs the ``onnx`` extra: onnx, onnxruntime, onnxscript).

``qpass.export_onnx(model, example_inputs, path, dialect="portable"|"qdq")`` writes the model;
``qpass.onnx.check(path, model, inputs)`` validates it against qpass's PyTorch output;
``qpass.onnx.session(path)`` opens a portable export in ONNX Runtime; ``qpass.onnx.generate(path,
input_ids, n)`` generates greedily with a causal LM exported with its KV cache (``decode``: one step).
"""

from qpass.onnx.check import CheckResult, check, check_quantizers, decode, generate, run, session
from qpass.onnx.export import export_fp32, export_onnx
from qpass.onnx.numerics import UnsupportedExport
from qpass.onnx.prepare import UnsupportedSite
from qpass.onnx.translation import DIALECTS

__all__ = [
    "DIALECTS", "CheckResult", "UnsupportedExport", "UnsupportedSite", "check", "check_quantizers", "decode",
    "export_fp32", "export_onnx", "generate", "run", "session",
]
