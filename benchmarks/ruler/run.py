"""RULER (13 tasks) on smollm2-135m at 4K and 8K: baseline and method combinations, resumable.

    python benchmarks/ruler/run.py --lengths 4096 --samples 3                      # baseline only
    python benchmarks/ruler/run.py --lengths 4096,8192 --samples 10 \
        --method rope=yarn:factor=2 --method kv=snapkv:ratio=0.25             # more combinations

Runs the evaluation runner (one record per sample appended to ``results/<name>/samples.jsonl`` at once, so an
interrupted run resumes where it stopped) on RULER's 13 tasks; qa_1/qa_2 are the offline synthetic stand-ins
(``qa_1_synthetic``/``qa_2_synthetic``) unless ``--qa-data`` is given, and the table says so. Writes
``results/<name>/ruler.md`` (task x length per method, average, effective length at RULER's threshold 85.6)
and ``results/<name>/timing.json`` (wall time of this invocation, samples computed, machine).
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
    args = ap.parse_args()
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
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(table(summary))
    print(json.dumps({k: timing[k] for k in ("wall_s", "samples_computed", "s_per_sample")}))


if __name__ == "__main__":
    main()
