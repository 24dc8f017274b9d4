"""The native single-query decode attention against a plain read of the same bytes, old and new loops in one process.

    OMP_WAIT_POLICY=passive nice -n 19 .venv/bin/python benchmarks/decode/attend_kernel.py \
        [--lengths 2048,8192,32768] [--threads 1,2] [--layers 30] [--rounds 9] [--kernels v1,blocked-dot,blocked] \
        [--name attend_kernel]

A compiled decode step calls :func:`longkit.kvcache.decode_native.decode_attend` once per layer for one query token
over a dense bf16 cache. This script times that call on SmolLM2-135M's attention shape (head dim 64, 9 query heads on
3 kv heads, so 3 query heads per kv head) over ``--layers`` separate K/V tensors per context length (30: one decode
step's worth, 47 MB at 2K, so the data comes from memory, not from the cache of the previous call), and one pass of
each variant reads every layer once:

- ``read``: ``k.view(torch.float32).sum()`` and the same of ``v`` per layer: torch's float32 sum over the same bytes
  (the bf16 pairs read as float32 words; the yardstick for "reading the cache", as decode.py's bandwidth probe);
- one row per ``--kernels`` entry: the kernel with that loop layout (``v1``: the general loops; ``blocked-dot``: the
  register-blocked bf16 loops with prefetch, scores by the bf16 dot instruction; ``blocked``: the same with the
  scores of full blocks by the AMX tile unit where the CPU has one; see the module).

Rounds alternate the variants (order rotated), round 0 a warm-up. Per round and variant the wall time and the CPU
time of the process (``time.process_time``: on a shared, CPU-capped machine it leaves out the time the process waited
for its share) are recorded; the table gives medians and each variant's time over the same round's ``read`` (median
of the per-round ratios). Writes ``results/<name>.json`` and ``.md``; ``--render`` redraws the ``.md`` from the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import decode  # noqa: E402  (the sibling benchmark: its reader of committed results)

#: SmolLM2-135M's attention: head dim, query heads, kv heads
HEAD_DIM, HEADS, KV_HEADS = 64, 9, 3


def build(variant: str, ks: list, vs: list, q):
    """A callable doing one pass of ``variant`` over every layer's ``ks[i]``, ``vs[i]``."""
    import torch

    if variant == "read":
        return lambda: [(k.view(torch.float32).sum(), v.view(torch.float32).sum()) for k, v in zip(ks, vs, strict=True)]
    from longkit.kvcache import decode_native

    ok = decode_native.available(q, ks[0])
    if ok is not True:
        raise SystemExit(f"error: the native kernel is not available: {ok}")
    return lambda: [decode_native.decode_attend(q, k, v, kernel=variant) for k, v in zip(ks, vs, strict=True)]


def measure(args) -> dict:
    import torch

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    variants = ["read", *kernels]
    lengths = [int(x) for x in args.lengths.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    wall, cpu, nbytes = {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        # random bf16 keys and values (the values do not change the time, the bytes do; no zeros, so the float32
        # view of the read has no denormals), one query token
        ks = [torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(args.layers)]
        vs = [torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(args.layers)]
        q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(torch.bfloat16)
        nbytes[str(length)] = 2 * sum(k.numel() * k.element_size() for k in ks)
        fns = {v: build(v, ks, vs, q) for v in variants}
        for n in threads:
            key = f"{length}/{n}"
            torch.set_num_threads(n)
            print(f"measuring {length} tokens, {n} thread(s)", file=sys.stderr, flush=True)
            with torch.inference_mode():
                wall[key], cpu[key] = decode.interleaved(fns, args.rounds)
        del ks, vs, fns
    return {"wall_ms": wall, "cpu_ms": cpu, "bytes": nbytes}


def rows_of(data: dict) -> list[dict]:
    out = []
    for key, per in data["wall_ms"].items():
        length, threads = (int(x) for x in key.split("/"))
        for v, ms in per.items():
            cpu = data["cpu_ms"][key][v]
            out.append({"length": length, "threads": threads, "variant": v, "wall_ms": statistics.median(ms),
                        "wall_x_read": decode.median_ratio(ms, per["read"]), "cpu_ms": statistics.median(cpu),
                        "cpu_x_read": decode.median_ratio(cpu, data["cpu_ms"][key]["read"]),
                        "gb_s": data["bytes"][str(length)] / statistics.median(ms) / 1e6})  # fmt: skip
    return out


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# Native decode attention against a plain read of the same bytes (bf16, head dim {HEAD_DIM}, {HEADS} "
        f"query heads on {KV_HEADS} kv heads, {meta['layers']} layers, {meta['rounds']} rounds)",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}; CPU capability {meta['cpu_capability']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"load average {meta['load_before']} before / {meta['load_after']} after; {meta.get('note') or 'no note'}. "
        "One pass = every layer's K and V once (MB per pass); `read` = `k.view(torch.float32).sum()` and the same "
        "of `v` per layer (a float32 sum over the same bytes); x read = the pass's time / the same round's `read` "
        "pass, median over rounds, by wall time and by the process's CPU time. On a shared or capped CPU (see the note) "
        "compare ratios, not milliseconds; GB/s = bytes / median wall time.",
        "",
        "| tokens | threads | MB per pass | variant | wall ms | x read (wall) | CPU ms | x read (CPU) | GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_of(data):
        lines.append(
            f"| {r['length']} | {r['threads']} | {data['bytes'][str(r['length'])] / 1e6:.1f} | {r['variant']} | "
            f"{r['wall_ms']:.2f} | {r['wall_x_read']:.2f} | {r['cpu_ms']:.2f} | {r['cpu_x_read']:.2f} | "
            f"{r['gb_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode.add_kernel_arguments(ap, "v1,blocked-dot,blocked", "separate K/V tensors")
    decode.add_results_arguments(ap, "attend_kernel")
    args = ap.parse_args(argv)
    if decode.rendered(args, markdown):
        return
    out = args.out or RESULTS
    from longkit.kvcache.decode_native import KERNELS

    decode.check_kernel_arguments(args, KERNELS)

    load_before = os.getloadavg()
    got = measure(args)
    meta = decode.run_meta("attend_kernel.py", argv, load_before, args.note, layers=args.layers, rounds=args.rounds)
    data = {"meta": meta, **got}
    decode.saved(data, out, args.name, markdown)


if __name__ == "__main__":
    main()
