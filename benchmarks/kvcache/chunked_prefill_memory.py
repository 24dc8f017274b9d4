"""Chunked prefill with compression: peak memory and KV bytes versus prompt length, against the full cache.

For each prompt length the prompt is prefilled in chunks of ``--chunk`` tokens into (a) a full DynamicCache and
(b) a SnapKV cache compressed to ``--budget`` tokens between chunks, ``--repeats`` times; the table shows
medians. The model is loaded once; every run happens in a process forked from that one, so memory the allocator
kept from an earlier run cannot hide the next run's peak (and no run pays for importing torch again). Peak memory is the resident-set peak above the level at the start of the prefill (sampled every 5 ms
on CPU, the allocator's peak on CUDA); KV bytes are ``cache_nbytes`` after the prefill.

    nice -n 10 .venv/bin/python benchmarks/kvcache/chunked_prefill_memory.py --lengths 2k,4k,8k,16k

Writes ``benchmarks/kvcache/results/chunked_prefill_memory.json`` and ``.md`` (``--render``: only the ``.md``, from
the ``.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def one(model, length: int, chunk: int, method: str | None) -> dict:
    """One prefill: peak memory above the start, KV bytes, seconds."""
    import torch

    import longkit
    from longkit.kvcache import cache_nbytes
    from longkit.runtime.chunked_prefill import chunked_prefill
    from longkit.runtime.generate import PeakMemory

    g = torch.Generator().manual_seed(length)
    device = next(model.parameters()).device
    ids = torch.randint(0, min(model.config.vocab_size, 256), (1, length), generator=g).to(device)
    with torch.inference_mode(), longkit.apply(model, kv=method) as applied:
        cache = applied.new_cache()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            chunked_prefill(model, ids, cache, chunk)
            seconds = time.perf_counter() - t0
        kv = cache_nbytes(cache)
    del cache
    return {"peak_bytes": mem.peak_bytes, "kv_bytes": kv, "seconds": seconds}


def _forked(model, length: int, chunk: int, method: str | None) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        send.send(one(model, length, chunk, method))

    proc = ctx.Process(target=child)
    proc.start()
    out = recv.recv()
    proc.join()
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    """results/chunked_prefill_memory.md from the run's ``meta`` and ``rows``."""
    lines = [
        f"chunked prefill, {meta['model']}, chunk {meta['chunk']}, SnapKV budget {meta['budget']} tokens, "
        f"medians of {meta['repeats']} runs",
        "",
        "| tokens | cache | KV MiB | peak MiB | prefill s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['method']} | {r['kv_bytes'] / 2**20:.2f} | "
            f"{r['peak_bytes_median'] / 2**20:.1f} | {r['seconds_median']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--lengths", default="2k,4k,8k,16k")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    args = ap.parse_args()
    if args.render:
        data = json.loads((RESULTS / "chunked_prefill_memory.json").read_text())
        (RESULTS / "chunked_prefill_memory.md").write_text(markdown(data["meta"], data["rows"]))
        return

    import torch

    import longkit

    # One thread: OpenMP pools do not survive fork().
    torch.set_num_threads(1)
    model = longkit.load_model(args.model, dtype=args.dtype).model
    methods = {"snapkv": f"snapkv:tokens={args.budget}", "full": None}
    rows = []
    for length in (_length(x) for x in args.lengths.split(",")):
        for label, method in methods.items():
            runs = [_forked(model, length, args.chunk, method) for _ in range(args.repeats)]
            rows.append(
                {
                    "length": length,
                    "method": method or label,
                    "kv_bytes": runs[0]["kv_bytes"],
                    "peak_bytes_median": statistics.median(r["peak_bytes"] for r in runs),
                    "seconds_median": statistics.median(r["seconds"] for r in runs),
                    "runs": runs,
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "chunk": args.chunk,
        "budget": args.budget,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    (RESULTS / "chunked_prefill_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "chunked_prefill_memory.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows), end="")


if __name__ == "__main__":
    main()
