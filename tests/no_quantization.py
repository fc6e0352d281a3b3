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
    def identity(quantizer, x, axis, state="", rotation=None, signs=None, kernels=False):
        x = x.detach()
        return (x.clone() if rotation is None
                else rotation(x, axis, signs=None if signs is None else signs.to(x.dtype)))

    def identity_operand(quantizer, x, axis, state="", rotation=None, signs=None, kernels=False):
        return identity(quantizer, x, axis, state, rotation, signs).movedim(axis, -1)

    # Nothing quantized, nothing saved quantized: backward "quantizes" the saved inputs, unchanged.
    def nothing_saved(quantizers):
        return False, False

    matmul = qpass.ops.matmul
    originals = qpass.ops.qdq.quantize_operand, matmul.operand, matmul.saved_in_low_precision
    qpass.ops.qdq.quantize_operand, matmul.operand, matmul.saved_in_low_precision = (
        identity, identity_operand, nothing_saved)
    try:
        yield
    finally:
        qpass.ops.qdq.quantize_operand, matmul.operand, matmul.saved_in_low_precision = originals
