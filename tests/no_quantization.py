"""Every quantizer the identity: what is left of a quantized graph is its transforms, which must
preserve the function exactly."""

from __future__ import annotations

import contextlib

import qpass.ops.matmul
import qpass.ops.qdq


@contextlib.contextmanager
def quantization_off():
    """The quantized graph's ops with every quantizer the identity (rotations still applied), in the
    input's own dtype: what is left is the transforms, which must preserve the function exactly."""
    def identity(quantizer, x, axis, state="", rotation=None, signs=None, kernels=False, sync=False):
        x = x.detach()
        return (x.clone() if rotation is None
                else rotation(x, axis, signs=None if signs is None else signs.to(x.dtype)))

    def identity_operand(quantizer, x, axis, state="", rotation=None, signs=None, kernels=False,
                         values=False, sync=False):
        return identity(quantizer, x, axis, state, rotation, signs).movedim(axis, -1)

    # No operand quantized ahead of a product, so none saved quantized: each GEMM "quantizes" its
    # operands from the high-precision tensors, unchanged.
    def nothing_ahead(quantizer, x, axis, kernels, state="", rotation=None, values=False, sync=False):
        return []

    matmul = qpass.ops.matmul
    originals = qpass.ops.qdq.quantize_operand, matmul.operand, matmul.quantize_ahead
    qpass.ops.qdq.quantize_operand, matmul.operand, matmul.quantize_ahead = (
        identity, identity_operand, nothing_ahead)
    try:
        yield
    finally:
        qpass.ops.qdq.quantize_operand, matmul.operand, matmul.quantize_ahead = originals
