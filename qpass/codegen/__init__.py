"""Triton kernels that qpass generates for its formats, and their torch.library ops.

Importing this package needs ``triton`` (the ``qpass[triton]`` extra). The kernels are specialized
per format spec (:mod:`qpass.codegen.spec`), written with the bit-exact device functions of
:mod:`qpass.codegen.numerics`, and checked against :mod:`qpass.formats` bit for bit (on the CPU
under ``TRITON_INTERPRET=1``). Each function launches through a ``qpass_codegen::`` op
(``torch.library.triton_op``), so torch.compile sees the kernels inside it.
"""

from qpass.codegen.matmul import weight_matmul
from qpass.codegen.quantize import dequantize, fake_quantize, quantize

__all__ = ["dequantize", "fake_quantize", "quantize", "weight_matmul"]
