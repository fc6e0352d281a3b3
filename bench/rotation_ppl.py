"""Held-out perplexity of the demo's Llama under mxfp4-infer, with and without qpass's transforms.

Run with `make bench`, or `python bench/rotation_ppl.py [--steps N] [--hidden H] [--threads T]`.
Prints a table and writes it to bench/RESULTS.md between this benchmark's markers (`--no-write`
only prints; `--quick` is a smoke run of about 30 s on a tiny model, and never writes).

MXFP4 has 3 bits of magnitude per element and one power-of-two scale per 32: a single large
value in a block flushes its neighbours to zero. Two function-preserving transforms spread or
isolate such outliers before quantizing, and this benchmark measures what each one buys:

- outlier channel splitting (``ocs=0.02``): the 2% of input channels with the largest values are
  split in two halves (the weight's matching columns duplicated), either chosen from the weights
  or, after ``qpass.calibrate``, from the inputs seen on sample batches;
- Hadamard rotations: a 32-point block Hadamard on both operands of every linear
  (``hadamard="block32"``, the recipe's default), and QuaRot's rotation of the whole residual
  stream (``hadamard="residual"``), alone and combined.

The model is examples/demo.py's byte-level Llama (random init, nothing downloaded), trained in
fp32 on Python's help topics, its state_dict cached under build/rotation_ppl/ per training config
(`--retrain` trains again). Every run evaluates a fresh copy of the same trained weights on the
same held-out batches, so the differences between runs are the quantization's alone. The goal:
the best combination of transforms recovers at least half of the perplexity gap between plain
MXFP4 and the unquantized model. A small, briefly trained model has few activation outliers,
which is where rotations help most; the mean max|x|/rms(x) of the linears' inputs is printed to
say how many it has (a Gaussian tensor of the same shape gives about 4.6).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import demo  # noqa: E402
from results import write_section  # noqa: E402

import qpass  # noqa: E402

CACHE = ROOT / "build" / "rotation_ppl"
RECIPE = "mxfp4-infer"
OCS_RATIO = 0.02
CALIBRATION_BATCHES = 8  # training batches that calibrated OCS sees
GOAL = 0.5  # fraction of plain MXFP4's perplexity gap that the best combination must recover
# Six times the demo's 500 steps: the best-trained model of the demo's size that trains in under
# 3 minutes at 1 thread (about 55 ms a step). Longer training grows the activation outliers that
# the transforms exist for; so would a wider model, at about 3x the time per step.
DEFAULT_STEPS = 3000


@dataclass(frozen=True)
class Run:
    name: str
    overrides: dict | None  # qpass.compile overrides of RECIPE; None: the unquantized model
    calibrate: bool = False  # OCS chooses its channels from calibration inputs, not the weights
    combination: bool = False  # a candidate for "the best combination"
    bound: bool = False  # not a transform: how far removing a source of error entirely would get


DOWN_PROJ = "*.down_proj"  # where the trained model's outliers are (see the outlier ratios)

RUNS = (
    Run("unquantized", None),
    Run("mxfp4, no transform", dict(hadamard=None)),
    Run(f"+ OCS {OCS_RATIO}", dict(hadamard=None, ocs=OCS_RATIO)),
    Run(f"+ OCS {OCS_RATIO} calibrated", dict(hadamard=None, ocs=OCS_RATIO), calibrate=True),
    Run("+ block Hadamard 32", dict(hadamard="block32")),
    Run("+ residual rotation", dict(hadamard="residual")),
    Run(
        "block32 + OCS calibrated", dict(hadamard="block32", ocs=OCS_RATIO), calibrate=True, combination=True
    ),
    Run("residual + block32", dict(hadamard=["residual", "block32"]), combination=True),
    Run(
        "residual + block32 + OCS calibrated", dict(hadamard=["residual", "block32"], ocs=OCS_RATIO),
        calibrate=True, combination=True,
    ),
    # Rotating only where the outliers are: elsewhere a rotation trades MXFP4's good fit to the
    # products' heavy-tailed structure for Gaussian error (docs/rotation.md).
    Run(
        "down_proj block32 + OCS calibrated",
        dict(hadamard=None, rules=[(DOWN_PROJ, {"hadamard": "block32"})], ocs=OCS_RATIO),
        calibrate=True, combination=True,
    ),
    Run(
        "bound: down_proj inputs unquantized",
        dict(hadamard=None, rules=[(DOWN_PROJ, {"input": None})]),
        bound=True,
    ),
    Run("bound: down_proj unquantized", dict(hadamard=None, exclude=[DOWN_PROJ]), bound=True),
    Run("bound: no input quantized (weight-only)", dict(hadamard=None, input=None), bound=True),
)


@dataclass
class Result:
    run: Run
    losses: list[float]  # held-out loss per batch, nats per byte
    quantized: int | None = None  # sites qpass quantized, of ...
    sites: int | None = None
    seconds: float = 0.0  # compile, calibration and evaluation
    report: str = field(default="", repr=False)

    @property
    def loss(self) -> float:
        return statistics.fmean(self.losses)  # every batch has as many bytes

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def parse_args() -> argparse.Namespace:
    defaults = demo.parse_args([])  # the demo's model and data, unless told otherwise
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fp32 training steps")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden size (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    parser.add_argument("--quick", action="store_true", help="tiny model and training: a ~30 s smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.hidden % demo.HEAD_DIM:
        parser.error(f"--hidden must be a multiple of {demo.HEAD_DIM} (the head size)")
    if args.quick:
        args.steps, args.layers, args.hidden = 100, 1, 64
    for name in ("batch", "seq", "lr", "seed"):
        setattr(args, name, getattr(defaults, name))
    return args


# ---- the trained model -----------------------------------------------------------------------------


def trained_model(args, train_batches: list, data: bytes) -> tuple[nn.Module, dict]:
    """The fp32-trained model, from the cache when this config (and text) trained one before;
    returns it with how its training went."""
    config = {k: getattr(args, k) for k in ("steps", "layers", "hidden", "batch", "seq", "lr", "seed")}
    config["data"] = hashlib.sha256(data).hexdigest()[:16]  # the help topics change between Pythons
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"model-{key}.pt"
    model = demo.build_model(args)
    if path.exists() and not args.retrain:
        saved = torch.load(path)
        model.load_state_dict(saved["state_dict"])
        print(f"Trained model from the cache: {path.relative_to(ROOT)}", flush=True)
        return model.eval(), saved["training"] | {"cached": True}

    print(f"Training fp32 for {args.steps} steps (cache: {path.relative_to(ROOT)})", flush=True)
    start = time.perf_counter()
    losses, _ = demo.train(model, "fp32", train_batches, args)
    window = losses[-demo.FINAL_WINDOW:]
    training = {"seconds": time.perf_counter() - start, "final_loss": sum(window) / len(window)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": config, "training": training}, path)
    return model.eval(), training | {"cached": False}


def heldout_batches(data: torch.Tensor, args) -> list[torch.Tensor]:
    """All of the held-out text, in consecutive windows of the training batch shape (a new shape
    would recompile; the remainder, under one batch, is left out). The demo's 8 spread batches are
    8 kB: too few to tell apart perplexities that differ by a few tenths of a percent."""
    batch_bytes = args.batch * args.seq
    starts = torch.arange(0, len(data) // batch_bytes * batch_bytes, args.seq)
    return [demo.windows(data, s, args.seq) for s in starts.view(-1, args.batch)]


def outlier_ratios(model: nn.Module, batches: list) -> dict[str, float]:
    """max|x| / rms(x) of each linear's input per batch, averaged over the batches; keyed by the
    linear's name. Large values are the activation outliers that MXFP4 blocks flush their
    neighbours to zero for; a Gaussian's is about sqrt(2 ln n)."""
    ratios: dict[str, list[float]] = {}

    def record(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            ratios.setdefault(name, []).append((x.abs().amax() / x.square().mean().sqrt()).item())

        return hook

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears]
    try:
        with torch.no_grad():
            for tokens in batches:
                model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.fmean(values) for name, values in ratios.items()}


def gaussian_ratio(shape: tuple[int, ...]) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return (x.abs().amax() / x.square().mean().sqrt()).item()


# ---- the runs --------------------------------------------------------------------------------------


def evaluate(run: Run, trained: nn.Module, heldout: list, calibration: list) -> Result:
    """Held-out loss of a fresh copy of ``trained`` quantized as ``run`` says."""
    start = time.perf_counter()
    if run.overrides is None:
        return Result(run, batch_losses(trained, heldout), seconds=time.perf_counter() - start)
    torch.compiler.reset()  # a fresh Dynamo cache per copy: see demo.prepare
    model = qpass.compile(copy.deepcopy(trained), RECIPE, backend="aot_eager", **run.overrides)
    if run.calibrate:
        qpass.calibrate(model, calibration)
    losses = batch_losses(model, heldout)
    report = qpass.report(model)
    if not report.quantized:  # Dynamo ran the model eagerly: the loss would be the unquantized one
        raise RuntimeError(f"{run.name}: qpass quantized nothing\n{report}")
    return Result(
        run, losses, len(report.quantized), len(report.rows), time.perf_counter() - start, str(report)
    )


def batch_losses(model: nn.Module, batches: list) -> list[float]:
    return [demo.evaluate(model, [tokens]) for tokens in batches]


def recovered(result: Result, plain: Result, unquantized: Result) -> float:
    """The fraction of plain MXFP4's perplexity gap to the unquantized model that ``result`` closes."""
    return (plain.ppl - result.ppl) / (plain.ppl - unquantized.ppl)


def table(results: list[Result]) -> list[str]:
    unquantized, plain = results[0], results[1]
    lines = [
        "| run | held-out loss (nats/byte) | perplexity (per byte) | vs unquantized | gap recovered "
        "| sites quantized |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        quantized = "-" if r.quantized is None else f"{r.quantized} of {r.sites}"
        gap = "-" if r is unquantized else f"{100 * (r.ppl / unquantized.ppl - 1):+.2f}%"
        closed = "-" if r is unquantized or r is plain else f"{recovered(r, plain, unquantized):.0%}"
        lines.append(f"| {r.run.name} | {r.loss:.4f} | {r.ppl:.4f} | {gap} | {closed} | {quantized} |")
    return lines


def verdict(results: list[Result]) -> list[str]:
    unquantized, plain = results[0], results[1]
    best = min((r for r in results if r.run.combination), key=lambda r: r.ppl)
    fraction = recovered(best, plain, unquantized)
    # Paired by batch: every run sees the same bytes, so the batches' own difficulty cancels.
    differences = [b - p for b, p in zip(best.losses, plain.losses)]
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    lines = [
        f"- best combination: {best.run.name}, perplexity {best.ppl:.4f} against {plain.ppl:.4f} for plain "
        f"MXFP4 and {unquantized.ppl:.4f} unquantized: it recovers {fraction:.1%} of the gap "
        f"({plain.ppl:.4f} - {best.ppl:.4f}) / ({plain.ppl:.4f} - {unquantized.ppl:.4f}); its held-out loss "
        f"minus plain MXFP4's is {statistics.fmean(differences):+.4f} ± {error:.4f} (standard error over "
        f"the {len(differences)} batches), against {unquantized.loss - plain.loss:+.4f} for the unquantized "
        "model.",
        f"- goal, at least {GOAL:.0%} of the gap recovered: {'PASS' if fraction >= GOAL else 'MISS'}.",
    ]
    lines += [
        f"- {r.run.name}: {recovered(r, plain, unquantized):.1%} of the gap. A transform can at most remove "
        "the error it targets, so this bounds what any outlier transform of those operands can recover."
        for r in results if r.run.bound
    ]
    overall = min((r for r in results[1:] if not r.run.bound), key=lambda r: r.ppl)
    if overall is not best:
        lines.append(
            f"- the lowest perplexity of all quantized runs is {overall.run.name}'s ({overall.ppl:.4f}, "
            f"{recovered(overall, plain, unquantized):.1%} of the gap), not a combination's."
        )
    return lines


def outlier_lines(ratios: dict[str, float], gaussian: float) -> list[str]:
    by_kind: dict[str, list[float]] = {}
    for name, ratio in ratios.items():  # q_proj, down_proj, lm_head, ...: the name's last part
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(ratio)
    kinds = ", ".join(f"{kind} {statistics.fmean(values):.1f}" for kind, values in by_kind.items())
    return [
        f"- activation outliers of the unquantized model: max|x|/rms(x) of a linear's input, averaged "
        f"over the held-out batches and the {len(ratios)} linears, is "
        f"{statistics.fmean(ratios.values()):.1f} (largest {max(ratios.values()):.1f}); a Gaussian tensor "
        f"of a hidden-size input's shape gives {gaussian:.1f}. "
        f"By linear: {kinds}.",
    ]


# ---- report ----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    with demo.intra_op_threads(args.threads):
        section = run_all(args)
    if not (args.no_write or args.quick):  # a smoke run's numbers do not belong in RESULTS.md
        title = "MXFP4 perplexity with rotations and OCS (bench/rotation_ppl.py)"
        write_section("rotation_ppl", title, "\n".join(section))


def run_all(args: argparse.Namespace) -> list[str]:
    started = time.perf_counter()
    machine = (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, {sys.platform}"
    )
    print(machine, flush=True)
    train_data, heldout_data = demo.load_bytes()
    train_batches, _ = demo.make_batches(train_data, heldout_data, args)
    heldout = heldout_batches(heldout_data, args)
    trained, training = trained_model(args, train_batches, train_data.numpy().tobytes())
    parameters = sum(p.numel() for p in trained.parameters())
    model_line = (
        f"demo Llama, {args.layers} layers, hidden {args.hidden}, {parameters / 1e6:.2f} M parameters, "
        f"trained in fp32 for {args.steps} steps of {args.batch} x {args.seq} bytes (AdamW, lr {args.lr}; "
        f"final train loss {training['final_loss']:.3f}, {training['seconds']:.0f} s"
        + (", cached" if training["cached"] else "") + ")"
    )
    print(model_line, flush=True)
    ratios = outlier_ratios(trained, heldout)
    outliers = outlier_lines(ratios, gaussian_ratio((args.batch, args.seq, args.hidden)))
    print("\n".join(outliers), flush=True)

    results = []
    for run in RUNS:
        results.append(evaluate(run, trained, heldout, train_batches[:CALIBRATION_BATCHES]))
        r = results[-1]
        print(f"  {run.name:<36} loss {r.loss:.4f}  ppl {r.ppl:.4f}  {r.seconds:5.1f} s", flush=True)
    rows, notes = table(results), verdict(results)
    best = min((r for r in results if r.run.combination), key=lambda r: r.ppl)
    print("\n" + "\n".join(rows) + "\n\n" + "\n".join(notes))
    print(f"\n{best.report}")
    elapsed = time.perf_counter() - started
    print(f"\nDone in {elapsed:.0f} s.")

    options = f"--steps {args.steps} --layers {args.layers} --hidden {args.hidden} --threads {args.threads}"
    return [
        f"{machine}; {elapsed:.0f} s in all"
        + (" (the trained model from the cache)." if training["cached"] else " (training included)."),
        f"Reproduce: `make bench` (or `python bench/rotation_ppl.py {options}`).",
        "",
        f"{model_line}. Held-out: the last {demo.HELDOUT_FRACTION:.0%} of the text, {len(heldout)} batches "
        f"({len(heldout) * args.batch * args.seq} bytes) of the training batch shape; perplexity "
        "is exp(mean loss), per byte. Every quantized run is `qpass.compile(copy, "
        f"\"{RECIPE}\", backend=\"aot_eager\", **overrides)` of the same weights (fake quantization, "
        "eval mode, no grad): hadamard=None for the runs without a rotation, ocs= for OCS; "
        f"\"calibrated\" runs `qpass.calibrate` on {CALIBRATION_BATCHES} training batches first (the "
        "split channels chosen from the inputs, not the weights). vs unquantized: the perplexity's "
        "relative difference; gap recovered: (ppl(plain) - ppl(run)) / (ppl(plain) - ppl(unquantized)).",
        "",
        *rows,
        "",
        *notes,
        *outliers,
        "",
    ]


if __name__ == "__main__":
    main()
