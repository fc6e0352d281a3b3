"""QTensor: quantized values (packed codes) together with their scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.formats.spec import FP32_BITS, FormatSpec, scale_bits


@dataclass
class QTensor:
    """A tensor stored as element codes times scales.

    ``codes`` and ``scales`` are laid out with the quantization axis last (``axis`` says where it
    was), zero-padded along it to the block size (or to even length for fp4 packing):
    codes ``[..., K_padded]`` (fp4: ``[..., K_padded / 2]``, two per byte), scales per group:
    ``[]`` for tensor, ``[..., 1]`` for channel, ``[..., K_padded / block]`` for blocks.
    """

    codes: torch.Tensor  # uint8
    scales: torch.Tensor  # absmax: fp32 decode scales; MX: uint8 E8M0; NVFP4: uint8 E4M3
    format: FormatSpec
    shape: torch.Size  # of the original tensor
    axis: int  # non-negative index into ``shape``
    dtype: torch.dtype  # of the original tensor; dequantize returns it
    tensor_scale: torch.Tensor | None = None  # NVFP4's fp32 per-tensor scale g

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def storage_bits(self) -> int:
        """Bits of storage: elements at their logical width plus every scale."""
        element_bits = self.format.element.bits * self.numel
        total_scale_bits = self.scales.numel() * scale_bits(self.format)
        if self.tensor_scale is not None:
            total_scale_bits += FP32_BITS
        return element_bits + total_scale_bits

    def bits_per_element(self) -> float:
        return self.storage_bits() / self.numel
