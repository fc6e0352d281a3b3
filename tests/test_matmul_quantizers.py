"""MatmulQuantizers: one product's quantizers, which operands are quantized once, the JSON the ops take."""

from qpass import Quantizer, Rotation
from qpass.matmul_quantizers import MatmulQuantizers

FP8, E5M2, MX = Quantizer("fp8_e4m3"), Quantizer("fp8_e5m2"), Quantizer("mxfp8_e4m3")


def test_per_tensor_operands_the_same_in_both_gemms_are_shared():
    q = MatmulQuantizers(a=FP8, b=FP8, da_grad=E5M2, da_b=FP8, db_grad=E5M2, db_a=FP8)
    assert q.shares_a and q.shares_b and q.shares_grad and q.quantizes_backward
    assert not (q.hoists_a or q.hoists_b)  # quantized inside the product, which saves the codes


def test_blocks_follow_each_gemm_so_mx_operands_are_not_hoisted():
    q = MatmulQuantizers(a=MX, b=MX, da_grad=MX, da_b=MX, db_grad=MX, db_a=MX)
    assert not (q.shares_a or q.shares_b or q.shares_grad or q.hoists_a or q.hoists_b)


def test_a_rotation_makes_the_gemms_differ():
    q = MatmulQuantizers(a=FP8, b=FP8, da_b=FP8, db_a=FP8, rotation=Rotation(16))
    assert not (q.shares_a or q.shares_b)
    q = MatmulQuantizers(da_grad=E5M2, db_grad=E5M2, db_rotation=Rotation(16))
    assert not q.shares_grad


def test_reusing_the_forward_hoists_whatever_the_format():
    q = MatmulQuantizers(a=MX, b=MX, da_b=MX, db_a=MX, da_grad=E5M2, db_grad=E5M2, reuse_forward=True)
    assert q.hoists_a and q.hoists_b and not (q.shares_a or q.shares_b)


def test_round_trips_through_json():
    q = MatmulQuantizers(a=MX, b=Quantizer("nvfp4"), da_grad=E5M2, rotation=Rotation(32, seed=0),
                         db_rotation=Rotation(16, resample=True), reuse_forward=False)
    assert MatmulQuantizers.from_json(q.to_json()) == q
    assert "kernels" not in q.to_json() and "state" not in q.to_json()  # numerics only
