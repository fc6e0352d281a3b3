"""The quantized matmul kernel (SPEC section 6's forward GEMM): ``weight_matmul(x, W_q)``.

The reference is qpass's own plain-torch numerics, which tests/formats checks bit for bit against
independent oracles: ``x_q.float() @ qpass.dequantize(W_q).float().T (+ bias)``, with
``x_q = input_quantizer(x, -1)`` (or x itself). The kernel accumulates in fp32 and applies some
scale factors after the sum instead of per element, so it may differ from that reference by fp32
rounding only. The bound checked is the textbook one for two fp32 dot products of length K (the
kernel's and the reference's), each term carrying at most two extra roundings (a scale multiply, a
bias add):

    |y - ref| <= (K + 4) * 2^-23 * sum_k |x_q[m, k]| |w[n, k]|   (+ 2^-22 |bias[n]|)

plus at most a unit in the last place of a bf16 (fp16) output. This fails on any real mistake: a
weight rounded to bf16 on the way to the tensor cores is already 2^-9 off, far above it (see
``test_the_bound_catches_a_bf16_rounded_weight``).

Shapes are small (M <= 33, N <= 64, K <= 200) but cross the interpreter's 16 x 32 x 64 tiles in
every dimension, with ragged K (not a multiple of the tile nor of the scaling block).
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")  # the qpass[triton] extra

import qpass  # noqa: E402
from qpass import codegen  # noqa: E402
from qpass.codegen import weight_matmul  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402

# The interpreter evaluates both sides of every tl.where in numpy, warning about the branch not taken
# (0 / 0 for an all-zero group's scale, casts of NaN to int).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Weight formats, as quantize kwargs: every MX format, nvfp4 in 1x16 blocks and in 16x16 tiles, and
# each absmax element and each granularity (tensor, channel, blocks smaller and larger than the
# kernel's K tile, power-of-two block scales: the bf16-exact path).
MX_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8"]
WEIGHTS = [(fmt, {}) for fmt in MX_FORMATS] + [
    ("nvfp4", {}),
    ("nvfp4", {"granularity": ("tile", 16)}),
    ("fp8_e4m3", {"granularity": "tensor"}),
    ("fp8_e5m2", {"granularity": "channel"}),
    ("fp6_e2m3", {"granularity": ("block", 16)}),
    ("fp6_e3m2", {"granularity": "tensor"}),
    ("fp4_e2m1", {"granularity": "channel"}),
    ("fp4_e2m1", {"granularity": ("block", 32)}),
    ("fp8_e4m3", {"granularity": ("block", 128)}),  # a block larger than BLOCK_K
    ("fp8_e5m2", {"granularity": ("block", 8), "pow2": True}),
    ("fp6_e3m2", {"granularity": ("block", 64)}),
]

# Activation quantizers (fake quantization inside the kernel).
ACTIVATIONS = [
    Quantizer("mxfp4"),
    Quantizer("mxfp8_e4m3", scale_mode="rceil"),
    Quantizer("mxfp8_e5m2"),
    Quantizer("mxfp6_e2m3", rounding="away"),
    Quantizer("mxfp6_e3m2", scale_mode="even"),
    Quantizer("mxint8", scale_mode="ceil"),
    Quantizer("nvfp4"),
    Quantizer("nvfp4", granularity=("tile", 16)),
    Quantizer("fp8_e4m3"),  # per tensor
    Quantizer("fp8_e5m2", granularity="channel"),
    Quantizer("fp4_e2m1", granularity="channel", pow2=True),
    Quantizer("fp6_e2m3", granularity=("block", 16)),
    Quantizer("fp8_e4m3", granularity=("block", 128)),  # wider than BLOCK_K: the kernel widens its K tile
    Quantizer("nvfp4", scale_mode="4over6"),
    Quantizer("nvfp4", granularity=("tile", 16), scale_mode="4over6"),
]


def _id(value) -> str:
    if isinstance(value, tuple):
        fmt, kwargs = value
        return "-".join([fmt, *(str(v).replace(" ", "") for v in kwargs.values())])
    return str(value).replace(" ", "")


def sample(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian values whose rows span four decades (so the per-row and per-block scales differ)."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[-2] if len(shape) >= 2 else 1
    magnitudes = torch.logspace(-2, 2, rows).reshape(rows, 1) if len(shape) >= 2 else torch.tensor(1.0)
    return (torch.randn(*shape, generator=g) * magnitudes).to(dtype)


def reference(x, qt, bias=None, quantizer=None):
    """The fp32 reference and the elementwise error bound (float64)."""
    x_q = (quantizer(x, -1) if quantizer is not None else x).float()
    w = qpass.dequantize(qt).float()
    ref = x_q @ w.T
    k = x.shape[-1]
    bound = (k + 4) * 2.0**-23 * (x_q.double().abs() @ w.double().abs().T)
    if bias is not None:
        ref = ref + bias.float()
        bound = bound + 2.0**-22 * bias.double().abs()
    return ref, bound


# Rounding the fp32 result to the output dtype: at most one unit in the last place, relative (normal
# range) or absolute (fp16's subnormal spacing; bf16's is below anything these tests produce).
OUTPUT_ULP = {torch.float32: (0.0, 0.0), torch.bfloat16: (2.0**-8, 0.0), torch.float16: (2.0**-10, 2.0**-24)}


def assert_close(y, ref, bound):
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert not y.isnan().any() and not ref.isnan().any()
    relative, absolute = OUTPUT_ULP[y.dtype]
    bound = bound + relative * ref.double().abs() + absolute
    excess = (y.double() - ref.double()).abs() - bound
    assert (excess <= 0).all(), (
        f"{int((excess > 0).sum())} outputs beyond the fp32 bound; worst by {excess.max().item():.3g} "
        f"(bound there {bound.flatten()[excess.argmax()].item():.3g})"
    )


# ---------------------------------------------------------------------------------------------
# Weight formats, with x in high precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight", WEIGHTS, ids=_id)
def test_weight_formats(weight, dtype):
    fmt, kwargs = weight
    x = sample(10, 100, seed=1, dtype=dtype)  # K = 100: ragged for every block and for BLOCK_K
    qt = qpass.quantize(sample(24, 100, seed=2), fmt, axis=-1, **kwargs)
    y = weight_matmul(x, qt, out_dtype=torch.float32)
    assert_close(y, *reference(x, qt))


@pytest.mark.parametrize(
    "weight", [("mxfp4", {}), ("nvfp4", {}), ("fp8_e4m3", {"granularity": "channel"})], ids=_id
)
def test_fp16_inputs(weight):
    fmt, kwargs = weight
    x = (sample(10, 70, seed=3) / 64).half()  # sums well inside fp16's range
    qt = qpass.quantize(sample(20, 70, seed=4), fmt, axis=-1, **kwargs)
    y = weight_matmul(x, qt)
    assert y.dtype == torch.float16
    assert_close(y, *reference(x, qt))


def test_weights_from_the_generated_quantize_kernel():
    w = sample(24, 100, seed=5)
    for fmt in ("mxfp4", "nvfp4"):
        qt = codegen.quantize(w, Quantizer(fmt), axis=-1)
        x = sample(5, 100, seed=6)
        assert_close(weight_matmul(x, qt), *reference(x, qt))


# ---------------------------------------------------------------------------------------------
# Activations quantized on the fly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("index, quantizer", list(enumerate(ACTIVATIONS)), ids=[_id(q) for q in ACTIVATIONS])
def test_activation_quantizers(index, quantizer, dtype):
    # Each activation format against a different weight format (the pairs rotate through WEIGHTS).
    fmt, kwargs = WEIGHTS[(3 * index) % len(WEIGHTS)]
    x = sample(2, 9, 150, seed=10 + index, dtype=dtype)  # 18 rows: two M tiles; tiles cut 9-row batch entries
    qt = qpass.quantize(sample(20, 150, seed=30 + index), fmt, axis=-1, **kwargs)
    y = weight_matmul(x, qt, input_quantizer=quantizer, out_dtype=torch.float32)
    assert_close(y, *reference(x, qt, quantizer=quantizer))


def test_fp16_activations_keep_fake_quantize_rounding():
    """fake_quantize returns fp16 for fp16 x (a per-channel decode scale makes values fp16 rounds):
    the kernel multiplies those values, not the unrounded ones."""
    quantizer = Quantizer("fp8_e4m3", granularity="channel")
    x = (sample(12, 90, seed=7) / 64).half()
    qt = qpass.quantize(sample(20, 90, seed=8), "mxfp8_e4m3", axis=-1)
    assert_close(weight_matmul(x, qt, input_quantizer=quantizer), *reference(x, qt, quantizer=quantizer))


def test_stochastic_rounding_matches_the_quantize_kernel_seed_for_seed():
    quantizer = Quantizer("mxfp4", rounding="stochastic")
    x = sample(6, 100, seed=9)
    qt = qpass.quantize(sample(24, 100, seed=10), "mxfp4", axis=-1)
    y = weight_matmul(x, qt, input_quantizer=quantizer, seed=1234)
    x_q = codegen.fake_quantize(x, quantizer, -1, seed=1234)
    assert_close(y, *reference(x_q, qt))
    other = weight_matmul(x, qt, input_quantizer=quantizer, seed=4321)
    assert not torch.equal(y, other)


# ---------------------------------------------------------------------------------------------
# Shapes, bias, output dtype
# ---------------------------------------------------------------------------------------------

SHAPES = [  # x shape, N
    ((1, 200), 33),  # M = 1, odd N, K over three tiles (ragged)
    ((33, 31), 64),  # M over three tiles, K below one MX block
    ((2, 3, 37), 17),  # batch dims
    ((1,), 5),  # K = 1, a 1-d x
]
SHAPE_CASES = [
    (Quantizer("mxfp4"), ("mxfp4", {})),
    (Quantizer("nvfp4", granularity=("tile", 16)), ("nvfp4", {})),
    (Quantizer("fp8_e5m2", granularity="channel"), ("fp4_e2m1", {"granularity": ("block", 16)})),
    (None, ("fp8_e4m3", {"granularity": "channel"})),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: f"{c[0]}-{_id(c[1])}")
@pytest.mark.parametrize("shape, n", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_shapes(shape, n, case):
    quantizer, (fmt, kwargs) = case
    x = sample(*shape, seed=11)
    qt = qpass.quantize(sample(n, shape[-1], seed=12), fmt, axis=-1, **kwargs)
    bias = sample(n, seed=13).flatten()
    if x.ndim == 1 and quantizer is not None and quantizer.spec.granularity == "tile":
        with pytest.raises(ValueError, match="16x16 tiles"):  # as qpass.fake_quantize
            weight_matmul(x, qt, bias, input_quantizer=quantizer)
        return
    y = weight_matmul(x, qt, bias, input_quantizer=quantizer)
    assert y.shape == (*shape[:-1], n)
    assert_close(y, *reference(x, qt, bias, quantizer))


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=["default", "fp32", "bf16"])
@pytest.mark.parametrize(
    "bias_dtype", [None, torch.float32, torch.bfloat16], ids=["no-bias", "fp32-bias", "bf16-bias"]
)
def test_bias_and_output_dtype(bias_dtype, out_dtype):
    x = sample(7, 80, seed=14, dtype=torch.bfloat16)
    qt = qpass.quantize(sample(40, 80, seed=15), "mxfp8_e4m3", axis=-1)
    bias = None if bias_dtype is None else (sample(40, seed=16).flatten() * 10).to(bias_dtype)
    y = weight_matmul(x, qt, bias, input_quantizer=Quantizer("mxfp8_e4m3"), out_dtype=out_dtype)
    assert y.dtype == (out_dtype or torch.bfloat16)
    assert_close(y, *reference(x, qt, bias, Quantizer("mxfp8_e4m3")))


def test_empty_input():
    qt = qpass.quantize(sample(8, 64), "mxfp4", axis=-1)
    y = weight_matmul(torch.zeros(0, 3, 64), qt, input_quantizer=Quantizer("fp8_e4m3"))
    assert y.shape == (0, 3, 8)


def test_strided_input_is_read_in_place():
    base = sample(40, 3, 64, seed=17)
    x = base.transpose(0, 1)[:, ::2]  # [3, 20, 64], non-contiguous in both leading dims
    qt = qpass.quantize(sample(24, 64, seed=18), "nvfp4", axis=-1)
    quantizer = Quantizer("nvfp4", granularity=("tile", 16))
    assert_close(weight_matmul(x, qt, input_quantizer=quantizer), *reference(x, qt, quantizer=quantizer))


def test_zeros_are_exact():
    x = sample(5, 64, seed=19)
    x[2] = 0
    w = sample(20, 64, seed=20)
    w[7] = 0
    for fmt, quantizer in (("mxfp4", Quantizer("mxfp4")), ("fp8_e4m3", Quantizer("nvfp4"))):
        y = weight_matmul(
            x, qpass.quantize(w, fmt, axis=-1, **({"granularity": "channel"} if fmt == "fp8_e4m3" else {})),
            input_quantizer=quantizer,
        )
        assert torch.equal(y[2], torch.zeros(20)) and torch.equal(y[:, 7], torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# Non-finite values (SPEC section 3: a non-finite value makes its whole scaling group NaN)
# ---------------------------------------------------------------------------------------------

NAN_WEIGHTS = [  # format kwargs, whether one NaN poisons every output column (a per-tensor scale)
    (("mxfp4", {}), False),
    (("mxint8", {}), False),
    (("nvfp4", {}), True),  # g is NaN
    (("nvfp4", {"granularity": ("tile", 16)}), True),
    (("fp8_e4m3", {"granularity": "tensor"}), True),
    (("fp8_e5m2", {"granularity": "channel"}), False),
    (("fp4_e2m1", {"granularity": ("block", 16)}), False),
    (("fp8_e4m3", {"granularity": ("block", 8), "pow2": True}), False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight, whole_tensor", NAN_WEIGHTS, ids=[_id(w) for w, _ in NAN_WEIGHTS])
def test_nan_weight_block_gives_nan_columns(weight, whole_tensor, dtype):
    fmt, kwargs = weight
    w = sample(40, 70, seed=21)
    w[3, 5] = math.nan
    w[37, 66] = math.inf
    qt = qpass.quantize(w, fmt, axis=-1, **kwargs)
    x = sample(6, 70, seed=22, dtype=dtype)
    x[4] = 0  # a zero row still gives NaN in a NaN column: 0 * NaN
    y = weight_matmul(x, qt, out_dtype=torch.float32)
    nan_columns = (
        torch.ones(40, dtype=torch.bool) if whole_tensor
        else torch.isin(torch.arange(40), torch.tensor([3, 37]))
    )
    assert torch.equal(y.isnan(), nan_columns.expand(6, 40))
    ref, bound = reference(x, qt)
    assert torch.equal(ref.isnan(), y.isnan())
    if not whole_tensor:
        assert_close(y[:, ~nan_columns], ref[:, ~nan_columns], bound[:, ~nan_columns])


@pytest.mark.parametrize(
    "quantizer, whole_tensor",
    [(Quantizer("mxfp8_e4m3"), False), (Quantizer("fp8_e4m3", granularity="channel"), False),
     (Quantizer("fp8_e4m3"), True), (Quantizer("nvfp4"), True),
     (Quantizer("fp6_e2m3", granularity=("block", 16)), False)],
    ids=_id,
)
def test_nonfinite_activation_gives_nan_rows(quantizer, whole_tensor):
    x = sample(2, 9, 100, seed=23)
    x[1, 2, 40] = math.inf
    qt = qpass.quantize(sample(24, 100, seed=24), "mxfp4", axis=-1)
    y = weight_matmul(x, qt, input_quantizer=quantizer)
    rows = torch.zeros(2, 9, dtype=torch.bool)
    rows[1, 2] = True
    expected = torch.ones_like(rows) if whole_tensor else rows
    assert torch.equal(y.isnan(), expected[..., None].expand(2, 9, 24))
    assert torch.equal(reference(x, qt, quantizer=quantizer)[0].isnan(), y.isnan())


# ---------------------------------------------------------------------------------------------
# tl.dot_scaled (native on compute capability >= 10; forced here, under the interpreter)
# ---------------------------------------------------------------------------------------------

DOT_SCALED_CASES = [
    ("mxfp4", Quantizer("mxfp4")),
    ("mxfp4", Quantizer("mxfp8_e4m3", scale_mode="rceil")),
    ("mxfp8_e4m3", Quantizer("mxfp4", rounding="away")),
    ("mxfp8_e4m3", Quantizer("mxfp8_e5m2")),
    ("mxfp8_e5m2", Quantizer("mxfp8_e4m3")),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight, quantizer", DOT_SCALED_CASES, ids=lambda v: _id(v))
def test_dot_scaled(weight, quantizer, dtype):
    x = sample(2, 9, 150, seed=25, dtype=dtype)
    x[0, 3, 100] = math.nan  # its row's output is NaN (the block's E8M0 scale is 0xFF)
    w = sample(40, 150, seed=26)
    w[11, 70] = math.nan  # and its column's
    qt = qpass.quantize(w, weight, axis=-1)
    bias = sample(40, seed=27).flatten()
    y = weight_matmul(x, qt, bias, input_quantizer=quantizer, dot_scaled=True, out_dtype=torch.float32)
    ref, bound = reference(x, qt, bias, quantizer)
    nan = torch.zeros(2, 9, 40, dtype=torch.bool)
    nan[0, 3] = True
    nan[..., 11] = True
    assert torch.equal(y.isnan(), nan) and torch.equal(ref.isnan(), nan)
    assert_close(y[~nan], ref[~nan], bound[~nan])


def test_dot_scaled_refuses_other_formats():
    x = sample(4, 64, seed=28)
    mx = qpass.quantize(sample(8, 64, seed=29), "mxfp4", axis=-1)
    with pytest.raises(ValueError, match="MXFP4 and MXFP8"):
        weight_matmul(x, qpass.quantize(sample(8, 64), "mxfp6_e2m3", axis=-1),
                      input_quantizer=Quantizer("mxfp4"), dot_scaled=True)
    with pytest.raises(ValueError, match="activations quantized on the fly"):
        weight_matmul(x, mx, input_quantizer=Quantizer("nvfp4"), dot_scaled=True)
    with pytest.raises(ValueError, match="activations quantized on the fly"):
        weight_matmul(x, mx, dot_scaled=True)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        weight_matmul(x.half(), mx, input_quantizer=Quantizer("mxfp4"), dot_scaled=True)


# ---------------------------------------------------------------------------------------------
# Errors, and the bound itself
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    x = sample(4, 64)
    qt = qpass.quantize(sample(8, 64), "mxfp4", axis=-1)
    with pytest.raises(ValueError, match="quantized along K"):
        weight_matmul(x, qpass.quantize(sample(64, 8), "mxfp4", axis=0))
    with pytest.raises(ValueError, match="K = 64"):
        weight_matmul(sample(4, 63), qt)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        weight_matmul(x, qt, torch.zeros(9))
    with pytest.raises(TypeError, match="float64"):
        weight_matmul(x.double(), qt)
    with pytest.raises(ValueError, match="power-of-two blocks"):
        weight_matmul(x, qt, input_quantizer=Quantizer("fp8_e4m3", granularity=("block", 12)))
    with pytest.raises(TypeError, match="QTensor"):
        weight_matmul(x, sample(8, 64))
    truncated = qpass.QTensor(qt.codes[:, :16], qt.scales, qt.format, qt.shape, qt.axis, qt.dtype)
    with pytest.raises(ValueError, match=r"weight codes must be uint8 \(8, 32\)"):
        weight_matmul(x, truncated)


def test_the_bound_catches_a_bf16_rounded_weight():
    """The tolerance is tight enough to see one bf16 rounding of the dequantized weights (what a
    wrong 'exact in bf16' claim would cost), so the comparisons above could fail."""
    x = sample(10, 100, seed=1)
    qt = qpass.quantize(sample(24, 100, seed=2), "fp8_e4m3", axis=-1, granularity=("block", 16))
    ref, bound = reference(x, qt)
    rounded = x @ qpass.dequantize(qt).bfloat16().float().T
    with pytest.raises(AssertionError, match="beyond the fp32 bound"):
        assert_close(rounded, ref, bound)


def test_prune_keeps_tiles_that_hold_whole_activation_blocks():
    from qpass.codegen.tuning import prune_matmul

    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": k}) for k in (64, 128)]

    def kept(**kwargs):
        return [c.kwargs["BLOCK_K"] for c in prune_matmul(configs, {}, **kwargs)]

    assert kept(QUANTIZE_X=False, X_GRANULARITY=0, X_GROUP=0) == [64, 128]  # weight blocks need nothing
    assert kept(QUANTIZE_X=True, X_GRANULARITY=2, X_GROUP=32, DOT_SCALED=True) == [64, 128]
    assert kept(QUANTIZE_X=True, X_GRANULARITY=2, X_GROUP=128) == [128]
    assert kept(QUANTIZE_X=True, X_GRANULARITY=2, X_GROUP=512) == [512]  # the fallback tile
    assert kept(QUANTIZE_X=True, X_GRANULARITY=1, X_GROUP=0) == [64, 128]  # a per-row scale: any tile
