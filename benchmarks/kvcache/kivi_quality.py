"""KIVI on a real model: what 2-/4-bit KV storage costs in next-token quality, what it saves in bytes.

    nice -n 10 .venv/bin/python benchmarks/kvcache/kivi_quality.py [--model smollm2-135m] [--context 2048]

A ``--context``-token slice of Python's documentation is prefilled into the cache, then the next ``--score``
tokens are fed one at a time through the cache (teacher forcing), so every scored token attends to the KV cache
as decoding would. Reported per cache: mean NLL and perplexity of the scored tokens, the share of next-token
argmaxes equal to the full-precision cache's, the largest logit difference from it, the cache's exact bytes after
the run, and the median decode time per token (3 repeats, ratios to the full-precision cache of the same run; the
machine may be shared, so only ratios are meaningful). Writes ``results/kivi_quality.json`` and ``.md``
(``--render``: only the ``.md``, from the ``.json`` and the hand-written ``kivi_quality.notes.md`` appended to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CACHES = [
    ("full precision", None),
    ("kivi:bits=4", "kivi:bits=4,group_size=32,residual=128"),
    ("kivi:bits=2", "kivi:bits=2,group_size=32,residual=128"),
    ("kivi:bits=2,residual=32", "kivi:bits=2,group_size=32,residual=32"),
    ("kivi:bits=2 + snapkv 0.25", "kivi:bits=2,group_size=32,residual=128,evict=snapkv,ratio=0.25"),
    ("snapkv 0.25", "snapkv:ratio=0.25"),
]


def run(model, ids: torch.Tensor, n_ctx: int, spec: str | None):
    import longkit
    from longkit.kvcache import cache_nbytes

    with torch.inference_mode(), longkit.apply(model, kv=spec) if spec else longkit.apply(model) as applied:
        cache = applied.new_cache()
        model(ids[:, :n_ctx], cache=cache, use_cache=True, logits_to_keep=1)
        logits, times = [], []
        for i in range(n_ctx, ids.shape[1]):
            t0 = time.perf_counter()
            out = model(ids[:, i : i + 1], cache=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            logits.append(out.logits[0, -1].float())
        return torch.stack(logits), cache_nbytes(cache), statistics.median(times)


def markdown(meta: dict, rows: list[dict], notes: Path | None = None) -> str:
    """results/kivi_quality.md from the run's ``meta`` and ``rows``, then the ``notes`` file if it exists."""
    lines = [
        f"# KIVI on {meta['model']} ({meta['dtype']}): {meta['context']}-token context, {meta['scored_tokens']} "
        "teacher-forced decode steps",
        "",
        f"`{meta['command']}`; transformers {meta['transformers']}, torch {meta['torch']}. Decode time: median of "
        f"{meta['repeats']} repeats per token, shared CPU (ratios only).",
        "",
        "| cache | NLL | PPL | argmax = full cache | max logit diff | KV bytes | bytes vs full | decode ms/token | "
        "decode vs full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['nll']:.4f} | {r['ppl']:.3f} | {100 * r['argmax_agreement']:.1f}% | "
            f"{r['max_logit_diff']:.3f} | {r['kv_bytes']:,} | {r['bytes_ratio']:.3f} | {r['decode_ms_median']:.1f} | "
            f"{r['decode_ratio']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    # Hand-written notes on the run (e.g. the machine's load) live beside it and stay under a redrawn table.
    return table + "\n" + notes.read_text() if notes is not None and notes.is_file() else table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--score", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/kivi_quality.md from its .json")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads((args.out / "kivi_quality.json").read_text())
        md = markdown(data["meta"], data["rows"], args.out / "kivi_quality.notes.md")
        (args.out / "kivi_quality.md").write_text(md)
        return

    import transformers

    import longkit
    from longkit.eval.haystack import haystack_text

    torch.set_num_threads(args.threads)
    lm = longkit.load_model(args.model)
    text = haystack_text()
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[
        :, : args.context + args.score + 1
    ]
    n_ctx = args.context
    targets = ids[0, n_ctx + 1 : n_ctx + args.score + 1]
    rows, ref = [], None
    for label, spec in CACHES:
        per_rep = []
        for _ in range(args.repeats):
            logits, nbytes, step = run(lm.model, ids[:, : n_ctx + args.score], n_ctx, spec)
            per_rep.append(step)
        # logits[j] predicts token n_ctx + j + 1
        nll = torch.nn.functional.cross_entropy(logits[: len(targets)], targets).item()
        if ref is None:
            ref = logits
        rows.append(
            {
                "cache": label,
                "spec": spec or "baseline",
                "nll": nll,
                "ppl": float(torch.exp(torch.tensor(nll))),
                "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                "max_logit_diff": float((logits - ref).abs().max()),
                "kv_bytes": nbytes,
                "decode_ms_median": 1000 * statistics.median(per_rep),
            }
        )
        print(f"{label}: nll {nll:.4f} bytes {nbytes}", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["bytes_ratio"] = r["kv_bytes"] / base["kv_bytes"]
        r["decode_ratio"] = r["decode_ms_median"] / base["decode_ms_median"]
    meta = {
        "model": args.model,
        "dtype": str(lm.model.dtype),
        "context": n_ctx,
        "scored_tokens": len(targets),
        "repeats": args.repeats,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "command": "python benchmarks/kvcache/kivi_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kivi_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "kivi_quality.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows), end="")


if __name__ == "__main__":
    main()
