"""qpass's custom ops: the nodes the passes put into graphs, one module per op family.

- :mod:`~qpass.ops.qdq`: ``qpass::quantize_dequantize`` (one operand's QDQ, straight-through or DGE
  gradient) and ``qpass::rotate`` (a Hadamard rotation along one axis; its gradient is the inverse).
- :mod:`~qpass.ops.gemm`: the scaled GEMM every quantized GEMM runs through (``_scaled_mm``, the
  Triton dequant GEMM or the reference), and the cuBLASLt constraints it checks.
- :mod:`~qpass.ops.matmul`: ``qpass::gemm_operand`` (an operand quantized for a GEMM) and
  ``qpass::quantized_matmul`` with its SPEC section 6 backward.
- :mod:`~qpass.ops.grouped`: ``qpass::grouped_matmul``, a mixture of experts' GEMM, each expert's
  product quantized as a dense one (SPEC section 6), by experts in a loop inside the op.
- :mod:`~qpass.ops.kernels`: ``qpass::fake_quantize_kernel`` and ``qpass::packed_linear``, the
  generated Triton kernels of a lowered graph.
- :mod:`~qpass.ops.stored`: ``qpass::dequantize_packed``, a weight stored quantized (ONNX export).
- :mod:`~qpass.ops.clamping`: ``qpass::clamp_outliers`` and ``qpass::residual_matmul``, outlier
  clamping and compensation (FP4 training).
- :mod:`~qpass.ops.registry`: the objects ops find by key (delayed-scaling states, packed weights).

Every op has a CPU/CUDA implementation (the reference numerics of :mod:`qpass.formats`) and a fake
implementation, so torch.compile traces them without graph breaks, and takes its configs as JSON
strings, so an exported graph says what it computes. Importing this package registers them all.
"""

from qpass.ops import clamping, gemm, grouped, kernels, matmul, qdq, stored

__all__ = ["clamping", "gemm", "grouped", "kernels", "matmul", "qdq", "stored"]
