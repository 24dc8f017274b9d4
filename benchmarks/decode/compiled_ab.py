"""Compiled decode step variants, A/B in one process: paired steps from one prefilled cache, ratios per round.

    OMP_WAIT_POLICY=passive nice -n 10 .venv/bin/python benchmarks/decode/compiled_ab.py \
        [--model smollm2-135m] [--dtype bfloat16] [--length 8192] [--rounds 20] [--threads 2] \
        [--variants "eager,sdpa,native,native+cpp_wrapper"] [--profile native]

The prompt (seeded random ids) is prefilled once into the seam's default cache; every variant then builds its own
decoder from that cache (``longkit.runtime.compiled_decode``: its own fixed-capacity copy, its own compiled graph;
the first step, compilation included, is timed apart as ``compile_s``). Then the rounds alternate: each round decodes
one token with every variant, in an order rotated from round to round, and each variant's step time is divided by the
same round's ``--base`` step (round 0 is a warm-up, not counted). Variants (``+`` joins them):

- ``eager``: the seam's cache, decoded by the model's own forward (a copy of the prefilled cache, growing in place);
- ``sdpa`` / ``native``: the compiled step with that ``attention`` (torch's fused kernel over the whole buffer under
  the mask, or :mod:`longkit.kvcache.decode_native` over the filled slots);
- ``gemv``: the model's linear layers through :mod:`longkit.runtime.gemv_native` (``linear="native"``) instead of
  oneDNN's prepacked bf16 linears;
- ``cpp_wrapper``, ``max_autotune``: inductor settings for the compile (``{"cpp_wrapper": True}``; ``{"max_autotune":
  True}``, CPU GEMM templates benchmarked against the library calls, no CUDA graphs); ``concat``: inductor's
  ``cpp.enable_concat_linear`` (with freezing, linears sharing an input become one linear over concatenated weights);
- ``nofreeze``: without inductor's ``freezing``; ``nocompile``: the same fixed-capacity steps run eagerly.

Distance from the limit: the machine's read bandwidth is measured in the same process (``decode.py``'s probe) and each
variant reports bytes/token (weights + the KV bytes its step reads: the compiled ``sdpa`` step reads its whole
buffer, ``native`` the filled slots) and ``x floor`` = median ms / (bytes / bandwidth). ``--profile VARIANT[,VARIANT...]``
adds ``torch.profiler``'s top operators over 8 steps of each (self CPU time per step), to see where a step spends
its time. Writes ``results/<name>.json`` and ``.md``; ``--render`` redraws the ``.md`` from the ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import decode  # noqa: E402  (the sibling benchmark: bandwidth probe, weight bytes, lengths)

#: the flags a variant name may combine
FLAGS = ("eager", "sdpa", "native", "gemv", "cpp_wrapper", "max_autotune", "concat", "nofreeze", "nocompile")


def parse_variant(name: str) -> dict:
    """``native+cpp_wrapper`` -> decoder keyword arguments (or ``{"eager": True}``)."""
    flags = name.split("+")
    bad = [f for f in flags if f not in FLAGS]
    if bad or not flags:
        raise SystemExit(f"error: --variants: unknown {bad} in {name!r}; flags: {', '.join(FLAGS)} joined by '+'")
    if "eager" in flags:
        if len(flags) > 1:
            raise SystemExit("error: --variants: 'eager' takes no other flag")
        return {"eager": True}
    options = {}
    if "cpp_wrapper" in flags:
        options["cpp_wrapper"] = True
    if "max_autotune" in flags:
        options["max_autotune"] = True
    if "concat" in flags:
        # linears that read the same input (q/k/v, gate/up) concatenated into one frozen weight: fewer, larger reads
        options["cpp.enable_concat_linear"] = True
    return {"attention": "native" if "native" in flags else "sdpa", "freezing": "nofreeze" not in flags,
            "options": options, "compile": "nocompile" not in flags,
            "linear": "native" if "gemv" in flags else "torch"}  # fmt: skip


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarise(data: dict) -> list[dict]:
    meta = data["meta"]
    bw = meta["bandwidth"]["read_gb_s"] * 1e9
    base = data["times_ms"][meta["base"]]
    rows = []
    for name, ms in data["times_ms"].items():
        ratios = [a / b for a, b in zip(ms, base, strict=True)]
        lo, hi = quartiles(ratios)
        read = meta["weight_bytes"] + data["kv_read_bytes"][name]
        med = statistics.median(ms)
        rows.append({"variant": name, "ms": med, "min": min(ms), "ratio": statistics.median(ratios), "q1": lo,
                     "q3": hi, "bytes": read, "floor_ms": 1e3 * read / bw, "x_floor": med / (1e3 * read / bw),
                     "compile_s": data["compile_s"].get(name)})  # fmt: skip
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    bw = meta["bandwidth"]
    lines = [
        f"# Compiled decode step variants: {meta['model']} ({meta['dtype']}) at {meta['length']} tokens, "
        f"{meta['rounds']} paired rounds",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}; CPU capability {meta['cpu_capability']}, "
        f"{meta['threads']} threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}, load average {meta['load_before']} "
        f"before / {meta['load_after']} after; {meta.get('note') or 'no note'}. Read bandwidth {bw['read_gb_s']:.1f} "
        f"GB/s (same process). One step of every variant per round (order rotated); ratio = the step's time / the same "
        f"round's {meta['base']} step, median and quartiles over the rounds; floor = bytes / read bandwidth.",
        "",
        f"| variant | median ms/step | min ms | ratio to {meta['base']} (median) | ratio quartiles | bytes/token | "
        "floor ms | x floor | first step (compile) s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summarise(data):
        c = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['ms']:.1f} | {r['min']:.1f} | {r['ratio']:.2f} | {r['q1']:.2f}–{r['q3']:.2f} | "
            f"{r['bytes']:,} | {r['floor_ms']:.1f} | {r['x_floor']:.2f} | {c} |"
        )
    for name, prof in data.get("profiles", {}).items():
        lines += ["", f"Profile of `{name}` (torch.profiler, 8 steps; self CPU ms per step, share of the total):", "",
                  "| operator | ms/step | share | calls/step |", "|---|---|---|---|"]  # fmt: skip
        total = sum(p["self_ms"] for p in prof)
        for p in prof:
            lines.append(f"| `{p['name']}` | {p['self_ms']:.2f} | {100 * p['self_ms'] / total:.0f}% | {p['calls']:g} |")
    return "\n".join(lines) + "\n"


def profile(step, n: int = 8, top: int = 8) -> list[dict]:
    """Top operators by self CPU time over ``n`` calls of ``step`` (ms per step), the rest summed as ``(other)``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    rows = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / n, "calls": e.count / n} for e in events[:top]]
    rest = sum(e.self_cpu_time_total for e in events[top:]) / 1e3 / n
    rest_calls = sum(e.count for e in events[top:]) / n
    return rows + [{"name": "(other)", "self_ms": rest, "calls": rest_calls}]


def measure(args) -> dict:
    import torch

    import longkit
    from longkit.kvcache import cache_nbytes
    from longkit.runtime.compiled_decode import ATTENTION, compiled_decode

    # every variant compiles its own graph of the same forward
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    lm = longkit.load_model(args.model, dtype=args.dtype)
    model = lm.model
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    specs = {v: parse_variant(v) for v in variants}
    ids = torch.randint(5, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    steps = args.rounds + 10 + 8 * len(args.profiles)
    applied = longkit.apply(model)
    impl = model.config._attn_implementation
    steppers, kv_read, compile_s = {}, {}, {}
    try:
        with torch.inference_mode():
            cache = applied.new_cache()
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1:].argmax(-1)
            for name, spec in specs.items():
                print(f"building {name}", file=sys.stderr, flush=True)
                if spec.get("eager"):
                    own = copy.deepcopy(cache)
                    state = {"token": first}

                    def eager_step(own=own, state=state):
                        # the model's own attention for this step (the decoders registered theirs), switched untimed
                        model.set_attn_implementation(impl)
                        t0 = time.perf_counter()
                        o = model(state["token"], cache=own, use_cache=True)
                        dt = time.perf_counter() - t0
                        model.set_attn_implementation(ATTENTION)
                        state["token"] = o.logits[:, -1:].argmax(-1)
                        return dt

                    steppers[name] = eager_step
                    kv_read[name] = cache_nbytes(cache)
                    continue
                # each decoder is built on the model's own attention (the previous one registered its own)
                model.set_attn_implementation(impl)
                dec = compiled_decode(model, cache, steps, **spec)
                state = {"token": dec.step(first).argmax(-1, keepdim=True)}
                compile_s[name] = dec.compile_s
                print(f"  first step {dec.compile_s:.2f} s, attention {dec.attention}", file=sys.stderr, flush=True)

                def compiled_step(dec=dec, state=state):
                    t0 = time.perf_counter()
                    logits = dec.step(state["token"])
                    dt = time.perf_counter() - t0
                    state["token"] = logits.argmax(-1, keepdim=True)
                    return dt

                steppers[name] = compiled_step
                kv_read[name] = dec.kv_read_bytes
                # the decoder's attention implementation stays registered for the rounds (every compiled variant
                # uses the same one); the model gets its own back at the end
        bandwidth = decode.measure_bandwidth(args.bandwidth_mb)
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.inference_mode():
            for r in range(args.rounds + 1):
                k = r % len(variants)
                for name in variants[k:] + variants[:k]:
                    dt = steppers[name]()
                    if r:
                        times[name].append(1e3 * dt)
            profiles = {name: profile(steppers[name]) for name in args.profiles}
    finally:
        model.set_attn_implementation(impl)
        applied.remove()
    return {"times_ms": times, "kv_read_bytes": kv_read, "compile_s": compile_s, "bandwidth": bandwidth,
            "profiles": profiles, "weight_bytes": decode.weight_bytes(model)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--length", default="8192")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default="eager,sdpa,native,native+cpp_wrapper")
    ap.add_argument("--base", default="sdpa", help="the variant ratios are taken to (one of --variants)")
    ap.add_argument("--profile", default=None, help="variants to profile after the rounds (comma-separated)")
    ap.add_argument("--note", default=None, help="a line on the conditions, recorded with the results")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--name", default="compiled_ab")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/decode/results)")
    ap.add_argument("--render", action="store_true", help="redraw results/<name>.md from the JSON only")
    args = ap.parse_args(argv)
    out = args.out or RESULTS
    if args.render:
        (out / f"{args.name}.md").write_text(markdown(decode.recorded(out, args.name)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    if args.base not in variants or args.rounds < 2:
        sys.exit(f"error: --base ({args.base}) must be one of --variants and --rounds must be >= 2")
    args.profiles = [v.strip() for v in (args.profile or "").split(",") if v.strip()]
    if set(args.profiles) - set(variants):
        sys.exit(f"error: --profile ({args.profile}) must name variants of --variants")

    import torch
    import transformers

    from longkit.kvcache.decode import cpu_capability

    if args.threads:
        torch.set_num_threads(args.threads)
    args.length = decode.parse_length(args.length)
    load_before = os.getloadavg()
    got = measure(args)
    meta = {
        "command": " ".join(["python", "benchmarks/decode/compiled_ab.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "dtype": args.dtype, "length": args.length, "rounds": args.rounds, "base": args.base,
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "bandwidth": got.pop("bandwidth"), "weight_bytes": got.pop("weight_bytes"), "note": args.note,
    }  # fmt: skip
    data = {"meta": meta, **got}
    decode.saved(data, out, args.name, markdown)


if __name__ == "__main__":
    main()
