"""Rotations: the Rotation config, the ``qpass::rotate`` op, rotated GEMMs in ``quantized_matmul``
(SPEC section 6 with each GEMM's operands rotated along its own reduction axis), recipe wiring."""

import copy

import pytest
import torch
from spec6 import adversarial, assert_same, fq

import qpass
from qpass import Hadamard, Quantizer, Rotation
from qpass.execution import REFERENCE
from qpass.hadamard import hadamard_matrix
from qpass.matmul_quantizers import MatmulQuantizers
from qpass.ops.matmul import quantized_matmul
from qpass.rotation import resolve

F64 = dict(dtype=torch.float64)


def dense(rotation: Rotation, length: int) -> torch.Tensor:
    """The rotation as a matrix, built from the definition: block-diagonal diag(s)·H_b (or full)."""
    size = rotation.block or length
    signs = rotation.sign_vector(length)
    block = hadamard_matrix(size) if signs is None else torch.diag(signs.double()) @ hadamard_matrix(size)
    return torch.block_diag(*[block] * (rotation.padded(length) // size))


@pytest.mark.parametrize("rotation", [
    Rotation(16), Rotation(32, seed=3), Rotation(None), Rotation(None, seed=1),
    Rotation(16, signs=(1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1))])
@pytest.mark.parametrize("axis", [-1, 0])
def test_rotation_is_the_orthogonal_matrix_along_the_axis(rotation, axis):
    x = torch.randn(96, 96, **F64)
    r = dense(rotation, 96)
    torch.testing.assert_close(r @ r.T, torch.eye(len(r), **F64), atol=1e-12, rtol=0)
    expected = x @ r if axis == -1 else r.T @ x
    torch.testing.assert_close(rotation(x, axis), expected, atol=1e-12, rtol=0)
    # Folding then unfolding restores the weights.
    torch.testing.assert_close(rotation(rotation(x, axis), axis, inverse=True), x, atol=1e-12, rtol=0)


def test_a_block_that_does_not_divide_the_axis_zero_pads_it_and_keeps_products():
    rotation = Rotation(32)
    a, b = torch.randn(5, 40, **F64), torch.randn(40, 7, **F64)
    ra, rb = rotation(a, -1), rotation(b, -2)
    assert ra.shape == (5, 64) and rb.shape == (64, 7)
    torch.testing.assert_close(ra @ rb, a @ b, atol=1e-12, rtol=0)


def test_rotate_op_gradient_is_the_inverse_rotation_cut_to_length():
    rotation = Rotation(32, seed=0)
    x = torch.randn(3, 40, **F64, requires_grad=True)
    g = torch.randn(3, 64, **F64)
    torch.ops.qpass.rotate(x, rotation.to_json(), -1, False).backward(g)
    torch.testing.assert_close(x.grad, rotation(g, -1, inverse=True)[:, :40], atol=1e-12, rtol=0)
    torch.library.opcheck(torch.ops.qpass.rotate.default, (x.detach().float(), rotation.to_json(), -1, False))


def test_full_size_falls_back_to_the_largest_dividing_block_with_a_reason():
    assert resolve(Rotation(None), 4096) == (Rotation(None), None)
    fallback, why = resolve(Rotation(None, seed=2), 944)  # 944 = 16 · 59: no Hadamard of 944 is known
    assert fallback == Rotation(16, seed=2) and "944" in why and "16-point" in why
    fallback, why = resolve(Rotation(None), 90)  # no block divides 90: padded
    assert fallback == Rotation(32) and "zero-padded axis (96)" in why


def test_bad_rotations_are_named():
    with pytest.raises(ValueError, match="block size 48"):
        Rotation(48)
    with pytest.raises(ValueError, match="±1"):
        Rotation(16, signs=(2,) * 16)
    with pytest.raises(ValueError, match="3 signs for a 16-point block"):
        Rotation(16, signs=(1, 1, 1))
    with pytest.raises(ValueError, match="one of seed= .*, signs= and resample=True"):
        Rotation(16, seed=1, signs=(1,) * 16)
    with pytest.raises(ValueError, match="one of seed="):
        Rotation(16, seed=1, resample=True)


def test_a_resampled_rotation_takes_fresh_signs_that_both_operands_share():
    rotation = Rotation(16, resample=True)
    torch.manual_seed(0)
    first, second = rotation.draw_signs(40), rotation.draw_signs(40)
    assert first.shape == (16,) and set(first.tolist()) <= {-1.0, 1.0} and not torch.equal(first, second)
    a, b = torch.randn(3, 40, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    rotated = rotation(a, -1, signs=first.double()) @ rotation(b, -2, signs=first.double())
    torch.testing.assert_close(rotated, a @ b)
    assert torch.equal(rotation(a, -1, signs=first.double()),
                       Rotation(16, signs=tuple(first.int().tolist()))(a, -1))
    with pytest.raises(ValueError, match="resample=True"):
        rotation(a, -1)
    with pytest.raises(ValueError, match="resample=True"):
        Rotation(16)(a, -1, signs=first)


def test_hadamard_forms():
    block = Rotation(32)
    assert Hadamard.parse("block32") == Hadamard(block, block, block)
    assert Hadamard.parse(None) == Hadamard() and not Hadamard()
    assert Hadamard.parse(["residual", "full"]) == Hadamard(Rotation(None), Rotation(None), Rotation(None),
                                                            Rotation(None, seed=0))
    te = Rotation(16, signs=(1,) * 16)
    assert Hadamard.parse({"wgrad": te}) == Hadamard(wgrad=te)
    assert str(Hadamard.parse(["block32", "residual"])) == "hadamard-block32 residual"


# ---- rotated GEMMs inside quantized_matmul ------------------------------------------------------


def rotated_oracle(a, b, dy, q: MatmulQuantizers, specs):
    """SPEC section 6 by hand, every operand rotated along its GEMM's reduction axis first."""
    def rq(x, spec, axis, rotation):
        x = x.detach().float()
        return fq(rotation(x, axis) if rotation else x, spec, axis)

    y = rq(a, specs["a"], -1, q.rotation) @ rq(b, specs["b"], -2, q.rotation)
    da = rq(dy, specs["da_grad"], -1, q.da_rotation) @ rq(b, specs["da_b"], -1, q.da_rotation).mT
    a2, dy2 = a.reshape(-1, a.shape[-1]), dy.reshape(-1, dy.shape[-1])
    db = rq(a2, specs["db_a"], -2, q.db_rotation).mT @ rq(dy2, specs["db_grad"], -2, q.db_rotation)
    return y, da, db


@pytest.mark.parametrize("rotations", [
    {"rotation": Rotation(32)},
    {"db_rotation": Rotation(16, seed=5)},  # the NVFP4 recipe's choice: wgrad only
    {"rotation": Rotation(32), "da_rotation": Rotation(None), "db_rotation": Rotation(16)},
])
def test_quantized_matmul_rotates_each_gemm_along_its_own_axis(rotations):
    specs = {key: {"format": "mxfp4"} for key in ("a", "b", "da_grad", "da_b", "db_grad", "db_a")}
    q = MatmulQuantizers(**{k: Quantizer(**v) for k, v in specs.items()}, **rotations)
    a = adversarial(2, 6, 40, seed=0).requires_grad_()  # K = 40 and M = 12: padded blocks
    w = adversarial(64, 40, seed=1).requires_grad_()
    dy = adversarial(2, 6, 64, seed=2)
    y = quantized_matmul(a, w.mT, q.to_json(), REFERENCE.to_json())
    y.backward(dy)
    y_ref, da_ref, dwt_ref = rotated_oracle(a, w.mT, dy, q, specs)
    assert_same(y, y_ref)
    assert_same(a.grad, da_ref)
    assert_same(w.grad, dwt_ref.mT)


def test_a_rotated_operand_is_not_shared_between_its_gemms():
    e4m3 = Quantizer("fp8_e4m3")
    q = MatmulQuantizers(a=e4m3, b=e4m3, db_a=e4m3, da_b=e4m3)
    assert q.shares_a and q.shares_b
    rotated = MatmulQuantizers(a=e4m3, b=e4m3, db_a=e4m3, da_b=e4m3, rotation=Rotation(16))
    assert not rotated.shares_a and not rotated.shares_b


# ---- recipes ---------------------------------------------------------------------------------------


def test_mxfp4_infer_rotates_by_default_and_hadamard_none_turns_it_off():
    assert qpass.get_recipe("mxfp4-infer").hadamard == Hadamard.parse("block32")
    assert not qpass.get_recipe("mxfp4-infer").with_overrides(hadamard=None).hadamard


def test_a_rule_changes_one_site_rotation():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    qm = qpass.compile(lin, "mxfp8-infer", backend="aot_eager", rules=[("2", {"hadamard": "block64"})])
    qm(torch.randn(4, 64))
    report = qpass.report(qm)
    assert report["0"]["formats"]["fprop.input"] == "mxfp8_e4m3(rceil)+hadamard-block32"  # the recipe's
    assert report["2"]["formats"]["fprop.input"] == "mxfp8_e4m3(rceil)+hadamard-block64"


def test_an_unknown_full_size_warns_naming_the_site_and_stays_exact():
    layer = torch.nn.Sequential(torch.nn.Linear(944, 8))  # 944 = 16 · 59: no Hadamard of 944 is known
    x = torch.randn(3, 944)
    qm = qpass.compile(copy.deepcopy(layer), "mxfp8-infer", backend="aot_eager", hadamard="full")
    with pytest.warns(UserWarning,
                      match="site '0': fprop: no full-size Hadamard of size 944 is known: using 16-point"):
        y = qm(x)
    assert qpass.report(qm)["0"]["formats"]["fprop.weight"] == "mxfp8_e4m3(rceil)+hadamard-block16"
    assert qpass.qsnr(layer(x), y) > 25
