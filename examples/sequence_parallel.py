"""Sequence-parallel prefill and one training step of a causal LM across ranks (ring or Ulysses attention).

    torchrun --nproc-per-node 2 examples/sequence_parallel.py --model tiny-llama --method ring --tokens 1024

NCCL is used when CUDA is available (one GPU per rank), gloo on CPU. Every rank loads the same model and the same
token ids; each computes attention for its shard of the sequence. Rank 0 prints the loss, the largest logit
difference against a single-process forward (``--check``), and the time of the sharded forward + backward.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import longkit
from longkit.attention import init_distributed, sequence_parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="a longkit model name or a local HF model directory")
    ap.add_argument("--method", default="ring", choices=["ring", "ulysses"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    ap.add_argument("--check", action="store_true", help="compare with a single-process forward on every rank")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    lm = longkit.load_model(args.model, dtype=args.dtype)
    model = lm.model.to(device)
    # The same ids on every rank: a fixed generator, not the global RNG.
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    with sequence_parallel(model, method=args.method) as sp:
        start = time.perf_counter()
        out = sp(ids, labels=ids)
        out.loss.backward()
        sp.sync_gradients()
        if device.startswith("cuda"):
            # CUDA kernels and NCCL collectives run asynchronously: wait for them before reading the clock.
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if args.check:
        model.zero_grad()
        with torch.no_grad():
            ref = model(input_ids=ids, labels=ids)
        diff = (out.logits.detach() - ref.logits).abs().max().item()
        if rank == 0:
            print(f"max |logits - single process| = {diff:.2e}, loss {out.loss.item():.4f} vs {ref.loss.item():.4f}")
    if rank == 0:
        print(
            f"{args.method} on {world} ranks ({dist.get_backend()}): {args.tokens} tokens, loss "
            f"{out.loss.item():.4f}, forward + backward {elapsed:.2f} s"
        )
    # Every rank is done before any tears gloo/NCCL down, so no peer loses a message still in flight.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
