"""What FSDP2 communicates and how long a step takes, per qpass recipe, against FSDP2 in bf16.

Run with `make bench`, or `python bench/distributed_cpu.py [--steps 6] [--no-write]`. Two gloo ranks
on 127.0.0.1 (one thread each) train a small Llama (each decoder layer an FSDP2 unit, then the model;
bf16 parameters and gradient reduction, MixedPrecisionPolicy) in one spawned process group, every
variant in the same run, round-robin step by step:

- FSDP2 bf16: the model compiled by torch.compile alone (aot_eager), nothing quantized;
- each qpass training recipe, compiled by ``qpass.compile`` (aot_eager);
- torchao float8 (tensorwise, ``enable_fsdp_float8_all_gather``), the peer, where torchao is
  installed (the bench environment).

Bytes are those of every ``all_gather_single`` (outputs) and ``reduce_scatter_single`` (inputs)
FSDP2 issues in a step after the first (which finds qpass's sites, and gathers in bf16), counted by
wrapping the collectives. Step time is the median wall time of a step on rank 0. Writes its table
to bench/RESULTS.md between this benchmark's markers. (The ranks are spawned by the distributed tests'
helper, tests/distributed/workers.py.)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import workers  # noqa: E402 -- spawns the ranks
from results import write_section  # noqa: E402

import qpass  # noqa: E402

RECIPES = ("fp8-train", "fp8-rowwise-train", "mxfp8-train", "nvfp4-train")
UNSYNCED = "fp8-train, sync_amax=False"  # what agreeing on one scale across ranks costs
SHAPE = dict(hidden=256, intermediate=1024, layers=2, heads=8, vocab=256, seq=128, batch=8)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["heads"], max_position_embeddings=SHAPE["seq"]))


def _variant(name: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _model()
    if name == "torchao float8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if name in RECIPES:
        return qpass.compile(model, name, backend="aot_eager")
    if name == UNSYNCED:
        return qpass.compile(model, "fp8-train", backend="aot_eager", sync_amax=False)
    model.compile(backend="aot_eager")
    return model


class _Counter:
    """Bytes through FSDP2's collectives, by wrapping them."""

    def __init__(self):
        self.bytes = {"all_gather_single": 0, "reduce_scatter_single": 0}
        for name in self.bytes:
            original = getattr(dist, name)

            def counting(output, input, *args, _original=original, _name=name, **kwargs):
                self.bytes[_name] += (output if _name == "all_gather_single" else input).nbytes
                return _original(output, input, *args, **kwargs)

            setattr(dist, name, counting)

    def reset(self) -> dict[str, int]:
        counted = dict(self.bytes)
        self.bytes = dict.fromkeys(self.bytes, 0)
        return counted


def measure(names: list[str], warmup: int, steps: int) -> dict[str, dict]:
    """On each rank: every variant's bytes per step and step times, the variants round-robin."""
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = _Counter()
    models = {name: _variant(name) for name in names}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    generator = torch.Generator().manual_seed(1)
    results = {name: {"times": [], "bytes": None} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(warmup + steps):
            ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=generator)
            share = ids.chunk(world)[rank]
            for name, model in models.items():
                counter.reset()
                dist.barrier()
                start = time.perf_counter()
                model(share, labels=share).loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
                dist.barrier()
                elapsed = time.perf_counter() - start
                counted = counter.reset()
                if step >= warmup:
                    results[name]["times"].append(elapsed)
                    results[name]["bytes"] = counted
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    try:
        import torchao.float8  # noqa: F401

        peers = ["torchao float8"]
    except ImportError:
        peers = []
    names = ["FSDP2 bf16", *RECIPES, UNSYNCED, *peers]
    started = time.perf_counter()
    results = workers.run_ranks(2, measure, names, args.warmup, args.steps)[0]
    base = results["FSDP2 bf16"]
    base_time = statistics.median(base["times"])
    rows = ["| variant | all-gathered / step | vs bf16 | reduce-scattered / step | vs bf16 | step (ms) "
            "| vs bf16 |", "|---|---|---|---|---|---|---|"]
    for name in names:
        r = results[name]
        gathered, scattered = r["bytes"]["all_gather_single"], r["bytes"]["reduce_scatter_single"]
        seconds = statistics.median(r["times"])
        rows.append(
            f"| {name} | {gathered / 1e6:.3f} MB | {gathered / base['bytes']['all_gather_single']:.3f}x "
            f"| {scattered / 1e6:.3f} MB | {scattered / base['bytes']['reduce_scatter_single']:.3f}x "
            f"| {seconds * 1e3:.0f} | {seconds / base_time:.2f}x |")
    machine = (f"torch {torch.__version__}, 2 gloo ranks x 1 thread on {os.cpu_count()} CPUs, "
               f"{platform.processor() or platform.machine()}; {time.perf_counter() - started:.0f} s")
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    body = "\n".join([
        f"{machine}.",
        "Reproduce: `make bench` (or "
        f"`python bench/distributed_cpu.py --steps {args.steps} --warmup {args.warmup}`).",
        "",
        f"Llama ({shape}); FSDP2 with bf16 parameters and reductions;",
        "each decoder layer a unit, then the model. Bytes per step after the first (all-gathers for",
        "forward and again for backward); median",
        f"step time of {args.steps} steps after {args.warmup} warm-up, the variants round-robin, aot_eager.",
        "qpass gathers FP8 per-tensor weights (fp8-train) as codes; per-channel, MX and NVFP4 weights",
        "gather in bf16 (their dgrad needs the weight along the other axis: docs/distributed.md).",
        "`sync_amax=False` shows what the all-reduces that agree on one per-tensor scale cost (torchao",
        "computes each rank's activation and gradient scales from its own share, without them).",
        "",
        *rows,
        "",
    ])
    print(body)
    if not args.no_write:
        write_section("distributed_cpu", "FSDP2 on the CPU (bench/distributed_cpu.py)", body)


if __name__ == "__main__":
    main()
