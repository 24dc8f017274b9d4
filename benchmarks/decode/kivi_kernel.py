"""KIVI's native packed decode attention against the dense bf16 kernel and a plain read of the packed bytes.

    OMP_WAIT_POLICY=passive nice -n 19 .venv/bin/python benchmarks/decode/kivi_kernel.py \
        [--lengths 2048,8192,32768] [--bits 2,4] [--threads 1,2] [--layers 30] [--rounds 9] [--kernels v1,blocked-vec,blocked] \
        [--name kivi_kernel]

A KIVI decode step calls :func:`longkit.kvcache.kivi_native.kivi_decode_native` once per layer for one query token
over the layer's packed 2-/4-bit keys and values (issue 24: it should beat the full bf16 cache, whose bytes it reads
about a quarter of at 2 bits). This script times that call on SmolLM2-135M's attention shape (head dim 64, 9 query
heads on 3 kv heads) over ``--layers`` separate KIVI layers per context length and bit width (KIVI's defaults: group
size 32, residual 128, float16 scales; bf16 residual), so the data comes from memory, not from the cache of the
previous call. One pass of each variant reads every layer once:

- ``read``: ``.view(torch.float32).sum()`` of each layer's packed codes, key and value scales and zeros (torch's
  float32 sum over the packed bytes read as float32 words, as attend_kernel.py's read of the dense cache: the
  yardstick for "reading the packed cache"; an integer sum was 2-3x slower than this, not a read at the bandwidth;
  the small bf16 residual is left out);
- ``dense``: :func:`longkit.kvcache.decode_native.decode_attend` (``kernel="blocked"``, the one that reads at the
  bandwidth) over a dense bf16 cache of the same length and shape (30 layers' own K/V);
- one row per ``--kernels`` entry: the packed kernel with that loop layout (``v1``: the first loops;
  ``blocked-vec``: 16-token blocks with prefetch on the vector units; ``blocked``: the same with the multiply-adds
  by the AMX tile unit where the CPU has one; see the module).

Rounds alternate the variants (order rotated), round 0 a warm-up. Per round and variant the wall time and the CPU
time of the process (``time.process_time``: on a shared, CPU-capped machine it leaves out the time the process waited
for its share, so the CPU-time ratios are what counts there) are recorded; the table gives medians and each variant's
time over the same round's ``dense`` and ``read`` passes (medians of the per-round ratios). Writes
``results/<name>.json`` and ``.md``; ``--render`` redraws the ``.md`` from the JSON.
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

import decode  # noqa: E402  (the sibling benchmark: its reader and writer of results)

#: SmolLM2-135M's attention: head dim, query heads, kv heads; KIVI's default group size and residual
HEAD_DIM, HEADS, KV_HEADS, GROUP, RESIDUAL = 64, 9, 3, 32, 128
#: the packed tensors of a KIVI layer that ``read`` sums
PACKED = ("qkeys", "qvalues", "k_scale", "k_zero", "v_scale", "v_zero")


def kivi_layers(length: int, bits: int, layers: int, gen) -> list:
    """``layers`` KIVI layers (bf16) that each saw ``length`` random tokens in one prefill."""
    import torch

    from longkit.kvcache.kivi import KIVILayer

    out = []
    for _ in range(layers):
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16)
        v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16)
        layer = KIVILayer(bits, GROUP, RESIDUAL)
        layer.update(k, v)
        out.append(layer)
    return out


def packed_bytes(layer) -> int:
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in PACKED)


def build(variant: str, layers: list, ks: list, vs: list, q):
    """A callable doing one pass of ``variant`` over every layer."""
    import torch

    from longkit.kvcache import decode_native, kivi_native

    if variant == "read":
        tensors = [getattr(layer, n) for layer in layers for n in PACKED]
        return lambda: [t.view(torch.float32).sum() for t in tensors]
    if variant == "dense":
        return lambda: [decode_native.decode_attend(q, k, v, kernel="blocked") for k, v in zip(ks, vs, strict=True)]
    ok = kivi_native.available(layers[0], q)
    if ok is not True:
        raise SystemExit(f"error: the native KIVI kernel is not available: {ok}")
    return lambda: [kivi_native.kivi_decode_native(layer, q, kernel=variant) for layer in layers]


def measure(args) -> dict:
    import torch

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    variants = ["read", "dense", *kernels]
    lengths = [int(x) for x in args.lengths.split(",")]
    bits_list = [int(x) for x in args.bits.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    wall, cpu, nbytes, dense_bytes = {}, {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(torch.bfloat16)
    for length in lengths:
        # the dense cache's own random bf16 K/V (no zeros: nothing denormal)
        ks = [torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(args.layers)]
        vs = [torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(args.layers)]
        dense_bytes[str(length)] = 2 * sum(k.numel() * k.element_size() for k in ks)
        for bits in bits_list:
            print(f"building {args.layers} KIVI {bits}-bit layers of {length} tokens", file=sys.stderr, flush=True)
            layers = kivi_layers(length, bits, args.layers, gen)
            nbytes[f"{length}/{bits}"] = sum(packed_bytes(layer) for layer in layers)
            fns = {v: build(v, layers, ks, vs, q) for v in variants}
            for n in threads:
                key = f"{length}/{bits}/{n}"
                torch.set_num_threads(n)
                print(f"measuring {length} tokens, {bits} bits, {n} thread(s)", file=sys.stderr, flush=True)
                with torch.inference_mode():
                    wall[key], cpu[key] = decode.interleaved(fns, args.rounds)
            del layers, fns
        del ks, vs
    return {"wall_ms": wall, "cpu_ms": cpu, "bytes": nbytes, "dense_bytes": dense_bytes}


def rows_of(data: dict) -> list[dict]:
    out = []
    for key, per in data["wall_ms"].items():
        length, bits, threads = (int(x) for x in key.split("/"))
        cpu = data["cpu_ms"][key]
        for v, ms in per.items():
            out.append({"length": length, "bits": bits, "threads": threads, "variant": v,
                        "wall_ms": statistics.median(ms), "cpu_ms": statistics.median(cpu[v]),
                        "wall_x_dense": decode.median_ratio(ms, per["dense"]), "cpu_x_dense": decode.median_ratio(cpu[v], cpu["dense"]),
                        "cpu_x_read": decode.median_ratio(cpu[v], cpu["read"])})  # fmt: skip
    return out


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# KIVI's native packed decode attention against the dense bf16 kernel and a read of the packed bytes (head "
        f"dim {HEAD_DIM}, {HEADS} query heads on {KV_HEADS} kv heads, group size {GROUP}, residual {RESIDUAL}, "
        f"{meta['layers']} layers, {meta['rounds']} rounds)",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}; CPU capability {meta['cpu_capability']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"load average {meta['load_before']} before / {meta['load_after']} after; {meta.get('note') or 'no note'}. "
        "One pass = every layer once; `read` = `.view(torch.float32).sum()` of each layer's packed codes, scales and "
        'zeros (MB packed = those bytes per pass); `dense` = `decode_native.decode_attend(kernel="blocked")` over a '
        "dense bf16 cache of the same length (MB dense per pass); the other rows the packed kernel's loop layouts. "
        "x dense / x read = the pass's time over the same round's `dense` / `read` pass, median over rounds. The CPU "
        "is shared and capped (see the note): **the CPU-time ratios are what counts**, not the milliseconds.",
        "",
        "| tokens | bits | threads | MB packed | MB dense | variant | wall ms | CPU ms | x dense (wall) | "
        "x dense (CPU) | x read (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_of(data):
        packed = data["bytes"][f"{r['length']}/{r['bits']}"] / 1e6
        dense = data["dense_bytes"][str(r["length"])] / 1e6
        lines.append(
            f"| {r['length']} | {r['bits']} | {r['threads']} | {packed:.1f} | {dense:.1f} | {r['variant']} | "
            f"{r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | {r['wall_x_dense']:.2f} | {r['cpu_x_dense']:.2f} | "
            f"{r['cpu_x_read']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode.add_kernel_arguments(ap, "v1,blocked-vec,blocked", "separate layers")
    ap.add_argument("--bits", default="2,4", help="KIVI code widths, comma-separated (2, 4)")
    decode.add_results_arguments(ap, "kivi_kernel")
    args = ap.parse_args(argv)
    if decode.rendered(args, markdown):
        return
    out = args.out or RESULTS
    from longkit.kvcache.kivi_native import KERNELS

    decode.check_kernel_arguments(args, KERNELS, ("lengths", "bits", "threads"))
    if not {int(b) for b in args.bits.split(",")} <= {2, 4}:
        sys.exit(f"error: --bits takes 2 and/or 4 (got {args.bits!r})")

    load_before = os.getloadavg()
    got = measure(args)
    meta = decode.run_meta("kivi_kernel.py", argv, load_before, args.note, layers=args.layers, rounds=args.rounds)
    data = {"meta": meta, **got}
    decode.saved(data, out, args.name, markdown)


if __name__ == "__main__":
    main()
