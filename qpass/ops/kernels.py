"""The ops the lowering pass (:mod:`qpass.passes.lower`) puts into graphs for qpass's generated
Triton kernels.

``qpass::fake_quantize_kernel``  a rotation and QDQ in one generated kernel, in place of ``rotate``
                                 and ``quantize_dequantize``.
``qpass::packed_linear``         ``Q(x) · Wᵀ + bias`` with W stored packed (codes and scales): the
                                 scaled GEMM, or the generated dequant-matmul kernel for what no
                                 scaled matmul takes where the lowering chose kernels.

Both run the kernels on whatever device their input is on: the lowering inserts them only where the
kernels run (CUDA, or Triton's interpreter when asked with ``kernels="interpret"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qpass.formats import QTensor
from qpass.gemm_operand import from_qtensor
from qpass.ops import qdq
from qpass.ops.gemm import route, scaled_gemm
from qpass.ops.matmul import operand
from qpass.ops.registry import PACKED_WEIGHTS
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


@torch.library.custom_op("qpass::fake_quantize_kernel", mutates_args=())
def fake_quantize_kernel(x: Tensor, quantizer: str, axis: int, rotation: str = "") -> Tensor:
    """``rotate`` then ``quantize_dequantize`` in one generated kernel."""
    q, r = Quantizer.from_json(quantizer), (Rotation.from_json(rotation) if rotation else None)
    return qdq.quantize_operand(q, x, axis, rotation=r, kernels=True).to(x.dtype).contiguous()


@fake_quantize_kernel.register_fake
def _(x, quantizer, axis, rotation=""):
    shape = list(x.shape)
    if rotation:
        shape[axis] = Rotation.from_json(rotation).padded(shape[axis])
    return x.new_empty(shape)


def _save_for_kernel_gradient(ctx, inputs, output):
    x, ctx.quantizer, ctx.axis, ctx.rotation = inputs
    ctx.length = x.shape[ctx.axis]
    ctx.save_for_backward(x if Quantizer.from_json(ctx.quantizer).dge and not ctx.rotation else None)


def _kernel_gradient(ctx, grad):
    # As rotate followed by quantize_dequantize: the estimator's gradient, then the inverse rotation.
    (x,) = ctx.saved_tensors
    if x is not None:
        grad = Quantizer.from_json(ctx.quantizer).gradient(grad, x, ctx.axis)
    if ctx.rotation:
        grad = torch.ops.qpass.rotate(grad, ctx.rotation, ctx.axis, True).narrow(ctx.axis, 0, ctx.length)
    return grad, None, None, None


fake_quantize_kernel.register_autograd(_kernel_gradient, setup_context=_save_for_kernel_gradient)


def register_packed_weight(weight: QTensor) -> str:
    """A key under which ``qpass::packed_linear`` finds ``weight`` (a caller must keep it alive)."""
    return PACKED_WEIGHTS.register(weight)


@torch.library.custom_op("qpass::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor, bias: Tensor | None, weight: str, weight_quantizer: str, out_features: int,
    input_quantizer: str, rotation: str, kernels: bool
) -> Tensor:
    """``Q(rotate(x)) · Wᵀ + bias`` for a weight stored packed (:func:`register_packed_weight`'s
    key ``weight``: a QTensor of W ``[N, K]`` quantized along K by ``weight_quantizer``, after
    ``rotation``), by the scaled GEMM (:mod:`qpass.ops.gemm`: FP8 per tensor or per row runs on
    ``_scaled_mm``). With ``kernels``, what no scaled matmul takes runs the generated dequant-matmul
    kernel, which quantizes x on the fly where it can (weight-only MXFP4/NVFP4 at decode)."""
    qt = PACKED_WEIGHTS[weight]
    w = from_qtensor(qt, Quantizer.from_json(weight_quantizer))
    a_q = Quantizer.from_json(input_quantizer) if input_quantizer else None
    r = Rotation.from_json(rotation) if rotation else None
    if kernels and not route(a_q, w.quantizer, x.device).startswith("scaled_mm"):
        from qpass import codegen  # imports triton: only once kernels were chosen

        if r is not None:  # a rotated input is quantized by its own kernel, then multiplied as it is
            x = (fake_quantize_kernel(x, input_quantizer, -1, rotation) if a_q
                 else torch.ops.qpass.rotate(x, rotation, -1))
            a_q = None
        return codegen.weight_matmul(x, qt, bias, input_quantizer=a_q, out_dtype=x.dtype)
    out = scaled_gemm(operand(a_q, x, -1, rotation=r), w, x.dtype)
    return out if bias is None else out + bias


@packed_linear.register_fake
def _(x, bias, weight, weight_quantizer, out_features, input_quantizer, rotation, kernels):
    return x.new_empty((*x.shape[:-1], out_features))
