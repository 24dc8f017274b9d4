"""SnapKV's observation window on the eval's passkey prompt: kvpress parity and a window sweep.

    # kvpress SnapKVPress vs longkit snapkv on the exact prompt `longkit eval --task passkey` builds
    nice -n 10 .venv/bin/python benchmarks/kvcache/snapkv_window_sweep.py parity --length 2048 --keeps 0.99,0.25
    # passkey accuracy: baseline and snapkv at one ratio for several windows (one process, one model load)
    nice -n 10 .venv/bin/python benchmarks/kvcache/snapkv_window_sweep.py sweep --lengths 2048,4096
    # evict only in some layers (keep everything elsewhere): which layers' evictions break the passkey
    nice -n 10 .venv/bin/python benchmarks/kvcache/snapkv_window_sweep.py layers --ratio 0.99 --spans 0-30,0-4,4-30

parity and sweep write ``results/snapkv_<mode>_<model>.json`` and ``.md``. The parity mode reuses the functions of
``kvpress_parity.py`` (same kept-set extraction and comparison) but feeds it the passkey task's prompt instead of the
harness's own, and also reports which needle tokens each side evicted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def passkey_prompt(tokenizer: Any, length: int, depth: float, sample: int = 0, seed: int = 0):
    """The plain-completion passkey sample of ``longkit eval`` (same seed, length, depth, sample)."""
    from longkit.eval.tasks import get_task
    from longkit.eval.tasks.base import TaskContext

    return get_task("passkey").build(TaskContext(tokenizer, seed=seed), length, depth, sample)


def needle_evictions(kept: list[list[list[int]]], needle: range) -> dict[str, Any]:
    """How many (layer, head) pairs evicted at least one needle token, and the most evicted needle positions."""
    heads, counts = 0, {}
    for layer in kept:
        for head in layer:
            gone = [p for p in needle if p not in set(head)]
            heads += bool(gone)
            for p in gone:
                counts[p] = counts.get(p, 0) + 1
    return {"heads_missing_needle_tokens": heads, "evicted_needle_positions": dict(sorted(counts.items()))}


def parity(args: argparse.Namespace) -> None:
    import torch
    from kvpress_parity import compare, run_kvpress, run_longkit, uncompressed_keys

    import longkit

    torch.manual_seed(0)
    lm = longkit.load_model(args.model, dtype="float32")
    tok = lm.tokenizer
    keeps = [float(k) for k in args.keeps.split(",")]
    rows, meta_runs = [], []
    for depth in [float(d) for d in args.depths.split(",")]:
        sample = passkey_prompt(tok, args.length, depth)
        prompt = list(sample.prompt.input_ids)
        ns = sample.prompt.needle_start
        # the needle sentence and its two copies of the digits: the first 22 tokens from needle_start
        needle = range(ns, ns + 22)
        with tempfile.TemporaryDirectory() as tmp:
            lm.model.save_pretrained(tmp)
            for window in [int(w) for w in args.windows.split(",")]:
                pair = {
                    "method": "snapkv",
                    "press": "snapkv",
                    "press_kwargs": {"window_size": window, "kernel_size": 5},
                    "longkit": {"window": window, "kernel": 5},
                }
                theirs = run_kvpress(Path(args.venv), tmp, prompt, [pair], keeps, args.new_tokens, args.timeout)
                ref = uncompressed_keys(lm.model, prompt)
                ours = run_longkit(lm, prompt, [pair], keeps, args.new_tokens, ref)
                t_by = {t["id"]: t for t in theirs["results"]}
                for row, o in zip(compare(ours, theirs["results"]), ours, strict=True):
                    t = t_by.get(o["id"], {})
                    row.update(
                        depth=depth,
                        window=window,
                        answer_longkit_text=tok.decode(o.get("answer") or []),
                        answer_kvpress_text=tok.decode(t.get("answer") or []),
                        gold=sample.answers,
                        longkit_needle=needle_evictions(o["kept"], needle) if o.get("kept") else None,
                        kvpress_needle=needle_evictions(t["kept"], needle) if t.get("kept") else None,
                    )
                    for k in ("kept_longkit", "kept_kvpress"):
                        row.pop(k, None)
                    rows.append(row)
                    print(
                        json.dumps(
                            {
                                k: row[k]
                                for k in (
                                    "depth",
                                    "window",
                                    "keep",
                                    "jaccard_mean",
                                    "identical_heads",
                                    "answer_longkit_text",
                                    "answer_kvpress_text",
                                )
                                if k in row
                            }
                        ),
                        flush=True,
                    )
                meta_runs.append(theirs["versions"])
    meta = {
        "model": args.model,
        "length": args.length,
        "keeps": keeps,
        "kvpress": meta_runs[0] if meta_runs else None,
        "command": "python benchmarks/kvcache/snapkv_window_sweep.py " + " ".join(sys.argv[1:]),
    }
    write(args.out, f"snapkv_parity_{args.model}", meta, rows, parity_md)


def parity_md(meta: dict, rows: list[dict]) -> str:
    out = [
        f"# SnapKV vs kvpress SnapKVPress on the passkey prompt ({meta['model']}, {meta['length']} tokens, fp32)",
        "",
        f"`{meta['command']}`",
        "",
        "| depth | window | keep | Jaccard mean | identical heads | longkit answer | kvpress answer | gold | "
        "heads missing needle tokens (longkit / kvpress) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ln, kn = r.get("longkit_needle") or {}, r.get("kvpress_needle") or {}
        out.append(
            f"| {r['depth']} | {r['window']} | {r['keep']} | {r.get('jaccard_mean', float('nan')):.4f} | "
            f"{r.get('identical_heads', float('nan')):.3f} | {r['answer_longkit_text']!r} | {r['answer_kvpress_text']!r} | "
            f"{r['gold'][0]} | {ln.get('heads_missing_needle_tokens')} / {kn.get('heads_missing_needle_tokens')} |"
        )
    return "\n".join(out) + "\n\n" + PARITY_NOTE


#: Why SnapKV window 32 loses the passkey even at 99% kept (the passkey failure this script was written to explain), rendered under the parity table.
PARITY_NOTE = """\
Heads missing needle tokens: (layer, kv head) pairs whose kept set lacks at least one of the 22 tokens of the needle
sentence (both copies of the digits). At keep 0.99 the two sides differ by one token per head only because of
rounding (longkit keeps round(0.99 * 2048) = 2028, kvpress int(2048 * 0.99) = 2027): the Jaccard of 2027/2028 =
0.9995 is that one token.

Why window 32 fails at keep 0.99 although only 20 of 2048 slots per head go: the evicted slots are not random.
The prompt is a plain completion whose haystack repeats the same five filler sentences; in the early layers the
window queries (filler and question alike) spread their attention over the many earlier copies of those sentences,
and the needle's digits, which occur nowhere else, get the lowest scores. So at keep 0.99 the 20 evicted slots of
about a quarter of the (layer, kv head) pairs include needle digits, for window 32 *and* for window 8 (24 of the 90 heads each,
11 and 12 of them in layers 0-3; the second copy's middle digit is evicted in 21 and 23 heads). Which heads lose which digits then
decides whether the copy of the alternating `91919` survives: with window 32 it becomes `919999`, with window 8 it
happens to survive. Evicting only in layers 0-3 breaks both windows (` 1999.`); evicting only in layers 4-29 breaks
window 32 (` 91999.`) and not window 8 (`snapkv_window_sweep.py layers`, bf16, depth 0.25). kvpress's SnapKVPress (same scoring: softmax of the window queries over all
keys, mean over the window, avg-pool kernel 5, GQA mean) keeps a subset of longkit's set in every head (one token
fewer by rounding) and gives the same answers, so this is the method's behaviour on this prompt, not a longkit bug.
"""


def sweep(args: argparse.Namespace) -> None:
    import torch

    import longkit
    from longkit.runtime.generate import greedy_generate

    lm = longkit.load_model(args.model)
    tok = lm.tokenizer
    eos = {tok.eos_token_id}
    specs = ["baseline"] + [f"snapkv:ratio={args.ratio},window={w}" for w in args.windows.split(",")]
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for depth in [float(d) for d in args.depths.split(",")]:
            sample = passkey_prompt(tok, length, depth)
            ids = list(sample.prompt.input_ids)
            for spec in specs:
                t0 = time.perf_counter()
                if spec == "baseline":
                    gen = greedy_generate(lm.model, ids, sample.max_new_tokens, None, eos)
                else:
                    with longkit.apply(lm.model, kv=spec) as applied:
                        gen = greedy_generate(lm.model, ids, sample.max_new_tokens, applied.new_cache(), eos)
                text = tok.decode(gen.tokens)
                ok = any(a in text for a in sample.answers)
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "method": spec,
                        "answer": text,
                        "gold": sample.answers,
                        "correct": ok,
                        "kv_bytes": gen.kv_bytes,
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    meta = {
        "model": args.model,
        "dtype": str(lm.dtype),
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/kvcache/snapkv_window_sweep.py " + " ".join(sys.argv[1:]),
        "note": "one sample per (length, depth); wall times taken on a shared 2-core CPU under contention",
    }
    write(args.out, f"snapkv_sweep_{args.model}", meta, rows, sweep_md)


def layers(args: argparse.Namespace) -> None:
    """Evict only in some layers (everything else kept): which layers' evictions break the passkey."""
    from dataclasses import dataclass

    import torch

    import longkit
    from longkit.kvcache.snapkv import SnapKV
    from longkit.registry import REGISTRIES, register
    from longkit.runtime.generate import greedy_generate

    lm = longkit.load_model(args.model)
    tok = lm.tokenizer
    sample = passkey_prompt(tok, args.length, args.depth)
    ids = list(sample.prompt.input_ids)
    span = {"lo": 0, "hi": 0}

    @dataclass
    class _LayerSnapKV(SnapKV):
        def score(self, ctx):
            s = super().score(ctx)
            if span["lo"] <= ctx.layer_idx < span["hi"]:
                return s
            # +inf keeps every slot of the layers outside the span
            return torch.full_like(s, float("inf"))

    register("kv", "_layer_snapkv")(_LayerSnapKV)
    rows = []
    try:
        for window in [int(w) for w in args.windows.split(",")]:
            for part in args.spans.split(","):
                span["lo"], span["hi"] = (int(x) for x in part.split("-"))
                spec = f"_layer_snapkv:ratio={args.ratio},window={window}"
                with longkit.apply(lm.model, kv=spec) as applied:
                    gen = greedy_generate(lm.model, ids, sample.max_new_tokens, applied.new_cache(), {tok.eos_token_id})
                rows.append(
                    {"window": window, "layers": part, "answer": tok.decode(gen.tokens), "gold": sample.answers}
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        REGISTRIES["kv"].unregister("_layer_snapkv")


def sweep_md(meta: dict, rows: list[dict]) -> str:
    cells: dict[str, dict[tuple, bool]] = {}
    for r in rows:
        cells.setdefault(r["method"], {})[(r["length"], r["depth"])] = r["correct"]
    cols = sorted({(r["length"], r["depth"]) for r in rows})
    out = [
        f"# Passkey vs SnapKV observation window ({meta['model']}, {meta['dtype']})",
        "",
        f"`{meta['command']}`",
        "",
        meta["note"],
        "",
        "| method | " + " | ".join(f"{n // 1024}K@{d:g}" for n, d in cols) + " | correct |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for m, c in cells.items():
        out.append(
            f"| {m} | " + " | ".join("ok" if c.get(k) else "x" for k in cols) + f" | {sum(c.values())}/{len(c)} |"
        )
    return "\n".join(out) + "\n"


def write(out: Path, stem: str, meta: dict, rows: list[dict], render) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(render(meta, rows))
    print(render(meta, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--depths", default="0.25")
    p.add_argument("--keeps", default="0.99,0.25")
    p.add_argument("--windows", default="32,8")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--venv", default=str(HERE / ".venv-kvpress"))
    p.add_argument("--timeout", type=int, default=1800)
    s = sub.add_parser("sweep")
    s.add_argument("--lengths", default="2048,4096")
    s.add_argument("--depths", default="0.25,0.5,0.75")
    s.add_argument("--windows", default="8,16,32,64")
    s.add_argument("--ratio", type=float, default=0.25)
    for q in (p, s):
        q.add_argument("--model", default="smollm2-135m")
        q.add_argument("--out", type=Path, default=HERE / "results")
    L = sub.add_parser("layers", help="evict only in the given layer spans (lo-hi, hi exclusive)")
    L.add_argument("--length", type=int, default=2048)
    L.add_argument("--depth", type=float, default=0.25)
    L.add_argument("--ratio", type=float, default=0.99)
    L.add_argument("--windows", default="32,8")
    L.add_argument("--spans", default="0-30,0-4,4-30")
    L.add_argument("--model", default="smollm2-135m")
    r = sub.add_parser("render", help="rewrite the markdown of an existing results JSON")
    r.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.mode == "render":
        data = json.loads(args.json.read_text())
        render = parity_md if "parity" in args.json.name else sweep_md
        args.json.with_suffix(".md").write_text(render(data["meta"], data["rows"]))
        return
    {"parity": parity, "sweep": sweep, "layers": layers}[args.mode](args)


if __name__ == "__main__":
    main()
