"""Convergence study: qpass's training recipes and low-precision optimizer against fp32, paired over seeds.

Run with `make convergence` (or `python examples/fp4_convergence.py`; `--help` lists the options).
It reuses examples/demo.py: the byte-level Llama-style causal LM learning Python's help topics
(`pydoc_data.topics`), through `torch.compile(backend="aot_eager")`, for the same number of steps
(so the same tokens) in every run.

Runs are paired: for each seed, every row starts from that seed's initial weights and sees that
seed's batches, so a row's gap to fp32 on the same seed is the recipe's effect plus the chaos of
training alone, not the luck of one initialization. Each row's paired gap is reported as the mean
and standard error over the seeds (3 by default). The rows:

- fp32 (torch's AdamW, the baseline) and bf16 autocast;
- fp8-train (current and delayed scaling) and mxfp8-train;
- fp4-train (arXiv 2501.17116) and its three ablations: without the differentiable gradient
  estimator (dge=False), without outlier clamping and compensation (occ=None), and without both (a
  direct cast); nvfp4-train (Transformer Engine's NVFP4 recipe) and mxfp4-train (Quartet-style);
- qpass.optim.AdamW (E4M3 first moment, scaled FP16 second moment) on the fp32 model and with
  fp8-train; torchao's AdamWFp8 and AdamW8bit (benchmark environment only: `make convergence` uses
  it; elsewhere leave them out with --runs).

Every optimizer has the same hyperparameters (lr and schedule from the options, betas (0.9, 0.999),
eps 1e-8, weight decay 0.01). Each (row, seed) trains in a process of its own, --workers at a time
(two single-threaded workers on a 2-core CPU), which also gives each run its own peak memory.

It prints progress and the table, plots the curves with their seed bands
(build/fp4_convergence/loss.png by default), and writes docs/fp4_convergence.md (with the plot,
docs/fp4_convergence.png) and the "fp4-convergence" section of bench/RESULTS.md (`--no-write` skips
both).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # examples/ and bench/ are not packages
sys.path.insert(0, str(ROOT / "bench"))
import demo  # noqa: E402 -- sets matplotlib's headless backend before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from process_memory import start_peak, status  # noqa: E402
from results import write_section  # noqa: E402

import qpass  # noqa: E402

BASELINE = demo.BASELINE
DOC = ROOT / "docs" / "fp4_convergence.md"
DOC_PLOT = DOC.with_suffix(".png")
SECTION = "fp4-convergence"
TITLE = "Training convergence, paired over seeds (examples/fp4_convergence.py)"
SMOOTH_WINDOW = 50  # steps in the running mean of the plotted losses
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01  # every optimizer's (torch's AdamW defaults)
TORCH_ADAMW = "torch.optim.AdamW"
QPASS_ADAMW = "qpass.optim.AdamW"
TORCHAO = "torchao.optim."


@dataclass(frozen=True)
class Run:
    recipe: str = BASELINE  # demo.BASELINE for the unquantized model
    overrides: dict = field(default_factory=dict)  # qpass.compile's keyword arguments
    optimizer: str = TORCH_ADAMW  # the optimizer class, by its import path
    autocast: torch.dtype | None = None  # of the forward, on the CPU


FP4_ABLATIONS = {
    "fp4-train no DGE": {"dge": False},
    "fp4-train no OCC": {"occ": None},
    "fp4-train direct cast": {"dge": False, "occ": None},
}
RUNS: dict[str, Run] = {
    BASELINE: Run(),
    "bf16 autocast": Run(autocast=torch.bfloat16),
    "fp8-train": Run("fp8-train"),
    "fp8-train delayed": Run("fp8-train", {"scaling": "delayed"}),
    "mxfp8-train": Run("mxfp8-train"),
    "fp4-train": Run("fp4-train"),
    **{label: Run("fp4-train", overrides) for label, overrides in FP4_ABLATIONS.items()},
    "nvfp4-train": Run("nvfp4-train"),
    "mxfp4-train": Run("mxfp4-train"),
    "qpass AdamW": Run(optimizer=QPASS_ADAMW),
    "fp8-train + qpass AdamW": Run("fp8-train", optimizer=QPASS_ADAMW),
    "torchao AdamWFp8": Run(optimizer=TORCHAO + "AdamWFp8"),
    "torchao AdamW8bit": Run(optimizer=TORCHAO + "AdamW8bit"),
}
# The options a training job reads (the rest say how many, where and what to write).
JOB_OPTIONS = ("steps", "layers", "hidden", "batch", "seq", "lr", "schedule", "heldout_batches", "threads")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=192, help="hidden size (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--schedule", choices=demo.SCHEDULES, default="cosine", help="learning-rate schedule")
    parser.add_argument("--heldout-batches", type=int, default=32, help="held-out batches to evaluate")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, each a set of paired runs")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=list(RUNS),
        metavar="RUN",
        help=f"the rows to train ({BASELINE} always is): {', '.join(map(repr, RUNS))}",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "build" / "fp4_convergence" / "loss.png", help="plot path"
    )
    parser.add_argument("--no-write", action="store_true", help="write neither the doc nor bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.hidden % demo.HEAD_DIM:
        parser.error(f"--hidden must be a multiple of {demo.HEAD_DIM} (the head size)")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: a standard error needs two paired gaps")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    args.runs = [label for label in RUNS if label == BASELINE or label in args.runs]  # the gaps need it
    for label in args.runs:
        check_run(parser, label)
    return args


def check_run(parser: argparse.ArgumentParser, label: str) -> None:
    """Fail now, not after the runs before it have trained, on a recipe, override or optimizer that
    is not there."""
    run = RUNS[label]
    if run.optimizer.startswith(TORCHAO) and importlib.util.find_spec("torchao") is None:
        parser.error(f"run {label!r} needs torchao, which only the benchmark environment has "
                     "(`make convergence` uses it); --runs chooses the runs")
    if run.recipe == BASELINE:
        return
    try:
        qpass.get_recipe(run.recipe).with_overrides(**run.overrides)
    except (TypeError, ValueError) as error:
        parser.error(f"run {label!r}: {error} (--runs chooses the runs)")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    module, _, cls = name.rpartition(".")
    optimizer = getattr(importlib.import_module(module), cls)
    return optimizer(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of every tensor in the optimizer's state; a tensor subclass (torchao's quantized
    states) counts the tensors it is made of (codes, scales)."""

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.nbytes

    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(size(t) for t in tensors)


def compile_call(run: Run) -> str:
    """What prepares a run's model and optimizer, for the doc."""
    if run.recipe == BASELINE:
        call = 'torch.compile(model, backend="aot_eager")'
    else:
        overrides = "".join(f", {key}={value!r}" for key, value in run.overrides.items())
        call = f'qpass.compile(model, "{run.recipe}", backend="aot_eager"{overrides})'
    precision = f' under `torch.autocast("cpu", {run.autocast})`' if run.autocast else ""
    return f"`{call}`{precision}, `{run.optimizer}`"


def train_job(label: str, seed: int, options: dict) -> dict:
    """Train one row on one seed from scratch, in the calling process (a worker of its own). The
    seed draws the initial weights and the batches; the held-out batches do not depend on it."""
    args = argparse.Namespace(**options, seed=seed)
    torch.set_num_threads(args.threads)
    run = RUNS[label]
    train_batches, heldout_batches = demo.make_batches(*demo.load_bytes(), args)
    initial = demo.build_model(args)
    _, peak_reset, before = start_peak()
    started = time.perf_counter()
    model = demo.prepare(initial, run.recipe, **run.overrides)
    optimizer = make_optimizer(run.optimizer, model.parameters(), args.lr)
    losses, seconds_per_step = demo.train(
        model, f"{label} s{seed}", train_batches, args, optimizer, run.autocast
    )
    heldout_loss = demo.evaluate(model, heldout_batches, run.autocast)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"  {label} seed {seed} done: held-out loss {heldout_loss:.3f}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return {
        "run": label,
        "seed": seed,
        "losses": losses,
        "train_loss": statistics.fmean(losses[-demo.FINAL_WINDOW :]),
        "heldout_loss": heldout_loss,
        "seconds_per_step": seconds_per_step,
        "state_bytes_per_parameter": state_bytes(optimizer) / parameters,
        "peak_mb": (status("VmHWM") - before) / 2**20 if peak_reset else float("nan"),
    }


def train_all(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every row on every seed, --workers processes at a time; each row's results in seed order.
    The cheapest rows (fp32 first in the table) are submitted last, so that the workers finish
    close together."""
    options = {name: getattr(args, name) for name in JOB_OPTIONS}
    jobs = [(label, seed) for label in reversed(args.runs) for seed in range(args.seeds)]
    # spawn: a fresh interpreter per run (forking a process that has run torch's thread pool can
    # hang), and one run per process, so that its peak memory and Dynamo's caches are its own.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {job: pool.submit(train_job, *job, options) for job in jobs}
        done = {job: future.result() for job, future in futures.items()}
    return {label: [done[label, seed] for seed in range(args.seeds)] for label in args.runs}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (the sample standard deviation over the square root of n)."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def paired_gaps(results: dict[str, list[dict]], label: str, baseline: str = BASELINE) -> list[float]:
    """Per seed, the row's held-out loss relative to the baseline's on the same seed, in percent."""
    return [
        100 * (r["heldout_loss"] - b["heldout_loss"]) / b["heldout_loss"]
        for r, b in zip(results[label], results[baseline], strict=True)
    ]


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per run: means over the seeds and the paired gap's mean and standard error."""
    rows = []
    for label, per_seed in results.items():
        gaps = paired_gaps(results, label)
        gap, gap_error = mean_and_error(gaps)
        rows.append({
            "run": label,
            "heldout_loss": statistics.fmean(r["heldout_loss"] for r in per_seed),
            "train_loss": statistics.fmean(r["train_loss"] for r in per_seed),
            "gap_pct": gap,
            "gap_error": gap_error,
            "gaps": gaps,
            "state_bytes_per_parameter": statistics.fmean(r["state_bytes_per_parameter"] for r in per_seed),
            "peak_mb": max(r["peak_mb"] for r in per_seed),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in per_seed),
        })
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | held-out loss | paired gap to fp32 | per seed | train loss | optimizer state, bytes/param "
        "| peak MB | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        baseline = r["run"] == BASELINE
        gap = "—" if baseline else f"{r['gap_pct']:+.2f}% ± {r['gap_error']:.2f}"
        per_seed = "—" if baseline else ", ".join(f"{g:+.2f}" for g in r["gaps"])
        lines.append(
            f"| {r['run']} | {r['heldout_loss']:.4f} | {gap} | {per_seed} | {r['train_loss']:.4f} "
            f"| {r['state_bytes_per_parameter']:.2f} | {r['peak_mb']:.0f} | {r['seconds_per_step']:.3f} |"
        )
    return lines


def noise(results: dict[str, list[dict]]) -> dict:
    """What pairing buys, and whether the baseline still learns at the end: fp32's held-out loss
    across seeds (unpaired), the smallest and largest standard error of a paired gap, and fp32's
    train loss over the last tenth of the steps against the tenth before, in percent."""
    baseline = [r["heldout_loss"] for r in results[BASELINE]]
    _, unpaired = mean_and_error([100 * loss / statistics.fmean(baseline) for loss in baseline])
    errors = [mean_and_error(paired_gaps(results, label))[1] for label in results if label != BASELINE]
    tenth = max(1, len(results[BASELINE][0]["losses"]) // 10)
    drops = [
        100
        * (1 - statistics.fmean(r["losses"][-tenth:]) / statistics.fmean(r["losses"][-2 * tenth : -tenth]))
        for r in results[BASELINE]
    ]
    return {
        "unpaired_error": unpaired,
        "paired_errors": (min(errors, default=math.nan), max(errors, default=math.nan)),
        "last_tenth_drop": statistics.fmean(drops),
    }


def goals(results: dict[str, list[dict]]) -> list[str]:
    """The issue's goals, each with its numbers and whether it holds (for the rows that were run)."""
    lines = []

    def verdict(holds: bool) -> str:
        return "**holds**" if holds else "**misses**"

    def within(label: str, bound: float) -> None:
        if label not in results:
            return
        gap, error = mean_and_error(paired_gaps(results, label))
        lines.append(f"- {label} within {bound:g}% of fp32 (paired mean): {gap:+.2f}% ± {error:.2f} — "
                     f"{verdict(abs(gap) <= bound)}")

    if "qpass AdamW" in results:
        # "Within one standard error of torch AdamW's loss": the spread of that loss over the seeds
        # (unpaired); the paired gap's own error, far smaller, is the stricter reading.
        gap, error = mean_and_error(paired_gaps(results, "qpass AdamW"))
        spread = noise(results)["unpaired_error"]
        lines.append(
            f"- qpass AdamW within one standard error of torch AdamW's (fp32's) loss, {spread:.2f}% over the "
            f"seeds: {gap:+.2f}% — {verdict(abs(gap) <= spread)}; within its paired gap's own standard "
            f"error, {error:.2f}%: {verdict(abs(gap) <= error)}"
        )
    for label in ("fp8-train", "fp8-train delayed", "mxfp8-train"):
        within(label, 1.0)
    within("fp4-train", 3.0)
    if "fp4-train" in results:
        for label in FP4_ABLATIONS:
            if label not in results:
                continue
            worse, error = mean_and_error(paired_gaps(results, label, "fp4-train"))
            lines.append(
                f"- {label} worse than fp4-train by more than two standard errors: {worse:+.2f}% "
                f"± {error:.2f} (paired, of fp4-train's loss) — {verdict(worse > 2 * error)}"
            )
    return lines


def notes(results: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    measured = noise(results)
    low, high = measured["paired_errors"]
    return [
        (
            f"held-out loss: the last {demo.HELDOUT_FRACTION:.0%} of the text, {args.heldout_batches} "
            f"batches through the run's (quantized) forward, mean over the {args.seeds} seeds (nats per "
            "byte); paired gap: per seed, the held-out loss relative to fp32's on that seed, mean ± "
            f"standard error over the seeds; train loss: mean of the last {demo.FINAL_WINDOW} steps; "
            "optimizer state: every tensor in the optimizer's state (codes and scales for the quantized "
            "ones) over the parameter count; peak MB: the largest over the seeds of the run's peak "
            "resident memory (VmHWM) above the process's before the model was prepared, compilation "
            f"included; s/step: median without the first {demo.TIMING_WARMUP} steps (which compile), "
            f"{args.workers} run(s) at a time on {os.cpu_count()} cores."
        ),
        "",
        (
            "Noise: unpaired, fp32's held-out loss has a standard error of "
            f"{measured['unpaired_error']:.2f}% over the seeds; paired, the gaps' standard errors range "
            f"from {low:.2f}% to {high:.2f}%. fp32's "
            f"train loss fell {measured['last_tenth_drop']:.1f}% from the second-last tenth of the steps to "
            "the last (mean over the seeds): "
            + ("the baseline is still learning at the end." if measured["last_tenth_drop"] > 0
               else "the baseline has stopped learning.")
        ),
    ]


def plot(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Above, each row's smoothed train loss, the mean over the seeds with the band from the lowest to
    the highest seed; below, its paired gap to fp32 on each step (smoothed), the mean with a band of
    one standard error either side."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure, (losses, gaps) = plt.subplots(2, 1, figsize=(10, 10), sharex=True, height_ratios=(3, 2))
    colors = plt.get_cmap("tab20").colors
    steps = range(1, args.steps + 1)
    baselines = [demo.running_mean(r["losses"], SMOOTH_WINDOW) for r in results[BASELINE]]
    for index, (label, per_seed) in enumerate(results.items()):
        color, style = colors[index % len(colors)], "--" if label == BASELINE else "-"
        smoothed = [demo.running_mean(r["losses"], SMOOTH_WINDOW) for r in per_seed]
        by_step = list(zip(*smoothed))
        losses.plot(steps, [statistics.fmean(s) for s in by_step], style, color=color, lw=1, label=label)
        low, high = [min(s) for s in by_step], [max(s) for s in by_step]
        losses.fill_between(steps, low, high, color=color, alpha=0.15)
        if label == BASELINE:
            continue
        gap_by_step = [
            [run - base for run, base in zip(a, b)] for a, b in zip(zip(*smoothed), zip(*baselines))
        ]
        mean = [statistics.fmean(g) for g in gap_by_step]
        error = [statistics.stdev(g) / math.sqrt(len(g)) for g in gap_by_step]
        gaps.plot(steps, mean, style, color=color, lw=1)
        gaps.fill_between(steps, [m - e for m, e in zip(mean, error)], [m + e for m, e in zip(mean, error)],
                          color=color, alpha=0.15)
    gaps.axhline(0, color="black", lw=0.5)
    losses.set_ylabel(f"train loss, mean of {SMOOTH_WINDOW} steps")
    shape = f"{args.steps} steps of {args.batch} x {args.seq} bytes, {args.seeds} seeds"
    model = f"Byte-level Llama ({args.layers} layers, hidden {args.hidden})"
    losses.set_title(f"{model} on Python's help topics, {shape}")
    losses.legend(fontsize="small", ncol=2)
    gaps.set_xlabel("step")
    gaps.set_ylabel(f"minus fp32 on the same seed, mean of {SMOOTH_WINDOW}")
    for axes in (losses, gaps):
        axes.grid(alpha=0.3)
    figure.savefig(args.out, dpi=72, bbox_inches="tight")  # small enough for docs/
    plt.close(figure)


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this study."""
    names = (*JOB_OPTIONS, "seeds", "workers")
    options = [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    if args.runs != list(RUNS):
        options += ["--runs", *args.runs]
    return shlex.join(["python", "examples/fp4_convergence.py", *options])


def describe(args: argparse.Namespace, parameters: int) -> list[str]:
    """What was run, on what, and how to run it again: the text above the table."""
    machine = (
        f"torch {torch.__version__}, {args.workers} worker(s) of {args.threads} thread(s) on "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, {sys.platform})"
    )
    runs = [f"- {label}: {compile_call(run)}" for label, run in RUNS.items() if label in args.runs]
    return [
        f"Run on {datetime.date.today().isoformat()}, {machine}; "
        f"load average {os.getloadavg()[0]:.1f} at the start.",
        f"Reproduce: `{command(args)}` (`make convergence` runs the defaults, in the benchmark environment).",
        "",
        (
            f"examples/demo.py's byte-level Llama ({args.layers} layers, hidden {args.hidden}, "
            f"{parameters / 1e6:.2f} M parameters, random init) trained on Python's help topics for "
            f"{args.steps} steps of {args.batch} x {args.seq} bytes "
            f"({args.steps * args.batch * args.seq / 1e6:.2f} M tokens; lr {args.lr}, {args.schedule} "
            f"schedule; betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY}), for each of {args.seeds} "
            "seeds: each seed's runs start from the same initial weights and see the same batches "
            "(docs/fp4_training.md describes the FP4 recipes, docs/optim.md the optimizer). The rows:"
        ),
        "",
        *runs,
    ]


def write(lines: list[str], args: argparse.Namespace) -> None:
    """The doc (with a copy of the plot) and the bench/RESULTS.md section."""
    body = "\n".join(lines) + "\n"
    shutil.copyfile(args.out, DOC_PLOT)
    plot = f"![Train loss and paired gap of every row, with seed bands]({DOC_PLOT.name})"
    DOC.write_text(f"# {TITLE}\n\n{body}\n{plot}\n")
    write_section(SECTION, TITLE, f"{body}\nPlot: docs/{DOC_PLOT.name}.\n")
    print(f"Wrote docs/{DOC.name}, docs/{DOC_PLOT.name} and the {SECTION} section of bench/RESULTS.md.")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    started = time.perf_counter()
    initial = demo.build_model(argparse.Namespace(**vars(args), seed=0))
    parameters = sum(p.numel() for p in initial.parameters())
    header = describe(args, parameters)
    print("\n".join(header) + "\n", flush=True)

    results = train_all(args)
    summary = [*table(summarize(results)), "", *notes(results, args), "", "Goals:", "", *goals(results)]
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
