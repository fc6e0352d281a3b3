"""``qpass::grouped_matmul``: a mixture of experts' GEMM, each expert's product quantized on its own.

``A [S, K] · B [E, K, N]``: A's rows are tokens sorted by expert, ``offs[e]`` the end of expert
``e``'s rows (``torch._grouped_mm``'s convention; rows past the last offset belong to no expert and
come out zero). Expert ``e``'s product ``A[offs[e-1]:offs[e]] · B[e]`` is quantized exactly as a
dense product of those operands (:func:`qpass.quantized.product`, SPEC section 6): its weight's
scaling groups never cross experts, its tokens share a per-tensor scale with no other expert's, and
its wgrad reduces along its own tokens. An expert with no tokens computes nothing, and its weight's
gradient is zero.

The loop over experts runs inside the op, where the offsets are numbers: the graph around it has no
data-dependent shapes (Dynamo, AOTAutograd and torch.export trace the op as one node). Backward
requantizes A and B from the high-precision operands the forward saved (those are deterministic for
every quantizer the op takes: the lowering keeps delayed-scaling states and cross-rank amaxes away
from expert GEMMs), so the forward saves A in its own dtype, and B, a parameter, costs nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qpass.execution import ProductConfig, without_hoisted
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops.gemm import scaled_gemm
from qpass.ops.matmul import backward_gemms, multiplies_values, operand
from qpass.ops.qdq import quantize_operand


def expert_rows(offs: Tensor, rows: int) -> list[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of every expert that has tokens."""
    groups, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        end = min(int(end), rows)
        if end > start:
            groups.append((expert, start, end))
        start = max(start, end)
    return groups


def _hoisted(q: MatmulQuantizers, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A and B as the forward quantizes them before its GEMM where the recipe reuses them in
    backward (``reuse_forward``), else as they are."""
    if q.hoists_a:
        a = quantize_operand(q.a, a, -1).to(a.dtype)
    if q.hoists_b:
        b = quantize_operand(q.b, b, -2).to(b.dtype)
    return a, b


def _inference_operands(q: MatmulQuantizers, a: Tensor, b: Tensor, kernels: bool) -> tuple[Tensor, Tensor]:
    """A product whose backward quantizes nothing: its operands rotated and quantize-dequantized, in
    their own dtype, as the inference form's QDQ nodes give them to ``torch.matmul``."""
    return (quantize_operand(q.a, a, -1, rotation=q.rotation, kernels=kernels).to(a.dtype),
            quantize_operand(q.b, b, -2, rotation=q.rotation, kernels=kernels).to(b.dtype))


def expert_product(a: Tensor, b: Tensor, config: ProductConfig) -> Tensor:
    """One expert's ``Q(A along K) · Q(B along K)`` (``A [M, K]``, ``B [K, N]``), as
    :func:`qpass.quantized.product` computes it for a dense product."""
    q, run, op_config = without_hoisted(config)
    if not q.quantizes_backward:
        return torch.matmul(*_inference_operands(q, a, b, run.kernels))
    a, b = _hoisted(q, a, b)
    if op_config is None:
        return torch.matmul(a, b)
    inner = MatmulQuantizers.from_json(op_config[0])
    values = multiplies_values(inner.a, inner.b, a, False)
    return scaled_gemm(operand(inner.a, a, -1, rotation=inner.rotation, kernels=run.kernels, values=values),
                       operand(inner.b, b, -2, rotation=inner.rotation, kernels=run.kernels, values=values),
                       a.dtype)


def expert_gradients(grad: Tensor, a: Tensor, b: Tensor, config: ProductConfig, need_a: bool,
                     need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """One expert's dA and dB: SPEC section 6's dgrad and wgrad GEMMs, through the forward's
    hoisted quantizers (straight through, or their DGE); an inference product's straight through
    its QDQ (and rotation) into plain matmuls."""
    q, run, op_config = without_hoisted(config)
    if not q.quantizes_backward:
        a_q, b_q = _inference_operands(q, a, b, run.kernels)
        grad_a = grad_b = None
        if need_a:
            grad_a = q.a.gradient(grad @ b_q.mT, a, -1) if q.a is not None else grad @ b_q.mT
            grad_a = grad_a if q.rotation is None else _unrotated(q, grad_a, -1, a.shape[-1])
        if need_b:
            grad_b = q.b.gradient(a_q.mT @ grad, b, -2) if q.b is not None else a_q.mT @ grad
            grad_b = grad_b if q.rotation is None else _unrotated(q, grad_b, -2, b.shape[-2])
        return grad_a, grad_b
    a_q, b_q = _hoisted(q, a, b)
    if op_config is None:
        grad_a, grad_b = grad @ b_q.mT, a_q.mT @ grad
    else:
        grad_a, grad_b = backward_gemms(grad, a_q, b_q, [], [], list(a.shape), list(b.shape), a.dtype,
                                        b.dtype, *op_config, need_a, need_b)
    if q.hoists_a and need_a:
        grad_a = q.a.gradient(grad_a, a, -1)
    if q.hoists_b and need_b:
        grad_b = q.b.gradient(grad_b, b, -2)
    return (grad_a if need_a else None), (grad_b if need_b else None)


def _unrotated(q: MatmulQuantizers, grad: Tensor, axis: int, length: int) -> Tensor:
    # R is orthogonal: the gradient of x·R is grad·Rᵀ, cut back to x's length where x was padded.
    return q.rotation(grad.float(), axis, inverse=True).narrow(axis, 0, length).to(grad.dtype)


@torch.library.custom_op("qpass::grouped_matmul", mutates_args=())
def grouped_matmul(a: Tensor, b: Tensor, offs: Tensor, quantizers: str, execution: str) -> Tensor:
    """``A [S, K] · B [E, K, N]`` by experts (rows ``offs[e-1]:offs[e]`` times ``B[e]``), each
    expert's product quantized as :func:`expert_product` says."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    for expert, start, end in expert_rows(offs, a.shape[0]):
        out[start:end] = expert_product(a[start:end], b[expert], (quantizers, execution))
    return out


@grouped_matmul.register_fake
def _(a, b, offs, quantizers, execution):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("qpass::grouped_matmul_backward", mutates_args=())
def grouped_matmul_backward(grad: Tensor, a: Tensor, b: Tensor, offs: Tensor, quantizers: str, execution: str,
                            need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    """dA and dB of :func:`grouped_matmul`, expert by expert (empty where not needed)."""
    grad_a = torch.zeros_like(a) if need_a else a.new_empty(0)
    grad_b = torch.zeros_like(b) if need_b else b.new_empty(0)
    for expert, start, end in expert_rows(offs, a.shape[0]):
        da, db = expert_gradients(grad[start:end], a[start:end], b[expert], (quantizers, execution), need_a,
                                  need_b)
        if need_a:
            grad_a[start:end] = da
        if need_b:
            grad_b[expert] = db
    return grad_a, grad_b


@grouped_matmul_backward.register_fake
def _(grad, a, b, offs, quantizers, execution, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty(0),
            torch.empty_like(b) if need_b else b.new_empty(0))


def _save(ctx, inputs, output):
    a, b, offs, ctx.quantizers, ctx.execution = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    grad_a, grad_b = torch.ops.qpass.grouped_matmul_backward(
        grad.contiguous(), a, b, offs, ctx.quantizers, ctx.execution, need_a, need_b)
    return (grad_a if need_a else None), (grad_b if need_b else None), None, None, None


grouped_matmul.register_autograd(_backward, setup_context=_save)
