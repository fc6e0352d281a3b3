"""Quantized forms of the matmul-like functions: what a rewritten site calls (the op-kind table's
replacements).

Each takes the original op's arguments plus, per product, its config: the JSON of its
:class:`~qpass.matmul_quantizers.MatmulQuantizers` and of its :class:`~qpass.execution.Execution`.
All are built on one function, :func:`product`. Graphs call these functions, so AOTAutograd and
torch.export trace them into the :mod:`qpass.ops` custom ops:

- a product whose recipe quantizes nothing in backward (inference) becomes QDQ nodes (after
  ``qpass::rotate`` nodes where the recipe rotates) and a plain matmul, with a straight-through
  backward;
- a training product becomes ``qpass::gemm_operand`` nodes and one ``qpass::quantized_matmul``
  (SPEC section 6 backward, :mod:`qpass.ops.matmul`), which saves for backward the operands' codes;
  only a recipe whose backward reuses the forward's quantized operands (``reuse_forward``) puts QDQ
  nodes before the product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qpass.einsum import einsum_layout
from qpass.execution import ProductConfig, without_hoisted
from qpass.ops.matmul import quantized_matmul
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def rotate(x: Tensor, rotation: Rotation | None, axis: int) -> Tensor:
    return x if rotation is None else torch.ops.qpass.rotate(x, rotation.to_json(), axis, False)


def qdq(
    x: Tensor, quantizer: Quantizer | None, axis: int, state: str = "", rotation: Rotation | None = None,
    kernels: bool = False, sync: bool = False,
) -> Tensor:
    """``x`` rotated (if asked), then quantize-dequantized; with ``kernels``, both in one generated
    kernel (the lowering never chooses kernels with a delayed-scaling state, which the reference owns)."""
    if kernels and quantizer is not None:
        return torch.ops.qpass.fake_quantize_kernel(
            x, quantizer.to_json(), axis, rotation.to_json() if rotation else "")
    x = rotate(x, rotation, axis)
    if quantizer is None:
        return x
    return torch.ops.qpass.quantize_dequantize(x, quantizer.to_json(), axis, state, sync)


def product(a: Tensor, b: Tensor, config: ProductConfig) -> Tensor:
    """``A [..., M, K] · B [..., K, N]`` quantized as ``config`` says."""
    q, run, op_config = without_hoisted(config)
    if not q.quantizes_backward:
        a = qdq(a, q.a, -1, run.a_state, q.rotation, run.kernels, run.sync_a)
        # A stored weight is laid out as qdq's output would be (contiguous), so that the matmul runs the
        # same kernel and sums in the same order.
        if run.b_stored:
            b = b.contiguous()
        else:
            b = qdq(b, q.b, -2, run.b_state, q.rotation, run.kernels, run.sync_b)
        return torch.matmul(a, b)
    if q.hoists_a:
        a = qdq(a, q.a, -1, run.a_state, kernels=run.kernels, sync=run.sync_a)
    if q.hoists_b:
        b = qdq(b, q.b, -2, run.b_state, kernels=run.kernels, sync=run.sync_b)
    return torch.matmul(a, b) if op_config is None else quantized_matmul(a, b, *op_config)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, config: ProductConfig) -> Tensor:
    out = product(input, weight.mT, config)
    return out if bias is None else out + bias


def addmm(bias: Tensor, a: Tensor, b: Tensor, beta, alpha, config: ProductConfig) -> Tensor:
    """``beta · bias + alpha · (A · B)``, for ``addmm`` and ``baddbmm`` alike."""
    return torch.add(bias if beta == 1 else bias * beta, product(a, b, config), alpha=alpha)


def grouped_mm(input: Tensor, mat2: Tensor, offs: Tensor, config: ProductConfig) -> Tensor:
    """``torch._grouped_mm(input [S, K], mat2 [E, K, N], offs)``, each expert's product quantized on
    its own (:mod:`qpass.ops.grouped`)."""
    return torch.ops.qpass.grouped_matmul(input, mat2, offs, *config)


def token_bmm(input: Tensor, weight: Tensor, index: Tensor, layout: str, config: ProductConfig) -> Tensor:
    """A per-token bmm of the weights its expert ids gather, ``bmm(weight[index], input)`` (layout
    "nk": weight ``[E, N, K]``, input ``[S, K, 1]``) or ``bmm(input, weight[index])`` ("kn": ``[E, K, N]``,
    ``[S, 1, K]``), as the grouped GEMM of the tokens sorted by expert (in their order within an
    expert), then put back in order."""
    tokens = input.reshape(index.shape[0], -1)
    order = torch.argsort(index, stable=True)
    counts = torch.zeros(weight.shape[0], dtype=torch.int64, device=index.device)
    offs = torch.cumsum(counts.scatter_add(0, index, torch.ones_like(index)), 0).to(torch.int32)
    experts = weight.mT if layout == "nk" else weight
    out = torch.ops.qpass.grouped_matmul(tokens[order], experts, offs, *config)
    out = out[torch.argsort(order)]
    return out.unsqueeze(-1) if layout == "nk" else out.unsqueeze(1)


def expert_bmm(input: Tensor, other: Tensor, config: ProductConfig) -> Tensor:
    """``[E, C, K] · [E, K, N]``: expert ``e``'s C tokens times its matrix, as the grouped GEMM of
    equal groups."""
    experts, capacity = other.shape[0], input.shape[-2]
    offs = torch.arange(1, experts + 1, dtype=torch.int32, device=input.device) * capacity
    out = torch.ops.qpass.grouped_matmul(input.reshape(-1, input.shape[-1]), other, offs, *config)
    return out.reshape(*input.shape[:-1], other.shape[-1])


def einsum(equation: str, a: Tensor, b: Tensor, config: ProductConfig) -> Tensor:
    """A two-operand einsum as ``[batch, M, K] · [batch, K, N]`` (K: all contracted indices)."""
    layout = einsum_layout(equation)
    size = ({i: a.shape[layout.a.index(i)] for i in layout.a}
            | {i: b.shape[layout.b.index(i)] for i in layout.b})

    def arrange(x, term, groups):
        x = x.permute([term.index(i) for group in groups for i in group])
        return x.reshape([size[i] for i in groups[0]] + [math.prod(size[i] for i in g) for g in groups[1:]])

    a = arrange(a, layout.a, (layout.batch, layout.free_a, layout.contracted))
    y = product(a, arrange(b, layout.b, (layout.batch, layout.contracted, layout.free_b)), config)
    produced = layout.batch + layout.free_a + layout.free_b
    y = y.reshape([size[i] for i in produced])
    return y.permute([produced.index(i) for i in layout.out])


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    qk: ProductConfig, pv: ProductConfig,
) -> Tensor:
    """SDPA decomposed (as torch's math reference) so that Q·Kᵀ and P·V are quantized products."""
    if enable_gqa:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = product(query, key.mT, qk) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    probabilities = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probabilities = F.dropout(probabilities, dropout_p)
    return product(probabilities, value, pv)
