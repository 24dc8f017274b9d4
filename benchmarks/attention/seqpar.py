"""Ring (zigzag) and Ulysses attention on W ranks versus one process: time per forward + backward.

Spawns W gloo ranks on CPU (one thread each) or NCCL ranks on GPUs. For each sequence length it times, as the
median of ``--repeats`` runs after a warm-up:
  * one process over the whole sequence: blockwise attention (ring's local kernel) and sdpa (Ulysses' kernel),
    measured on rank 0 while the other ranks wait, so the baseline has a core of its own;
  * ring and Ulysses on W ranks (every rank times; the slowest rank counts);
  * the communication alone, the same messages without the attention: the ring's K/V and dK/dV passes and
    Ulysses' eight all-to-alls (four forward, four backward).
Ratios: speedup = one-process time / W-rank time; efficiency = speedup / W; comm share = communication / total.

    nice -n 10 .venv/bin/python benchmarks/attention/seqpar.py --lengths 1024 2048 4096 --repeats 5

Writes ``benchmarks/attention/results/seqpar.json`` and ``seqpar.md`` (``--render``: only the ``.md``, from the
``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from longkit.attention import blockwise_attention, ring_attention, ulysses_attention
from longkit.attention.masks import MaskSpec
from longkit.attention.ring import _TAG_GRAD, _TAG_KV, _Ring
from longkit.attention.sequence_parallel import default_backend, shard
from longkit.attention.ulysses import _all_to_all

RESULTS = Path(__file__).parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats, device, barrier=False):
    fn()
    times = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(attn, q, k, v):
    def run():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = attn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def _worker(rank, world, init_file, args, out_path):
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(default_backend(device), init_method=f"file://{init_file}", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    rows = []
    for T in args.lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (
            torch.randn(args.batch, h, T, args.dim, generator=g).to(device, dtype)
            for h in (args.heads, args.kv_heads, args.kv_heads)
        )
        row = {"T": T}
        blk = dict(block_q=args.block, block_k=args.block)
        if rank == 0:
            row["single_blockwise_s"] = _median_time(
                _fwd_bwd(lambda a, b, c, blk=blk: blockwise_attention(a, b, c, MaskSpec(causal=True), **blk), q, k, v),
                args.repeats,
                device,
            )
            row["single_sdpa_s"] = _median_time(
                _fwd_bwd(
                    lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True), q, k, v
                ),
                args.repeats,
                device,
            )
        dist.barrier()
        zq, zk, zv = (shard(x, dim=2) for x in (q, k, v))
        cq, ck, cv = (shard(x, dim=2, layout="contiguous") for x in (q, k, v))
        ring_s = _median_time(
            _fwd_bwd(lambda a, b, c, blk=blk: ring_attention(a, b, c, **blk), zq, zk, zv),
            args.repeats,
            device,
            barrier=True,
        )
        uly_s = _median_time(_fwd_bwd(ulysses_attention, cq, ck, cv), args.repeats, device, barrier=True)

        def ring_comm(zk=zk, zv=zv):
            ring = _Ring(None)
            kv = (zk, zv)
            # forward: W - 1 K/V hops; backward: W - 1 K/V hops and W float32 dK/dV hops
            for _ in range(world - 1):
                kv = ring.start(kv, _TAG_KV).wait()
            for _ in range(world - 1):
                kv = ring.start(kv, _TAG_KV).wait()
            grads = (zk.float(), zv.float())
            for _ in range(world):
                grads = ring.start(grads, _TAG_GRAD).wait()

        # forward q, k, v, out and their inverses in the backward
        def ulysses_comm(xs=(cq, ck, cv, cq, cq, ck, cv, cq)):
            for x in xs:
                _all_to_all(x, 1, 2, None)

        ring_comm_s = _median_time(ring_comm, args.repeats, device, barrier=True)
        uly_comm_s = _median_time(ulysses_comm, args.repeats, device, barrier=True)
        # The slowest rank sets the pace.
        timings = torch.tensor([ring_s, uly_s, ring_comm_s, uly_comm_s], dtype=torch.float64)
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)
        row.update(
            ring_s=timings[0].item(),
            ulysses_s=timings[1].item(),
            ring_comm_s=timings[2].item(),
            ulysses_comm_s=timings[3].item(),
        )
        if rank == 0:
            row["ring_speedup"] = row["single_blockwise_s"] / row["ring_s"]
            row["ulysses_speedup"] = row["single_sdpa_s"] / row["ulysses_s"]
            row["ring_efficiency"] = row["ring_speedup"] / world
            row["ulysses_efficiency"] = row["ulysses_speedup"] / world
            row["ring_comm_share"] = row["ring_comm_s"] / row["ring_s"]
            row["ulysses_comm_share"] = row["ulysses_comm_s"] / row["ulysses_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    # Every rank is done before any tears gloo/NCCL down, so no peer loses a message still in flight.
    dist.barrier()
    dist.destroy_process_group()


def _markdown(meta, rows):
    lines = [
        f"# Ring (zigzag) and Ulysses attention, {meta['world']} ranks vs one process",
        "",
        f"Forward + backward, causal, B={meta['batch']}, H={meta['heads']}, H_kv={meta['kv_heads']}, "
        f"D={meta['dim']}, {meta['dtype']}, {meta['device']} ({meta['backend']}), {meta['threads']} thread(s) per "
        f"rank, median of {meta['repeats']}. {meta['note']}",
        "",
        "| T | 1 proc blockwise (s) | ring (s) | ring speedup | ring comm share | 1 proc sdpa (s) | ulysses (s) "
        "| ulysses speedup | ulysses comm share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['single_blockwise_s']:.3f} | {r['ring_s']:.3f} | {r['ring_speedup']:.2f}x | "
            f"{r['ring_comm_share']:.0%} | {r['single_sdpa_s']:.3f} | {r['ulysses_s']:.3f} | "
            f"{r['ulysses_speedup']:.2f}x | {r['ulysses_comm_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the one process)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--out", default=str(RESULTS / "seqpar"), help="results path without extension")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(_markdown(data["meta"], data["rows"]))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_path = os.path.join(tmp, "store"), os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world, init_file, args, out_path), nprocs=args.world, join=True)
        rows = json.loads(Path(out_path).read_text())
    meta = {
        k: getattr(args, k)
        for k in (
            "world",
            "batch",
            "heads",
            "kv_heads",
            "dim",
            "block",
            "dtype",
            "repeats",
            "threads",
            "device",
            "note",
        )
    }
    meta.update(
        backend=default_backend(args.device),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        load_avg=os.getloadavg(),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(meta, rows))
    print(_markdown(meta, rows))


if __name__ == "__main__":
    main()
