"""The evaluation runner: model x method-combination x task x length x depth x sample, resumable.

Each finished sample is appended to ``RUN_DIR/samples.jsonl`` at once (see :mod:`longkit.eval.records`);
re-running the same command finds the run directory again (its default name hashes the settings),
skips finished samples and computes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.backends import GenerationRequest, HFBackend, OpenAIBackend
from longkit.eval.backends.openai import CONNECT_TIMEOUT, READ_TIMEOUT
from longkit.eval.jobs import Job, plan
from longkit.eval.metrics import RULER_THRESHOLD
from longkit.eval.records import TRAIN_LOSS_PLOT, RecordWriter, load_records, repair_records
from longkit.eval.retrieval import check_context, check_memory_run, retrieval_memory
from longkit.eval.rundir import open_run_dir, record_invocation, run_identity
from longkit.eval.tasks import TaskContext, get_task
from longkit.eval.tasks.perplexity import DEFAULT_PPL_CHUNK, check_chunk
from longkit.eval.windows import check_windowed_run, check_windows, windowed_memory
from longkit.models.introspect import trained_length
from longkit.seam import MethodSpec, apply

# The settings hashed into the default run-directory name (a run directory's full identity, which also covers the
# contents of named files, is longkit.eval.rundir's).
IDENTITY_KEYS = ("model", "seed", "chat", "haystack", "ppl_text", "dtype", "attn_implementation")
# Identity of suite / endpoint runs; part of the run-directory hash only when set, so older run names stay valid.
SUITE_IDENTITY_KEYS = ("suite", "data_dir", "backend", "base_url", "api_model", "tokenizer")
BACKENDS = ("hf", "openai")
#: Context lengths of a task grid, and the truncation budget of a suite, when none are given.
TASK_LENGTHS = (4096, 8192, 12288)
SUITE_LENGTHS = (7500,)


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (the CLI's ``longkit eval`` options map onto these fields)."""

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: ["baseline", "rope=dynamic:factor=2"])
    tasks: list[str] = field(default_factory=lambda: ["passkey", "needle"])
    #: None: the default of the kind of run, resolved on construction (:data:`TASK_LENGTHS`; for a suite
    #: :data:`SUITE_LENGTHS`, or every data split present for BABILong).
    lengths: list[int] | None = None
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
    #: Perplexity under a KV method: tokens per teacher-forced forward into its cache (1 = token by token).
    ppl_chunk: int = DEFAULT_PPL_CHUNK
    threshold: float = RULER_THRESHOLD
    run_dir: str | None = None
    #: A benchmark suite read from ``data_dir`` (longbench, longbench_v2, infinitebench, babilong); ``tasks`` are
    #: then the suite's tasks (empty: every task with a file) and ``lengths`` its truncation budgets in tokens
    #: (BABILong: its data splits; empty: every split present).
    suite: str | None = None
    data_dir: str | None = None
    #: Suite records per task (first N); None: all.
    limit: int | None = None
    #: "hf" (the local model under each method) or "openai" (an OpenAI-compatible endpoint; methods: baseline).
    backend: str = "hf"
    base_url: str | None = None
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    #: Local tokenizer (HF directory or model alias) for truncation and length fitting with an endpoint.
    tokenizer: str | None = None
    concurrency: int = 4
    #: Endpoint: seconds to wait for an answer once connected (the whole generation), and for the connection.
    timeout: float = READ_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    retries: int = 3
    #: ``longkit eval`` exits 1 when samples failed (their records carry ``error``), unless this is set.
    allow_failures: bool = False

    def __post_init__(self) -> None:
        if self.lengths is None:
            from longkit.eval.suites import SUITES

            if self.suite is None:
                self.lengths = list(TASK_LENGTHS)
            elif self.suite in SUITES and SUITES[self.suite].length_kind == "split":
                self.lengths = []
            else:
                self.lengths = list(SUITE_LENGTHS)

    def validate(self, *, check_model: bool = True) -> None:
        """Check every setting before any work: values (finite, in range, no duplicates), the model's source and
        device (no weights read), the files (haystack, perplexity text, run directory). The checks that need the
        loaded model or its tokenizer run in :func:`preflight`, still before the first sample. ``check_model=False``:
        the model is given loaded (``evaluate(config, lm=...)``), so its name is not looked up."""
        if not self.methods or not all(isinstance(m, str) for m in self.methods):
            raise EvalError("parameter 'methods' must name at least one method combination (or 'baseline')")
        self._validate_values()
        if self.backend not in BACKENDS:
            raise EvalError(f"parameter 'backend' must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.backend == "openai":
            if not self.base_url or not self.api_model:
                raise EvalError("--backend openai needs --base-url (e.g. http://localhost:8000/v1) and --api-model NAME")
            if any(m != "baseline" for m in self.methods):
                raise EvalError("with --backend openai the endpoint serves the model as it is: parameter 'methods' "
                                f"must be ['baseline'] (got {self.methods}); pass --no-... methods, or use --backend hf")
            if not self.tokenizer:
                raise EvalError("--backend openai needs --tokenizer (a local HF tokenizer directory or a model alias) "
                                "to count tokens for truncation and length fitting")
            if self.concurrency < 1 or self.retries < 0 or not self.timeout > 0 or not self.connect_timeout > 0:
                raise EvalError("parameters 'concurrency' >= 1, 'retries' >= 0, 'timeout' > 0 and 'connect_timeout' > 0 "
                                f"seconds (got {self.concurrency}, {self.retries}, {self.timeout}, "
                                f"{self.connect_timeout})")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"parameter 'limit' must be >= 1 records per task or None (got {self.limit})")
        if self.suite is not None:
            self._validate_suite()
            check_memory_run([MethodSpec.parse(text) for text in self.methods], [], self.suite)
            check_windowed_run([MethodSpec.parse(text) for text in self.methods], [], self.suite)
            self._validate_sources(check_model)
            return
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
        check_chunk(self.ppl_chunk)
        if "perplexity" in self.tasks and any(MethodSpec.parse(m).kv is not None for m in self.methods):
            check_chunk(self.ppl_chunk, min(int(n) for n in self.lengths))
        if self.samples < 1:
            raise EvalError(f"parameter 'samples' must be >= 1 (got {self.samples})")
        if not 0.0 <= self.threshold <= 100.0:
            raise EvalError(f"parameter 'threshold' must be in [0, 100] (got {self.threshold})")
        check_memory_run([MethodSpec.parse(text) for text in self.methods], [get_task(t) for t in self.tasks], None)
        check_windowed_run([MethodSpec.parse(text) for text in self.methods], [get_task(t) for t in self.tasks], None)
        self._validate_sources(check_model)

    def _validate_values(self) -> None:
        """Types and finiteness of the numeric settings (a nan passes every range comparison), and no duplicates in
        the grid (two equal lengths would give two samples one id)."""
        for key in ("samples", "seed", "concurrency", "retries", "ppl_chunk"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EvalError(f"parameter '{key}' must be an integer (got {value!r})")
        for key in ("prefill_chunk", "limit"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise EvalError(f"parameter '{key}' must be an integer or None (got {value!r})")
        for key, valid in (("threshold", "in [0, 100]"), ("timeout", "> 0 seconds")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EvalError(f"parameter '{key}' must be a finite number {valid} (got {value!r})")
        if self.timeout <= 0:
            raise EvalError(f"parameter 'timeout' must be > 0 seconds (got {self.timeout})")
        if not isinstance(self.lengths, list | tuple) or not all(_whole(n) for n in self.lengths):
            raise EvalError(f"parameter 'lengths' must be a list of whole token counts (got {self.lengths!r})")
        if not isinstance(self.depths, list | tuple) or not all(
            isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) for d in self.depths
        ):
            raise EvalError(f"parameter 'depths' must be a list of fractions in [0, 1] (got {self.depths!r})")
        for key in ("lengths", "depths", "tasks", "methods"):
            values = list(getattr(self, key))
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                raise EvalError(f"parameter '{key}' lists {', '.join(twice)} twice; give each value once")

    def _validate_sources(self, check_model: bool) -> None:
        """The model (or the endpoint's tokenizer), device, attention implementation, dtype and files, read
        without loading weights."""
        from longkit.eval.haystack import check_haystack, ppl_text
        from longkit.models import check_attn_implementation, check_device, check_source, resolve_dtype

        if self.backend == "hf":
            if check_model:
                resolve_dtype(self.dtype, self.model, self.device)
                check_device(self.device)
                check_attn_implementation(self.attn_implementation)
                check_source(self.model)
                if _trained_here(self.model):
                    from longkit.runtime.train import read_report

                    read_report(self.model)  # a damaged training report fails here, before any work
        elif check_model and not Path(self.tokenizer or "").is_dir():
            check_source(self.tokenizer or "")
        check_haystack(self.haystack)
        if self.ppl_text:
            ppl_text(self.ppl_text)
        check_writable_dir(Path(self.run_dir) if self.run_dir else self.default_run_dir(), "run_dir")

    def _validate_suite(self) -> None:
        from longkit.eval.suites import get_suite

        suite = get_suite(self.suite)
        if not self.data_dir or not Path(self.data_dir).is_dir():
            raise EvalError(f"parameter 'data_dir' must be a directory holding the {suite.name} files (got {self.data_dir!r})")
        if not self.tasks:
            self.tasks = suite.available(Path(self.data_dir))
            if not self.tasks:
                raise EvalError(f"no {suite.name} task files found in {self.data_dir}; valid tasks: {', '.join(suite.tasks)}")
        for task in self.tasks:
            suite.check_task(task)
        if suite.length_kind == "split":
            from longkit.eval.suites.babilong import split_length, split_name

            if not self.lengths:
                self.lengths = [split_length(s) for s in suite.splits(Path(self.data_dir))]
            for n in self.lengths:
                split_name(int(n))
        elif not self.lengths or any(int(n) < 16 for n in self.lengths):
            raise EvalError(f"parameter 'lengths' must be truncation budgets >= 16 tokens (got {self.lengths})")
        if self.samples < 1:
            raise EvalError(f"parameter 'samples' must be >= 1 (got {self.samples})")

    def default_run_dir(self, full: dict[str, Any] | None = None) -> Path:
        """``runs/<model>-<hash of the settings>``; ``full``: this config's :func:`run_identity` if already computed."""
        identity = {k: getattr(self, k) for k in IDENTITY_KEYS}
        identity.update({k: getattr(self, k) for k in SUITE_IDENTITY_KEYS if getattr(self, k) not in (None, "hf")})
        # Perplexity under a KV method depends on the chunk; hashed only when not the default (older names stay valid).
        if self.ppl_chunk != DEFAULT_PPL_CHUNK:
            identity["ppl_chunk"] = self.ppl_chunk
        # Also part of the run's identity; named only when set, so older run names stay valid. The contents of
        # named files too: an edited file (a LongRoPE config, a haystack) gets a fresh directory.
        if self.prefill_chunk is not None:
            identity["prefill_chunk"] = self.prefill_chunk
        if self.device != "cpu":
            identity["device"] = self.device
        full = full or run_identity(self, [MethodSpec.parse(m) for m in self.methods])
        files = {k: v["sha256"] for k, v in full.items() if isinstance(v, dict) and "sha256" in v}
        files.update({f"{label} {name}": v["sha256"] for label, named in full["method_files"].items()
                      for name, v in named.items()})
        if files:
            identity["files"] = files
        digest = hashlib.sha1(
            json.dumps({**identity, "grid": [self.methods, self.tasks, self.lengths, self.depths, self.samples]},
                       sort_keys=True).encode()
        ).hexdigest()[:8]
        name = self.api_model if self.backend == "openai" and self.api_model else self.model
        return Path("runs") / f"{Path(name).name}-{digest}"


def _whole(n: Any) -> bool:
    return (isinstance(n, int) and not isinstance(n, bool)) or (isinstance(n, float) and n.is_integer())


def check_writable_dir(path: Path, parameter: str) -> None:
    """``path`` is a directory that can be written, or can be created: its nearest existing ancestor is a
    writable directory. Probed by creating a file, since permission bits say nothing for root or read-only mounts."""
    import tempfile

    if path.exists() and not path.is_dir():
        raise EvalError(f"parameter '{parameter}' must be a directory; {path} is a file")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EvalError(f"parameter '{parameter}': cannot create {path}, since {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise EvalError(f"parameter '{parameter}': cannot write to {existing} ({err.strerror or err})") from None


def preflight(config: EvalConfig, lm: Any, specs: list[MethodSpec], ctx: TaskContext, local: bool) -> None:
    """The checks that need the loaded model or its tokenizer, for the whole grid before its first sample: every
    method combination on the model (e.g. KIVI's group size against its head dim; a dry run of apply and cache),
    and every task at its hardest point of the grid (RULER's minimum lengths, the perplexity text's size)."""
    if local:
        for spec in specs:
            spec.check(lm.model)
    if not config.suite:
        lengths = [int(n) for n in config.lengths]
        for name in config.tasks:
            task = get_task(name)
            task.preflight(ctx, lengths, list(config.depths), config.samples)
            for memory in filter(None, map(retrieval_memory, specs)):
                # The shortest context of the grid is where a retrieval budget would keep it all.
                depth = config.depths[0] if task.uses_depth else None
                check_context(memory, name, task.build(ctx, min(lengths), depth, 0))
            for windowed in filter(None, map(windowed_memory, specs)):
                # The longest context of the grid is where n_windows makes the largest windows.
                depth = config.depths[0] if task.uses_depth else None
                check_windows(windowed, name, task.build(ctx, max(lengths), depth, 0), trained_length(lm.model))


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

    from longkit.runtime.threads import thread_settings

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
        # thread count, wait policy (and why), load average, capability: CPU timings depend on them (issue #24).
        # Records written before this held the thread count a second time as a top-level "torch_threads".
        "threads": thread_settings(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch
    import transformers

    return {
        "longkit": version("longkit"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


def load_tokenizer(name: str) -> Any:
    """A tokenizer from a local HF directory (no download) or a longkit model alias."""
    path = Path(name)
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise EvalError(f"parameter 'tokenizer': cannot load a tokenizer from {path}: {err}") from None
    from longkit.models import load_model

    return load_model(name).tokenizer


@dataclass
class _Model:
    """The tokenizer and description of an endpoint's model, in place of a loaded local model."""

    tokenizer: Any
    name: str
    base_url: str
    dtype: str = "n/a"

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.base_url, "backend": "openai", "dtype": self.dtype}


def evaluate(
    config: EvalConfig,
    *,
    lm: Any = None,
    progress: bool = True,
    argv: list[str] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run (or resume) the evaluation grid; return the run directory.

    Records of failed endpoint requests carry ``error`` and no score; a rerun retries them. The run directory is
    locked for the eval (a second eval into it fails at once) and must hold results of the same inputs (see
    :mod:`longkit.eval.rundir`); damaged lines of its samples.jsonl are repaired or quarantined first.
    """
    config.validate(check_model=lm is None)
    specs = [MethodSpec.parse(m) for m in config.methods]
    labels = [s.label() for s in specs]
    if len(set(labels)) != len(labels):
        raise EvalError(f"parameter 'methods' lists the same combination twice: {labels}")
    identity = run_identity(config, specs)
    run_dir = Path(config.run_dir) if config.run_dir else config.default_run_dir(identity)
    with open_run_dir(run_dir, config, identity):
        return _evaluate(config, specs, labels, run_dir, identity, lm, progress, argv, on_record)


def _evaluate(config: EvalConfig, specs: list[MethodSpec], labels: list[str], run_dir: Path, identity: dict[str, Any],
              lm: Any, progress: bool, argv: list[str] | None,
              on_record: Callable[[dict[str, Any]], None] | None) -> Path:
    """:func:`evaluate` once the run directory is locked and its identity checked."""
    endpoint = None
    if config.backend == "openai":
        endpoint = OpenAIBackend(config.base_url or "", config.api_model or "", api_key_env=config.api_key_env,
                                 timeout=config.timeout, connect_timeout=config.connect_timeout,
                                 retries=config.retries, concurrency=config.concurrency)
        endpoint.check()
        if lm is None:
            lm = _Model(load_tokenizer(config.tokenizer or ""), config.api_model or "", config.base_url or "")
        endpoint.tokenizer = lm.tokenizer
    elif lm is None:
        from longkit.models import load_model

        lm = load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation,
                        device=config.device)
    jobs = plan(config, labels)
    ctx = TaskContext(lm.tokenizer, seed=config.seed, chat=config.chat, haystack=config.haystack,
                      ppl_text=config.ppl_text)
    # Every method against the model and every task at its hardest grid point, before the first sample.
    preflight(config, lm, specs, ctx, local=endpoint is None)
    meta = {
        "config": {**asdict(config), "dtype": lm.dtype, "run_dir": str(run_dir)},
        "model": lm.info(),
        "methods": labels,
        "tasks": [f"{config.suite}/{t}" for t in config.tasks] if config.suite else config.tasks,
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
    if config.backend == "hf" and _trained_here(config.model):
        _record_training(Path(config.model), run_dir, meta)
    record_invocation(run_dir, config, meta, identity)
    repair_records(run_dir)

    # Failed requests are not done: a rerun retries them.
    done = {r["id"] for r in load_records(run_dir) if r.get("error") is None}
    jobs = [j for j in jobs if j.id not in done]
    if jobs:
        by_label = dict(zip(labels, specs, strict=True))
        _run(jobs, ctx, lambda label: _backend(config, lm, by_label[label], endpoint), run_dir, progress, on_record)
    _write_suite_summary(config, run_dir)
    return run_dir


def _trained_here(model: str) -> bool:
    """A local model directory (not an alias), which ``longkit train`` may have written."""
    from longkit.models import ALIASES

    return model not in ALIASES and Path(model).expanduser().is_dir()


def _record_training(model_dir: Path, run_dir: Path, meta: dict[str, Any]) -> None:
    """A model trained by ``longkit train``: its training report goes into run.json and its loss curve next to the
    samples (``train_loss.png``), so the run directory alone can show the training beside the scores."""
    from longkit.runtime.train import LOSS_PLOT, read_report

    training = read_report(model_dir)
    if training is None:
        return
    meta["training"] = training
    if (model_dir / LOSS_PLOT).is_file():
        shutil.copyfile(model_dir / LOSS_PLOT, run_dir / TRAIN_LOSS_PLOT)


def _run(jobs: list[Job], ctx: TaskContext, backend_for: Callable[[str], Any], run_dir: Path, progress: bool,
         on_record: Callable[[dict[str, Any]], None] | None) -> None:
    """Every job through the backend of its method (jobs come grouped by method); each record is written as its
    result comes back."""
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

        def requests(mine: list[Job]) -> Iterator[Any]:
            for job in mine:
                bar.update(total, description=f"{job.method} | {job.task} | {job.length} tok")
                request = job.request(ctx)
                if isinstance(request, GenerationRequest):
                    request.label = job.id
                yield request

        for label, group in groupby(jobs, key=lambda j: j.method):
            mine = list(group)
            with backend_for(label) as backend:
                warn = getattr(backend, "warn", None)
                if progress and warn is not None:
                    # Retry warnings print above the live progress bar instead of tearing it.
                    warn = backend.warn = lambda line: bar.console.print(line, markup=False, highlight=False)
                for index, result in backend.generate_many(requests(mine)):
                    # A sample may need a second answer (Self-Route's fall back to the full context).
                    again = mine[index].follow_up(result)
                    if again is not None:
                        again.label = mine[index].id
                        result = again.send(backend)
                    record = mine[index].record(result)
                    if record.get("error") is not None and warn is not None:
                        warn(f"warning: {record['id']}: failed, not scored: {record['error']}")
                    writer.write(record)
                    if on_record is not None:
                        on_record(record)
                    bar.advance(total, mine[index].length)


@contextmanager
def _backend(config: EvalConfig, lm: Any, spec: MethodSpec, endpoint: OpenAIBackend | None) -> Iterator[Any]:
    """The endpoint as it is (its methods are validated to be the baseline), or the local model under ``spec``."""
    if endpoint is not None:
        yield endpoint
        return
    with apply(lm.model, spec) as applied:
        yield HFBackend(lm, applied, config.prefill_chunk, config.ppl_chunk)


SUITE_SUMMARY_FILE = "suite_summary.json"


def _write_suite_summary(config: EvalConfig, run_dir: Path) -> None:
    """The suite's official aggregates of every record in the run, next to samples.jsonl."""
    if not config.suite:
        return
    from longkit.eval.suites import get_suite

    suite = get_suite(config.suite)
    records = [r for r in load_records(run_dir) if r.get("suite") == suite.name]
    summary = {"suite": suite.name, "paper": suite.paper, "scores": suite.summarize(records),
               "errors": sum(1 for r in records if r.get("error") is not None)}
    (run_dir / SUITE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
