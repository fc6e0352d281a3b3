"""Train a small Llama in FP8 under FSDP2, on as many CPU processes as torchrun starts (gloo).

    torchrun --nproc-per-node 2 examples/fsdp_train.py            # or --steps, --recipe, ...

A byte-level Llama-style causal LM (Hugging Face transformers, random init, nothing downloaded)
learns the text of Python's own help topics (``pydoc_data.topics``), the data of examples/demo.py.
Each decoder layer and then the model are sharded by ``fully_shard``; ``qpass.compile`` then
compiles each FSDP2 unit on its own and quantizes it as the recipe says. Every rank takes its own
slice of each global batch; per-tensor scales are the MAX over the ranks (one scale for the global
batch), FP8 weights are all-gathered as their codes, and gradients reduce-scatter as FSDP2 does.
Rank 0 prints progress and ``qpass.report``; with ``--checkpoint DIR`` the run is saved there with
``torch.distributed.checkpoint`` (``qpass.dcp``), which any world size loads.
"""

from __future__ import annotations

import argparse
import os
import time
from pydoc_data.topics import topics

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import qpass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fp8-train", help="a qpass training recipe")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the ranks")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", default=None, help="save the trained model here with DCP")
    return parser.parse_args(argv)


def text_batches(batch: int, seq: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` global batches of byte sequences from Python's help topics, the same on every rank."""
    data = torch.tensor(list("\n".join(topics.values()).encode()), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (steps, batch), generator=generator)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    torch.manual_seed(0)  # the same initial weights on every rank
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 32, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model = qpass.compile(model, args.recipe, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    for step, ids in enumerate(text_batches(args.batch, args.seq, args.steps)):
        share = ids.chunk(world)[rank]
        loss = model(share, labels=share).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)  # the global batch's loss: the mean of the ranks'
        losses.append(loss.item() / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.1f} s", flush=True)
    if rank == 0:
        print(qpass.report(model))
    if args.checkpoint:
        qpass.dcp.save(model, args.checkpoint)
        if rank == 0:
            print(f"saved to {args.checkpoint} (torch.distributed.checkpoint)")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each rank one core
    main()
