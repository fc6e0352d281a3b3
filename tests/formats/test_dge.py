"""The differentiable gradient estimator: f'(u) = (1/k)·|2u/δ − 1|^(1/k − 1), clamped, on the E2M1 grid."""

import math

import pytest
import torch

import qpass
from qpass.formats import DGE, dge_multiplier

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def formula(u: float, width: float, dge: DGE = DGE()) -> float:
    """The paper's derivative, written out in float64 (math.inf at the interval's middle)."""
    distance = abs(2 * u / width - 1)
    return dge.clamp if distance == 0 else min(dge.clamp, (1 / dge.k) * distance ** (1 / dge.k - 1))


def multiplier(values: list[float], dge: DGE = DGE()) -> torch.Tensor:
    """``dge_multiplier`` of element-unit values: a leading 6 makes the per-row scale exactly 1."""
    x = torch.tensor([[6.0, *values]])
    return dge_multiplier(x, "fp4_e2m1", axis=-1, dge=dge, granularity="channel")[0, 1:]


def test_grid_points_get_one_over_k():
    got = multiplier([*E2M1_GRID, *(-v for v in E2M1_GRID)])
    assert torch.equal(got, torch.full_like(got, 1 / 5))


def test_midpoints_get_the_clamp():
    midpoints = [(lo + hi) / 2 for lo, hi in zip(E2M1_GRID, E2M1_GRID[1:])]
    assert torch.equal(multiplier(midpoints), torch.full((7,), 3.0))
    assert torch.equal(multiplier(midpoints, DGE(k=5, clamp=2.5)), torch.full((7,), 2.5))


@pytest.mark.parametrize("lower, width", [(0.0, 0.5), (1.5, 0.5), (2.0, 1.0), (3.0, 1.0), (4.0, 2.0)])
def test_the_clamp_threshold_and_either_side_of_it(lower, width):
    # f' = 3 where |2u/δ − 1| = 15^(-5/4): just outside it the formula is below 3, inside it clamps.
    distance = 15 ** (-5 / 4)
    for side in (-1, 1):
        for factor in (0.9, 1.0, 1.1):
            u = width / 2 * (1 + side * distance * factor)
            value = torch.tensor(lower + u, dtype=torch.float32).item()  # what fp32 holds
            expected = formula(value - lower, width)
            assert multiplier([value]).item() == pytest.approx(expected, rel=1e-5)
            if factor != 1.0:  # at the threshold itself fp32 may land on either side of 3
                assert (multiplier([value]).item() == 3.0) == (factor < 1.0)


def test_random_points_match_the_formula():
    torch.manual_seed(0)
    values = (torch.rand(2000) * 6).tolist()
    got = multiplier(values).double()
    expected = []
    for v in torch.tensor(values).tolist():
        lower = max(g for g in E2M1_GRID if g <= v)
        upper = min(g for g in E2M1_GRID if g > v) if v < 6 else 6.0
        expected.append(formula(v - lower, upper - lower) if v < 6 else 1 / 5)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_the_scale_is_the_forwards():
    # amax 1.5: the scale is 6/1.5 = 4, so 0.375 lands on the grid point 1.5.
    x = torch.tensor([[1.5, 0.375, 0.3125]])
    got = dge_multiplier(x, "fp4_e2m1", granularity="channel")
    assert got.tolist() == [pytest.approx([0.2, 0.2, 3.0])]  # 0.3125·4 = 1.25: the middle of [1, 1.5]


def test_the_clamp_shrinks_the_gradient_on_average():
    # Over a uniform position in the interval f' averages 1 unclamped; the clamp at 3 cuts the mass
    # near the midpoint: mean 0.593, mean squared distance from 1 0.559 (docs/fp4_training.md).
    torch.manual_seed(0)
    got = dge_multiplier(torch.randn(256, 4096), "fp4_e2m1", granularity="channel").double()
    assert got.mean().item() == pytest.approx(0.593, abs=0.005)
    assert (got - 1).square().mean().item() == pytest.approx(0.559, abs=0.005)


def test_k_one_is_straight_through_and_bad_groups_are_nan():
    assert torch.equal(multiplier([0.3, 2.5, 5.9], DGE(k=1)), torch.ones(3))
    x = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    got = dge_multiplier(x, "fp4_e2m1", granularity="channel")
    assert got[0].isnan().all() and got[1].isfinite().all()


def test_other_formats_use_their_own_grid():
    # E4M3 per tensor, amax 448: scale 1, so 1.0625 sits halfway between 1.0 and 1.125.
    x = torch.tensor([448.0, 1.0625, 1.0, 0.001953125 / 2])
    got = dge_multiplier(x, "fp8_e4m3")
    assert got[:3].tolist() == [pytest.approx(0.2), 3.0, pytest.approx(0.2)] and got[3].item() == 3.0


def test_the_quantize_dequantize_op_applies_it_in_backward():
    quantizer = qpass.Quantizer("fp4_e2m1", granularity="channel", dge=DGE())
    assert str(quantizer) == "fp4_e2m1(channel, dge)"
    assert qpass.Quantizer.from_json(quantizer.to_json()) == quantizer
    w = torch.randn(4, 64, requires_grad=True)
    out = torch.ops.qpass.quantize_dequantize(w, quantizer.to_json(), -1, "")
    grad = torch.randn(4, 64)
    out.backward(grad)
    assert torch.equal(out, quantizer(w.detach(), -1))
    assert torch.equal(w.grad, grad * dge_multiplier(w.detach(), "fp4_e2m1", -1, granularity="channel"))
    assert not math.isclose(w.grad.abs().sum().item(), grad.abs().sum().item(), rel_tol=1e-3)
