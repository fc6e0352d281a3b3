"""Quantized forms of the matmul-like functions: what a rewritten site calls.

Each takes the original op's arguments plus the :class:`~qpass.ops.MatmulQuantizers` of its
product(s) as JSON, and is built on one function, :func:`product`. Graphs call these functions, so
AOTAutograd and torch.export trace them into the :mod:`qpass.ops` custom ops:

- a product whose recipe quantizes nothing in backward (inference) becomes QDQ nodes (after
  ``qpass::rotate`` nodes where the recipe rotates) and a plain matmul, with a straight-through
  backward;
- a training product becomes one ``qpass::quantized_matmul`` (SPEC section 6 backward), preceded by
  QDQ nodes for operands quantized the same per-tensor way in both their GEMMs: quantized once and
  saved quantized, as Transformer Engine does (and where delayed scaling records their amax).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from qpass.ops import MatmulQuantizers
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation


def rotate(x: Tensor, rotation: Rotation | None, axis: int) -> Tensor:
    return x if rotation is None else torch.ops.qpass.rotate(x, rotation.to_json(), axis, False)


def qdq(
    x: Tensor, quantizer: Quantizer | None, axis: int, state: str = "", rotation: Rotation | None = None,
    kernels: bool = False,
) -> Tensor:
    """``x`` rotated (if asked), then quantize-dequantized; with ``kernels``, both in one generated
    kernel (a delayed-scaling state keeps the reference op, which owns the amax history)."""
    if kernels and quantizer is not None and not state:
        return torch.ops.qpass.fake_quantize_kernel(x, quantizer.to_json(), axis, rotation.to_json() if rotation else "")
    x = rotate(x, rotation, axis)
    if quantizer is None:
        return x
    return torch.ops.qpass.quantize_dequantize(x, quantizer.to_json(), axis, state)


@functools.lru_cache(maxsize=None)
def _without_hoisted(quantizers: str) -> tuple[MatmulQuantizers, str | None]:
    """The product's quantizers, and the op's config once hoisted operands are taken out (None: no op)."""
    q = MatmulQuantizers.from_json(quantizers)
    inner = q
    if q.hoists_a:
        inner = replace(inner, a=None, db_a=None, a_state="")
    if q.hoists_b:
        inner = replace(inner, b=None, da_b=None, b_state="")
    return q, (inner.to_json() if any((inner.a, inner.b, inner.quantizes_backward)) else None)


def product(a: Tensor, b: Tensor, quantizers: str) -> Tensor:
    """``A [..., M, K] · B [..., K, N]`` quantized as ``quantizers`` (MatmulQuantizers JSON) says."""
    q, op_config = _without_hoisted(quantizers)
    if not q.quantizes_backward:
        a = qdq(a, q.a, -1, q.a_state, q.rotation, q.kernels)
        return torch.matmul(a, qdq(b, q.b, -2, q.b_state, q.rotation, q.kernels))
    if q.hoists_a:
        a = qdq(a, q.a, -1, q.a_state, kernels=q.kernels)
    if q.hoists_b:
        b = qdq(b, q.b, -2, q.b_state, kernels=q.kernels)
    return torch.matmul(a, b) if op_config is None else torch.ops.qpass.quantized_matmul(a, b, op_config)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, quantizers: str) -> Tensor:
    out = product(input, weight.mT, quantizers)
    return out if bias is None else out + bias


def addmm(bias: Tensor, a: Tensor, b: Tensor, beta, alpha, quantizers: str) -> Tensor:
    """``beta · bias + alpha · (A · B)``, for ``addmm`` and ``baddbmm`` alike."""
    return torch.add(bias if beta == 1 else bias * beta, product(a, b, quantizers), alpha=alpha)


@functools.lru_cache(maxsize=None)
def _einsum_layout(equation: str) -> tuple[str, str, str, str, str]:
    """(batch, a-only, contracted, b-only, output) index strings of a batched-matmul einsum."""
    inputs, out = equation.replace(" ", "").split("->")
    a, b = inputs.split(",")
    batch = "".join(i for i in a if i in b and i in out)
    contracted = "".join(i for i in a if i in b and i not in out)
    return batch, "".join(i for i in a if i not in b), contracted, "".join(i for i in b if i not in a), out


def einsum(equation: str, a: Tensor, b: Tensor, quantizers: str) -> Tensor:
    """A two-operand einsum as ``[batch, M, K] · [batch, K, N]`` (K: all contracted indices)."""
    batch, free_a, contracted, free_b, out = _einsum_layout(equation)
    in_a, in_b = equation.replace(" ", "").split("->")[0].split(",")
    size = {i: a.shape[in_a.index(i)] for i in in_a} | {i: b.shape[in_b.index(i)] for i in in_b}

    def arrange(x, term, groups):
        x = x.permute([term.index(i) for group in groups for i in group])
        return x.reshape([size[i] for i in groups[0]] + [math.prod(size[i] for i in g) for g in groups[1:]])

    y = product(arrange(a, in_a, (batch, free_a, contracted)), arrange(b, in_b, (batch, contracted, free_b)), quantizers)
    produced = batch + free_a + free_b
    y = y.reshape([size[i] for i in produced])
    return y.permute([produced.index(i) for i in out])


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *, qk: str, pv: str,
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
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probabilities = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probabilities = F.dropout(probabilities, dropout_p)
    return product(probabilities, value, pv)
