"""One operand of a scaled GEMM: codes and scales quantized along the GEMM's reduction axis, which is
its last (SPEC sections 4 and 9).

Every GEMM of SPEC section 6 is ``X · Yᵀ`` with both operands laid out reduction-axis-last: the
forward's ``A [M, K]`` and ``B`` as ``[N, K]``, dgrad's ``dY [M, N]`` and ``B`` as ``[K, N]``,
wgrad's ``Aᵀ [K, M]`` and ``dYᵀ [N, M]``. That is row-major X times column-major Yᵀ, the one layout
cuBLASLt's FP8 GEMMs take, so a quantizer's output feeds them as it is. :func:`quantize_for_gemm` is
the reference (plain torch, through :mod:`qpass.formats`); the generated kernels write the same
codes and scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qpass.formats import QTensor, dequantize, quantize
from qpass.formats.delayed import DelayedScaling
from qpass.formats.packing import pack_codes, unpack_codes
from qpass.formats.scaling import AmaxReduction
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

# The element formats whose codes are torch dtypes that torch's scaled matmuls take.
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class GemmOperand:
    """``codes``: ``[..., R, K']``, K' the reduction axis zero-padded to whole blocks (fp4: two codes
    a byte, SPEC section 4), in an fp8 dtype for the fp8 formats and uint8 for the others.
    ``scales``: fp32 ``[]`` per tensor or ``[..., R, 1]`` per row; per block, ``[..., R, K'/block]``
    (fp32 absmax, E8M0 codes for MX, E4M3 codes for NVFP4). ``global_scale``: NVFP4's fp32 g.
    ``length``: K before padding."""

    codes: Tensor
    scales: Tensor
    global_scale: Tensor | None
    quantizer: Quantizer
    length: int

    @property
    def rows(self) -> int:
        return self.codes.shape[-2]

    def as_qtensor(self) -> QTensor:
        spec = self.quantizer.spec
        shape = torch.Size((*self.codes.shape[:-1], self.length))
        codes = self.codes.view(torch.uint8) if self.codes.dtype != torch.uint8 else self.codes
        return QTensor(codes, self.scales, spec, shape, len(shape) - 1, torch.float32, self.global_scale)

    def dequantize(self) -> Tensor:
        """fp32 ``[..., R, K]``: what every scaled GEMM multiplies."""
        return dequantize(self.as_qtensor())

    def nbytes(self) -> int:
        extra = 0 if self.global_scale is None else self.global_scale.nbytes
        return self.codes.nbytes + self.scales.nbytes + extra

    def flattened(self) -> GemmOperand:
        """The operand with its leading dims merged into R (a linear layer's tokens)."""
        if self.codes.ndim == 2:
            return self
        scales = self.scales if self.scales.ndim == 0 else self.scales.reshape(-1, self.scales.shape[-1])
        return GemmOperand(self.codes.reshape(-1, self.codes.shape[-1]), scales, self.global_scale,
                           self.quantizer, self.length)

    # A custom op takes tensors only: an operand crosses one as these three (g empty when absent).
    # Scales cross flat: a dynamic count of blocks per row may be 1, which a 2-D shape would make
    # torch.compile guard on (and recompile for).

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        g = self.codes.new_empty(0, dtype=torch.float32) if self.global_scale is None else self.global_scale
        return self.codes, self.scales.reshape(-1) if self.scales.ndim else self.scales, g

    @staticmethod
    def from_tensors(tensors, quantizer: Quantizer, length: int) -> GemmOperand:
        codes, scales, g = tensors
        scales = scales.reshape(*codes.shape[:-1], -1) if scales.ndim else scales
        return GemmOperand(codes, scales, g if quantizer.spec.scaling == "nvfp4" else None, quantizer, length)


def quantize_for_gemm(
    x: Tensor, quantizer: Quantizer, axis: int, delayed: DelayedScaling | None = None,
    rotation: Rotation | None = None, signs: Tensor | None = None, reduce_amax: AmaxReduction | None = None,
) -> GemmOperand:
    """``x`` (rotated along ``axis`` first, if asked) quantized along ``axis``, laid out with it last.

    The same values as ``quantizer(x, axis)``, random draws included (stochastic rounding consumes
    torch's default generator exactly as fake quantization does)."""
    x = x.detach()
    if rotation is not None:
        x = rotation(x.float(), axis, signs=signs)
    qt = quantize(x.movedim(axis, -1), quantizer.spec, -1, rounding=quantizer.rounding, delayed=delayed,
                  reduce_amax=reduce_amax)
    return from_qtensor(qt, quantizer)


def from_qtensor(qt: QTensor, quantizer: Quantizer) -> GemmOperand:
    """The operand of a QTensor whose codes lie quantization axis last (as quantize lays them out)."""
    dtype = TORCH_DTYPES.get(quantizer.spec.element.name)
    codes = qt.codes if dtype is None else qt.codes.view(dtype)
    return GemmOperand(codes, qt.scales, qt.tensor_scale, quantizer, qt.shape[qt.axis])


def transposed(op: GemmOperand) -> GemmOperand:
    """A per-tensor operand ``[..., R, K]`` as the operand ``[..., K, R]`` of the other GEMM: one scale
    for the whole tensor makes the codes along either axis the same codes."""
    if not op.quantizer.per_tensor:
        raise ValueError(f"only a per-tensor operand serves both orientations, not {op.quantizer}")
    element = op.quantizer.spec.element
    codes = unpack_codes(op.codes.view(torch.uint8), element)[..., :op.length].mT
    if element.bits == 4:  # two codes a byte along the new last axis, which packing needs even
        codes = pack_codes(torch.nn.functional.pad(codes, (0, codes.shape[-1] % 2)), element)
    return GemmOperand(codes.contiguous().view(op.codes.dtype), op.scales, op.global_scale, op.quantizer,
                       op.rows)


def empty_tensors(quantizer: Quantizer, shape, rotation: Rotation | None,
                  device) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialized :meth:`GemmOperand.tensors` of what :func:`quantize_for_gemm` returns for an ``x``
    whose shape, with the quantization axis moved last, is ``shape`` (for fake implementations)."""
    spec = quantizer.spec
    *rows, length = shape
    length = length if rotation is None else rotation.padded(length)
    padded = spec.padded_length(length)
    codes = torch.empty(*rows, padded // (2 if spec.element.bits == 4 else 1), device=device,
                        dtype=TORCH_DTYPES.get(spec.element.name, torch.uint8))
    per_tensor = spec.scaling == "absmax" and spec.granularity == "tensor"
    scales = torch.empty(() if per_tensor else (math.prod(rows) * (padded // spec.group_size(length)),),
                         device=device, dtype=torch.float32 if spec.scaling == "absmax" else torch.uint8)
    g = torch.empty((), device=device) if spec.scaling == "nvfp4" else torch.empty(0, device=device)
    return codes, scales, g
