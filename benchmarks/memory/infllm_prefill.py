"""InfLLM's prefill with its fused chunk attention against its float32 reference, and against a plain full-attention
prefill of the same prompt (issue #22: the grid's InfLLM rows at 64K and 128K must be affordable on a CPU).

One model (SmolLM2-135M by default, bfloat16), one random prompt of ``--length`` tokens, prefilled in chunks of
``--chunk`` tokens (InfLLM's execution chunk) under ``memory=infllm`` with ``impl=flash`` and ``impl=reference``,
and in one sdpa forward without any method (``full``). Rows are interleaved over ``--rounds`` rounds; the table gives
medians, each row's ratio to ``full`` and to the reference, and whether the flash row's last logits pick the same
token as the reference's. Writes ``results/infllm_prefill.{json,md}`` (``--name`` to change)::

    python benchmarks/memory/infllm_prefill.py --length 8192 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = ("full", "infllm flash", "infllm reference")


def prefill(lm, ids: torch.Tensor, row: str, chunk: int) -> tuple[float, torch.Tensor]:
    import longkit
    from longkit.runtime.chunked_prefill import chunked_prefill

    model = lm.model
    t0 = time.perf_counter()
    with torch.inference_mode():
        if row == "full":
            logits = model(ids, logits_to_keep=1).logits
        else:
            impl = row.split()[1]
            with longkit.apply(model, memory="infllm", memory_args={"impl": impl}) as applied:
                logits = chunked_prefill(model, ids, applied.new_cache(), chunk).logits
    return time.perf_counter() - t0, logits[0, -1].float()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (> InfLLM's n_local 4096 to retrieve)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (InfLLM's execution chunk)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--name", default="infllm_prefill")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or args.length < 1 or args.chunk < 1 or args.rounds < 1:
        sys.exit(f"error: --rows must name {', '.join(ROWS)} (got {bad}); --length, --chunk, --rounds >= 1")

    import longkit

    lm = longkit.load_model(args.model, dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, lm.model.config.vocab_size, (1, args.length), generator=g)
    times: dict[str, list[float]] = {r: [] for r in rows}
    last: dict[str, torch.Tensor] = {}
    for rnd in range(args.rounds):
        for r in rows:
            s, last[r] = prefill(lm, ids, r, args.chunk)
            times[r].append(s)
            print(f"round {rnd}: {r} {s:.2f} s", flush=True)
    med = {r: statistics.median(t) for r, t in times.items()}
    run = {"model": args.model, "dtype": args.dtype, "length": args.length, "chunk": args.chunk, "rounds": args.rounds,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "seconds": times, "median_s": med}
    if "infllm flash" in last and "infllm reference" in last:
        a, b = last["infllm flash"], last["infllm reference"]
        run["same_next_token"] = bool(a.argmax() == b.argmax())
        run["logits_max_abs_diff"] = float((a - b).abs().max())
    lines = [f"# InfLLM prefill: fused chunk attention vs its reference ({args.model}, {args.dtype})", "",
             f"`python benchmarks/memory/infllm_prefill.py --length {args.length} --chunk {args.chunk} --rounds "
             f"{args.rounds}`; CPU {run['cpu_capability']}, {run['threads']} threads, load average at the end "
             f"{run['load_average'][0]:.1f}; medians of {args.rounds} interleaved rounds.", "",
             "| row | prefill s | / full | / reference |", "|---|---|---|---|"]
    for r in rows:
        full = f"{med[r] / med['full']:.2f}" if "full" in med else "-"
        ref = f"{med[r] / med['infllm reference']:.2f}" if "infllm reference" in med else "-"
        lines.append(f"| {r} | {med[r]:.2f} | {full} | {ref} |")
    if "same_next_token" in run:
        lines += ["", f"Last position, flash vs reference: same next token {run['same_next_token']}, logits within "
                      f"{run['logits_max_abs_diff']:.3g}."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(run, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
