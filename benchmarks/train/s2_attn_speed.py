"""S²-Attn forward+backward time against full causal attention (issue #20), with the replaced implementation.

One attention call at SmolLM2-135M's shape (B = 1, 9 query heads, 3 key/value heads, head dim 64) at each length
and dtype, forward then backward of ``out.float().sum()`` (gradients of q, k and v), timed for:

- ``full``: full causal attention, torch's sdpa (``is_causal``, ``enable_gqa``), as the model runs without S²-Attn;
- ``s2``: :func:`longkit.attention.s2_attn.s2_attention` (group = ``--ratio`` of the row, half the heads shifted);
- ``s2_before``: the implementation it replaced (commit 29b5914, kept here verbatim as :func:`s2_before`): one
  masked 5-D sdpa call per half, which torch's CPU sdpa runs on its math path;
- with ``--packed``, also ``full_packed`` and ``s2_packed``: the same with a block-causal document mask (documents
  of the lengths in ``PACKED_DOCS``, as fractions of the row), as packed training rows carry.

The inputs are laid out as transformers hands them over (``(B, T, H, D)`` transposed to ``(B, H, T, D)``). Every
repeat runs each implementation once, in the same order, so that a disturbance of the shared CPU falls on all of
them; the table gives the median of the repeats (a warm-up call of each is not counted). Wall time
(``perf_counter``) and this process's CPU time (``process_time``, all threads) are both recorded: on a CPU shared
with other work, CPU time is the steadier measure of the work done, wall time what a training step waits.
The ratios are taken within the run. ``OMP_WAIT_POLICY`` is recorded: with OpenMP's default spin-waiting the idle
thread spins between kernels, which on a loaded CPU costs S²-Attn (more, smaller ops) more than full attention. Each row also records the largest difference of ``s2`` from ``s2_before``
(and of ``s2_packed`` from ``s2_before`` with the same mask) as a check that the timed paths compute the same thing.

    nice -n 19 python benchmarks/train/s2_attn_speed.py

Writes ``benchmarks/train/results/NAME.json`` and ``NAME.md`` (``--name``, default ``s2_attn_speed``;
``--render``: only the ``.md``, from the ``.json`` and the hand-written ``NAME.notes.md`` if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NAME = "s2_attn_speed"
SHAPE = {"B": 1, "H": 9, "H_kv": 3, "D": 64}
PACKED_DOCS = (0.15, 0.4, 0.3, 0.15)
IMPLS = ("full", "s2", "s2_before")
PACKED = ("full_packed", "s2_packed")


def s2_before(q, k, v, group_size_ratio: float = 0.25, *, dense=None, scale=None):
    """The S²-Attn implementation replaced in issue #20 (longkit commit 29b5914, argument checks left out): the
    shifted half padded at the front to align its groups with multiples of ``g``, each half one sdpa call on
    (B, n, h, g, D) blocks with an explicit (n, g, g) bool mask."""
    import torch
    import torch.nn.functional as F

    def grouped(q, k, v, g, front, dense, scale):
        B, h, T, _ = q.shape
        n = -(-(front + T) // g)
        back = n * g - front - T

        def blocks(x):
            x = F.pad(x, (0, 0, front, back))
            return x.view(x.shape[0], x.shape[1], n, g, x.shape[-1]).transpose(1, 2)

        idx = torch.arange(n * g, device=q.device) - front
        real = ((idx >= 0) & (idx < T)).view(n, g)
        causal = torch.ones(g, g, dtype=torch.bool, device=q.device).tril()
        eye = torch.eye(g, dtype=torch.bool, device=q.device)
        visible = causal & (real[:, None, :] | eye)
        mask = visible[None, :, None]
        if dense is not None:
            d = F.pad(dense, (front, back, front, back))
            d = d.view(d.shape[0], d.shape[1], n, g, n, g).diagonal(dim1=2, dim2=4).permute(0, 4, 1, 2, 3)
            mask = mask & d
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | (empty & eye)
        out = F.scaled_dot_product_attention(
            blocks(q), blocks(k), blocks(v), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != h
        )
        out = out.masked_fill(empty, 0.0) if dense is not None else out
        return out.transpose(1, 2).reshape(B, h, n * g, -1)[:, :, front : front + T]

    H, H_kv, T = q.shape[1], k.shape[1], q.shape[2]
    g = max(1, int(T * group_size_ratio))
    s = g // 2
    rep, half = H // H_kv, H // 2
    outs = []
    for heads, front in ((range(0, half), 0), (range(half, H), (g - s) % g)):
        if not heads:
            continue
        qh = q[:, heads.start : heads.stop]
        if heads.start % rep == 0 and heads.stop % rep == 0:
            kv = slice(heads.start // rep, heads.stop // rep)
            kh, vh = k[:, kv], v[:, kv]
        else:
            kh = k.repeat_interleave(rep, dim=1)[:, heads.start : heads.stop]
            vh = v.repeat_interleave(rep, dim=1)[:, heads.start : heads.stop]
        dh = None if dense is None else dense if dense.shape[1] == 1 else dense[:, heads.start : heads.stop]
        outs.append(grouped(qh, kh, vh, g, front, dh, scale))
    return torch.cat(outs, dim=1)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _inputs(T: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    B, H, H_kv, D = SHAPE["B"], SHAPE["H"], SHAPE["H_kv"], SHAPE["D"]
    # (B, T, H, D) transposed to (B, H, T, D): the layout of transformers' query/key/value
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, H_kv, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, H_kv, D, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def document_mask(T: int):
    """(1, 1, T, T) block-causal bool mask of documents of ``PACKED_DOCS`` of the row (the last one takes the rest)."""
    import torch

    cuts = [0]
    for share in PACKED_DOCS[:-1]:
        cuts.append(cuts[-1] + int(T * share))
    doc = torch.zeros(T, dtype=torch.long)
    for c in cuts[1:]:
        doc[c:] += 1
    return ((doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[None, None]


def _impls(ratio: float, dense):
    import torch.nn.functional as F

    from longkit.attention.s2_attn import s2_attention

    return {
        "full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "s2": lambda q, k, v: s2_attention(q, k, v, ratio),
        "s2_before": lambda q, k, v: s2_before(q, k, v, ratio),
        "full_packed": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
        "s2_packed": lambda q, k, v: s2_attention(q, k, v, ratio, dense=dense),
    }


def _step(fn, q, k, v) -> tuple[float, float, object]:
    """Wall and CPU seconds of forward + backward, and the (detached) output."""
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*x)
    out.float().sum().backward()
    return time.perf_counter() - t0, time.process_time() - c0, out.detach()


def measure(T: int, dtype_name: str, args) -> dict:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    q, k, v = _inputs(T, dtype)
    dense = document_mask(T) if args.packed else None
    impls = _impls(args.ratio, dense)
    names = [*IMPLS, *(PACKED if args.packed else ())]
    outs = {}
    for name in names:  # warm-up, not counted
        outs[name] = _step(impls[name], q, k, v)[2].float()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            w, c, _ = _step(impls[name], q, k, v)
            wall[name].append(round(w, 4))
            cpu[name].append(round(c, 4))
    row = {"T": T, "dtype": dtype_name, "group": max(1, int(T * args.ratio)), "wall_s": wall, "cpu_s": cpu,
           "max_abs_diff_s2_vs_before": round(float((outs["s2"] - outs["s2_before"]).abs().max()), 6)}
    if args.packed:
        before = s2_before(q, k, v, args.ratio, dense=dense).float()
        row["max_abs_diff_s2_packed_vs_before"] = round(float((outs["s2_packed"] - before).abs().max()), 6)
    return row


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown(meta: dict, rows: list[dict], notes: Path | None = None) -> str:
    """The tables of a run's records, then the hand-written ``notes`` file (results/NAME.notes.md) if it exists."""
    shape = meta["shape"]
    lines = [
        "# S²-Attn forward+backward vs full causal attention (CPU)",
        "",
        f"`{meta['command']}`",
        "",
        f"CPU: {meta['cpu_capability']}, {meta['threads']} torch threads ({meta['cpus']} CPUs, nice {meta['nice']}), "
        f"OMP_WAIT_POLICY {meta.get('omp_wait_policy') or 'unset (OpenMP default: spin, then sleep)'}; "
        f"torch {meta['torch']}. Shape: B={shape['B']}, H={shape['H']}, H_kv={shape['H_kv']}, D={shape['D']} "
        f"(SmolLM2-135M); group = {meta['ratio']} of the row, half the heads shifted. Forward + backward of one "
        f"attention call, median of {meta['repeats']} repeats (each repeat runs every implementation once, in "
        f"the order of the columns); load average {meta['load_start'][0]:.2f} at the start, "
        f"{meta.get('load_end', ['?'])[0]} at the end.",
        "",
        "`full`: torch sdpa, `is_causal`. `s2`: longkit's S²-Attn. `s2_before`: the implementation `s2` replaced "
        "(one masked 5-D sdpa call per half: torch's CPU math path).",
        "",
        "| T | dtype | group | full (s) | s2 (s) | s2_before (s) | **s2 / full** | s2_before / full | "
        "s2_before / s2 | s2 / full, CPU time | s2_before / full, CPU time | max abs diff s2 vs before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, c = {n: _med(x) for n, x in r["wall_s"].items()}, {n: _med(x) for n, x in r["cpu_s"].items()}
        lines.append(
            f"| {r['T']} | {r['dtype']} | {r['group']} | {w['full']:.3f} | {w['s2']:.3f} | {w['s2_before']:.3f} | "
            f"**{w['s2'] / w['full']:.2f}** | {w['s2_before'] / w['full']:.2f} | {w['s2_before'] / w['s2']:.2f} | "
            f"{c['s2'] / c['full']:.2f} | {c['s2_before'] / c['full']:.2f} | {r['max_abs_diff_s2_vs_before']:g} |"
        )
    packed = [r for r in rows if "s2_packed" in r["wall_s"]]
    if packed:
        docs = ", ".join(f"{x:g}" for x in meta["packed_docs"])
        lines += [
            "",
            f"With a block-causal document mask (documents of {docs} of the row), as packed rows carry: "
            "`full_packed` is torch sdpa with the (T, T) bool mask, `s2_packed` S²-Attn with it as `dense` "
            "(per-group mask blocks).",
            "",
            "| T | dtype | full_packed (s) | s2_packed (s) | **s2_packed / full_packed** | CPU time ratio | "
            "max abs diff vs s2_before |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in packed:
            w, c = {n: _med(x) for n, x in r["wall_s"].items()}, {n: _med(x) for n, x in r["cpu_s"].items()}
            lines.append(
                f"| {r['T']} | {r['dtype']} | {w['full_packed']:.3f} | {w['s2_packed']:.3f} | "
                f"**{w['s2_packed'] / w['full_packed']:.2f}** | {c['s2_packed'] / c['full_packed']:.2f} | "
                f"{r['max_abs_diff_s2_packed_vs_before']:g} |"
            )
    if meta.get("partial"):
        lines += ["", f"**Partial:** {meta['partial']}"]
    text = "\n".join(lines) + "\n"
    return text + "\n" + notes.read_text() if notes is not None and notes.is_file() else text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-packed", dest="packed", action="store_false", help="leave out the document-mask rows")
    ap.add_argument("--name", default=NAME, help="results/NAME.json and NAME.md")
    ap.add_argument("--render", action="store_true", help="only rebuild NAME.md from the committed NAME.json")
    args = ap.parse_args(argv)
    name = args.name
    if args.render:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(markdown(data["meta"], data["rows"], RESULTS / f"{name}.notes.md"))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"command": "nice -n 19 python benchmarks/train/s2_attn_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "shape": SHAPE, "ratio": args.ratio, "repeats": args.repeats, "packed_docs": list(PACKED_DOCS),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "nice": os.nice(0), "python": platform.python_version(),
            "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "load_start": _load()}
    meta["command"] = meta["command"].rstrip()
    rows: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    cases = [(int(T), d) for T in args.lengths.split(",") for d in args.dtypes.split(",")]
    for T, d in cases:
        rows.append(measure(T, d, args))
        print(json.dumps(rows[-1]), flush=True)
        # Written after each case, marked partial, so that a stopped benchmark still leaves what it measured.
        meta["partial"] = f"{len(rows)} of {len(cases)} cases measured"
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    meta.pop("partial")
    meta["load_end"] = _load()
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    # A new run: notes on an earlier run under this name no longer apply (they are not rendered).
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
