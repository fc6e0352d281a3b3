"""``qpass::quantized_matmul``: ``Q(A) · Q(B)`` with a backward that runs the dgrad and wgrad GEMMs
of SPEC section 6.

``A [..., M, K] · B [..., K, N]``; each backward GEMM quantizes its operands from the
high-precision tensors along its own reduction axis. Independent QDQ nodes on the forward graph
cannot express that (dY is needed along N and along M). Products accumulate in fp32 whatever the
operands' dtype. The quantizers and the execution come as JSON
(:class:`~qpass.matmul_quantizers.MatmulQuantizers`, :class:`~qpass.execution.Execution`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qpass.execution import Execution
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops import qdq


@torch.library.custom_op("qpass::quantized_matmul", mutates_args=())
def quantized_matmul(a: Tensor, b: Tensor, quantizers: str, execution: str) -> Tensor:
    """fprop: ``Q(A along K) · Q(B along K)`` in fp32, returned in ``a``'s dtype."""
    q, kernels = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution).kernels
    a_q = qdq.quantize_operand(q.a, a, -1, rotation=q.rotation, kernels=kernels)
    return torch.matmul(
        a_q, qdq.quantize_operand(q.b, b, -2, rotation=q.rotation, kernels=kernels)).to(a.dtype)


@quantized_matmul.register_fake
def _(a, b, quantizers, execution):
    return torch.matmul(a, b)  # a rotation pads K alike on both sides: the shape is unchanged


@torch.library.custom_op("qpass::quantized_matmul_backward", mutates_args=())
def quantized_matmul_backward(
    grad: Tensor, a: Tensor, b: Tensor, quantizers: str, execution: str, need_a: bool, need_b: bool
) -> tuple[Tensor, Tensor]:
    """dgrad ``dA = Q(dY along N) · Q(B along N)ᵀ`` and wgrad ``dB = Q(A along M)ᵀ · Q(dY along M)``.

    When B is a matrix shared by every batch entry (a linear layer's weight), M is all of A's
    leading dimensions flattened; otherwise each batch entry has its own M. Gradients not needed
    come back empty. An operand whose forward quantizer has a DGE gets its gradient reshaped by it.
    Random draws (resampled rotation signs, stochastic rounding) come from torch's default
    generators in this order: a shared dY; dgrad's signs, dY, B; wgrad's signs, dY, A.
    """
    q, run = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution)
    kernels = run.kernels
    shared = (qdq.quantize_operand(q.da_grad, grad, -1, run.grad_state, kernels=kernels) if q.shares_grad
              else None)
    grad_a = grad_b = grad.new_empty(0)
    if need_a:
        signs = qdq.draw_signs(q.da_rotation, grad.shape[-1])
        dy = shared if shared is not None else qdq.quantize_operand(
            q.da_grad, grad, -1, rotation=q.da_rotation, signs=signs, kernels=kernels
        )
        b_n = qdq.quantize_operand(q.da_b, b, -1, rotation=q.da_rotation, signs=signs, kernels=kernels)
        grad_a = (dy @ b_n.mT).sum_to_size(a.shape)
        grad_a = (grad_a if q.a is None else q.a.gradient(grad_a, a, -1)).to(a.dtype).contiguous()
    if need_b:
        if b.ndim == 2:
            a, grad = a.reshape(-1, a.shape[-1]), grad.reshape(-1, grad.shape[-1])
            shared = shared if shared is None else shared.reshape(grad.shape)
        signs = qdq.draw_signs(q.db_rotation, grad.shape[-2])
        dy = shared if shared is not None else qdq.quantize_operand(
            q.db_grad, grad, -2, rotation=q.db_rotation, signs=signs, kernels=kernels
        )
        a_m = qdq.quantize_operand(q.db_a, a, -2, rotation=q.db_rotation, signs=signs, kernels=kernels)
        grad_b = (a_m.mT @ dy).sum_to_size(b.shape)
        grad_b = (grad_b if q.b is None else q.b.gradient(grad_b, b, -2)).to(b.dtype).contiguous()
    return grad_a, grad_b


@quantized_matmul_backward.register_fake
def _(grad, a, b, quantizers, execution, need_a, need_b):
    return ((a.new_empty(a.shape) if need_a else grad.new_empty(0)),
            (b.new_empty(b.shape) if need_b else grad.new_empty(0)))


def _save_operands(ctx, inputs, output):
    a, b, ctx.quantizers, ctx.execution = inputs
    ctx.save_for_backward(a, b)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    grad_a, grad_b = torch.ops.qpass.quantized_matmul_backward(
        grad, a, b, ctx.quantizers, ctx.execution, need_a, need_b)
    return (grad_a if need_a else None), (grad_b if need_b else None), None, None


quantized_matmul.register_autograd(_matmul_backward, setup_context=_save_operands)
