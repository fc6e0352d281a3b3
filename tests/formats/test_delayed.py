"""FP8 delayed scaling (SPEC section 2, "FP8 delayed scaling"): DelayedScaling and quantize(delayed=).

Expected scales are computed by hand in numpy float32: encode = max_normal / max(history) (an fp32
division), divided by 2^margin, optionally rounded down to a power of two; decode = 1 / encode.
The amaxes used are chosen so the scale arithmetic has no rounding subtleties of its own; the
point here is which amax is used when.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from qpass import DelayedScaling, dequantize, fake_quantize, quantize

F32 = np.float32
MAX_NORMAL = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def tensor_with_amax(amax: float, n: int = 6, seed: int = 0) -> torch.Tensor:
    """Values in (-amax, amax) with exactly one element of magnitude amax (negative, to check abs)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g) * 2 - 1) * amax * 0.9
    x[n // 2] = -amax
    return x


def expected_decode(max_hist: float, fmt: str = "fp8_e4m3", margin: int = 0, pow2: bool = False) -> float:
    encode = F32(MAX_NORMAL[fmt]) / F32(max_hist)
    encode = F32(encode * F32(2.0**-margin))
    if pow2:
        encode = F32(2.0 ** math.floor(math.log2(encode)))
    return float(F32(1) / encode)


def history(ds: DelayedScaling) -> list[float]:
    return ds.amax_history.tolist()


def test_history_fills_newest_first_and_rolls():
    ds = DelayedScaling(history_len=4)
    assert ds.history_len == 4
    amaxes = [2.0, 5.0, 3.5, 7.0, 1.75]
    for step, amax in enumerate(amaxes):
        quantize(tensor_with_amax(amax, seed=step), "fp8_e4m3", delayed=ds)
        newest_first = amaxes[: step + 1][::-1][:4]
        assert history(ds) == newest_first + [0.0] * (4 - len(newest_first))
    assert history(ds) == [1.75, 7.0, 3.5, 5.0]  # 2.0 has dropped out


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_scale_comes_from_the_max_of_the_history(fmt):
    ds = DelayedScaling(history_len=3)
    for amax in (2.0, 10.0, 3.5):
        quantize(tensor_with_amax(amax), fmt, delayed=ds)
    # History [3.5, 10, 2]: the max, 10, sets the scale whatever the current amax is.
    qt = quantize(tensor_with_amax(0.5), fmt, delayed=ds)
    assert qt.scales.item() == expected_decode(10.0, fmt)
    assert qt.scales.shape == ()
    # The history is now [0.5, 3.5, 10]; one more step pushes 10 out of it.
    quantize(tensor_with_amax(1.0), fmt, delayed=ds)
    assert history(ds) == [1.0, 0.5, 3.5]
    qt = quantize(tensor_with_amax(0.25), fmt, delayed=ds)
    assert qt.scales.item() == expected_decode(3.5, fmt)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("margin", [0, 1, 3])
def test_margin_and_pow2(margin, pow2):
    ds = DelayedScaling(history_len=2, margin=margin, pow2=pow2)
    quantize(tensor_with_amax(5.0), "fp8_e4m3", delayed=ds)  # first use: current amax, 5
    qt = quantize(tensor_with_amax(0.1), "fp8_e4m3", delayed=ds)
    decode = expected_decode(5.0, margin=margin, pow2=pow2)
    assert qt.scales.item() == decode
    # Spelled out: 448 / 5 = 89.6 -> 89.6 / 2^margin, or (pow2) 64 / 2^margin.
    encode = (64.0 if pow2 else float(F32(89.6))) * 2.0**-margin
    assert decode == float(F32(1) / F32(encode))


def test_first_use_falls_back_to_the_current_amax():
    ds = DelayedScaling()
    x = tensor_with_amax(3.5)
    qt = quantize(x, "fp8_e4m3", delayed=ds)
    assert qt.scales.item() == expected_decode(3.5)  # 448 / 3.5 = 128: nothing saturates
    assert dequantize(qt).abs().max().item() == 3.5
    # The next step uses the history (3.5), so a tensor 10x larger saturates at 448 / 128.
    out = dequantize(quantize(x * 10, "fp8_e4m3", delayed=ds))
    assert out.abs().max().item() == 3.5
    assert history(ds)[:2] == [35.0, 3.5]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_amax_is_not_recorded(bad):
    ds = DelayedScaling(history_len=4)
    quantize(tensor_with_amax(2.0), "fp8_e4m3", delayed=ds)
    before = {name: buf.clone() for name, buf in ds.named_buffers()}
    x = tensor_with_amax(1.0)
    x[0] = bad
    quantize(x, "fp8_e4m3", delayed=ds)
    for name, buf in ds.named_buffers():
        assert torch.equal(buf, before[name]), name
    # The history still gives the scale of the next step.
    assert quantize(tensor_with_amax(0.5), "fp8_e4m3", delayed=ds).scales.item() == expected_decode(2.0)


def test_non_finite_first_step_leaves_the_fallback_in_place():
    ds = DelayedScaling(history_len=4)
    quantize(torch.tensor([1.0, math.nan]), "fp8_e4m3", delayed=ds)
    assert history(ds) == [0.0] * 4
    # Nothing was recorded, so the next step still falls back to its own amax (not to max(0, ...)).
    assert quantize(tensor_with_amax(7.0), "fp8_e4m3", delayed=ds).scales.item() == expected_decode(7.0)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_value_makes_the_whole_tensor_nan(fmt, bad):
    # SPEC section 3 (every granularity): a non-finite value anywhere in a scaling group makes the
    # whole group dequantize to NaN, and overflow is never hidden. With delayed scaling the group
    # is the tensor, even though its scale comes from the (finite) history.
    ds = DelayedScaling(history_len=4)
    quantize(tensor_with_amax(2.0), fmt, delayed=ds)
    x = tensor_with_amax(1.0)
    x[1] = bad
    assert dequantize(quantize(x, fmt, delayed=ds)).isnan().all()


def test_state_dict_round_trip():
    ds = DelayedScaling(history_len=5, margin=1)
    for amax in (2.0, 7.0, 3.5):
        quantize(tensor_with_amax(amax), "fp8_e4m3", delayed=ds)
    buffer = io.BytesIO()
    torch.save(ds.state_dict(), buffer)
    buffer.seek(0)
    fresh = DelayedScaling(history_len=5, margin=1)
    fresh.load_state_dict(torch.load(buffer))
    original = dict(ds.named_buffers())
    loaded = dict(fresh.named_buffers())
    assert original.keys() == loaded.keys() and original
    for name in original:
        assert torch.equal(original[name], loaded[name]), name
    # Both carry on identically.
    x = tensor_with_amax(1.0)
    a = quantize(x, "fp8_e4m3", delayed=ds)
    b = quantize(x, "fp8_e4m3", delayed=fresh)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert history(ds) == history(fresh) == [1.0, 3.5, 7.0, 2.0, 0.0]


def test_fake_quantize_uses_and_records_like_quantize():
    ds_q, ds_f = DelayedScaling(history_len=3), DelayedScaling(history_len=3)
    for step, amax in enumerate((2.0, 7.0, 0.875, 5.0)):
        x = tensor_with_amax(amax, seed=step)
        out_q = dequantize(quantize(x, "fp8_e4m3", delayed=ds_q))
        out_f = fake_quantize(x, "fp8_e4m3", delayed=ds_f)
        assert torch.equal(out_q, out_f)
        assert history(ds_q) == history(ds_f)
    assert history(ds_f) == [5.0, 0.875, 7.0]


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("mxfp8_e4m3", {}),
        ("mxfp4", {}),
        ("nvfp4", {}),
        ("fp8_e4m3", {"granularity": "channel"}),
        ("fp8_e5m2", {"granularity": ("block", 32)}),
    ],
    ids=str,
)
@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_delayed_needs_per_tensor_scaling(fn, fmt, kwargs):
    ds = DelayedScaling()
    with pytest.raises(ValueError):
        fn(torch.ones(4, 32), fmt, delayed=ds, **kwargs)
    assert history(ds) == [0.0] * ds.history_len  # nothing recorded on the way to the error


def test_submodule_registers_its_buffers():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.scaling = DelayedScaling(history_len=8)

        def forward(self, x):
            return fake_quantize(self.linear(x), "fp8_e4m3", delayed=self.scaling)

    model = Layer()
    buffers = dict(model.named_buffers())
    own = {f"scaling.{name}" for name, _ in DelayedScaling(history_len=8).named_buffers()}
    assert own and own == set(buffers)
    assert own <= set(model.state_dict())
    assert "scaling.amax_history" in buffers and buffers["scaling.amax_history"].shape == (8,)
    # Running the model records into the registered buffer.
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected_amax = model.linear(x).abs().max().item()
    model(x)
    assert model.scaling.amax_history[0].item() == expected_amax
    # The whole model's state dict carries the history.
    restored = Layer()
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.scaling.amax_history, model.scaling.amax_history)
