"""What the kernels need on a real GPU beyond giving the reference's bits in the interpreter: tuning
keys that do not change with every token count, no host copies or CPU random numbers per call,
launches on the tensors' own device, grids past 65535 rows or batch entries, and ops that
torch.compile can see into (``torch.library.triton_op``). The bits themselves are tested in
test_quantize.py and test_matmul.py; what needs a GPU to run (compiling, other devices) is checked
here through the functions that decide it."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._library.triton import get_triton_kernels_for_op

triton = pytest.importorskip("triton")  # the qpass[triton] extra

import qpass  # noqa: E402
from qpass import codegen  # noqa: E402
from qpass.codegen.tuning import BUCKET_CAP, size_bucket  # noqa: E402
from qpass.quantizer import Quantizer  # noqa: E402
from qpass.rotation import Rotation  # noqa: E402

# qpass.codegen exports a function named quantize, which hides the module of that name.
kernels = importlib.import_module("qpass.codegen.quantize")
matmul = importlib.import_module("qpass.codegen.matmul")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's untaken branches


def test_sizes_are_tuned_by_power_of_two_buckets():
    assert [size_bucket(n) for n in (1, 2, 3, 17, 100, 4096, 4097)] == [1, 2, 4, 32, 128, 4096, 8192]
    assert size_bucket(10**6) == BUCKET_CAP
    for kernel in (kernels._amax_kernel, kernels._quantize_kernel, kernels._dequantize_kernel):
        assert {"R_BUCKET", "L_BUCKET"} <= set(kernel.keys) and not {"R", "L", "LP"} & set(kernel.keys)
    keys = set(matmul._weight_matmul_kernel.keys)
    assert {"M_BUCKET", "N_BUCKET", "K_BUCKET"} <= keys and not {"M", "N", "K"} & keys


def test_rotation_signs_are_kept_per_device_and_fresh_ones_are_not_copied():
    cpu = torch.device("cpu")
    for rotation in (Rotation(32), Rotation(32, seed=0)):
        signs = kernels._rotation_signs(rotation, None, cpu)
        assert signs is kernels._rotation_signs(rotation, None, cpu)  # built once
        expected = rotation.sign_vector(32)
        assert torch.equal(signs, torch.ones(32) if expected is None else expected)
    fresh = Rotation(32, resample=True).draw_signs(32)
    assert kernels._rotation_signs(Rotation(32, resample=True), fresh, cpu) is fresh
    assert kernels._rotation_scale(32) == torch.tensor(32**-0.5, dtype=torch.float32).item()


def test_launches_are_guarded_by_the_tensors_device():
    guard = kernels.on_device(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(kernels.on_device(torch.device("cpu")), torch.cuda.device)


def test_stochastic_seeds_are_drawn_on_the_device_without_a_host_value():
    meta = torch.device("meta")  # no data at all: nothing is read back to the host
    seed = kernels.draw_seed("stochastic", None, meta)
    assert (seed.device, seed.dtype, seed.shape) == (meta, torch.int64, (1,))
    assert kernels.draw_seed("stochastic", 7, torch.device("cpu")).tolist() == [7]
    assert kernels.draw_seed("rne", None, meta) is None


def test_the_grid_is_one_axis_however_tall_or_batched():
    """A GPU caps a grid's second and third axes at 65535: rows and batch entries share the first."""
    meta = {"BLOCK_R": 16, "BLOCK_L": 128}
    for shape in ((1, 70000, 2), (70000, 1, 2), (3, 2**20, 300)):
        grid = kernels._grid(torch.empty(shape, device="meta"), shape[-1])(meta)
        assert grid == (triton.cdiv(shape[-1], 128) * triton.cdiv(shape[1], 16) * shape[0],)
        assert grid[0] < 2**31


@pytest.mark.parametrize("quantizer", [Quantizer("mxfp4"), Quantizer("nvfp4", granularity=("tile", 16)),
                                       Quantizer("fp8_e4m3", granularity="channel")], ids=str)
def test_every_program_finds_its_tile_across_batch_rows_and_columns(quantizer):
    """Two column tiles, two row tiles and three batch entries, all numbered on the one grid axis."""
    x = torch.randn(3, 20, 200, generator=torch.Generator().manual_seed(0))
    expected = qpass.quantize(x, quantizer.spec, -1)
    got = codegen.quantize(x, quantizer)
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scales, expected.scales)
    assert torch.equal(codegen.fake_quantize(x, quantizer), quantizer(x, -1))
    assert torch.equal(codegen.dequantize(expected), qpass.dequantize(expected))


def test_the_kernels_are_triton_ops_that_torch_compile_can_see():
    def kernels_of(op: str) -> set[str]:
        return {kernel.base_fn.__name__ for kernel in get_triton_kernels_for_op(f"qpass_codegen::{op}")}

    found = {op: kernels_of(op) for op in ("quantize", "fake_quantize", "dequantize", "weight_matmul")}
    assert found == {
        "quantize": {"_amax_kernel", "_quantize_kernel"},
        "fake_quantize": {"_amax_kernel", "_quantize_kernel"},
        "dequantize": {"_dequantize_kernel"},
        "weight_matmul": {"_amax_kernel", "_weight_matmul_kernel"},
    }
