"""Independent references shared by the format tests: the ml_dtypes types that hold the same OCP
encodings as qpass's float element formats (codes in the low bits of a byte), and NVFP4 with
16x16 tile scales written as a plain loop over the tiles."""

import ml_dtypes
import numpy as np

ML_DTYPE = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
FLOAT_FORMATS = list(ML_DTYPE)
ALL_FORMATS = FLOAT_FORMATS + ["int8"]


def nvfp4_global_scale(x: np.ndarray, divisor: float = 2688.0) -> np.float32:
    """NVFP4's g of float32 ``x``: amax / divisor (2688 = 448 * 6; 4over6: 1536 = 256 * 6); 1.0 for an
    all-zero tensor; NaN for NaN/Inf; qpass keeps it >= 2^-149."""
    f32 = np.float32
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(x))
        if amax == 0:
            return f32(1.0)
        if not np.isfinite(amax):
            return f32(np.nan)
        return f32(max(amax / f32(divisor), f32(2.0**-149)))


def nvfp4_tiles(x: np.ndarray, tile: int = 16):
    """SPEC section 2 NVFP4 with one E4M3 scale per ``tile x tile`` block of the last two dims,
    written as a loop over the tiles of float32 ``x`` (the quantization axis does not matter: the
    tiles are the same). Each step is one fp32 operation; ml_dtypes does the RNE casts.

    Returns ``g``, the tiles' E4M3 codes ``[..., ceil(M/tile), ceil(N/tile)]``, the E2M1 codes and
    the dequantized values, both shaped like ``x``.
    """
    assert x.dtype == np.float32 and x.ndim >= 2
    f32 = np.float32
    with np.errstate(all="ignore"):
        g = nvfp4_global_scale(x)
        *batch, rows, cols = x.shape
        tile_codes = np.zeros((*batch, -(-rows // tile), -(-cols // tile)), np.uint8)
        codes = np.zeros(x.shape, np.uint8)
        deq = np.zeros(x.shape, f32)
        for *b, i, j in np.ndindex(*tile_codes.shape):
            window = (*b, slice(i * tile, (i + 1) * tile), slice(j * tile, (j + 1) * tile))
            block = x[window]
            # s_b = e4m3_rne(clamp((tile_amax / 6) / g, 2^-6, 448)); NaN stays NaN.
            ratio = np.clip((np.max(np.abs(block)) / f32(6.0)) / g, f32(2.0**-6), f32(448.0))
            s_b_e4m3 = np.array(ratio, f32).astype(ml_dtypes.float8_e4m3fn)
            s_b = s_b_e4m3.astype(f32)
            # q = e2m1_rne(clamp(x * ((1 / g) / s_b), -6, 6)), the factor clamped to fp32 max (qpass
            # decision: it overflows only for a tensor amax below ~1e-35).
            encode = np.minimum((f32(1.0) / g) / s_b, np.finfo(f32).max)
            scaled = block * encode
            q = np.clip(scaled, f32(-6.0), f32(6.0)).astype(ml_dtypes.float4_e2m1fn)
            # E2M1 has no NaN: a non-finite element is stored as code 0 (+0) and dequantizes to NaN.
            nonfinite = ~np.isfinite(scaled)
            tile_codes[(*b, i, j)] = s_b_e4m3.view(np.uint8)
            codes[window] = np.where(nonfinite, 0, q.view(np.uint8))
            # dequantized q * (s_b * g)
            deq[window] = np.where(nonfinite, f32(np.nan), q.astype(f32) * (s_b * g))
    return g, tile_codes, codes, deq
