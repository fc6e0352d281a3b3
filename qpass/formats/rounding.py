"""Rounding fp32 values onto an element format's grid (SPEC section 1).

The grid step at x is ``2^(max(floor(log2|x|), emin) - mbits)``: one binade's spacing for normal
values, the subnormal spacing below ``2^emin``. Dividing by the step (an exact power of two) turns
rounding into rounding to an integer, which is exact in fp32 for every mode, so the result is the
same bits on any backend. Saturation ("satfinite") happens after rounding, so a value that rounds
past max normal still lands on max normal.
"""

from __future__ import annotations

import torch

from qpass.formats.bits import F32_EXP_BIAS, biased_exponent, pow2
from qpass.formats.element import ElementFormat

ROUNDING_MODES = ("rne", "stochastic", "away")


def make_generator(seed_or_generator, device: torch.device) -> torch.Generator | None:
    """Accept a ``torch.Generator``, an int seed, or None (torch's default generator)."""
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, int):
        return torch.Generator(device=device).manual_seed(seed_or_generator)
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(seed_or_generator).__name__}"
    )


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
    step_exp = (biased_exponent(x) - F32_EXP_BIAS).clamp(min=fmt.emin) - fmt.mbits
    scaled = x * pow2(-step_exp)  # exact: a power-of-two scaling into integer units of the step
    if rounding == "rne":
        integral = torch.round(scaled)  # torch.round is round-half-to-even
    elif rounding == "away":
        magnitude = scaled.abs()
        whole = magnitude.floor()
        integral = whole + (magnitude - whole >= 0.5).to(x.dtype)  # the fraction is exact
    elif rounding == "stochastic":
        whole = scaled.floor()
        fraction = (scaled - whole).double()  # exact in fp32; float64 keeps P(up) = fraction to 2^-53
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        integral = whole + (u < fraction).to(x.dtype)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(ROUNDING_MODES)}")
    # copysign keeps -0 for negative values that round to zero (the floor-based modes lose it).
    values = torch.copysign(integral * pow2(step_exp), x).clamp(-fmt.max_normal, fmt.max_normal)
    if fmt.has_inf:
        return torch.where(x.isinf(), x, values)
    return torch.where(x.isinf(), torch.nan, values)
