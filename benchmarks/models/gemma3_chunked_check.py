"""Is the Gemma 3 grid's prefill route exact on the real model? A chunked prefill (the grid's rows without a KV
method prefill in 4,096-token chunks) against one full prefill, under Self-Extend, DCA and no method.

Gemma 3 270M (``gemma3-270m``, float32, sliding and full-attention layers, per-layer-type RoPE), one random prompt
of 8,229 tokens (beyond two chunks, not a multiple of the chunk), the next-token logits of both routes compared:
the largest absolute difference, relative to the largest logit, and whether the greedy token is the same. DCA with
chunk 3,072 and local window 1,024 so that its chunking acts at this length (the grid's 24,576 would not).

    python benchmarks/models/gemma3_chunked_check.py     # ~3 min on 2 cores; writes results/gemma3_chunked_check.{json,md}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import longkit
from longkit.runtime.chunked_prefill import chunked_prefill

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "gemma3_chunked_check"
LENGTH, CHUNK = 8192 + 37, 4096
SPECS = {"baseline": {}, "self_extend": {"attention": "self_extend:group_size=5,window=2048"},
         "dca": {"attention": "dca:chunk_size=3072,local_window=1024"}}


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# Chunked vs full prefill on {m['model']} ({m['dtype']}), {m['length']} tokens, chunks of {m['chunk']}", "",
             "`python benchmarks/models/gemma3_chunked_check.py`", "",
             f"torch {m['torch']}, CPU capability {m['cpu']}, {m['threads']} threads. One random prompt (seed 0); the "
             "next-token logits of a chunked prefill against one full prefill, under each method.", "",
             "| method | max abs diff | relative to max logit | same greedy token | full prefill s | chunked prefill s |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| `{r['method']}` | {r['max_abs_diff']:.3g} | {r['relative']:.3g} | {'yes' if r['same_argmax'] else 'no'} | "
                     f"{r['full_s']:.1f} | {r['chunked_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.manual_seed(0)
    model = longkit.load_model("gemma3-270m", dtype="float32").model.eval()
    ids = torch.randint(1000, 200000, (1, LENGTH))
    rows = []
    for name, spec in SPECS.items():
        with longkit.apply(model, **spec) as ctx, torch.inference_mode():
            t0 = time.perf_counter()
            full = model(ids, use_cache=True, cache=ctx.new_cache(), logits_to_keep=1).logits[0, -1].float()
            t1 = time.perf_counter()
            chunked = chunked_prefill(model, ids, ctx.new_cache(), chunk_size=CHUNK).logits[0, -1].float()
            t2 = time.perf_counter()
        diff = float((full - chunked).abs().max())
        rows.append({"method": ":".join(spec.values()) or name, "max_abs_diff": diff,
                     "relative": diff / float(full.abs().max()), "same_argmax": bool(full.argmax() == chunked.argmax()),
                     "full_s": t1 - t0, "chunked_s": t2 - t1})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": "gemma3-270m", "dtype": "float32", "length": LENGTH, "chunk": CHUNK, "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    data = {"meta": meta, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
