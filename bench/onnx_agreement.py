"""How closely a portable ONNX export agrees with qpass in PyTorch, per inference recipe, and why.

Run with `make bench`, or `python bench/onnx_agreement.py [--inputs 20] [--windows 4]` (`--no-write`
only prints; `--no-real` skips the real model). Writes its tables to bench/RESULTS.md between this
benchmark's markers.

The demo's Llama (examples/demo.py, random weights) is compiled under each inference recipe,
exported once with dynamic batch and sequence, and run by ONNX Runtime on random token sequences.
Per input it measures the logits' largest error relative to qpass's PyTorch output, and reruns every
activation quantizer and rotation of the file with qpass's reference on the values that quantizer
received (``qpass.onnx.check_quantizers``). The first tells how often the two runtimes agree to fp32
rounding; the second tells whether a disagreement comes from the quantizers (it must not) or from
the ops between them, which ONNX Runtime and PyTorch sum in different orders: a last-bit difference
in a quantizer's input, at a rounding boundary, moves one element one grid step.

On a real model (SmolLM2-135M, examples/smollm2.py) such flips grow over 30 layers, so the logits'
largest error says little; what a user sees is measured instead. Each recipe's model is exported as
configured, the decoder with its KV cache, and compared with qpass in PyTorch on held-out text: the
perplexity (goal: within 0.5%), the top-1 next-token agreement, and greedy generation from held-out
prompts, with the cache, for 32 tokens (how many tokens agree before the first difference).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

import demo  # noqa: E402
import smollm2  # noqa: E402
from results import provenance, write_section  # noqa: E402

import qpass  # noqa: E402
from qpass.onnx.check import check_quantizers  # noqa: E402

RECIPES = ("fp8-infer", "mxfp8-infer", "mxfp6-infer", "mxfp4-infer", "nvfp4-infer", "mxfp4-weight-only")
EXACT = 1e-5  # relative: fp32 rounding of a different summation order
PERPLEXITY_GOAL = 0.005  # relative


def measure(model: torch.nn.Module, recipe: str, inputs: list[torch.Tensor], directory: Path) -> dict:
    torch.compiler.reset()
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager")
    path = qpass.export_onnx(qm, (inputs[0],), directory / f"{recipe}.onnx")
    session = qpass.onnx.session(path)
    errors, quantizers, mismatched = [], 0, 0
    for ids in inputs:
        with torch.no_grad():
            expected = qm(ids).logits
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
        errors.append(((got - expected).abs().max() / expected.abs().max()).item())
        checked, mismatches = check_quantizers(path, (ids,))
        quantizers, mismatched = checked, mismatched + len(mismatches)
    return {"recipe": recipe, "errors": errors, "quantizers": quantizers, "mismatched": mismatched}


def measure_real(
    model: torch.nn.Module, recipe: str, windows: list[torch.Tensor], prompts: torch.Tensor, new_tokens: int,
    directory: Path,
) -> dict:
    """Perplexity and top-1 agreement on ``windows``, greedy agreement from ``prompts``, qpass in
    PyTorch against its ONNX export (with the KV cache) in ONNX Runtime."""
    torch.compiler.reset()
    qm = qpass.compile(copy.deepcopy(model), recipe, backend="aot_eager")
    start = time.time()
    path = qpass.export_onnx(qm, (prompts,), directory / f"smollm2-{recipe}.onnx")
    export_seconds = time.time() - start
    session = qpass.onnx.session(path)
    losses = {"torch": 0.0, "onnx": 0.0}
    agree = tokens = 0
    for ids in windows:
        with torch.no_grad():
            expected = qm(input_ids=ids).logits[0, :-1]
        got = qpass.onnx.decode(session, ids)[0][0, :-1]
        for runtime, logits in (("torch", expected), ("onnx", got)):
            losses[runtime] += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        agree += (expected.argmax(-1) == got.argmax(-1)).sum().item()
        tokens += ids.shape[1] - 1
    with torch.no_grad():
        want = qm.generate(prompts, max_new_tokens=new_tokens, do_sample=False)[:, prompts.shape[1]:]
    got = qpass.onnx.generate(session, prompts, new_tokens)[:, prompts.shape[1]:]
    differs = (want != got).int()
    prefix = torch.where(differs.any(-1), differs.argmax(-1), new_tokens)  # tokens before a difference
    return {
        "recipe": recipe, "ppl_torch": math.exp(losses["torch"] / tokens),
        "ppl_onnx": math.exp(losses["onnx"] / tokens),
        "top1": agree / tokens, "prefix": prefix.tolist(), "export_s": export_seconds,
        "size_mb": path.stat().st_size / 1e6,
    }


def real_table(rows: list[dict], new_tokens: int) -> str:
    lines = [
        "| recipe | perplexity, qpass in PyTorch | perplexity, ONNX Runtime | difference | within 0.5% "
        f"| top-1 agreement | greedy {new_tokens} tokens: identical continuations "
        "| tokens before the first difference | file (MB) | export (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        difference = row["ppl_onnx"] / row["ppl_torch"] - 1
        identical = sum(p == new_tokens for p in row["prefix"])
        lines.append(
            f"| {row['recipe']} | {row['ppl_torch']:.3f} | {row['ppl_onnx']:.3f} | {difference:+.3%} "
            f"| {'yes' if abs(difference) <= PERPLEXITY_GOAL else 'NO'} | {row['top1']:.2%} "
            f"| {identical}/{len(row['prefix'])} | {', '.join(map(str, row['prefix']))} "
            f"| {row['size_mb']:.1f} | {row['export_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def table(rows: list[dict], count: int) -> str:
    lines = [
        f"| recipe | inputs within {EXACT:g} | median relative error | max relative error "
        "| activation quantizers | bits differing from the reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        errors = row["errors"]
        within = sum(e <= EXACT for e in errors)
        lines.append(
            f"| {row['recipe']} | {within}/{count} | {statistics.median(errors):.1e} | {max(errors):.1e} | "
            f"{row['quantizers']} per input | {row['mismatched']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20, help="random token sequences per recipe")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=12)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of the real model's text")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for greedy generation")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-real", action="store_true", help="skip the real model (SmolLM2-135M)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    demo_args = demo.parse_args([])
    model = demo.build_model(demo_args).eval()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (args.batch, args.seq), generator=generator) for _ in range(args.inputs)]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, recipe, inputs, Path(tmp)) for recipe in RECIPES]
    command = "python bench/onnx_agreement.py" + (f" --inputs {args.inputs}" if args.inputs != 20 else "")
    body = (
        f"The demo's Llama ({demo_args.layers} layers, hidden {demo_args.hidden}, random weights), exported "
        f"portable with dynamic shapes, run by onnxruntime {ort.__version__} (CPU) on {args.inputs} random "
        f"{args.batch}x{args.seq} token sequences; {provenance(command, start)}.\n\n"
        + table(rows, args.inputs) + "\n"
        "Every activation quantizer and rotation, rerun by qpass's reference on the values it received in "
        "the ONNX run, gives the same bits (last column). Where the logits still differ by more than fp32 "
        "rounding, a quantizer's input differed from PyTorch's in its last bit (the matmuls, norms and "
        "softmax between quantizers are summed in another order) and rounded to the other neighbour. "
        "Weight-only quantization cannot flip: the weights are quantized once, from the same parameters.\n\n"
    )
    if not args.no_real:
        body += real_model(args)
    print(body)
    if not args.no_write:
        write_section("onnx-agreement", "ONNX export: agreement with qpass in PyTorch (CPU)", body)


PROMPT = 16  # tokens per generation prompt


def real_model(args) -> str:
    start = time.time()
    model, tokenizer = smollm2.load()
    model.config.use_cache = True  # as shipped: the export is the decoder with its KV cache
    model.generation_config.eos_token_id = None  # every continuation runs its full length in both runtimes
    held_out = smollm2.windows(tokenizer, args.windows + args.prompts, heldout=True, window=args.window)
    windows = held_out[: args.windows]
    prompts = torch.cat([w[:, :PROMPT] for w in held_out[args.windows:]])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_real(model, r, windows, prompts, args.new_tokens, Path(tmp)) for r in RECIPES]
    command = (f"python bench/onnx_agreement.py --windows {args.windows} --window {args.window} "
               f"--prompts {args.prompts} --new-tokens {args.new_tokens}")
    return (
        "### A real model: SmolLM2-135M, exported with its KV cache\n\n"
        "SmolLM2-135M-Instruct (examples/smollm2.py, fp32; 30 layers), each recipe's model exported "
        "portable as configured (the decoder with past_key_values in and present out), run by onnxruntime "
        f"{ort.__version__} (CPU) against qpass in PyTorch: perplexity and top-1 next-token agreement over "
        f"{args.windows} held-out windows of {args.window} tokens (from an empty past), and greedy decoding "
        f"of {args.new_tokens} tokens with the cache from {args.prompts} held-out {PROMPT}-token prompts; "
        f"{provenance(command, start)}."
        "\n\n" + real_table(rows, args.new_tokens) + "\n"
    )


if __name__ == "__main__":
    main()
