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


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """fp6 codes four to three bytes (a 24-bit little-endian word, code i in bits 6i..6i+5), the
    last axis zero-padded to a multiple of 4: the dense storage of an ONNX export."""
    padded = torch.nn.functional.pad(codes, (0, -codes.shape[-1] % 4)).to(torch.int32)
    quads = padded.reshape(*codes.shape[:-1], -1, 4)
    word = quads[..., 0] | quads[..., 1] << 6 | quads[..., 2] << 12 | quads[..., 3] << 18
    packed = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1).to(torch.uint8)
    return packed.reshape(*codes.shape[:-1], -1)


def unpack_fp6(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp6`: the first ``length`` codes of the last axis."""
    triples = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
    word = triples[..., 0] | triples[..., 1] << 8 | triples[..., 2] << 16
    codes = torch.stack([(word >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=-1).to(torch.uint8)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]
