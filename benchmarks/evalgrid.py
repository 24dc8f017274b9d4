"""What the benchmark scripts that run a grid of ``longkit eval`` steps share: the steps, their records, the
same-prompt check, per-row summaries and the markdown helpers of their tables.

A grid is a set of steps, one ``longkit eval`` each, into its own run directory ``<results>/<row>-<bucket>-<tasks>``
(a bucket is one or more context lengths, a task group some tasks asked together): an interrupted or partial grid
still gives whole lengths of whole rows, and rerunning the same command resumes every directory where it stopped
(``longkit eval`` skips the samples already recorded). A step too costly to run is written as ``skipped.json``
with its reason instead, and the table says so. The table is rendered from the run directories only.

Used by benchmarks/train/extend_32k.py, benchmarks/memory/grid.py and benchmarks/models/gemma3_grid.py, which keep
their own rows, labels and table layout; they import it after putting this folder on ``sys.path``::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import evalgrid
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

LONGKIT = str(Path(sys.executable).with_name("longkit"))
SKIPPED_FILE = "skipped.json"
#: RULER's threshold (Llama-2-7B's 4K average; longkit.eval.metrics.RULER_THRESHOLD): a length counts when above it.
RULER_THRESHOLD = 85.6
#: The run.json settings that decide the prompts besides the model: every run of a grid must agree on them.
PROMPT_SETTINGS = ("seed", "haystack", "chat")


class Tasks(NamedTuple):
    """A task group: its tasks, samples per (length, depth), needle depths (None: the tasks draw their own), and the
    buckets it runs at."""

    tasks: tuple[str, ...]
    samples: int
    depths: str | None
    buckets: tuple[str, ...]

    def args(self, samples: int | None = None, depths: str | None = None) -> list[str]:
        """The ``longkit eval`` arguments that ask these tasks (``samples`` / ``depths``: tests' smaller grid)."""
        out = [a for t in self.tasks for a in ("--task", t)]
        if self.depths is not None:
            out += ["--depths", depths or self.depths]
        return [*out, "--samples", str(samples or self.samples)]


def planned(groups: Mapping[str, Tasks], bucket: str) -> list[str]:
    """The tasks the groups ask at a bucket, in order."""
    return [t for g in groups.values() if bucket in g.buckets for t in g.tasks]


class Method(NamedTuple):
    """A row of a grid: its label, its combination (a ``longkit eval --combo`` spec, ``baseline`` for the model as
    it is, or a rule from the bucket's length to one), its prefill chunk, the buckets it skips (why)."""

    label: str
    spec: str | Callable[[int], str]
    prefill_chunk: int | None = None
    skip: Mapping[str, str] = MappingProxyType({})

    def at(self, length: int) -> str:
        return self.spec(length) if callable(self.spec) else self.spec


class Step(NamedTuple):
    """One step of a grid: its run directory, and its ``longkit eval`` command or the record of its skip."""

    dir: Path
    cmd: list[str] | None
    skipped: dict | None


def run_dir(results: Path, row: str, bucket: str, tasks: str) -> Path:
    return results / f"{row}-{bucket}-{tasks}"


def eval_command(model: Sequence[str], asked: Sequence[str], lengths: str, out: Path,
                 extra: Sequence[str] = ()) -> list[str]:
    """``longkit eval --model MODEL [methods] TASKS --lengths L [extra] --no-report --out DIR``."""
    return [LONGKIT, "eval", "--model", *model, *asked, "--lengths", lengths, *extra, "--no-report", "--out", str(out)]


def model_args(model: str, spec: str) -> list[str]:
    """``--model`` and the methods of a step that runs one combination: the untouched model is the runner's
    baseline; a method runs alone, without it."""
    return [model, "--no-default-methods"] if spec == "baseline" else [model, "--no-baseline", "--combo", spec]


def grid_steps(args: Any, buckets: Mapping[str, int], groups: Mapping[str, Tasks],
               methods: Mapping[str, Method]) -> list[Step]:
    """Every step of a grid of (bucket, task group, method) as chosen by :func:`add_eval_arguments`' options: its
    run directory and ``longkit eval`` command, or the record of its skip."""
    results = Path(args.results)
    override = length_overrides(args.lengths_override, buckets)
    steps = []
    for bucket in names(args.buckets, buckets, "bucket"):
        nominal = buckets[bucket]
        for tasks in names(args.tasks, groups, "task group"):
            group = groups[tasks]
            if bucket not in group.buckets:
                continue
            for name in names(args.only, methods, "method"):
                method = methods[name]
                d = run_dir(results, name, bucket, tasks)
                spec = method.at(nominal)
                reason = method.skip.get(bucket)
                if reason and not args.force:
                    steps.append(Step(d, None, {"method": name, "bucket": bucket, "tasks": tasks, "spec": spec,
                                                "reason": reason}))
                    continue
                chunk = ["--prefill-chunk", str(method.prefill_chunk)] if method.prefill_chunk else []
                asked = group.args(args.samples_override, args.depths_override)
                cmd = eval_command(model_args(args.model, spec), asked, str(override.get(bucket, nominal)), d, chunk)
                steps.append(Step(d, cmd, None))
    return steps


def add_eval_arguments(parser: argparse.ArgumentParser, buckets: Collection[str], methods: Collection[str],
                       groups: Collection[str], model: str, results: Path) -> None:
    """The options of a grid's ``eval`` command (:func:`grid_steps` reads them), the tests' hidden ones included."""
    parser.add_argument("--buckets", default=",".join(buckets), help=f"of {', '.join(buckets)} (default: all)")
    parser.add_argument("--only", default="", help=f"methods, of {', '.join(methods)} (default: all)")
    parser.add_argument("--tasks", default="", help=f"task groups, of {', '.join(groups)} (default: all)")
    parser.add_argument("--force", action="store_true", help="run the (method, bucket) steps skipped by default too")
    parser.add_argument("--dry-run", action="store_true", help="print the steps; run and write nothing")
    # For tests: a tiny model and tiny lengths into another folder.
    parser.add_argument("--model", default=model, help=argparse.SUPPRESS)
    parser.add_argument("--lengths-override", default="", help=argparse.SUPPRESS)
    parser.add_argument("--samples-override", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--depths-override", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(results), help=argparse.SUPPRESS)


def names(text: str, valid: Iterable[str], what: str) -> list[str]:
    """A comma-separated choice among ``valid`` (all of them when empty), refused with the valid names."""
    valid = list(valid)
    chosen = [s.strip() for s in text.split(",") if s.strip()] if text else valid
    bad = [s for s in chosen if s not in valid]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; valid: {', '.join(valid)}")
    return chosen


def length_overrides(text: str, buckets: Iterable[str]) -> dict[str, int]:
    """``16k=1024,32k=2048``: tiny lengths for the buckets (tests); the method rules still see the bucket's length."""
    buckets = list(buckets)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        bucket, _, n = part.partition("=")
        if bucket not in buckets or not n.isdigit():
            raise SystemExit(f"--lengths-override expects BUCKET=TOKENS with BUCKET one of {', '.join(buckets)} "
                             f"(got {part!r})")
        out[bucket] = int(n)
    if len(set(out.values())) < len(out):
        raise SystemExit(f"--lengths-override gives two buckets one length ({text}): a length names its bucket")
    return out


def run_steps(steps: Iterable[Step], dry_run: bool = False) -> None:
    """Print every step and run it (nothing run or written with ``dry_run``); a skipped step writes its reason.
    A failed step does not stop the others; the failures are named at the end."""
    failed = []
    for step in steps:
        if step.skipped is not None:
            print(f"skip {step.dir.name}: {step.skipped['reason']}", flush=True)
            if not dry_run:
                step.dir.mkdir(parents=True, exist_ok=True)
                (step.dir / SKIPPED_FILE).write_text(json.dumps(step.skipped, indent=1, sort_keys=True) + "\n")
            continue
        print(" ".join(step.cmd), flush=True)
        if dry_run:
            continue
        # A step run with --force is no longer skipped.
        (step.dir / SKIPPED_FILE).unlink(missing_ok=True)
        if subprocess.run(step.cmd).returncode != 0:
            failed.append(step.dir.name)
    if failed:
        # Rerunning the same command resumes the failed ones.
        raise SystemExit(f"failed: {', '.join(failed)}")


# ----------------------------------------------------------------------------------------------------- records


def load(results: Path, tag: Callable[[str], dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(sample records, skip records, run.json configs) of every run directory ``*-*-*`` under ``results``.

    ``tag(directory name)`` gives the fields added to each of its records (``row``, the table row it belongs to,
    at least); it raises SystemExit for a directory that is not one of the grid's."""
    rows, skips, configs = [], [], []
    for d in sorted(p for p in results.glob("*-*-*") if p.is_dir()):
        fields = tag(d.name)
        if (d / SKIPPED_FILE).is_file():
            skips.append(json.loads((d / SKIPPED_FILE).read_text()))
        if (d / "run.json").is_file():
            configs.append({"dir": d.name, **json.loads((d / "run.json").read_text())["config"]})
        if not (d / "samples.jsonl").is_file():
            continue
        for line in (d / "samples.jsonl").read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), **fields})
    return rows, skips, configs


def grid_tagger(results: Path, rows: Iterable[str], buckets: Iterable[str], groups: Iterable[str]
                ) -> Callable[[str], dict]:
    """:func:`load`'s ``tag`` for run directories ``<row>-<bucket>-<tasks>``: ``row`` and ``bucket``."""
    rows, buckets, groups = set(rows), set(buckets), set(groups)

    def tag(name: str) -> dict:
        row, bucket, tasks = name.rsplit("-", 2)
        if row not in rows or bucket not in buckets or tasks not in groups:
            raise SystemExit(f"{results / name}: not a run directory of this grid (<method>-<bucket>-<tasks>)")
        return {"row": row, "bucket": bucket}

    return tag


def buckets_of(rows: list[dict]) -> dict[int, str]:
    """Each recorded context length's bucket; refused when a length was recorded under two buckets or a bucket at
    two lengths (a bucket is one length in these grids)."""
    bucket_of = {int(r["length"]): r["bucket"] for r in rows}
    if len(set(bucket_of.values())) < len(bucket_of) or any(bucket_of[int(r["length"])] != r["bucket"] for r in rows):
        raise SystemExit("a context length was recorded under two buckets (or a bucket at two lengths)")
    return bucket_of


def check_same_prompts(rows: list[dict], configs: list[dict], settings: Sequence[str] = PROMPT_SETTINGS) -> int:
    """Every run agrees on ``settings`` of its run.json, and every (task, length, depth, sample) was asked with
    the same answer and needle position in every run: the same prompts. Returns the number of prompts (perplexity
    windows have no answer and are not counted)."""
    for key in settings:
        values = {json.dumps(c.get(key)) for c in configs}
        if len(values) > 1:
            raise SystemExit(f"run directories disagree on {key}: "
                             + "; ".join(f"{c['dir']}: {c.get(key)!r}" for c in configs))
    seen: dict[tuple, tuple] = {}
    for r in rows:
        if r["task"] == "perplexity":
            continue
        k = (r["task"], r["length"], r.get("depth"), r["sample"])
        v = (tuple(r["answer"]), r.get("needle_start"))
        if seen.setdefault(k, v) != v:
            raise SystemExit(f"different prompts for {k}: {seen[k]} vs {v} ({r['row']}, {r['method']})")
    return len(seen)


# ----------------------------------------------------------------------------------------------------- summary


def seconds(r: dict) -> float:
    """Wall time of a sample: prefill and decode (summed over Self-Route's requests) plus retrieval or compression."""
    return sum(float(r.get(k) or 0.0) for k in ("prefill_s", "decode_s", "retrieval_s", "compress_s"))


def peak(r: dict) -> int | None:
    """The largest of the runner's peak (resident set above the sample's start on a CPU) and a compressor's."""
    values = [r.get(k) for k in ("peak_mem_bytes", "memory_peak_mem_bytes") if r.get(k) is not None]
    return max(values) if values else None


def tokens(r: dict) -> int | None:
    """Tokens the answering model processed: the memory methods record it; else the prompt and the answer."""
    if r.get("tokens_processed") is not None:
        return int(r["tokens_processed"])
    return int(r["n_tokens"]) + int(r.get("new_tokens") or 0) if r.get("n_tokens") is not None else None


def effective_length(mean: Mapping[int, float], threshold: float) -> int | None:
    """RULER's rule: the longest length whose score is above the threshold (None: no such length)."""
    passing = [n for n, s in mean.items() if s > threshold]
    return max(passing) if passing else None


def task_mean(scores: Mapping[str, Mapping[int, float]], tasks_at: Callable[[int], Sequence[str]],
              lengths: Iterable[int]) -> dict[int, float]:
    """The mean over the tasks ``tasks_at(length)`` at each length where all of them were measured."""
    return {n: sum(scores[t][n] for t in tasks_at(n)) / len(tasks_at(n)) for n in lengths
            if tasks_at(n) and all(n in scores.get(t, {}) for t in tasks_at(n))}


def summarize(rows: list[dict], tasks_at: Callable[[int], Sequence[str]], threshold: float) -> dict[str, dict]:
    """Per table row (the records' ``row``), by context length: ``scores`` per task (mean % correct) and ``n``
    (samples), ``ppl`` (exp of the pooled NLL per scored token), ``prefill_s`` (median), ``seconds`` (median
    :func:`seconds`: one sample slowed by another job, 4x the others in the memory grid's InfLLM 32K row, moved
    the mean by 20%), ``tokens`` (mean :func:`tokens`), ``peak`` and ``kv`` (the largest), ``mean`` (over
    ``tasks_at(length)``) and ``effective`` (:func:`effective_length`). Failed samples (no score) are left out;
    each script keeps the fields its table shows."""
    out: dict = {}
    for r in rows:
        ppl = r["task"] == "perplexity"
        if r.get("nll_sum" if ppl else "score") is None:
            continue  # a failed sample is not scored
        m = out.setdefault(r["row"], {"scores": {}, "ppl": {}, "prefill_s": {}, "seconds": {}, "tokens": {},
                                      "peak": {}, "kv": {}})
        n = int(r["length"])
        if ppl:
            nll, t = m["ppl"].setdefault(n, [0.0, 0])
            m["ppl"][n] = [nll + float(r["nll_sum"]), t + int(r["n_targets"])]
            continue
        m["scores"].setdefault(r["task"], {}).setdefault(n, []).append(float(r["score"]))
        if r.get("prefill_s") is not None:
            m["prefill_s"].setdefault(n, []).append(float(r["prefill_s"]))
        m["seconds"].setdefault(n, []).append(seconds(r))
        if tokens(r) is not None:
            m["tokens"].setdefault(n, []).append(tokens(r))
        if peak(r) is not None:
            m["peak"][n] = max(m["peak"].get(n, 0), peak(r))
        if r.get("kv_bytes") is not None:
            m["kv"][n] = max(m["kv"].get(n, 0), int(r["kv_bytes"]))
    for m in out.values():
        m["ppl"] = {n: math.exp(nll / t) for n, (nll, t) in m["ppl"].items()}
        m["n"] = {task: {n: len(v) for n, v in by.items()} for task, by in m["scores"].items()}
        m["scores"] = {task: {n: sum(v) / len(v) for n, v in by.items()} for task, by in m["scores"].items()}
        m["prefill_s"] = {n: sorted(v)[len(v) // 2] for n, v in m["prefill_s"].items()}
        m["seconds"] = {n: statistics.median(v) for n, v in m["seconds"].items()}
        m["tokens"] = {n: sum(v) / len(v) for n, v in m["tokens"].items()}
        lengths = sorted(set().union(*[set(by) for by in m["scores"].values()])) if m["scores"] else []
        m["mean"] = task_mean(m["scores"], tasks_at, lengths)
        m["effective"] = effective_length(m["mean"], threshold)
    return out


def empty_summary() -> dict:
    """A row's :func:`summarize` fields before any record (a row that is only skipped)."""
    return {f: {} for f in ("scores", "n", "ppl", "prefill_s", "seconds", "tokens", "peak", "kv", "mean")} | {
        "effective": None}


def jsonable(m: dict) -> dict:
    """A summary as its results.json holds it (length keys as strings)."""
    return json.loads(json.dumps(m, sort_keys=True))


def write(results: Path, text: str, summary: dict) -> None:
    """``table.md`` and ``results.json`` into the results folder, and the table to stdout."""
    (results / "table.md").write_text(text)
    (results / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(text)


# ----------------------------------------------------------------------------------------------------- markdown


def k(n: int) -> str:
    """A context length as the tables write it: 16K (a length that is not whole K: its tokens)."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def records_header(script: Path, results: Path, prompts: int, summary: Mapping[str, dict], keys: Sequence[str],
                   lengths: Sequence[int]) -> list[str]:
    """The lines under a grid table's title: how to render it, where its records are, the same-prompt check, and
    the combination each row ran at each length (a summary's ``label`` and ``specs``)."""
    repo = Path(__file__).resolve().parent.parent
    where = results.relative_to(repo) if results.is_relative_to(repo) else results.name
    lines = [f"`python {script.relative_to(repo)} render` (records in `{where}/`); {prompts} prompts; every method "
             "measured at a length was asked the same ones (checked: same answers and needle positions, same model "
             "and seed in every run.json).", "", "**Methods** (the combination each row ran at each length, as recorded)",
             "", row(["method", *map(k, lengths)]), "|---|" + "---|" * len(lengths)]
    for key in keys:
        specs = summary[key]["specs"]
        lines.append(row([summary[key]["label"], *(", ".join(f"`{s}`" for s in specs[n]) if n in specs else "-"
                                                    for n in lengths)]))
    return [*lines, ""]
