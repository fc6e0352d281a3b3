"""``qpass::quantized_matmul``: ``Q(A) · Q(B)`` by scaled GEMMs, with a backward that runs the dgrad
and wgrad GEMMs of SPEC section 6, and what backward needs saved in low precision.

``A [..., M, K] · B [..., K, N]``; each GEMM quantizes its operands along its own reduction axis
(:mod:`qpass.ops.gemm` multiplies them): the forward ``A along K · B along K``, dgrad
``dY along N · B along N``, wgrad ``A along M · dY along M``. The forward quantizes A and B for
their backward GEMMs too, wherever that quantization is fixed by the forward's inputs (no
stochastic rounding, no signs drawn in backward, no estimator that needs the input): the op returns
those codes and scales beside the product, and backward is saved them instead of A and B. An
operand quantized per tensor the same way in both its GEMMs is quantized once, and its codes serve
both (transposed for the other). The quantizers and the execution come as JSON
(:class:`~qpass.matmul_quantizers.MatmulQuantizers`, :class:`~qpass.execution.Execution`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qpass.execution import Execution
from qpass.gemm_operand import GemmOperand, empty_tensors, from_qtensor, quantize_for_gemm, transposed
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops import qdq
from qpass.ops.gemm import Operand, scaled_gemm
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def operand(
    quantizer: Quantizer | None, x: Tensor, axis: int, state: str = "", rotation: Rotation | None = None,
    signs: Tensor | None = None, kernels: bool = False,
) -> Operand:
    """``x`` (rotated first, if asked) quantized along ``axis`` for a GEMM, that axis moved last; a
    high-precision operand is ``x``'s fp32 values so moved. ``kernels``: by the generated Triton
    kernel (the lowering chose it: never with a ``state``)."""
    if quantizer is None:
        x = x.detach().float()
        return (x if rotation is None else rotation(x, axis, signs=signs)).movedim(axis, -1)
    if kernels:
        from qpass import codegen  # imports triton: only once kernels were chosen

        return from_qtensor(codegen.quantize(x.detach(), quantizer, axis, rotation, signs), quantizer)
    return quantize_for_gemm(x, quantizer, axis, qdq.delayed_state(state, x.device), rotation, signs)


def _other_orientation(op: Operand, flatten: bool) -> Operand:
    """A per-tensor operand ``[..., R, K]`` as the other GEMM's ``[..., K, R]`` (R all leading dims
    with ``flatten``)."""
    if isinstance(op, GemmOperand):
        return transposed(op.flattened() if flatten else op)
    return (op.reshape(-1, op.shape[-1]) if flatten else op).mT


def _fixed(quantizer: Quantizer | None, rotation: Rotation | None, forward: Quantizer | None) -> bool:
    """A backward operand the forward can quantize: nothing in it is drawn at backward time, and its
    forward quantizer's estimator does not need the high-precision input anyway."""
    return (quantizer is not None and quantizer.rounding != "stochastic"
            and not (rotation is not None and rotation.resample) and (forward is None or forward.dge is None))


def saved_in_low_precision(q: MatmulQuantizers) -> tuple[bool, bool]:
    """Whether backward gets A's wgrad operand and B's dgrad operand from the forward (else A, B).
    An operand quantized once for both its GEMMs always is: quantizing it again would draw again."""
    return (q.shares_a or _fixed(q.db_a, q.db_rotation, q.a)), (q.shares_b or _fixed(q.da_b, q.da_rotation, q.b))


def _wgrad_input(a: Tensor, b: Tensor) -> Tensor:
    """A as wgrad multiplies it: with a weight B shared by every row, all of A's rows are one M."""
    return a.reshape(-1, a.shape[-1]) if b.ndim == 2 else a


def _lengths(q: MatmulQuantizers, m: int, n: int) -> tuple[int, int]:
    """The reduction lengths of wgrad (M) and dgrad (N), as their rotations pad them."""
    return (m if q.db_rotation is None else q.db_rotation.padded(m),
            n if q.da_rotation is None else q.da_rotation.padded(n))


@torch.library.custom_op("qpass::quantized_matmul", mutates_args=())
def _forward(
    a: Tensor, b: Tensor, quantizers: str, execution: str, save_a: bool, save_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fprop ``Q(A along K) · Q(B along K)`` in ``a``'s dtype, then A's wgrad operand and B's dgrad
    operand (codes, scales, global scale; empty where not asked for)."""
    q, run = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution)
    kernels = run.kernels
    a_k = operand(q.a, a, -1, run.a_state, q.rotation, kernels=kernels)
    b_k = operand(q.b, b, -2, run.b_state, q.rotation, kernels=kernels)
    y = scaled_gemm(a_k, b_k, a.dtype)
    saved_a, saved_b = _nothing(a), _nothing(a)
    if save_a:
        a_m = (_other_orientation(a_k, b.ndim == 2) if q.shares_a
               else operand(q.db_a, _wgrad_input(a, b), -2, rotation=q.db_rotation, kernels=kernels))
        saved_a = a_m.tensors()
    if save_b:
        b_n = _other_orientation(b_k, False) if q.shares_b else operand(
            q.da_b, b, -1, rotation=q.da_rotation, kernels=kernels)
        saved_b = b_n.tensors()
    return (y, *saved_a, *saved_b)


@_forward.register_fake
def _(a, b, quantizers, execution, save_a, save_b):
    q = MatmulQuantizers.from_json(quantizers)
    y = torch.matmul(a, b)  # a rotation pads K alike on both sides: the shape is unchanged
    saved_a, saved_b = _nothing(a), _nothing(a)
    if save_a:
        saved_a = empty_tensors(q.db_a, _wgrad_input(a, b).mT.shape, q.db_rotation, a.device)
    if save_b:
        saved_b = empty_tensors(q.da_b, b.shape, q.da_rotation, a.device)
    return (y, *saved_a, *saved_b)


def _nothing(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(0), x.new_empty(0), x.new_empty(0)


def quantized_matmul(a: Tensor, b: Tensor, quantizers: str, execution: str) -> Tensor:
    """``Q(A) · Q(B)``, differentiable by SPEC section 6."""
    save_a, save_b = saved_in_low_precision(MatmulQuantizers.from_json(quantizers))
    # Each saved operand serves the gradient of the *other* operand.
    grad = torch.is_grad_enabled()
    save_a, save_b = save_a and grad and b.requires_grad, save_b and grad and a.requires_grad
    return torch.ops.qpass.quantized_matmul(a, b, quantizers, execution, save_a, save_b)[0]


@torch.library.custom_op("qpass::quantized_matmul_backward", mutates_args=())
def _backward(
    grad: Tensor, a: Tensor, b: Tensor, a_saved: list[Tensor], b_saved: list[Tensor], a_shape: list[int],
    b_shape: list[int], a_dtype: torch.dtype, b_dtype: torch.dtype, quantizers: str, execution: str,
    need_a: bool, need_b: bool,
) -> tuple[Tensor, Tensor]:
    """dgrad ``dA = Q(dY along N) · Q(B along N)ᵀ`` and wgrad ``dB = Q(A along M)ᵀ · Q(dY along M)``.

    ``a``, ``b``: the forward's inputs, or empty where the forward saved their backward operands
    (``a_saved``, ``b_saved``: codes, scales, global scale); the gradients come in ``a_dtype`` and
    ``b_dtype``. When B is a matrix shared by every
    batch entry (a linear layer's weight), M is all of A's leading dimensions flattened; otherwise
    each batch entry has its own M. Gradients not needed come back empty. An operand whose forward
    quantizer has a DGE gets its gradient reshaped by it. Random draws (resampled rotation signs,
    stochastic rounding) come from torch's default generators in this order: a shared dY; dgrad's
    signs, dY, B; wgrad's signs, dY, A.
    """
    q, run = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution)
    m_length, n_length = _lengths(q, math.prod(grad.shape[:-1]) if len(b_shape) == 2 else grad.shape[-2],
                                  grad.shape[-1])
    kernels, accumulated = run.kernels, torch.promote_types(grad.dtype, torch.float32)
    shared = operand(q.da_grad, grad, -1, run.grad_state, kernels=kernels) if q.shares_grad else None
    grad_a = grad_b = grad.new_empty(0)
    if need_a:
        signs = qdq.draw_signs(q.da_rotation, grad.shape[-1])
        dy = shared if shared is not None else operand(q.da_grad, grad, -1, rotation=q.da_rotation, signs=signs,
                                                                  kernels=kernels)
        b_n = (GemmOperand.from_tensors(b_saved, q.da_b, n_length) if b_saved[0].numel()
               else operand(q.da_b, b, -1, rotation=q.da_rotation, signs=signs, kernels=kernels))
        grad_a = scaled_gemm(dy, b_n, accumulated).sum_to_size(a_shape)
        grad_a = (grad_a if q.a is None else q.a.gradient(grad_a, a, -1)).to(a_dtype)
    if need_b:
        if len(b_shape) == 2:
            grad = grad.reshape(-1, grad.shape[-1])
        signs = qdq.draw_signs(q.db_rotation, grad.shape[-2])
        dy = (_other_orientation(shared, len(b_shape) == 2) if shared is not None
              else operand(q.db_grad, grad, -2, rotation=q.db_rotation, signs=signs, kernels=kernels))
        a_m = (GemmOperand.from_tensors(a_saved, q.db_a, m_length) if a_saved[0].numel()
               else operand(q.db_a, a.reshape(-1, a.shape[-1]) if len(b_shape) == 2 else a, -2,
                            rotation=q.db_rotation, signs=signs, kernels=kernels))
        grad_b = scaled_gemm(a_m, dy, accumulated).sum_to_size(b_shape)
        grad_b = (grad_b if q.b is None else q.b.gradient(grad_b, b, -2)).to(b_dtype)
    return grad_a, grad_b


@_backward.register_fake
def _(grad, a, b, a_saved, b_saved, a_shape, b_shape, a_dtype, b_dtype, quantizers, execution, need_a, need_b):
    return (grad.new_empty(a_shape, dtype=a_dtype) if need_a else grad.new_empty(0),
            grad.new_empty(b_shape, dtype=b_dtype) if need_b else grad.new_empty(0))


def _save(ctx, inputs, output):
    a, b, ctx.quantizers, ctx.execution, save_a, save_b = inputs
    ctx.a_shape, ctx.b_shape, ctx.dtypes = list(a.shape), list(b.shape), [a.dtype, b.dtype]
    ctx.mark_non_differentiable(*output[1:])
    # A and B themselves only where backward cannot do with what the forward quantized for it: the
    # other operand's gradient without a saved operand, or its own through an estimator.
    q = MatmulQuantizers.from_json(ctx.quantizers)
    need_a, need_b = ctx.needs_input_grad[:2]
    keep_a = (need_b and not save_a) or (need_a and q.a is not None and q.a.dge is not None)
    keep_b = (need_a and not save_b) or (need_b and q.b is not None and q.b.dge is not None)
    ctx.save_for_backward(a if keep_a else None, b if keep_b else None, *output[1:])


def _matmul_backward(ctx, grad, *unused):
    a, b, *saved = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    empty = grad.new_empty(0)
    grad_a, grad_b = torch.ops.qpass.quantized_matmul_backward(
        grad, empty if a is None else a, empty if b is None else b, saved[:3], saved[3:], ctx.a_shape,
        ctx.b_shape, *ctx.dtypes, ctx.quantizers, ctx.execution, need_a, need_b)
    return (grad_a.contiguous() if need_a else None, grad_b.contiguous() if need_b else None,
            None, None, None, None)


_forward.register_autograd(_matmul_backward, setup_context=_save)
