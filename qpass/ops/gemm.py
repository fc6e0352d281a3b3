"""The scaled GEMM: ``X · Yᵀ`` of two operands quantized along their reduction axis (SPEC section 9).

Every quantized GEMM of qpass runs through :func:`scaled_gemm`, which picks a route per call from the
operands' formats and the device:

- ``scaled_mm tensorwise`` / ``scaled_mm rowwise``: torch's ``_scaled_mm`` (cuBLASLt on CUDA; on the
  CPU, fp32 products of the decoded codes, with oneDNN off: see :func:`_cpu_scaled_mm`) for fp8
  operands with per-tensor or per-row scales;
- ``triton``: qpass's dequantize-in-registers kernel on a GPU, for the block-scaled formats that no
  torch scaled matmul on that device takes;
- ``reference: <why>``: dequantize both, fp32 matmul, for what no GEMM takes.

All three give the same sums; on the CPU the first and the last agree bit for bit. A ``_scaled_mm``
call is checked against the constraints cuBLASLt puts on it (:func:`cuda_rejects`) on every device,
so the CPU catches a call a GPU would refuse; where alignment is all it lacks, the operands are
zero-padded along K and N (which changes no sum) and the result cut back.
``qpass::scaled_gemm`` is the op that graphs hold (a fake implementation for tracing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qpass.gemm_operand import TORCH_DTYPES, GemmOperand
from qpass.quantizer import Quantizer

Operand = GemmOperand | Tensor  # a Tensor: a high-precision operand, reduction axis last
SCALED_MM_ALIGNMENT = 16  # K and N of a cuBLASLt FP8 GEMM (sm89/sm90)
SM90 = (9, 0)  # the constraints the CPU checks calls against: those of an H100


def _scaled_mm_scaling(quantizer: Quantizer | None) -> str | None:
    """"tensorwise" or "rowwise" where ``_scaled_mm`` takes the quantizer's operands, else None."""
    if quantizer is None or quantizer.spec.element.name not in TORCH_DTYPES:
        return None
    spec = quantizer.spec
    if spec.scaling != "absmax":
        return None
    return {"tensor": "tensorwise", "channel": "rowwise"}.get(spec.granularity)


def route(a: Quantizer | None, b: Quantizer | None, device: torch.device | str = "cpu",
          batched: bool = False) -> str:
    """Which GEMM runs ``X · Yᵀ`` for operands quantized by ``a`` and ``b`` (None: high precision)."""
    if a is None or b is None:
        return "reference: a high-precision operand"
    scaling_a, scaling_b = _scaled_mm_scaling(a), _scaled_mm_scaling(b)
    if scaling_a and scaling_a == scaling_b:
        if batched:
            return "reference: batched operands (no batched scaled_mm)"
        if a.spec.element.name == b.spec.element.name == "fp8_e5m2":  # the CPU decides as CUDA would
            return "reference: e5m2 x e5m2 (cuBLASLt takes no such FP8 GEMM)"
        return f"scaled_mm {scaling_a}"
    if torch.device(device).type == "cuda" and not batched:
        return "triton"
    if scaling_a and scaling_b:
        return "reference: mixed tensorwise and rowwise scales"
    return f"reference: no scaled GEMM on {torch.device(device).type} takes {a} x {b}"


def cuda_rejects(x: Tensor, y_t: Tensor, scale_x: Tensor, scale_y: Tensor, out_dtype: torch.dtype,
                 bias: Tensor | None = None, capability: tuple[int, int] = SM90) -> str | None:
    """Why cuBLASLt (PyTorch's ``ScaledBlas.cpp``) would refuse ``_scaled_mm(x, y_t, ...)`` on a GPU of
    ``capability`` (None: it takes it)."""
    if capability < (8, 9):
        return f"FP8 GEMMs need sm89 or later, not sm{capability[0]}{capability[1]}"
    if x.ndim != 2 or y_t.ndim != 2:
        return "operands must be matrices"
    if x.stride(-1) != 1 or y_t.stride(0) != 1:
        return "A must be row-major and B column-major"
    if x.dtype == y_t.dtype == torch.float8_e5m2:
        return "e5m2 x e5m2 is not supported"
    (m, k), n = x.shape, y_t.shape[1]
    if k % SCALED_MM_ALIGNMENT or n % SCALED_MM_ALIGNMENT:
        return f"K ({k}) and N ({n}) must be multiples of {SCALED_MM_ALIGNMENT}"
    if bias is not None and out_dtype not in (torch.bfloat16, torch.float16):
        return "a bias needs a bf16 or fp16 output"
    rowwise = scale_x.numel() > 1 or scale_y.numel() > 1
    if rowwise and (scale_x.shape != (m, 1) or scale_y.shape != (1, n)):
        return (f"rowwise scales must be ({m}, 1) and (1, {n}), "
                f"got {tuple(scale_x.shape)}, {tuple(scale_y.shape)}")
    return None


def _padded(operand: GemmOperand, rows: int, k: int) -> tuple[Tensor, Tensor]:
    """Codes zero-padded to ``rows x k`` and scales to ``rows`` (padding rows scale by 1: they are 0)."""
    codes, scales = operand.codes, operand.scales
    if codes.shape != (rows, k):
        codes = F.pad(codes.view(torch.uint8),
                      (0, k - codes.shape[1], 0, rows - codes.shape[0])).view(codes.dtype)
    if scales.numel() > 1 and scales.shape[0] != rows:
        scales = F.pad(scales, (0, 0, 0, rows - scales.shape[0]), value=1.0)
    return codes, scales


def _aligned(size: int) -> int:
    return -(-size // SCALED_MM_ALIGNMENT) * SCALED_MM_ALIGNMENT


def _scaled_mm(x: GemmOperand, y: GemmOperand, out_dtype: torch.dtype) -> Tensor:
    """``x · yᵀ`` by ``torch._scaled_mm``. On CUDA the operands are padded to cuBLASLt's alignment
    where they lack it; on the CPU, which takes any size (and pads nothing, which keeps its sums those
    of the reference), the call CUDA would get is checked all the same."""
    m, n, k = x.rows, y.rows, x.codes.shape[-1]
    on_cuda = x.codes.device.type == "cuda"
    if on_cuda:
        x_codes, x_scales = _padded(x, m, _aligned(k))
        y_codes, y_scales = _padded(y, _aligned(n), _aligned(k))
        capability = torch.cuda.get_device_capability(x.codes.device)
    else:
        (x_codes, x_scales), (y_codes, y_scales), capability = (x.codes, x.scales), (y.codes, y.scales), SM90
    row = lambda scales: scales.reshape(1, -1) if scales.numel() > 1 else scales  # noqa: E731
    checked = [x_codes, y_codes.t(), x_scales, row(y_scales)]
    if not on_cuda:  # the padded call, as shapes only
        pad = lambda t, *shape: torch.empty(shape, dtype=t.dtype, device="meta")  # noqa: E731
        scale_x = x.scales if x.scales.numel() == 1 else pad(x.scales, m, 1)
        scale_y = y.scales if y.scales.numel() == 1 else pad(y.scales, 1, _aligned(n))
        checked = [pad(x.codes, m, _aligned(k)), pad(y.codes, _aligned(n), _aligned(k)).t(), scale_x, scale_y]
    why = cuda_rejects(*checked, out_dtype, capability=capability)
    if why is not None:  # route() sent only what fits: a refusal here is qpass's bug, not the user's
        raise RuntimeError(f"qpass built a _scaled_mm call that cuBLASLt rejects: {why}")
    scaled_mm = torch._scaled_mm if on_cuda else _cpu_scaled_mm
    out = scaled_mm(x_codes, y_codes.t(), scale_a=x_scales, scale_b=row(y_scales), out_dtype=out_dtype)
    return out[:, :n] if out.shape[1] != n else out


def _cpu_scaled_mm(*args, **kwargs) -> Tensor:
    """``torch._scaled_mm`` on the CPU without oneDNN. On CPUs with AVX512-FP16 (Sapphire Rapids and
    later) torch hands e4m3 x e4m3 to oneDNN, whose FP8 primitive sums in another order than the
    reference (so not bit for bit) and, in torch 2.13, ran a 1024^3 GEMM in 18 s against 14 ms for
    torch's own decode-then-fp32 path (measured on this project's 2-core Xeon)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # torch.backends.mkldnn.flags() would reset TF32 too, and warn
    try:
        return torch._scaled_mm(*args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _values(operand: Operand) -> Tensor:
    return operand.dequantize() if isinstance(operand, GemmOperand) else operand


def _quantizer(operand: Operand) -> Quantizer | None:
    return operand.quantizer if isinstance(operand, GemmOperand) else None


def _flattened(operand: Operand) -> Operand:
    if isinstance(operand, GemmOperand):
        return operand.flattened()
    return operand.reshape(-1, operand.shape[-1])


def scaled_gemm(x: Operand, y: Operand, out_dtype: torch.dtype) -> Tensor:
    """``x [..., P, K] · y [..., Q, K]ᵀ`` accumulated in fp32, in ``out_dtype``: ``[..., P, Q]``.

    With a matrix ``y`` (a weight), ``x``'s leading dims are rows of one GEMM."""
    if _values_ndim(y) == 2 and _values_ndim(x) > 2:
        leading = (x.codes if isinstance(x, GemmOperand) else x).shape[:-2]
        out = scaled_gemm(_flattened(x), y, out_dtype)
        return out.reshape(*leading, -1, out.shape[-1])
    batched = max(_values_ndim(x), _values_ndim(y)) > 2
    chosen = route(_quantizer(x), _quantizer(y), _device(x), batched)
    if chosen.startswith("scaled_mm"):
        return _scaled_mm(x, y, out_dtype)
    if chosen == "triton":
        from qpass.codegen.scaled_gemm import scaled_gemm as triton_scaled_gemm  # imports triton

        return triton_scaled_gemm(x, y, out_dtype)
    # Row-major times row-major, as the CPU's _scaled_mm multiplies: for small shapes the fp32 GEMM's
    # rounding depends on its operands' layout.
    return torch.matmul(_values(x), _values(y).mT.contiguous()).to(out_dtype)


def _values_ndim(operand: Operand) -> int:
    return (operand.codes if isinstance(operand, GemmOperand) else operand).ndim


def _device(operand: Operand) -> torch.device:
    return (operand.codes if isinstance(operand, GemmOperand) else operand).device
