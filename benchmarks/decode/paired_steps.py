"""Paired decode steps: one step of every configuration per round, in one process, ratios taken per round.

    OMP_WAIT_POLICY=passive nice -n 10 .venv/bin/python benchmarks/decode/paired_steps.py \
        [--model smollm2-135m] [--dtype bfloat16] [--lengths 2048,8192] [--rounds 24] [--threads 2] \
        [--configs "longkit full,kivi 2-bit,kivi 2-bit tiled,kivi 4-bit"]

``decode.py`` runs each configuration's prefill and decode steps in one block, so a change of the machine's load
between blocks (minutes apart on a shared CPU) lands on one configuration only. Here every configuration is
prefilled once (the same seeded prompt per length), then the rounds alternate: each round decodes one token with every
configuration, in an order rotated from round to round, and each configuration's step time is divided by the
``longkit full`` step of the same round. The table lists, per length, the median step time and the median and
quartiles of those per-round ratios; round 0 is a warm-up and is not counted. Configurations are ``decode.py``'s
``kv`` ones (names as there, ``kivi 2-bit tiled``: KIVI's tiled PyTorch read instead of the native kernel); each step
runs under its own ``longkit.apply`` (entered and left outside the timed call).

Writes ``results/<name>.json`` and ``.md``; ``--render`` redraws the ``.md`` from the ``.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import decode  # noqa: E402  (the sibling benchmark: its configurations and KIVI switch)

BASE = "longkit full"


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarise(data: dict) -> list[dict]:
    rows = []
    for length, times in data["times_ms"].items():
        base = times[BASE]
        for config, ms in times.items():
            ratios = [a / b for a, b in zip(ms, base, strict=True)]
            lo, hi = quartiles(ratios)
            rows.append({"length": int(length), "config": config, "ms": statistics.median(ms),
                         "ratio": statistics.median(ratios), "q1": lo, "q3": hi})  # fmt: skip
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# Paired decode steps: {meta['model']} ({meta['dtype']}), {meta['rounds']} rounds",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}; CPU capability {meta['cpu_capability']}, "
        f"{meta['threads']} threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}, load average {meta['load_before']} "
        f"before / {meta['load_after']} after. One decode step of every configuration per round (order rotated); "
        f"ratio = the step's time / the same round's {BASE} step, median and quartiles over the rounds.",
        "",
        f"| length | configuration | median ms/step | ratio to {BASE} (median) | ratio quartiles |",
        "|---|---|---|---|---|",
    ]
    for r in summarise(data):
        lines.append(
            f"| {r['length']} | {r['config']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['q1']:.2f}–{r['q3']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def measure(lm, configs: list[str], lengths: list[int], rounds: int, group_size: int) -> dict:
    import torch

    import longkit

    model = lm.model
    specs = {}
    for name in configs:
        kind, spec = decode.CONFIGS[name]
        if kind != "kv":
            raise SystemExit(f"error: --configs: {name} is not a longkit kv configuration")
        specs[name] = spec.replace("kivi:", f"kivi:group_size={group_size},") if spec.startswith("kivi") else spec
    gen = torch.Generator().manual_seed(0)
    out_times = {}
    for n in lengths:
        ids = torch.randint(5, model.config.vocab_size, (1, n), generator=gen)
        caches, tokens = {}, {}
        for name, spec in specs.items():
            with torch.inference_mode(), longkit.apply(model, **({"kv": spec} if spec else {})) as applied:
                caches[name] = applied.new_cache()
                out = model(ids, cache=caches[name], use_cache=True, logits_to_keep=1)
            tokens[name] = out.logits[:, -1:].argmax(-1)
        times: dict[str, list[float]] = {name: [] for name in specs}
        for r in range(rounds + 1):
            k = r % len(configs)
            for name in configs[k:] + configs[:k]:
                spec = specs[name]
                with decode.native_kivi(name not in decode.TILED), torch.inference_mode(), longkit.apply(
                    model, **({"kv": spec} if spec else {})
                ):
                    t0 = time.perf_counter()
                    out = model(tokens[name], cache=caches[name], use_cache=True)
                    dt = time.perf_counter() - t0
                tokens[name] = out.logits[:, -1:].argmax(-1)
                if r:
                    times[name].append(1e3 * dt)
        print(f"{n}: " + ", ".join(f"{c} {statistics.median(t):.1f} ms" for c, t in times.items()), file=sys.stderr)
        out_times[str(n)] = times
    return out_times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", default=f"{BASE},kivi 2-bit,kivi 2-bit tiled,kivi 4-bit")
    ap.add_argument("--group-size", type=int, default=32, help="KIVI's group size (must divide the head dimension)")
    ap.add_argument("--name", default="paired_steps")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/decode/results)")
    ap.add_argument("--render", action="store_true", help="redraw results/<name>.md from the JSON only")
    args = ap.parse_args(argv)
    out = args.out or RESULTS
    if args.render:
        (out / f"{args.name}.md").write_text(markdown(decode.recorded(out, args.name)))
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if BASE not in configs or args.rounds < 2:
        sys.exit(f"error: --configs must include '{BASE}' (the baseline) and --rounds must be >= 2")
    unknown = [c for c in configs if c not in decode.CONFIGS]
    if unknown:
        sys.exit(f"error: --configs: unknown {unknown}; valid: {', '.join(decode.CONFIGS)}")

    import torch
    import transformers

    import longkit
    from longkit.kvcache.decode import cpu_capability

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    lm = longkit.load_model(args.model, dtype=args.dtype)
    lengths = [decode.parse_length(x) for x in args.lengths.split(",") if x.strip()]
    times = measure(lm, configs, lengths, args.rounds, args.group_size)
    meta = {
        "command": " ".join(["python", "benchmarks/decode/paired_steps.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "dtype": args.dtype, "lengths": lengths, "rounds": args.rounds,
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "kivi_native": decode.kivi_native_status(lm.model, args.group_size),
    }  # fmt: skip
    data = {"meta": meta, "times_ms": times}
    decode.saved(data, out, args.name, markdown)


if __name__ == "__main__":
    main()
