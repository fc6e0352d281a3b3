"""Outlier channel splitting: the split itself, the pass on tiny graphs, training and calibration."""

import copy
import math
import warnings

import pytest
import torch
from graphs import capture
from no_quantization import quantization_off
from torch import nn

import qpass
from qpass.passes import find_sites, plan_sites
from qpass.passes.ocs import ChannelSplit, greedy_split, split_by_input, split_by_weight, split_channels

F64 = dict(dtype=torch.float64)


def planted(n=48, k=64, channels=(3, 17), factor=30.0, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), **F64)
    w[:, list(channels)] *= factor
    return w


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2])
def test_split_count_is_the_expand_ratio_and_shares_sum_to_one(ratio):
    w = planted()
    split = split_by_weight(w, ratio, None)
    assert split.extra == math.ceil(ratio * 64) and len(split.channels) == 64 + split.extra
    shares = torch.zeros(64, **F64).index_add(
        0, torch.tensor(split.channels), torch.tensor(split.fractions, **F64))
    assert torch.equal(shares, torch.ones(64, **F64))


def test_the_largest_channel_is_split_first_and_again():
    channels, fractions, pairs = greedy_split(torch.tensor([1.0, 8.0, 3.0]), 3)
    # 8 -> 4 | 4; the first 4 -> 2 | 2; the other 4 -> 2 | 2 (3 is never the largest)
    assert channels == [0, 1, 2, 1, 1, 1] and fractions == [1.0, 0.25, 1.0, 0.25, 0.25, 0.25]
    assert pairs == [(1, 3), (1, 4), (3, 5)]


def test_splitting_preserves_the_product_and_shrinks_the_weight_range():
    w, x = planted(), torch.randn(5, 64, **F64)
    for split in (split_by_weight(w, 0.05, None), split_by_weight(w, 0.05, qpass.Quantizer("mxfp4")),
                  split_by_input(x.abs().amax(0), 0.05)):
        torch.testing.assert_close(
            split.split_input(x) @ split.split_weight(w).T, x @ w.T, atol=1e-12, rtol=1e-12)
    weight_split = split_by_weight(w, 0.05, None).split_weight(w)
    assert weight_split.abs().max() <= w.abs().max() / 2  # both planted channels are split


def test_quantization_aware_halves_round_apart():
    # Halves of w are equal, so they round the same way; QA halves land on both sides. (One scale
    # per row, so that both halves of a pair share it.)
    w = planted(channels=(5,), factor=20.0)
    quantizer = qpass.Quantizer("fp4_e2m1", granularity="channel")
    plain = split_by_weight(w, 1 / 64, None).split_weight(w)
    aware = split_by_weight(w, 1 / 64, quantizer).split_weight(w)
    q_plain, q_aware = (quantizer(s.float(), -1) for s in (plain, aware))
    assert torch.equal(q_plain[:, 5], q_plain[:, 64])
    assert not torch.equal(q_aware[:, 5], q_aware[:, 64])
    torch.testing.assert_close(aware[:, 5] + aware[:, 64], w[:, 5], atol=1e-12, rtol=0)
    # The pair's quantized sum is closer to the original column.
    err_plain = (q_plain[:, 5] + q_plain[:, 64] - w[:, 5]).norm()
    err_aware = (q_aware[:, 5] + q_aware[:, 64] - w[:, 5]).norm()
    assert err_aware < err_plain


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 64)
        with torch.no_grad():
            self.up.weight[:, 7] *= 25

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_pass_inserts_one_split_per_operand_and_keeps_the_function():
    module = TwoLinears().double()
    x = torch.randn(4, 64, **F64)
    gm, parameters, inputs = capture(module, x)
    plans = plan_sites(
        find_sites(gm.graph, parameters), qpass.get_recipe("mxfp4-infer").with_overrides(ocs=0.05), set())
    splits = split_channels(gm, plans, parameters, {})
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(getattr(t, "__func__", None) is ChannelSplit.split_input for t in targets) == 2
    assert sum(getattr(t, "__func__", None) is ChannelSplit.split_weight for t in targets) == 2
    assert {name: s.extra for name, s in splits.items()} == {"up": 4, "down": 5}
    assert splits["up"].channels.count(7) > 1  # the planted channel is split
    (out,) = gm(*inputs)
    torch.testing.assert_close(out, module(x), atol=1e-12, rtol=1e-12)


def test_report_counts_the_extra_channels():
    qm = qpass.compile(TwoLinears(), "mxfp4-infer", backend="aot_eager", ocs=0.05)
    qm(torch.randn(4, 64))
    report = qpass.report(qm)
    assert report["up"]["extra_channels"] == 4 and report["down"]["extra_channels"] == 5
    assert "64+4" in str(report)


def test_training_gradients_reach_the_original_weight():
    module = TwoLinears().double()
    x = torch.randn(4, 64, **F64)
    qm = qpass.compile(copy.deepcopy(module), "mxfp8-train", backend="aot_eager", ocs=0.05)
    with quantization_off():
        qm(x).sum().backward()
    module(x).sum().backward()
    for (name, p), q in zip(module.named_parameters(), qm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-12, msg=name)


def test_calibration_splits_by_the_inputs():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(64, 64)
    x[:, 11] *= 40  # an input outlier the weights know nothing about
    qm = qpass.compile(copy.deepcopy(module), "mxfp4-infer", backend="aot_eager", ocs=0.05, hadamard=None)
    before = qpass.qsnr(module(x), qm(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "captured no graph" from the observing pass
        qpass.calibrate(qm, [x[:32], x[32:]])
    after = qpass.qsnr(module(x), qm(x))
    assert "split by input" in " ".join(qpass.report(qm)["0"]["notes"])
    # Weight-driven splitting cannot see the input's outlier; splitting it helps its MX block.
    assert after > before + 0.5, (before, after)


def test_calibrate_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="compile with ocs="):
        qpass.calibrate(qpass.compile(TwoLinears(), "mxfp4-infer", backend="aot_eager"), [])
    with pytest.raises(ValueError, match="inference recipes"):
        qpass.calibrate(qpass.compile(TwoLinears(), "fp8-train", backend="aot_eager", ocs=0.02), [])
    with pytest.raises(ValueError, match="compiled by qpass.compile"):
        qpass.calibrate(TwoLinears(), [])
