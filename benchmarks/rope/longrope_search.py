"""LongRoPE search on SmolLM2-135M: searched factors versus PI, NTK and YaRN on held-out text at the target length.

The pydoc topics text (``longkit.eval.haystack.pydoc_text``) is split at the paragraph break nearest its middle:
the search calibrates on part A, and every method is scored on part B, which the search never saw, with
longkit's own perplexity task and eval runner (last half of each window scored). Both steps resume: the search
from its JSONL log, the held-out runs from the runner's records.

    nice -n 10 .venv/bin/python benchmarks/rope/longrope_search.py --target-length 16384 --budget 1200

Writes ``results/longrope_search_<target>.json`` (factors, calibration and held-out perplexities, timings),
``results/longrope_factors_<target>.json`` (the rope config: ``--rope longrope:config=FILE``) and the search
log ``results/longrope_search_<target>.log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import longkit
from longkit.eval.haystack import pydoc_text
from longkit.eval.records import load_records
from longkit.eval.runner import EvalConfig, evaluate, hardware
from longkit.tools.longrope_search import search_model

HERE = Path(__file__).resolve().parent


def split_text(text: str) -> tuple[str, str]:
    """(part A, part B): the text cut at the paragraph break nearest its middle."""
    middle = len(text) // 2
    cut = text.find("\n\n", middle)
    cut = cut if cut != -1 else middle
    return text[:cut].strip(), text[cut:].strip()


def heldout_ppl(run_dir: Path) -> dict[str, dict]:
    """Per method: pooled held-out perplexity, scored tokens and forward seconds."""
    out: dict[str, dict] = {}
    for r in load_records(run_dir):
        row = out.setdefault(r["method"], {"nll": 0.0, "n": 0, "seconds": 0.0})
        row["nll"] += float(r["nll_sum"])
        row["n"] += int(r["n_targets"])
        row["seconds"] += float(r["prefill_s"])
    return {
        m: {"ppl": math.exp(v["nll"] / v["n"]), "scored_tokens": v["n"], "seconds": round(v["seconds"], 1)}
        for m, v in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target-length", type=int, default=16384)
    ap.add_argument("--budget", type=float, default=1200.0, help="search budget in seconds")
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--parents", type=int, default=3)
    ap.add_argument("--mutations", type=int, default=2)
    ap.add_argument("--crossovers", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-windows", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--work", default="runs/bench-rope-longrope", help="scratch directory (held-out text, runs)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--report-only", action="store_true", help="summarise what the log and records hold; run nothing")
    args = ap.parse_args()

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.target_length // 1024}k"
    part_a, part_b = split_text(pydoc_text())
    heldout = work / "pydoc_part_b.txt"
    heldout.write_text(part_b)

    t0 = time.monotonic()
    if args.report_only:
        report(args, out, work, tag, None, None)
        return
    lm = longkit.load_model(args.model, dtype=args.dtype)

    def on_event(event: dict) -> None:
        if event["event"] != "replayed":
            print(
                f"[{time.monotonic() - t0:7.0f}s] {event['event']} gen {event['generation']} "
                f"ppl {event.get('ppl', float('nan')):.4f} best {event['best']:.4f}",
                flush=True,
            )

    settings = {
        "population": args.population,
        "parents": args.parents,
        "mutations": args.mutations,
        "crossovers": args.crossovers,
        "generations": args.generations,
        "seed": args.seed,
        "budget_s": args.budget,
    }
    result, config = search_model(
        lm,
        target_length=args.target_length,
        calibration_text=part_a,
        settings=settings,
        log_path=out / f"longrope_search_{tag}.log.jsonl",
        on_event=on_event,
        model_name=args.model,
    )
    config["search"]["calibration_file"] = "pydoc topics, part A (first half)"
    factors_path = out / f"longrope_factors_{tag}.json"
    factors_path.write_text(json.dumps(config, indent=2) + "\n")
    search_s = time.monotonic() - t0
    print(
        f"search: best {result.best_ppl:.4f} ({result.evaluated} evaluated, {result.replayed} replayed, "
        f"{result.generations_done} generations, stopped by {result.stopped_by})",
        flush=True,
    )

    factor = config["rope_parameters"]["factor"]
    # Cheapest answer first: linear and the searched factors, then the other references.
    methods = [
        f"rope=linear:factor={factor:g}",
        f"rope=longrope:config={factors_path.resolve()}",
        f"rope=yarn:factor={factor:g}",
        f"rope=ntk:factor={factor:g}",
        "baseline",
    ]
    run_dir = work / f"heldout-{tag}"
    evaluate(
        EvalConfig(
            model=args.model,
            methods=methods,
            tasks=["perplexity"],
            lengths=[args.target_length],
            samples=args.heldout_windows,
            ppl_text=str(heldout),
            dtype=args.dtype,
            run_dir=str(run_dir),
        ),
        lm=lm,
        argv=sys.argv,
    )
    report(args, out, work, tag, settings, round(search_s, 1))
    print(f"total wall {time.monotonic() - t0:.0f} s", flush=True)


def report(args: argparse.Namespace, out: Path, work: Path, tag: str, settings: dict | None, search_s: float | None):
    """Summarise the factors file and the held-out records into results/longrope_search_<tag>.json."""
    config = json.loads((out / f"longrope_factors_{tag}.json").read_text())
    run_dir = work / f"heldout-{tag}"
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    names = {"baseline": "baseline"}
    for label in run.get("methods", []):
        if label.startswith("rope="):
            names[label] = label.split("=", 1)[1].split(":")[0]
    table = {}
    for label, row in heldout_ppl(run_dir).items() if run_dir.is_dir() else []:
        name = names.get(label, label)
        table["longrope (searched)" if name == "longrope" else name] = row
    summary = {
        "model": args.model,
        "dtype": run.get("config", {}).get("dtype"),
        "target_length": args.target_length,
        "trained_length": config["rope_parameters"]["original_max_position_embeddings"],
        "factor": config["rope_parameters"]["factor"],
        "calibration": "pydoc topics part A; one window of the target length, last half scored",
        "heldout": f"pydoc topics part B; {args.heldout_windows} window(s) of the target length, last half scored",
        "search_settings": settings,
        "search": config["search"],
        "start_tokens": config["start_tokens"],
        "long_factor": config["rope_parameters"]["long_factor"],
        "heldout_ppl": table,
        "heldout_missing": [m for m in ("linear", "longrope (searched)", "yarn", "ntk", "baseline") if m not in table],
        "beats_linear": (
            table["longrope (searched)"]["ppl"] < table["linear"]["ppl"]
            if {"longrope (searched)", "linear"} <= set(table)
            else None
        ),
        "search_seconds": search_s,
        "hardware": hardware(),
        "note": "CPU timings taken while other jobs shared the 2 cores (contended); compare within this run only.",
        "command": " ".join(sys.argv),
    }
    (out / f"longrope_search_{tag}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nheld-out perplexity at {args.target_length} tokens ({args.model}):")
    for name, row in table.items():
        print(f"  {name:22s} {row['ppl']:10.4f}   ({row['scored_tokens']} tokens, {row['seconds']} s)")
    print(f"searched factors beat linear: {summary['beats_linear']}; missing: {summary['heldout_missing']}")


if __name__ == "__main__":
    main()
