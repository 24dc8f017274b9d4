"""RoPE room benchmark: every RoPE scaling method and position-remap attention method, side by side on one model.

Passkey and needle accuracy over depths, and perplexity on public-domain text (Python's pydoc topics), at
0.5x, 1x and 2x the trained length (4K, 8K, 16K on SmolLM2-135M; ``--lengths`` adds 32K), for the baseline and
each method at extension factor 2 and 4, with prefill time, peak memory and KV-cache bytes relative to the
baseline measured in the same run. Built on longkit's eval runner, so an interrupted run resumes from its records.

    nice -n 10 .venv/bin/python benchmarks/rope/run.py            # the full grid (hours on a 2-core CPU)
    nice -n 10 .venv/bin/python benchmarks/rope/run.py --quick    # a few methods at 4K and 8K, depth 0.5

Settings per method at factor f (trained length L):
  linear, ntk, dynamic, yarn: factor=f; llama3: factor=f, low/high 1/4 (Llama 3.1); abf: rope_theta = the NTK base
  of factor f (base * f^(d/(d-2))); longrope: the searched factors in results/longrope_factors_<fL>.json if present.
  self_extend: window L/4 and the smallest group G with (L - L/4) * G + L/4 >= f*L (G = 3 at f=2, 5 at f=4);
  leaky_rerope: window L/2, leak 2f - 1 (the farthest distance f*L maps to L); rerope: window L/2 (no factor);
  dca: chunk L*3/4, local window L/8; lm_infinite: window L (no factor); logn: trained length L (no factor);
  entropy_scaling: composed with abf at the largest factor (Entropy-Aware ABF).
The grid can be run in parts into one run directory (e.g. ``--lengths 16384 --tasks passkey,perplexity`` first);
the table and report cover every record the directory holds.
Methods not registered in this checkout are skipped and listed in the results.

Writes results/<name>/ (summary.json, report.html, score_vs_length.png, perplexity.png, grid.png, table.md,
results.json); ``--render --name NAME`` only rewrites table.md and grid.png from results/NAME/run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import longkit
from longkit.eval.report import summarize, write_report
from longkit.eval.runner import EvalConfig, evaluate, hardware
from longkit.registry import registry

HERE = Path(__file__).resolve().parent


def method_grid(lm, factors: list[float]) -> tuple[list[str], list[str]]:
    """(method specs for the runner, names skipped because they are not registered)."""
    from longkit.models.introspect import head_dim_of, rope_config

    cfg = rope_config(lm.model)
    L = lm.trained_length
    d = int(head_dim_of(cfg) * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    base = float(cfg.rope_parameters["rope_theta"])
    rope, attention = set(registry("rope")), set(registry("attention"))
    specs: list[str] = []
    skipped: list[str] = []

    def add(kind: str, name: str, spec: str) -> None:
        if name in (rope if kind == "rope" else attention):
            specs.append(f"{kind}={spec}")
        elif name not in skipped:
            skipped.append(name)

    for f in factors:
        for name in ("linear", "ntk", "dynamic", "yarn"):
            add("rope", name, f"{name}:factor={f:g}")
        add("rope", "llama3", f"llama3:factor={f:g},original_max_position_embeddings={L}")
        add("rope", "abf", f"abf:rope_theta={base * f ** (d / (d - 2)):.6g}")
        searched = HERE / "results" / f"longrope_factors_{int(f * L) // 1024}k.json"
        if searched.is_file():
            add("rope", "longrope", f"longrope:config={searched}")
        window = L // 4
        group = math.ceil((f * L - window) / (L - window))
        add("attention", "self_extend", f"self_extend:group_size={group},window={window}")
        add("attention", "leaky_rerope", f"leaky_rerope:window={L // 2},leak={2 * f - 1:g}")
        add("attention", "dca", f"dca:chunk_size={3 * L // 4},local_window={L // 8}")
    # Entropy-Aware ABF: the base change of the largest factor plus log-n scaling from layer 3 on.
    if "abf" in rope and "entropy_scaling" in attention:
        specs.append(f"rope=abf:rope_theta={base * max(factors) ** (d / (d - 2)):.6g}+attention=entropy_scaling")
    else:
        skipped.append("entropy_scaling")
    add("attention", "rerope", f"rerope:window={L // 2}")
    add("attention", "lm_infinite", f"lm_infinite:window={L}")
    add("attention", "logn", f"logn:trained={L}")
    return list(dict.fromkeys(specs)), skipped


def cost_table(summary: dict) -> dict[str, dict[int, dict[str, float | None]]]:
    """Per method and length: prefill time and KV bytes as ratios to the baseline's at that length."""
    per = summary["per_method"]
    base = per.get("baseline", {}).get("cost", {}).get("by_length", {})
    out: dict[str, dict[int, dict[str, float | None]]] = {}
    for method, data in per.items():
        rows = {}
        for length, cost in data["cost"]["by_length"].items():
            ref = base.get(length, {})
            rows[int(length)] = {
                key + "_ratio": (cost[key] / ref[key]) if cost.get(key) and ref.get(key) else None
                for key in ("prefill_s", "kv_bytes", "peak_mem_bytes")
            }
        out[method] = rows
    return out


def display(method: str) -> str:
    """A method's label as shown in tables and figures: config files relative to the repository, not absolute.

    The records keep the absolute path of the checkout that ran them, which need not be this one.
    """
    room = f"{HERE.relative_to(HERE.parents[1])}/"  # benchmarks/rope/
    return re.sub(rf"=/\S*?/{re.escape(room)}", f"={room}", method)


def write_table(run_dir: Path, out: Path) -> str:
    """Write out/table.md and out/grid.png from every record in ``run_dir``; return the table."""
    summary = summarize(run_dir)
    costs = cost_table(summary)
    # The directory may hold earlier parts of the grid (other lengths or tasks): report all of it.
    table = markdown(summary, costs, summary["lengths"])
    (out / "table.md").write_text(table)
    grid_figure(summary, costs, summary["lengths"], out / "grid.png")
    return table


def markdown(summary: dict, costs: dict, lengths: list[int]) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n % 1024 == 0 else str(n)

    tasks = summary["tasks"]
    head = ["method"]
    for task in tasks:
        head += [f"{task} {k(n)}" for n in lengths]
    head += [f"ppl {k(n)}" for n in lengths] + [f"prefill x {k(n)}" for n in lengths]
    # Peak memory (on CPU the resident set above the pre-sample level; allocator reuse makes it noisy) is shown at
    # the longest length only, where the KV cache and activations are largest, to keep the table narrow.
    head += [f"peak mem x {k(max(lengths))}", "KV x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in summary["methods"]:
        data = summary["per_method"][method]
        row = [f"`{display(method)}`"]
        for task in tasks:
            means = data["tasks"].get(task, {}).get("mean_by_length", {})
            row += [f"{means[n]:.0f}" if n in means else "-" for n in lengths]
        ppl = (data.get("perplexity") or {}).get("ppl_by_length", {})
        row += [f"{ppl[n]:.2f}" if n in ppl else "-" for n in lengths]
        c = costs.get(method, {})
        row += [f"{c[n]['prefill_s_ratio']:.2f}" if c.get(n, {}).get("prefill_s_ratio") else "-" for n in lengths]
        peak = c.get(max(lengths), {}).get("peak_mem_bytes_ratio")
        row.append(f"{peak:.2f}" if peak else "-")
        kv = [c[n]["kv_bytes_ratio"] for n in lengths if c.get(n, {}).get("kv_bytes_ratio")]
        row.append(f"{max(kv):.2f}" if kv else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def grid_figure(summary: dict, costs: dict, lengths: list[int], path: Path) -> None:
    """One paper-ready figure of the whole grid: a row per method, coloured cells with their values.

    Passkey (and needle) accuracy red to green; perplexity by its ratio to the baseline's at the trained
    length (green = no worse, red = 10x); prefill time at the longest length as a ratio to the baseline's.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def k(n: int) -> str:
        return f"{n // 1024}K" if n % 1024 == 0 else str(n)

    methods, per = summary["methods"], summary["per_method"]
    trained = summary.get("model", {}).get("trained_length") or lengths[-1] // 2
    base_ppl = (per.get("baseline", {}).get("perplexity") or {}).get("ppl_by_length", {})
    ref = base_ppl.get(trained) or min(base_ppl.values(), default=None)
    columns: list[tuple[str, list[float | None], Any, Any]] = []
    good_bad = colormaps["RdYlGn"]
    for task in summary["tasks"]:
        for n in lengths:
            vals = [per[m]["tasks"].get(task, {}).get("mean_by_length", {}).get(n) for m in methods]
            columns.append((f"{task}\n{k(n)}", vals, lambda v: good_bad(v / 100), lambda v: f"{v:.0f}"))
    for n in lengths:
        vals = [((per[m].get("perplexity") or {}).get("ppl_by_length") or {}).get(n) for m in methods]
        columns.append(
            (
                f"PPL\n{k(n)}",
                vals,
                lambda v: good_bad(1 - min(1.0, max(0.0, math.log(v / ref) / math.log(10)))) if ref else (1, 1, 1, 1),
                lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}",
            )
        )
    longest = lengths[-1]
    vals = [costs.get(m, {}).get(longest, {}).get("prefill_s_ratio") for m in methods]
    columns.append(
        (
            f"prefill x\n{k(longest)}",
            vals,
            lambda v: colormaps["Blues"](min(1.0, max(0.0, (v - 0.5) / 3.0))),
            lambda v: f"{v:.2f}",
        )
    )
    rgba = np.ones((len(methods), len(columns), 4))
    labels = [display(m) for m in methods]
    fig = Figure(
        figsize=(2.2 + 0.085 * max(len(m) for m in labels) + 0.62 * len(columns), 0.9 + 0.3 * len(methods)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for j, (_, values, colour, _) in enumerate(columns):
        for i, v in enumerate(values):
            if v is not None and math.isfinite(v):
                rgba[i, j] = colour(v)
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    for j, (_, values, _, fmt) in enumerate(columns):
        for i, v in enumerate(values):
            text = "-" if v is None or not math.isfinite(v) else fmt(v)
            # white on dark cells (relative luminance below 0.35), black elsewhere
            dark = 0.2126 * rgba[i, j, 0] + 0.7152 * rgba[i, j, 1] + 0.0722 * rgba[i, j, 2] < 0.35
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(methods)), labels, fontsize=8)
    ax.tick_params(length=0)
    for j in range(1, len(columns)):
        if columns[j][0].split("\n")[0] != columns[j - 1][0].split("\n")[0]:
            ax.axvline(j - 0.5, color="black", linewidth=1.2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    model = summary.get("model", {}).get("name", "")
    ax.set_title(
        f"{model}: accuracy (%), perplexity (green = baseline's at {k(trained)}, red = 10x) and prefill time vs baseline",
        fontsize=9,
    )
    fig.savefig(path, dpi=150)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="baseline, linear/yarn f=2, self_extend f=2; 4K and 8K")
    ap.add_argument("--lengths", default=None, help="comma-separated token counts (default 0.5x, 1x, 2x trained)")
    ap.add_argument("--factors", default="2,4")
    ap.add_argument("--tasks", default="passkey,needle,perplexity")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--name", default=None, help="results sub-directory (default: full, or quick)")
    ap.add_argument("--run-dir", default=None, help="runner directory (default: results/<name>/run)")
    ap.add_argument("--render", action="store_true", help="only rewrite table.md and grid.png from the run's records")
    args = ap.parse_args()
    if args.render:
        out = HERE / "results" / (args.name or "full")
        print(write_table(Path(args.run_dir) if args.run_dir else out / "run", out))
        return

    t0 = time.monotonic()
    lm = longkit.load_model(args.model, dtype=args.dtype)
    L = lm.trained_length
    factors = [float(f) for f in args.factors.split(",")]
    specs, skipped = method_grid(lm, factors)
    if args.quick:
        keep = ("rope=linear:factor=2", "rope=yarn:factor=2", "attention=self_extend")
        specs = [s for s in specs if s.startswith(keep) and ("self_extend" not in s or f"window={L // 4}" in s)][:3]
        lengths = [L // 2, L]
        tasks, depths = ["passkey", "perplexity"], [0.5]
    else:
        lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else [L // 2, L, 2 * L]
        tasks, depths = args.tasks.split(","), [float(x) for x in args.depths.split(",")]
    name = args.name or ("quick" if args.quick else "full")
    out = HERE / "results" / name
    # The per-sample records live beside the results and are committed with them: a later session resumes
    # the grid (more tasks, depths or lengths) instead of recomputing it.
    run_dir = Path(args.run_dir) if args.run_dir else out / "run"
    config = EvalConfig(
        model=args.model,
        methods=["baseline", *specs],
        tasks=tasks,
        lengths=lengths,
        depths=depths,
        samples=args.samples,
        dtype=args.dtype,
        run_dir=str(run_dir),
    )
    # One short forward first, so the baseline's first sample does not pay the warm-up in the cost ratios.
    with torch.inference_mode():
        lm.model(torch.ones(1, 256, dtype=torch.long, device=lm.model.device))
    evaluate(config, lm=lm, argv=sys.argv)
    write_report(run_dir, out_dir=out)
    table = write_table(run_dir, out)
    summary = summarize(run_dir)
    (out / "results.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "dtype": lm.dtype,
                "trained_length": L,
                "lengths": summary["lengths"],
                "tasks": summary["tasks"],
                "depths": depths,
                "samples": args.samples,
                "methods": ["baseline", *specs],
                "skipped_unregistered": skipped,
                "cost_ratios_vs_baseline": cost_table(summary),
                "wall_s": round(time.monotonic() - t0, 1),
                "hardware": hardware(),
                "note": "timings on a shared CPU; ratios are against the baseline of the same run",
                "command": " ".join(sys.argv),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(table)
    print(f"wrote {out}/ (table.md, report.html, plots); wall {time.monotonic() - t0:.0f} s; skipped: {skipped}")


if __name__ == "__main__":
    main()
