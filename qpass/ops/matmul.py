"""``qpass::quantized_matmul``: ``Q(A) · Q(B)`` by scaled GEMMs, with a backward that runs the dgrad
and wgrad GEMMs of SPEC section 6, and what backward needs saved in low precision.

``A [..., M, K] · B [..., K, N]``; each GEMM quantizes its operands along its own reduction axis
(:mod:`qpass.ops.gemm` multiplies them): the forward ``A along K · B along K``, dgrad
``dY along N · B along N``, wgrad ``A along M · dY along M``. ``qpass::gemm_operand`` nodes quantize
the forward's operands before the product (equal nodes are one after the graph's CSE), and A and B
for their backward GEMMs too wherever the forward's inputs fix that quantization (no stochastic
rounding, no signs drawn in backward, no estimator that needs the input): backward is saved those
codes and scales instead of A and B. An operand quantized per tensor the same way in both its GEMMs
is quantized once, and its codes serve both (transposed for the other). The quantizers and the
execution come as JSON (:class:`~qpass.matmul_quantizers.MatmulQuantizers`,
:class:`~qpass.execution.Execution`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qpass.distributed import amax_reduction
from qpass.execution import Execution
from qpass.fsdp import gathered_operand
from qpass.gemm_operand import GemmOperand, empty_tensors, from_qtensor, quantize_for_gemm, transposed
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops import qdq
from qpass.ops.gemm import Operand, route, scaled_gemm
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def operand(
    quantizer: Quantizer | None, x: Tensor, axis: int, state: str = "", rotation: Rotation | None = None,
    signs: Tensor | None = None, kernels: bool = False, values: bool = False, sync: bool = False,
) -> Operand:
    """``x`` (rotated first, if asked) quantized along ``axis`` for a GEMM, that axis moved last; a
    high-precision operand is ``x``'s fp32 values so moved. ``kernels``: by the generated Triton
    kernel (the lowering chose it: never with a ``state``). ``values``: for a GEMM that multiplies
    values (the reference route), the fake-quantized fp32 values, which are the codes' values (and
    the same random draws) without encoding and decoding them. ``sync``: a per-tensor amax is the
    MAX across data-parallel ranks (:mod:`qpass.distributed`)."""
    gathered = None if quantizer is None else gathered_operand(x, quantizer, axis)

    if gathered is not None:  # a weight FSDP2 all-gathered as these codes
        return gathered.dequantize() if values else gathered
    reduce_amax = amax_reduction(sync)
    if quantizer is None or (values and not kernels):
        x = x.detach().float()
        x = x if rotation is None else rotation(x, axis, signs=signs)
        x = x if quantizer is None else quantizer(x, axis, qdq.delayed_state(state, x.device), reduce_amax)
        return x.movedim(axis, -1)
    if kernels:
        from qpass import codegen  # imports triton: only once kernels were chosen

        return from_qtensor(codegen.quantize(x.detach(), quantizer, axis, rotation, signs), quantizer)
    return quantize_for_gemm(x, quantizer, axis, qdq.delayed_state(state, x.device), rotation, signs,
                             reduce_amax)


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


def saved_in_low_precision(q: MatmulQuantizers, run: Execution) -> tuple[bool, bool]:
    """Whether backward gets A's wgrad operand and B's dgrad operand from the forward (else A, B):
    where the execution asks for codes and the forward can quantize them; always for an operand
    quantized once for both its GEMMs by random draws, which a second quantization would not repeat."""
    def saves(shares: bool, fixed: bool, codes: bool, forward: Quantizer | None) -> bool:
        drawn = shares and forward.rounding == "stochastic"
        return drawn or (codes and (shares or fixed))

    return (saves(q.shares_a, _fixed(q.db_a, q.db_rotation, q.a), run.a_codes, q.a),
            saves(q.shares_b, _fixed(q.da_b, q.da_rotation, q.b), run.b_codes, q.b))


def _wgrad_input(a: Tensor, b: Tensor) -> Tensor:
    """A as wgrad multiplies it: with a weight B shared by every row, all of A's rows are one M."""
    return a.reshape(-1, a.shape[-1]) if b.ndim == 2 else a


def _lengths(q: MatmulQuantizers, m: int, n: int) -> tuple[int, int]:
    """The reduction lengths of wgrad (M) and dgrad (N), as their rotations pad them."""
    return (m if q.db_rotation is None else q.db_rotation.padded(m),
            n if q.da_rotation is None else q.da_rotation.padded(n))


def operand_tensors(x: Tensor, quantizer: str, axis: int, rotation: str, state: str, kernels: bool,
                    values: bool, sync: bool = False) -> list[Tensor]:
    """``x`` quantized along ``axis`` for a GEMM, as :meth:`GemmOperand.tensors` (``values``: its
    fp32 values alone, :func:`operand`)."""
    r = Rotation.from_json(rotation) if rotation else None
    op = operand(Quantizer.from_json(quantizer), x, axis, state, r, kernels=kernels, values=values, sync=sync)
    return [op.contiguous()] if isinstance(op, Tensor) else list(op.tensors())


def _gemm_operand_fake(x, quantizer, axis, rotation, state, kernels, values, sync=False):
    r = Rotation.from_json(rotation) if rotation else None
    shape = list(x.movedim(axis, -1).shape)
    if values and not kernels:
        shape[-1] = shape[-1] if r is None else r.padded(shape[-1])
        return [x.new_empty(shape, dtype=torch.float32)]
    return list(empty_tensors(Quantizer.from_json(quantizer), shape, r, x.device))


# Two ops of one implementation: equal calls of the first are one (the graph's CSE quantizes an
# activation that several products share once: Q, K and V's input); the second draws random numbers,
# so that each call stays its own.
gemm_operand = torch.library.custom_op("qpass::gemm_operand", operand_tensors, mutates_args=())
gemm_operand_stochastic = torch.library.custom_op(
    "qpass::gemm_operand_stochastic", operand_tensors, mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,))
gemm_operand.register_fake(_gemm_operand_fake)
gemm_operand_stochastic.register_fake(_gemm_operand_fake)


def quantize_ahead(quantizer: Quantizer | None, x: Tensor, axis: int, kernels: bool, state: str = "",
                   rotation: Rotation | None = None, values: bool = False,
                   sync: bool = False) -> list[Tensor]:
    """The graph node that quantizes ``x`` for one of the product's GEMMs (nothing: high precision;
    ``values``: see :func:`operand`)."""
    if quantizer is None:
        return []
    op = gemm_operand_stochastic if quantizer.rounding == "stochastic" else gemm_operand
    # Detached: codes and scales carry no gradient; the product's backward is the gradient of x.
    return list(op(x.detach(), quantizer.to_json(), axis,
                   rotation.to_json() if rotation else "", state, kernels, values, sync))


def multiplies_values(x: Quantizer | None, y: Quantizer | None, tensor: Tensor, batched: bool) -> bool:
    """The GEMM of operands so quantized runs the reference: it multiplies their values."""
    return route(x, y, tensor.device, batched).startswith("reference")


def _from_tensors(tensors: list[Tensor], quantizer: Quantizer | None, x: Tensor, axis: int,
                  rotation: Rotation | None) -> Operand:
    """The operand the graph quantized (codes and scales, or its values alone), or ``x`` in high
    precision."""
    if not tensors:
        return operand(None, x, axis, rotation=rotation)
    if len(tensors) == 1:
        return tensors[0]
    length = x.shape[axis] if rotation is None else rotation.padded(x.shape[axis])
    return GemmOperand.from_tensors(tensors, quantizer, length)


def fprop(a: Tensor, b: Tensor, a_k: list[Tensor], b_k: list[Tensor], a_saved: list[Tensor],
             b_saved: list[Tensor], quantizers: str, execution: str) -> Tensor:
    """fprop ``Q(A along K) · Q(B along K)`` in ``a``'s dtype, from the operands the graph quantized
    (``a_k``, ``b_k``; empty: high precision). ``a_saved``, ``b_saved``: what backward is saved of A
    and B (empty: A and B themselves)."""
    q = MatmulQuantizers.from_json(quantizers)
    return scaled_gemm(_from_tensors(a_k, q.a, a, -1, q.rotation), _from_tensors(b_k, q.b, b, -2, q.rotation),
                       a.dtype)


# The ops' implementations are plain functions too: a test runs them under a dispatch mode.
_forward = torch.library.custom_op("qpass::quantized_matmul", fprop, mutates_args=())


@_forward.register_fake
def _(a, b, a_k, b_k, a_saved, b_saved, quantizers, execution):
    return torch.matmul(a, b)  # a rotation pads K alike on both sides: the shape is unchanged


def quantized_matmul(a: Tensor, b: Tensor, quantizers: str, execution: str) -> Tensor:
    """``Q(A) · Q(B)``, differentiable by SPEC section 6: the operands quantized by graph nodes before
    the product, with those that backward can use saved for it."""
    q, run = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution)
    kernels = run.kernels
    save_a, save_b = saved_in_low_precision(q, run)
    # Each saved operand serves the gradient of the *other* operand.
    grad = torch.is_grad_enabled()
    save_a, save_b = save_a and grad and b.requires_grad, save_b and grad and a.requires_grad
    values = multiplies_values(q.a, q.b, a, b.ndim > 2)
    a_k = quantize_ahead(q.a, a, -1, kernels, run.a_state, q.rotation, values and not (q.shares_a and save_a),
                         run.sync_a)
    b_k = quantize_ahead(q.b, b, -2, kernels, run.b_state, q.rotation, values and not (q.shares_b and save_b),
                         run.sync_b)
    a_saved = b_saved = []
    if save_a:
        a_saved = a_k if q.shares_a else quantize_ahead(q.db_a, _wgrad_input(a, b), -2, kernels,
                                                          rotation=q.db_rotation, sync=run.sync_a)
    if save_b:
        b_saved = b_k if q.shares_b else quantize_ahead(q.da_b, b, -1, kernels, rotation=q.da_rotation,
                                                          sync=run.sync_b)
    return torch.ops.qpass.quantized_matmul(a, b, a_k, b_k, a_saved, b_saved, quantizers, execution)


def backward_gemms(
    grad: Tensor, a: Tensor, b: Tensor, a_saved: list[Tensor], b_saved: list[Tensor], a_shape: list[int],
    b_shape: list[int], a_dtype: torch.dtype, b_dtype: torch.dtype, quantizers: str, execution: str,
    need_a: bool, need_b: bool,
) -> tuple[Tensor, Tensor]:
    """dgrad ``dA = Q(dY along N) · Q(B along N)ᵀ`` and wgrad ``dB = Q(A along M)ᵀ · Q(dY along M)``.

    ``a``, ``b``: the forward's inputs, or empty where the forward saved their backward operands
    (``a_saved``, ``b_saved``: codes, scales, global scale); the gradients come in ``a_dtype`` and
    ``b_dtype``. When B is a matrix shared by every batch entry (a linear layer's weight), M is all
    of A's leading dimensions flattened; otherwise each batch entry has its own M. Gradients not
    needed come back empty. An operand whose forward quantizer has a DGE gets its gradient reshaped
    by it. Random draws (resampled rotation signs, stochastic rounding) come from torch's default
    generators in this order: a shared dY; dgrad's signs, dY, B; wgrad's signs, dY, A.
    """
    q, run = MatmulQuantizers.from_json(quantizers), Execution.from_json(execution)
    m_length, n_length = _lengths(q, math.prod(grad.shape[:-1]) if len(b_shape) == 2 else grad.shape[-2],
                                  grad.shape[-1])
    kernels, accumulated = run.kernels, torch.promote_types(grad.dtype, torch.float32)
    batched = len(b_shape) > 2
    dgrad_values = multiplies_values(q.da_grad, q.da_b, grad, batched)
    wgrad_values = multiplies_values(q.db_a, q.db_grad, grad, batched)
    shared = (operand(q.da_grad, grad, -1, run.grad_state, kernels=kernels,
                      values=dgrad_values and wgrad_values, sync=run.sync_grad) if q.shares_grad else None)
    grad_a = grad_b = grad.new_empty(0)
    if need_a:
        signs = qdq.draw_signs(q.da_rotation, grad.shape[-1])
        dy = shared if shared is not None else operand(
            q.da_grad, grad, -1, rotation=q.da_rotation, signs=signs, kernels=kernels, values=dgrad_values,
            sync=run.sync_grad)
        if q.shares_b and b_saved:  # the forward's B along K, one scale: the same codes transposed
            b_n = _other_orientation(GemmOperand.from_tensors(b_saved, q.b, b_shape[-2]), False)
        elif b_saved:
            b_n = GemmOperand.from_tensors(b_saved, q.da_b, n_length)
        else:
            b_n = operand(q.da_b, b, -1, rotation=q.da_rotation, signs=signs, kernels=kernels,
                          values=dgrad_values, sync=run.sync_b)
        grad_a = scaled_gemm(dy, b_n, accumulated).sum_to_size(a_shape)
        grad_a = (grad_a if q.a is None else q.a.gradient(grad_a, a, -1)).to(a_dtype)
    if need_b:
        if len(b_shape) == 2:
            grad = grad.reshape(-1, grad.shape[-1])
        signs = qdq.draw_signs(q.db_rotation, grad.shape[-2])
        dy = (_other_orientation(shared, len(b_shape) == 2) if shared is not None
              else operand(q.db_grad, grad, -2, rotation=q.db_rotation, signs=signs, kernels=kernels,
                           values=wgrad_values, sync=run.sync_grad))
        if q.shares_a and a_saved:
            a_m = _other_orientation(GemmOperand.from_tensors(a_saved, q.a, a_shape[-1]), len(b_shape) == 2)
        elif a_saved:
            a_m = GemmOperand.from_tensors(a_saved, q.db_a, m_length)
        else:
            a_m = operand(q.db_a, a.reshape(-1, a.shape[-1]) if len(b_shape) == 2 else a, -2,
                          rotation=q.db_rotation, signs=signs, kernels=kernels, values=wgrad_values,
                          sync=run.sync_a)
        grad_b = scaled_gemm(a_m, dy, accumulated).sum_to_size(b_shape)
        grad_b = (grad_b if q.b is None else q.b.gradient(grad_b, b, -2)).to(b_dtype)
    return grad_a, grad_b


_backward = torch.library.custom_op("qpass::quantized_matmul_backward", backward_gemms, mutates_args=())


@_backward.register_fake
def _(grad, a, b, a_saved, b_saved, a_shape, b_shape, a_dtype, b_dtype, quantizers, execution,
      need_a, need_b):
    return (grad.new_empty(a_shape, dtype=a_dtype) if need_a else grad.new_empty(0),
            grad.new_empty(b_shape, dtype=b_dtype) if need_b else grad.new_empty(0))


def _save(ctx, inputs, output):
    a, b, a_k, b_k, a_saved, b_saved, ctx.quantizers, ctx.execution = inputs
    ctx.a_shape, ctx.b_shape, ctx.dtypes = list(a.shape), list(b.shape), [a.dtype, b.dtype]
    ctx.list_lengths = len(a_k), len(b_k), len(a_saved), len(b_saved)
    # A and B themselves only where backward cannot do with what the forward quantized for it: the
    # other operand's gradient without a saved operand, or its own through an estimator.
    q = MatmulQuantizers.from_json(ctx.quantizers)
    need_a, need_b = ctx.needs_input_grad[:2]
    keep_a = (need_b and not a_saved) or (need_a and q.a is not None and q.a.dge is not None)
    keep_b = (need_a and not b_saved) or (need_b and q.b is not None and q.b.dge is not None)
    ctx.save_for_backward(a if keep_a else None, b if keep_b else None, *a_saved, *b_saved)


def _matmul_backward(ctx, grad):
    a, b, *saved = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    empty = grad.new_empty(0)
    count_a = ctx.list_lengths[2]
    grad_a, grad_b = torch.ops.qpass.quantized_matmul_backward(
        grad, empty if a is None else a, empty if b is None else b, saved[:count_a], saved[count_a:],
        ctx.a_shape, ctx.b_shape, *ctx.dtypes, ctx.quantizers, ctx.execution, need_a, need_b)
    # Nothing for the operands' codes and scales (lists, answered element by element) and configs.
    return (grad_a.contiguous() if need_a else None, grad_b.contiguous() if need_b else None,
            *([None] * n for n in ctx.list_lengths), None, None)


_forward.register_autograd(_matmul_backward, setup_context=_save)
