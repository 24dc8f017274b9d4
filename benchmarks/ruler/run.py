"""RULER (13 tasks) on smollm2-135m at 4K and 8K: baseline and method combinations, resumable.

    python benchmarks/ruler/run.py --lengths 4096 --samples 3                      # baseline only
    python benchmarks/ruler/run.py --lengths 4096,8192 --samples 10 \
        --method rope=yarn:factor=2 --method kv=snapkv:ratio=0.25             # more combinations

    python benchmarks/ruler/run.py --combine smollm2-4k smollm2-8k               # one table from both runs
    python benchmarks/ruler/run.py --render smollm2-4k smollm2-8k                # rewrite ruler.md from the records

Runs the evaluation runner (one record per sample appended to ``results/<name>/samples.jsonl`` at once, so an
interrupted run resumes where it stopped) on RULER's 13 tasks; qa_1/qa_2 are the offline synthetic stand-ins
(``qa_1_synthetic``/``qa_2_synthetic``) unless ``--qa-data`` is given, and the table says so. Writes
``results/<name>/ruler.md`` (task x length per method, average, effective length at RULER's threshold 85.6)
and ``results/<name>/timing.json`` (the wall time of every invocation, samples computed, machine, and the
prefill + decode time summed over all records).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from longkit.eval import ruler
from longkit.eval.records import load_records
from longkit.eval.report import summarize
from longkit.eval.runner import EvalConfig, evaluate, hardware

HERE = Path(__file__).parent


def tasks(qa_data: bool) -> list[str]:
    return [t if not t.startswith("qa_") or qa_data else f"{t}_synthetic" for t in ruler.TASKS]


def table(summary: dict) -> str:
    lengths = summary["lengths"]
    lines = []
    for method in summary["methods"]:
        r = summary["per_method"][method].get("ruler")
        if not r:
            continue
        lines += [f"### {method}", "", "| task | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]  # fmt: skip
        for t in r["tasks"]:
            lines.append(f"| {t} | " + " | ".join(f"{r['table'][t].get(n, float('nan')):.1f}" for n in lengths) + " |")
        lines.append(
            "| **average** | " + " | ".join(f"**{r['average'].get(n, float('nan')):.1f}**" for n in lengths) + " |"
        )
        lines += ["", f"effective length (> 85.6): {r['effective_length']}; complete 13 tasks: {r['complete']}"]
        if r["synthetic_qa"]:
            lines.append(f"synthetic qa (not RULER's SQuAD/HotpotQA): {', '.join(r['synthetic_qa'])}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--method", action="append", default=[], help="a method combination besides the baseline")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--task", action="append", default=None, help="a subset of RULER's tasks (default: all 13)")
    ap.add_argument("--qa-data", action="store_true", help="qa_1/qa_2 from $LONGKIT_RULER_SQUAD/_HOTPOTQA")
    ap.add_argument("--name", default=None, help="results sub-directory (default: derived from the settings)")
    ap.add_argument("--combine", nargs="+", metavar="NAME",
                    help="only write one task x (method, length) table from these result directories")  # fmt: skip
    ap.add_argument("--render", nargs="+", metavar="NAME", help="only rewrite results/NAME/ruler.md from its records")
    args = ap.parse_args()
    if args.combine:
        print(combined([HERE / "results" / n for n in args.combine]))
        return
    if args.render:
        for n in args.render:
            (HERE / "results" / n / "ruler.md").write_text(table(summarize(HERE / "results" / n)) + "\n")
        return
    methods = ([] if args.no_baseline else ["baseline"]) + args.method
    lengths = [int(n) for n in args.lengths.split(",")]
    names = tasks(args.qa_data) if args.task is None else args.task
    name = args.name or f"{Path(args.model).name}-{'-'.join(map(str, lengths))}-n{args.samples}"
    out = HERE / "results" / name
    cfg = EvalConfig(model=args.model, methods=methods, tasks=names, lengths=lengths, depths=[0.5],
                     samples=args.samples, run_dir=str(out))  # fmt: skip
    before = len(load_records(out)) if out.exists() else 0
    start = time.perf_counter()
    evaluate(cfg, progress=True)
    wall = time.perf_counter() - start
    computed = len(load_records(out)) - before
    summary = summarize(out)
    (out / "ruler.md").write_text(table(summary) + "\n")
    timing = {
        "wall_s": round(wall, 1),
        "samples_computed": computed,
        "s_per_sample": round(wall / computed, 2) if computed else None,
        "nice": os.nice(0),
        "hardware": hardware(),
        "python": platform.python_version(),
        "note": "CPU shared with other jobs unless stated otherwise",
    }
    write_timing(out, timing)
    print(table(summary))
    print(json.dumps({k: timing[k] for k in ("wall_s", "samples_computed", "s_per_sample")}))


def write_timing(out: Path, timing: dict) -> None:
    """Add this invocation to ``timing.json``; a resumed run keeps the wall time of every earlier invocation.

    The record-level time (prefill + decode summed over all samples) is the run's total compute, whichever
    invocation computed each sample.
    """
    path = out / "timing.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    # A file from before invocations were kept is itself one invocation.
    history = old.get("invocations", [old] if old else []) + [timing]
    records = load_records(out)
    total = {
        "invocations": history,
        "wall_s": round(sum(t["wall_s"] for t in history), 1),
        "samples": len(records),
        "compute_s": round(sum((r.get("prefill_s") or 0) + (r.get("decode_s") or 0) for r in records), 1),
    }
    path.write_text(json.dumps(total, indent=2) + "\n")


def combined(dirs: list[Path]) -> str:
    """One markdown table, task x (method, length), from several result directories (e.g. the 4K and 8K runs)."""
    columns: list[tuple[str, int]] = []
    cells: dict[tuple[str, int], dict] = {}
    tasks: list[str] = []
    samples: dict[tuple[str, int], set] = {}
    for d in dirs:
        summary = summarize(d)
        records = [r for r in load_records(d) if r.get("score") is not None]
        for method in summary["methods"]:
            r = summary["per_method"][method].get("ruler")
            if not r:
                continue
            tasks += [t for t in r["tasks"] if t not in tasks]
            for n in summary["lengths"]:
                if n in r["average"] and (method, n) not in cells:
                    columns.append((method, n))
                    cells[(method, n)] = {t: r["table"][t].get(n) for t in r["tasks"]} | {"average": r["average"][n]}
                    samples[(method, n)] = {
                        len([x for x in records if x["method"] == method and x["length"] == n and x["task"] == t])
                        for t in r["tasks"]
                    }
    order = list(dict.fromkeys(m for m, _ in columns))
    columns.sort(key=lambda c: (c[1], order.index(c[0])))

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    head = [f"`{m}` {n // 1024}K" for m, n in columns]
    lines = ["| task | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(fmt(cells[c].get(t)) for c in columns) + " |")

    def average(c: tuple[str, int]) -> str:
        # RULER averages its 13 tasks: an average over fewer is marked with how many it covers.
        n = sum(cells[c].get(t) is not None for t in tasks)
        return f"**{fmt(cells[c]['average'])}**" + ("" if n == len(tasks) else f" ({n}/{len(tasks)} tasks)")

    lines.append("| **average** | " + " | ".join(average(c) for c in columns) + " |")
    counts = " | ".join("/".join(map(str, sorted(samples[c]))) for c in columns)
    lines.append(f"| samples per task | {counts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
