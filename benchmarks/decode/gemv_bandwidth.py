"""Read bandwidth of single-row linear layers on a decoder's weight shapes, A/B in one process.

    OMP_WAIT_POLICY=passive nice -n 19 .venv/bin/python benchmarks/decode/gemv_bandwidth.py \
        [--threads 1] [--rounds 15] [--variants "read,linear,compiled,native"] [--shapes qo,kv,gateup,down,head] \
        [--rows 1] [--name gemv_bandwidth]

A decode step multiplies a (rows, d_in) activation by every weight matrix of the model once. For each weight shape of
SmolLM2-135M (bf16; q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536 per layer, and the tied 49152x576
head) the script holds as many distinct matrices as one step reads (60, 60, 60, 30, 1: so the working set is the
step's, not one matrix sitting in the cache) and times one pass over them with each variant:

- ``read``: ``w.sum()`` of every matrix, the plain streaming read of the same bytes (the yardstick);
- ``linear``: ``torch.nn.functional.linear(x, w)`` eagerly;
- ``compiled``: the same linears as ``nn.Linear`` modules through ``torch.compile`` with inductor's ``freezing`` (the
  compiled decode step's setting: weights become constants, prepacked for oneDNN where the CPU has bf16);
- ``native``: :func:`longkit.runtime.gemv_native.gemv` (the C kernel, where it builds).

Rounds alternate the variants (order rotated), round 0 a warm-up; the table gives each variant's median GB/s per shape
and its time over the ``read`` pass of the same round (median of the per-round ratios). Writes
``results/<name>.json`` and ``.md``; ``--render`` redraws the ``.md`` from the JSON.
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

import decode  # noqa: E402  (the sibling benchmark: its reader of committed results)

#: label -> (out features, in features, matrices a SmolLM2-135M decode step reads)
SHAPES = {
    "q/o 576x576": (576, 576, 60),
    "k/v 192x576": (192, 576, 60),
    "gate/up 1536x576": (1536, 576, 60),
    "down 576x1536": (576, 1536, 30),
    "head 49152x576": (49152, 576, 1),
}
VARIANTS = ("read", "linear", "compiled", "native")
#: --shapes keys -> labels
SHAPE_KEYS = dict(zip(("qo", "kv", "gateup", "down", "head"), SHAPES, strict=True))


def build(variant: str, weights: list, rows: int):
    """A callable doing one pass of ``variant`` over ``weights`` (each (out, in) bf16)."""
    import torch

    d_in = weights[0].shape[1]
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(1)).to(weights[0].dtype)
    if variant == "read":
        return lambda: [w.sum() for w in weights]
    if variant == "linear":
        return lambda: [torch.nn.functional.linear(x, w) for w in weights]
    if variant == "native":
        from longkit.runtime import gemv_native

        ok = gemv_native.available(x, weights[0])
        if ok is not True:
            raise SystemExit(f"error: the native GEMV is not available: {ok}")
        return lambda: [gemv_native.gemv(x, w) for w in weights]
    from torch._inductor import config as inductor_config

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
            for lin, w in zip(self.layers, weights, strict=True):
                lin.weight = torch.nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            return [lin(x) for lin in self.layers]

    fn = torch.compile(Stack().eval(), dynamic=False)
    with inductor_config.patch(freezing=True), torch.inference_mode():
        fn(x)
    return lambda: fn(x)


def measure(args) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shapes = {SHAPE_KEYS[k]: SHAPES[SHAPE_KEYS[k]] for k in args.shapes.split(",")}
    times = {s: {v: [] for v in variants} for s in shapes}
    nbytes, fns = {}, {}
    for shape, (d_out, d_in, n) in shapes.items():
        # weights at SmolLM2's scale (std ~0.02): values do not matter for the time, the bytes do
        ws = [(0.02 * torch.randn(d_out, d_in, generator=gen)).to(torch.bfloat16) for _ in range(n)]
        nbytes[shape] = sum(w.numel() * w.element_size() for w in ws)
        fns[shape] = {}
        for v in variants:
            print(f"building {shape} {v}", file=sys.stderr, flush=True)
            fns[shape][v] = build(v, ws, args.rows)
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            k = r % len(variants)
            for shape in shapes:
                for v in variants[k:] + variants[:k]:
                    t0 = time.perf_counter()
                    fns[shape][v]()
                    dt = time.perf_counter() - t0
                    if r:
                        times[shape][v].append(1e3 * dt)
    return {"times_ms": times, "bytes": nbytes}


def rows_of(data: dict) -> list[dict]:
    out = []
    for shape, per in data["times_ms"].items():
        read = per.get("read")
        for v, ms in per.items():
            med = statistics.median(ms)
            ratio = statistics.median(a / b for a, b in zip(ms, read, strict=True)) if read else None
            out.append({"shape": shape, "variant": v, "ms": med, "gb_s": data["bytes"][shape] / med / 1e6,
                        "x_read": ratio})  # fmt: skip
    return out


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"# Single-row linear layers against a plain read of the same bytes (bf16, {meta['rows']} row(s), "
        f"{meta['rounds']} rounds)",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}; CPU capability {meta['cpu_capability']}, {meta['threads']} thread(s), "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}, load average {meta['load_before']} before / "
        f"{meta['load_after']} after; {meta.get('note') or 'no note'}. Per shape, one pass over as many matrices as "
        "one SmolLM2-135M decode step reads; GB/s = bytes of the pass / its median time; x read = the pass's time / "
        "the same round's `read` pass (median over rounds).",
        "",
        "| shape | MB per pass | variant | median ms | GB/s | x read |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows_of(data):
        x = "" if r["x_read"] is None else f"{r['x_read']:.2f}"
        lines.append(
            f"| {r['shape']} | {data['bytes'][r['shape']] / 1e6:.1f} | {r['variant']} | {r['ms']:.2f} | "
            f"{r['gb_s']:.1f} | {x} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1 = one token)")
    ap.add_argument("--variants", default="read,linear,compiled,native")
    ap.add_argument("--shapes", default=",".join(SHAPE_KEYS), help="of " + ", ".join(SHAPE_KEYS))
    decode.add_results_arguments(ap, "gemv_bandwidth")
    args = ap.parse_args(argv)
    if decode.rendered(args, markdown):
        return
    out = args.out or RESULTS
    bad = [v for v in args.variants.split(",") if v.strip() not in VARIANTS]
    bad += [k for k in args.shapes.split(",") if k not in SHAPE_KEYS]
    if bad or args.rounds < 2 or args.rows < 1:
        sys.exit(
            f"error: --variants from {', '.join(VARIANTS)}, --shapes from {', '.join(SHAPE_KEYS)} (got {bad}), "
            "--rounds >= 2, --rows >= 1"
        )

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    got = measure(args)
    meta = decode.run_meta("gemv_bandwidth.py", argv, load_before, args.note, rows=args.rows, rounds=args.rounds,
                           threads=torch.get_num_threads())
    data = {"meta": meta, **got}
    decode.saved(data, out, args.name, markdown)


if __name__ == "__main__":
    main()
