"""qpass's generated Triton kernels on the GPU: correctness against the reference, then their speed.

Run with `make bench`, or `python bench/kernels_gpu.py` (`--no-write` only prints). Prints the
tables and writes them to bench/RESULTS.md between this benchmark's markers, with the machine.

1. Correctness. The kernels (``qpass.codegen``) against qpass's reference numerics
   (``qpass.quantize`` / ``dequantize`` / ``fake_quantize``), bit for bit: quantize (codes, scales,
   NVFP4's tensor scale), fake-quantize and dequantize, for fp32 and bf16 inputs; the weight-only
   matmul within the error bound of an fp32-accumulated product. On a GPU at the benchmark shapes;
   without one, at small shapes in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU).
2. Quantize kernels: achieved bandwidth at 8192x8192 bf16 against a device-to-device copy measured
   in the same run. Goal: at least 80% of the copy's bandwidth.
3. MXFP4 and NVFP4 weight-only matmul (``qpass.codegen.weight_matmul``) against ``torch.matmul`` in
   bf16 at N = K = 8192. Goals: at least 2.5x at M = 1, at least 0.9x at M = 2048.
4. A linear layer's forward + backward at 8192 dims under ``qpass.compile(..., kernels="triton")``
   with fp8-train and mxfp8-train, against the same layer in bf16 (both torch.compile'd with
   inductor), and torchao's float8 training when torchao is installed.

Without a GPU, parts 2-4 are reported as missing, never estimated. Each measurement is guarded: one
that fails shows its error in its row and the script goes on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads the switch when a kernel is defined, so it is set before qpass (and through it
    # qpass.codegen) is imported. Without a GPU the interpreter is the only way to run the kernels.
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter evaluates both sides of every tl.where with numpy, including the side a
    # kernel discards (a division by zero where a scale is zero): numpy's warnings are noise here.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import write_section  # noqa: E402

import qpass  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402

try:
    import triton
    import triton.testing

    import qpass.codegen as codegen
    from qpass.codegen.spec import kernel_spec

    CODEGEN_ERROR = None
except ImportError as error:  # qpass[triton] not installed: nothing to check or time
    codegen = triton = None
    CODEGEN_ERROR = f"not available: {type(error).__name__}: {error}"

SIZE = 8192  # the benchmark shapes: quantized tensors, the matmul's N and K, the training layer
QUANTIZERS = {  # what the quantize kernels are timed on (and checked at)
    "mxfp8_e4m3 (rceil)": Quantizer("mxfp8_e4m3", scale_mode="rceil"),
    "mxfp4": Quantizer("mxfp4"),
    "nvfp4": Quantizer("nvfp4"),
    "fp8_e4m3 (per tensor)": Quantizer("fp8_e4m3"),
}
COPY_GOAL = 0.80  # of the copy's bandwidth
MATMUL_FORMATS = ("mxfp4", "nvfp4")
MATMUL_MS = (1, 16, 128, 2048)
MATMUL_GOALS = {1: 2.5, 2048: 0.9}  # M -> the speedup over bf16 torch.matmul to reach
TRAIN_RECIPES = ("fp8-train", "mxfp8-train")
TRAIN_TOKENS = 8192  # M of the training layer's input: [8192 tokens, 8192] -> [8192 tokens, 8192]

# The interpreter is slow: small shapes that still have partial tiles (40 rows over 16-row tiles,
# 480 = 15 blocks of 32 over 128-wide tiles) and whole scaling blocks.
CPU_QUANT_SHAPE = (40, 480)
CPU_MATMUL_NK = (96, 480)
CPU_MATMUL_MS = (1, 16)

MISSING = "missing (no GPU)"
INTERPRETER_BF16 = "bit-exact up to the interpreter's bf16 cast (it truncates; a GPU rounds to nearest)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _error(error: BaseException) -> str:
    """An exception as one short table cell."""
    text = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
    text = text if len(text) <= 160 else text[:157] + "..."
    return text.replace("|", "/")


# ---- 1. correctness --------------------------------------------------------------------------------


@dataclass
class Check:
    what: str
    shape: str
    dtype: str
    result: str
    passed: bool | None  # None: not checked (a missing feature)


INT_VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEWS[t.dtype]) if t.dtype in INT_VIEWS else t


def differing(got: torch.Tensor, want: torch.Tensor) -> int:
    """How many elements' bits differ (all of them when the shapes or dtypes do)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(got.numel(), want.numel())
    return int((_bits(got) != _bits(want)).sum())


def truncated_bf16(x32: torch.Tensor) -> torch.Tensor:
    """fp32 values cast to bf16 by dropping their low 16 bits, as Triton's interpreter casts."""
    return (x32.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def bits_result(got: torch.Tensor, want: torch.Tensor, want_fp32: torch.Tensor | None) -> tuple[str, bool]:
    """Compare bit for bit. ``want_fp32``: the reference before its cast to bf16, for the one known
    difference of the interpreter (its fp32 -> bf16 cast truncates); on a GPU it does not apply."""
    bad = differing(got, want)
    if bad == 0:
        return "bit-exact", True
    if want_fp32 is not None and not CUDA and differing(got, truncated_bf16(want_fp32)) == 0:
        return INTERPRETER_BF16, True
    return f"MISMATCH: {bad} of {want.numel()} differ", False


def quantize_checks(name: str, quantizer: Quantizer, x: torch.Tensor) -> list[Check]:
    """quantize (codes, scales, tensor scale), fake_quantize and dequantize against the reference."""
    spec, rounding = quantizer.spec, quantizer.rounding
    shape, dtype = "x".join(map(str, x.shape)), _name(x.dtype)
    checks = []

    def check(what: str, run) -> None:
        try:
            result, passed = run()
        except Exception as error:  # noqa: BLE001 -- a failing kernel is a row, not the end of the run
            result, passed = f"error: {_error(error)}", False
        checks.append(Check(f"{what} {name}", shape, dtype, result, passed))

    try:
        reference = qpass.quantize(x, spec, rounding=rounding)
    except Exception as error:  # noqa: BLE001
        cell = f"error in the reference: {_error(error)}"
        jobs = ("quantize", "fake_quantize", "dequantize")
        return [Check(f"{what} {name}", shape, dtype, cell, False) for what in jobs]

    def quantize():
        got = codegen.quantize(x, quantizer)
        parts = {"codes": (got.codes, reference.codes), "scales": (got.scales, reference.scales)}
        if reference.tensor_scale is not None or got.tensor_scale is not None:
            parts["tensor scale"] = (got.tensor_scale, reference.tensor_scale)
        bad = {
            part: (differing(a, b) if a is not None and b is not None else "one side missing")
            for part, (a, b) in parts.items()
        }
        bad = {part: n for part, n in bad.items() if n != 0}
        if not bad:
            return f"bit-exact ({', '.join(parts)})", True
        return "MISMATCH: " + ", ".join(f"{part} {n} differ" for part, n in bad.items()), False

    def fake_quantize():
        want = qpass.fake_quantize(x, spec, rounding=rounding)
        want_fp32 = None
        if x.dtype == torch.bfloat16:
            want_fp32 = qpass.fake_quantize(x.float(), spec, rounding=rounding)
        return bits_result(codegen.fake_quantize(x, quantizer), want, want_fp32)

    def dequantize():
        # The kernel decodes the reference's own QTensor, so a quantize mismatch cannot leak in here.
        want = qpass.dequantize(reference)
        want_fp32 = None
        if x.dtype == torch.bfloat16:
            want_fp32 = qpass.dequantize(dataclasses.replace(reference, dtype=torch.float32))
        return bits_result(codegen.dequantize(reference), want, want_fp32)

    check("quantize", quantize)
    check("fake_quantize", fake_quantize)
    check("dequantize", dequantize)
    return checks


def weight_matmul_function():
    """``qpass.codegen.weight_matmul``, or None and why not (a feature gap, not a failure)."""
    if codegen is None:
        return None, CODEGEN_ERROR
    try:
        from qpass.codegen import weight_matmul
    except ImportError as error:
        return None, f"not available: {_error(error)}"
    return weight_matmul, None


def matmul_error_ratio(y: torch.Tensor, x: torch.Tensor, weight) -> float:
    """max |y - exact| / bound over the output, for ``y`` = x · dequant(W)ᵀ as the kernel made it.

    exact: the product in fp64 of x and the weight's exact (fp32) dequantized values. bound: one
    unit in the last place of y's dtype (its final rounding) plus (K + 2)·2⁻²⁴·Σ|x||w|, the error
    of an fp32-accumulated dot product of length K (with a rounding each for a scale product and
    the accumulator's scaling). Under 1 means within the tolerance of fp32 accumulation.
    """
    w = qpass.dequantize(dataclasses.replace(weight, dtype=torch.float32)).double()
    exact = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    k = x.shape[-1]
    bound = torch.finfo(y.dtype).eps * exact.abs() + (k + 2) * 2.0**-24 * magnitude
    error = (y.double() - exact).abs()
    ratio = torch.where(error == 0, torch.zeros_like(error), error / bound)
    return float(ratio.max())


@functools.cache
def interpreter_bf16_dot_broken() -> bool:
    """Whether this Triton's interpreter gets ``tl.dot`` of bf16 operands wrong (it multiplies their
    bit patterns: triton-lang/triton#11584), found by running a 16x16 dot of small integers."""
    if CUDA:
        return False
    a = torch.arange(256, dtype=torch.float32).reshape(16, 16).remainder(5).sub(2).to(torch.bfloat16)
    out = torch.empty(16, 16)
    try:
        _bf16_dot_probe[(1,)](a, out)
    except Exception:  # noqa: BLE001 -- an interpreter that cannot run it cannot check a bf16 dot either
        return True
    return not torch.equal(out, a.float() @ a.float())


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _bf16_dot_probe(a_ptr, out_ptr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        tl.store(out_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, a))


def matmul_check(weight_matmul, fmt: str, m: int, n: int, k: int, dtype: torch.dtype, device):
    """(result, passed) of one weight_matmul against the fp64 product of its exact operands."""
    generator = torch.Generator(device).manual_seed(m)
    w = torch.randn(n, k, generator=generator, device=device, dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=generator, device=device).to(dtype)
    weight = codegen.quantize(w, Quantizer(fmt))
    y = weight_matmul(x, weight)
    if y.shape != (m, n):
        return f"MISMATCH: output shape {tuple(y.shape)}, expected {(m, n)}", False
    ratio = matmul_error_ratio(y, x, weight)
    verdict = "within tolerance" if ratio <= 1 else "OUT OF TOLERANCE"
    return f"{verdict} (max error / bound {ratio:.3f}, output {_name(y.dtype)})", ratio <= 1


def matmul_checks(n: int, k: int, ms: tuple[int, ...], device) -> list[Check]:
    """bf16 x (the benchmarked case: a bf16 tensor-core dot) and fp32 x (an IEEE fp32 dot)."""
    weight_matmul, missing = weight_matmul_function()
    checks = []
    for dtype in (torch.bfloat16, torch.float32):
        for fmt in MATMUL_FORMATS:
            for m in ms:
                what, shape, dtype_name = f"weight_matmul {fmt}", f"M={m}, N={n}, K={k}", _name(dtype)
                if missing:
                    checks.append(Check(what, shape, dtype_name, missing, None))
                    continue
                try:
                    result, passed = matmul_check(weight_matmul, fmt, m, n, k, dtype, device)
                except Exception as error:  # noqa: BLE001
                    result, passed = f"error: {_error(error)}", False
                if not passed and dtype == torch.bfloat16 and interpreter_bf16_dot_broken():
                    # Still a failure (a kernel must upcast bf16 dot operands here to be checkable on
                    # the CPU at all), but one whose likely cause the row names.
                    result += ("; this interpreter's bf16 tl.dot is broken (triton-lang/triton#11584): "
                               "a kernel that does not upcast bf16 dot operands under it fails here")
                checks.append(Check(what, shape, dtype_name, result, passed))
                _print_checks(checks[-1:])
    return checks


def correctness(device) -> list[Check]:
    if codegen is None:
        return [Check("qpass.codegen", "-", "-", CODEGEN_ERROR, None)]
    quant_shape = (SIZE, SIZE) if CUDA else CPU_QUANT_SHAPE
    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(*quant_shape, generator=generator, device=device).to(dtype)
        for name, quantizer in QUANTIZERS.items():
            checks += quantize_checks(name, quantizer, x)
            _print_checks(checks[-3:])
        del x
    n, k = (SIZE, SIZE) if CUDA else CPU_MATMUL_NK
    checks += matmul_checks(n, k, MATMUL_MS if CUDA else CPU_MATMUL_MS, device)
    return checks


CHECK_HEADER = "| check | shape | input dtype | result |\n|---|---|---|---|"


def _check_row(c: Check) -> str:
    return f"| {c.what} | {c.shape} | {c.dtype} | {c.result} |"


def _print_checks(checks: list[Check]) -> None:
    for c in checks:
        print(_check_row(c), flush=True)


# ---- timing ----------------------------------------------------------------------------------------


def median_ms(fn, grad_to_none=None) -> float:
    """Median time of ``fn`` in ms: one call first (autotuning, compilation), then triton's do_bench
    (CUDA events, 25 ms of warm-up, about 100 ms of repetitions, the L2 cache flushed before each)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _free() -> None:
    if CUDA:
        torch.cuda.empty_cache()


# ---- 2. quantize kernels ---------------------------------------------------------------------------


@dataclass
class BandwidthRow:
    kernel: str
    counted: str  # which bytes the effective figure counts
    passes: int = 1  # reads of the input: 2 with the amax pre-pass
    input_bytes: int = 0
    bytes: int = 0  # the input read once plus the outputs written
    ms: float | None = None
    error: str | None = None

    @property
    def traffic(self) -> int:
        """Every pass's reads: what the hardware actually moves (the pre-pass writes next to nothing)."""
        return self.bytes + (self.passes - 1) * self.input_bytes

    def gbs(self, nbytes: int) -> float:
        return nbytes / (self.ms * 1e-3) / 1e9


def quantize_bandwidth() -> tuple[list[BandwidthRow], BandwidthRow]:
    """The copy first, then each quantizer's quantize (codes and scales) and fake-quantize kernels."""
    names = [f"quantize {n}" for n in QUANTIZERS] + [f"fake_quantize {n}" for n in QUANTIZERS]
    copy_row = BandwidthRow("device-to-device copy (`dst.copy_(x)`)", "x read + x written")
    rows = [BandwidthRow(name, "") for name in names]
    if not CUDA or codegen is None:
        why = MISSING if not CUDA else CODEGEN_ERROR
        for row in [copy_row, *rows]:
            row.error = why
            print(_bandwidth_row(row, copy_row), flush=True)
        return rows, copy_row

    x = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    try:
        dst = torch.empty_like(x)
        copy_row.bytes = 2 * nbytes
        copy_row.ms = median_ms(lambda dst=dst, x=x: dst.copy_(x))
        del dst
    except Exception as error:  # noqa: BLE001
        copy_row.error = _error(error)
    print(_bandwidth_row(copy_row, copy_row), flush=True)

    for row, (name, quantizer) in zip(rows, [*QUANTIZERS.items(), *QUANTIZERS.items()]):
        fake = row.kernel.startswith("fake_quantize")
        row.input_bytes = nbytes
        try:
            row.passes = 2 if kernel_spec(quantizer.spec, quantizer.rounding).needs_amax else 1
            if fake:
                row.counted = "x read + bf16 result written"
                row.bytes = 2 * nbytes
                row.ms = median_ms(lambda q=quantizer, x=x: codegen.fake_quantize(x, q))
            else:
                qt = codegen.quantize(x, quantizer)
                outputs = qt.codes.nbytes + qt.scales.nbytes + (4 if qt.tensor_scale is not None else 0)
                row.counted = "x read + codes + scales written"
                row.bytes = nbytes + outputs
                del qt
                row.ms = median_ms(lambda q=quantizer, x=x: codegen.quantize(x, q))
        except Exception as error:  # noqa: BLE001
            row.error = _error(error)
        print(_bandwidth_row(row, copy_row), flush=True)
    del x
    _free()
    return rows, copy_row


BANDWIDTH_HEADER = (
    "| kernel | bytes counted (effective) | input passes | time µs | effective GB/s | % of copy "
    f"| traffic GB/s | goal ≥ {COPY_GOAL:.0%} of copy |\n|---|---|---|---|---|---|---|---|"
)


def _bandwidth_row(row: BandwidthRow, copy_row: BandwidthRow) -> str:
    if row.ms is None:
        cell = row.error or MISSING
        return f"| {row.kernel} | {row.counted or '-'} | - | {cell} | {cell} | - | - | - |"
    effective = row.gbs(row.bytes)
    if copy_row.ms is None or row is copy_row:
        share, goal = ("100%", "-") if row is copy_row else ("copy missing", "-")
    else:
        fraction = effective / copy_row.gbs(copy_row.bytes)
        share, goal = f"{fraction:.0%}", "met" if fraction >= COPY_GOAL else "MISSED"
    return (
        f"| {row.kernel} | {row.counted} ({row.bytes / 2**20:.0f} MiB) | {row.passes} | {row.ms * 1e3:.1f} | "
        f"{effective:.0f} | {share} | {row.gbs(row.traffic):.0f} | {goal} |"
    )


# ---- 3. weight-only matmul -------------------------------------------------------------------------


@dataclass
class MatmulRow:
    fmt: str
    m: int
    qpass_ms: float | None = None
    torch_ms: float | None = None
    error: str | None = None  # of the qpass side (or why the row is missing)
    torch_error: str | None = None


def matmul_speed() -> list[MatmulRow]:
    rows = [MatmulRow(fmt, m) for fmt in MATMUL_FORMATS for m in MATMUL_MS]
    weight_matmul, missing = weight_matmul_function()
    if not CUDA:
        missing = MISSING
    if missing:
        for row in rows:
            row.error = missing
            print(_matmul_row(row), flush=True)
        return rows

    w = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)  # [N, K]
    inputs = {m: torch.randn(m, SIZE, device="cuda", dtype=torch.bfloat16) for m in MATMUL_MS}
    baseline = {}  # M -> ms of torch.matmul(x, wᵀ) in bf16 (or its error), shared by the formats' rows
    for m, x in inputs.items():
        try:
            baseline[m] = median_ms(lambda x=x, w=w: torch.matmul(x, w.T))
        except Exception as error:  # noqa: BLE001
            baseline[m] = f"error: {_error(error)}"
    for fmt in MATMUL_FORMATS:
        try:
            weight = codegen.quantize(w, Quantizer(fmt))  # once, as a deployed model stores it
        except Exception as error:  # noqa: BLE001
            weight, weight_error = None, f"quantizing the weight: {_error(error)}"
        for row in (r for r in rows if r.fmt == fmt):
            if isinstance(baseline[row.m], float):
                row.torch_ms = baseline[row.m]
            else:
                row.torch_error = baseline[row.m]
            try:
                if weight is None:
                    raise RuntimeError(weight_error)
                row.qpass_ms = median_ms(lambda x=inputs[row.m], weight=weight: weight_matmul(x, weight))
            except Exception as error:  # noqa: BLE001
                row.error = f"error: {_error(error)}"
            print(_matmul_row(row), flush=True)
        del weight
    del w, inputs
    _free()
    return rows


MATMUL_HEADER = (
    "| format | M | qpass weight_matmul µs | torch.matmul bf16 µs | speedup | goal |\n"
    "|---|---|---|---|---|---|"
)


def _matmul_row(row: MatmulRow) -> str:
    goal = MATMUL_GOALS.get(row.m)
    qpass_cell = f"{row.qpass_ms * 1e3:.1f}" if row.qpass_ms is not None else row.error
    torch_cell = f"{row.torch_ms * 1e3:.1f}" if row.torch_ms is not None else (row.torch_error or row.error)
    if row.qpass_ms is None or row.torch_ms is None:
        speedup, verdict = "-", f"≥ {goal}x: -" if goal else "-"
    else:
        ratio = row.torch_ms / row.qpass_ms
        speedup = f"{ratio:.2f}x"
        verdict = f"≥ {goal}x: {'met' if ratio >= goal else 'MISSED'}" if goal else "-"
    return f"| {row.fmt} | {row.m} | {qpass_cell} | {torch_cell} | {speedup} | {verdict} |"


# ---- 4. training linear ----------------------------------------------------------------------------


@dataclass
class TrainRow:
    variant: str
    ms: float | None = None
    error: str | None = None


def _torchao_float8(layer: nn.Module) -> nn.Module:
    from torchao.float8 import convert_to_float8_training

    # A root nn.Linear is swapped too: the swapped module is what is returned.
    return torch.compile(convert_to_float8_training(layer))


def _qpass_variant(recipe: str):
    def prepare(layer: nn.Module) -> nn.Module:
        return qpass.compile(layer, recipe, backend="inductor", kernels="triton")

    return prepare


def training_variants() -> list[tuple[str, object]]:
    """(name, prepare) per variant; prepare is a string, the reason, where the variant cannot be built."""
    variants = [("bf16 (torch.compile, inductor)", torch.compile)]
    has_kernels = "kernels" in inspect.signature(qpass.compile).parameters
    for recipe in TRAIN_RECIPES:
        name = f'qpass {recipe} (kernels="triton", inductor)'
        missing = "not available: qpass.compile has no kernels="
        variants.append((name, _qpass_variant(recipe) if has_kernels else missing))
    try:
        import torchao
        import torchao.float8  # noqa: F401

        name = f"torchao {torchao.__version__} float8 (tensorwise, torch.compile)"
        variants.append((name, _torchao_float8))
    except ImportError:
        variants.append(("torchao float8", "not installed"))
    return variants


def training_speed() -> list[TrainRow]:
    """Forward and backward (weight and input gradients) of one bias-free 8192x8192 linear layer on
    [TRAIN_TOKENS, 8192] bf16 activations; each variant compiles its own copy of the layer."""
    variants = training_variants()
    if not CUDA:
        rows = [TrainRow(name, error=MISSING if callable(prepare) else f"{prepare}; {MISSING}")
                for name, prepare in variants]
        for row in rows:
            print(_train_row(row, rows[0]), flush=True)
        return rows

    torch.manual_seed(0)
    base = nn.Linear(SIZE, SIZE, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(TRAIN_TOKENS, SIZE, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(TRAIN_TOKENS, SIZE, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, prepare in variants:
        row = TrainRow(name)
        if not callable(prepare):
            row.error = prepare
        else:
            try:
                layer = copy.deepcopy(base)
                model = prepare(layer)

                def step(model=model):
                    model(x).backward(grad)

                # The gradients are reset outside the timed region, so each step writes fresh ones.
                row.ms = median_ms(step, grad_to_none=[x, *model.parameters()])
                del layer, model
            except Exception as error:  # noqa: BLE001
                row.error = _error(error)
        rows.append(row)
        print(_train_row(row, rows[0]), flush=True)
        _free()
    return rows


TRAIN_HEADER = "| variant | forward + backward ms | speedup vs bf16 |\n|---|---|---|"


def _train_row(row: TrainRow, baseline: TrainRow) -> str:
    if row.ms is None:
        return f"| {row.variant} | {row.error} | - |"
    speedup = f"{baseline.ms / row.ms:.2f}x" if baseline.ms is not None else "bf16 missing"
    return f"| {row.variant} | {row.ms:.2f} | {speedup} |"


# ---- report ----------------------------------------------------------------------------------------


def machine() -> str:
    if CUDA:
        device = torch.cuda.get_device_name()
    else:
        device = "CPU only (no GPU): GPU figures missing; kernels in Triton's interpreter on "
        device += platform.machine()
    triton_version = triton.__version__ if triton is not None else "not installed"
    return f"{device}; torch {torch.__version__}, triton {triton_version}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if CUDA else "cpu"
    print(machine(), flush=True)
    print("Reproduce: python bench/kernels_gpu.py", flush=True)

    print("\n" + CHECK_HEADER, flush=True)
    checks = correctness(device)
    failed = [c for c in checks if c.passed is False]
    unchecked = sum(c.passed is None for c in checks)
    print("\n" + BANDWIDTH_HEADER, flush=True)
    bandwidth, copy_row = quantize_bandwidth()
    print("\n" + MATMUL_HEADER, flush=True)
    matmul = matmul_speed()
    print("\n" + TRAIN_HEADER, flush=True)
    training = training_speed()
    seconds = time.perf_counter() - started
    passed = sum(c.passed is True for c in checks)
    summary = (
        f"correctness: {passed} passed, {len(failed)} failed, {unchecked} not checked, of {len(checks)}; "
        f"{seconds:.0f} s in all."
    )
    print("\n" + summary)

    quant_shape = f"{SIZE}x{SIZE}" if CUDA else "x".join(map(str, CPU_QUANT_SHAPE))
    where = "On the GPU at the benchmark shapes." if CUDA else (
        f"On the CPU in Triton's interpreter (TRITON_INTERPRET=1) at small shapes: quantize {quant_shape}, "
        f"matmul (N, K) = {CPU_MATMUL_NK}, M in {CPU_MATMUL_MS}. The interpreter emulates bf16: "
        "its fp32 -> bf16 cast truncates (the rows say where that is the only difference), and its bf16 "
        "tl.dot is broken "
        "(triton-lang/triton#11584), so the kernels upcast bf16 dot operands there: the bf16 tensor-core "
        "paths are checked by the GPU run only."
    )
    section = [
        f"{machine()}.",
        "Reproduce: `make bench` (or `python bench/kernels_gpu.py`).",
        "",
        "### Correctness",
        "",
        "qpass.codegen's kernels against qpass's reference numerics. Quantize, fake_quantize and",
        "dequantize must match bit for bit (dequantize decodes the reference's own QTensor); the matmul",
        "must lie within one unit in the last place of its output plus (K + 2)·2⁻²⁴·Σ|x||w| of the",
        "exact product of x and the exactly dequantized weight (the error bound of fp32 accumulation), i.e.",
        "max error / bound ≤ 1 (a round-to-nearest output uses about half of it).",
        "",
        where,
        "",
        CHECK_HEADER,
        *map(_check_row, checks),
        "",
        f"- {summary}",
        "",
        f"### Quantize kernels ({SIZE}x{SIZE} bf16)",
        "",
        "Median of triton.testing.do_bench (CUDA events, L2 flushed before each repetition). Effective",
        "GB/s counts the least traffic the job needs: the input read once plus the outputs written (codes",
        "and scales for quantize, the bf16 result for fake_quantize). Per-tensor fp8 and NVFP4 (whose",
        "global scale needs the whole tensor's amax) run an amax pre-pass that reads the input a second",
        "time: traffic GB/s counts that read too. The goal is on the effective figure, against the copy",
        "measured in the same run.",
        "",
        BANDWIDTH_HEADER,
        _bandwidth_row(copy_row, copy_row),
        *(_bandwidth_row(r, copy_row) for r in bandwidth),
        "",
        f"### Weight-only matmul (y = x · dequant(W)ᵀ, N = K = {SIZE}, bf16 x)",
        "",
        "W quantized once along K by `qpass.codegen.quantize(w, Quantizer(format))` (default scale modes),",
        "then `qpass.codegen.weight_matmul(x, W)` against `torch.matmul(x, w.T)` with the bf16 weight;",
        "medians of do_bench as above. Speedup: torch time / qpass time.",
        "",
        MATMUL_HEADER,
        *map(_matmul_row, matmul),
        "",
        f"### Training linear layer ({SIZE}x{SIZE}, no bias, {TRAIN_TOKENS} tokens, bf16)",
        "",
        "Forward and backward (input and weight gradients) of `nn.Linear(8192, 8192, bias=False)` on a",
        f"[{TRAIN_TOKENS}, {SIZE}] bf16 input, each variant on its own copy of the same layer, every one",
        "compiled with inductor; gradients reset between repetitions outside the timed region. The",
        "torchao row is its float8 training (dynamic tensorwise scales) when torchao is installed.",
        "",
        TRAIN_HEADER,
        *(_train_row(r, training[0]) for r in training),
        "",
    ]
    if not args.no_write:
        write_section("kernels-gpu", "Triton kernels on the GPU (bench/kernels_gpu.py)", "\n".join(section))
    if failed:
        sys.exit(f"{len(failed)} correctness check(s) failed")


if __name__ == "__main__":
    main()
