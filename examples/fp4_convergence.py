"""FP4 convergence study: the demo's Llama trained under qpass's FP4 training recipes, against fp32 and FP8.

Run with `make convergence` (or `python examples/fp4_convergence.py`; `--help` lists the options).
It reuses examples/demo.py: the byte-level Llama-style causal LM learning Python's help topics
(`pydoc_data.topics`), every run from the same initial weights through the same batches, for the
same number of steps (so the same tokens), through `torch.compile(backend="aot_eager")`:

- fp32 (seed 0): the unquantized baseline; fp32 seed 1: the baseline again from another
  initialization and batch order, which shows how far two runs differ by chance alone;
- fp8-train and mxfp8-train: the FP8 recipes, the reference point for the FP4 ones;
- fp4-train (arXiv 2501.17116), and the same recipe without its differentiable gradient estimator
  (dge=False), without its outlier clamping and compensation (occ=None) and without both (a direct
  cast), which shows what each part is worth;
- nvfp4-train (Transformer Engine's NVFP4 recipe) and mxfp4-train (Quartet-style MXFP4).

It prints progress, a table of final train loss, held-out loss, gap to the fp32 baseline and
seconds per step, plots the smoothed train loss (build/fp4_convergence/loss.png by default) and
writes the table to docs/fp4_convergence.md (with the plot, docs/fp4_convergence.png) and to the
"fp4-convergence" section of bench/RESULTS.md (`--no-write` skips both). The runs are
single-threaded and one after the other (`--threads` to change): the defaults take about 20 minutes
on a 2-core CPU, a third of it the nvfp4-train and mxfp4-train runs. (Two runs at a time in two
processes was slower on a 2-core machine shared with other jobs: each step took twice as long.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # examples/ and bench/ are not packages
sys.path.insert(0, str(ROOT / "bench"))
import demo  # noqa: E402 -- sets matplotlib's headless backend before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from results import write_section  # noqa: E402

import qpass  # noqa: E402

BASELINE = demo.BASELINE
DOC = ROOT / "docs" / "fp4_convergence.md"
DOC_PLOT = DOC.with_suffix(".png")
SECTION = "fp4-convergence"
TITLE = "FP4 training convergence (examples/fp4_convergence.py)"
SMOOTH_WINDOW = 50  # steps in the running mean of the plotted losses


@dataclass(frozen=True)
class Run:
    recipe: str  # demo.BASELINE for the unquantized model
    overrides: dict = field(default_factory=dict)  # qpass.compile's keyword arguments
    seed: int = 0  # of the initial weights and the batch order


RUNS: dict[str, Run] = {
    BASELINE: Run(BASELINE),
    f"{BASELINE} seed 1": Run(BASELINE, seed=1),
    "fp8-train": Run("fp8-train"),
    "mxfp8-train": Run("mxfp8-train"),
    "fp4-train": Run("fp4-train"),
    "fp4-train no DGE": Run("fp4-train", {"dge": False}),
    "fp4-train no OCC": Run("fp4-train", {"occ": None}),
    "fp4-train direct cast": Run("fp4-train", {"dge": False, "occ": None}),
    "nvfp4-train": Run("nvfp4-train"),
    "mxfp4-train": Run("mxfp4-train"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    parser.add_argument("--schedule", choices=demo.SCHEDULES, default="cosine", help="learning-rate schedule")
    parser.add_argument("--heldout-batches", type=int, default=32, help="held-out batches to evaluate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=list(RUNS),
        metavar="RUN",
        help=f"the runs to train ({BASELINE} always is): {', '.join(map(repr, RUNS))}",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "build" / "fp4_convergence" / "loss.png", help="plot path"
    )
    parser.add_argument("--no-write", action="store_true", help="write neither the doc nor bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.hidden % demo.HEAD_DIM:
        parser.error(f"--hidden must be a multiple of {demo.HEAD_DIM} (the head size)")
    args.runs = [label for label in RUNS if label == BASELINE or label in args.runs]  # the gaps need it
    for label in args.runs:
        check_run(parser, label)
    return args


def check_run(parser: argparse.ArgumentParser, label: str) -> None:
    """Fail now, not after the runs before it have trained, on a recipe or override this qpass lacks."""
    run = RUNS[label]
    if run.recipe == BASELINE:
        return
    try:
        qpass.get_recipe(run.recipe).with_overrides(**run.overrides)
    except (TypeError, ValueError) as error:
        parser.error(f"run {label!r}: {error} (--runs chooses the runs)")


def compile_call(run: Run) -> str:
    """The call that prepares a run's model, for the doc."""
    if run.recipe == BASELINE:
        return 'torch.compile(model, backend="aot_eager")'
    overrides = "".join(f", {key}={value!r}" for key, value in run.overrides.items())
    return f'qpass.compile(model, "{run.recipe}", backend="aot_eager"{overrides})'


def train_run(label: str, args: argparse.Namespace) -> dict:
    """Train one run from scratch. Its weights and batches are drawn from its seed, so every seed-0
    run starts from the same weights and sees the same batches; the held-out batches do not depend
    on the seed."""
    started = time.perf_counter()
    run = RUNS[label]
    seeded = argparse.Namespace(**vars(args), seed=run.seed)
    train_data, heldout_data = demo.load_bytes()
    train_batches, heldout_batches = demo.make_batches(train_data, heldout_data, seeded)
    model = demo.prepare(demo.build_model(seeded), run.recipe, **run.overrides)
    losses, seconds_per_step = demo.train(model, label, train_batches, args)
    heldout_loss = demo.evaluate(model, heldout_batches)
    seconds = time.perf_counter() - started
    print(f"  {label} done: held-out loss {heldout_loss:.3f}, {seconds:.0f} s", flush=True)
    return {
        "run": label,
        "losses": losses,
        "train_loss": statistics.fmean(losses[-demo.FINAL_WINDOW :]),
        "heldout_loss": heldout_loss,
        "seconds_per_step": seconds_per_step,
    }


def table(results: list[dict]) -> list[str]:
    rows = [
        "| run | train loss | held-out loss | gap | s/step |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['run']} | {r['train_loss']:.3f} | {r['heldout_loss']:.3f} | {r['gap_pct']:+.2f}% "
            f"| {r['seconds_per_step']:.3f} |"
        )
    return rows


def notes(results: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        (
            f"train loss: the mean of the last {demo.FINAL_WINDOW} steps (nats per byte); held-out: the last "
            f"{demo.HELDOUT_FRACTION:.0%} of the text, {args.heldout_batches} batches through the run's "
            f"(quantized) forward; gap: held-out loss relative to {BASELINE}'s; s/step: median, without the "
            f"first {demo.TIMING_WARMUP} steps (which compile)."
        ),
    ]
    noise = next((r for r in results if RUNS[r["run"]].seed != 0), None)
    if noise is not None:
        lines.append(
            f"Run-to-run noise: {noise['run']} (other initial weights, other batches) ends "
            f"{noise['gap_pct']:+.2f}% from {BASELINE}; gaps within about that much are chance, "
            "not the recipe."
        )
    return lines


def plot(results: list[dict], args: argparse.Namespace) -> None:
    """The smoothed train loss above; below, each run's loss minus the baseline's on the same step
    (smoothed), where the runs that overlap above come apart."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure, (losses, gaps) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, height_ratios=(3, 2))
    baseline = results[0]["losses"]
    steps = range(1, len(baseline) + 1)
    for r in results:
        style = "--" if RUNS[r["run"]].recipe == BASELINE else "-"
        losses.plot(steps, demo.running_mean(r["losses"], SMOOTH_WINDOW), style, lw=1, label=r["run"])
        difference = [loss - base for loss, base in zip(r["losses"], baseline)]
        gaps.plot(steps, demo.running_mean(difference, SMOOTH_WINDOW), style, lw=1)
    losses.set_ylabel(f"train loss, mean of {SMOOTH_WINDOW} steps")
    shape = f"{args.steps} steps of {args.batch} x {args.seq} bytes"
    losses.set_title(f"Byte-level Llama on Python's help topics, {shape}")
    losses.legend(fontsize="small")
    gaps.set_xlabel("step")
    gaps.set_ylabel(f"minus {BASELINE}, mean of {SMOOTH_WINDOW}")
    for axes in (losses, gaps):
        axes.grid(alpha=0.3)
    figure.savefig(args.out, dpi=72, bbox_inches="tight")  # under 100 kB, for docs/
    plt.close(figure)


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this study."""
    names = ("steps", "layers", "hidden", "batch", "seq", "lr", "schedule", "heldout_batches", "threads")
    options = [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    if args.runs != list(RUNS):
        options += ["--runs", *args.runs]
    return shlex.join(["python", "examples/fp4_convergence.py", *options])


def describe(args: argparse.Namespace, parameters: int) -> list[str]:
    """What was run, on what, and how to run it again: the text above the table."""
    machine = (
        f"torch {torch.__version__}, {args.threads} thread(s) on {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}, {sys.platform})"
    )
    runs = [
        f"- {label}: `{compile_call(run)}`" + (f", seed {run.seed}" if run.seed else "")
        for label, run in RUNS.items()
        if label in args.runs
    ]
    load = os.getloadavg()[0]
    return [
        f"Run on {datetime.date.today().isoformat()}, {machine}; load average {load:.1f} at the start.",
        f"Reproduce: `{command(args)}` (`make convergence` runs the defaults).",
        "",
        (
            f"examples/demo.py's byte-level Llama ({args.layers} layers, hidden {args.hidden}, "
            f"{parameters / 1e6:.2f} M parameters, random init) trained on Python's help topics for "
            f"{args.steps} steps of {args.batch} x {args.seq} bytes "
            f"({args.steps * args.batch * args.seq / 1e6:.2f} M tokens; AdamW, lr {args.lr}, "
            f"{args.schedule} schedule). Every run "
            "starts from the same initial weights and sees the same batches, except the other seed's "
            "(docs/fp4_training.md describes the FP4 recipes):"
        ),
        "",
        *runs,
    ]


def write(lines: list[str], args: argparse.Namespace) -> None:
    """The doc (with a copy of the plot) and the bench/RESULTS.md section."""
    body = "\n".join(lines) + "\n"
    shutil.copyfile(args.out, DOC_PLOT)
    DOC.write_text(f"# {TITLE}\n\n{body}\n![Smoothed train loss of every run]({DOC_PLOT.name})\n")
    write_section(SECTION, TITLE, f"{body}\nPlot: docs/{DOC_PLOT.name}.\n")
    print(f"Wrote docs/{DOC.name}, docs/{DOC_PLOT.name} and the {SECTION} section of bench/RESULTS.md.")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    started = time.perf_counter()
    model = demo.build_model(argparse.Namespace(**vars(args), seed=0))
    parameters = sum(p.numel() for p in model.parameters())
    header = describe(args, parameters)
    print("\n".join(header) + "\n", flush=True)

    with demo.intra_op_threads(args.threads):
        results = [train_run(label, args) for label in args.runs]
    baseline = results[0]["heldout_loss"]
    for r in results:
        r["gap_pct"] = 100 * (r["heldout_loss"] - baseline) / baseline
    summary = [*table(results), "", *notes(results, args)]
    print("\n" + "\n".join(summary))
    plot(results, args)
    elapsed = time.perf_counter() - started
    print(f"\nLoss curves: {args.out}")
    print(f"Done in {elapsed:.0f} s; load average {os.getloadavg()[0]:.1f} at the end.")
    if not args.no_write:
        write([*header, "", *summary, "", f"{elapsed:.0f} s in all."], args)
    print(f"Reproduce: {command(args)}")
    return results


if __name__ == "__main__":
    main()
