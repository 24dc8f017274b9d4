"""The training run: load a model, apply methods through the seam, pack long data, train with transformers' Trainer.

>>> from longkit.runtime.train import TrainConfig, train
>>> out = train(TrainConfig(recipe="continual", model="smollm2-135m", data=["docs/"], target_length=16384,
...                         rope="yarn:factor=2", steps=200, out="runs/yarn-16k"))

What a run writes under ``out``:

- ``train_run.json``: the run's settings (its identity) and status; a rerun with the same settings resumes, a
  different run is refused, so nothing already written is lost;
- ``checkpoints/checkpoint-N``: Trainer checkpoints every ``save_every`` steps (weights, optimiser, scheduler, RNG
  states); after a crash (even ``kill -9``) the same command resumes from the last one with the same data order;
- ``train_log.jsonl``: one line per step (loss, learning rate, grad norm, tokens seen, seconds) and, with
  ``eval_every``, one line per evaluation of the held-out rows (``eval_loss``; :func:`read_eval_log`);
- ``data_stats.json``: the packed data's statistics (``eval_data_stats.json``: the held-out data's);
- at the end, a plain Hugging Face model directory (``config.json`` with the RoPE method's ``rope_parameters``,
  ``model.safetensors``, the tokenizer); LoRA adapters are merged (and kept as peft's ``adapter/``);
- ``train_report.json`` and ``loss.png``: tokens seen, time, the loss curve (and the held-out loss).

Held-out loss (``eval_every`` N with ``eval_data``): transformers' evaluation (``eval_strategy="steps"``) every N
steps, before the first step and after the last, on the first ``eval_rows`` rows of the held-out data, packed as
the training rows and passed through the recipe's transform with the run's seed (PoSE: the same skip-wise
positions at every evaluation, and in a resumed run). Evaluation leaves torch's random state as it found it, so
the training losses are those of the same run without it (LoRA dropout included).

Scale-out: under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) the same run is DDP (each rank its own
rows; a step trains on N x the rows of one process) or, with ``seq_parallel`` (``--seq-parallel ring|ulysses``),
sequence parallelism for rows longer than one device holds: all N ranks train on the same rows, each holding 1/N
of every row's tokens (ring: the zigzag layout, rows a multiple of 2N tokens; Ulysses: contiguous, a multiple of N,
heads divisible by N), and attention alone communicates. Packed documents and PoSE rows keep their per-document
masks across the shards. The loss is the whole row's loss and the gradients those of one process (each rank's
gradient is scaled by N before DDP averages them, so the average is their sum), so the run equals one process
training the same rows. The sequence-parallel group is every rank of the run (no data parallelism beside it).

The RoPE method is "trained in": during training the seam swaps the rotary module (the config stays untouched),
and the saved config carries the method's ``rope_parameters`` (:func:`trained_config`), so transformers rebuilds
the same rotary embedding on loading and the saved model gives the trained model's logits.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from longkit.errors import DataError, MethodError, TrainError
from longkit.models import DEFAULT_MODEL, fast_bf16, load_model
from longkit.models.introspect import trained_length
from longkit.seam import Applied, MethodSpec
from longkit.train import data as D
from longkit.train.recipes import Recipe, create_recipe

PRECISIONS = ("auto", "fp32", "bf16")
#: ``seq_parallel`` settings: longkit's sequence-parallel attention methods (each rank holds 1/W of every row).
SEQ_PARALLEL = ("ring", "ulysses")
RUN_FILE = "train_run.json"
LOG_FILE = "train_log.jsonl"
#: The held-out data's statistics (runs with ``eval_every``).
EVAL_STATS_FILE = "eval_data_stats.json"
#: Files a finished run leaves besides the model: a rerun of a finished run finds them and stops.
REPORT_FILE = "train_report.json"
#: The loss curve a finished run draws beside its report (when matplotlib is installed).
LOSS_PLOT = "loss.png"


@dataclass
class TrainConfig:
    """The settings of one training run; all but ``out``, ``progress`` and ``keep_checkpoints`` are its identity."""

    recipe: str = "continual"
    model: str = DEFAULT_MODEL
    #: Training sources (text directories, .jsonl, .parquet, built-in sources such as ``kv-retrieval``, each
    #: optionally ``:share=F,...``: :func:`longkit.train.data.parse_source`); empty = the offline Python corpus.
    data: list[str] = field(default_factory=list)
    target_length: int = 16384
    rope: str | None = None
    attention: str | None = None
    steps: int = 100
    out: str = "train-run"
    seed: int = 0
    save_every: int = 50
    precision: str = "auto"
    device: str = "cpu"
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    text_field: str = "text"
    progress: bool = True
    #: Keep ``checkpoints/`` after a successful run (default: delete them; the saved model is the result).
    keep_checkpoints: bool = False
    #: Sequence parallelism under torchrun: ``ring`` or ``ulysses``; every rank trains on the same rows, each
    #: holding 1/W of their tokens (see :func:`train`). None: each rank trains on its own rows (DDP).
    seq_parallel: str | None = None
    #: Evaluate the loss on held-out rows every N steps (and before the first, after the last): needs ``eval_data``.
    eval_every: int | None = None
    #: Held-out sources, in the ``data`` spelling (e.g. ``kv-retrieval:seed=1,count=16``); no ``share``.
    eval_data: list[str] = field(default_factory=list)
    #: How many packed held-out rows each evaluation scores (the first ones, after a seeded shuffle).
    eval_rows: int = 16

    def identity(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("out", "progress", "keep_checkpoints"):
            out.pop(key)
        # Runs from before these settings existed keep their identity (and stay resumable).
        if out["seq_parallel"] is None:
            out.pop("seq_parallel")
        if out["eval_every"] is None and not out["eval_data"]:
            for key in ("eval_every", "eval_data", "eval_rows"):
                out.pop(key)
        return out

    def validate(self) -> None:
        for key, low in (("target_length", 2), ("steps", 1), ("save_every", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainError(f"parameter '{key}' must be an int >= {low} (got {value!r})")
        if self.precision not in PRECISIONS:
            raise TrainError(f"parameter 'precision' must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.seq_parallel is not None and self.seq_parallel not in SEQ_PARALLEL:
            raise TrainError(f"parameter 'seq_parallel' must be one of {', '.join(SEQ_PARALLEL)} (got "
                             f"{self.seq_parallel!r})")
        self._validate_eval()

    def _validate_eval(self) -> None:
        if self.eval_every is None:
            if self.eval_data:
                raise TrainError("parameter 'eval_data' needs 'eval_every' (--eval-every N: evaluate every N steps)")
            return
        every = self.eval_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise TrainError(f"parameter 'eval_every' must be an int >= 1 (got {every!r})")
        if not self.eval_data:
            raise TrainError("parameter 'eval_every' needs held-out data: give --eval-data SOURCE (e.g. "
                             "python-docs, or kv-retrieval:seed=1,count=16)")
        rows = self.eval_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise TrainError(f"parameter 'eval_rows' must be an int >= 1 (got {rows!r})")
        if self.seq_parallel is not None:
            raise TrainError("parameter 'eval_every' does not work with 'seq_parallel' (the held-out rows would "
                             "need the sharded forward); evaluate the saved model instead")


# ------------------------------------------------------------------------------------------ the trained-in config


def trained_config(model: Any, rope: Any | None, target_length: int) -> Any:
    """A copy of ``model``'s config as the trained model's ``config.json`` states it: the RoPE method's
    ``rope_parameters`` (transformers rebuilds the same rotary embedding from them) and, for plain RoPE, the target
    length as the window."""
    if rope is None:
        cfg = copy.deepcopy(model.config)
    else:
        if getattr(rope, "n_start_tokens", lambda: 0)():
            # LongRoPE's n-hat is a forward hook of longkit's; transformers has no setting for it.
            raise MethodError(f"rope method '{rope.name}': parameter 'start_tokens' cannot be trained in: transformers "
                              "has no setting for it, so the saved model would not run as trained; use start_tokens=0")
        cfg = rope.scaled_config(model)
    if cfg.rope_parameters.get("rope_type", "default") == "default":
        # Plain RoPE (none, or ABF's new base) ignores the window, so the config can state the trained length.
        # The scaled types read it (dynamic NTK scales beyond it; YaRN's factor set it): left as the method set it.
        cfg.max_position_embeddings = max(int(cfg.max_position_embeddings), int(target_length))
    return cfg


# ------------------------------------------------------------------------------------------------- the output dir


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def check_out_dir(out: Path, identity: dict[str, Any]) -> str:
    """``"new"``, ``"resume"`` or ``"done"`` for the run ``identity`` in ``out``; a TrainError if ``out`` holds
    anything else (another run, other files), so that nothing there is overwritten."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"parameter 'out': {out} is a file; give a directory for the trained model")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise TrainError(f"parameter 'out': {out} is not empty and holds no longkit training run; choose a new "
                         "directory (nothing was written)")
    try:
        old = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"parameter 'out': cannot read {run_file} ({err}); choose a new directory") from None
    if old.get("identity") != identity:
        diff = sorted(k for k in set(identity) | set(old.get("identity", {}))
                      if identity.get(k) != old.get("identity", {}).get(k))
        shown = ", ".join(f"{k}: {old.get('identity', {}).get(k)!r} there, {identity.get(k)!r} now" for k in diff[:3])
        raise TrainError(f"parameter 'out': {out} holds a different training run ({shown}); choose another "
                         "directory or rerun with the same settings to resume it")
    return "done" if old.get("status") == "done" else "resume"


def run_identity(config: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """What makes two runs the same run: the config's identity and, for more than one process, the number of
    processes (it sets the global batch and which rows each rank trains on, so a resume needs the same)."""
    identity = config.identity()
    if world_size > 1:
        identity["world_size"] = world_size
    return identity


def _write_run(out: Path, config: TrainConfig, status: str, identity: dict[str, Any], **extra: Any) -> None:
    from longkit.runtime.threads import thread_settings

    # threads, OpenMP wait policy and load average: the step times in the log depend on them (issue #24)
    record = {"identity": identity, "digest": _digest(identity), "status": status, "threads": thread_settings(),
              **extra}
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / RUN_FILE)


# ----------------------------------------------------------------------------------------------------- the data


class PackedRows(torch.utils.data.Dataset):
    """Exactly ``n`` training (or held-out) rows: the packed rows in order, cycled when there are fewer, each
    passed through the recipe's :meth:`~longkit.train.recipes.Recipe.transform` (which depends only on the row and
    its index, so a resumed run sees the same rows, and every evaluation the same held-out rows)."""

    def __init__(self, packed: D.Packed, n: int, recipe: Recipe, seed: int):
        self.packed, self.n, self.recipe, self.seed = packed, n, recipe, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.packed[i % len(self.packed)]
        row = {k: row[k] for k in ("input_ids", "labels", "position_ids")}
        return self.recipe.transform(row, i, self.seed)


def _documents(config: TrainConfig, tokenizer: Any, length: int) -> tuple[list[D.Document], dict[str, float]]:
    """The training documents and the token shares asked for by source name."""
    if not config.data:
        return D.default_corpus(), {}
    return D.read_sources(config.data, tokenizer=tokenizer, row_length=length, text_field=config.text_field)


def _held_out(config: TrainConfig, tokenizer: Any, length: int) -> D.Packed | None:
    """The held-out rows of ``eval_data`` (the first ``eval_rows`` after a seeded shuffle), or None."""
    if config.eval_every is None:
        return None
    specs = [D.parse_source(s) for s in config.eval_data]
    shared = next((s for s in specs if s.share is not None), None)
    if shared is not None:
        raise DataError(f"parameter 'eval_data': source {shared.path!r} has a 'share'; held-out data is packed "
                        "whole, shares apply to --data")
    docs, _ = D.read_sources(config.eval_data, tokenizer=tokenizer, row_length=length,
                             text_field=config.text_field)
    packed = D.build(docs, tokenizer, length, seed=config.seed)
    n = min(config.eval_rows, len(packed))
    packed = D.Packed(packed.input_ids[:n], packed.labels[:n], packed.position_ids[:n], packed.doc_ids[:n],
                      packed.stats)
    if int((packed.labels != -100).sum()) == 0:
        raise DataError("parameter 'eval_data': the held-out rows give no token to predict")
    return packed


# ------------------------------------------------------------------------------------------------- the callbacks


def _callbacks(out: Path, tokens_per_step: int, progress: bool) -> tuple[list[Any], dict]:
    from transformers import TrainerCallback

    # "scored" / "empty": this rank's micro-batches with / without a token to predict since the last log (the
    # trainer counts them), so a step that trained on nothing is marked in the log, not plotted as a loss of 0.
    state: dict[str, Any] = {"bad": None, "last_good": None, "scored": 0, "empty": 0}
    log_path = out / LOG_FILE

    class JsonlLog(TrainerCallback):
        """One JSON line per logged step; a non-finite loss stops the run before the step's checkpoint is saved."""

        def on_train_begin(self, args, st, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_log(self, args, st, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs and st.is_world_process_zero:
                record = {"step": st.global_step, "eval_loss": float(logs["eval_loss"]),
                          "tokens": st.global_step * tokens_per_step,
                          "seconds": round(time.perf_counter() - self.t0, 3)}
                with log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if not logs or "loss" not in logs:
                return
            # The logged loss is the mean over all ranks (the Trainer gathers it), so every rank stops alike.
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                state["bad"] = (st.global_step, loss)
                control.should_save = False
                control.should_training_stop = True
            if not st.is_world_process_zero:
                return
            record = {"step": st.global_step, "loss": loss, "learning_rate": logs.get("learning_rate"),
                      "grad_norm": logs.get("grad_norm"), "tokens": st.global_step * tokens_per_step,
                      "seconds": round(time.perf_counter() - self.t0, 3)}
            # Exact in one process and under sequence parallelism (every rank holds the same rows); with DDP the
            # logged loss is the ranks' mean, so only a step without a target on every rank would be 0 — and the
            # mark says this rank's.
            if state["empty"] and not state["scored"]:
                record["no_targets"] = True
            state["scored"] = state["empty"] = 0
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

        def on_save(self, args, st, control, **kwargs):
            state["last_good"] = st.global_step

    class Bar(TrainerCallback):
        """A progress bar with tokens/s, the loss and the ETA (tqdm, as transformers' own bar)."""

        def on_train_begin(self, args, st, control, **kwargs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=st.max_steps, initial=st.global_step, desc="training", unit="step", dynamic_ncols=True)
            self.t0, self.s0 = time.perf_counter(), st.global_step

        def on_step_end(self, args, st, control, **kwargs):
            self.bar.update(st.global_step - self.bar.n)

        def on_log(self, args, st, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs:
                self.eval_loss = logs["eval_loss"]
            if logs and "loss" in logs:
                rate = (st.global_step - self.s0) * tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)
                held = {"eval_loss": f"{self.eval_loss:.4f}"} if getattr(self, "eval_loss", None) is not None else {}
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", **held, tok_s=f"{rate:,.0f}")

        def on_train_end(self, args, st, control, **kwargs):
            self.bar.close()

    return ([JsonlLog(), Bar()] if progress else [JsonlLog()]), state


def _trim_log(out: Path, upto: int) -> None:
    """Drop the log lines of steps after checkpoint ``upto``: a resumed run logs them again."""
    path = out / LOG_FILE
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto]
        path.write_text("".join(line + "\n" for line in keep))


def _log_records(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """The per-step training records of ``out/train_log.jsonl`` (loss, learning rate, grad norm, tokens, seconds;
    ``no_targets: true`` on a step whose rows held no token to predict: its loss is 0 and it trained nothing)."""
    return [r for r in _log_records(out) if "loss" in r]


def read_eval_log(out: str | Path) -> list[dict[str, Any]]:
    """The held-out evaluations of ``out/train_log.jsonl`` (step, eval_loss, tokens, seconds); step 0 is the
    model before training."""
    return [r for r in _log_records(out) if "eval_loss" in r]


# ------------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class _Distributed:
    """This process's place in a distributed run: ``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE`` and
    ``RANK``; then the default process group (gloo on CPU, NCCL on CUDA) is started here, before the Trainer,
    because the ranks must agree on the output directory before rank 0 writes to it. The Trainer (accelerate)
    finds the group and wraps the model in DDP (or FSDP)."""

    rank: int = 0
    world: int = 1
    #: ``accelerate launch --use_fsdp`` (or an accelerate config with FSDP) asked for FSDP.
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def fsdp_requested() -> bool:
        return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")

    @classmethod
    def start(cls, device: str) -> _Distributed:
        fsdp = cls.fsdp_requested()
        if fsdp and not device.startswith("cuda"):
            # accelerate (1.16) turns FSDP on only for accelerator devices; on CPU its state stays MULTI_CPU and
            # drops the FSDP plugin, so the run would be plain DDP while the user asked for sharding.
            raise TrainError(f"FSDP was requested (ACCELERATE_USE_FSDP) with parameter 'device' = {device!r}: "
                             "accelerate runs FSDP only on GPUs and would silently fall back to DDP on CPU; use "
                             "--device cuda, or launch without --use_fsdp for DDP")
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(fsdp=fsdp)
        from longkit.attention.sequence_parallel import init_distributed

        rank, world = init_distributed(device)
        return cls(rank, world, fsdp)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _use_bf16(precision: str, device: str) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return fast_bf16()


def train(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> Path:
    """Run (or resume) the training run ``config``; return the directory of the saved model.

    Every check that can fail (settings, recipe, methods, model, data, output directory) runs before anything is
    written. ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests use them to interrupt a run).
    """
    config.validate()
    recipe = create_recipe(config.recipe)
    attention = _attention(config, recipe)
    if config.seq_parallel:
        _check_seq_parallel(config, recipe, attention)
        # The sequence-parallel method is the attention of the run (it holds the model's attention slot).
        attention = config.seq_parallel
    spec = MethodSpec.build(rope=config.rope, attention=attention)
    out = Path(config.out).expanduser()
    dist = _Distributed.start(config.device)
    sp = _SeqParallel.start(config, recipe, dist) if config.seq_parallel else None
    if dist.fsdp and recipe.lora:
        raise TrainError("FSDP with lora=true is not supported: merging the adapters needs the whole weights on "
                         "one rank; train LoRA with DDP (launch without --use_fsdp)")
    identity = run_identity(config, dist.world)
    state = check_out_dir(out, identity)
    if state == "done":
        return out
    lm = load_model(config.model, dtype="float32", device=config.device,
                    attn_implementation=config.attn_implementation, seed=config.seed)
    model, tokenizer = lm.model, lm.tokenizer
    window = trained_length(model)
    recipe.check(window=window, target_length=config.target_length)
    spec.check(model)
    if sp is not None:
        sp.check_model(model, recipe.train_length(config.target_length))
    saved_config = trained_config(model, spec.rope, config.target_length)
    length = recipe.train_length(config.target_length)
    # The global batch: every rank takes ``batch_size`` rows per micro-batch (accelerate deals the sequential
    # batches out round-robin), so a step of W ranks trains on the rows one process with W x batch_size would.
    # Sequence parallelism: the W ranks share every row (each holds 1/W of its tokens), so a step trains on the
    # rows of one process.
    rows = config.steps * recipe.batch_size * recipe.grad_accum * (1 if sp else dist.world)
    docs, shares = _documents(config, tokenizer, length)
    packed = D.build(docs, tokenizer, length, total_tokens=rows * length, seed=config.seed, shares=shares)
    if int((packed.labels != -100).sum()) == 0:
        raise DataError("the training data give no token to predict (every document is a single token)")
    held_out = _held_out(config, tokenizer, length)

    # Nothing was written before this line. Every rank has read the output directory above; only rank 0
    # writes to it, after all of them have (else a rank would find rank 0's files and refuse the directory).
    dist.barrier()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_run(out, config, "running", identity)
        packed.stats.write(out / "data_stats.json")
        if held_out is not None:
            held_out.stats.write(out / EVAL_STATS_FILE)
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    start_step = int(Path(last).name.split("-")[-1]) if last else 0
    if dist.main:
        if last:
            _trim_log(out, start_step)
        elif (out / LOG_FILE).exists():
            (out / LOG_FILE).unlink()

    use_cache = model.config.use_cache
    # No KV cache in training: transformers then reads the packed documents from the restarting position ids.
    model.config.use_cache = False
    tokens_per_step = rows // config.steps * length
    own, guard = _callbacks(out, tokens_per_step, config.progress and dist.main)
    bf16 = _use_bf16(config.precision, config.device)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=config.steps, per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.lr,
        warmup_steps=int(recipe.warmup_ratio * config.steps), lr_scheduler_type="cosine",
        weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm, logging_steps=1,
        logging_nan_inf_filter=False, save_strategy="steps", save_steps=config.save_every, seed=config.seed,
        data_seed=config.seed, train_sampling_strategy="sequential", report_to="none", disable_tqdm=True,
        use_cpu=config.device == "cpu", bf16=bf16, activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        dataloader_num_workers=0,
        # Sequence parallelism: every rank holds the same rows, so their target count is not summed over ranks.
        average_tokens_across_devices=sp is None,
        # Held-out loss: every eval_every steps, before the first step of a new run (the untrained model's) and,
        # as transformers does with steps, after the last.
        eval_strategy="steps" if held_out is not None else "no", eval_steps=config.eval_every,
        eval_on_start=held_out is not None and last is None, per_device_eval_batch_size=recipe.batch_size,
        prediction_loss_only=True, label_names=["labels"],
    )
    t0 = time.perf_counter()
    with Applied(model, spec):
        trainee = recipe.wrap(model)
        trainee.train()
        # The held-out rows go through the recipe's transform like the training rows, with the run's seed: the
        # same rows (PoSE: the same positions) at every evaluation.
        held = PackedRows(held_out, len(held_out), recipe, config.seed) if held_out is not None else None
        trainer = _RecipeTrainer(recipe=recipe, sp=sp, counts=guard, model=trainee, args=args,
                                 train_dataset=PackedRows(packed, rows, recipe, config.seed), eval_dataset=held,
                                 callbacks=[*own, *callbacks])
        # The bar shows the loss; transformers' printer would add a dict line per step.
        trainer.remove_callback(PrinterCallback)
        if dist.fsdp and not trainer.is_fsdp_enabled:
            raise TrainError("FSDP was requested (ACCELERATE_USE_FSDP) but accelerate did not enable it for this "
                             "run; refusing to train unsharded")
        trainer.train(resume_from_checkpoint=last)
        if guard["bad"] is not None:
            step, loss = guard["bad"]
            kept = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
            if dist.main:
                _write_run(out, config, "stopped", identity, reason=f"loss {loss} at step {step}")
            where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved before it"
            raise TrainError(f"loss is {loss} at step {step}: training stopped; {where} (lower the learning rate, "
                             f"lr={recipe.lr:g}, or check the data)")
        # FSDP leaves each rank a shard of the weights: gather the full state dict (a collective: every rank
        # calls it; rank 0 gets the tensors). DDP replicas are whole and equal, so rank 0's model is the model.
        full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
        if recipe.lora:
            if dist.main:
                trainee.save_pretrained(out / "adapter")
            model = trainee.merge_and_unload()
    seconds = time.perf_counter() - t0
    model.config = saved_config
    model.config.use_cache = use_cache
    model.eval()
    if dist.main:
        model.save_pretrained(out, state_dict=full_state)
        tokenizer.save_pretrained(out)
        _write_report(out, config, recipe, packed, seconds, start_step, tokens_per_step, window, held_out)
        _write_run(out, config, "done", identity)
        if ckpt_dir.is_dir() and not config.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    # No rank returns before the model is saved: the caller on any rank may read it.
    dist.barrier()
    return out


def _check_seq_parallel(config: TrainConfig, recipe: Recipe, attention: str | None) -> None:
    """Refuse, before anything starts, what sequence parallelism cannot train exactly."""
    name = config.seq_parallel
    if attention:
        raise TrainError(f"parameter 'seq_parallel' = {name!r} is the run's attention method (sharded attention); it "
                         f"cannot run with the attention method {attention!r}"
                         + (f" that training recipe '{recipe.name}' sets" if recipe.attention() else "")
                         + "; drop one of them")
    if recipe.loss != "ce":
        raise TrainError(f"parameter 'seq_parallel' = {name!r} works with loss=ce only: loss={recipe.loss} scores "
                         "short windows with extra forwards of the whole row, which one rank does not hold")
    if _Distributed.fsdp_requested():
        raise TrainError(f"parameter 'seq_parallel' = {name!r} cannot run under FSDP (accelerate's --use_fsdp): the "
                         "ranks share each row rather than the weights; launch with torchrun (DDP) instead")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise TrainError(f"parameter 'seq_parallel' = {name!r} needs several processes: launch with `torchrun "
                         "--nproc-per-node N longkit train ...` (N >= 2); this is one process (WORLD_SIZE unset or 1)")


@dataclass
class _SeqParallel:
    """Sequence parallelism over all ranks of the run: the attention method's layout, its own process group
    (its point-to-point traffic then never interleaves with DDP's gradient all-reduce on the default group),
    and the number of ranks."""

    method: str
    layout: str
    group: Any
    world: int

    @classmethod
    def start(cls, config: TrainConfig, recipe: Recipe, dist: _Distributed) -> _SeqParallel:
        from longkit.registry import registry

        layout = registry("attention").get(config.seq_parallel).layout
        length = recipe.train_length(config.target_length)
        parts = 2 * dist.world if layout == "zigzag" else dist.world
        if length % parts:
            what = "the training window (PoSE's 'window')" if length != config.target_length else "'target_length'"
            raise TrainError(f"parameter 'seq_parallel' = {config.seq_parallel!r} on {dist.world} ranks needs rows "
                             f"of a multiple of {parts} tokens ({'2 x ' if layout == 'zigzag' else ''}the number of "
                             f"ranks, the {layout} layout); {what} = {length} is not")
        # A collective: every rank creates the group, in the same order.
        group = torch.distributed.new_group(list(range(dist.world)))
        return cls(config.seq_parallel, layout, group, dist.world)

    def check_model(self, model: Any, length: int) -> None:
        """Refuse, before training starts, a model whose attention the shards cannot compute exactly."""
        for name, module in model.named_modules():
            window = getattr(module, "sliding_window", None) if name.endswith("attn") else None
            if window and window < length:
                raise TrainError(f"parameter 'seq_parallel' = {self.method!r}: the model has sliding-window attention "
                                 f"(window {window}, layer {name}) shorter than the {length}-token rows, which the "
                                 "sharded attention cannot compute; train it without sequence parallelism")
        cfg = getattr(model.config, "get_text_config", lambda: model.config)()
        if self.method == "ulysses":
            heads = int(cfg.num_attention_heads)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            if heads % self.world or (kv % self.world and self.world % kv):
                raise TrainError(f"parameter 'seq_parallel' = 'ulysses' on {self.world} ranks needs the query heads "
                                 f"({heads}) to be a multiple of the number of ranks and the key/value heads ({kv}) "
                                 "a multiple or a divisor of it; use ring instead")

    def rows(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(position_ids, doc_ids)`` of a batch of packed rows: the documents from PoSE's explicit block-causal
        mask (its skipped positions do not show them), else from the restarting position ids (as transformers
        reads them in one process); refused when the ranks do not hold the same rows."""
        ids = inputs["input_ids"]
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        mask = inputs.get("attention_mask")
        if mask is None:
            from longkit.attention.sequence_parallel import documents_from_positions

            docs = documents_from_positions(positions)
        else:
            docs = _documents_from_mask(mask)
        self._check_same_rows(ids, positions, inputs["labels"])
        return positions, docs

    def _check_same_rows(self, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> None:
        # Accelerate deals batches out across ranks unless told not to (get_train_dataloader): a cheap fingerprint
        # of the rows makes sure every rank shards the same ones, or the loss would silently mix rows.
        weights = torch.arange(1, ids.shape[-1] + 1, device=ids.device, dtype=torch.float64)
        mine = torch.stack([(x.double() * weights).sum() for x in (ids, positions, labels)])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine, group=self.group)
        if any(not torch.equal(x, mine) for x in every):
            raise TrainError("seq_parallel: the ranks received different rows; every rank must train on the same "
                             "rows (is the data loader sharded across ranks?)")


def _documents_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids from (B, 1, T, T) boolean block-causal masks; any other mask is refused (the sharded
    attention applies causal-within-document masks only)."""
    from longkit.train.data import block_causal_mask

    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        raise TrainError(f"seq_parallel: the rows' attention_mask must be a (B, 1, T, T) boolean block-causal mask; "
                         f"got {tuple(mask.shape)} {mask.dtype}")
    # token i starts a document where it may not see token i - 1
    starts = ~mask[:, 0].diagonal(offset=-1, dim1=1, dim2=2)
    docs = torch.cat([torch.zeros_like(starts[:, :1], dtype=torch.long), starts.long().cumsum(-1)], dim=1)
    if not torch.equal(block_causal_mask(docs).to(mask.device), mask):
        raise TrainError("seq_parallel: the rows' attention_mask is not block-causal (causal within contiguous "
                         "documents); the sharded attention cannot apply it")
    return docs


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by ``factor``. DDP averages the ranks' gradients, but the ranks hold
    parts of one row, whose gradient is their sum: scaling each rank's by W makes DDP's mean that sum."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _attention(config: TrainConfig, recipe: Recipe) -> str | None:
    own = recipe.attention()
    if own and config.attention:
        raise MethodError(f"training recipe '{recipe.name}' sets its own attention method ({own}); drop --attention "
                          f"{config.attention}")
    return own or config.attention


class _RecipeTrainer:
    """Built lazily (transformers' Trainer imports accelerate): a Trainer whose loss is the recipe's."""

    def __new__(cls, *, recipe: Recipe, sp: _SeqParallel | None = None, counts: dict | None = None,
                **kwargs: Any) -> Any:
        from transformers import Trainer

        from longkit.attention.sequence_parallel import SequenceParallel, sharded_row

        class RecipeTrainer(Trainer):
            def get_train_dataloader(self):
                loader = super().get_train_dataloader()
                if sp is not None:
                    # Every rank of the sequence-parallel group trains on the same rows: make accelerate's batch
                    # sampler a passthrough, as transformers does for its rank-aware BatchRebalanceSampler.
                    sampler = getattr(loader, "batch_sampler", None)
                    if not hasattr(sampler, "num_processes"):
                        raise TrainError("seq_parallel: cannot stop accelerate from dealing the rows out across "
                                         f"ranks (its data loader has no sharded batch sampler: {type(sampler)})")
                    sampler.num_processes, sampler.process_index = 1, 0
                return loader

            def evaluate(self, *args, **kwargs):
                # Evaluation must not move the random stream that training draws from (LoRA dropout): the
                # evaluation data loader's iterator draws its base seed from torch's generator. Put it back, so that
                # a run's training losses are the same with or without evaluation.
                cpu = torch.get_rng_state()
                cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
                try:
                    return super().evaluate(*args, **kwargs)
                finally:
                    torch.set_rng_state(cpu)
                    if cuda is not None:
                        torch.cuda.set_rng_state_all(cuda)

            def training_step(self, model, inputs, num_items_in_batch=None):
                if sp is None:
                    return super().training_step(model, inputs, num_items_in_batch)
                # On the model's device first (the Trainer would move them later): the rows' positions and
                # documents must be where the sharded forward compares and uses them.
                inputs = self._prepare_inputs(inputs)
                positions, docs = sp.rows(inputs)
                self._sp_row = (positions, docs)
                # The whole rows stay set through the backward: activation checkpointing recomputes the sharded
                # forward there, and it must see the same documents.
                with sharded_row(positions, docs, sp.group):
                    return super().training_step(model, inputs, num_items_in_batch)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if sp is not None:
                    return self._sp_loss(model, inputs, return_outputs, num_items_in_batch)
                empty = not bool((inputs["labels"][:, 1:] != -100).any())
                if counts is not None and model.training:
                    counts["empty" if empty else "scored"] += 1
                if empty:
                    # No token to predict in this micro-batch (an answer-only document split so that its rows hold
                    # only the prompt): a mean over no target is 0/0 = NaN, which would stop the run. It weighs
                    # zero instead. The forward still runs, so that every rank of a DDP/FSDP step takes part in
                    # the same collectives and a model whose logits are no longer finite is still caught (0 * NaN).
                    extra = {k: v for k, v in inputs.items() if k != "labels"}
                    out = model(**extra, use_cache=False)
                    loss = out.logits.sum() * 0.0
                    return (loss, out) if return_outputs else loss
                loss = recipe.compute_loss(model, inputs)
                if loss is None:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    # The recipe's loss is a mean over this micro-batch's targets; the Trainer then takes it as
                    # already normalised (the model's convention: a sum over num_items_in_batch, the targets of
                    # the whole accumulated step) and does not divide by grad_accum; rescale it to that convention.
                    scored = (inputs["labels"][:, 1:] != -100).sum()
                    loss = loss * scored / num_items_in_batch
                    if self.args.average_tokens_across_devices:
                        # As the Trainer does for the model's loss: num_items_in_batch counts the targets of every
                        # rank and DDP averages the ranks' gradients, so each rank's loss is scaled by the number
                        # of ranks (the average of the ranks' sums over all targets is then their mean).
                        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
                # The evaluation loop reads outputs[1:] (or a dict's non-loss values): a dict without logits.
                return (loss, {"loss": loss}) if return_outputs else loss

            def _sp_loss(self, model, inputs, return_outputs, num_items_in_batch):
                if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                    raise TrainError(f"seq_parallel: expected accelerate to wrap the model in DDP, got "
                                     f"{type(model).__name__}; the gradients would not be summed over the ranks")
                positions, docs = self._sp_row
                labels = inputs["labels"]
                # The model's convention (see compute_loss above): a sum over the step's targets divided by their
                # count, num_items_in_batch, when the Trainer passes it; else this micro-batch's mean.
                # A step with no target at all (answer-only rows holding only prompts) divides a zero sum by 1: it
                # weighs zero rather than giving 0/0 = NaN.
                count = None if num_items_in_batch is None else max(int(num_items_in_batch), 1)
                if counts is not None and model.training:
                    counts["scored" if bool((labels[:, 1:] != -100).any()) else "empty"] += 1
                out = SequenceParallel(model, sp.group, sp.layout)(
                    inputs["input_ids"], labels=labels, gather_logits=False, position_ids=positions, doc_ids=docs,
                    num_items=count)
                loss = _ScaleGrad.apply(out.loss, sp.world)
                return (loss, None) if return_outputs else loss

        return RecipeTrainer(**kwargs)


def _write_report(out: Path, config: TrainConfig, recipe: Recipe, packed: D.Packed, seconds: float, start_step: int,
                  tokens_per_step: int, window: int, held_out: D.Packed | None = None) -> None:
    log = [r for r in read_log(out) if not r.get("no_targets")]
    evals = read_eval_log(out)
    losses = [r["loss"] for r in log]
    report = {
        "recipe": recipe.label(), "model": config.model, "rope": config.rope, "attention": config.attention,
        "seq_parallel": config.seq_parallel,
        "trained_window": window, "target_length": config.target_length, "steps": config.steps,
        "tokens_seen": config.steps * tokens_per_step, "resumed_from_step": start_step,
        "seconds_this_session": round(seconds, 2),
        "tokens_per_second": round((config.steps - start_step) * tokens_per_step / max(seconds, 1e-9), 1),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "data": packed.stats.stats(),
    }
    if held_out is not None:
        report.update({
            "eval_every": config.eval_every, "eval_rows": len(held_out),
            "first_eval_loss": evals[0]["eval_loss"] if evals else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "eval_losses": {str(r["step"]): r["eval_loss"] for r in evals},
            "eval_data": held_out.stats.stats(),
        })
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    with contextlib.suppress(ImportError):
        _plot(out / LOSS_PLOT, log, f"{recipe.label()} {config.rope or ''} @ {config.target_length}", evals)


def read_report(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``train_report.json`` that ``longkit train`` left in ``model_dir``, or None when ``model_dir`` is not a
    directory holding one (a model alias, a model trained elsewhere). A damaged report is an error, not None: the
    evaluation report would otherwise silently lose its training section."""
    path = Path(model_dir).expanduser() / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainError(f"{path}: cannot read the training report ({err}); restore it or delete it") from None
    if not isinstance(report, dict):
        raise TrainError(f"{path}: the training report is not a JSON object; restore it or delete it")
    return report


def _plot(path: Path, log: list[dict[str, Any]], title: str, evals: Sequence[dict[str, Any]] = ()) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    tokens, losses = [r["tokens"] for r in log], [r["loss"] for r in log]
    ax.plot(tokens, losses, lw=0.8, alpha=0.4, label="per step")
    # Each step sees other documents, so the per-step loss is noisy; the trailing mean shows the trend.
    k = max(1, len(losses) // 20)
    if k > 1:
        mean = [sum(losses[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]
        ax.plot(tokens, mean, lw=1.6, label=f"mean of the last {k} steps")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.2, ms=3,
                label="held-out loss")
    if k > 1 or evals:
        ax.legend(fontsize=8)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss" if evals else "training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path)


__all__ = ["EVAL_STATS_FILE", "LOSS_PLOT", "PRECISIONS", "REPORT_FILE", "SEQ_PARALLEL", "TrainConfig", "check_out_dir",
           "read_eval_log", "read_log", "read_report", "run_identity", "train", "trained_config"]
