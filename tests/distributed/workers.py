"""What each rank runs in the distributed tests (spawned processes, gloo on 127.0.0.1), and the same
training in one process: a tiny Hugging Face Llama, one fixed global batch per step split across ranks.

The MLP is 130 wide, so that its weights' 130 rows shard unevenly over 4 ranks (33, 33, 33, 31) and
in shards of 65 rows over 2, which no 16- or 32-row scaling group divides.
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qpass

BATCH, SEQUENCE, VOCABULARY = 4, 16, 256
LR = 0.05  # small enough that 5 steps stay close to linear: see the bounds in test_distributed.py


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=64, intermediate_size=130, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQUENCE)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def global_batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCABULARY, (BATCH, SEQUENCE), generator=generator) for _ in range(steps)]


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def report_rows(model) -> list[tuple]:
    """The report without its notes (FSDP2's all-gather in low precision adds one)."""
    return [(r["site"], r["quantized"], tuple(sorted(r["formats"].items())), r["gemm"], r["reason"])
            for r in qpass.report(model).rows]


def compiled(mode: str, recipe: str, backend: str = "eager", **overrides):
    """The tiny Llama compiled by qpass as ``mode`` says, and the module that holds its parameters:
    alone, inside or around DDP, or sharded by FSDP2 (each decoder layer a unit, then the model)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_llama()
    if mode == "single":
        return qpass.compile(model, recipe, backend=backend, **overrides), model
    if mode == "ddp":  # DDP around the compiled model
        return DDP(qpass.compile(model, recipe, backend=backend, **overrides)), model
    if mode == "ddp_inside":  # the DDP module compiled
        wrapped = DDP(model)
        return qpass.compile(wrapped, recipe, backend=backend, **overrides), wrapped
    if mode == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return qpass.compile(model, recipe, backend=backend, **overrides), model
    raise ValueError(mode)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (FSDP2's shards gathered), by its name without DDP's prefix."""
    return {name.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for name, p in model.named_parameters()}


def qpass_states(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v.clone() for k, v in model.state_dict().items() if "_qpass." in k}


def step(model, optimizer, ids: torch.Tensor, outputs: list | None = None) -> torch.Tensor:
    """One SGD step on this rank's share of the global batch ``ids``; the global batch's loss.
    ``outputs`` is given the logits of this rank's share."""
    rank, world = rank_and_world()
    share = ids.chunk(world)[rank]
    out = model(share, labels=share)
    loss = out.loss
    if outputs is not None:
        outputs.append(out.logits.detach().clone())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return loss


def train(mode: str, recipe: str, steps: int, backend: str = "eager", **overrides) -> dict:
    """``steps`` steps; the losses, parameters, report and qpass states after them."""
    model, owner = compiled(mode, recipe, backend, **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    first: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = torch.stack([step(model, optimizer, ids, first if i == 0 else None)
                              for i, ids in enumerate(global_batches(steps))])
    reported = model.module if mode == "ddp" else model
    return {"losses": losses, "first_logits": first[0], "parameters": full_parameters(owner),
            "report": report_rows(reported),
            "notes": [r["notes"] for r in qpass.report(reported).rows], "states": qpass_states(reported)}


def train_each(runs: list[tuple]) -> list[dict]:
    """:func:`train` for each ``(mode, recipe, steps, backend, overrides)``, in one process group."""
    return [train(mode, recipe, steps, backend, **overrides)
            for mode, recipe, steps, backend, overrides in runs]


def collective_bytes(recipe: str, steps: int) -> list[list[tuple[str, int]]]:
    """FSDP2 training: per step, each all-gather's and reduce-scatter's output bytes."""
    calls: list[tuple[str, int]] = []
    for name in ("all_gather_single", "reduce_scatter_single"):
        original = getattr(dist, name)

        def counting(output, input, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, (output if _name == "all_gather_single" else input).nbytes))
            return _original(output, input, *args, **kwargs)

        setattr(dist, name, counting)
    model, _ = compiled("fsdp", recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in global_batches(steps):
            calls.clear()
            step(model, optimizer, ids)
            per_step.append(list(calls))
    return per_step


def logits(model) -> torch.Tensor:
    """The model's logits on the whole of a fixed batch (every rank computes all of it)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(global_batches(1)[0]).logits


def save_checkpoint(path: str, mode: str, recipe: str, steps: int, overrides: dict) -> dict:
    """Train ``steps`` steps, save with DCP, then one step more: what a loaded model must reproduce."""
    model, owner = compiled(mode, recipe, **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        *batches, following = global_batches(steps + 1)
        for ids in batches:
            step(model, optimizer, ids)
        qpass.dcp.save(model, path)
        out = {"states": qpass_states(model), "logits": logits(model)}
        out["loss_after"] = step(model, optimizer, following)
    return out


def load_checkpoint(path: str, mode: str, recipe: str, steps: int, overrides: dict) -> dict:
    """A fresh compiled model loaded from a checkpoint of ``steps`` steps: its logits and states, and
    the loss of the step that follows."""
    model, owner = compiled(mode, recipe, **overrides)
    qpass.dcp.load(model, path)
    out = {"states": qpass_states(model)}  # before a forward records amaxes into the histories
    out["logits"] = logits(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["loss_after"] = step(model, optimizer, global_batches(steps + 1)[-1])
    return out


# ---- spawning ranks ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(job(*args), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job, *args) -> list:
    """``job(*args)`` on ``world`` spawned ranks of one gloo process group; each rank's result."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, _free_port(), job, args, out), nprocs=world,
                           start_method="spawn")
        return [torch.load(f"{out}/{rank}.pt", weights_only=False) for rank in range(world)]


def graph_breaks(mode: str) -> dict[str, dict[str, int]]:
    """Graph breaks of one training step of the tiny Llama compiled by qpass, and by torch.compile
    alone (the same backend, nothing quantized), as Dynamo counts them, by cause: a call of a block
    qpass compiles on its own (``block``), a function excluded from compilation, such as FSDP2's
    hooks (``disabled``), anything else (``other``)."""
    counts = {}
    for compiler in ("qpass", "torch"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if compiler == "qpass":
            model, _ = compiled(mode, "fp8-train")
        else:
            model, _ = compiled(mode, "fp8-train", exclude=["*"])
            qpass.capture.remove(model if mode != "ddp" else model.module)
            model.compile(backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(model, torch.optim.SGD(model.parameters(), lr=LR), global_batches(1)[0])
        causes = {"block": 0, "disabled": 0, "other": 0}
        for reason, count in torch._dynamo.utils.counters["graph_break"].items():
            cause = ("block" if "BlockCall" in reason else "disabled" if "function `disable`" in reason
                     else "other")
            causes[cause] += count
        counts[compiler] = causes
    return counts


def graph_breaks_each(modes: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    return {mode: graph_breaks(mode) for mode in modes}


def synced_scales(quantizers: list[str], shares: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each quantizer's operand of this rank's share, its per-tensor amax agreed across ranks."""
    from qpass.ops import matmul

    share = shares[dist.get_rank()]
    return [matmul.operand_tensors(share, q, -1, "", "", False, False, True) for q in quantizers]
