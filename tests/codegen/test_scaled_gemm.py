"""The dequantize-in-registers scaled GEMM (:mod:`qpass.codegen.scaled_gemm`) against
``a.dequantize() @ b.dequantize().mT`` (+ bias), in Triton's interpreter on the CPU.

Tolerance: fp32 summation order only. The kernel and the reference multiply the same fp32
dequantized values and differ only in the order (and on a GPU, the fusing) of the fp32 additions,
so both are within gamma_K * S of the exact sum, S = |A| @ |B|ᵀ and gamma_K = K u / (1 - K u),
u = 2^-24: they may differ by 2 gamma_K S (plus K subnormal steps for underflowing products).
Where every order gives the exact sum (small integers), the results are compared bit for bit,
bias and bf16/fp16 output casts included.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # the qpass[triton] extra

from qpass.codegen.scaled_gemm import scaled_gemm  # noqa: E402
from qpass.formats.swizzle import swizzle_scales  # noqa: E402
from qpass.gemm_operand import GemmOperand, quantize_for_gemm  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402

# The interpreter evaluates both sides of every tl.where (NaN to int casts of the branch not taken).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PAIRS = [
    ("fp8_e4m3", "fp8_e5m2"),
    (Quantizer("fp8_e4m3", granularity="channel"), "mxfp8_e4m3"),
    ("mxfp8_e4m3", "mxfp8_e5m2"),
    ("mxfp4", "mxfp4"),
    ("nvfp4", "nvfp4"),
    ("mxfp6_e2m3", "mxfp6_e3m2"),
    ("mxint8", Quantizer("fp4_e2m1", granularity=("block", 16))),
    (Quantizer("nvfp4", granularity=("tile", 16)), "mxfp4"),
    (Quantizer("fp6_e3m2", granularity="channel"), "nvfp4"),
    (Quantizer("fp8_e4m3", granularity=("block", 128)), "mxfp8_e4m3"),  # a block wider than the K tile
]


def as_quantizer(q) -> Quantizer:
    return q if isinstance(q, Quantizer) else Quantizer(q)


def reference(a: GemmOperand, b: GemmOperand, out_dtype=torch.float32, bias=None) -> torch.Tensor:
    out = a.dequantize() @ b.dequantize().mT
    return (out if bias is None else out + bias.float()).to(out_dtype)


def assert_close_in_summation_order(got: torch.Tensor, a: GemmOperand, b: GemmOperand) -> None:
    expected = reference(a, b)
    assert got.shape == expected.shape and got.dtype == torch.float32
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), "NaN in different places"
    infinite = expected.isinf()
    assert torch.equal(got[infinite], expected[infinite])
    k = a.length
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    magnitude = a.dequantize().double().abs() @ b.dequantize().double().abs().mT
    bound = 2 * gamma * magnitude + k * 2.0**-149
    finite = ~nan & ~infinite
    error = (got.double() - expected.double()).abs()
    assert (error[finite] <= bound[finite]).all(), f"max excess {(error - bound)[finite].max()}"


def operands(qa, qb, m: int, n: int, k: int, seed: int = 0) -> tuple[GemmOperand, GemmOperand]:
    """Random operands whose rows span several binades (so per-row and per-block scales differ)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-6, 7, (m, 1), generator=gen).float())
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-6, 7, (n, 1), generator=gen).float())
    return quantize_for_gemm(x, as_quantizer(qa), -1), quantize_for_gemm(w, as_quantizer(qb), -1)


@pytest.mark.parametrize(("qa", "qb"), PAIRS, ids=lambda q: str(as_quantizer(q)))
def test_formats(qa, qb):
    a, b = operands(qa, qb, 70, 37, 200)  # several K tiles, the last one ragged
    assert_close_in_summation_order(scaled_gemm(a, b, torch.float32), a, b)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (3, 65, 33), (65, 2, 17), (16, 16, 64)])
def test_odd_sizes(m, n, k):
    pairs = [
        ("mxfp4", "nvfp4"), ("fp8_e5m2", Quantizer("fp8_e4m3", granularity="channel")),
        (Quantizer("fp4_e2m1", granularity="channel"), "fp4_e2m1"),  # packed, K' = K rounded up to even
    ]
    for qa, qb in pairs:
        a, b = operands(qa, qb, m, n, k, seed=m + n + k)
        assert_close_in_summation_order(scaled_gemm(a, b, torch.float32), a, b)


def integer_operands(qa: str, qb: str, m: int, n: int, k: int, lead=()) -> tuple[GemmOperand, GemmOperand]:
    """Integers in [-8, 8], one 8 per block: MX scales 2^-5 (fp8) or 2^1 (fp4, whose 5 and 7 then
    round), exact element values, so every product and partial sum is an exact fp32 integer."""
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(-8, 9, (*lead, m, k), generator=gen).float()
    w = torch.randint(-8, 9, (n, k), generator=gen).float()
    x[..., ::32], w[:, ::32] = 8.0, -8.0
    return quantize_for_gemm(x, Quantizer(qa), -1), quantize_for_gemm(w, Quantizer(qb), -1)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_exact_sums_bias_and_casts(out_dtype):
    a, b = integer_operands("mxfp8_e4m3", "mxfp4", 40, 50, 150)
    bias = torch.randint(-300, 300, (50,)).to(torch.bfloat16)
    for bias_ in (None, bias):
        got = scaled_gemm(a, b, out_dtype, bias=bias_)
        expected = reference(a, b, out_dtype, bias_)
        assert got.dtype == out_dtype and torch.equal(got, expected)


def test_batched():
    """A 3-d a against a shared 2-d b (one GEMM of all of a's rows), and a batch of pairs."""
    a, b = integer_operands("mxfp8_e5m2", "mxfp8_e4m3", 20, 30, 70, lead=(3,))
    assert torch.equal(scaled_gemm(a, b, torch.float32), reference(a, b))
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 20, 45, generator=gen), torch.randn(2, 30, 45, generator=gen)
    for quantizer in (Quantizer("nvfp4"), Quantizer("fp8_e4m3", granularity="channel")):
        a, b = quantize_for_gemm(x, quantizer, -1), quantize_for_gemm(w, quantizer, -1)
        got = scaled_gemm(a, b, torch.float32)
        assert got.shape == (2, 20, 30)
        assert_close_in_summation_order(got, a, b)


def test_nan_and_inf():
    """A NaN block (MX scale 0xFF) poisons its row; an E5M2 Inf stays Inf against a finite row."""
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(8, 100, generator=gen), torch.rand(6, 100, generator=gen) + 0.5
    x[1, 70] = float("nan")
    x[2, 99] = float("inf")  # in the ragged last block
    a = quantize_for_gemm(x, Quantizer("mxfp8_e4m3"), -1)
    b = quantize_for_gemm(w, Quantizer("fp8_e4m3"), -1)
    got = scaled_gemm(a, b, torch.float32)
    assert got[1:3].isnan().all() and not got[[0, *range(3, 8)]].isnan().any()
    assert_close_in_summation_order(got, a, b)
    y = torch.randn(5, 40, generator=gen)
    y[3, 7] = float("-inf")
    a = quantize_for_gemm(y, Quantizer("fp8_e5m2", granularity="channel"), -1)
    b = quantize_for_gemm(w[:, :40], Quantizer("mxfp4"), -1)
    got = scaled_gemm(a, b, torch.float32)
    assert got[3].isnan().all()  # a per-row scale of an Inf row is NaN (SPEC section 3)
    assert_close_in_summation_order(got, a, b)


def test_bad_operands():
    a, b = operands("mxfp4", "mxfp8_e4m3", 8, 8, 64)
    with pytest.raises(ValueError, match="different lengths"):
        scaled_gemm(a, operands("mxfp4", "mxfp4", 8, 8, 32)[1], torch.float32)
    swizzled = GemmOperand(b.codes, swizzle_scales(b.scales), None, b.quantizer, b.length)
    with pytest.raises(ValueError, match="swizzled"):
        scaled_gemm(a, swizzled, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_gemm(a, b, torch.int32)
    with pytest.raises(ValueError, match="bias"):
        scaled_gemm(a, b, torch.float32, bias=torch.zeros(7))


# Run in a fresh interpreter without TRITON_INTERPRET (under it, triton.jit gives interpreted
# functions, which the compiler cannot take): each launcher's launches are recorded, not run, and
# compiled for sm_90 by Triton's real compiler, which, unlike the interpreter, reads no module
# globals but tl.constexpr ones. Each kernel's name is printed with its count of fmas that add +0:
# the unfused products of NVFP4 4over6's candidate errors (the compiler fuses a multiply and an
# add by default; the reference rounds the two).
COMPILE_SCRIPT = """
import importlib, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qpass.codegen import gemm_operand, scaled_gemm
from qpass.gemm_operand import quantize_for_gemm
from qpass.quantizer import Quantizer

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int32: "i32"}
TILES = {"BLOCK_R": 16, "BLOCK_L": 128}  # the autotuned kernels' one config under the interpreter
launches = []

class Recorder:
    def __init__(self, kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn  # an autotuner's
        self.kernel = kernel
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launches.append((self.kernel, dict(zip(self.kernel.arg_names, args), **kwargs)))
        return launch

for module, name in ((gemm_operand, "_amax_kernel"), (gemm_operand, "_gemm_operand_kernel"),
                     (scaled_gemm, "_scaled_gemm_kernel")):
    setattr(module, name, Recorder(getattr(module, name)))
x = torch.randn(2, 70, 130, dtype=torch.bfloat16)
gemm_operand.quantize_for_gemm(x, Quantizer("nvfp4"), -1, transposed=True)  # BLOCK, NVFP4, both ways
a = quantize_for_gemm(torch.randn(70, 96), Quantizer("nvfp4"), -1)
b = quantize_for_gemm(torch.randn(40, 96), Quantizer("fp8_e4m3", granularity="channel"), -1)
scaled_gemm.scaled_gemm(a, b, torch.bfloat16, torch.randn(40))
quantize = importlib.import_module("qpass.codegen.quantize")  # qpass.codegen.quantize is a function
skipped = type("Skipped", (), {"__getitem__": lambda self, grid: lambda *args, **kwargs: None})()
quantize.wrap_triton = lambda kernel: Recorder(kernel) if kernel is quantize._quantize_kernel else skipped
for granularity in (None, ("tile", 16)):  # NVFP4 4over6 in 1x16 blocks and 16x16 tiles
    quantize.quantize(x[0], Quantizer("nvfp4", granularity=granularity, scale_mode="4over6"))
for kernel, bound in launches:
    signature, constexprs = {}, {}
    for p in kernel.params:
        value = bound.get(p.name, TILES.get(p.name))
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
        else:
            assert type(value) in (int, float), (p.name, value)
            signature[p.name] = "i32" if type(value) is int else "fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 64))
    assert compiled.asm["cubin"], kernel.__name__
    lines = compiled.asm["ptx"].splitlines()
    print(kernel.__name__, sum("fma.rn.f32" in line and line.endswith("0f00000000;") for line in lines))
"""


def test_the_kernels_compile_for_sm90(tmp_path):
    """Ahead of time, no GPU needed: one variant of each kernel through Triton's CUDA compiler, and
    the quantize kernel's NVFP4 4over6 with its candidates' error products left unfused."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = [line.split() for line in done.stdout.splitlines()]
    assert [name for name, _ in compiled] == [
        "_amax_kernel", "_gemm_operand_kernel", "_scaled_gemm_kernel", "_quantize_kernel", "_quantize_kernel"]
    assert [int(unfused) > 0 for _, unfused in compiled] == [False, False, False, True, True]
