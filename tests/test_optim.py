"""qpass.optim.AdamW against AdamW written out by hand: fp32 math on the dequantized states, then the
states requantized with qpass.formats (fp16 as a cast with a power-of-two scale), bit for bit."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import qpass
from qpass.formats import dequantize, quantize
from qpass.optim import AdamW, stochastic_round_bf16
from qpass.quantizer import Quantizer

SHAPES = [(8, 40), (40,), (3, 5, 7)]


def parameters(dtype=torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def gradients(steps: int) -> list[list[torch.Tensor]]:
    """Per step, one gradient per parameter, with the cases a state format must survive: an all-zero
    gradient, huge and tiny entries next to ordinary ones, a tensor of tiny values only."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        grads[0][0, :3] = torch.tensor([1e15, -1e-20, 0.0])
        grads[1] *= 1e-20 if step % 2 else 1.0
        if step == 1:
            grads[2].zero_()
        out.append(grads)
    return out


def stored(x: torch.Tensor, fmt) -> torch.Tensor:
    """What a state format keeps of fp32 ``x``, dequantized."""
    if fmt in ("bf16", "fp32"):
        return x.to(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[fmt])).float()
    if fmt == "fp16":
        amax = x.abs().amax()
        quotient = (torch.tensor(65504.0) / amax).clamp(max=torch.finfo(torch.float32).max)
        encode = torch.where(amax == 0, 1.0, 2.0 ** (torch.frexp(quotient).exponent - 1).float())
        return (x * encode).half().float() / encode
    q = Quantizer(**fmt) if isinstance(fmt, dict) else Quantizer(fmt) if isinstance(fmt, str) else fmt
    return dequantize(quantize(x, q.spec, axis=-1, rounding=q.rounding)).float()


def reference(params, grads, groups) -> list[torch.Tensor]:
    """AdamW by hand; ``groups``: (parameter indices, options) with the optimizer's option names."""
    out = [p.detach().clone() for p in params]
    for indices, options in groups:
        lr, (beta1, beta2) = options.get("lr", 1e-3), options.get("betas", (0.9, 0.999))
        eps, decay = options.get("eps", 1e-8), options.get("weight_decay", 1e-2)
        first, second = options.get("exp_avg", "fp8_e4m3"), options.get("exp_avg_sq", "fp16")
        master = options.get("master_weights")
        for i in indices:
            m = v = torch.zeros(out[i].shape)
            weights = stored(out[i].float(), "fp16") if master == "fp16" else out[i].float()
            for step, step_grads in enumerate(grads, 1):
                g = step_grads[i].to(out[i].dtype).float()
                t = torch.tensor(float(step))
                new_m = m * beta1 + g * (1 - beta1)
                new_v = v * beta2 + g * g * (1 - beta2)
                update = lr * (new_m / (1 - beta1**t)) / (new_v.sqrt() / (1 - beta2**t).sqrt() + eps)
                weights = weights * (1 - lr * decay) - update
                if master == "fp16":
                    weights = stored(weights, "fp16")
                else:
                    weights = weights.to(out[i].dtype).float()
                m, v = stored(new_m, first), stored(new_v, second)
            out[i] = weights.to(out[i].dtype)
    return out


def run(params, grads, groups, optimizer=None, step=None):
    optimizer = optimizer or AdamW([{"params": [params[i] for i in indices], **options}
                                    for indices, options in groups])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        (step or optimizer.step)()
    return optimizer


FORMATS = {
    "default": {},
    "e5m2-fp16": {"exp_avg": "fp8_e5m2"},
    "block32": {"exp_avg": Quantizer("fp8_e4m3", granularity=("block", 32))},
    "mxfp8-bf16": {"exp_avg": "mxfp8_e4m3", "exp_avg_sq": "bf16"},
    "nvfp4-mxint8": {"exp_avg": "nvfp4", "exp_avg_sq": "mxint8"},
    "fp32": {"exp_avg": "fp32", "exp_avg_sq": "fp32"},
    "pow2-e4m3-sq": {"exp_avg": {"format": "fp8_e4m3", "pow2": True}, "exp_avg_sq": "fp8_e4m3"},
}


@pytest.mark.parametrize("options", FORMATS.values(), ids=FORMATS)
def test_steps_equal_adamw_by_hand(options):
    params, grads = parameters(), gradients(4)
    groups = [([0, 1, 2], {"lr": 1e-2, **options})]
    run(params, grads, groups)
    for got, want in zip(params, reference(parameters(), grads, groups)):
        assert torch.equal(got, want)


def test_parameter_groups_keep_their_own_options():
    params, grads = parameters(), gradients(3)
    groups = [([0], {"lr": 3e-2, "betas": (0.8, 0.99), "weight_decay": 0.1}),
              ([1], {"lr": 1e-3, "weight_decay": 0.0, "exp_avg": "mxfp8_e5m2", "exp_avg_sq": "bf16"}),
              ([2], {"eps": 1e-6, "exp_avg": Quantizer("fp8_e4m3", granularity="channel")})]
    run(params, grads, groups)
    for got, want in zip(params, reference(parameters(), grads, groups)):
        assert torch.equal(got, want)


def test_fp16_master_weights_are_a_scaled_fp16_copy():
    params, grads = parameters(torch.bfloat16), gradients(3)
    groups = [([0, 1, 2], {"lr": 1e-2, "master_weights": "fp16"})]
    optimizer = run(params, grads, groups)
    for p, want in zip(params, reference(parameters(torch.bfloat16), grads, groups)):
        state = optimizer.state[p]
        assert p.dtype == torch.bfloat16 and state["master"].dtype == torch.float16
        assert torch.equal(p, want)
        assert torch.equal(p, (state["master"].float() * state["master.scales"]).bfloat16())


def test_a_scalar_parameter_steps_as_by_hand():
    grads = [[torch.tensor(0.5)], [torch.tensor(-2.0)], [torch.tensor(0.0)]]
    p, want = torch.nn.Parameter(torch.tensor(1.5)), torch.tensor(1.5)
    run([p], grads, [([0], {"exp_avg": "mxfp8_e4m3"})])
    assert torch.equal(p, reference([want], grads, [([0], {"exp_avg": "mxfp8_e4m3"})])[0])


def test_a_non_finite_gradient_is_not_hidden():
    # A NaN in a tensor makes its per-tensor scales NaN (SPEC section 3): the step's own update is
    # NaN where the gradient is, the requantized states are NaN everywhere, and so is the next update,
    # rather than the NaN being rounded into a finite code.
    params, grads = parameters(), gradients(2)
    grads[0][0][1, 1] = float("nan")
    optimizer = run(params, grads[:1], [([0, 1, 2], {})])
    assert params[0].isnan().sum() == 1 and not params[1].isnan().any()
    state = optimizer.state[params[0]]
    assert state["exp_avg.scales"].isnan() and state["exp_avg_sq.scales"].isnan()
    run(params, grads[1:], [], optimizer)
    assert params[0].isnan().all() and not params[1].isnan().any()


def test_the_states_are_codes_and_scales():
    params = parameters()
    optimizer = run(params, gradients(1), [([0, 1, 2], {})])
    state = optimizer.state[params[0]]
    assert sorted(state) == ["exp_avg", "exp_avg.scales", "exp_avg_sq", "exp_avg_sq.scales", "step"]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.float16
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == params[0].shape
    assert state["exp_avg.scales"].shape == state["exp_avg_sq.scales"].shape == ()


def test_close_to_torch_adamw_with_fp32_states():
    # The same algorithm: only the order of operations differs.
    params, grads = parameters(), gradients(5)
    theirs = parameters()
    run(params, grads, [([0, 1, 2], {"lr": 1e-2, "exp_avg": "fp32", "exp_avg_sq": "fp32"})])
    optimizer = torch.optim.AdamW(theirs, lr=1e-2)
    run(theirs, grads, [], optimizer)
    for ours, torchs in zip(params, theirs):
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-6)  # 1e-4 of a step (lr)


STATE_DICT_CASES = {
    "default": ({}, torch.float32),
    "block-mx": ({"exp_avg": Quantizer("fp8_e4m3", granularity=("block", 16)), "exp_avg_sq": "mxfp8_e5m2"},
                 torch.float32),
    "fp16-master": ({"master_weights": "fp16"}, torch.bfloat16),
    "bf16-sr": ({"master_weights": "bf16_sr"}, torch.bfloat16),
}


@pytest.mark.parametrize("options, dtype", STATE_DICT_CASES.values(), ids=STATE_DICT_CASES)
def test_state_dict_round_trip_continues_bit_for_bit(options, dtype):
    grads = gradients(6)
    groups = [([0, 2], {"lr": 1e-2, **options}), ([1], {"lr": 2e-2, **options})]
    uninterrupted = parameters(dtype)
    run(uninterrupted, grads, groups)

    params = parameters(dtype)
    optimizer = run(params, grads[:3], groups)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=not any(isinstance(v, Quantizer) for v in options.values()))
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    fresh = AdamW([{"params": [resumed[i] for i in indices], **o} for indices, o in groups])
    fresh.load_state_dict(saved["optimizer"])
    for p, q in zip(params, resumed):  # every state tensor as it was, dtype included
        for key, value in optimizer.state[p].items():
            assert value.dtype == fresh.state[q][key].dtype and torch.equal(value, fresh.state[q][key]), key
    run(resumed, grads[3:], groups, fresh)
    for got, want in zip(resumed, uninterrupted):
        assert torch.equal(got, want)


def test_default_states_take_three_bytes_per_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    count = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ours, theirs = AdamW(model.parameters()), torch.optim.AdamW(model.parameters())
    ours.step()
    theirs.step()
    # Per element: an FP8 byte and an FP16 pair; per tensor: a step and two fp32 scales.
    elements = sum(v.nbytes for s in ours.state.values() for v in s.values() if v.numel() > 1)
    assert elements == 3 * count
    assert ours.state_bytes() == 3 * count + 12 * len(ours.state)
    assert ours.state_bytes() / count <= 3.0002
    torchs = sum(v.nbytes for s in theirs.state.values() for v in s.values())
    assert torchs == 8 * count + 4 * len(theirs.state)


@pytest.mark.parametrize("role", ["exp_avg", "exp_avg_sq"])
def test_an_unknown_format_lists_the_valid_ones(role):
    listed = rf"unknown format 'fp7' for {role}; expected one of fp8_e4m3, .*mxfp4.*fp16, bf16, fp32"
    with pytest.raises(ValueError, match=listed):
        AdamW(parameters(), **{role: "fp7"})
    with pytest.raises(ValueError, match="unknown granularity"):  # a Quantizer's own checks
        AdamW(parameters(), **{role: {"format": "fp8_e4m3", "granularity": "row"}})


def test_other_bad_options_are_named():
    listed = r"unknown master_weights 'bf16'; expected one of None, 'bf16_sr', 'fp16'"
    with pytest.raises(ValueError, match=listed):
        AdamW(parameters(), master_weights="bf16")
    with pytest.raises(ValueError, match="bf16_sr.*torch.float32"):
        AdamW(parameters(), master_weights="bf16_sr")
    with pytest.raises(ValueError, match="betas"):
        AdamW(parameters(), betas=(0.9, 1.0))
    optimizer = AdamW(parameters()[:1])
    with pytest.raises(ValueError, match="unknown format 'fp7' for exp_avg"):  # in a later group too
        optimizer.add_param_group({"params": parameters()[1:], "exp_avg": "fp7"})
    assert len(optimizer.param_groups) == 1  # and the refused group is not half added


def test_stochastic_rounding_to_bf16_is_unbiased():
    x = torch.full((1 << 16,), 1 + 2.0**-10)  # an eighth of the way from bf16's 1 to 1 + 2^-7
    random = qpass.optim._random16(torch.arange(x.numel()), torch.tensor(3.0), 0)
    rounded = stochastic_round_bf16(x, random).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2.0**-7}
    assert abs((rounded == 1 + 2.0**-7).float().mean().item() - 1 / 8) < 0.005
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 2.0**-130])
    out = stochastic_round_bf16(specials, torch.full((5,), 0xFFFF))
    assert out[0].isnan() and out[1:3].tolist() == [float("inf"), -float("inf")] and out[3].signbit()
    assert out[4].item() in (2.0**-130, 2.0**-130 + 2.0**-133)  # subnormals keep bf16's 7 bits


def test_bf16_sr_master_weights_move_where_rounding_to_nearest_stalls():
    # Updates of a hundredth of a bf16 ulp: round to nearest never moves the weight, stochastic
    # rounding moves it on average by the update.
    def train(master):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = AdamW([p], lr=2.0**-7 / 100, weight_decay=0.0, master_weights=master)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            optimizer.step()
        return p.float()

    assert torch.equal(train(None), torch.ones(4096))
    moved = 1 - train("bf16_sr").mean().item()
    assert moved == pytest.approx(20 * 2.0**-7 / 100, rel=0.1)


def compiled_case(compile_step: bool) -> list[torch.Tensor]:
    """Three steps of one optimizer whose groups take the code paths a step has: per-tensor FP8 and
    FP16, block and MX codes, FP16 master weights, stochastic rounding to bf16."""
    wide, narrow = parameters(), parameters(torch.bfloat16)
    optimizer = AdamW([{"params": wide[:1]},
                       {"params": wide[1:], **FORMATS["block32"], "exp_avg_sq": "mxfp8_e4m3"},
                       {"params": narrow[:1], "master_weights": "fp16"},
                       {"params": narrow[1:], "master_weights": "bf16_sr"}], lr=1e-2)
    step = torch.compile(optimizer.step, backend="aot_eager") if compile_step else optimizer.step
    for grads in gradients(3):
        for p, g in zip(wide + narrow, grads + grads):
            p.grad = g.to(p.dtype)
        step()
    return wide + narrow


@pytest.mark.slow
def test_compiled_step_equals_eager_step():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for got, want in zip(compiled_case(True), compiled_case(False)):
        assert torch.equal(got, want)
    assert not torch._dynamo.utils.counters["graph_break"]  # the whole step is one graph


def test_the_defaults_are_fp8_and_fp16_per_tensor():
    optimizer = qpass.optim.AdamW(parameters())
    group = optimizer.param_groups[0]
    assert (group["exp_avg"], group["exp_avg_sq"], group["master_weights"]) == ("fp8_e4m3", "fp16", None)
    hyper = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
    assert hyper == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    assert copy.deepcopy(optimizer.state_dict())["param_groups"][0]["exp_avg"] == "fp8_e4m3"
