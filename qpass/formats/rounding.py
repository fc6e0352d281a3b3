"""Rounding fp32 values onto an element format's grid (SPEC section 1).

The grid step at x is ``2^(max(floor(log2|x|), emin) - mbits)``: one binade's spacing for normal
values, the subnormal spacing below ``2^emin``. Dividing by the step (an exact power of two) turns
rounding into rounding to an integer, which is exact in fp32 for every mode, so the result is the
same bits on any backend. Saturation ("satfinite") happens after rounding, so a value that rounds
past max normal still lands on max normal.
"""

from __future__ import annotations

import torch

from qpass.formats.bits import F32_EXP_BIAS, F32_EXP_MASK, F32_MANTISSA_BITS, floor_log2, pow2
from qpass.formats.element import ElementFormat

ROUNDING_MODES = ("rne", "stochastic", "away")


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(ROUNDING_MODES)}")


def make_generator(seed_or_generator, device: torch.device) -> torch.Generator | None:
    """Accept a ``torch.Generator``, an int seed, or None (torch's default generator)."""
    if isinstance(seed_or_generator, torch.Generator):
        if seed_or_generator.device.type != torch.device(device).type:
            raise ValueError(
                f"the generator is on {seed_or_generator.device} but the tensor is on {device}; "
                "pass a generator on the tensor's device, or an int seed"
            )
        return seed_or_generator
    if seed_or_generator is None:
        return None
    if isinstance(seed_or_generator, int):
        return torch.Generator(device=device).manual_seed(seed_or_generator)
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(seed_or_generator).__name__}"
    )


def grid_step(magnitude: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """The grid step at non-negative ``magnitude`` (element units):
    ``2^(max(floor(log2 m), emin) - mbits)``."""
    return pow2(floor_log2(magnitude.clamp(min=fmt.min_normal)) - fmt.mbits)


def round_to_element(
    x: torch.Tensor,
    fmt: ElementFormat,
    rounding: str = "rne",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest values of ``fmt`` (fp32 result, exactly on the grid).

    NaN stays NaN; ±Inf stays ±Inf where the format has Inf and becomes NaN where it does not
    (overflow is never hidden as a finite number); finite values beyond max normal saturate.
    """
    check_rounding(rounding)
    # The step and its reciprocal are built straight from x's exponent bits: 2^(E - 127 - mbits)
    # with E the biased fp32 exponent, clamped below at the subnormal binade and above so that
    # neither power of two leaves fp32's normal range (NaN/Inf stay NaN/Inf regardless).
    # Temporaries are updated in place (x never is): on the CPU each fresh full-size tensor costs
    # page faults that take about as long as the arithmetic.
    exponent_bits = (x.view(torch.int32) & F32_EXP_MASK).clamp_(
        (fmt.emin + F32_EXP_BIAS) << F32_MANTISSA_BITS, (F32_EXP_BIAS + 126) << F32_MANTISSA_BITS
    )
    inverse_step = (((2 * F32_EXP_BIAS + fmt.mbits) << F32_MANTISSA_BITS) - exponent_bits).view(torch.float32)
    step = exponent_bits.sub_(fmt.mbits << F32_MANTISSA_BITS).view(torch.float32)
    scaled = inverse_step.mul_(x)  # exact: a power-of-two scaling into integer units of the step
    if rounding == "rne":
        integral = scaled.round_()  # torch.round is round-half-to-even
    elif rounding == "away":
        magnitude = scaled.abs()
        whole = magnitude.floor()
        integral = whole + (magnitude - whole >= 0.5).to(x.dtype)  # the fraction is exact
    else:  # stochastic
        whole = scaled.floor()
        fraction = (scaled - whole).double()  # exact in fp32; float64 keeps P(up) = fraction to 2^-53
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        integral = whole + (u < fraction).to(x.dtype)
    values = step.mul_(integral)
    if rounding != "rne":  # "away" rounded magnitudes and floor loses -0: put the sign back
        values = values.copysign_(x)
    values = values.clamp_(-fmt.max_normal, fmt.max_normal)
    if fmt.is_int:
        values = values.add_(0.0)  # two's complement has no -0: -0 + 0 is +0
    if fmt.has_inf:
        return torch.where(x.isinf(), x, values)
    return values.masked_fill_(x.isinf(), torch.nan)
