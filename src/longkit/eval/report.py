"""Turn an evaluation run directory into numbers (``summarize``) and a self-contained report (``write_report``).

The run format is the one of :mod:`longkit.eval.records`: ``run.json`` (metadata) + ``samples.jsonl`` (one
record per finished sample). A run that was interrupted is summarised from whatever records it holds.

``write_report`` writes, into ``out_dir`` (default: the run directory): ``summary.json`` (the dict returned by
``summarize``), ``report.html`` and the PNG figures it shows (``needle_heatmap.png``, ``score_vs_length.png``,
``perplexity.png``; each only when there is something to draw). When the evaluated model was trained by
``longkit train`` (run.json holds its ``train_report.json``, or the model directory does), the summary's
``training`` holds the training's numbers and the report a "Training" section with the loss curve, copied next to
it as ``train_loss.png``. Length keys of the summary are ints in Python and
strings in ``summary.json`` (JSON object keys are always strings).

Failed samples (records with ``error``: an endpoint request that failed for good) are never scored and never
dropped: each task, method and run counts them (``failed``, ``failed_by_length``, ``failure_reasons``), and the
aggregates they would bias, the effective length, the wAvgs and the mean over lengths, are not computed over a set
that has any (None, with ``not_computed`` saying why; shown as "n/a (3 failed)").
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import mean, median
from types import SimpleNamespace
from typing import Any

from longkit.errors import EvalError
from longkit.eval.metrics import RULER_THRESHOLD, effective_length, weighted_average
from longkit.eval.records import SAMPLES_FILE, TRAIN_LOSS_PLOT, load_records, load_run

PERPLEXITY = "perplexity"
NEEDLE = "needle"
# The colours of the needle-in-a-haystack heat-maps (gkamradt/LLMTest_NeedleInAHaystack): low red -> high green.
NIAH_COLOURS = ("#F0496E", "#EBB839", "#0CD79F")
DPI = 150
MIB = 1024 * 1024

# ----------------------------------------------------------------------------------------------------- numbers


def _ordered(preferred: Iterable[str] | None, seen: Iterable[str]) -> list[str]:
    """Names in ``seen``, in the order of ``preferred`` (run.json) first, then in order of first appearance."""
    present = list(dict.fromkeys(seen))
    head = [name for name in dict.fromkeys(preferred or []) if name in present]
    return head + [name for name in present if name not in head]


def _group_by_length(records: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[int(record["length"])].append(record)
    return {length: groups[length] for length in sorted(groups)}


def failed(record: dict[str, Any]) -> bool:
    """A sample whose request failed (its record carries ``error``): not scored, counted, retried on resume."""
    return record.get("error") is not None


def failed_note(n_failed: int) -> str:
    """Why an aggregate over a set with failed samples is not computed."""
    return (f"not computed: {n_failed} sample{'s' if n_failed != 1 else ''} failed and {'were' if n_failed != 1 else 'was'}"
            " not scored (their records carry 'error'); rerun the same command to retry them")


def effective_label(stats: dict[str, Any], fmt: Callable[[int], str]) -> str:
    """The effective length as shown in tables: ``fmt(length)``, "none", or "n/a (3 failed)"."""
    if stats.get("failed"):
        return f"n/a ({stats['failed']} failed)"
    value = stats.get("effective_length")
    return "none" if value is None else fmt(value)


def _score_stats(means: dict[int, float | None], threshold: float, n_failed: int = 0) -> dict[str, Any]:
    """Everything derived from a ``{length: mean score}`` curve; None where a mean is missing, and the aggregates
    None when samples failed (a curve with holes would pass or fail lengths it never measured)."""
    scored = {n: v for n, v in means.items() if v is not None}
    whole = not n_failed
    return {
        "mean_by_length": means,
        "mean": mean(scored.values()) if scored and whole else None,
        "effective_length": effective_length(scored, threshold) if whole else None,
        "wavg_inc": weighted_average(scored, increasing=True) if whole else None,
        "wavg_dec": weighted_average(scored, increasing=False) if whole else None,
        "failed": n_failed,
        "not_computed": None if whole else failed_note(n_failed),
    }


def _task_summary(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Per length: the mean of the scored samples, how many were scored and how many failed."""
    groups = _group_by_length(records)
    scores = {n: [float(r["score"]) for r in rs if not failed(r)] for n, rs in groups.items()}
    failures = {n: sum(map(failed, rs)) for n, rs in groups.items()}
    stats = _score_stats({n: mean(v) if v else None for n, v in scores.items()}, threshold, sum(failures.values()))
    stats["n_by_length"] = {n: len(v) for n, v in scores.items()}
    stats["failed_by_length"] = failures
    return stats


def _all_tasks_summary(tasks: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any]:
    # Each task weighs the same at a length, however many samples it has: mean over tasks of per-task means.
    # A length where some task has failed samples has no mean over all tasks (it would be over the rest only).
    per_length: dict[int, list[float | None]] = defaultdict(list)
    failures: dict[int, int] = defaultdict(int)
    for task in tasks.values():
        for length, value in task["mean_by_length"].items():
            per_length[length].append(value)
            failures[length] += task.get("failed_by_length", {}).get(length, 0)
    means = {n: None if failures[n] or None in per_length[n] else mean(per_length[n]) for n in sorted(per_length)}
    stats = _score_stats(means, threshold, sum(failures.values()))
    stats["failed_by_length"] = {n: failures[n] for n in sorted(per_length)}
    return stats


def _ruler_summary(tasks: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """RULER's table: its tasks' scores by length, their average per length, its effective length and wAvgs.

    The average is over the RULER tasks present at a length (RULER averages its 13 tasks); ``complete`` says
    whether all 13 ran, and synthetic qa stand-ins are listed, since they are not RULER qa scores.
    """
    from longkit.eval.ruler import TASKS as RULER_TASKS

    names = {t: t for t in RULER_TASKS} | {f"{t}_synthetic": t for t in ("qa_1", "qa_2")}
    present = [t for t in tasks if t in names]
    if not present:
        return None
    table = {t: tasks[t]["mean_by_length"] for t in present}
    stats = _all_tasks_summary({t: tasks[t] for t in present}, threshold)
    return {
        "tasks": present,
        "table": table,
        "average": stats["mean_by_length"],
        "mean": stats["mean"],
        "effective_length": stats["effective_length"],
        "wavg_inc": stats["wavg_inc"],
        "wavg_dec": stats["wavg_dec"],
        "failed": stats["failed"],
        "not_computed": stats["not_computed"],
        "complete": {names[t] for t in present} == set(RULER_TASKS),
        "synthetic_qa": [t for t in present if t.endswith("_synthetic")],
    }


def _perplexity(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Token-weighted PPL per length: windows are pooled, so a long window counts more than a short one."""
    records = [r for r in records if r.get("nll_sum") is not None and r.get("n_targets")]
    if not records:
        return None
    groups = _group_by_length(records)
    nll = {n: sum(float(r["nll_sum"]) for r in rs) for n, rs in groups.items()}
    targets = {n: sum(int(r["n_targets"]) for r in rs) for n, rs in groups.items()}
    return {
        "ppl_by_length": {n: _exp(nll[n] / targets[n]) for n in groups},
        "n_windows_by_length": {n: len(rs) for n, rs in groups.items()},
        "n_targets_by_length": targets,
        # "full" (one forward) or "chunked:C" (against a KV method's compressed cache); old records have none
        "protocols": sorted({str(r.get("ppl_protocol") or "full") for r in records}),
    }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _values(records: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if r.get(key) is not None]


def _cost_stats(records: list[dict[str, Any]]) -> dict[str, float | None]:
    # Medians, not means: the first sample of a length pays for warm-up and allocator growth.
    decode = [
        r["decode_s"] / r["new_tokens"]
        for r in records
        if (r.get("new_tokens") or 0) > 0 and r.get("decode_s") is not None
    ]
    prefill, peak, kv = (_values(records, key) for key in ("prefill_s", "peak_mem_bytes", "kv_bytes"))
    return {
        "prefill_s": median(prefill) if prefill else None,
        "decode_s_per_token": median(decode) if decode else None,
        "peak_mem_bytes": max(peak) if peak else None,
        "kv_bytes": median(kv) if kv else None,
    }


def _cost(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_length = {n: _cost_stats(rs) for n, rs in _group_by_length(records).items()}
    return {"by_length": by_length, "overall": _cost_stats(records)}


def _needle_grid(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean score per (depth, length) as a matrix: rows = depths ascending (0 = start of context), columns = lengths."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in records:
        if r.get("depth") is not None:
            # Depths are rounded as in the record ids, so 0.1 and 0.1000000001 share a cell.
            cells[(round(float(r["depth"]), 4), int(r["length"]))].append(float(r["score"]))
    if not cells:
        return None
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    scores = [[mean(cells[(d, n)]) if (d, n) in cells else None for n in lengths] for d in depths]
    return {"depths": depths, "lengths": lengths, "scores": scores}


def _model_info(run: dict[str, Any]) -> dict[str, Any]:
    model = run.get("model") or {}
    return model if isinstance(model, dict) else {"name": str(model)}  # tolerate a bare model name


#: What the report shows of a training report (``longkit train``'s train_report.json), in order, with labels.
TRAINING_FIELDS = (
    ("recipe", "recipe"), ("model", "base model"), ("rope", "RoPE method"), ("attention", "attention method"),
    ("trained_window", "base model's window"), ("target_length", "target length"), ("steps", "steps"),
    ("tokens_seen", "tokens seen"), ("seconds_this_session", "time (s, last session)"),
    ("tokens_per_second", "tokens/s"), ("resumed_from_step", "resumed from step"), ("first_loss", "first loss"),
    ("final_loss", "final loss"), ("first_eval_loss", "first held-out loss"),
    ("final_eval_loss", "final held-out loss"),
)


def _trained_model_dir(run: dict[str, Any]) -> Path | None:
    source = _model_info(run).get("source")
    path = Path(str(source)).expanduser() if source else None
    return path if path is not None and path.is_dir() else None


def _training(run_dir: str | Path, run: dict[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
    """The training numbers of the evaluated model and its loss-curve PNG: from run.json (recorded at evaluation
    time) or, for runs recorded before that, from the model directory itself."""
    report, plot = run.get("training"), Path(run_dir) / TRAIN_LOSS_PLOT
    model_dir = _trained_model_dir(run)
    if report is None and model_dir is not None:
        from longkit.runtime.train import read_report

        report = read_report(model_dir)
    if not isinstance(report, dict):
        return None, None
    if not plot.is_file() and model_dir is not None:
        from longkit.runtime.train import LOSS_PLOT

        plot = model_dir / LOSS_PLOT
    info = {key: report.get(key) for key, _ in TRAINING_FIELDS}
    sources = (report.get("data") or {}).get("sources") or {}
    info["data_tokens"] = {name: v.get("tokens") for name, v in sources.items() if isinstance(v, dict)}
    return info, plot if plot.is_file() else None


def summarize(run_dir: str | Path, threshold: float = RULER_THRESHOLD) -> dict[str, Any]:
    """Per-method scores, effective lengths, perplexities, costs and needle grids of a run (JSON-serialisable)."""
    records = load_records(run_dir)
    if not records:
        raise EvalError(f"no evaluation records in {run_dir} (expected finished samples in {SAMPLES_FILE})")
    run = load_run(run_dir)
    methods = _ordered(run.get("methods"), (r["method"] for r in records))
    # A task's records: scored samples and failed ones (a task whose samples all failed still has its row).
    graded = [r for r in records if r.get("task") != PERPLEXITY and (r.get("score") is not None or failed(r))]
    tasks = _ordered(run.get("tasks"), (r["task"] for r in graded))
    per_method = {}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        mine_graded = [r for r in graded if r["method"] == method]
        by_task = {}
        for task in tasks:
            task_records = [r for r in mine_graded if r["task"] == task]
            if task_records:
                by_task[task] = _task_summary(task_records, threshold)
        per_method[method] = {
            "tasks": by_task,
            "all_tasks": _all_tasks_summary(by_task, threshold),
            "perplexity": _perplexity([r for r in mine if r.get("task") == PERPLEXITY]),
            "cost": _cost(mine),
            "needle_grid": _needle_grid([r for r in mine_graded if r["task"] == NEEDLE and not failed(r)]),
            "ruler": _ruler_summary(by_task, threshold),
            "failed": sum(map(failed, mine)),
            "failure_reasons": _failure_reasons(mine),
        }
    return {
        "run_dir": str(run_dir),
        "model": _model_info(run),
        "threshold": threshold,
        "methods": methods,
        "tasks": tasks,
        "lengths": sorted({int(r["length"]) for r in records}),
        "per_method": per_method,
        "failed": sum(pm["failed"] for pm in per_method.values()),
        "training": _training(run_dir, run)[0],
    }


def _failure_reasons(records: list[dict[str, Any]], top: int = 5) -> dict[str, int]:
    """The most frequent error messages of failed samples (cut to 200 characters) and how many samples had each."""
    counts = Counter(str(r["error"])[:200] for r in records if failed(r))
    return dict(counts.most_common(top))


# ----------------------------------------------------------------------------------------------------- figures


def _length_label(n: int) -> str:
    """4096 -> 4K, 12288 -> 12K, 1536 -> 1.5K, 1048576 -> 1M; lengths that are not a multiple of 512 stay as is."""
    if n >= 1024 * 1024 and n % (512 * 1024) == 0:
        return f"{n / (1024 * 1024):g}M"
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}K"
    return str(n)


def _matplotlib() -> SimpleNamespace:
    """The Figure API with the Agg canvas: no pyplot, so no global backend switch for the caller's code."""
    try:
        import matplotlib  # first on its own, so a missing package fails here and not halfway through
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise EvalError("the report needs matplotlib: pip install 'longkit[eval]'") from exc
    return SimpleNamespace(
        Figure=Figure,
        Canvas=FigureCanvasAgg,
        colours=list(matplotlib.colormaps["tab10"].colors),
        Cmap=LinearSegmentedColormap,
    )


def _figure(mpl: SimpleNamespace, width: float, height: float) -> Any:
    fig = mpl.Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    mpl.Canvas(fig)
    return fig


def _panels(fig: Any, n: int, max_cols: int) -> list[Any]:
    ncols = min(n, max_cols)
    axes = list(fig.subplots(math.ceil(n / ncols), ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _model_name(summary: dict[str, Any]) -> str:
    return str(summary["model"].get("name") or "model")


def _trained(summary: dict[str, Any]) -> int | None:
    value = summary["model"].get("trained_length")
    return int(value) if value else None


def _length_axis(ax: Any, lengths: list[int], trained: int | None) -> None:
    """Log2 x axis with a tick and a K label at each tested length, and the trained length as a dotted line."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlim(lengths[0] / 1.3, lengths[-1] * 1.3)
    ax.set_xlabel("context length (tokens)")
    ax.grid(True, alpha=0.3)
    if trained and lengths[0] <= trained <= lengths[-1]:
        ax.axvline(
            trained, color="black", linestyle=":", linewidth=1.2, label=f"trained length ({_length_label(trained)})"
        )


def _line_style(mpl: SimpleNamespace, i: int) -> dict[str, Any]:
    # Ten colours, then the same colours dashed, dash-dotted, dotted: up to 40 methods stay distinguishable.
    return {"color": mpl.colours[i % 10], "linestyle": ("-", "--", "-.", ":")[(i // 10) % 4]}


def _legend_column_pt(labels: list[str]) -> float:
    # Width of one legend column in points: about 7 pt per character of the longest label, plus the handle.
    return 7.0 * max((len(label) for label in labels), default=1) + 40


def _legend_columns(fig: Any, labels: list[str]) -> int:
    # As many columns (at most 3) as fit the figure's width, so long method labels are never cut off.
    return max(1, min(len(labels), 3, int(fig.get_figwidth() * 72 // _legend_column_pt(labels))))


def _shared_legend(fig: Any, axes: list[Any]) -> None:
    # One legend for all panels, deduplicated by label, so a method missing from one task is still listed.
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    labels = list(entries)
    # Grow the figure so the legend fits below the panels: wide enough for one column of the longest label,
    # tall enough for its rows (constrained layout otherwise squeezes the axes to nothing).
    fig.set_figwidth(max(fig.get_figwidth(), (_legend_column_pt(labels) + 20) / 72))
    ncols = _legend_columns(fig, labels)
    fig.set_figheight(fig.get_figheight() + 0.2 * math.ceil(len(labels) / ncols))
    fig.legend(
        list(entries.values()),
        labels,
        loc="outside lower center",
        ncols=ncols,
        frameon=False,
        fontsize=9 if len(entries) <= 8 else 8,
    )


def _plot_scores(mpl: SimpleNamespace, summary: dict[str, Any], path: Path) -> Any:
    tasks, lengths, trained = summary["tasks"], summary["lengths"], _trained(summary)
    ncols = min(len(tasks), 3)
    fig = _figure(mpl, 4.8 * ncols, 3.6 * math.ceil(len(tasks) / ncols) + 0.9)
    axes = _panels(fig, len(tasks), 3)
    for ax, task in zip(axes, tasks, strict=True):
        for i, method in enumerate(summary["methods"]):
            stats = summary["per_method"][method]["tasks"].get(task)
            if stats:
                means = {n: v for n, v in stats["mean_by_length"].items() if v is not None}
                ax.plot(list(means), list(means.values()), marker="o", label=method, **_line_style(mpl, i))
        ax.axhline(
            summary["threshold"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"threshold ({summary['threshold']:g})",
        )
        _length_axis(ax, lengths, trained)
        ax.set_ylim(-3, 103)
        ax.set_ylabel("mean score")
        ax.set_title(task, fontsize=12)
    _shared_legend(fig, axes)
    fig.suptitle(f"{_model_name(summary)}: score vs context length", fontsize=13)
    fig.savefig(path, dpi=DPI)
    return fig


def _ppl_curves(summary: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``{method: {length: PPL}}`` for the methods that have perplexity records, in method order."""
    return {m: pm["perplexity"]["ppl_by_length"] for m, pm in summary["per_method"].items() if pm["perplexity"]}


def _plot_perplexity(mpl: SimpleNamespace, summary: dict[str, Any], path: Path) -> Any:
    fig = _figure(mpl, 6.4, 4.4)
    ax = fig.subplots()
    curves = _ppl_curves(summary)
    for i, method in enumerate(summary["methods"]):
        if method in curves:
            ppl = curves[method]
            ax.plot(list(ppl), list(ppl.values()), marker="o", label=method, **_line_style(mpl, i))
    ax.set_yscale("log")
    # Explicit ticks: a PPL range inside one decade (12..90) would otherwise get no labelled tick at all.
    ticks = _log_ticks([v for ppl in curves.values() for v in ppl.values() if math.isfinite(v)])
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    _length_axis(ax, sorted({n for ppl in curves.values() for n in ppl}), _trained(summary))
    ax.set_ylabel("perplexity (log scale)")
    if len(curves) <= 6:
        ax.legend(fontsize=9)
    else:
        # Many methods: the legend goes beside the axes instead of over the curves, the figure grown to hold it.
        fig.set_figwidth(6.4 + 6.0 * max(len(m) for m in curves) / 72 + 0.6)
        fig.set_figheight(max(fig.get_figheight(), 0.19 * len(curves) + 1.0))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title(f"{_model_name(summary)}: perplexity vs context length", fontsize=12)
    fig.savefig(path, dpi=DPI)
    return fig


def _log_ticks(values: list[float], n: int = 6) -> list[float]:
    """About ``n`` geometrically spaced ticks from min to max, rounded to two significant digits."""
    lo, hi = min(values, default=1.0), max(values, default=1.0)
    if hi <= lo or lo <= 0:
        return [float(f"{hi:.3g}")]
    return sorted({float(f"{lo * (hi / lo) ** (i / (n - 1)):.2g}") for i in range(n)})


def _plot_needle(mpl: SimpleNamespace, summary: dict[str, Any], path: Path) -> None:
    grids = [(m, pm["needle_grid"]) for m, pm in summary["per_method"].items() if pm["needle_grid"]]
    cols, rows = max(len(g["lengths"]) for _, g in grids), max(len(g["depths"]) for _, g in grids)
    ncols = min(len(grids), 2)
    fig = _figure(mpl, ncols * (0.75 * cols + 2.2) + 1.2, math.ceil(len(grids) / ncols) * (0.32 * rows + 1.8) + 0.5)
    axes = _panels(fig, len(grids), 2)
    cmap = mpl.Cmap.from_list("niah", NIAH_COLOURS).with_extremes(bad="#dddddd")  # grey: cell not run
    trained, image = _trained(summary), None
    for ax, (method, grid) in zip(axes, grids, strict=True):
        data = [[math.nan if v is None else v for v in row] for row in grid["scores"]]
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest")  # row 0 on top
        for y, row in enumerate(grid["scores"]):
            for x, value in enumerate(row):
                if value is not None:
                    ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=9 if cols <= 8 else 7)
        ax.set_xticks(range(len(grid["lengths"])), [_length_label(n) for n in grid["lengths"]])
        ax.set_yticks(range(len(grid["depths"])), [f"{d * 100:.0f}%" for d in grid["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(method, fontsize=11)
        if trained and grid["lengths"][0] <= trained <= grid["lengths"][-1]:
            # Columns are categories, not a scale: the line separates lengths <= trained from longer ones.
            boundary = sum(n <= trained for n in grid["lengths"]) - 0.5
            ax.axvline(boundary, color="black", linestyle="--", linewidth=1.5)
    fig.colorbar(image, ax=axes, label="mean score", shrink=0.9)
    note = f" (dashed: trained length {_length_label(trained)})" if trained else ""
    fig.suptitle(f"{_model_name(summary)}: needle in a haystack{note}", fontsize=12)
    fig.savefig(path, dpi=DPI)


# ----------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
td.pass { font-weight: bold; background: #e3f7ee; }
td.fail { font-weight: bold; background: #fde2e6; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.meta td, .meta th { text-align: left; } .note { color: #555; }
"""


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def _cell(cell: str | tuple[str, str]) -> str:
    text, css = cell if isinstance(cell, tuple) else (cell, "")
    return f'<td class="{css}">{html.escape(text)}</td>' if css else f"<td>{html.escape(text)}</td>"


def _table(header: list[str], rows: list[list[str | tuple[str, str]]], css: str = "") -> str:
    """A table whose first column is a name; every text is escaped here, so callers pass plain strings."""
    head = "".join(
        f'<th class="name">{html.escape(h)}</th>' if i == 0 else f"<th>{html.escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = "".join("<tr>" + _cell((str(row[0]), "name")) + "".join(map(_cell, row[1:])) + "</tr>" for row in rows)
    return f"<table{f' class={css!r}' if css else ''}><tr>{head}</tr>{body}</table>"


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _metadata(run: dict[str, Any]) -> str:
    """run.json as a two-column table: model fields first, then the settings in a fixed order, then the rest."""
    rows: list[list[str | tuple[str, str]]] = []
    for key, value in _model_info(run).items():
        shown = f"{value} ({_length_label(int(value))})" if key == "trained_length" and value else _text(value)
        rows.append([f"model {key.replace('_', ' ')}", shown])
    order = "methods tasks lengths depths samples seed threshold versions git_commit hardware started argv".split()
    for key in order + sorted(k for k in run if k not in order and k not in ("model", "training")):
        if run.get(key) is not None:
            shown = _text(run[key]) if key != "argv" else " ".join(map(str, run[key]))
            rows.append([key.replace("_", " "), shown])
    return _table(["field", "value"], rows, css="meta")


def _score_cell(value: float | None, threshold: float) -> str | tuple[str, str]:
    return (_num(value), "pass") if value is not None and value > threshold else _num(value)


def _summary_table(summary: dict[str, Any]) -> str:
    tasks, longest = summary["tasks"], _length_label(summary["lengths"][-1])
    header = [
        "method",
        "failed samples",
        "effective length (all tasks)",
        *[f"eff. length {t}" for t in tasks],
        *[f"mean {t}" for t in tasks],
    ]
    header += [
        "wAvg inc",
        "wAvg dec",
        f"prefill s @ {longest}",
        "decode ms/token",
        "peak mem MiB",
        f"KV MiB @ {longest}",
    ]
    rows = []
    for method in summary["methods"]:
        pm = summary["per_method"][method]
        by_task = [pm["tasks"].get(t) or {} for t in tasks]
        cost, at_longest = pm["cost"]["overall"], pm["cost"]["by_length"].get(summary["lengths"][-1], {})
        row: list[str | tuple[str, str]] = [method, _failed_cell(pm.get("failed", 0)),
                                            effective_label(pm["all_tasks"], _length_label)]
        row += [effective_label(t, _length_label) if t else "–" for t in by_task]
        row += [_num(t.get("mean")) for t in by_task]
        row += [
            _num(pm["all_tasks"]["wavg_inc"]),
            _num(pm["all_tasks"]["wavg_dec"]),
            _num(at_longest.get("prefill_s"), ".3f"),
        ]
        decode = cost["decode_s_per_token"]
        row += [_num(None if decode is None else decode * 1000, ".2f")]
        row += [_num(_mib(cost["peak_mem_bytes"])), _num(_mib(at_longest.get("kv_bytes")))]
        rows.append(row)
    return _table(header, rows)


def _failed_cell(n: int) -> str | tuple[str, str]:
    return (str(n), "fail") if n else "0"


def _failures(summary: dict[str, Any]) -> str:
    """Failed samples per method and task (and length), with their most frequent errors; empty when none failed."""
    if not summary.get("failed"):
        return ""
    lengths = summary["lengths"]
    rows: list[list[str | tuple[str, str]]] = []
    for method in summary["methods"]:
        pm = summary["per_method"][method]
        for task, stats in pm["tasks"].items():
            if stats.get("failed"):
                by_length = stats["failed_by_length"]
                rows.append([method, task, _failed_cell(stats["failed"]),
                             *[str(by_length.get(n, 0)) if n in by_length else "–" for n in lengths]])
    parts = [
        "<h2>Failed samples</h2>",
        f"<p class='note'>{html.escape(failed_note(summary['failed']))}. Effective lengths, wAvgs and means over "
        "lengths of a set with failed samples are shown as n/a.</p>",
        _table(["method", "task", "failed", *map(_length_label, lengths)], rows),
    ]
    reasons = [[m, str(k), text] for m in summary["methods"]
               for text, k in summary["per_method"][m].get("failure_reasons", {}).items()]
    if reasons:
        parts.append(_table(["method", "samples", "error"], reasons, css="meta"))
    return "\n".join(parts)


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def _score_tables(summary: dict[str, Any]) -> str:
    """RULER-style tables, one per task and one for all scored tasks: rows methods, columns lengths, then average."""
    parts = []
    lengths, threshold = summary["lengths"], summary["threshold"]
    for task in [*summary["tasks"], None]:
        rows = []
        for method in summary["methods"]:
            pm = summary["per_method"][method]
            stats = pm["all_tasks"] if task is None else pm["tasks"].get(task)
            if stats and stats["mean_by_length"]:
                means, failures = stats["mean_by_length"], stats.get("failed_by_length", {})
                cells = [_with_failures(_score_cell(means.get(n), threshold), failures.get(n, 0)) for n in lengths]
                average = f"n/a ({stats['failed']} failed)" if stats.get("failed") else _num(stats["mean"])
                rows.append([method, *cells, average, _failed_cell(stats.get("failed", 0))])
        if rows:
            parts.append(f"<h3>{html.escape(task or 'all scored tasks')}</h3>")
            parts.append(_table(["method", *map(_length_label, lengths), "average", "failed"], rows))
    return "\n".join(parts)


def _with_failures(cell: str | tuple[str, str], n_failed: int) -> str | tuple[str, str]:
    """A score cell that says how many samples of it failed: "90.0 (1 failed)", or "n/a (2 failed)" if all did."""
    if not n_failed:
        return cell
    text = cell[0] if isinstance(cell, tuple) else cell
    return (f"{'n/a' if text == '–' else text} ({n_failed} failed)", "fail")


def _ruler_tables(summary: dict[str, Any]) -> str:
    """Per method, RULER's task x length table with the average row and the effective length."""
    parts = []
    lengths, threshold = summary["lengths"], summary["threshold"]
    for method in summary["methods"]:
        ruler = summary["per_method"][method].get("ruler")
        if not ruler:
            continue
        stats = {t: summary["per_method"][method]["tasks"][t] for t in ruler["tasks"]}
        rows = [
            [t, *[_with_failures(_score_cell(ruler["table"][t].get(n), threshold), s.get("failed_by_length", {}).get(n, 0))
                  for n in lengths], _num(s["mean"])]
            for t, s in stats.items()
        ]
        average = [_score_cell(ruler["average"].get(n), threshold) for n in lengths]
        rows.append(["average", *average, _num(ruler["mean"])])
        note = f"effective length {effective_label(ruler, _length_label)}"
        note += f", wAvg inc {_num(ruler['wavg_inc'])}, dec {_num(ruler['wavg_dec'])}"
        if ruler.get("failed"):
            note += f"; {ruler['not_computed']}"
        if not ruler["complete"]:
            note += "; not all 13 RULER tasks ran, so the average is not RULER's"
        if ruler["synthetic_qa"]:
            note += f"; {', '.join(ruler['synthetic_qa'])}: offline synthetic QA, not RULER's qa data"
        parts.append(f"<h3>{html.escape(method)}</h3><p class='note'>{html.escape(note)}</p>")
        parts.append(_table(["task", *map(_length_label, lengths), "average"], rows))
    return ("<h2>RULER</h2>" + "\n".join(parts)) if parts else ""


def _perplexity_table(summary: dict[str, Any]) -> str:
    curves = _ppl_curves(summary)
    if not curves:
        return ""
    lengths = sorted({n for ppl in curves.values() for n in ppl})
    protocols = {m: ", ".join(pm["perplexity"].get("protocols", ["full"]))
                 for m, pm in summary["per_method"].items() if pm["perplexity"]}  # fmt: skip
    rows = [[m, protocols.get(m, "full"), *[_num(ppl.get(n), ".2f") for n in lengths]] for m, ppl in curves.items()]
    note = (
        "<p class='note'>Token-weighted: exp(total NLL / total scored tokens) over all windows of a length. "
        "Protocol: <code>full</code> = one forward; <code>chunked:C</code> = C-token chunks against the KV method's "
        "compressed cache (<code>--ppl-chunk</code>).</p>"
    )
    return "<h2>Perplexity</h2>" + note + _table(["method", "protocol", *map(_length_label, lengths)], rows)


def _training_section(summary: dict[str, Any], loss_plots: dict[int, str]) -> str:
    """The "Training" section: per trained model, its training numbers and its loss curve."""
    entries = ([(summary["model"].get("name", ""), summary.get("training"))] if "runs" not in summary
               else [(str(r["run_dir"]), r.get("training")) for r in summary["runs"]])
    parts = []
    for i, (name, info) in enumerate(entries):
        if not info:
            continue
        rows: list[list[str | tuple[str, str]]] = [
            [label, _text(info[key]) if not isinstance(info[key], float) else _num(info[key], ".4g")]
            for key, label in TRAINING_FIELDS if info.get(key) is not None
        ]
        if info.get("data_tokens"):
            rows.append(["data (tokens per source)", _text(info["data_tokens"])])
        if len(entries) > 1:
            parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_table(["field", "value"], rows, css="meta"))
        if i in loss_plots:
            name = html.escape(loss_plots[i])
            parts.append(f'<p><a href="{name}"><img src="{name}" alt="training loss curve"></a></p>')
    return ("<h2>Training</h2>" + "\n".join(parts)) if parts else ""


def _html(summary: dict[str, Any], runs: list[dict[str, Any]], images: list[str],
          loss_plots: dict[int, str] | None = None) -> str:
    title = html.escape(f"longkit evaluation report: {_model_name(summary)}")
    threshold = summary["threshold"]
    source = ", RULER's threshold" if threshold == RULER_THRESHOLD else ""
    rule = (
        f"Effective length: the longest tested length whose mean score is strictly above {threshold:g}{source}. "
        "Scores in bold pass it. wAvg: RULER's weighted average over lengths (inc favours long contexts, dec short ones)."
    )
    figures = "".join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in images)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            _metadata(runs[0])
            if len(runs) == 1
            else "".join(
                f"<h2>Run {i}: {html.escape(str(d))}</h2>{_metadata(r)}"
                for i, (d, r) in enumerate(zip(summary["run_dir"], runs, strict=True), 1)
            ),
            _training_section(summary, loss_plots or {}),
            "<h2>Summary</h2>",
            f'<p class="note">{html.escape(rule)}</p>',
            _summary_table(summary),
            _failures(summary),
            _ruler_tables(summary),
            "<h2>Scores by length</h2>",
            _score_tables(summary),
            "<h2>Figures</h2>" if images else "",
            figures,
            _perplexity_table(summary),
            "</body></html>",
        ]
    )


def compare_runs(run_dirs: Sequence[str | Path], threshold: float = RULER_THRESHOLD) -> dict[str, Any]:
    """One summary of several runs side by side (e.g. two models, or one model on two machines).

    Each method is labelled ``"<model> · <method>"`` (``"<run directory> · <method>"`` when the models are the same),
    so every table and figure of the report shows all runs together.
    """
    if not run_dirs:
        raise EvalError("compare_runs needs at least one run directory")
    summaries = [summarize(d, threshold) for d in run_dirs]
    if len(summaries) == 1:
        return summaries[0]
    names = [_model_name(s) for s in summaries]
    tags = names if len(set(names)) == len(names) else [Path(s["run_dir"]).name for s in summaries]
    if len(set(tags)) != len(tags):
        raise EvalError(f"run directories to compare must have distinct names, got {', '.join(map(str, run_dirs))}")
    methods, per_method, tasks = [], {}, []
    for tag, summary in zip(tags, summaries, strict=True):
        for method in summary["methods"]:
            label = f"{tag} · {method}"
            methods.append(label)
            per_method[label] = summary["per_method"][method]
        tasks += [t for t in summary["tasks"] if t not in tasks]
    trained = {s["model"].get("trained_length") for s in summaries}
    return {
        "run_dir": [s["run_dir"] for s in summaries],
        "model": {"name": " vs ".join(dict.fromkeys(names)), "trained_length": trained.pop() if len(trained) == 1 else None},
        "threshold": threshold,
        "methods": methods,
        "tasks": tasks,
        "lengths": sorted({n for s in summaries for n in s["lengths"]}),
        "per_method": per_method,
        "failed": sum(s["failed"] for s in summaries),
        "training": None,  # per run, in "runs"
        "runs": [{"run_dir": s["run_dir"], "model": s["model"], "training": s["training"]} for s in summaries],
    }


def write_report(
    run_dir: str | Path | Sequence[str | Path], threshold: float = RULER_THRESHOLD, out_dir: str | Path | None = None
) -> Path:
    """Write summary.json, the PNG figures that apply and report.html into ``out_dir``; return report.html's path.

    ``run_dir`` may be a list of run directories: their methods are then compared side by side in one report
    (:func:`compare_runs`), written to ``out_dir`` (required then).
    """
    mpl = _matplotlib()  # before anything is written: no half report when matplotlib is missing
    run_dirs = [run_dir] if isinstance(run_dir, str | Path) else list(run_dir)
    if len(run_dirs) > 1 and out_dir is None:
        raise EvalError("a report comparing several runs needs an output directory (out_dir / --out)")
    summary = compare_runs(run_dirs, threshold)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plots: list[tuple[str, Callable[..., None], bool]] = [
        ("needle_heatmap.png", _plot_needle, any(pm["needle_grid"] for pm in summary["per_method"].values())),
        ("score_vs_length.png", _plot_scores, bool(summary["tasks"])),
        ("perplexity.png", _plot_perplexity, bool(_ppl_curves(summary))),
    ]
    images = []
    for name, plot, applies in plots:
        if applies:
            plot(mpl, summary, out / name)
            images.append(name)
    runs = [load_run(d) for d in run_dirs]
    # the loss curves of trained models, next to the report: train_loss.png (train_loss_<run>.png when comparing)
    loss_plots = {}
    for i, (d, r) in enumerate(zip(run_dirs, runs, strict=True)):
        plot = _training(d, r)[1]
        if plot is not None:
            name = TRAIN_LOSS_PLOT if len(run_dirs) == 1 else f"train_loss_{i + 1}.png"
            if plot.resolve() != (out / name).resolve():
                shutil.copyfile(plot, out / name)
            loss_plots[i] = name
    path = out / "report.html"
    path.write_text(_html(summary, runs, images, loss_plots), encoding="utf-8")
    return path
