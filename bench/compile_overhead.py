"""What qpass adds to a torch.compile run: the time of its graph passes, and the fake-quant training step.

Run with `make bench`, or `python bench/compile_overhead.py [--layers 4 8 16 32] [--repeats 10]
[--steps 8]`. Prints two tables and writes them to bench/RESULTS.md between this benchmark's markers
(`--no-write` only prints; `--quick` is a tiny smoke run of about 20 s).

1. Pass time. qpass runs its passes (find sites, plan, rewrite) on every graph Dynamo captures,
   between Dynamo's tracing and the compiler, so their cost is paid at every (re)compile. It must
   grow linearly with the graph: a Llama-style model's graph is captured once per depth (the cost
   depends on the node count, so the layers are narrow), then ``quantize_graph`` is timed alone on
   fresh copies of it. Dynamo's capture and the aot_eager compile are timed too, for scale only.
2. Step time. A fake-quantized training step (forward, backward, AdamW) of a small Llama under
   ``mxfp8-train`` and ``fp8-train``, against the same model compiled without qpass, all with the
   aot_eager backend. A short profile then says where the quantized step's extra time goes.

The machine these run on is shared, so the measurements are made to resist outside load: times are
the process's CPU time (which another process taking a core inflates far less than wall time; wall
time is shown beside it), torch runs one thread, and the depths, like the step variants, are
measured round-robin so that a burst of load falls on all of them alike. Absolute timings are still
noise; the ratios (time(L_max)/time(L_min) against the ideal L_max/L_min, quantized step over
unquantized step) are the result.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import os
import platform
import pstats
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import write_section  # noqa: E402

import qpass  # noqa: E402
from qpass.capture import dynamo_parameters  # noqa: E402
from qpass.passes import quantize_graph  # noqa: E402
from qpass.recipes import get_recipe  # noqa: E402

PASS_RECIPE = "mxfp8-train"
STEP_RECIPES = ("mxfp8-train", "fp8-train", "fp8-rowwise-train")  # the first two have goals
PASS_GOAL_S = 1.0  # passes on the 32-layer graph
STEP_GOAL = 2.0  # fake-quant step / unquantized step
LINEAR_SLACK = 1.15  # time(L_max)/time(L_min) up to 15% over L_max/L_min still reads as linear


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int

    def model(self, layers: int) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.seq,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).train()

    def tokens(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab, (self.batch, self.seq), generator=generator)

    def __str__(self) -> str:
        return (
            f"hidden {self.hidden}, intermediate {self.intermediate}, {self.heads} heads "
            f"({self.kv_heads} KV), vocab {self.vocab}, batch {self.batch} x seq {self.seq}"
        )


# Narrow layers for the pass timings (their cost follows the node count, not the width); a small
# but not degenerate model for the steps: every K is a multiple of 32, so every MX block is full.
PASS_SHAPE = LlamaShape(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, batch=1, seq=32)
STEP_SHAPE = LlamaShape(hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=4096, batch=4, seq=128)
QUICK_STEP_SHAPE = LlamaShape(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, batch=2, seq=32)


def _ms(seconds: float, digits: int = 0) -> str:
    return f"{seconds * 1e3:.{digits}f} ms"


# ---- 1. pass time ----------------------------------------------------------------------------------


@dataclass
class Captured:
    graph: fx.GraphModule  # the Dynamo graph as the backend received it, never rewritten
    parameters: set[str]  # names of its placeholders that are parameters
    capture_s: float  # Dynamo's tracing, from the call until the backend is entered (wall)
    aot_eager_s: float = 0.0  # aot_eager compiling the quantized graph: joint forward/backward trace (wall)


def fresh_copy(captured: Captured) -> tuple[fx.GraphModule, set[fx.Node]]:
    """A rewritable copy of the captured graph and its parameter nodes.

    ``graph_copy`` copies each node's meta dict but shares its values (the fake tensors the passes
    read), which a deepcopy of the GraphModule would try to copy too. The parameters are found by
    name: Dynamo's ``grapharg`` metadata, which ``dynamo_parameters`` reads, is only valid inside
    the backend call.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(captured.graph.graph, {}))
    gm = fx.GraphModule(captured.graph, graph)
    parameters = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in captured.parameters}
    return gm, parameters


def capture(model: nn.Module, tokens: torch.Tensor) -> Captured:
    """Capture ``model``'s training graph (loss included) once, and time what surrounds the passes."""
    captured = []
    start = time.perf_counter()

    def record(gm: fx.GraphModule, example_inputs):
        names = {n.name for n in dynamo_parameters(gm)}
        result = Captured(gm, names, capture_s=time.perf_counter() - start)
        result.graph, _ = fresh_copy(result)  # Dynamo may touch gm after we return: keep our own
        quantized, parameters = fresh_copy(result)
        quantize_graph(quantized, parameters, get_recipe(PASS_RECIPE), set())
        begin = time.perf_counter()
        torch._dynamo.lookup_backend("aot_eager")(quantized, example_inputs)  # as qpass.compile would
        result.aot_eager_s = time.perf_counter() - begin
        captured.append(result)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(tokens, labels=tokens)
    (result,) = captured
    return result


@dataclass
class PassRow:
    layers: int
    captured: Captured
    nodes: int = 0
    sites: int = 0
    quantized: int = 0
    cpu_s: float = float("inf")  # best process CPU time of the passes
    wall_s: float = float("inf")  # best wall time of the passes


def time_passes(row: PassRow) -> None:
    """One timing of ``quantize_graph`` on a fresh copy (the copy is not timed); keeps the best."""
    gm, parameters = fresh_copy(row.captured)
    recipe = get_recipe(PASS_RECIPE)
    gc.collect()  # the garbage of earlier copies is not the passes' to collect
    cpu, wall = time.process_time(), time.perf_counter()
    plans, _ = quantize_graph(gm, parameters, recipe, set())
    row.cpu_s = min(row.cpu_s, time.process_time() - cpu)
    row.wall_s = min(row.wall_s, time.perf_counter() - wall)
    row.nodes, row.sites = len(row.captured.graph.graph.nodes), len(plans)
    row.quantized = sum(p.excluded is None for p in plans)


def pass_rows(layers: list[int], repeats: int) -> list[PassRow]:
    rows = [PassRow(n, capture(PASS_SHAPE.model(n), PASS_SHAPE.tokens())) for n in layers]
    for _ in range(repeats):
        for row in rows:  # round-robin, so that a burst of outside load lands on every depth alike
            time_passes(row)
    return rows


def _pass_row(r: PassRow) -> str:
    return (
        f"| {r.layers} | {r.nodes} | {r.sites} ({r.quantized}) | {r.cpu_s * 1e3:.1f} | "
        f"{r.wall_s * 1e3:.1f} | {r.cpu_s / r.layers * 1e3:.2f} | {r.captured.capture_s:.2f} | "
        f"{r.captured.aot_eager_s:.2f} |"
    )


def linearity(rows: list[PassRow]) -> list[str]:
    """How pass time grows: the extremes' ratio against linear, the cost per added layer, a fit."""
    first, last = rows[0], rows[-1]
    ideal = last.layers / first.layers
    ratio = last.cpu_s / first.cpu_s
    verdict = "linear" if ratio <= ideal * LINEAR_SLACK else "SUPERLINEAR"
    lines = [
        f"- growth: {verdict}. time({last.layers})/time({first.layers}) = {ratio:.2f} against {ideal:.1f} "
        f"for linear growth (graph nodes grew {last.nodes / first.nodes:.2f}x); under {ideal:.1f} is a "
        "fixed part (embedding, lm_head, loss) being amortized."
    ]
    if len(rows) > 2:
        # Linear: every added layer costs the same; a quadratic pass would make later ones dearer.
        added = ", ".join(
            f"{a.layers}->{b.layers}: {(b.cpu_s - a.cpu_s) / (b.layers - a.layers) * 1e3:.2f}"
            for a, b in zip(rows, rows[1:])
        )
        slope, intercept = _fit_line([r.layers for r in rows], [r.cpu_s for r in rows])
        lines += [
            f"- ms per added layer: {added}.",
            f"- least-squares fit: passes = {_ms(intercept, 1)} + {_ms(slope, 2)} x layers.",
        ]
    return lines


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


PASS_HEADER = (
    "| layers | graph nodes | sites (quantized) | passes CPU ms | passes wall ms | CPU ms / layer "
    "| Dynamo capture s | aot_eager compile s |\n|---|---|---|---|---|---|---|---|"
)


def pass_section(layers: list[int], repeats: int) -> list[str]:
    rows = pass_rows(sorted(layers), repeats)
    deepest = rows[-1]
    goal = (
        f"- goal, passes under {PASS_GOAL_S:.0f} s at 32 layers: {_ms(deepest.cpu_s)} at {deepest.layers} "
        f"layers, {'met' if deepest.cpu_s < PASS_GOAL_S else 'MISSED'}"
        + ("." if deepest.layers == 32 else " (32 layers not measured).")
    )
    return [PASS_HEADER, *(_pass_row(r) for r in rows), "", *linearity(rows), goal]


# ---- 2. step time ----------------------------------------------------------------------------------


class Trainer:
    """One compiled copy of the model, its optimizer, and the times of its steps."""

    def __init__(self, name: str, base: nn.Module, prepare):
        self.name = name
        model = copy.deepcopy(base)  # qpass.compile works in place: each variant owns its model
        self.model = prepare(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def step(self, tokens: torch.Tensor) -> None:
        loss = self.model(tokens, labels=tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self, tokens: torch.Tensor) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.step(tokens)
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def step_trainers(shape: LlamaShape, layers: int, warmup: int, steps: int) -> list[Trainer]:
    base = shape.model(layers)
    tokens = shape.tokens()
    torch._dynamo.reset()
    trainers = [Trainer("unquantized", base, lambda m: torch.compile(m, backend="aot_eager"))]
    trainers += [
        Trainer(r, base, lambda m, r=r: qpass.compile(m, r, backend="aot_eager")) for r in STEP_RECIPES
    ]
    if _has_torchao():
        trainers += [Trainer(f"torchao {torchao.__version__} float8 ({recipe})", base,
                             lambda m, recipe=recipe: _torchao_float8(m, recipe))
                     for recipe in ("tensorwise", "rowwise")]
    for trainer in trainers:
        for _ in range(warmup):  # the first step compiles (and makes AdamW's state)
            trainer.step(tokens)
    for _ in range(steps):
        for trainer in trainers:  # round-robin, so that a burst of outside load lands on every variant
            trainer.timed_step(tokens)
    return trainers


def _has_torchao() -> bool:
    global torchao
    try:
        import torchao
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _torchao_float8(model: nn.Module, recipe: str) -> nn.Module:
    """The peers of fp8-train and fp8-rowwise-train: torchao's float8 training (tensorwise: E4M3 input
    and weight, E5M2 grad_output, dynamic per-tensor scales; rowwise: E4M3 with a scale per row along
    each GEMM's reduction axis), both on _scaled_mm as qpass's, on the same linears qpass quantizes
    (all but lm_head)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=lambda module, name: name != "lm_head",
                               config=Float8LinearConfig.from_recipe_name(recipe))
    return torch.compile(model, backend="aot_eager")


def _step_row(trainer: Trainer, baseline: Trainer) -> str:
    wall = statistics.median(trainer.wall)
    cpu_ratio = trainer.median_cpu / baseline.median_cpu
    wall_ratio = wall / statistics.median(baseline.wall)
    spread = f"{min(trainer.wall) * 1e3:.0f}-{max(trainer.wall) * 1e3:.0f}"
    return (
        f"| {trainer.name} | {trainer.median_cpu * 1e3:.1f} | {wall * 1e3:.1f} | {spread} | "
        f"{cpu_ratio:.2f}x | {wall_ratio:.2f}x |"
    )


def _label(key: tuple) -> str:
    """A short name for a cProfile entry: ``module.function``, ``torch.where``, ``Tensor.amax``."""
    path, _, function = key
    if path != "~":
        return f"{Path(path).stem}.{function}"
    # A built-in: "<built-in method torch.where>" or "<method 'amax' of 'torch._C.TensorBase' objects>"
    method = re.fullmatch(r"<method '(\w+)' of 'torch\._C\.TensorBase' objects>", function)
    return f"Tensor.{method[1]}" if method else function.removeprefix("<built-in method ").rstrip(">")


def profile_step(trainer: Trainer, tokens: torch.Tensor, extra_s: float, steps: int = 2) -> list[str]:
    """Where a quantized step's time goes: fake quantization, its stages, and the heaviest calls.

    ``extra_s`` is what the quantized step costs over the unquantized one (medians, unprofiled).
    """
    # The default (wall) clock: a CPU-time clock is a system call per event, which skews the profile.
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        trainer.step(tokens)
    profiler.disable()
    step_s = (time.perf_counter() - start) / steps
    # (file, line, function) -> (primitive calls, calls, own time, cumulative time, callers)
    stats = pstats.Stats(profiler).stats

    def per_step(file: str, function: str, column: int = 3) -> float:
        """Cumulative seconds (or, with column=1, calls) per step of a qpass function."""
        found = [v[column] for k, v in stats.items() if k[0].endswith(file) and k[2] == function]
        return sum(found) / steps

    # Every quantization of an operand: to codes (quantize_for_gemm) or, for a GEMM that multiplies
    # values (the reference route), to its fake-quantized values (Quantizer.__call__).
    count = per_step("gemm_operand.py", "quantize_for_gemm", 1) + per_step("quantizer.py", "__call__", 1)
    fake_quant = per_step("gemm_operand.py", "quantize_for_gemm") + per_step("quantizer.py", "__call__")
    stages = {
        "scales (amax, E8M0)": per_step("scaling.py", "compute_scales"),
        "rounding": per_step("rounding.py", "round_to_element"),
        "grouping copies": per_step("grouping.py", "to_groups") + per_step("grouping.py", "from_groups"),
    }
    stages["codes (encode, packing)"] = per_step("element.py", "encode")
    stages["the rest (casts, scale multiplies, checks)"] = fake_quant - sum(stages.values())
    # Own time: a torch op called as a function has its own entry, but tensor arithmetic written
    # with operators (a * b, x @ w) counts as the own time of the function that has it.
    heaviest = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:6]
    return [
        f"- profile of {steps} {trainer.name} steps (cProfile, wall time, {_ms(step_s)}/step under the "
        f"profiler): the {count:.0f} operand quantizations of a step (to codes by "
        f"`qpass.gemm_operand.quantize_for_gemm`, or to values by `Quantizer.__call__`: the eager "
        f"reference numerics, inside qpass's custom ops) take {_ms(fake_quant)}, {fake_quant / step_s:.0%} "
        f"of the step; the GEMMs run on `_scaled_mm` where the format allows; "
        f"unprofiled, the step costs {_ms(extra_s)} more than the unquantized one.",
        "- fake quantization by stage, per step: "
        + ", ".join(f"{name} {_ms(t)}" for name, t in stages.items()) + ".",
        "- heaviest calls by own time, per step: "
        + ", ".join(f"`{_label(k)}` {_ms(v[2] / steps)}" for k, v in heaviest) + ".",
    ]


STEP_HEADER = (
    "| model | median CPU ms | median wall ms | wall min-max ms | vs unquantized (CPU) "
    "| vs unquantized (wall) |\n|---|---|---|---|---|---|"
)


def step_section(shape: LlamaShape, layers: int, warmup: int, steps: int) -> list[str]:
    trainers = step_trainers(shape, layers, warmup, steps)
    baseline, goal_variant = trainers[0], trainers[1]
    ratio = goal_variant.median_cpu / baseline.median_cpu
    notes = [
        f"- goal, {goal_variant.name} step under {STEP_GOAL:.0f}x the unquantized one: {ratio:.3f}x "
        f"(CPU time), {'met' if ratio < STEP_GOAL else 'MISSED'}."
    ]
    by_name = {t.name: t for t in trainers}
    for ours, scaling in (("fp8-train", "tensorwise"), ("fp8-rowwise-train", "rowwise")):
        peer = next((t for t in trainers if t.name.startswith("torchao") and t.name.endswith(f"({scaling})")),
                    None)
        if peer is None:
            notes.append(f"- goal, {ours} step at most torchao float8's ({scaling}): missing (no torchao)")
            continue
        ratio = by_name[ours].median_cpu / peer.median_cpu
        notes.append(f"- goal (issue 16), {ours} step at most {peer.name}'s: {ratio:.3f}x (CPU time), "
                     f"{'met' if ratio <= 1 else 'MISSED'}.")
    # Profiled whether or not the goal is met: the ratio sits near it, and moves with the load.
    notes += profile_step(goal_variant, shape.tokens(), goal_variant.median_cpu - baseline.median_cpu)
    return [STEP_HEADER, *(_step_row(t, baseline) for t in trainers), "", *notes]


# ---- report ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32], help="depths for the passes")
    parser.add_argument("--repeats", type=int, default=10, help="pass timings per depth (the best is kept)")
    parser.add_argument("--step-layers", type=int, default=2, help="depth of the model for the steps")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (the median is kept)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per variant (the first one compiles)"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; one by default, as multi-threaded CPU kernels stall whenever another "
        "process takes a core of a shared machine",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about 20 s")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    step_shape = STEP_SHAPE
    if args.quick:
        args.layers, args.repeats, args.step_layers, args.steps, args.warmup = [1, 2], 2, 1, 2, 1
        step_shape = QUICK_STEP_SHAPE
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    machine = (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, {sys.platform}; load average {_load()} at the start"
    )
    print(machine, flush=True)
    passes = pass_section(args.layers, args.repeats)
    print("\n".join(passes), flush=True)
    step = step_section(step_shape, args.step_layers, args.warmup, args.steps)
    print("\n".join(step))
    end_load = _load()
    print(f"({time.perf_counter() - started:.0f} s in all; load average {end_load} at the end)")

    options = "--quick" if args.quick else (
        f"--layers {' '.join(map(str, sorted(args.layers)))} --repeats {args.repeats} "
        f"--step-layers {args.step_layers} --steps {args.steps} --warmup {args.warmup} "
        f"--threads {args.threads}"
    )
    section = [
        f"{machine}, {end_load} at the end.",
        f"Reproduce: `make bench` (or `python bench/compile_overhead.py {options}`).",
        "",
        "The machine is shared: other jobs (test suites, other benchmarks) may have run during the",
        "measurement, so absolute CPU timings are noisy; the ratios are what matters. Times are the",
        "process's CPU time (which outside load inflates less than wall time) unless marked wall.",
        "",
        f"### Pass time ({PASS_RECIPE}; Llama training graphs, loss included: {PASS_SHAPE})",
        "",
        "qpass's passes alone (`quantize_graph`: find sites, plan, rewrite, recompile the GraphModule),",
        f"best of {args.repeats} on fresh copies of one captured graph per depth, the depths interleaved.",
        "Dynamo capture and the aot_eager compile of the quantized graph (wall time, once per depth) are",
        "shown for scale: they are not part of the passes.",
        "",
        *passes,
        "",
        f"### Training step (aot_eager; {args.step_layers}-layer Llama: {step_shape})",
        "",
        f"Forward, backward and AdamW; median of {args.steps} steps per variant after {args.warmup} warm-up",
        "steps, the variants interleaved step by step. The fake quantization is qpass's eager reference",
        "numerics (a chain of unfused, memory-bound elementwise torch ops per operand), so the ratio",
        "tends to rise when other jobs compete for memory bandwidth. The torchao row (present when",
        "torchao is installed, as in `make bench`'s environment) is its float8 training, the peer of",
        "fp8-train, on the same linears in the same run; on the CPU its GEMMs go through torch._scaled_mm.",
        "",
        *step,
        "",
    ]
    if not args.no_write:
        title = "Compile and step overhead (bench/compile_overhead.py)"
        write_section("compile_overhead", title, "\n".join(section))


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    main()
