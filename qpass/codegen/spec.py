"""What a generated kernel is specialized on: a quantizer (and rotation) spelled out as constexprs.

A kernel template branches on these values at compile time, so Triton compiles one kernel per
distinct :class:`KernelSpec` (its JIT cache is keyed by them) with every branch not taken removed.
:func:`kernel_spec` is the only place that maps qpass's format descriptions onto them, and
:func:`unsupported` is where a quantizer the kernels cannot run is named, so callers can fall
back to the reference with a reason rather than fail.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from qpass.formats.spec import FormatSpec
from qpass.jsontuple import JsonTuple
from qpass.quantizer import Quantizer
from qpass.rotation import Rotation

SCALINGS = ("absmax", "mx", "nvfp4")
GRANULARITIES = ("tensor", "channel", "block", "tile")
SCALE_MODES = ("floor", "ceil", "even", "rceil", "4over6")  # MX exponent rules; nvfp4's 4over6 (4)
ROUNDINGS = ("rne", "stochastic", "away")  # numerics.RNE, STOCHASTIC, AWAY
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelSpec(JsonTuple):  # JSON: the ``qpass_codegen::`` ops take it as a string
    EBITS: int
    MBITS: int
    EMIN: int
    EMAX: int
    MAX_NORMAL: float
    HAS_INF: bool
    HAS_NAN: bool
    IS_INT: bool
    PACKED: bool  # fp4: two codes per byte
    SCALING: int  # index into SCALINGS
    GRANULARITY: int  # index into GRANULARITIES
    GROUP: int  # elements per scale along the axis (blocks and tiles; 0 otherwise)
    SCALE_MODE: int  # index into SCALE_MODES: MX's rule, or nvfp4's 4over6 (0 for the default)
    POW2: bool  # absmax only
    ROUNDING: int
    HADAMARD: int  # block size of a fused rotation, 0 for none

    @property
    def scaling(self) -> str:
        return SCALINGS[self.SCALING]

    @property
    def granularity(self) -> str:
        return GRANULARITIES[self.GRANULARITY]

    @property
    def needs_amax(self) -> bool:
        """A scale that spans more than one kernel program: a pre-pass computes its amax."""
        return self.granularity in ("tensor", "channel") or self.scaling == "nvfp4"

    def padded_length(self, length: int) -> int:
        """:meth:`qpass.formats.spec.FormatSpec.padded_length`: whole groups, and even for fp4's packing."""
        multiple = self.GROUP or 1
        if self.PACKED and multiple % 2:
            multiple *= 2
        return -(-length // multiple) * multiple

    def constexprs(self) -> dict:
        return asdict(self)


def _odd_blocks(spec: FormatSpec) -> bool:
    """Blocks that are not a power of two: a Triton tile cannot hold a whole number of them."""
    return spec.blocked and bool(spec.block_size & (spec.block_size - 1))


def unsupported(
    quantizer: Quantizer, rotation: Rotation | None = None, dtype: torch.dtype = torch.float32
) -> str | None:
    """Why the kernels cannot run ``quantizer`` (with ``rotation``) on ``dtype``, or None when they can."""
    spec = quantizer.spec
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} inputs: the kernels take {', '.join(str(d) for d in KERNEL_DTYPES)}"
    if _odd_blocks(spec):
        return f"blocks of {spec.block_size}: the kernels take power-of-two blocks"
    if rotation is not None and rotation.block is None:
        return "a full-size Hadamard rotation: the kernels fuse 16- to 128-point blocks"
    return None


@functools.lru_cache(maxsize=None)
def kernel_spec(spec: FormatSpec, rounding: str = "rne", hadamard: int = 0) -> KernelSpec:
    """The constexprs of format ``spec`` rounded by ``rounding``, with a fused ``hadamard``-point
    rotation (0: none)."""
    if _odd_blocks(spec):
        raise ValueError(
            f"no Triton kernel for {spec.name} in blocks of {spec.block_size}: "
            "the kernels take power-of-two blocks"
        )
    element = spec.element
    return KernelSpec(
        EBITS=element.ebits,
        MBITS=element.mbits,
        EMIN=element.emin,
        EMAX=element.emax,
        MAX_NORMAL=element.max_normal,
        HAS_INF=element.has_inf,
        HAS_NAN=element.has_nan,
        IS_INT=element.is_int,
        PACKED=element.bits == 4,
        SCALING=SCALINGS.index(spec.scaling),
        GRANULARITY=GRANULARITIES.index(spec.granularity),
        GROUP=spec.block_size if spec.blocked else 0,
        SCALE_MODE=SCALE_MODES.index(spec.scale_mode) if spec.scale_mode else 0,
        POW2=spec.pow2,
        ROUNDING=ROUNDINGS.index(rounding),
        HADAMARD=hadamard,
    )
