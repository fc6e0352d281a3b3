"""Storage layout of element codes (SPEC section 4).

fp4: two codes per byte, element 2i in the low nibble and 2i+1 in the high nibble (the
``torch.float4_e2m1fn_x2`` convention). fp6, fp8 and int8: one code per byte (fp6 in the low six
bits). Packing is along the last axis, which quantization has already made even for fp4.
"""

from __future__ import annotations

import torch

from qpass.formats.element import ElementFormat


def pack_codes(codes: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    if element.bits != 4:
        return codes
    if codes.shape[-1] % 2:
        raise ValueError(f"fp4 packing needs an even last axis, got {codes.shape[-1]}")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    if element.bits != 4:
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
