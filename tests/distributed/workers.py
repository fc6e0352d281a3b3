"""What each rank runs in the distributed tests (spawned processes, gloo on 127.0.0.1), and the same
training in one process: a tiny Hugging Face Llama, a fixed global batch split across ranks."""

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


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQUENCE)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def global_batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCABULARY, (BATCH, SEQUENCE), generator=generator) for _ in range(steps)]


def report_rows(model) -> list[tuple]:
    return [(r["site"], r["quantized"], tuple(sorted(r["formats"].items())), r["gemm"], r["reason"])
            for r in qpass.report(model).rows]


def wrap(model, mode: str, recipe: str, backend: str, **overrides):
    """``model`` compiled by qpass as ``mode`` says: alone, inside or around DDP, or under FSDP2."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if mode == "single":
        return qpass.compile(model, recipe, backend=backend, **overrides), model
    if mode == "ddp":  # DDP around the compiled model
        return DDP(qpass.compile(model, recipe, backend=backend, **overrides)), model
    if mode == "ddp_inside":  # the compiled DDP
        wrapped = DDP(model)
        return qpass.compile(wrapped, recipe, backend=backend, **overrides), wrapped
    if mode == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return qpass.compile(model, recipe, backend=backend, **overrides), model
    raise ValueError(mode)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (an FSDP2 shard gathered), by its name in the unwrapped model."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = value.detach().clone()
    return out


def train(mode: str, recipe: str, steps: int, backend: str = "eager", **overrides) -> dict:
    """``steps`` SGD steps on the global batches, this rank's share of each; the losses are the global
    batch's (the mean of the ranks')."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    compiled, owner = wrap(tiny_llama(), mode, recipe, backend, **overrides)
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.5)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in global_batches(steps):
            share = ids.chunk(world)[rank]
            loss = compiled(share, labels=share).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            losses.append(loss)
    reported = compiled.module if mode == "ddp" else compiled
    states = {k: v.clone() for k, v in reported.state_dict().items() if "_qpass" in k}
    return {"losses": torch.stack(losses), "parameters": full_parameters(owner), "report": report_rows(reported),
            "states": {k.removeprefix("module."): v for k, v in states.items()}}


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
