"""qpass on the GPU: its kernels' and scaled GEMMs' correctness, then their speed and a training step's.

Run with `bash bench/gpu.sh` (sets up a CUDA torch and the peers first, keeps the whole run under 8
minutes), `make bench`, or `python bench/kernels_gpu.py` (`--no-write` only prints; `--dry-run`
without a GPU runs every measurement once on the CPU at tiny shapes, to try the code paths). Prints
the tables and writes them to bench/RESULTS.md between this benchmark's markers, with the machine.

1. Correctness. The kernels (``qpass.codegen``) against qpass's reference numerics
   (``qpass.quantize`` / ``dequantize`` / ``fake_quantize``), bit for bit: quantize (codes, scales,
   NVFP4's tensor scale), fake-quantize and dequantize, for fp32 and bf16 inputs; the GEMM-operand
   kernel (``qpass.codegen.gemm_operand.quantize_for_gemm``) against ``qpass.gemm_operand``'s; the
   weight-only matmul and the scaled GEMMs (``qpass.ops.gemm.scaled_gemm``) within the error bound of
   an fp32-accumulated product. On a GPU at the benchmark shapes; without one, at small shapes in
   Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU).
2. Quantize kernels: achieved bandwidth at 8192x8192 bf16 against a device-to-device copy measured
   in the same run. Goal: at least 80% of the copy's bandwidth.
3. MXFP4 and NVFP4 weight-only matmul (``qpass.codegen.weight_matmul``) against ``torch.matmul`` in
   bf16 at N = K = 8192. Goals: at least 2.5x at M = 1, at least 0.9x at M = 2048.
4. Scaled GEMMs (fp8 per tensor and per row, MXFP8, MXFP4 operands) against ``torch.matmul`` in
   bf16 at N = K = 8192, M in {1, 16, 128, 2048}, with the route each takes.
5. A linear layer's forward + backward at 4096 and 8192 dims under ``qpass.compile(...,
   kernels="triton")`` with fp8-train and mxfp8-train (and fp8-rowwise-train where qpass has it),
   against the same layer in bf16 and torchao's float8 training (tensorwise and rowwise), all
   torch.compile'd with inductor. Goals: fp8-train at least 1.3x bf16 at 8192, and at least torchao's
   tensorwise float8 in the same run.
6. A small Llama's training step (forward, backward, AdamW) in bf16, under qpass fp8-train, and
   under torchao float8: ms per step and tokens per second.

Without a GPU, parts 2-6 are reported as missing, never estimated. Each measurement is guarded: one
that fails shows its error in its row and the script goes on. The run keeps to a time limit
(``--deadline`` / ``--budget-s``), shared out among the parts; rows it does not reach read
"missing: out of time".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.metadata
import inspect
import os
import platform
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
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
    CODEGEN_ERROR = f"missing: {type(error).__name__}: {error}"

DEVICE = "cuda" if CUDA else "cpu"
# What compiles the training variants. In a dry run (no GPU) aot_eager stands in for inductor (whose
# CPU code generation takes minutes) and qpass's kernels run in Triton's interpreter (main sets them).
BACKEND = "inductor"
KERNELS = "triton"
DRY_RUN = False  # set by main: --dry-run without a GPU


@dataclass(frozen=True)
class Shapes:
    quantize: tuple[int, int]  # the quantize kernels' input
    gemm_nk: tuple[int, int]  # N and K of the weight-only matmul and the scaled GEMMs
    gemm_ms: tuple[int, ...]  # their M
    linear: tuple[int, ...]  # square training layers: [size tokens, size] x [size, size]ᵀ
    llama: dict = field(hash=False)  # LlamaConfig's fields
    llama_batch: tuple[int, int] = (8, 1024)  # (sequences, tokens each) of a training step


GPU_SHAPES = Shapes(
    quantize=(8192, 8192), gemm_nk=(8192, 8192), gemm_ms=(1, 16, 128, 2048), linear=(4096, 8192),
    llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
    llama_batch=(8, 1024),
)
# The interpreter is slow: small shapes that still have partial tiles (40 rows over 16-row tiles,
# 480 = 15 blocks of 32 over 128-wide tiles) and whole scaling blocks.
CPU_SHAPES = Shapes(
    quantize=(40, 480), gemm_nk=(96, 480), gemm_ms=(1, 16), linear=(64, 128),
    llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=256),
    llama_batch=(2, 32),
)
# A dry run only tries the code: the least that still has a partial tile and whole scaling blocks.
DRY_SHAPES = Shapes(
    quantize=(16, 96), gemm_nk=(32, 96), gemm_ms=(1,), linear=(64,),
    llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=128),
    llama_batch=(1, 16),
)
# The correctness checks' shapes, and the timed parts' (whose rows say what is missing without a GPU).
# A dry run takes DRY_SHAPES for both (main).
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
TIMED = GPU_SHAPES

QUANTIZERS = {  # what the quantize kernels are timed on (and checked at)
    "mxfp8_e4m3 (rceil)": Quantizer("mxfp8_e4m3", scale_mode="rceil"),
    "mxfp4": Quantizer("mxfp4"),
    "nvfp4": Quantizer("nvfp4"),
    "fp8_e4m3 (per tensor)": Quantizer("fp8_e4m3"),
}
GEMM_QUANTIZERS = {  # the scaled GEMMs' operand formats: name -> Quantizer's arguments
    "fp8_e4m3 per tensor": ("fp8_e4m3", {}),
    "fp8_e4m3 per row": ("fp8_e4m3", {"granularity": "channel"}),
    "mxfp8_e4m3": ("mxfp8_e4m3", {}),
    "mxfp4": ("mxfp4", {}),
}
COPY_GOAL = 0.80  # of the copy's bandwidth
MATMUL_FORMATS = ("mxfp4", "nvfp4")
MATMUL_GOALS = {1: 2.5, 2048: 0.9}  # M -> the speedup over bf16 torch.matmul to reach
TRAIN_RECIPES = ("fp8-train", "mxfp8-train", "fp8-rowwise-train")
LINEAR_GOAL_SIZE = 8192
LINEAR_GOALS = {"bf16": 1.3, "torchao tensorwise": 1.0}  # fp8-train's speedup over each, at 8192
LLAMA_STEPS = (3, 10)  # warm-up steps (the first compiles), then timed steps

# The share of the time budget each part gets (of what is left when it starts: time a part does not
# use goes to the ones after it). Compilation dominates parts 5 and 6: 12 and 3 compiled models.
PART_WEIGHTS = {
    "correctness": 22, "quantize": 7, "weight-only": 8, "scaled-gemm": 8, "linear": 33, "llama": 22,
}
DEFAULT_BUDGET_S = 450

MISSING = "missing (no GPU)"
DRY_RUN_OK = "missing (no GPU; the dry run ran it once on the CPU)"
OUT_OF_TIME = "missing: out of time"
INTERPRETER_BF16 = "bit-exact up to the interpreter's bf16 cast (it truncates; a GPU rounds to nearest)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _error(error: BaseException) -> str:
    """An exception as one short table cell."""
    text = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
    text = text if len(text) <= 160 else text[:157] + "..."
    return text.replace("|", "/")


def runs_here() -> bool:
    """Whether parts 2-6 run: on a GPU, or once each on the CPU in a dry run."""
    return CUDA or DRY_RUN


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# ---- the time limit ----------------------------------------------------------------------------------


class OutOfTime(BaseException):
    """Raised where a part's share of the time runs out. A BaseException, so that no library's
    ``except Exception`` (torch.compile's fallbacks, say) swallows it: the rows catch FAILURES."""


class Missing(Exception):
    """A figure this machine cannot give (no GPU); the message is the row's cell."""


FAILURES = (Exception, OutOfTime)


class Budget:
    """The run's deadline, shared out among the parts by PART_WEIGHTS. Inside a part an interval
    timer raises OutOfTime at the part's end, also in the middle of a compilation or a measurement
    that would run on; ``check`` stops the rows after it before they start."""

    def __init__(self, deadline: float):
        self.deadline = deadline  # time.time() at which every part must be done
        self.part_end = deadline

    def left(self) -> float:
        return self.part_end - time.time()

    def check(self) -> None:
        if self.left() <= 0:
            raise OutOfTime()

    @staticmethod
    def _expire(signum, frame):
        raise OutOfTime()

    @contextlib.contextmanager
    def part(self, name: str):
        names = list(PART_WEIGHTS)
        later = sum(PART_WEIGHTS[n] for n in names[names.index(name):])
        share = (self.deadline - time.time()) * PART_WEIGHTS[name] / later
        self.part_end = time.time() + max(share, 0.0)
        previous = signal.signal(signal.SIGALRM, self._expire)
        if share > 0:
            signal.setitimer(signal.ITIMER_REAL, share)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.part_end = self.deadline


BUDGET = Budget(time.time() + DEFAULT_BUDGET_S)  # replaced by main


def failure(error: BaseException) -> str:
    """What a row shows for a measurement that raised."""
    if isinstance(error, OutOfTime):
        return OUT_OF_TIME
    if isinstance(error, Missing):
        return str(error)
    return f"error: {_error(error)}"


# ---- timing ----------------------------------------------------------------------------------------


def median_ms(fn, grad_to_none=None) -> float:
    """Median time of ``fn`` in ms: one call first (autotuning, compilation), then triton's do_bench
    (CUDA events, 25 ms of warm-up, about 100 ms of repetitions, the L2 cache flushed before each)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def steps_ms(fn, warmup: int = LLAMA_STEPS[0], steps: int = LLAMA_STEPS[1]) -> float:
    """Median of ``steps`` timed calls of ``fn`` (CUDA events around each) after ``warmup`` calls: for
    a whole training step, which do_bench would repeat too few times to settle."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in "se") for _ in range(steps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure_ms(fn, timer=median_ms, **kwargs) -> float:
    """``timer(fn)`` on the GPU. Without one it raises Missing, in a dry run after calling ``fn`` once
    (twice with steps_ms, whose second call runs what the first compiled): no figure, but every line
    the GPU run would take is tried."""
    BUDGET.check()
    if CUDA:
        return timer(fn, **kwargs)
    if DRY_RUN:
        try:
            for _ in range(2 if timer is steps_ms else 1):
                fn()
        except Exception as error:  # noqa: BLE001 -- the row says what failed
            raise Missing(f"{MISSING}; the dry run failed on the CPU: {_error(error)}") from error
        raise Missing(DRY_RUN_OK)
    raise Missing(MISSING)


# ---- the APIs measured, imported where they are used (some are being written) ---------------------


def weight_matmul_function():
    """``qpass.codegen.weight_matmul``, or None and why not (a feature gap, not a failure)."""
    if codegen is None:
        return None, CODEGEN_ERROR
    try:
        from qpass.codegen import weight_matmul
    except ImportError as error:
        return None, f"missing: {_error(error)}"
    return weight_matmul, None


def gemm_operand_kernel():
    """``qpass.codegen.gemm_operand.quantize_for_gemm`` (the kernel), or None and why not."""
    if codegen is None:
        return None, CODEGEN_ERROR
    try:
        from qpass.codegen.gemm_operand import quantize_for_gemm
    except Exception as error:  # noqa: BLE001 -- ImportError, or a module half written
        return None, f"missing: {_error(error)}"
    return quantize_for_gemm, None


def reference_operand(x: torch.Tensor, quantizer: Quantizer, axis: int = -1):
    """``qpass.gemm_operand.quantize_for_gemm``: the reference the kernel and the GEMMs are held to."""
    from qpass.gemm_operand import quantize_for_gemm

    return quantize_for_gemm(x, quantizer, axis)


def scaled_gemm_functions():
    """``(scaled_gemm, route)`` of ``qpass.ops.gemm``, or None and why not."""
    try:
        from qpass.ops.gemm import route, scaled_gemm
    except Exception as error:  # noqa: BLE001
        return None, f"missing: {_error(error)}"
    return (scaled_gemm, route), None


def route_name(route, a, b, out_dtype: torch.dtype) -> str:
    """The route ``qpass.ops.gemm`` takes for ``a · bᵀ``. ``route`` takes the two operands and the
    output dtype, or (its first version) the two quantizers and the device: read off its signature."""
    first = next(iter(inspect.signature(route).parameters.values()))
    if "Quantizer" in str(first.annotation):
        return route(a.quantizer, b.quantizer, a.codes.device)
    return route(a, b, out_dtype)


def gemm_quantizer(name: str) -> Quantizer:
    fmt, options = GEMM_QUANTIZERS[name]
    return Quantizer(fmt, **options)


# ---- 1. correctness --------------------------------------------------------------------------------


@dataclass
class Check:
    what: str
    shape: str
    dtype: str
    result: str
    passed: bool | None  # None: not checked (a missing feature, or out of time)


INT_VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in INT_VIEWS:
        return t.view(INT_VIEWS[t.dtype])
    return t.view(torch.uint8) if t.element_size() == 1 else t  # fp8 codes: their bytes


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


def parts_result(parts: dict) -> tuple[str, bool]:
    """``parts``: name -> (got, want) tensors (None where a side lacks it), compared bit for bit."""
    bad = {
        part: (differing(a, b) if a is not None and b is not None else "one side missing")
        for part, (a, b) in parts.items()
        if a is not None or b is not None
    }
    bad = {part: n for part, n in bad.items() if n != 0}
    if not bad:
        return f"bit-exact ({', '.join(p for p, (a, b) in parts.items() if a is not None)})", True
    return "MISMATCH: " + ", ".join(f"{part} {n} differ" for part, n in bad.items()), False


def _shape(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape))


def quantize_checks(name: str, quantizer: Quantizer, x: torch.Tensor) -> list[Check]:
    """quantize (codes, scales, tensor scale), fake_quantize and dequantize against the reference."""
    spec, rounding = quantizer.spec, quantizer.rounding
    shape, dtype = _shape(x), _name(x.dtype)
    checks = []

    def check(what: str, run) -> None:
        try:
            BUDGET.check()
            result, passed = run()
        except FAILURES as error:  # a failing kernel is a row, not the end of the run
            result, passed = failure(error), None if isinstance(error, OutOfTime) else False
        checks.append(Check(f"{what} {name}", shape, dtype, result, passed))

    try:
        reference = qpass.quantize(x, spec, rounding=rounding)
    except Exception as error:  # noqa: BLE001
        cell = f"error in the reference: {_error(error)}"
        jobs = ("quantize", "fake_quantize", "dequantize")
        return [Check(f"{what} {name}", shape, dtype, cell, False) for what in jobs]

    def quantize():
        got = codegen.quantize(x, quantizer)
        return parts_result({
            "codes": (got.codes, reference.codes), "scales": (got.scales, reference.scales),
            "tensor scale": (got.tensor_scale, reference.tensor_scale),
        })

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


def operand_result(got, want, swizzled: bool = False) -> tuple[str, bool]:
    """A GemmOperand from the kernel against the reference's, bit for bit (``swizzled``: the kernel's
    block scales in the 32_4_4 layout, compared with the reference's swizzled in plain torch)."""
    want_scales = want.scales
    if swizzled and want.quantizer.spec.blocked:
        from qpass.formats.swizzle import swizzle_scales

        want_scales = swizzle_scales(want.scales)
    if got.length != want.length:
        return f"MISMATCH: length {got.length}, expected {want.length}", False
    return parts_result({
        "codes": (got.codes, want.codes), "scales": (got.scales, want_scales),
        "global scale": (got.global_scale, want.global_scale),
    })


# The GEMM-operand kernel's cases: what it is called with, and how its output is checked.
OPERAND_CASES = ("axis -1", "axis 0", "transposed (both orientations)", "swizzled scales")


def operand_case(kernel, x: torch.Tensor, quantizer: Quantizer, case: str) -> tuple[str, bool]:
    if case == "axis -1":
        return operand_result(kernel(x, quantizer, -1), reference_operand(x, quantizer, -1))
    if case == "axis 0":
        return operand_result(kernel(x, quantizer, 0), reference_operand(x, quantizer, 0))
    if case == "swizzled scales":
        got = kernel(x, quantizer, -1, swizzle=True)
        return operand_result(got, reference_operand(x, quantizer, -1), swizzled=True)
    along, other = kernel(x, quantizer, -1, transposed=True)
    (text, ok), (text_t, ok_t) = (operand_result(along, reference_operand(x, quantizer, -1)),
                                  operand_result(other, reference_operand(x, quantizer, -2)))
    return f"along -1: {text}; along -2: {text_t}", ok and ok_t


def operand_checks(x: torch.Tensor, checks: list[Check]) -> None:
    """The GEMM-operand kernel against ``qpass.gemm_operand.quantize_for_gemm``, per format and case."""
    kernel, missing = gemm_operand_kernel()
    for name in GEMM_QUANTIZERS:
        for case in OPERAND_CASES:
            what = f"quantize_for_gemm {name}, {case}"
            if missing:
                checks.append(Check(what, _shape(x), _name(x.dtype), missing, None))
                continue
            try:
                BUDGET.check()
                result, passed = operand_case(kernel, x, gemm_quantizer(name), case)
            except FAILURES as error:
                result, passed = failure(error), None if isinstance(error, OutOfTime) else False
            checks.append(Check(what, _shape(x), _name(x.dtype), result, passed))
            _print_checks(checks[-1:])


def error_ratio(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """max |y - exact| / bound over the output, for ``y`` = a · bᵀ as a kernel or GEMM made it from
    operands whose exact values are ``a`` [M, K] and ``b`` [N, K].

    exact: the product in fp64. bound: one unit in the last place of y's dtype (its final rounding)
    plus (K + 2)·2⁻²⁴·Σ|a||b|, the error of an fp32-accumulated dot product of length K (with a
    rounding each for a scale product and the accumulator's scaling). Under 1 means within the
    tolerance of fp32 accumulation.
    """
    a, b = a.double(), b.double()
    exact = a @ b.T
    magnitude = a.abs() @ b.abs().T
    k = a.shape[-1]
    bound = torch.finfo(y.dtype).eps * exact.abs() + (k + 2) * 2.0**-24 * magnitude
    error = (y.double() - exact).abs()
    ratio = torch.where(error == 0, torch.zeros_like(error), error / bound)
    return float(ratio.max())


def tolerance_result(y: torch.Tensor, shape: tuple[int, int], a: torch.Tensor, b: torch.Tensor, note=""):
    """(result, passed) of ``y`` against the tolerance of error_ratio."""
    if tuple(y.shape) != shape:
        return f"MISMATCH: output shape {tuple(y.shape)}, expected {shape}", False
    ratio = error_ratio(y, a, b)
    verdict = "within tolerance" if ratio <= 1 else "OUT OF TOLERANCE"
    return f"{verdict} (max error / bound {ratio:.3f}, output {_name(y.dtype)}{note})", ratio <= 1


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
    w_exact = qpass.dequantize(dataclasses.replace(weight, dtype=torch.float32))
    return tolerance_result(y, (m, n), x, w_exact)


def matmul_checks(device, checks: list[Check]) -> None:
    """bf16 x (the benchmarked case: a bf16 tensor-core dot) and fp32 x (an IEEE fp32 dot)."""
    (n, k), ms = SHAPES.gemm_nk, SHAPES.gemm_ms
    weight_matmul, missing = weight_matmul_function()
    for dtype in (torch.bfloat16, torch.float32):
        for fmt in MATMUL_FORMATS:
            for m in ms:
                what, shape, dtype_name = f"weight_matmul {fmt}", f"M={m}, N={n}, K={k}", _name(dtype)
                if missing:
                    checks.append(Check(what, shape, dtype_name, missing, None))
                    continue
                try:
                    BUDGET.check()
                    result, passed = matmul_check(weight_matmul, fmt, m, n, k, dtype, device)
                except FAILURES as error:
                    result, passed = failure(error), None if isinstance(error, OutOfTime) else False
                if passed is False and dtype == torch.bfloat16 and interpreter_bf16_dot_broken():
                    # Still a failure (a kernel must upcast bf16 dot operands here to be checkable on
                    # the CPU at all), but one whose likely cause the row names.
                    result += ("; this interpreter's bf16 tl.dot is broken (triton-lang/triton#11584): "
                               "a kernel that does not upcast bf16 dot operands under it fails here")
                checks.append(Check(what, shape, dtype_name, result, passed))
                _print_checks(checks[-1:])


def scaled_gemm_checks(device, checks: list[Check]) -> None:
    """``scaled_gemm`` of operands quantized by the reference (so only the GEMM is checked), bf16 out,
    against the fp64 product of their exact values; the row names the route it took."""
    (n, k), ms = SHAPES.gemm_nk, SHAPES.gemm_ms
    functions, missing = scaled_gemm_functions()
    generator = torch.Generator(device).manual_seed(1)
    w = torch.randn(n, k, generator=generator, device=device, dtype=torch.bfloat16)
    xs = {m: torch.randn(m, k, generator=generator, device=device, dtype=torch.bfloat16) for m in ms}
    for name in GEMM_QUANTIZERS:
        b = None
        for m in ms:
            what, shape = f"scaled_gemm {name} x {name}", f"M={m}, N={n}, K={k}"
            if missing:
                checks.append(Check(what, shape, "bfloat16", missing, None))
                continue
            scaled_gemm, route = functions
            try:
                BUDGET.check()
                quantizer = gemm_quantizer(name)
                b = reference_operand(w, quantizer) if b is None else b
                a = reference_operand(xs[m], quantizer)
                y = scaled_gemm(a, b, torch.bfloat16)
                note = f"; route: {route_name(route, a, b, torch.bfloat16)}"
                result, passed = tolerance_result(y, (m, n), a.dequantize(), b.dequantize(), note)
            except FAILURES as error:
                result, passed = failure(error), None if isinstance(error, OutOfTime) else False
            checks.append(Check(what, shape, "bfloat16", result, passed))
            _print_checks(checks[-1:])


def correctness(device, checks: list[Check]) -> None:
    """Every check, appended to ``checks`` as it is made."""
    if codegen is None:
        checks.append(Check("qpass.codegen", "-", "-", CODEGEN_ERROR, None))
    else:
        for dtype in (torch.float32, torch.bfloat16):
            generator = torch.Generator(device).manual_seed(0)
            x = torch.randn(*SHAPES.quantize, generator=generator, device=device).to(dtype)
            for name, quantizer in QUANTIZERS.items():
                checks += quantize_checks(name, quantizer, x)
                _print_checks(checks[-3:])
            del x
        generator = torch.Generator(device).manual_seed(0)
        operand_checks(torch.randn(*SHAPES.quantize, generator=generator, device=device).to(torch.bfloat16),
                       checks)
        matmul_checks(device, checks)
    scaled_gemm_checks(device, checks)
    _free()


CHECK_HEADER = "| check | shape | input dtype | result |\n|---|---|---|---|"


def _check_row(c: Check) -> str:
    return f"| {c.what} | {c.shape} | {c.dtype} | {c.result} |"


def _print_checks(checks: list[Check]) -> None:
    for c in checks:
        print(_check_row(c), flush=True)


# ---- 2. quantize kernels ---------------------------------------------------------------------------


@dataclass
class BandwidthRow:
    kernel: str
    counted: str = ""  # which bytes the effective figure counts
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


def bandwidth_rows() -> list[BandwidthRow]:
    """The copy first, then each quantizer's quantize and fake-quantize kernels, then the GEMM-operand
    kernel per format: along K alone, and transposed (both orientations, as a training step needs)."""
    names = [f"quantize {n}" for n in QUANTIZERS] + [f"fake_quantize {n}" for n in QUANTIZERS]
    names += [f"quantize_for_gemm {n} ({how})" for n in GEMM_QUANTIZERS for how in ("axis -1", "transposed")]
    initial = OUT_OF_TIME if runs_here() else MISSING
    return [BandwidthRow("device-to-device copy (`dst.copy_(x)`)", "x read + x written", error=initial),
            *(BandwidthRow(name, error=initial) for name in names)]


def _operand_bytes(result) -> int:
    operands = result if isinstance(result, tuple) else (result,)
    return sum(operand.nbytes() for operand in operands)


def _time_kernel(row: BandwidthRow, x: torch.Tensor, make) -> None:
    """Fill ``row`` with a kernel's time. ``make()`` gives (the call, the bytes a result writes, the
    input's reads, what the effective figure counts); it runs inside the guard, as may fail too."""
    try:
        BUDGET.check()
        fn, output_bytes, passes, counted = make()
        row.input_bytes, row.passes, row.counted = x.nbytes, passes, counted
        result = fn()
        row.bytes = x.nbytes + output_bytes(result)
        del result
        row.ms, row.error = measure_ms(fn), None
    except FAILURES as error:
        row.error = failure(error)


def _quantize_job(x: torch.Tensor, quantizer: Quantizer, fake: bool):
    passes = 2 if kernel_spec(quantizer.spec, quantizer.rounding).needs_amax else 1
    if fake:
        return functools.partial(codegen.fake_quantize, x, quantizer), lambda out: out.nbytes, passes, (
            "x read + bf16 result written")

    def outputs(qt):
        return qt.codes.nbytes + qt.scales.nbytes + (4 if qt.tensor_scale is not None else 0)

    counted = "x read + codes + scales written"
    return functools.partial(codegen.quantize, x, quantizer), outputs, passes, counted


def _operand_job(kernel, x: torch.Tensor, name: str, transposed: bool):
    quantizer = gemm_quantizer(name)
    counted = "x read + both operands written" if transposed else "x read + codes + scales written"
    fn = functools.partial(kernel, x, quantizer, -1, transposed=transposed)
    return fn, _operand_bytes, _amax_passes(quantizer), counted


def _amax_passes(quantizer: Quantizer) -> int:
    """Input reads of the GEMM-operand kernel: its amax pre-pass runs for per-tensor and per-row
    scales and NVFP4's global scale (the kernel's TENSOR_AMAX and ROW_AMAX flags)."""
    spec = quantizer.spec
    return 2 if spec.granularity in ("tensor", "channel") or spec.scaling == "nvfp4" else 1


def quantize_bandwidth(rows: list[BandwidthRow]) -> None:
    copy_row, kernel_rows = rows[0], iter(rows[1:])
    x = torch.randn(*TIMED.quantize, device=DEVICE, dtype=torch.bfloat16)
    try:
        dst = torch.empty_like(x)
        copy_row.bytes = 2 * x.nbytes
        copy_row.ms, copy_row.error = measure_ms(lambda dst=dst, x=x: dst.copy_(x)), None
        del dst
    except FAILURES as error:
        copy_row.error = failure(error)
    print(_bandwidth_row(copy_row, copy_row), flush=True)

    if codegen is None:
        for row in kernel_rows:
            row.error = CODEGEN_ERROR
        return
    for fake in (False, True):
        for quantizer in QUANTIZERS.values():
            row = next(kernel_rows)
            _time_kernel(row, x, functools.partial(_quantize_job, x, quantizer, fake))
            print(_bandwidth_row(row, copy_row), flush=True)

    kernel, missing = gemm_operand_kernel()
    for name in GEMM_QUANTIZERS:
        for transposed in (False, True):
            row = next(kernel_rows)
            if missing:
                row.error = missing
            else:
                _time_kernel(row, x, functools.partial(_operand_job, kernel, x, name, transposed))
            print(_bandwidth_row(row, copy_row), flush=True)
    del x
    _free()


BANDWIDTH_HEADER = (
    "| kernel | bytes counted (effective) | input passes | time µs | effective GB/s | % of copy "
    f"| traffic GB/s | goal ≥ {COPY_GOAL:.0%} of copy |\n|---|---|---|---|---|---|---|---|"
)


def _copy_share(row: BandwidthRow, copy_row: BandwidthRow) -> float | None:
    if row.ms is None or copy_row.ms is None:
        return None
    return row.gbs(row.bytes) / copy_row.gbs(copy_row.bytes)


def _bandwidth_row(row: BandwidthRow, copy_row: BandwidthRow) -> str:
    if row.ms is None:
        cell = row.error or MISSING
        return f"| {row.kernel} | {row.counted or '-'} | - | {cell} | {cell} | - | - | - |"
    share = _copy_share(row, copy_row)
    if row is copy_row:
        share_cell, goal = "100%", "-"
    elif share is None:
        share_cell, goal = "copy missing", "-"
    else:
        share_cell, goal = f"{share:.0%}", "met" if share >= COPY_GOAL else "MISSED"
    return (
        f"| {row.kernel} | {row.counted} ({row.bytes / 2**20:.0f} MiB) | {row.passes} | {row.ms * 1e3:.1f} | "
        f"{row.gbs(row.bytes):.0f} | {share_cell} | {row.gbs(row.traffic):.0f} | {goal} |"
    )


# ---- the bf16 baseline of parts 3 and 4 ------------------------------------------------------------


_BASELINE_MS: dict[int, float] = {}  # M -> ms of torch.matmul(x, wᵀ) in bf16, shared by parts 3 and 4


def baseline_ms(m: int, x: torch.Tensor, w: torch.Tensor) -> float:
    """bf16 ``torch.matmul(x, w.T)`` (x [M, K], w [N, K]), measured once per M in the run."""
    if m not in _BASELINE_MS:
        _BASELINE_MS[m] = measure_ms(lambda: torch.matmul(x, w.T))
    return _BASELINE_MS[m]


@dataclass
class GemmRow:
    fmt: str
    m: int
    qpass_ms: float | None = None
    torch_ms: float | None = None
    error: str | None = None  # of the qpass side (or why the row is missing)
    torch_error: str | None = None
    route: str = "-"


def gemm_rows(formats) -> list[GemmRow]:
    initial = OUT_OF_TIME if runs_here() else MISSING
    return [GemmRow(fmt, m, error=initial, torch_error=initial) for fmt in formats for m in TIMED.gemm_ms]


def _fill_baseline(row: GemmRow, x: torch.Tensor, w: torch.Tensor) -> None:
    try:
        row.torch_ms, row.torch_error = baseline_ms(row.m, x, w), None
    except FAILURES as error:
        row.torch_error = failure(error)


def _gemm_inputs():
    n, k = TIMED.gemm_nk
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    return w, {m: torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) for m in TIMED.gemm_ms}


def _speedup(torch_ms: float | None, qpass_ms: float | None, goal: float | None) -> tuple[str, str]:
    """(speedup, goal verdict) cells."""
    if qpass_ms is None or torch_ms is None:
        return "-", f"≥ {goal}x: -" if goal else "-"
    ratio = torch_ms / qpass_ms
    return f"{ratio:.2f}x", (f"≥ {goal}x: {'met' if ratio >= goal else 'MISSED'}" if goal else "-")


# ---- 3. weight-only matmul -------------------------------------------------------------------------


def matmul_speed(rows: list[GemmRow]) -> None:
    weight_matmul, missing = weight_matmul_function()
    w, inputs = _gemm_inputs()
    for fmt in MATMUL_FORMATS:
        weight, weight_error = None, missing
        if not missing:
            try:
                BUDGET.check()
                weight = codegen.quantize(w, Quantizer(fmt))  # once, as a deployed model stores it
            except FAILURES as error:
                weight_error = f"quantizing the weight: {failure(error)}"
        for row in (r for r in rows if r.fmt == fmt):
            _fill_baseline(row, inputs[row.m], w)
            try:
                if weight is None:
                    raise Missing(weight_error)
                call = functools.partial(weight_matmul, inputs[row.m], weight)
                row.qpass_ms, row.error = measure_ms(call), None
            except FAILURES as error:
                row.error = failure(error)
            print(_matmul_row(row), flush=True)
        del weight
    del w, inputs
    _free()


MATMUL_HEADER = (
    "| format | M | qpass weight_matmul µs | torch.matmul bf16 µs | speedup | goal |\n"
    "|---|---|---|---|---|---|"
)


def _us(ms: float | None, error: str | None) -> str:
    return f"{ms * 1e3:.1f}" if ms is not None else (error or MISSING)


def _matmul_row(row: GemmRow) -> str:
    speedup, verdict = _speedup(row.torch_ms, row.qpass_ms, MATMUL_GOALS.get(row.m))
    qpass_cell, torch_cell = _us(row.qpass_ms, row.error), _us(row.torch_ms, row.torch_error)
    return f"| {row.fmt} | {row.m} | {qpass_cell} | {torch_cell} | {speedup} | {verdict} |"


# ---- 4. scaled GEMMs -------------------------------------------------------------------------------


def _operands(x: torch.Tensor, quantizer: Quantizer):
    """x quantized along K by the GEMM-operand kernel where there is one, else by the reference: the
    timing is of the GEMM alone, on operands made beforehand."""
    kernel, _ = gemm_operand_kernel()
    if kernel is not None:
        with contextlib.suppress(Exception):
            return kernel(x, quantizer, -1)
    return reference_operand(x, quantizer)


def scaled_gemm_speed(rows: list[GemmRow]) -> None:
    functions, missing = scaled_gemm_functions()
    w, inputs = _gemm_inputs()
    for name in GEMM_QUANTIZERS:
        b, b_error = None, missing
        if not missing:
            try:
                BUDGET.check()
                b = _operands(w, gemm_quantizer(name))
            except FAILURES as error:
                b_error = f"quantizing the weight: {failure(error)}"
        for row in (r for r in rows if r.fmt == name):
            _fill_baseline(row, inputs[row.m], w)
            try:
                if b is None:
                    raise Missing(b_error)
                scaled_gemm, route = functions
                a = _operands(inputs[row.m], b.quantizer)
                row.route = route_name(route, a, b, torch.bfloat16)
                row.qpass_ms, row.error = measure_ms(lambda a=a, b=b: scaled_gemm(a, b, torch.bfloat16)), None
            except FAILURES as error:
                row.error = failure(error)
            print(_gemm_row(row), flush=True)
        del b
    del w, inputs
    _free()


GEMM_HEADER = (
    "| operands | M | route | qpass scaled_gemm µs | torch.matmul bf16 µs | speedup |\n"
    "|---|---|---|---|---|---|"
)


def _gemm_row(row: GemmRow) -> str:
    speedup, _ = _speedup(row.torch_ms, row.qpass_ms, None)
    qpass_cell, torch_cell = _us(row.qpass_ms, row.error), _us(row.torch_ms, row.torch_error)
    return f"| {row.fmt} | {row.m} | {row.route} | {qpass_cell} | {torch_cell} | {speedup} |"


# ---- the training variants of parts 5 and 6 --------------------------------------------------------


def _torchao_float8(recipe: str):
    def prepare(model: nn.Module) -> nn.Module:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(recipe)
        # As qpass's recipes do, the output projection stays in bf16. A root nn.Linear is swapped too:
        # the swapped module is what is returned.
        converted = convert_to_float8_training(
            model, config=config, module_filter_fn=lambda _, fqn: fqn != "lm_head")
        return torch.compile(converted, backend=BACKEND)

    return prepare


def _qpass_variant(recipe: str):
    def prepare(model: nn.Module) -> nn.Module:
        return qpass.compile(model, recipe, backend=BACKEND, kernels=KERNELS)

    return prepare


def _bf16(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend=BACKEND)


def training_variants(recipes=TRAIN_RECIPES, torchao_recipes=("tensorwise", "rowwise")) -> list[tuple]:
    """(name, prepare) per variant; prepare is a string, the row's cell, where it cannot be built."""
    variants = [(f"bf16 (torch.compile, {BACKEND})", _bf16)]
    has_kernels = "kernels" in inspect.signature(qpass.compile).parameters
    for recipe in recipes:
        name = f'qpass {recipe} (kernels="{KERNELS}", {BACKEND})'
        if not has_kernels:
            variants.append((name, "missing: qpass.compile has no kernels="))
        elif recipe not in qpass.recipes():
            variants.append((name, f"missing: qpass has no recipe {recipe!r} yet"))
        else:
            variants.append((name, _qpass_variant(recipe)))
    try:
        import torchao
        import torchao.float8  # noqa: F401

        for recipe in torchao_recipes:
            name = f"torchao {torchao.__version__} float8 {recipe} (torch.compile)"
            variants.append((name, _torchao_float8(recipe)))
    except Exception as error:  # noqa: BLE001 -- ImportError, or a torchao that does not fit this torch
        variants += [(f"torchao float8 {recipe}", f"missing: {_error(error)}") for recipe in torchao_recipes]
    return variants


def _fresh_compiler() -> None:
    """Drop what earlier variants compiled: one code object (nn.Linear.forward, the Llama's) compiled
    for more modules than Dynamo's recompile limit would silently run the rest eagerly."""
    torch._dynamo.reset()
    _free()


# ---- 5. training linear ----------------------------------------------------------------------------


@dataclass
class TrainRow:
    variant: str
    size: int
    ms: float | None = None
    error: str | None = None


def linear_rows() -> list[TrainRow]:
    rows = []
    for name, prepare in training_variants():
        for size in TIMED.linear:
            error = prepare if isinstance(prepare, str) else OUT_OF_TIME if runs_here() else MISSING
            rows.append(TrainRow(name, size, error=error))
    return sorted(rows, key=lambda r: r.size)


def linear_speed(rows: list[TrainRow]) -> None:
    """Forward and backward (weight and input gradients) of one bias-free size x size linear layer on
    [size, size] bf16 activations; each variant compiles its own copy of the same layer."""
    prepares = dict(training_variants())
    for size in TIMED.linear:
        torch.manual_seed(0)
        base = nn.Linear(size, size, bias=False, device=DEVICE, dtype=torch.bfloat16)
        x = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        for row in (r for r in rows if r.size == size):
            prepare = prepares[row.variant]
            if callable(prepare):
                try:
                    BUDGET.check()
                    _fresh_compiler()
                    model = prepare(copy.deepcopy(base))

                    def step(model=model, x=x, grad=grad):
                        model(x).backward(grad)

                    # The gradients are reset outside the timed region, so each step writes fresh ones.
                    row.ms, row.error = measure_ms(step, grad_to_none=[x, *model.parameters()]), None
                    del model, step
                except FAILURES as error:
                    row.error = failure(error)
            print(_train_row(row, rows), flush=True)
        del base, x, grad
        _fresh_compiler()


def _ratio(rows, row, variant_prefix: str) -> float | None:
    """row's speedup over the row of the same size whose variant starts with ``variant_prefix``."""
    other = next((r for r in rows if r.size == row.size and r.variant.startswith(variant_prefix)), None)
    if other is None or other.ms is None or row.ms is None:
        return None
    return other.ms / row.ms


TRAIN_HEADER = (
    "| size | variant | forward + backward ms | vs bf16 | vs torchao float8 tensorwise | goal |\n"
    "|---|---|---|---|---|---|"
)


def linear_goals(rows, row) -> str:
    """fp8-train's goals at LINEAR_GOAL_SIZE (where the table shows them)."""
    if row.size != LINEAR_GOAL_SIZE or not row.variant.startswith("qpass fp8-train"):
        return "-"
    bf16, torchao = _ratio(rows, row, "bf16"), _torchao_tensorwise_ratio(rows, row)
    verdict = lambda ratio, goal: "-" if ratio is None else "met" if ratio >= goal else "MISSED"  # noqa: E731
    return (f"≥ {LINEAR_GOALS['bf16']}x bf16: {verdict(bf16, LINEAR_GOALS['bf16'])}; "
            f"≥ torchao tensorwise: {verdict(torchao, LINEAR_GOALS['torchao tensorwise'])}")


def _torchao_tensorwise_ratio(rows, row) -> float | None:
    torchao = next((r for r in rows if r.size == row.size and "tensorwise" in r.variant), None)
    return None if torchao is None or torchao.ms is None or row.ms is None else torchao.ms / row.ms


def _train_row(row: TrainRow, rows: list[TrainRow]) -> str:
    if row.ms is None:
        return f"| {row.size} | {row.variant} | {row.error} | - | - | {linear_goals(rows, row)} |"
    bf16, torchao = _ratio(rows, row, "bf16"), _torchao_tensorwise_ratio(rows, row)
    cells = [f"{r:.2f}x" if r is not None else "-" for r in (bf16, torchao)]
    goal = linear_goals(rows, row)
    return f"| {row.size} | {row.variant} | {row.ms:.2f} | {cells[0]} | {cells[1]} | {goal} |"


# ---- 6. a small Llama's training step --------------------------------------------------------------


@dataclass
class LlamaRow:
    variant: str
    ms: float | None = None
    loss: float | None = None  # after the timed steps: a quantized model that diverged shows here
    error: str | None = None


def llama_rows() -> list[LlamaRow]:
    variants = training_variants(recipes=("fp8-train",), torchao_recipes=("tensorwise",))
    initial = OUT_OF_TIME if runs_here() else MISSING
    return [LlamaRow(name, error=prepare if isinstance(prepare, str) else initial)
            for name, prepare in variants]


def _llama(config_fields: dict, sequence: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_fields, max_position_embeddings=sequence, use_cache=False)
    with torch.device(DEVICE):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def llama_speed(rows: list[LlamaRow]) -> None:
    """Each variant trains its own copy of the same model on the same batch: forward with the loss,
    backward, AdamW's step, gradients set to None."""
    prepares = dict(training_variants(recipes=("fp8-train",), torchao_recipes=("tensorwise",)))
    batch, sequence = TIMED.llama_batch
    generator = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(0, TIMED.llama["vocab_size"], (batch, sequence), generator=generator, device=DEVICE)
    for row in rows:
        prepare = prepares[row.variant]
        if callable(prepare):
            try:
                BUDGET.check()
                _fresh_compiler()
                torch.manual_seed(0)
                model = prepare(_llama(TIMED.llama, sequence))
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
                losses = []

                def step(model=model, optimizer=optimizer, losses=losses):
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())

                row.ms, row.error = measure_ms(step, timer=steps_ms), None
                row.loss = float(losses[-1])
                del model, optimizer, step, losses
            except FAILURES as error:
                row.error = failure(error)
        print(_llama_row(row, rows[0]), flush=True)
    _fresh_compiler()


LLAMA_HEADER = (
    "| variant | ms / step | tokens / s | vs bf16 | loss after the timed steps |\n|---|---|---|---|---|"
)


def _llama_row(row: LlamaRow, baseline: LlamaRow) -> str:
    if row.ms is None:
        return f"| {row.variant} | {row.error} | - | - | - |"
    tokens = TIMED.llama_batch[0] * TIMED.llama_batch[1]
    speedup = f"{baseline.ms / row.ms:.2f}x" if baseline.ms is not None else "bf16 missing"
    return f"| {row.variant} | {row.ms:.2f} | {tokens / row.ms * 1e3:,.0f} | {speedup} | {row.loss:.3f} |"


# ---- report ----------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    if CUDA:
        device = torch.cuda.get_device_name()
    else:
        device = "CPU only (no GPU): GPU figures missing; kernels in Triton's interpreter on "
        device += platform.machine()
    versions = ", ".join(f"{p} {_version(p)}" for p in ("triton", "torchao", "transformers"))
    return f"{device}; torch {torch.__version__}, {versions}"


@dataclass
class Results:
    """What the run has measured so far (None: a part not reached yet)."""

    checks: list[Check] = field(default_factory=list)
    bandwidth: list[BandwidthRow] | None = None
    matmul: list[GemmRow] | None = None
    gemm: list[GemmRow] | None = None
    linear: list[TrainRow] | None = None
    llama: list[LlamaRow] | None = None
    started: float = field(default_factory=time.time)
    budget_s: float = 0.0

    def summary(self) -> str:
        passed = sum(c.passed is True for c in self.checks)
        failed = sum(c.passed is False for c in self.checks)
        unchecked = sum(c.passed is None for c in self.checks)
        return (f"correctness: {passed} passed, {failed} failed, {unchecked} not checked, "
                f"of {len(self.checks)}; {time.time() - self.started:.0f} s in all "
                f"(time limit {self.budget_s:.0f} s).")


def _verdict(ratio: float | None, goal: float) -> str:
    return "missing" if ratio is None else f"{'met' if ratio >= goal else 'MISSED'} ({ratio:.2f}x)"


def goals(results: Results) -> list[str]:
    """Issue 16's goals, each with what this run measured."""
    lines = []
    linear = results.linear or []
    fp8 = next((r for r in linear if r.size == LINEAR_GOAL_SIZE and r.variant.startswith("qpass fp8-train")),
               None)
    bf16 = _ratio(linear, fp8, "bf16") if fp8 else None
    torchao = _torchao_tensorwise_ratio(linear, fp8) if fp8 else None
    lines.append(f"fp8-train linear forward + backward ≥ {LINEAR_GOALS['bf16']}x bf16 at {LINEAR_GOAL_SIZE}: "
                 f"{_verdict(bf16, LINEAR_GOALS['bf16'])}")
    lines.append(f"fp8-train linear forward + backward ≥ torchao float8 (tensorwise) at {LINEAR_GOAL_SIZE}, "
                 f"same run: {_verdict(torchao, LINEAR_GOALS['torchao tensorwise'])}")
    bandwidth = results.bandwidth or []
    kernels = bandwidth[1:]
    shares = [_copy_share(r, bandwidth[0]) for r in kernels] if bandwidth else []
    measured = [(r, s) for r, s in zip(kernels, shares) if s is not None]
    if measured:
        missed = [r.kernel for r, s in measured if s < COPY_GOAL]
        cell = f"{len(measured) - len(missed)} of {len(measured)} measured met" + (
            f"; MISSED: {', '.join(missed)}" if missed else "")
    else:
        cell = "missing"
    lines.append(f"quantize kernels ≥ {COPY_GOAL:.0%} of the device copy's bandwidth: {cell}")
    mxfp4 = next((r for r in results.matmul or [] if r.fmt == "mxfp4" and r.m == 1), None)
    ratio = mxfp4.torch_ms / mxfp4.qpass_ms if mxfp4 and mxfp4.qpass_ms and mxfp4.torch_ms else None
    lines.append(f"MXFP4 weight-only GEMM ≥ {MATMUL_GOALS[1]}x bf16 at M = 1: "
                 f"{_verdict(ratio, MATMUL_GOALS[1])}")
    return lines


def _where() -> str:
    if CUDA:
        return "On the GPU at the benchmark shapes."
    text = (
        f"On the CPU in Triton's interpreter (TRITON_INTERPRET=1) at small shapes: quantize "
        f"{'x'.join(map(str, SHAPES.quantize))}, matmuls (N, K) = {SHAPES.gemm_nk}, M in {SHAPES.gemm_ms}. "
        "The interpreter emulates bf16: its fp32 -> bf16 cast truncates (the rows say where that is the only "
        "difference), and its bf16 tl.dot is broken (triton-lang/triton#11584), so the kernels upcast bf16 "
        "dot operands there: the bf16 tensor-core paths are checked by the GPU run only."
    )
    if DRY_RUN:
        text += (" This was a dry run: every measurement of the other parts ran once on the CPU at tiny "
                 "shapes (aot_eager, the kernels in the interpreter) to try its code, and gives no figure.")
    return text


NOT_REACHED = "Not run: the run stopped before this part."


def _table(header: str, rows, render) -> list[str]:
    return [NOT_REACHED] if rows is None else [header, *(render(r) for r in rows)]


def section(results: Results) -> str:
    gpu = GPU_SHAPES
    n, k = gpu.gemm_nk
    llama = gpu.llama
    lines = [
        f"{machine()}.",
        "Reproduce: `bash bench/gpu.sh` (sets up a CUDA torch and the peers; under 8 minutes on an",
        "H100/H200), or `make bench` / `python bench/kernels_gpu.py`.",
        "",
        "Goals (issue 16):",
        "",
        *(f"- {line}" for line in goals(results)),
        "",
        "### Correctness",
        "",
        "qpass.codegen's kernels against qpass's reference numerics. Quantize, fake_quantize and",
        "dequantize must match bit for bit (dequantize decodes the reference's own QTensor), and so must",
        "the GEMM-operand kernel's codes and scales against `qpass.gemm_operand.quantize_for_gemm`'s. The",
        "weight-only matmul and the scaled GEMMs (`qpass.ops.gemm.scaled_gemm` of the reference's",
        "operands, bf16 out) must lie within one unit in the last place of their output plus",
        "(K + 2)·2⁻²⁴·Σ|a||b| of the exact product of their exactly dequantized operands (the error bound",
        "of fp32 accumulation), i.e. max error / bound ≤ 1 (a round-to-nearest output uses about half",
        "of it).",
        "",
        _where(),
        "",
        CHECK_HEADER,
        *map(_check_row, results.checks),
        "",
        f"- {results.summary()}",
        "",
        f"### Quantize kernels ({'x'.join(map(str, gpu.quantize))} bf16)",
        "",
        "Median of triton.testing.do_bench (CUDA events, L2 flushed before each repetition). Effective",
        "GB/s counts the least traffic the job needs: the input read once plus the outputs written (codes",
        "and scales for quantize and quantize_for_gemm, the bf16 result for fake_quantize). Per-tensor and",
        "per-row fp8 and NVFP4 run an amax pre-pass that reads the input a second time: traffic GB/s counts",
        "that read too. quantize_for_gemm transposed writes both orientations (along K for the forward,",
        "along M for wgrad) in one pass. The goal is on the effective figure, against the copy measured in",
        "the same run.",
        "",
        *_table(BANDWIDTH_HEADER, results.bandwidth, lambda r: _bandwidth_row(r, results.bandwidth[0])),
        "",
        f"### Weight-only matmul (y = x · dequant(W)ᵀ, N = K = {n}, bf16 x)",
        "",
        "W quantized once along K by `qpass.codegen.quantize(w, Quantizer(format))` (default scale modes),",
        "then `qpass.codegen.weight_matmul(x, W)` against `torch.matmul(x, w.T)` with the bf16 weight;",
        "medians of do_bench as above. Speedup: torch time / qpass time.",
        "",
        *_table(MATMUL_HEADER, results.matmul, _matmul_row),
        "",
        f"### Scaled GEMMs (y = a · bᵀ, both operands quantized along K, N = K = {n}, bf16 out)",
        "",
        "Both operands quantized beforehand (by the GEMM-operand kernel where it exists, else by the",
        "reference), then `qpass.ops.gemm.scaled_gemm(a, b, torch.bfloat16)`, against `torch.matmul(x, w.T)`",
        "in bf16 (the same baseline as above); the route is `qpass.ops.gemm.route`'s. Medians of do_bench.",
        "",
        *_table(GEMM_HEADER, results.gemm, _gemm_row),
        "",
        f"### Training linear layers ({' and '.join(map(str, gpu.linear))}, no bias, as many tokens, bf16)",
        "",
        "Forward and backward (input and weight gradients) of `nn.Linear(size, size, bias=False)` on a",
        "[size, size] bf16 input, each variant on its own copy of the same layer, every one compiled with",
        "inductor (Dynamo reset between variants); gradients reset between repetitions outside the timed",
        "region. torchao: its float8 training with dynamic tensorwise scales, and its rowwise recipe.",
        "",
        *_table(TRAIN_HEADER, results.linear, lambda r: _train_row(r, results.linear)),
        "",
        f"### A small Llama's training step ({llama['num_hidden_layers']} layers, hidden "
        f"{llama['hidden_size']}, {gpu.llama_batch[0]} x {gpu.llama_batch[1]} tokens, bf16)",
        "",
        f"`transformers.LlamaForCausalLM` (intermediate {llama['intermediate_size']}, "
        f"{llama['num_attention_heads']} heads, vocabulary {llama['vocab_size']}) in bf16. One step: the",
        "forward with the loss, backward, fused AdamW, gradients set to None. Each variant trains its own",
        "copy of the same model on the same batch: bf16 under torch.compile, `qpass.compile(model,",
        "\"fp8-train\", kernels=\"triton\")` (lm_head in bf16), and torchao's `convert_to_float8_training`",
        f"(lm_head left out too) under torch.compile. Median of {LLAMA_STEPS[1]} steps (CUDA events) after",
        f"{LLAMA_STEPS[0]} warm-up steps.",
        "",
        *_table(LLAMA_HEADER, results.llama, lambda r: _llama_row(r, results.llama[0])),
        "",
    ]
    return "\n".join(lines)


def _write(results: Results, write: bool) -> None:
    """After each part, so a run stopped from outside still leaves the parts it finished."""
    if write:
        title = "qpass on the GPU (bench/kernels_gpu.py, bench/gpu.sh)"
        write_section("kernels-gpu", title, section(results))


def _run_part(name: str, header: str, fill, rows) -> None:
    """``fill(rows)`` within the part's share of the time; rows it does not reach keep their cell."""
    print("\n" + header, flush=True)
    started = time.time()
    if not runs_here() and name != "correctness":
        for line in section_rows(name, rows):
            print(line, flush=True)
        return
    try:
        with BUDGET.part(name):
            fill(rows)
    except OutOfTime:  # between two rows: those left keep "out of time"
        if name == "correctness":
            rows.append(Check("the remaining checks", "-", "-", OUT_OF_TIME, None))
    print(f"({name}: {time.time() - started:.0f} s)", flush=True)


def section_rows(name: str, rows) -> list[str]:
    render = {
        "quantize": lambda r: _bandwidth_row(r, rows[0]), "weight-only": _matmul_row,
        "scaled-gemm": _gemm_row, "linear": lambda r: _train_row(r, rows),
        "llama": lambda r: _llama_row(r, rows[0]),
    }[name]
    return [render(r) for r in rows]


def main() -> None:
    global BUDGET, DRY_RUN, SHAPES, TIMED, BACKEND, KERNELS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--dry-run", action="store_true",
                        help="without a GPU: run each measurement once on the CPU, tiny shapes (no figures)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"time limit of the measurements, from now (default {DEFAULT_BUDGET_S} s)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="time limit as a Unix time (bench/gpu.sh passes its own); overrides --budget-s")
    args = parser.parse_args()
    DRY_RUN = args.dry_run and not CUDA
    if DRY_RUN:
        SHAPES = TIMED = DRY_SHAPES
        BACKEND, KERNELS = "aot_eager", "interpret"
    BUDGET = Budget(args.deadline if args.deadline is not None else time.time() + args.budget_s)
    results = Results(budget_s=BUDGET.deadline - time.time())
    write = not args.no_write

    print(machine(), flush=True)
    print(f"time limit: {results.budget_s:.0f} s" + ("; dry run" if DRY_RUN else ""), flush=True)
    _run_part("correctness", CHECK_HEADER, functools.partial(correctness, DEVICE), results.checks)
    _write(results, write)
    parts = (
        ("quantize", BANDWIDTH_HEADER, quantize_bandwidth, bandwidth_rows, "bandwidth"),
        ("weight-only", MATMUL_HEADER, matmul_speed, lambda: gemm_rows(MATMUL_FORMATS), "matmul"),
        ("scaled-gemm", GEMM_HEADER, scaled_gemm_speed, lambda: gemm_rows(GEMM_QUANTIZERS), "gemm"),
        ("linear", TRAIN_HEADER, linear_speed, linear_rows, "linear"),
        ("llama", LLAMA_HEADER, llama_speed, llama_rows, "llama"),
    )
    for name, header, fill, make_rows, attribute in parts:
        rows = make_rows()
        setattr(results, attribute, rows)
        _run_part(name, header, fill, rows)
        _write(results, write)
    print("\n" + results.summary())
    for line in goals(results):
        print(f"goal: {line}")
    failed = sum(c.passed is False for c in results.checks)
    if failed:
        sys.exit(f"{failed} correctness check(s) failed")


if __name__ == "__main__":
    main()
