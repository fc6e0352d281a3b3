"""The accuracy effect of outlier channel splitting and Hadamard rotation, measured.

One linear layer (K = 512, N = 256, M = 256 tokens) with 8 planted outlier input channels at 20x
(in the weight, or in the input), compiled under W4A4 MXFP4 and FP8 with and without each pass;
QSNR of the output against the float layer; then the same on real activations of a briefly trained
model. ``python tests/test_outliers.py`` prints the two tables that docs/rotation.md shows.

Margins. In MXFP4 an outlier of 20x sets its 32-element block's shared scale about 4 binades
(log2 20) above the others' need, so the block's other 31 elements keep about 1 of their 3 bits:
a block in 8 per row of K carries most of the error. Halving the outlier (OCS) or spreading it over
32 elements (Hadamard) brings that block back, which on this layer is worth 1.9-2.8 dB (measured
over seeds 0-3: OCS on weight outliers 2.5-2.8, Hadamard on input outliers 2.1-2.7 and on weight
outliers 1.9-2.6). We assert 1 dB: a clear, seed-robust improvement, well beyond the 0.1 dB the
passes change the no-outlier case by. FP8 (E4M3, per-token/per-channel
scales) spans 2^15 within one scale, so 20x outliers cost it nothing to begin with; there the
assertion is that this is so, and that the passes cost under 1.5 dB (a rotation turns the layer's
heavy-tailed values Gaussian, which costs E4M3's log grid about 1 dB: measured and reported).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qpass

K, N, M, OUTLIERS, FACTOR = 512, 256, 256, 8, 20.0
CASES = ("none", "weight outliers", "input outliers")
TRANSFORMS = {"plain": dict(hadamard=None), "ocs 0.02": dict(hadamard=None, ocs=0.02),
              "hadamard block32": dict(hadamard="block32")}
RECIPES = ("mxfp4-infer", "fp8-infer")


def layer_and_input(case: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(K, N, bias=False)
    x = torch.randn(M, K, generator=generator)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=generator))
        channels = torch.randperm(K, generator=generator)[:OUTLIERS]
        if case == "weight outliers":
            layer.weight[:, channels] *= FACTOR
        if case == "input outliers":
            x[:, channels] *= FACTOR
    return nn.Sequential(layer), x


@functools.lru_cache(maxsize=None)
def measured_qsnr(case: str, recipe: str, transform: str, seed: int = 0) -> float:
    model, x = layer_and_input(case, seed)
    torch.compiler.reset()
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager", **TRANSFORMS[transform])
    with torch.no_grad():
        return qpass.qsnr(model(x), qm(x))


def gain(case, recipe, transform, seed=0) -> float:
    return measured_qsnr(case, recipe, transform, seed) - measured_qsnr(case, recipe, "plain", seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_ocs_recovers_weight_outliers_in_mxfp4(seed):
    assert gain("weight outliers", "mxfp4-infer", "ocs 0.02", seed) > 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_hadamard_recovers_outliers_in_mxfp4(seed):
    assert gain("input outliers", "mxfp4-infer", "hadamard block32", seed) > 1.0
    assert gain("weight outliers", "mxfp4-infer", "hadamard block32", seed) > 1.0


def test_outliers_are_what_the_passes_fix():
    # Without outliers neither pass changes MXFP4's QSNR by more than noise.
    for transform in ("ocs 0.02", "hadamard block32"):
        assert abs(gain("none", "mxfp4-infer", transform)) < 0.3
    # The outliers cost MXFP4 over 1.5 dB to begin with.
    assert (
        measured_qsnr("none", "mxfp4-infer", "plain")
        > measured_qsnr("weight outliers", "mxfp4-infer", "plain") + 1.5
    )


def test_fp8_does_not_suffer_from_outliers():
    for case in ("weight outliers", "input outliers"):
        assert measured_qsnr(case, "fp8-infer", "plain") > measured_qsnr("none", "fp8-infer", "plain") - 0.5
        for transform in ("ocs 0.02", "hadamard block32"):
            assert gain(case, "fp8-infer", transform) > -1.5


# ---- real activations ----------------------------------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@functools.lru_cache(maxsize=None)
def trained_linear_inputs() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The demo's Llama (hidden 64, 2 layers) trained 300 steps on its corpus (about 20 s, one
    thread), and each linear's weight (lm_head's aside) with its input on a held-out batch. A
    SwiGLU's output is where trained LLMs grow outlier channels: here max|x| / rms(x) is about 25 at
    down_proj's input, under 7 at every other linear's."""
    spec = importlib.util.spec_from_file_location("qpass_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = demo.parse_args(["--steps", "300", "--hidden", "64"])
    train, heldout = demo.load_bytes()
    train_batches, heldout_batches = demo.make_batches(train, heldout, args)
    with demo.intra_op_threads(1):
        model = demo.build_model(args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        for tokens in train_batches:
            model(tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        linears = {m: name for name, m in model.model.named_modules() if isinstance(m, nn.Linear)}
        inputs = {}

        def record(module, args):
            inputs[module] = args[0].reshape(-1, args[0].shape[-1])

        hooks = [m.register_forward_pre_hook(record) for m in linears]
        with torch.no_grad():
            model(heldout_batches[0])
    for hook in hooks:
        hook.remove()
    return {linears[m]: (nn.Sequential(copy.deepcopy(m)), x) for m, x in inputs.items()}


REAL_TRANSFORMS = {
    "plain": (dict(hadamard=None), False),
    "ocs 0.02 (weights)": (dict(hadamard=None, ocs=0.02), False),
    "ocs 0.05 (calibrated)": (dict(hadamard=None, ocs=0.05), True),
    "hadamard block32": (dict(hadamard="block32"), False),
}
DOWN_PROJS = ("layers.0.mlp.down_proj", "layers.1.mlp.down_proj")


@functools.lru_cache(maxsize=None)
def real_qsnr(name: str, transform: str) -> float:
    layer, x = trained_linear_inputs()[name]
    overrides, calibrate = REAL_TRANSFORMS[transform]
    torch.compiler.reset()
    qm = qpass.compile(copy.deepcopy(layer), "mxfp4-infer", backend="aot_eager", **overrides)
    if calibrate:
        qpass.calibrate(qm, [x])
    with torch.no_grad():
        return qpass.qsnr(layer(x), qm(x))


@pytest.mark.slow
def test_real_activations_of_a_trained_model():
    """Measured: block32 Hadamard +3.4 and +1.9 dB on the two down_proj layers; OCS 0.05 calibrated
    on the inputs +0.8 and +0.2 (weight-driven: 0.0). Asserted with half the measured margin."""
    def gains(transform):
        return [real_qsnr(name, transform) - real_qsnr(name, "plain") for name in DOWN_PROJS]

    assert min(gains("hadamard block32")) > 0.9, gains("hadamard block32")
    assert sum(gains("ocs 0.05 (calibrated)")) / len(DOWN_PROJS) > 0.25, gains("ocs 0.05 (calibrated)")


def real_table() -> str:
    lines = [
        "| layer | max/rms | " + " | ".join(REAL_TRANSFORMS) + " |",
        "|---|---:|" + "---:|" * len(REAL_TRANSFORMS),
    ]
    for name in (*DOWN_PROJS, "layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj"):
        x = trained_linear_inputs()[name][1]
        ratio = (x.abs().amax(0) / x.pow(2).mean().sqrt()).max().item()
        values = " | ".join(f"{real_qsnr(name, t):.2f}" for t in REAL_TRANSFORMS)
        lines.append(f"| {name} | {ratio:.1f} | {values} |")
    return "\n".join(lines)


def table() -> str:
    lines = ["| case | recipe | " + " | ".join(TRANSFORMS) + " |", "|---|---|" + "---:|" * len(TRANSFORMS)]
    for case in CASES:
        for recipe in RECIPES:
            values = " | ".join(f"{measured_qsnr(case, recipe, t):.2f}" for t in TRANSFORMS)
            lines.append(f"| {case} | {recipe} | {values} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(print(table(), real_table(), sep="\n\n"))
