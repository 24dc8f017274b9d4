"""Where MoBA loses the passkey: per layer, does its gate pick the key's block for the question's queries?

One dense forward of SmolLM2-135M on a passkey prompt (optionally under a RoPE method). In every layer, for the
last ``--rows`` queries (the question and the answer prefix, which must find the key), it compares MoBA's block
choice (gate ``q · mean(K_block)``, own block forced, top-k) with dense attention on the same q and k:

- ``recall``: the share of the dense attention mass that falls in the chosen blocks (1 = MoBA loses nothing);
- ``key mass``: the dense attention mass on the key line's block(s), max over heads (how much a head retrieves);
- ``key chosen``: the share of (head, query) pairs whose choice contains a key block, overall and among the
  *retrieving* heads (key mass > ``--retrieving``);
- ``key rank``: the median rank of the best key block in the gate among the past blocks (0 = first choice).

The dense forward is the reference: under MoBA the later layers see different hidden states, so this measures
the gate's quality given correct inputs, the usual attention-recall analysis of sparse-attention papers. Run::

    .venv/bin/python benchmarks/attention/moba_recall.py --length 8192 --name moba_recall_8k
    .venv/bin/python benchmarks/attention/moba_recall.py --length 32768 --rope ntk:factor=8 --name moba_recall_32k

``--render`` only rewrites ``results/NAME.md`` from ``results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def layer_stats(q, k, scale, key_blocks: list[int], block_size: int, top_ks: list[int], retrieving: float) -> dict:
    """Gate-versus-dense statistics of one layer for the last queries ``q`` (B, H, n, D) over keys (B, H_kv, S, D)."""
    from longkit.attention.moba import moba_mask, moba_select
    from longkit.attention.sparse import block_means, positions

    B, H, n, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    nk = -(-S // block_size)
    # (B, H, n, S) dense attention probabilities of the last n queries (causal: they sit at S - n .. S - 1)
    kr = k.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kr.transpose(-1, -2)) * scale
    causal = torch.arange(S)[None, :] <= positions(n, S, q.device)[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    # (B, H, n, nk) dense mass per key block
    mass = F.pad(probs, (0, nk * block_size - S)).view(B, H, n, nk, block_size).sum(-1)
    key_mass = mass[..., key_blocks].sum(-1)  # (B, H, n)
    head_key_mass = key_mass.mean(2)[0]  # (H,)
    retrieving_heads = (head_key_mass > retrieving).nonzero().flatten().tolist()
    # Gate ranks among the complete past blocks (own block and later ones excluded, as MoBA does).
    gate = torch.matmul(q.float(), block_means(kr, block_size).transpose(-1, -2))  # (B, H, n, nk)
    own = (positions(n, S, q.device) // block_size)[:, None]
    blk = torch.arange(nk)[None, :]
    gate = gate.masked_fill(blk >= own, float("-inf"))
    order = gate.argsort(-1, descending=True)
    rank = torch.full((B, H, n), nk, dtype=torch.long)
    for b in key_blocks:
        rank = torch.minimum(rank, (order == b).float().argmax(-1))
    out = {
        "key_mass_max": round(float(head_key_mass.max()), 4),
        "key_mass_mean": round(float(head_key_mass.mean()), 4),
        "retrieving_heads": retrieving_heads,
        "key_rank_median": int(rank.flatten().median()),
        "key_rank_retrieving": [int(rank[0, h].median()) for h in retrieving_heads],
        "top_k": {},
    }
    for top_k in top_ks:
        # (B, H, n, S) the keys MoBA lets each query see
        visible = moba_mask(moba_select(q, k, top_k, block_size), S, block_size)
        hit = visible[..., [b * block_size for b in key_blocks]].any(-1)  # (B, H, n): a key block chosen
        out["top_k"][top_k] = {
            "recall": round(float((probs * visible).sum(-1).mean()), 4),
            "key_chosen": round(float(hit.float().mean()), 4),
            "key_chosen_retrieving": round(float(hit[0, retrieving_heads].float().mean()), 4)
            if retrieving_heads
            else None,
        }
    return out


def markdown(data: dict) -> str:
    """results/NAME.md from a run's JSON: where the key lies and the dense model's answer, then the layer table."""
    a = data["args"]
    first, last = data["key_tokens"]
    lines = [
        f"# MoBA gate recall on a passkey prompt: {a['model']}, {a['length']} tokens, depth {a['depth']}, "
        f"rope {a['rope'] or 'none'}",
        "",
        f"Key line at tokens {first}..{last}, block(s) {data['key_blocks']} of "
        f"{-(-a['length'] // a['block_size'])} (block size {a['block_size']}); last {a['rows']} queries; dense "
        f"model's next token: {data['next_token']!r}; {data['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines + table_lines(data)) + "\n"


def table_lines(data: dict) -> list[str]:
    """The per-layer table and the mean recall per top-k, from a run's JSON (layer and top-k keys are strings)."""
    top_ks = data["args"]["top_k"].split(",")
    layers = sorted(data["layers"].items(), key=lambda item: int(item[0]))
    lines = [
        "| layer | key mass max | retrieving heads | key rank (median; retrieving heads) | "
        + " | ".join(f"top-{k} recall / key chosen (retrieving)" for k in top_ks)
        + " |",
        "|---" * (4 + len(top_ks)) + "|",
    ]
    for layer, s in layers:
        cells = [
            f"{t['recall']:.2f} / {t['key_chosen']:.2f}"
            + (f" ({t['key_chosen_retrieving']:.2f})" if t["key_chosen_retrieving"] is not None else "")
            for t in s["top_k"].values()
        ]
        lines.append(
            f"| {layer} | {s['key_mass_max']:.3f} | {len(s['retrieving_heads'])} | {s['key_rank_median']}; "
            f"{s['key_rank_retrieving']} | " + " | ".join(cells) + " |"
        )
    for top_k in top_ks:
        rec = statistics.mean(s["top_k"][top_k]["recall"] for _, s in layers)
        lines.append(f"\nMean recall over layers, top-{top_k}: {rec:.3f}.")
    return lines


def render(name: str) -> str:
    """Rewrite results/NAME.md from results/NAME.json; return the text."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--render: no saved run {path} (give the --name of an existing results/NAME.json)")
    data = json.loads(path.read_text())
    if "key_tokens" not in data:
        raise SystemExit(f"--render: {path} predates key_tokens/next_token in the JSON; its header cannot be redrawn")
    (RESULTS / f"{name}.md").write_text(markdown(data))
    return markdown(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--rope", default=None, help="RoPE method spec, e.g. ntk:factor=8")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--top-k", default="3,8,16", help="comma-separated MoBA top_k values to score")
    ap.add_argument("--rows", type=int, default=16, help="last queries analysed (question + answer prefix)")
    ap.add_argument("--retrieving", type=float, default=0.1, help="key mass above which a head counts as retrieving")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--name", default="moba_recall")
    ap.add_argument("--render", action="store_true", help="only rewrite results/NAME.md from results/NAME.json")
    args = ap.parse_args()
    if args.render:
        print(render(args.name), end="")
        return

    import longkit
    from longkit.attention.base import AttentionMethod
    from longkit.eval.tasks.base import TaskContext
    from longkit.eval.tasks.passkey import KEY_LINE, Passkey

    lm = longkit.load_model(args.model, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    sample = Passkey().build(TaskContext(tok), args.length, args.depth, 0)
    ids = torch.tensor([sample.prompt.input_ids])
    start = sample.prompt.needle_start
    # The key line as the passkey task inserts it (its tokens start at needle_start).
    key_tokens = len(tok(KEY_LINE.format(key=sample.answers[0]))["input_ids"])
    key_blocks = sorted({start // args.block_size, (start + key_tokens - 1) // args.block_size})
    top_ks = [int(x) for x in args.top_k.split(",")]
    stats: dict[int, dict] = {}

    class Probe(AttentionMethod):
        def attention(self, module, query, key, value, attention_mask, scaling, kwargs):
            stats[module.layer_idx] = layer_stats(
                query[:, :, -args.rows :], key, scaling, key_blocks, args.block_size, top_ks, args.retrieving
            )
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)

    Probe.name = "moba_recall_probe"
    t0 = time.perf_counter()
    with torch.inference_mode(), longkit.apply(model, f"rope={args.rope}" if args.rope else None):
        undo = Probe().apply(model)
        try:
            logits = model(ids).logits[0, -1]
        finally:
            undo()
    wall = time.perf_counter() - t0
    first = tok.decode([int(logits.argmax())])

    data = {
        "args": vars(args),
        "key_blocks": key_blocks,
        "key_tokens": [start, start + key_tokens - 1],
        "next_token": first,
        "wall_s": round(wall, 1),
        "layers": stats,
    }
    # Through JSON once, so the table is drawn from exactly what the results file holds (string keys included).
    data = json.loads(json.dumps(data))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data), end="")


if __name__ == "__main__":
    main()
