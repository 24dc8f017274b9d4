"""LongLoRA at 8K on SmolLM2-135M: does the loss fall, and what does S²-Attn save per step over full attention?

Two training runs through :func:`longkit.runtime.train.train`, the same model, data (the offline default corpus),
seed, learning rate and LoRA rank/targets, at 8192 tokens per row:

  (a) ``longlora``: S²-Attn in training (group = 1/4 of the row, half the heads shifted), LoRA+ on q/k/v/o with
      the embeddings and norms trained in full;
  (b) ``continual:lora=true``: full attention, LoRA on q/k/v/o.

Per-step loss and wall time come from each run's ``train_log.jsonl`` (the ``seconds`` column is cumulative, so a
step's time is the difference; step 1 also carries the Trainer's warm-up and is left out of the median). The
ratio is median S²-Attn step / median full-attention step. The runs are sequential (``train`` has no pause
short of killing a run and resuming it from a checkpoint), in the order of ``--order``; the load average before
and after each run is recorded so a run disturbed by other work can be told apart.

Why a benchmark-local recipe: SmolLM2-135M's trained window is 8192 and both recipes refuse a target length that
does not exceed it (``needs_longer_target``: they are meant to extend the window). To time S²-Attn against full
attention at the model's own 8K window, with no RoPE method changing the model, the script registers (in its own
process only) ``longlora_at_window`` and ``continual_at_window``: the same recipes with that check off. Nothing
else in them differs.

    nice -n 5 .venv/bin/python benchmarks/train/longlora_8k.py --steps 3

Writes ``benchmarks/train/results/longlora_8k.json`` and ``longlora_8k.md`` (``--render``: only the ``.md``, from
the ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NAME = "longlora_8k"
ROWS = {"longlora": "(a) longlora: S²-Attn + LoRA+", "continual": "(b) continual:lora=true: full attention + LoRA"}


def _register_at_window() -> None:
    from longkit.train import RECIPES
    from longkit.train.continual import Continual
    from longkit.train.longlora import LongLoRA
    from longkit.train.recipes import register_recipe

    for name, base in (("longlora_at_window", LongLoRA), ("continual_at_window", Continual)):
        if name not in RECIPES:
            register_recipe(name)(type(base.__name__ + "AtWindow", (base,), {"needs_longer_target": False}))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run(key: str, args, root: Path) -> dict:
    from longkit.runtime.train import TrainConfig, read_log, train

    common = f"lr={args.lr},lora_r={args.lora_r},lora_targets=attention,warmup_ratio=0"
    recipe = {"longlora": f"longlora_at_window:{common}", "continual": f"continual_at_window:lora=true,{common}"}[key]
    config = TrainConfig(recipe=recipe, model=args.model, target_length=args.length, steps=args.steps,
                         save_every=args.steps, seed=args.seed, precision=args.precision, out=str(root / key),
                         progress=False)
    load_before, t0 = _load(), time.perf_counter()
    out = train(config)
    wall = time.perf_counter() - t0
    log = read_log(out)
    seconds = [r["seconds"] for r in log]
    steps = [round(b - a, 3) for a, b in zip([0.0, *seconds[:-1]], seconds, strict=True)]
    report = json.loads((out / "train_report.json").read_text())
    return {"key": key, "recipe": recipe, "losses": [r["loss"] for r in log], "step_seconds": steps,
            "wall_seconds": round(wall, 2), "load_before": load_before, "load_after": _load(),
            "recipe_label": report["recipe"], "tokens_per_second": report["tokens_per_second"],
            "tokens_per_step": log[-1]["tokens"] // log[-1]["step"]}


def _median_step(row: dict) -> float:
    steps = row["step_seconds"][1:] or row["step_seconds"]
    return statistics.median(steps)


def markdown(meta: dict, rows: list[dict]) -> str:
    by = {r["key"]: r for r in rows}
    lines = [
        f"# LongLoRA at {meta['length']} tokens on {meta['model']}: loss and step time, S²-Attn vs full attention",
        "",
        f"`{meta['command']}`",
        "",
        f"CPU: {meta['cpu_capability']}, {meta['threads']} threads, {meta['dtype']}; gradient checkpointing "
        f"{'on' if meta['gradient_checkpointing'] else 'off'}; LoRA r={meta['lora_r']} on q/k/v/o, lr={meta['lr']}, "
        f"seed {meta['seed']}, data: the offline default corpus. Runs in the order "
        f"{', '.join(r['key'] for r in rows)}, one after the other.",
        "",
        "| run | steps | first loss | last loss | loss falls | median step (s, steps 2..N) | all steps (s) | "
        "load avg before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("longlora", "continual"):
        if key not in by:
            continue
        r = by[key]
        falls = "yes" if r["losses"][-1] < r["losses"][0] else "no"
        lines.append(f"| {ROWS[key]} | {len(r['losses'])} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {falls} | "
                     f"{_median_step(r):.1f} | {', '.join(f'{s:.1f}' for s in r['step_seconds'])} | "
                     f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
    if "longlora" in by and "continual" in by:
        ratio = _median_step(by["longlora"]) / _median_step(by["continual"])
        lines += ["", f"**Step time ratio S²-Attn / full attention: {ratio:.3f}** (median step, steps 2..N)."]
    if meta.get("partial"):
        lines += ["", f"**Partial:** {meta['partial']}"]
    lines += ["", "Per-step losses:", ""]
    for key in ("longlora", "continual"):
        if key in by:
            lines.append(f"- {key}: {', '.join(f'{x:.4f}' for x in by[key]['losses'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--order", default="longlora,continual")
    ap.add_argument("--render", action="store_true", help="only rebuild the .md from the committed .json")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads((RESULTS / f"{NAME}.json").read_text())
        (RESULTS / f"{NAME}.md").write_text(markdown(data["meta"], data["rows"]))
        return

    import torch

    from longkit.models import fast_bf16

    _register_at_window()
    dtype = {"auto": "bf16" if fast_bf16() else "fp32"}.get(args.precision, args.precision)
    meta = {"command": "nice -n 5 python benchmarks/train/longlora_8k.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model, "length": args.length, "steps": args.steps, "lr": args.lr, "lora_r": args.lora_r,
            "seed": args.seed, "dtype": dtype, "gradient_checkpointing": True,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "nice": os.nice(0), "python": platform.python_version(),
            "torch": torch.__version__, "load_start": _load()}
    rows: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="longlora8k-") as tmp:
        keys = args.order.split(",")
        for key in keys:
            rows.append(_run(key, argparse.Namespace(**{**vars(args), "precision": dtype}), Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            # Written after each run, marked partial, so that a stopped benchmark still leaves what it measured.
            meta["partial"] = f"{len(rows)} of {len(keys)} runs finished; no ratio without both"
            (RESULTS / f"{NAME}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
            (RESULTS / f"{NAME}.md").write_text(markdown(meta, rows))
    meta.pop("partial")
    meta["load_end"] = _load()
    (RESULTS / f"{NAME}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
