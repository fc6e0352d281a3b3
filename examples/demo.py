"""qpass demo: train a small Llama three times, in fp32, FP8 and MXFP8, and compare the losses.

Run with `make demo` (or `python examples/demo.py`; `--help` lists the options). A byte-level
Llama-style causal LM (Hugging Face transformers, random init, nothing downloaded) learns the text
of Python's own help topics (`pydoc_data.topics`, in every Python install). The same initial
weights see the same batches three times:

- fp32: the unquantized baseline, through `torch.compile(backend="aot_eager")`;
- fp8-train: `qpass.compile(model, "fp8-train", backend="aot_eager")`, per-tensor E4M3/E5M2;
- mxfp8-train: `qpass.compile(model, "mxfp8-train", backend="aot_eager")`, MXFP8 E4M3 per 32.

Every run uses the same backend, so its seconds per step differ from the baseline's only by the
quantization qpass adds (`aot_eager` runs the quantize ops one by one: it shows correctness, not
speed). The demo prints progress, a table of final train loss, held-out loss, the gap to the
baseline, the sites qpass quantized and seconds per step, the mxfp8-train run's `qpass.report`,
and saves a plot of the loss curves (build/demo/loss.png by default). It runs single-threaded
(`--threads` to change) and takes two to three minutes on a 2-core CPU, half of it the mxfp8-train
run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from pathlib import Path
from pydoc_data.topics import topics

import matplotlib

matplotlib.use("Agg")  # headless: the demo only writes a PNG
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import qpass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("fp8-train", "mxfp8-train")
BASELINE = "fp32"
HEAD_DIM = 32  # a whole MX block, should attention (K = head_dim) ever be quantized: attention=True
HELDOUT_FRACTION = 0.1
HELDOUT_BATCHES = 8
# "cosine": a linear warm-up over the first WARMUP_FRACTION of the steps, then a cosine decay to
# FINAL_LR_FRACTION of the rate. Ending at a low rate ends each run near its own minimum rather than
# at wherever the last high-rate steps left it, so runs compare with far less chance in the gaps.
SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
TIMING_WARMUP = 3  # steps left out of seconds/step: the first ones capture and compile the graphs
FINAL_WINDOW = 20  # the final train loss is the mean over this many last steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    parser.add_argument(
        "--heldout-batches", type=int, default=HELDOUT_BATCHES, help="held-out batches to evaluate"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "demo" / "loss.png", help="plot path")
    args = parser.parse_args(argv)
    if args.hidden % HEAD_DIM:
        parser.error(f"--hidden must be a multiple of {HEAD_DIM} (the head size)")
    return args


def load_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """Python's help topics as bytes (the vocabulary is all 256 of them): train and held-out parts."""
    data = torch.frombuffer(bytearray("\n\n".join(topics.values()).encode("utf-8")), dtype=torch.uint8)
    split = int(len(data) * (1 - HELDOUT_FRACTION))
    return data[:split], data[split:]


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([data[s : s + seq] for s in starts.tolist()]).long()


def make_batches(train: torch.Tensor, heldout: torch.Tensor, args) -> tuple[list, list]:
    """Random training windows drawn once, so that every run sees the very same batches; held-out
    windows spread evenly, in the training batch shape (a new shape would recompile)."""
    generator = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(len(train) - args.seq, (args.steps, args.batch), generator=generator)
    train_batches = [windows(train, s, args.seq) for s in starts]
    spread = torch.linspace(0, len(heldout) - args.seq, args.heldout_batches * args.batch).long()
    heldout_batches = [windows(heldout, s, args.seq) for s in spread.view(args.heldout_batches, args.batch)]
    return train_batches, heldout_batches


def build_model(args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // HEAD_DIM,
        num_key_value_heads=args.hidden // HEAD_DIM,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def prepare(initial: torch.nn.Module, run: str, **overrides) -> torch.nn.Module:
    """A fresh copy of the initial model for ``run`` (qpass.compile quantizes in place), compiled from
    a clean Dynamo cache: every copy adds entries to the cache of the same HF forward, and past
    Dynamo's recompile limit (8) a new model would silently run eager, so unquantized. ``overrides``
    go to qpass.compile (examples/fp4_convergence.py runs recipes with parts switched off)."""
    torch.compiler.reset()
    model = copy.deepcopy(initial)
    if run == BASELINE:
        return torch.compile(model, backend="aot_eager")
    return qpass.compile(model, run, backend="aot_eager", **overrides)


def train(
    model: torch.nn.Module, run: str, batches: list, args, optimizer: torch.optim.Optimizer | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[list[float], float]:
    """AdamW (or ``optimizer``) over ``batches``, the forward under CPU autocast to ``autocast`` if
    given; returns the loss of every step and the median seconds per step after the compiling ones
    (a median, so that a moment of contention for the CPU does not skew it)."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, len(batches), args.schedule)
    )
    log_every = max(1, len(batches) // 10)
    losses, durations = [], []
    start = time.perf_counter()
    for step, tokens in enumerate(batches, 1):
        step_start = time.perf_counter()
        with autocast_to(autocast):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        durations.append(time.perf_counter() - step_start)
        if step % log_every == 0 or step == len(batches):
            elapsed = time.perf_counter() - start
            progress = f"step {step:>4}/{len(batches)}  loss {losses[-1]:.3f}  {elapsed:6.1f} s"
            print(f"  {run:<12} {progress}", flush=True)
    timed = durations[TIMING_WARMUP:] or [float("nan")]
    return losses, statistics.median(timed)


def learning_rate_factor(step: int, steps: int, schedule: str) -> float:
    """The learning rate of ``step`` (0-based) relative to ``--lr``."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * (1 + math.cos(math.pi * progress)) / 2


def autocast_to(dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, autocast: torch.dtype | None = None) -> float:
    """Mean loss over the held-out batches, through the same (quantized) forward as training."""
    with autocast_to(autocast):
        return sum(model(tokens, labels=tokens).loss.item() for tokens in batches) / len(batches)


def sites(model: torch.nn.Module, run: str) -> tuple[int | None, int | None]:
    if run == BASELINE:
        return None, None
    report = qpass.report(model)
    return len(report.quantized), len(report.rows)


def print_table(results: list[dict]) -> None:
    header = f"{'run':<12} {'train loss':>10} {'held-out':>9} {'gap':>8} {'quantized':>10} {'s/step':>7}"
    print(f"\n{header}\n{'-' * len(header)}")
    for r in results:
        quantized = "-" if r["sites"] is None else f"{r['quantized']} of {r['sites']}"
        print(
            f"{r['run']:<12} {r['train_loss']:>10.3f} {r['heldout_loss']:>9.3f} {r['gap_pct']:>+7.2f}% "
            f"{quantized:>10} {r['seconds_per_step']:>7.3f}"
        )
    print(
        f"\ntrain loss: mean of the last {FINAL_WINDOW} steps; "
        f"held-out: the last {HELDOUT_FRACTION:.0%} of the text, through the run's (quantized) forward;\n"
        f"gap: held-out loss relative to {BASELINE}; "
        f"s/step: median, without the first {TIMING_WARMUP} steps (which compile);\n"
        "every run goes through torch.compile(backend='aot_eager')."
    )


def running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def plot(results: list[dict], path: Path) -> None:
    """Train loss per step above; below, each recipe's loss minus the baseline's on the same batch
    (smoothed), where the curves that overlap above come apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (losses, gaps) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    baseline = results[0]["losses"]
    steps = range(1, len(baseline) + 1)
    for r in results:
        losses.plot(steps, r["losses"], label=f"{r['run']} (held-out {r['heldout_loss']:.3f})")
        difference = [loss - base for loss, base in zip(r["losses"], baseline)]
        gaps.plot(steps, running_mean(difference, FINAL_WINDOW), label=r["run"])
    losses.set_ylabel("train loss (nats per byte)")
    losses.set_title("Byte-level Llama on Python's help topics: fp32 and qpass recipes")
    losses.legend()
    gaps.set_xlabel("step")
    gaps.set_ylabel(f"minus {BASELINE} (mean of {FINAL_WINDOW})")
    for axes in (losses, gaps):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


@contextlib.contextmanager
def intra_op_threads(count: int):
    """Run with ``count`` torch threads (one by default): this model's matmuls are too small to gain
    from more, and threads that wait on each other slow down several-fold when other processes
    share the cores. The caller's setting comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with intra_op_threads(args.threads):
        return run_all(args)


def run_all(args: argparse.Namespace) -> list[dict]:
    """Train the baseline and every recipe, print their table and qpass's report, plot the losses."""
    start = time.perf_counter()
    train_data, heldout_data = load_bytes()
    train_batches, heldout_batches = make_batches(train_data, heldout_data, args)
    initial = build_model(args)
    parameters = sum(p.numel() for p in initial.parameters())
    print(
        f"Llama, {args.layers} layers, hidden {args.hidden}, {parameters / 1e6:.2f} M parameters; "
        f"{len(train_data) / 1e3:.0f} kB train, {len(heldout_data) / 1e3:.0f} kB held-out; "
        f"{args.steps} steps of {args.batch} x {args.seq} bytes",
        flush=True,
    )

    results = []
    for run in (BASELINE, *RECIPES):
        print(f"\n{run}" + (" (unquantized baseline)" if run == BASELINE else ""), flush=True)
        model = prepare(initial, run)
        losses, seconds_per_step = train(model, run, train_batches, args)
        quantized, total = sites(model, run)
        results.append({
            "run": run,
            "losses": losses,
            "train_loss": sum(losses[-FINAL_WINDOW:]) / len(losses[-FINAL_WINDOW:]),
            "heldout_loss": evaluate(model, heldout_batches),
            "quantized": quantized,
            "sites": total,
            "seconds_per_step": seconds_per_step,
        })
        if run == RECIPES[-1]:
            print(f"\n{qpass.report(model)}")
    baseline = results[0]["heldout_loss"]
    for r in results:
        r["gap_pct"] = 100 * (r["heldout_loss"] - baseline) / baseline

    print_table(results)
    plot(results, args.out)
    print(f"\nLoss curves: {args.out}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return results


if __name__ == "__main__":
    main()
