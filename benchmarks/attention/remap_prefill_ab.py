"""Chunked prefill of the position remaps (Self-Extend, DCA) against plain sdpa on a model with Gemma 3 270M's
attention shapes, and the same remaps as an earlier revision of longkit computes them (issue #21).

The model is a random Gemma 3 text model built from a config with Gemma 3 270M's attention: 4 query heads, 1 key/value
head, head_dim 256, five sliding-window layers (window 512) to one full-attention layer, hidden size 640, bfloat16,
with a small vocabulary and ``--layers`` layers (a multiple of 6). Each row prefills ``--length`` random tokens in
chunks of ``--chunk`` (the Gemma 3 grid's route) and times the whole prefill and, through forward hooks, the
attention modules of each layer type. With ``--before REV`` the remap rows run a second time on the source of
revision REV (``git archive`` of ``src/longkit`` into a temporary directory, imported as ``longkit_before``), in the
same process and the same rounds, so before / after ratios come from interleaved runs; the last chunk's logits of
each row are compared with the first row that has the same method. ``--model gemma3-270m`` runs the real model
(bfloat16, provisioned as ``longkit`` provisions it) instead of the random one. Prints a markdown table; nothing is
written::

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/attention/remap_prefill_ab.py --length 8192 --rounds 2 --before 5939a25
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "baseline": None,
    "self_extend": "attention=self_extend:group_size=5,window=8192",
    "dca": "attention=dca:chunk_size=24576,local_window=4096",
}


def import_revision(rev: str) -> object:
    """longkit as revision ``rev`` had it, importable beside the working tree's as ``longkit_before``."""
    tmp = Path(tempfile.mkdtemp(prefix="longkit_before_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/longkit"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    pkg = tmp / "src" / "longkit"
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\blongkit\.", "longkit_before.", text)
        text = re.sub(r"\b(import|from) longkit\b", r"\1 longkit_before", text)
        path.write_text(text)
    pkg.rename(tmp / "longkit_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("longkit_before")


def gemma3_like(layers: int):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    types = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
    config = Gemma3TextConfig(
        vocab_size=512, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, layer_types=types,
        max_position_embeddings=32768, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), types


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=None, help="git revision whose remaps run beside the working tree's")
    ap.add_argument("--methods", default="baseline,self_extend,dca")
    ap.add_argument("--model", default=None, help="a longkit model alias or directory (bfloat16) instead of the random one")
    args = ap.parse_args()
    if not args.model and (args.layers < 6 or args.layers % 6):
        sys.exit("--layers must be a positive multiple of 6 (five sliding layers to one full layer)")
    torch.set_num_threads(args.threads)
    import longkit
    from longkit.runtime.chunked_prefill import chunked_prefill

    packages = {"after": longkit}
    if args.before:
        packages["before"] = import_revision(args.before)
    if args.model:
        model = longkit.load_model(args.model, dtype="bfloat16").model
        types, args.layers = list(model.config.layer_types), model.config.num_hidden_layers
    else:
        model, types = gemma3_like(args.layers)
    vocab = model.config.vocab_size
    ids = torch.randint(4, min(vocab, 512), (1, args.length), generator=torch.Generator().manual_seed(1))
    attn = collections.defaultdict(float)

    def pre(m, a, kw):
        m._t0 = time.perf_counter()

    def post(m, a, kw, o):
        attn[m._kind] += time.perf_counter() - m._t0

    for i, layer in enumerate(model.model.layers):
        layer.self_attn._kind = types[i]
        layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
        layer.self_attn.register_forward_hook(post, with_kwargs=True)
    rows = [(m, "after" if METHODS[m] is None else v) for m in args.methods.split(",") for v in packages
            if METHODS[m] is not None or v == "after"]
    times = collections.defaultdict(list)
    logits = {}
    # one short untimed prefill per row first (thread pools, allocator, registrations)
    for method, version in rows:
        with packages[version].apply(model, METHODS[method]) as applied, torch.inference_mode():
            chunked_prefill(model, ids[:, :512], applied.new_cache(), 256)
    for rnd in range(args.rounds):
        for method, version in rows:
            pkg = packages[version]
            with pkg.apply(model, METHODS[method]) as applied, torch.inference_mode():
                attn.clear()
                t0 = time.perf_counter()
                out = chunked_prefill(model, ids, applied.new_cache(), args.chunk)
                total = time.perf_counter() - t0
            logits[method, version] = out.logits[0, -1].float()
            times[method, version].append((total, attn["sliding_attention"], attn["full_attention"]))
            print(f"round {rnd} {method} {version}: total {total:.2f} s, sliding {attn['sliding_attention']:.2f} s, "
                  f"full {attn['full_attention']:.2f} s", flush=True)
    base = statistics.median(t[0] for t in times["baseline", "after"]) if ("baseline", "after") in times else None
    print(f"\n{args.length} tokens, chunks of {args.chunk}, {args.layers} layers, {args.threads} thread(s), medians of "
          f"{args.rounds} rounds\n")
    print("| method | code | prefill s | x baseline | sliding layers s | full layers s | last logits vs first row |")
    print("|---|---|---|---|---|---|---|")
    for method, version in rows:
        total, sliding, full = (statistics.median(t[i] for t in times[method, version]) for i in range(3))
        first = logits[method, rows[[m for m, _ in rows].index(method)][1]]
        diff = (logits[method, version] - first).abs().max().item()
        same = int(logits[method, version].argmax()) == int(first.argmax())
        ratio = f"{total / base:.2f}" if base else "-"
        print(f"| {method} | {version} | {total:.2f} | {ratio} | {sliding:.2f} | {full:.2f} | "
              f"max abs diff {diff:.3g}, argmax {'same' if same else 'differs'} |")


if __name__ == "__main__":
    main()
