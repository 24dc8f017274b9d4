"""Sparse-prefill accuracy and speed table from a ``longkit eval`` run directory (its ``samples.jsonl``).

For every method of the run: passkey (or any scored task) accuracy per depth with the sample count, the
perplexity, the median prefill time of the scored prompts, and the speed against a reference method (dense) on
the *same prompts*: the median over prompts of reference prefill time / method prefill time, so prompts that only
one side has do not skew it. Run::

    .venv/bin/python benchmarks/attention/sparse_table.py benchmarks/attention/results/sparse_16k \\
        --reference rope=ntk:factor=4
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path


def load(run_dir: str | Path) -> list[dict]:
    """The run's records; a later record with the same id replaces an earlier one (as the runner resumes)."""
    from longkit.eval.records import SAMPLES_FILE, load_records

    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise SystemExit(f"run_dir: {path} does not exist; pass the --out directory of a longkit eval run")
    return load_records(run_dir)


def prompt_key(rec: dict) -> tuple:
    """What identifies a prompt across methods: task, length, depth, sample."""
    return rec["task"], rec["length"], rec.get("depth"), rec["sample"]


def table(records: list[dict], reference: str | None) -> str:
    """Markdown table, one row per method in order of first appearance."""
    lengths = sorted({r["length"] for r in records})
    if len(lengths) > 1:
        raise SystemExit(f"run_dir holds lengths {lengths}; the table pools prompts, so it needs a run of one length")
    methods = list(dict.fromkeys(r["method"] for r in records))
    if reference is not None and reference not in methods:
        raise SystemExit(f"--reference {reference!r} is not a method of this run; methods: {methods}")
    scored = [r for r in records if r.get("score") is not None]
    depths = sorted({r["depth"] for r in scored if r.get("depth") is not None})
    tasks = list(dict.fromkeys(r["task"] for r in scored))
    time_of = {(r["method"], prompt_key(r)): r["prefill_s"] for r in records if r.get("prefill_s")}

    head = ["method"]
    for task in tasks:
        head += [f"{task} d={d:g}" for d in depths] + [f"{task} all"]
    head += ["ppl", "prefill s (median)", f"vs {reference}" if reference else "speed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        row = [f"`{m}`"]
        for task in tasks:
            cells = defaultdict(list)
            for r in mine:
                if r["task"] == task and r.get("score") is not None:
                    cells[r["depth"]].append(r["score"])
            every = [s for d in depths for s in cells[d]]
            row += [_acc(cells[d]) for d in depths] + [_acc(every)]
        ppl = [r for r in mine if r["task"] == "perplexity" and r.get("n_targets")]
        nll = sum(r["nll_sum"] for r in ppl)
        row.append(f"{math.exp(nll / sum(r['n_targets'] for r in ppl)):.2f}" if ppl else "")
        times = [r["prefill_s"] for r in mine if r.get("score") is not None and r.get("prefill_s")]
        row.append(f"{statistics.median(times):.0f}" if times else "")
        ratios = [
            time_of[(reference, prompt_key(r))] / r["prefill_s"]
            for r in mine
            if reference and r.get("score") is not None and r.get("prefill_s") and (reference, prompt_key(r)) in time_of
        ]
        row.append(f"{statistics.median(ratios):.2f}x" if ratios else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _acc(scores: list[float]) -> str:
    """Mean score and the sample count: ``67 (3)``; empty when there are none."""
    return f"{sum(scores) / len(scores):.0f} ({len(scores)})" if scores else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="the --out directory of a longkit eval run")
    ap.add_argument("--reference", default=None, help="method whose prefill times the ratios divide (dense)")
    ap.add_argument("--write", action="store_true", help="also write RUN_DIR/table.md")
    args = ap.parse_args()
    text = table(load(args.run_dir), args.reference)
    if args.write:
        (Path(args.run_dir) / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
