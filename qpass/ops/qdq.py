"""Quantize-dequantize and Hadamard rotation of one operand: ``qpass::quantize_dequantize``,
``qpass::rotate``.

:func:`quantize_operand` is the one place an operand is fake-quantized, by the reference numerics
(:mod:`qpass.formats`) or, where the lowering chose them, the generated Triton kernels
(:mod:`qpass.codegen`); every op that quantizes goes through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qpass.distributed import amax_reduction
from qpass.formats import DelayedScaling
from qpass.ops.registry import DELAYED_STATES
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def delayed_state(key: str, device: torch.device) -> DelayedScaling | None:
    """The delayed-scaling state registered under ``key`` ("" for none), moved to ``device``."""
    if not key:
        return None
    state = DELAYED_STATES[key]
    if state.amax_history.device != device:
        state.to(device)
    return state


def quantize_operand(
    quantizer: Quantizer | None, x: Tensor, axis: int, state: str = "", rotation: Rotation | None = None,
    signs: Tensor | None = None, kernels: bool = False, sync: bool = False,
) -> Tensor:
    """fp32 fake-quantized ``x``, rotated first if asked (``x`` in fp32 when the role stays in high
    precision); ``signs`` are the signs drawn for this GEMM when its rotation is resampled.
    ``kernels``: by the generated Triton kernel (the lowering chose it: never with a ``state``, nor
    ``sync``). ``sync``: a per-tensor amax is the MAX across ranks (:mod:`qpass.distributed`)."""
    x = x.detach().float()
    if kernels and quantizer is not None:
        from qpass import codegen  # imports triton: only once kernels were chosen

        return codegen.fake_quantize(x, quantizer, axis, rotation, signs)
    if rotation is not None:
        x = rotation(x, axis, signs=signs)
    if quantizer is None:
        return x
    return quantizer(x, axis, delayed_state(state, x.device), amax_reduction(sync))


def draw_signs(rotation: Rotation | None, length: int) -> Tensor | None:
    """One GEMM's fresh signs, shared by its two operands so that their rotations cancel."""
    return rotation.draw_signs(length) if rotation is not None and rotation.resample else None


# ---- rotation ------------------------------------------------------------------------------------


@torch.library.custom_op("qpass::rotate", mutates_args=())
def rotate(x: Tensor, rotation: str, axis: int, inverse: bool = False) -> Tensor:
    """``x · R`` along ``axis`` (``x · Rᵀ`` for ``inverse``), the axis zero-padded to whole blocks."""
    return Rotation.from_json(rotation)(x, axis, inverse).contiguous()


@rotate.register_fake
def _(x, rotation, axis, inverse=False):
    shape = list(x.shape)
    shape[axis] = Rotation.from_json(rotation).padded(shape[axis])
    return x.new_empty(shape)


def _save_length(ctx, inputs, output):
    x, ctx.rotation, ctx.axis, ctx.inverse = inputs
    ctx.length = x.shape[ctx.axis]


def _rotate_backward(ctx, grad):
    # R is orthogonal: the gradient of x·R is grad·Rᵀ, cut back to x's length where x was padded.
    grad = torch.ops.qpass.rotate(grad, ctx.rotation, ctx.axis, not ctx.inverse)
    return grad.narrow(ctx.axis, 0, ctx.length), None, None, None


rotate.register_autograd(_rotate_backward, setup_context=_save_length)


# ---- quantize-dequantize -------------------------------------------------------------------------


@torch.library.custom_op("qpass::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, quantizer: str, axis: int, state: str = "", sync: bool = False) -> Tensor:
    """``fake_quantize(x)`` with the quantizer given as JSON; ``state`` names a delayed-scaling state;
    ``sync``: a per-tensor amax is agreed across ranks."""
    quantized = quantize_operand(Quantizer.from_json(quantizer), x, axis, state, sync=sync)
    return quantized.to(x.dtype).contiguous()


# Outputs are contiguous whatever the inputs' strides (operands are often transposed views): the
# fake implementations must promise exactly that, or Inductor's stride asserts fail.
@quantize_dequantize.register_fake
def _(x, quantizer, axis, state="", sync=False):
    return x.new_empty(x.shape)


def _save_for_estimator(ctx, inputs, output):
    x, ctx.quantizer, ctx.axis, *_ = inputs
    ctx.save_for_backward(x if Quantizer.from_json(ctx.quantizer).dge else None)


def _estimated_gradient(ctx, grad):
    # Straight through, unless the quantizer's differentiable gradient estimator reshapes it.
    (x,) = ctx.saved_tensors
    grad = grad if x is None else Quantizer.from_json(ctx.quantizer).gradient(grad, x, ctx.axis)
    return grad, None, None, None, None


quantize_dequantize.register_autograd(_estimated_gradient, setup_context=_save_for_estimator)
