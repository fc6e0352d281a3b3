"""Hadamard rotations of GEMM operands along their reduction axis, and how recipes ask for them.

For an orthogonal ``R``, ``A · B = (A · R) · (Rᵀ · B)``: rotating both operands of a GEMM along the
axis it reduces leaves the product unchanged and spreads outliers over the rotated block, so a
low-bit format loses far less (QuaRot, Quartet, Transformer Engine's NVFP4 recipe). A
:class:`Rotation` is one such ``R``: block-diagonal Hadamard of 16/32/64/128, or full size, each
with an optional fixed ±1 sign vector (random from a seed, or given). A length that the block does
not divide is zero-padded to the next multiple: ``pad(A)·R · Rᵀ·pad(B)`` is still ``A · B``.

:class:`Hadamard` is a recipe's choice: a rotation per GEMM (``fprop``, ``dgrad``, ``wgrad``) and
whether to rotate a Llama-style residual stream (:mod:`qpass.passes.residual`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from qpass.hadamard import hadamard_size_supported, hadamard_transform, random_signs
from qpass.jsontuple import JsonTuple

BLOCK_SIZES = (16, 32, 64, 128)
GEMMS = ("fprop", "dgrad", "wgrad")
NAMES = (*(f"block{size}" for size in BLOCK_SIZES), "full", "residual")


@dataclass(frozen=True)
class Rotation(JsonTuple):
    block: int | None = 32  # None: one Hadamard of the whole axis
    seed: int | None = None  # a random ±1 sign vector from this seed
    signs: tuple[int, ...] | None = None  # or this sign vector (one block's length)
    # Or fresh random signs at every call, from torch's default CPU generator (Quartet's backward):
    # the caller draws them once per GEMM (draw_signs) and passes them for both operands.
    resample: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.signs, list):  # JSON has no tuples
            object.__setattr__(self, "signs", tuple(self.signs))
        if self.block is not None and self.block not in BLOCK_SIZES:
            raise ValueError(
                f"Hadamard block size {self.block} is not one of {BLOCK_SIZES} (or None for full size)"
            )
        if sum((self.seed is not None, self.signs is not None, self.resample)) > 1:
            raise ValueError("a Rotation takes one of seed= (fixed random signs), signs= and resample=True")
        if self.signs is not None:
            if set(self.signs) - {1, -1}:
                raise ValueError(f"signs must be ±1, got {self.signs}")
            if self.block is not None and len(self.signs) != self.block:
                raise ValueError(f"{len(self.signs)} signs for a {self.block}-point block")

    @staticmethod
    def parse(value) -> Rotation | None:
        """A Rotation from ``"block16"``..``"block128"``, ``"full"``, a Rotation, or None."""
        if value is None or isinstance(value, Rotation):
            return value
        if value == "full":
            return Rotation(None)
        if (
            isinstance(value, str) and value.startswith("block") and value[5:].isdigit()
            and int(value[5:]) in BLOCK_SIZES
        ):
            return Rotation(int(value[5:]))
        raise ValueError(
            f"unknown rotation {value!r}; expected one of {', '.join(NAMES[:-1])}, a qpass.Rotation or None"
        )

    def padded(self, length: int) -> int:
        """The rotated length: ``length`` rounded up to a whole number of blocks."""
        return length if self.block is None else math.ceil(length / self.block) * self.block

    @functools.lru_cache(maxsize=None)  # noqa: B019 -- rotations are few and live as long as recipes
    def sign_vector(self, length: int) -> Tensor | None:
        """The ±1 vector applied before the Hadamard (one block's, or the whole axis' when full)."""
        if self.signs is not None:
            return torch.tensor(self.signs, dtype=torch.float32)
        return None if self.seed is None else random_signs(self.block or length, self.seed)

    def draw_signs(self, length: int) -> Tensor:
        """A fresh ±1 vector for a ``resample`` rotation of an axis of ``length``."""
        return torch.randint(0, 2, (self.block or self.padded(length),)).float() * 2 - 1

    def __call__(self, x: Tensor, axis: int, inverse: bool = False, signs: Tensor | None = None) -> Tensor:
        """``x · R`` along ``axis`` (``x · Rᵀ`` for ``inverse``), zero-padding the axis to whole blocks;
        ``signs`` are a ``resample`` rotation's signs for this call."""
        x = x.movedim(axis, -1)
        length = x.shape[-1]
        if self.padded(length) != length:
            x = torch.nn.functional.pad(x, (0, self.padded(length) - length))
        if self.resample != (signs is not None):
            raise ValueError(
                "signs= are given for a resample=True rotation (from draw_signs), and only for one"
            )
        signs = self.sign_vector(length) if signs is None else signs
        out = hadamard_transform(
            x, self.block, None if signs is None else signs.to(x.device), inverse=inverse
        )
        return out.movedim(-1, axis)

    def __str__(self) -> str:
        name = "full" if self.block is None else f"block{self.block}"
        sign = f", seed={self.seed}" if self.seed is not None else (", signs" if self.signs else "")
        sign += ", resampled" if self.resample else ""
        return f"hadamard-{name}{sign}"


def resolve(rotation: Rotation, length: int | None) -> tuple[Rotation, str | None]:
    """``rotation`` for an axis of ``length`` (None: not static), and a warning when it cannot be
    applied as asked.

    A full-size rotation of a length with no known Hadamard matrix falls back to the largest block
    that divides it, or, with none (or no static length, like a weight gradient's tokens), to
    32-point blocks of the zero-padded axis."""
    if rotation.block is not None or (length is not None and hadamard_size_supported(length)):
        return rotation, None
    divides = [size for size in BLOCK_SIZES if length is not None and length % size == 0]
    block = divides[-1] if divides else 32
    fallback = replace(rotation, block=block, signs=rotation.signs[:block] if rotation.signs else None)
    if length is None:
        return fallback, "the reduction length is not static: using 32-point blocks of the zero-padded axis"
    padding = "" if divides else f" of the zero-padded axis ({fallback.padded(length)})"
    return fallback, f"no full-size Hadamard of size {length} is known: using {block}-point blocks{padding}"


@dataclass(frozen=True)
class Hadamard:
    """A recipe's rotations: one per GEMM (None: not rotated), and the residual-stream rotation."""

    fprop: Rotation | None = None
    dgrad: Rotation | None = None
    wgrad: Rotation | None = None
    residual: Rotation | None = None  # QuaRot-style; its block is None (full size) unless it falls back

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @staticmethod
    def parse(value) -> Hadamard:
        """The ``hadamard=`` override: None, a name (``"block32"``, ``"full"``, ``"residual"``), a
        Rotation (every GEMM), a list of a name and ``"residual"``, or a dict ``{gemm: rotation}``
        (keys ``fprop``, ``dgrad``, ``wgrad``, ``residual``)."""
        if value is None or isinstance(value, Hadamard):
            return value or Hadamard()
        if isinstance(value, dict):
            unknown = set(value) - {*GEMMS, "residual"}
            if unknown:
                raise ValueError(
                    f"unknown hadamard keys {sorted(unknown)}; expected some of {', '.join(GEMMS)}, residual"
                )
            rotations = {gemm: Rotation.parse(value.get(gemm)) for gemm in GEMMS}
            residual = value.get("residual")
            residual = Rotation(None, seed=0) if residual is True else Rotation.parse(residual or None)
            return Hadamard(**rotations, residual=residual)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        residual = "residual" in values
        others = [v for v in values if v != "residual"]
        if len(others) > 1:
            raise ValueError(f"hadamard= takes one rotation (and optionally 'residual'), got {value!r}")
        rotation = Rotation.parse(others[0]) if others else None
        return Hadamard(rotation, rotation, rotation, Rotation(None, seed=0) if residual else None)

    def __str__(self) -> str:
        per_gemm = {gemm: getattr(self, gemm) for gemm in GEMMS if getattr(self, gemm) is not None}
        parts = [f"{gemm}={rotation}" for gemm, rotation in per_gemm.items()]
        if len(set(per_gemm.values())) == 1 and len(per_gemm) == 3:
            parts = [str(self.fprop)]
        return " ".join(parts + (["residual"] if self.residual else []))
