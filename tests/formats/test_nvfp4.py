"""NVFP4 (SPEC section 2): E2M1 elements, E4M3 scales per block of 16, one fp32 scale per tensor.

The oracle is the SPEC formula re-implemented here step by step with numpy float32 arithmetic and
ml_dtypes' RNE casts (float8_e4m3fn for the block scales, float4_e2m1fn for the elements), plus
a few cases worked out by hand. Everything is compared bit for bit. 2D blocks (granularity
("tile", 16)) are checked against ``oracles.nvfp4_tiles``, a loop over the 16x16 tiles.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import oracles
import pytest
import torch

import qpass
from qpass.formats import NAMED_FORMATS, resolve_format
from qpass.formats.api import quantization_step

F32 = np.float32
FP32_MAX = F32(np.finfo(np.float32).max)
E4M3_MIN_NORMAL = F32(2.0**-6)
E4M3_MAX = F32(448.0)
E2M1_MAX = F32(6.0)
BLOCK = 16


class Ref:
    """SPEC NVFP4 for a float32 array quantized along its last axis, each step one fp32 operation."""

    def __init__(self, x: np.ndarray):
        assert x.dtype == np.float32
        k = x.shape[-1]
        k_pad = -(-k // BLOCK) * BLOCK
        padded = np.concatenate([x, np.zeros((*x.shape[:-1], k_pad - k), F32)], axis=-1)
        blocks = padded.reshape(*x.shape[:-1], k_pad // BLOCK, BLOCK)

        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # g = amax_tensor / 2688 (2688 = 448 * 6); 1.0 for an all-zero tensor; NaN for NaN/Inf.
            amax = F32(np.max(np.abs(x)))
            if amax == 0:
                g = F32(1.0)
            elif not np.isfinite(amax):
                g = F32(np.nan)
            else:
                g = F32(max(amax / F32(2688.0), F32(2.0**-149)))  # qpass keeps g off zero
            # s_b = e4m3_rne(clamp((block_amax / 6) / g, 2^-6, 448))
            block_amax = np.max(np.abs(blocks), axis=-1)
            ratio = (block_amax / E2M1_MAX) / g
            ratio = np.clip(ratio, E4M3_MIN_NORMAL, E4M3_MAX)  # NaN stays NaN
            s_b_e4m3 = ratio.astype(F32).astype(ml_dtypes.float8_e4m3fn)
            s_b = s_b_e4m3.astype(F32)
            # q = e2m1_rne(clamp(x * ((1 / g) / s_b), -6, 6)), with the factor (1 / g) / s_b clamped
            # to fp32 max (qpass decision: it overflows only for amax below ~1e-35).
            with np.errstate(over="ignore", divide="ignore"):
                encode = ((F32(1.0) / g) / s_b).astype(F32)
            encode = np.where(np.isnan(encode), encode, np.minimum(encode, FP32_MAX)).astype(F32)
            scaled = (blocks * encode[..., None]).astype(F32)
            nonfinite = ~np.isfinite(scaled)
            q_e2m1 = np.clip(scaled, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn)
            # E2M1 has no NaN: qpass stores a non-finite element as +0 (the NaN scales carry the NaN);
            # ml_dtypes would give -0 here, so the code is set explicitly.
            q_e2m1[nonfinite] = F32(0.0)
            q = np.where(nonfinite, F32(np.nan), q_e2m1.astype(F32))
            # dequantized q * (s_b * g)
            decode = (s_b * g).astype(F32)
            deq = (q * decode[..., None]).astype(F32)

        self.g = g
        self.scale_codes = s_b_e4m3.view(np.uint8)
        codes = q_e2m1.view(np.uint8).reshape(*x.shape[:-1], k_pad)
        self.packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # element 2i in the low nibble
        self.deq = deq.reshape(*x.shape[:-1], k_pad)[..., :k]


def reference(x: torch.Tensor, axis: int = -1) -> Ref:
    """Run the reference with ``axis`` moved last (the QTensor layout)."""
    return Ref(x.detach().float().movedim(axis, -1).contiguous().numpy())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same values including the sign of zero; NaN matches NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    a, e = actual[~nan].float(), expected[~nan].float()
    assert torch.equal(a.view(torch.int32), e.view(torch.int32)), (a, e)


def check_against_reference(x: torch.Tensor, axis: int = -1) -> None:
    ref = reference(x, axis)
    qt = qpass.quantize(x, "nvfp4", axis=axis)
    assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.shape == ()
    assert_bits_equal(qt.tensor_scale, torch.tensor(ref.g))
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.numpy().tolist() == ref.scale_codes.tolist()
    assert qt.codes.dtype == torch.uint8
    assert qt.codes.numpy().tolist() == ref.packed.tolist()
    expected = torch.from_numpy(ref.deq).movedim(-1, axis).to(x.dtype)
    assert_bits_equal(qpass.dequantize(qt), expected)
    assert_bits_equal(qpass.fake_quantize(x, "nvfp4", axis=axis), expected)


# --------------------------------------------------------------------------------------------
# Random tensors, several shapes and magnitudes.


def heavy_tailed(shape, gen):
    # Per-block magnitudes spread over ~10 binades either way, so block ratios hit the 2^-6 clamp,
    # E4M3 subnormal-range ratios (clamped) and the top of the E4M3 range.
    x = torch.randn(shape, generator=gen)
    spread = torch.exp(3 * torch.randn((*shape[:-1], -(-shape[-1] // 16)), generator=gen))
    return x * spread.repeat_interleave(16, dim=-1)[..., : shape[-1]]


CASES = [
    # (id, shape, axis, scale, dtype)
    ("4x64", (4, 64), -1, 1.0, torch.float32),
    ("3x50_small", (3, 50), -1, 1e-3, torch.float32),  # K not a multiple of 16
    ("2x3x40_large", (2, 3, 40), -1, 1e4, torch.float32),
    ("48x5_axis0", (48, 5), 0, 1.0, torch.float32),
    ("3x20x7_axis1", (3, 20, 7), 1, 30.0, torch.float32),
    ("1x16", (1, 16), -1, 1.0, torch.float32),
    ("7", (7,), -1, 2.0, torch.float32),
    ("8x32_bf16", (8, 32), -1, 1.0, torch.bfloat16),
    ("6x33_fp16", (6, 33), -1, 100.0, torch.float16),
    ("tiny_1e-37", (4, 32), -1, 1e-37, torch.float32),  # 1/g overflows fp32 and is clamped
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, shape, axis, scale, dtype", CASES, ids=[c[0] for c in CASES])
def test_random_matches_reference(name, shape, axis, scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    check_against_reference(x, axis)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_tailed_blocks_match_reference(seed):
    x = heavy_tailed((6, 96), torch.Generator().manual_seed(seed))
    ref = reference(x)
    # The data really does exercise both ends of the block-scale clamp.
    assert (ref.scale_codes == 0x08).any() and (ref.scale_codes >= 0x70).any()
    check_against_reference(x)


def test_all_grid_values_times_a_scale():
    # Every E2M1 magnitude, both signs, in one block whose amax (6) is also the tensor's:
    # g = 6/2688, ratio = (6/6)/g = 448 -> s_b = 448 and x * ((1/g)/448) is x up to rounding.
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.tensor([grid + [-v for v in grid]], dtype=torch.float32)
    check_against_reference(x)


# --------------------------------------------------------------------------------------------
# Hand-worked cases.


def test_hand_worked_block_and_low_clamp():
    # Block 0: amax 2688 -> g = 2688/2688 = 1.0; ratio = 2688/6/1 = 448 -> s_b = 448 = 0 1111 110 = 0x7E.
    #   x * ((1/1)/448): 2688 -> 6 (0111 = 7); 1000 -> 2.23 -> step 1: 2 (0100 = 4) -> 896;
    #   -300 -> -0.67 -> step .5: 1.34 -> 1 -> -0.5 (1001 = 9) -> -224.   bytes 0x47, 0x09, then zeros.
    # Block 1 (all zero): ratio 0 -> clamped to 2^-6 -> 0 0001 000 = 0x08; elements 0.
    # Block 2: ratio = 0.05/6 = 0.0083 < 2^-6 -> clamped: s_b = 2^-6 (0x08), encode = 64:
    #   0.05 * 64 = 3.2 -> 3 (0101 = 5) -> 3/64 = 0.046875;  -0.02 * 64 = -1.28 -> step .5: 2.56 -> 3 -> -1.5
    #   (1011 = 0xB) -> -0.0234375;  0.001 * 64 = 0.064 -> 0.   bytes 0xB5, then zeros.
    x = torch.zeros(1, 48)
    x[0, :3] = torch.tensor([2688.0, 1000.0, -300.0])
    x[0, 32:35] = torch.tensor([0.05, -0.02, 0.001])
    qt = qpass.quantize(x, "nvfp4")
    assert qt.tensor_scale.item() == 1.0
    assert qt.scales.tolist() == [[0x7E, 0x08, 0x08]]
    assert qt.codes.tolist() == [[0x47, 0x09] + [0] * 6 + [0] * 8 + [0xB5] + [0] * 7]
    expected = torch.zeros(1, 48)
    expected[0, :3] = torch.tensor([2688.0, 896.0, -224.0])
    expected[0, 32:34] = torch.tensor([0.046875, -0.0234375])
    assert torch.equal(qpass.dequantize(qt), expected)
    check_against_reference(x)


def test_zero_block_inside_nonzero_tensor():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, generator=gen)
    x[1, 16:32] = 0.0
    qt = qpass.quantize(x, "nvfp4")
    assert qt.scales[1, 1].item() == 0x08  # s_b clamps up to 2^-6
    assert qt.codes[1, 8:16].tolist() == [0] * 8
    out = qpass.dequantize(qt)
    assert torch.equal(out[1, 16:32], torch.zeros(16)) and not out[1, 16:32].signbit().any()
    check_against_reference(x)


@pytest.mark.parametrize("shape", [(4, 32), (3, 21)])
def test_all_zero_tensor(shape):
    x = torch.zeros(shape)
    qt = qpass.quantize(x, "nvfp4")
    assert qt.tensor_scale.item() == 1.0  # g = 1.0 when amax is 0
    assert (qt.scales == 0x08).all()
    assert (qt.codes == 0).all()
    assert_bits_equal(qpass.dequantize(qt), x)
    assert_bits_equal(qpass.fake_quantize(x, "nvfp4"), x)
    check_against_reference(x)


def test_block_ratio_above_448_is_clamped():
    # A subnormal tensor amax: 3000 * 2^-149 / 2688 = 1.12 * 2^-149 rounds to g = 2^-149, so the block
    # ratio (3000 * 2^-149 / 6) / g = 500 exceeds 448: clamped to 448 (0x7E). Without the clamp the
    # E4M3 cast of 500 would be NaN. 1/g = 2^149 overflows and is clamped to fp32 max, so the element
    # 3000 * 2^-149 * (fp32max / 448) = 3.2e-6 rounds to 0.
    x = torch.zeros(1, 16)
    x[0, 0] = 3000 * 2.0**-149
    qt = qpass.quantize(x, "nvfp4")
    assert qt.tensor_scale.item() == 2.0**-149
    assert qt.scales.tolist() == [[0x7E]]
    assert qt.codes.tolist() == [[0] * 8]
    assert torch.equal(qpass.dequantize(qt), torch.zeros(1, 16))
    check_against_reference(x)


def test_e4m3_scale_rounding_is_rne():
    # Tensor amax 2688 -> g = 1. Block 1 amax 6 * 9.5 = 57 -> ratio 9.5, halfway between the E4M3 values
    # 9 and 10 (step 1 in [8, 16)): RNE picks 10 (mantissa 010 even over 001) = 0 1010 010 = 0x52.
    # Block 2 amax 6 * 11 = 66 -> ratio 11.0 exactly = 0 1010 011 = 0x53.
    x = torch.zeros(1, 48)
    x[0, 0] = 2688.0
    x[0, 16] = 57.0
    x[0, 32] = 66.0
    qt = qpass.quantize(x, "nvfp4")
    assert qt.scales.tolist() == [[0x7E, 0x52, 0x53]]
    # 57 * (1/10) = 5.7 -> step 2 in [4, 8): 2.85 -> 3 -> 6 (0111) -> 60;  66/11 = 6 -> 6 -> 66.
    assert qpass.dequantize(qt)[0, [16, 32]].tolist() == [60.0, 66.0]
    check_against_reference(x)


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_nonfinite_makes_everything_nan(special):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    x[2, 37] = special
    qt = qpass.quantize(x, "nvfp4")
    assert not qt.tensor_scale.isfinite()
    assert qpass.dequantize(qt).isnan().all()
    assert qpass.fake_quantize(x, "nvfp4").isnan().all()
    assert (qt.scales == 0x7F).all()  # E4M3 NaN code
    assert (qt.codes == 0).all()  # E2M1 has no NaN code; non-finite elements encode as +0


def test_nan_matches_reference():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    x[0, 3] = math.nan
    check_against_reference(x)


# --------------------------------------------------------------------------------------------
# Layout and storage.


@pytest.mark.parametrize(
    "shape, axis, scales_shape, codes_shape",
    [
        ((64, 64), -1, (64, 4), (64, 32)),
        ((5, 17), -1, (5, 2), (5, 16)),
        ((17, 5), 0, (5, 2), (5, 16)),
        ((2, 3, 8), 1, (2, 8, 1), (2, 8, 8)),
    ],
)
def test_layout(shape, axis, scales_shape, codes_shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    qt = qpass.quantize(x, "nvfp4", axis=axis)
    assert qt.scales.shape == scales_shape  # [..., ceil(K/16)] E4M3 bytes
    assert qt.codes.shape == codes_shape  # [..., K_pad/2], two E2M1 codes per byte
    assert qt.shape == x.shape and qt.axis == axis % len(shape)
    assert qpass.dequantize(qt).shape == x.shape


def test_bits_per_element():
    qt = qpass.quantize(torch.randn(64, 64, generator=torch.Generator().manual_seed(11)), "nvfp4")
    assert qt.bits_per_element() == 4 + 8 / 16 + 32 / 4096


def test_bf16_dequantize_dtype():
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    qt = qpass.quantize(x, "nvfp4")
    assert qt.dtype == torch.bfloat16 and qpass.dequantize(qt).dtype == torch.bfloat16
    # bf16 upcasts exactly: same codes and scales as the fp32 copy.
    ref = qpass.quantize(x.float(), "nvfp4")
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scales, ref.scales)
    assert torch.equal(qt.tensor_scale, ref.tensor_scale)


# --------------------------------------------------------------------------------------------
# 2D blocks: granularity ("tile", 16), one E4M3 scale per 16x16 tile of the last two dims
# (Transformer Engine's NVFP4 weight recipe). The oracle is oracles.nvfp4_tiles, a loop over tiles.

TILE = ("tile", 16)


def tile_scale_layout(per_tile: torch.Tensor, shape, axis: int) -> torch.Tensor:
    """Tile codes ``[..., ceil(M/16), ceil(N/16)]`` in QTensor's 1x16 layout: the quantization axis
    last, one row per index of the other dim, each tile's scale repeated on its 16 rows."""
    if axis % len(shape) == len(shape) - 2:
        per_tile, rows = per_tile.transpose(-1, -2), shape[-1]
    else:
        rows = shape[-2]
    return per_tile.repeat_interleave(16, dim=-2)[..., :rows, :]


def check_tiles_against_oracle(x: torch.Tensor, axis: int) -> torch.Tensor:
    g, tile_codes, codes, deq = oracles.nvfp4_tiles(x.detach().float().numpy())
    qt = qpass.quantize(x, "nvfp4", axis=axis, granularity=TILE)
    assert_bits_equal(qt.tensor_scale, torch.tensor(g))
    assert torch.equal(qt.scales, tile_scale_layout(torch.from_numpy(tile_codes), x.shape, axis))
    last = torch.from_numpy(codes).movedim(axis, -1)
    last = torch.cat((last, last.new_zeros(*last.shape[:-1], -last.shape[-1] % 16)), dim=-1)
    assert torch.equal(qt.codes, last[..., 0::2] | (last[..., 1::2] << 4))  # element 2i in the low nibble
    expected = torch.from_numpy(deq).to(x.dtype)
    assert_bits_equal(qpass.dequantize(qt), expected)
    assert_bits_equal(qpass.fake_quantize(x, "nvfp4", axis=axis, granularity=TILE), expected)
    return qpass.dequantize(qt)


def tiled_heavy_tail(shape, gen):
    # Normal values times a per-tile magnitude spread over ~10 binades either way, so tile scales
    # hit both ends of the E4M3 clamp.
    rows, cols = -(-shape[-2] // 16), -(-shape[-1] // 16)
    spread = torch.exp(3 * torch.randn((*shape[:-2], rows, cols), generator=gen))
    spread = spread.repeat_interleave(16, dim=-2).repeat_interleave(16, dim=-1)[..., : shape[-2], : shape[-1]]
    return torch.randn(shape, generator=gen) * spread


TILE_CASES = [
    # (id, shape, axis, dtype)
    ("33x50", (33, 50), -1, torch.float32),
    ("33x50_axis-2", (33, 50), -2, torch.float32),
    ("3x17x40", (3, 17, 40), -1, torch.float32),
    ("3x17x40_axis1", (3, 17, 40), 1, torch.float32),
    ("16x16", (16, 16), -1, torch.float32),
    ("2x1x20", (2, 1, 20), -1, torch.float32),  # one row: a tile is one 1x16 block
    ("50x33_bf16_axis-2", (50, 33), -2, torch.bfloat16),
    ("20x24_fp16", (20, 24), -1, torch.float16),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, shape, axis, dtype", TILE_CASES, ids=[c[0] for c in TILE_CASES])
def test_tiles_random_match_oracle(name, shape, axis, dtype, seed):
    x = tiled_heavy_tail(shape, torch.Generator().manual_seed(seed)).to(dtype)
    check_tiles_against_oracle(x, axis)


def adversarial_tiles() -> torch.Tensor:
    """A 40x50 tensor (3x4 tiles, the last row and column of tiles partial) with g = 1."""
    x = torch.zeros(40, 50)
    # Tile (0, 0): amax 2688 -> g = 1 and s_b = 448 (0x7E) for all 16 rows, so row 5 is quantized
    # at 1/448: 100 -> 0.22 -> 0; 300 -> 0.67 -> 0.5 -> 224; -700 -> -1.56 -> -1.5 -> -672.
    x[0, 0] = 2688.0
    x[5, :3] = torch.tensor([100.0, 300.0, -700.0])
    # Tile (0, 1): amax 57 -> ratio 9.5, an E4M3 tie: s_b = 10 (0x52). Elements x / 10 (x * 0.1f
    # rounds back to the exact tie): 25 -> 2.5 -> 2; 35 -> 3.5 -> 4; 50 -> 5 -> 4; -15 -> -1.5;
    # 2.5 -> 0.25 -> 0; 7.5 -> 0.75 -> 1 (ties to even); 57 -> 5.7 -> 6.
    x[15, 16] = 57.0
    x[3, 17:23] = torch.tensor([25.0, 35.0, 50.0, -15.0, 2.5, 7.5])
    # Tile (0, 2): amax 50.4 -> ratio 8.4 -> s_b = 8 (0x50): 50.4 / 8 = 6.3 saturates to 6 -> 48.
    x[9, 40] = 50.4
    # Tile (0, 3), two columns wide: fp32 subnormals -> s_b clamped up to 2^-6 (0x08), elements +-0.
    x[0, 48], x[1, 49] = 1e-40, -3e-41
    # Tile (1, 1): ratio below 2^-6 -> s_b = 2^-6, encode 64: 0.05 -> 3.2 -> 3 -> 0.046875;
    # -0.02 -> -1.28 -> -1.5 -> -0.0234375.  Tile (1, 0) and the others stay all zero.
    x[20, 16], x[31, 17] = 0.05, -0.02
    # Tile (2, 2), eight rows high: random values.
    x[32:, 32:48] = torch.randn(8, 16, generator=torch.Generator().manual_seed(13))
    return x


@pytest.mark.parametrize("axis", [-1, -2])
def test_tiles_adversarial_match_oracle(axis):
    x = adversarial_tiles()
    out = check_tiles_against_oracle(x, axis)
    qt = qpass.quantize(x, "nvfp4", axis=axis, granularity=TILE)
    assert qt.tensor_scale.item() == 1.0
    per_tile = qt.scales[::16] if axis == -1 else qt.scales[::16].T  # one row per tile
    assert per_tile.tolist()[0] == [0x7E, 0x52, 0x50, 0x08]
    assert out[5, :3].tolist() == [0.0, 224.0, -672.0]
    assert out[3, 17:23].tolist() == [20.0, 40.0, 40.0, -15.0, 0.0, 10.0] and out[15, 16].item() == 60.0
    assert out[9, 40].item() == 48.0
    assert out[0, 48].item() == 0.0 and not out[0, 48].signbit() and out[1, 49].signbit()
    assert out[20, 16].item() == 0.046875 and out[31, 17].item() == -0.0234375
    zero_tile = out[16:32, :16]
    assert torch.equal(zero_tile, torch.zeros(16, 16)) and not zero_tile.signbit().any()
    # With 1x16 blocks, row 5 gets its own scale (700 / 6 -> 120) and keeps its small values
    # (300 * fp32(1 / 120) is just above 2.5 -> 3).
    assert qpass.fake_quantize(x, "nvfp4")[5, :3].tolist() == [120.0, 360.0, -720.0]


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_tiles_nonfinite(special, axis):
    # As with 1x16 blocks, g is NaN for a tensor holding NaN or Inf, so every tile is NaN.
    x = tiled_heavy_tail((33, 50), torch.Generator().manual_seed(14))
    x[20, 37] = special
    out = check_tiles_against_oracle(x, axis)
    assert out.isnan().all()
    assert (qpass.quantize(x, "nvfp4", axis=axis, granularity=TILE).scales == 0x7F).all()  # E4M3 NaN


def test_tiles_all_zero_tensor():
    x = torch.zeros(17, 20)
    qt = qpass.quantize(x, "nvfp4", granularity=TILE)
    assert qt.tensor_scale.item() == 1.0 and (qt.scales == 0x08).all() and (qt.codes == 0).all()
    assert_bits_equal(check_tiles_against_oracle(x, -2), x)


@pytest.mark.parametrize("shape", [(33, 50), (3, 17, 40), (16, 16)], ids=str)
def test_tiles_same_values_along_either_axis(shape):
    # The point of 2D blocks: a weight quantized along K (forward) and along N (dgrad) is the same.
    w = tiled_heavy_tail(shape, torch.Generator().manual_seed(15))
    along_k = qpass.fake_quantize(w, "nvfp4", axis=-1, granularity=TILE)
    assert_bits_equal(qpass.fake_quantize(w, "nvfp4", axis=-2, granularity=TILE), along_k)
    transposed = qpass.fake_quantize(w.transpose(-1, -2), "nvfp4", axis=-1, granularity=TILE)
    assert_bits_equal(transposed.transpose(-1, -2), along_k)
    step_k = quantization_step(w, "nvfp4", axis=-1, granularity=TILE)
    assert_bits_equal(quantization_step(w, "nvfp4", axis=-2, granularity=TILE), step_k)
    # 1x16 blocks do not have the property.
    assert not torch.equal(qpass.fake_quantize(w, "nvfp4", axis=-1), qpass.fake_quantize(w, "nvfp4", axis=-2))


@pytest.mark.parametrize("shape, axis, scales_shape, codes_shape", [
    ((3, 17, 40), -1, (3, 17, 3), (3, 17, 24)),
    ((3, 17, 40), -2, (3, 40, 2), (3, 40, 16)),
])
def test_tiles_layout(shape, axis, scales_shape, codes_shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(16))
    qt = qpass.quantize(x, "nvfp4", axis=axis, granularity=TILE)
    assert qt.scales.shape == scales_shape and qt.codes.shape == codes_shape  # the 1x16 layout
    for start in range(0, qt.scales.shape[-2], 16):  # each tile's scale on each of its rows
        assert (qt.scales[:, start : start + 16] == qt.scales[:, start : start + 1]).all()
    assert qt.bits_per_element() == qpass.quantize(x, "nvfp4", axis=axis).bits_per_element()


STOCHASTIC_OPTIONS = [
    {"granularity": TILE}, {"scale_mode": "4over6"}, {"granularity": TILE, "scale_mode": "4over6"},
]


@pytest.mark.parametrize("options", STOCHASTIC_OPTIONS, ids=["16x16", "4over6", "16x16-4over6"])
def test_tiles_stochastic_rounding(options):
    # The scales are the RNE ones (4over6 also compares its candidates rounded to nearest even).
    w = tiled_heavy_tail((33, 50), torch.Generator().manual_seed(17))
    stochastic = {**options, "rounding": "stochastic", "generator": 3}
    rne = qpass.quantize(w, "nvfp4", **options)
    sr = qpass.quantize(w, "nvfp4", **stochastic)
    assert torch.equal(sr.scales, rne.scales) and torch.equal(sr.tensor_scale, rne.tensor_scale)
    assert torch.equal(sr.codes, qpass.quantize(w, "nvfp4", **stochastic).codes)  # reproducible
    out = qpass.dequantize(sr)
    assert_bits_equal(qpass.fake_quantize(w, "nvfp4", **stochastic), out)
    assert not torch.equal(out, qpass.dequantize(rne))
    # Each value is one of the two grid points around x, at the tile's (or block's) scale.
    assert ((out - w).abs() <= quantization_step(w, "nvfp4", **options)).all()


def test_tiles_stochastic_rounding_is_unbiased():
    # 2000 independent draws of one 16x16 tile (a batch dim of copies). Its amax 2688 gives g = 1 and
    # s_b = 448 exactly, so nothing saturates. The mean's error has std <= step / (2 sqrt(2000)).
    tile = torch.empty(16, 16).uniform_(-2688.0, 2688.0, generator=torch.Generator().manual_seed(18))
    tile[7, 7] = 2688.0
    copies = tile.expand(2000, 16, 16)
    draws = qpass.fake_quantize(copies, "nvfp4", granularity=TILE, rounding="stochastic", generator=4)
    step = quantization_step(tile, "nvfp4", granularity=TILE)
    assert ((draws.double().mean(0) - tile).abs() <= 0.06 * step).all()


def test_tiles_spec():
    spec = resolve_format("nvfp4", granularity=TILE)
    assert (spec.name, spec.scaling, spec.granularity, spec.block_size) == ("nvfp4", "nvfp4", "tile", 16)
    assert resolve_format(spec) == spec
    default = NAMED_FORMATS["nvfp4"]
    assert resolve_format("nvfp4", granularity=("block", 16)) == resolve_format("nvfp4") == default
    assert resolve_format(spec, granularity=("block", 16)) == default


@pytest.mark.parametrize(
    "granularity", [("tile", 32), ("tile", 8), ("tile",), ("block", 32), "tensor", "channel", "tile"], ids=str
)
def test_nvfp4_rejects_other_granularities(granularity):
    with pytest.raises(ValueError, match=r"\('block', 16\).*\('tile', 16\)"):
        qpass.fake_quantize(torch.ones(16, 16), "nvfp4", granularity=granularity)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "mxfp4", "mxfp8_e4m3"])
def test_tiles_are_nvfp4_only(fmt):
    with pytest.raises(ValueError, match="nvfp4"):
        qpass.fake_quantize(torch.ones(16, 16), fmt, granularity=TILE)


@pytest.mark.parametrize("shape, axis", [((32,), -1), ((), -1), ((2, 16, 16), 0), ((2, 16, 16), -3)])
@pytest.mark.parametrize("fn", [qpass.quantize, qpass.fake_quantize, quantization_step])
def test_tiles_need_one_of_the_last_two_dims(fn, shape, axis):
    with pytest.raises(ValueError, match="last two"):
        fn(torch.ones(shape), "nvfp4", axis=axis, granularity=TILE)


# --------------------------------------------------------------------------------------------
# scale_mode="4over6" ("Four Over Six", arXiv 2512.02010; Transformer Engine's and ModelOpt's NVFP4
# 4over6): per block (or tile) the map-to-6 scale or the map-to-4 one, whichever dequantizes with
# the smaller squared error; g = amax / 1536 (E4M3's 256 times 6, as in those implementations).
# The oracle below is that definition in numpy float32, a loop over the blocks or tiles, with the
# error summed in the defined orders: a block's 16 squares by adjacent pairs, a tile's 256 as a
# quadtree of 2x2 squares, each (diagonal) + (anti-diagonal).

FOUR_OVER_SIX = "4over6"


def sum_pairs(v: np.ndarray) -> np.float32:
    """A power-of-two number of float32 values: adjacent pairs summed, then pairs of those."""
    while v.shape[-1] > 1:
        v = (v[0::2] + v[1::2]).astype(F32)
    return v[0]


def sum_quads(m: np.ndarray) -> np.float32:
    """A square power-of-two float32 matrix: each 2x2 square summed (top left + bottom right) +
    (top right + bottom left), then the squares of those."""
    while m.shape[0] > 1:
        m = ((m[0::2, 0::2] + m[1::2, 1::2]) + (m[0::2, 1::2] + m[1::2, 0::2])).astype(F32)
    return m[0, 0]


class FourOverSixRef:
    """4over6 NVFP4 of float32 ``x`` along its last axis, per 1x16 block or (``tiles``) per 16x16
    tile of its last two dims. ``scale_codes``, ``codes`` (unpacked) and ``deq`` are laid out like
    ``x`` (the axis padded to whole blocks for the codes, one code per block and row for the
    scales); ``error`` and ``error_6`` are each group's squared error, kept and map-to-6."""

    def __init__(self, x: np.ndarray, tiles: bool = False):
        assert x.dtype == np.float32
        with np.errstate(all="ignore"):
            g = oracles.nvfp4_global_scale(x, divisor=1536.0)  # E4M3's 256 times 6
            height = BLOCK if tiles else 1
            m, k = (x.shape[-2] if x.ndim > 1 else 1), x.shape[-1]
            grid = x.reshape(-1, m, k)
            grid = np.pad(grid, [(0, 0), (0, -m % height), (0, -k % BLOCK)])
            batch, rows, cols = grid.shape
            scale_codes = np.zeros((batch, rows, cols // BLOCK), np.uint8)
            codes = np.zeros(grid.shape, np.uint8)
            deq = np.zeros(grid.shape, F32)
            error = np.zeros((batch, rows // height, cols // BLOCK), F32)
            error_6 = error.copy()
            for b, i, j in np.ndindex(*error.shape):
                window = (b, slice(i * height, (i + 1) * height), slice(j * BLOCK, (j + 1) * BLOCK))
                group = grid[window]
                ratio = (np.max(np.abs(group)) / E2M1_MAX) / g
                candidates = [self._candidate(group, g, r, tiles) for r in (ratio, ratio * F32(1.5))]
                keep = candidates[1] if candidates[1][0] < candidates[0][0] else candidates[0]  # ties: 6
                error[b, i, j], scale_codes[window[:2] + (j,)], codes[window], deq[window] = keep
                error_6[b, i, j] = candidates[0][0]
        self.g, self.error, self.error_6 = g, error, error_6
        lead = x.shape[:-1]
        self.scale_codes = scale_codes[:, :m].reshape(*lead, -1)
        self.codes = codes[:, :m].reshape(*lead, -1)
        self.deq = deq[:, :m, :k].reshape(x.shape)

    @staticmethod
    def _candidate(group: np.ndarray, g, ratio, tiles: bool):
        """(squared error, E4M3 code, E2M1 codes, dequantized values) of the group at one scale."""
        s_b_e4m3 = np.array(np.clip(ratio, E4M3_MIN_NORMAL, E4M3_MAX), F32).astype(ml_dtypes.float8_e4m3fn)
        s_b = s_b_e4m3.astype(F32)
        encode = np.minimum((F32(1.0) / g) / s_b, FP32_MAX)  # NaN stays NaN
        scaled = (group * encode).astype(F32)
        q = np.clip(scaled, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn)
        nonfinite = ~np.isfinite(scaled)
        deq = np.where(nonfinite, F32(np.nan), (q.astype(F32) * (s_b * g)).astype(F32))
        diff = (deq - group).astype(F32)
        squares = (diff * diff).astype(F32)
        err = sum_quads(squares) if tiles else sum_pairs(squares[0])
        return err, s_b_e4m3.view(np.uint8), np.where(nonfinite, 0, q.view(np.uint8)), deq


def check_four_over_six(x: torch.Tensor, axis: int = -1, tiles: bool = False) -> FourOverSixRef:
    """qpass's 4over6 quantize, dequantize and fake_quantize of ``x`` against the oracle, bit for bit."""
    options = {"scale_mode": FOUR_OVER_SIX, "granularity": TILE if tiles else None}
    ref = FourOverSixRef(x.detach().float().movedim(axis, -1).contiguous().numpy(), tiles)
    qt = qpass.quantize(x, "nvfp4", axis=axis, **options)
    assert_bits_equal(qt.tensor_scale, torch.tensor(ref.g))
    assert qt.scales.numpy().tolist() == ref.scale_codes.tolist()
    assert qt.codes.numpy().tolist() == (ref.codes[..., 0::2] | (ref.codes[..., 1::2] << 4)).tolist()
    expected = torch.from_numpy(ref.deq).movedim(-1, axis).to(x.dtype)
    assert_bits_equal(qpass.dequantize(qt), expected)  # the standard layout: dequantize is unchanged
    assert_bits_equal(qpass.fake_quantize(x, "nvfp4", axis=axis, **options), expected)
    return ref


FOUR_OVER_SIX_CASES = [
    # (id, shape, axis, scale, dtype, tiles)
    ("4x64", (4, 64), -1, 1.0, torch.float32, False),
    ("3x50_small", (3, 50), -1, 1e-3, torch.float32, False),  # a ragged last block
    ("2x3x40_large", (2, 3, 40), -1, 1e4, torch.float32, False),
    ("48x5_axis0", (48, 5), 0, 1.0, torch.float32, False),
    ("7", (7,), -1, 2.0, torch.float32, False),
    ("8x33_bf16", (8, 33), -1, 1.0, torch.bfloat16, False),
    ("tiny_1e-37", (4, 32), -1, 1e-37, torch.float32, False),  # g subnormal: the map-to-4 ratio clamps
    ("33x50_tiles", (33, 50), -1, 1.0, torch.float32, True),
    ("33x50_tiles_axis-2", (33, 50), -2, 1.0, torch.float32, True),
    ("3x17x40_tiles", (3, 17, 40), -1, 30.0, torch.float32, True),
    ("20x24_tiles_fp16", (20, 24), -1, 1.0, torch.float16, True),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "name, shape, axis, scale, dtype, tiles", FOUR_OVER_SIX_CASES, ids=[c[0] for c in FOUR_OVER_SIX_CASES]
)
def test_four_over_six_matches_the_oracle(name, shape, axis, scale, dtype, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    x = tiled_heavy_tail(shape, gen) if tiles and len(shape) > 1 else heavy_tailed(shape, gen)
    ref = check_four_over_six((x * scale).to(dtype), axis, tiles)
    if scale == 1.0 and dtype == torch.float32:  # both candidates are really taken
        assert (ref.error < ref.error_6).any() and (ref.error == ref.error_6).any()


def four_over_six_blocks() -> torch.Tensor:
    """A 3x72 tensor (the last block of each row 8 long) with g = 1 (its amax is 1536) whose blocks
    are worked out by hand. With g = 1 a block of amax 12 has ratio 2: s6 = 2 (E4M3 0x40), grid
    {0, 1, 2, 3, 4, 6, 8, 12}, and s4 = 3 (0x44), grid {0, 1.5, 3, 4.5, 6, 9, 12, 18}."""
    x = torch.zeros(3, 72)
    # Block (0, 0): the tensor's amax: ratio 256 -> s6 = 256 (0x78), s4 = 384 (0x7C); whichever errs less.
    x[0, :4] = torch.tensor([1536.0, 1000.0, -700.0, 300.0])
    # (0, 1): on both grids, both errors 0: a tie, so the 6 candidate.
    x[0, 16:22] = torch.tensor([12.0, 6.0, 3.0, 0.0, -3.0, -12.0])
    # (0, 2): 7 is a tie between 6 and 8 on the 6 grid (3.5 rounds to even: 4, so 8) and rounds
    # to 6 on the 4 grid (2.33 -> 2): both errors are 1, a tie again: the 6 candidate.
    x[0, 32:34] = torch.tensor([12.0, 7.0])
    # (0, 3): 9.5 -> 8 at s6 (4.75 -> 4; error 2.25), -> 9 at s4 (3.17 -> 3; error 0.25): the 4 one.
    x[0, 48:50] = torch.tensor([12.0, 9.5])
    # (0, 4), 8 long: zeros: both candidates clamp to 2^-6 (0x08), a tie.
    # (1, 0): ratio 9.4 -> s6 = 9: 56.4 / 9 = 6.27 saturates to 6 (54, error 5.76); s4 = e4m3(14.1) =
    # 14 (0x56): 56.4 / 14 = 4.03 -> 4 (56, error 0.16): the 4 one.
    x[1, 0] = 56.4
    # (1, 1): fp32 subnormals: both scales clamp to 2^-6, every value rounds to (signed) zero and its
    # square underflows: errors 0, a tie.
    x[1, 16:18] = torch.tensor([1e-40, -3e-41])
    # (1, 2): ratios below the clamp for both (0.05 / 6 * 1.5 < 2^-6): one scale, a tie.
    x[1, 32:35] = torch.tensor([0.05, -0.02, 0.001])
    # (1, 3), (2, 0..4): random values, the last block ragged.
    x[1, 48:64] = torch.randn(16, generator=torch.Generator().manual_seed(19)) * 4
    x[2] = torch.randn(72, generator=torch.Generator().manual_seed(20)) * 30
    x[2, 66:68] = torch.tensor([12.0, 9.5])  # the ragged block: 4 wins unless its random values say otherwise
    return x


def test_four_over_six_hand_worked_blocks():
    x = four_over_six_blocks()
    ref = check_four_over_six(x)
    qt = qpass.quantize(x, "nvfp4", scale_mode=FOUR_OVER_SIX)
    assert qt.tensor_scale.item() == 1.0
    assert qt.scales[0].tolist()[1:] == [0x40, 0x40, 0x44, 0x08] and qt.scales[0, 0].item() in (0x78, 0x7C)
    assert qt.scales[1].tolist()[:3] == [0x56, 0x08, 0x08]
    out = qpass.dequantize(qt)
    assert out[0, 16:22].tolist() == [12.0, 6.0, 3.0, 0.0, -3.0, -12.0]
    assert out[0, 32:34].tolist() == [12.0, 8.0] and out[0, 48:50].tolist() == [12.0, 9.0]
    assert out[1, 0].item() == 56.0
    assert out[1, 16].item() == 0.0 and not out[1, 16].signbit() and out[1, 17].signbit()
    assert torch.equal(out[0, 64:], torch.zeros(8))
    ties = ref.error[0, 0, 1:] == ref.error_6[0, 0, 1:]
    assert ties.tolist() == [True, True, False, True] and ref.error[0, 0, 2] == 1.0  # an exact, nonzero tie


def four_over_six_tiles() -> torch.Tensor:
    """A 40x50 tensor (3x4 tiles, the last row and column of tiles partial) with g = 1: the same
    cases as four_over_six_blocks, each spread over the rows and columns of a tile."""
    x = torch.zeros(40, 50)
    x[0, 0], x[5, :3] = 1536.0, torch.tensor([1000.0, -700.0, 300.0])  # tile (0, 0): the tensor's amax
    x[3, 16], x[10, 20], x[15, 17], x[1, 31] = 12.0, 6.0, -3.0, -12.0  # (0, 1): both errors 0: 6
    x[0, 32], x[9, 40] = 12.0, 9.5  # (0, 2): the 4 candidate
    x[2, 48], x[7, 49] = 12.0, 7.0  # (0, 3), two columns: errors 1 and 1: 6
    x[33, 0], x[39, 5] = 12.0, 9.5  # (2, 0), eight rows: 4
    x[20, 16], x[31, 17] = 1e-40, -3e-41  # (1, 1): subnormals, errors 0: 6 (0x08)
    x[32:, 32:48] = torch.randn(8, 16, generator=torch.Generator().manual_seed(21)) * 10  # (2, 2)
    return x


@pytest.mark.parametrize("axis", [-1, -2])
def test_four_over_six_hand_worked_tiles(axis):
    x = four_over_six_tiles()
    check_four_over_six(x, axis, tiles=True)
    qt = qpass.quantize(x, "nvfp4", axis=axis, granularity=TILE, scale_mode=FOUR_OVER_SIX)
    per_tile = (qt.scales[::16] if axis == -1 else qt.scales[::16].T).tolist()  # one row per tile
    assert per_tile[0][1:] == [0x40, 0x44, 0x40] and per_tile[1][:2] == [0x08, 0x08]
    assert per_tile[2][0] == 0x44
    out = qpass.dequantize(qt)
    assert out[9, 40].item() == 9.0 and out[7, 49].item() == 8.0 and out[39, 5].item() == 9.0


def test_four_over_six_tiles_give_the_same_values_along_either_axis():
    # The tile's error is a quadtree sum, the same bits for the transposed tile: so is the choice.
    w = tiled_heavy_tail((3, 33, 50), torch.Generator().manual_seed(22))
    options = {"granularity": TILE, "scale_mode": FOUR_OVER_SIX}
    along_k = qpass.fake_quantize(w, "nvfp4", axis=-1, **options)
    assert_bits_equal(qpass.fake_quantize(w, "nvfp4", axis=-2, **options), along_k)
    assert_bits_equal(qpass.fake_quantize(w.mT, "nvfp4", axis=-1, **options).mT, along_k)


@pytest.mark.parametrize("tiles", [False, True], ids=["1x16", "16x16"])
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_four_over_six_nonfinite_makes_everything_nan(special, tiles):
    x = torch.randn(20, 40, generator=torch.Generator().manual_seed(23))
    x[17, 37] = special
    check_four_over_six(x, tiles=tiles)
    qt = qpass.quantize(x, "nvfp4", scale_mode=FOUR_OVER_SIX, granularity=TILE if tiles else None)
    assert (qt.scales == 0x7F).all() and (qt.codes == 0).all() and qpass.dequantize(qt).isnan().all()


@pytest.mark.parametrize("tiles", [False, True], ids=["1x16", "16x16"])
def test_four_over_six_all_zero_tensor(tiles):
    x = torch.zeros(17, 21)
    qt = qpass.quantize(x, "nvfp4", scale_mode=FOUR_OVER_SIX, granularity=TILE if tiles else None)
    assert qt.tensor_scale.item() == 1.0 and (qt.scales == 0x08).all() and (qt.codes == 0).all()
    assert_bits_equal(qpass.dequantize(qt), x)
    check_four_over_six(x, tiles=tiles)


@pytest.mark.parametrize("tiles", [False, True], ids=["1x16", "16x16"])
def test_four_over_six_never_errs_more_than_mapping_to_6(tiles):
    """Block by block (tile by tile), the error kept is the smaller of the two candidates', so never
    above the standard rule's (amax to 6) at the same global scale. SPEC's default NVFP4 divides by
    2688, not 1536, and its E4M3 roundings differ, so against it no order holds block by block;
    over a tensor of Gaussian values in 1x16 blocks 4over6 errs clearly less (in 16x16 tiles, whose
    amax is far out, few pick 4 and the totals are about even)."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(24))
    ref = check_four_over_six(x, tiles=tiles)
    assert (ref.error <= ref.error_6).all() and (ref.error < ref.error_6).mean() > (0.02 if tiles else 0.2)
    if not tiles:
        four_over_six = qpass.fake_quantize(x, "nvfp4", scale_mode=FOUR_OVER_SIX)
        standard = qpass.fake_quantize(x, "nvfp4")
        assert (four_over_six - x).double().square().sum() < 0.9 * (standard - x).double().square().sum()


def test_four_over_six_spec_and_errors():
    spec = resolve_format("nvfp4", scale_mode=FOUR_OVER_SIX)
    assert (spec.name, spec.scaling, spec.scale_mode) == ("nvfp4", "nvfp4", FOUR_OVER_SIX)
    assert resolve_format("nvfp4").scale_mode is None  # the default: amax to 6
    assert resolve_format(spec, granularity=TILE).scale_mode == FOUR_OVER_SIX
    x = torch.ones(16, 16)
    for mode in ("floor", "4/6", "six"):
        with pytest.raises(ValueError, match=r"unknown scale_mode .* for nvfp4; expected one of 4over6"):
            qpass.quantize(x, "nvfp4", scale_mode=mode)
    listed = r"floor, ceil, even, rceil .*4over6 for nvfp4"  # the accepted values of each family
    with pytest.raises(ValueError, match=r"for mxfp4; expected one of " + listed):
        qpass.quantize(x, "mxfp4", scale_mode=FOUR_OVER_SIX)
    with pytest.raises(ValueError, match=r"not fp8_e4m3; accepted: " + listed):
        qpass.fake_quantize(x, "fp8_e4m3", scale_mode=FOUR_OVER_SIX)
