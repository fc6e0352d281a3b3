"""Independent references shared by the element tests: the ml_dtypes types that hold the same OCP
encodings as qpass's float element formats (codes in the low bits of a byte)."""

import ml_dtypes

ML_DTYPE = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
FLOAT_FORMATS = list(ML_DTYPE)
ALL_FORMATS = FLOAT_FORMATS + ["int8"]
