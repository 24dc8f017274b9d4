"""Sliding-window prefill on CPU: transformers' masked SDPA path versus ``sliding_window`` (chunked SDPA over each
query chunk's key band, O(T·W)) versus full causal SDPA.

Kernel level: one attention call on random q, k, v (H query heads, H_kv key/value heads, head_dim D) with a window
W: ``masked`` is what transformers runs on a sliding layer (SDPA under the dense (T, T) window mask, built once
outside the timing, as transformers builds it once per forward), ``band C`` is
:func:`longkit.attention.sliding.sliding_window_attention` with ``chunk=C``, ``causal`` is full causal SDPA (what a
full-attention layer costs). Model level: a random Gemma 3 text model (all layers sliding, window W) prefilled
with plain sdpa and with ``attention=sliding_window``, and the same model with all layers full-attention.
Medians of ``--repeats`` runs after one warm-up, all in one process. Writes ``results/NAME.json`` and
``results/NAME.md`` (``--render`` redraws the table from the JSON). Run::

    python benchmarks/attention/sliding_prefill.py --lengths 8192,16384 --model-lengths 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_row(T, window, chunks, heads, kv_heads, head_dim, repeats) -> dict:
    from longkit.attention.sliding import _band_mask, sliding_window_attention

    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, heads, T, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, T, head_dim, generator=g) for _ in range(2))
    mask = _band_mask(0, T, 0, T, 0, window, "cpu")[None, None]
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        row = {"T": T, "masked": _median(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), repeats)}
        for c in chunks:
            out = sliding_window_attention(q, k, v, window, chunk=c)
            row[f"band {c}"] = _median(lambda c=c: sliding_window_attention(q, k, v, window, chunk=c), repeats)
            row[f"band {c} max abs err"] = (out - ref).abs().max().item()
        row["causal"] = _median(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats)
    print(row, flush=True)
    return row


def gemma(layer_kind: str, window: int, T: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, sliding_window=window, max_position_embeddings=T + 1,
        layer_types=[layer_kind] * 6, attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(config).eval()


def model_row(T, window, chunk, repeats) -> dict:
    import longkit

    ids = torch.randint(0, 1024, (1, T), generator=torch.Generator().manual_seed(1))
    row = {"T": T}
    sliding, full = gemma("sliding_attention", window, T), gemma("full_attention", window, T)
    with torch.inference_mode():
        base = sliding(ids, use_cache=False).logits
        row["all sliding, sdpa"] = _median(lambda: sliding(ids, use_cache=False), repeats)
        with longkit.apply(sliding, attention="sliding_window", attention_args={"chunk": chunk}):
            fast = sliding(ids, use_cache=False).logits
            row["all sliding, sliding_window"] = _median(lambda: sliding(ids, use_cache=False), repeats)
        row["logits max abs diff"] = (fast - base).abs().max().item()
        row["all full, sdpa"] = _median(lambda: full(ids, use_cache=False), repeats)
    print(row, flush=True)
    return row


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# Sliding-window prefill on CPU ({meta['cpu_capability']}, {meta['threads']} threads, torch {meta['torch']})",
        "",
        f"Command: `{meta['command']}`. Median of {meta['repeats']} runs (seconds), window {meta['window']}.",
        "",
        f"One attention call: H = {meta['heads']}, H_kv = {meta['kv_heads']}, D = {meta['head_dim']}; `masked` is "
        "transformers' sliding path (SDPA under the dense T×T window mask), `band C` is `sliding_window` with "
        "chunk C, `causal` is full causal SDPA. Error: max abs difference of `band` from `masked`.",
        "",
    ]
    keys = [k for k in data["kernel"][0] if k != "T" and "err" not in k]
    lines += ["| T | " + " | ".join(keys) + " | masked / best band | max abs err |",
              "|---|" + "---|" * (len(keys) + 2)]
    for r in data["kernel"]:
        bands = [k for k in keys if k.startswith("band")]
        best = min(r[k] for k in bands)
        err = max(r[f"{k} max abs err"] for k in bands)
        lines.append(f"| {r['T']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['masked'] / best:.1f}× | {err:.1e} |")
    if data.get("model"):
        lines += ["", f"Random Gemma 3 text model (6 layers, hidden 256, 4 heads / 1 KV head, head_dim 64, window "
                  f"{meta['window']}), one prefill without cache; `sliding_window` with chunk {meta['model_chunk']}.", ""]
        keys = [k for k in data["model"][0] if k != "T"]
        lines += ["| T | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in data["model"]:
            lines.append(f"| {r['T']} | " + " | ".join(f"{r[k]:.3f}" if "diff" not in k else f"{r[k]:.1e}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--model-lengths", default="8192")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunks", default="512,1024,2048")
    p.add_argument("--model-chunk", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="sliding_prefill")
    p.add_argument("--render", action="store_true", help="redraw results/NAME.md from results/NAME.json")
    a = p.parse_args(argv)
    out = RESULTS / f"{a.name}.json"
    if a.render:
        (RESULTS / f"{a.name}.md").write_text(markdown(json.loads(out.read_text())), encoding="utf-8")
        return
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    meta = {"command": "python benchmarks/attention/sliding_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "repeats": a.repeats, "window": a.window, "heads": a.heads,
            "kv_heads": a.kv_heads, "head_dim": a.head_dim, "model_chunk": a.model_chunk}
    data = {"meta": meta,
            "kernel": [kernel_row(T, a.window, ints(a.chunks), a.heads, a.kv_heads, a.head_dim, a.repeats)
                       for T in ints(a.lengths)],
            "model": [model_row(T, a.window, a.model_chunk, a.repeats) for T in ints(a.model_lengths)]}
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{a.name}.md").write_text(markdown(data), encoding="utf-8")


if __name__ == "__main__":
    main()
