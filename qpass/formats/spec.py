"""Named formats (SPEC section 5) and the full description of how a tensor is quantized.

A :class:`FormatSpec` is an element format plus its scaling: ``absmax`` scales over a tensor,
channel or block, OCP MX E8M0 block scales (a ``scale_mode`` picks the exponent rule), or NVFP4's
two-level scales (per 1x16 block, or per 16x16 tile of the last two dims: Transformer Engine's
weight recipe; ``scale_mode="4over6"`` picks each block's scale between mapping its amax to 6 and
to 4). :func:`resolve_format` turns a user's format name and options into one, and is where bad
options are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qpass.formats.element import ELEMENT_FORMATS, FP8_E4M3, ElementFormat

SCALE_MODES = ("floor", "ceil", "even", "rceil")  # MX block exponents
# NVFP4 block-scale rules besides the default (None: the block amax maps to 6): "Four Over Six".
NVFP4_SCALE_MODES = ("4over6",)
GRANULARITIES = ("tensor", "channel", "('block', k)")
MX_BLOCK = 32
NVFP4_BLOCK = 16
# nvfp4's granularities: its default 1x16 blocks, or one scale per 16x16 tile.
NVFP4_GRANULARITIES = (("block", NVFP4_BLOCK), ("tile", NVFP4_BLOCK))
E8M0_BITS = 8
FP32_BITS = 32


@dataclass(frozen=True)
class FormatSpec:
    name: str
    element: ElementFormat
    scaling: str  # "absmax" | "mx" | "nvfp4"
    granularity: str = "tensor"  # "tensor" | "channel" | "block" | "tile" (nvfp4 only)
    block_size: int | None = None  # block: elements per block; tile: the side of a square tile
    scale_mode: str | None = None  # MX: one of SCALE_MODES; nvfp4: None (amax to 6) or "4over6"
    pow2: bool = False  # absmax only: round the encode scale down to a power of two

    def padded_length(self, length: int) -> int:
        """The axis length after zero-padding: whole blocks, and even for fp4's two-per-byte packing."""
        multiple = self.block_size if self.blocked else 1
        if self.element.bits == 4 and multiple % 2:
            multiple *= 2
        return -(-length // multiple) * multiple

    def group_size(self, length: int) -> int:
        """Elements per scaling group along the axis (tensor and channel: the whole padded axis)."""
        return self.block_size if self.blocked else self.padded_length(length)

    @property
    def blocked(self) -> bool:
        """Split into blocks along the axis: a tile is a block along the axis that also spans
        ``block_size`` rows of the other dim."""
        return self.granularity in ("block", "tile")

    def __str__(self) -> str:
        return self.name


def _absmax(element: str) -> FormatSpec:
    return FormatSpec(element, ELEMENT_FORMATS[element], "absmax")


def _mx(name: str, element: str) -> FormatSpec:
    return FormatSpec(name, ELEMENT_FORMATS[element], "mx", "block", MX_BLOCK, scale_mode="floor")


NAMED_FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        _absmax("fp8_e4m3"),
        _absmax("fp8_e5m2"),
        _absmax("fp6_e2m3"),
        _absmax("fp6_e3m2"),
        _absmax("fp4_e2m1"),
        _mx("mxfp8_e4m3", "fp8_e4m3"),
        _mx("mxfp8_e5m2", "fp8_e5m2"),
        _mx("mxfp6_e2m3", "fp6_e2m3"),
        _mx("mxfp6_e3m2", "fp6_e3m2"),
        _mx("mxfp4", "fp4_e2m1"),
        _mx("mxint8", "int8"),
        FormatSpec("nvfp4", ELEMENT_FORMATS["fp4_e2m1"], "nvfp4", "block", NVFP4_BLOCK),
    )
}


def _formats_with(scaling: str) -> str:
    return ", ".join(name for name, spec in NAMED_FORMATS.items() if spec.scaling == scaling)


def _parse_granularity(granularity) -> tuple[str, int | None]:
    if granularity in ("tensor", "channel"):
        return granularity, None
    if (
        isinstance(granularity, tuple)
        and len(granularity) == 2
        and granularity[0] == "block"
        and isinstance(granularity[1], int)
        and granularity[1] > 0
    ):
        return "block", granularity[1]
    tiles = isinstance(granularity, tuple) and granularity[:1] == ("tile",)
    raise ValueError(
        f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)} with k > 0"
        + ("; ('tile', 16) is for nvfp4 only" if tiles else "")
    )


def _parse_nvfp4_granularity(granularity) -> str:
    if granularity not in NVFP4_GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r} for nvfp4; expected ('block', 16) (1x16 blocks, the "
            "default) or ('tile', 16) (one scale per 16x16 tile of the tensor's last two dims)"
        )
    return granularity[0]


def scale_modes_by_family() -> str:
    """The accepted ``scale_mode`` values, per family of formats (for error messages)."""
    return (f"{', '.join(SCALE_MODES)} for the MX formats ({_formats_with('mx')}); "
            f"{', '.join(NVFP4_SCALE_MODES)} for nvfp4 (default None: the block amax maps to 6)")


def _parse_scale_mode(spec: FormatSpec, scale_mode: str) -> str:
    modes = {"mx": SCALE_MODES, "nvfp4": NVFP4_SCALE_MODES}.get(spec.scaling)
    if modes is None:
        raise ValueError(f"scale_mode= applies to the MX formats and nvfp4, not {spec.name}; "
                         f"accepted: {scale_modes_by_family()}")
    if scale_mode not in modes:
        other = scale_mode in SCALE_MODES + NVFP4_SCALE_MODES  # another family's
        raise ValueError(
            f"unknown scale_mode {scale_mode!r} for {spec.name}; expected one of {', '.join(modes)}"
            + (f" (accepted: {scale_modes_by_family()})" if other else "")
        )
    return scale_mode


def resolve_format(
    format: str | FormatSpec,
    granularity=None,
    scale_mode: str | None = None,
    pow2: bool | None = None,
) -> FormatSpec:
    """The :class:`FormatSpec` for a format name (or spec) with the given options applied."""
    if isinstance(format, FormatSpec):
        spec = format
    elif format in NAMED_FORMATS:
        spec = NAMED_FORMATS[format]
    else:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(NAMED_FORMATS)}")

    if granularity is not None:
        if spec.scaling == "mx":
            raise ValueError(
                f"{spec.name} fixes its own scaling blocks; granularity= applies to {_formats_with('absmax')}"
                " and to nvfp4 (('block', 16) or ('tile', 16))"
            )
        if spec.scaling == "nvfp4":
            spec = replace(spec, granularity=_parse_nvfp4_granularity(granularity))
        else:
            kind, block = _parse_granularity(granularity)
            spec = replace(spec, granularity=kind, block_size=block)
    if scale_mode is not None:
        spec = replace(spec, scale_mode=_parse_scale_mode(spec, scale_mode))
    if pow2 is not None:
        if spec.scaling != "absmax":
            raise ValueError(f"pow2= applies to {_formats_with('absmax')}, not {spec.name}")
        spec = replace(spec, pow2=bool(pow2))
    return spec


def scale_bits(spec: FormatSpec) -> int:
    """Storage bits of one group scale (the NVFP4 per-tensor fp32 is counted separately)."""
    return {"absmax": FP32_BITS, "mx": E8M0_BITS, "nvfp4": FP8_E4M3.bits}[spec.scaling]
