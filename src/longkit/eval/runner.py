"""The evaluation runner: model x method-combination x task x length x depth x sample, resumable.

Each finished sample is appended to ``RUN_DIR/samples.jsonl`` at once (see :mod:`longkit.eval.records`);
re-running the same command finds the run directory again (its default name hashes the settings),
skips finished samples and computes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.generate import greedy_generate, window_nll
from longkit.eval.metrics import RULER_THRESHOLD
from longkit.eval.records import RUN_FILE, RecordWriter, load_records, load_run, sample_id
from longkit.eval.tasks import TaskContext, get_task
from longkit.seam import MethodSpec, apply

# Settings that define what a sample means; a run directory cannot mix two values of these.
IDENTITY_KEYS = ("model", "seed", "chat", "haystack", "ppl_text", "dtype", "attn_implementation")


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (the CLI's ``longkit eval`` options map onto these fields)."""

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: ["baseline", "rope=dynamic:factor=2"])
    tasks: list[str] = field(default_factory=lambda: ["passkey", "needle"])
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 12288])
    depths: list[float] = field(default_factory=lambda: [0.25, 0.75])
    samples: int = 1
    seed: int = 0
    chat: bool | None = None
    haystack: str | None = None
    ppl_text: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    prefill_chunk: int | None = None
    threshold: float = RULER_THRESHOLD
    run_dir: str | None = None

    def validate(self) -> None:
        if not self.methods:
            raise EvalError("parameter 'methods' must name at least one method combination (or 'baseline')")
        if not self.tasks:
            raise EvalError("parameter 'tasks' must name at least one task")
        for task in self.tasks:
            get_task(task)
        if not self.lengths or any(int(n) < 64 for n in self.lengths):
            raise EvalError(f"parameter 'lengths' must be token counts >= 64 (got {self.lengths})")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise EvalError(f"parameter 'depths' must be fractions in [0, 1] (got {self.depths})")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise EvalError(f"parameter 'prefill_chunk' must be >= 1 tokens or None (got {self.prefill_chunk})")
        if self.samples < 1:
            raise EvalError(f"parameter 'samples' must be >= 1 (got {self.samples})")
        if not 0.0 <= self.threshold <= 100.0:
            raise EvalError(f"parameter 'threshold' must be in [0, 100] (got {self.threshold})")
        for text in self.methods:
            MethodSpec.parse(text)

    def default_run_dir(self) -> Path:
        identity = {k: getattr(self, k) for k in IDENTITY_KEYS}
        digest = hashlib.sha1(
            json.dumps({**identity, "grid": [self.methods, self.tasks, self.lengths, self.depths, self.samples]},
                       sort_keys=True).encode()
        ).hexdigest()[:8]
        return Path("runs") / f"{Path(self.model).name}-{digest}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import torch
    import transformers

    import longkit

    return {
        "longkit": longkit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


@dataclass
class Job:
    method: str
    task: str
    length: int
    depth: float | None
    sample: int

    @property
    def id(self) -> str:
        return sample_id(self.method, self.task, self.length, self.depth, self.sample)


def plan(config: EvalConfig, labels: list[str]) -> list[Job]:
    """Every sample of the grid, grouped by method (one apply per method), short lengths first."""
    jobs = []
    for label in labels:
        for length in sorted(int(n) for n in config.lengths):
            for task_name in config.tasks:
                task = get_task(task_name)
                depths = config.depths if task.uses_depth else [None]
                for depth in depths:
                    for sample in range(config.samples):
                        jobs.append(Job(label, task_name, length, depth, sample))
    return jobs


def run_job(lm: Any, ctx: TaskContext, applied: Any, job: Job, prefill_chunk: int | None = None) -> dict[str, Any]:
    """Compute one sample under the applied methods; return its record."""
    task = get_task(job.task)
    record: dict[str, Any] = {
        "id": job.id,
        "method": job.method,
        "task": job.task,
        "length": job.length,
        "depth": job.depth,
        "sample": job.sample,
    }
    if not task.scored:
        ids, first_target = task.window(ctx, job.length, job.sample)
        nll, n_targets, seconds, peak = window_nll(lm.model, ids, first_target)
        record.update(
            n_tokens=len(ids), score=None, nll_sum=nll, n_targets=n_targets, prefill_s=seconds,
            decode_s=0.0, new_tokens=0, peak_mem_bytes=peak, kv_bytes=0,
        )
        return record
    sample = task.build(ctx, job.length, job.depth, job.sample)
    tok = lm.tokenizer
    eos = {i for i in (tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)) if i is not None}
    eos = {j for i in eos for j in (i if isinstance(i, list) else [i])}
    gen = greedy_generate(lm.model, sample.prompt.input_ids, sample.max_new_tokens, applied.new_cache(), eos,
                          prefill_chunk=prefill_chunk)
    prediction = tok.decode(gen.tokens, skip_special_tokens=True)
    record.update(
        n_tokens=len(sample.prompt),
        score=task.score(prediction, sample.answers),
        prediction=prediction,
        answer=sample.answers,
        needle_start=sample.prompt.needle_start,
        prefill_s=round(gen.prefill_s, 4),
        decode_s=round(gen.decode_s, 4),
        new_tokens=len(gen.tokens),
        peak_mem_bytes=gen.peak_mem_bytes,
        kv_bytes=gen.kv_bytes,
    )
    return record


def _check_identity(run_dir: Path, meta: dict[str, Any]) -> None:
    old = load_run(run_dir)
    if not old:
        return
    for key in IDENTITY_KEYS:
        if key in old.get("config", {}) and old["config"][key] != meta["config"][key]:
            raise EvalError(
                f"run directory {run_dir} holds a run with {key}={old['config'][key]!r}, not {meta['config'][key]!r}; "
                "choose another --out"
            )


def evaluate(
    config: EvalConfig,
    *,
    lm: Any = None,
    progress: bool = True,
    argv: list[str] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run (or resume) the evaluation grid; return the run directory."""
    config.validate()
    specs = [MethodSpec.parse(m) for m in config.methods]
    labels = [s.label() for s in specs]
    if len(set(labels)) != len(labels):
        raise EvalError(f"parameter 'methods' lists the same combination twice: {labels}")
    run_dir = Path(config.run_dir) if config.run_dir else config.default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)

    if lm is None:
        from longkit.models import load_model

        lm = load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation,
                        device=config.device)
    meta = {
        "config": {**asdict(config), "dtype": lm.dtype, "run_dir": str(run_dir)},
        "model": lm.info(),
        "methods": labels,
        "tasks": config.tasks,
        "lengths": sorted(int(n) for n in config.lengths),
        "depths": config.depths,
        "samples": config.samples,
        "seed": config.seed,
        "threshold": config.threshold,
        "argv": argv if argv is not None else sys.argv,
        "versions": versions(),
        "git_commit": _git_commit(),
        "hardware": hardware(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _check_identity(run_dir, meta)
    (run_dir / RUN_FILE).write_text(json.dumps(meta, indent=2, default=str))

    done = {r["id"] for r in load_records(run_dir)}
    jobs = [j for j in plan(config, labels) if j.id not in done]
    ctx = TaskContext(lm.tokenizer, seed=config.seed, chat=config.chat, haystack=config.haystack,
                      ppl_text=config.ppl_text)
    if not jobs:
        return run_dir

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar, RecordWriter(run_dir) as writer:
        # Progress counts prompt tokens, so the ETA accounts for long samples costing more.
        total = bar.add_task("eval", total=sum(j.length for j in jobs))
        for label, spec in zip(labels, specs, strict=True):
            mine = [j for j in jobs if j.method == label]
            if not mine:
                continue
            with apply(lm.model, spec) as applied:
                for job in mine:
                    bar.update(total, description=f"{label} | {job.task} | {job.length} tok")
                    record = run_job(lm, ctx, applied, job, prefill_chunk=config.prefill_chunk)
                    writer.write(record)
                    if on_record is not None:
                        on_record(record)
                    bar.advance(total, job.length)
    return run_dir
