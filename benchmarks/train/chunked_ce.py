"""One training step's forward + backward with the model's own loss vs the chunked cross-entropy (issue #20).

SmolLM2-135M as ``longkit train`` trains it on this CPU: float32 weights under bfloat16 autocast (the Trainer's
``bf16``; ``--precision fp32`` for none), LoRA r=16 on q/k/v/o, gradient checkpointing (non-reentrant), sdpa
attention, one row of ``--length`` tokens. Two rows:

- ``full``: every position has a target (plain continual pre-training);
- ``answer-only``: only the last ``--answer`` targets are scored (a synthetic key-value retrieval chat, trained on
  the answer).

For each row and each repeat, ``old`` (the model's own loss: ``model(..., labels=...)``, the (T x V) logits upcast
to float32) and ``new`` (:func:`longkit.train.chunked_ce.model_chunked_ce`, ``loss=ce`` of the recipes) run one
after the other (interleaved, so that a disturbance of the shared CPU falls on both); a warm-up pair is not counted.
Wall time (``perf_counter``) and this process's CPU time (``process_time``) of forward + backward are recorded;
the table gives medians and the new / old ratios (only ratios are comparable across machines). Each row also
records the two losses and the largest gap between the two paths' gradients (relative to the largest gradient)
as a check that they compute the same thing.

``--part head`` times only what the loss changes: the LM head and the loss on fixed final hidden states (1, T, D)
that require grad (the model's tied head, frozen as under LoRA), forward + backward: ``old`` is the head on every
position then transformers' ``ForCausalLMLoss``; ``new`` is ``chunked_ce``. The gradient compared is the hidden
states'. ``--part step`` (default) is the whole training step above.

    nice -n 19 python benchmarks/train/chunked_ce.py

Writes ``benchmarks/train/results/NAME.json`` and ``NAME.md`` (``--name``, default ``chunked_ce``; ``--render``:
only the ``.md``, from the ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NAME = "chunked_ce"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _model(args):
    import longkit
    from longkit.train import create_recipe

    lm = longkit.load_model(args.model, dtype="float32", attn_implementation="sdpa")
    lm.model.config.use_cache = False
    recipe = create_recipe(f"continual:lora=true,lora_r=16,lora_targets=attention,ce_chunk={args.chunk}")
    model = recipe.wrap(lm.model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # peft with gradient checkpointing: the embeddings' output must require grad for the checkpointed layers
    model.enable_input_require_grads()
    model.train()
    return model, recipe


def _rows(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, args.length), generator=g)
    answer = torch.full_like(ids, -100)
    answer[:, -args.answer:] = ids[:, -args.answer:]
    return {"full": (ids, ids.clone()), "answer-only": (ids, answer)}


def _step(model, recipe, kind: str, ids, labels, precision: str):
    """Wall and CPU seconds of forward + backward, the loss and the LoRA gradients."""
    import torch

    model.zero_grad(set_to_none=True)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    c0, t0 = time.process_time(), time.perf_counter()
    with cast:
        if kind == "old":
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            loss = recipe.compute_loss(model, {"input_ids": ids, "labels": labels})
    loss.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return wall, cpu, float(loss.detach()), grads


def _head_step(model, hidden, kind: str, labels, chunk: int, precision: str):
    """Wall and CPU seconds of the LM head + loss, forward + backward, from fixed hidden states."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from longkit.train.chunked_ce import chunked_ce

    head = model.get_output_embeddings()
    h = hidden.detach().clone().requires_grad_()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    c0, t0 = time.process_time(), time.perf_counter()
    with cast:
        if kind == "old":
            loss = ForCausalLMLoss(head(h), labels, vocab_size=head.weight.shape[0])
        else:
            loss = chunked_ce(h, head, labels, chunk=chunk)
    loss.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, float(loss.detach()), {"hidden": h.grad.detach()}


def measure(model, recipe, name: str, ids, labels, args) -> dict:
    if args.part == "head":
        import torch

        g = torch.Generator().manual_seed(1)
        # (1, T, D) hidden states of the scale of a trained model's final norm output
        hidden = torch.randn(1, ids.shape[1], model.config.hidden_size, generator=g)

        def step(kind):
            return _head_step(model, hidden, kind, labels, args.chunk, args.precision)
    else:
        def step(kind):
            return _step(model, recipe, kind, ids, labels, args.precision)
    first = {}
    for kind in ("old", "new"):  # warm-up, not counted; its gradients are compared
        first[kind] = step(kind)
    old_g, new_g = first["old"][3], first["new"][3]
    scale = max(float(g.abs().max()) for g in old_g.values())
    gap = max(float((new_g[n] - g).abs().max()) for n, g in old_g.items())
    wall: dict[str, list[float]] = {"old": [], "new": []}
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for kind in ("old", "new"):
            w, c, _, _ = step(kind)
            wall[kind].append(round(w, 3))
            cpu[kind].append(round(c, 3))
    return {"row": name, "T": int(ids.shape[1]), "targets": int((labels[:, 1:] != -100).sum()), "wall_s": wall,
            "cpu_s": cpu, "loss_old": first["old"][2], "loss_new": first["new"][2],
            "grad_gap_rel": float(f"{gap / scale:.3g}")}


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown(meta: dict, rows: list[dict]) -> str:
    head = meta.get("part") == "head"
    what = ("the LM head + loss alone (fixed final hidden states)" if head else
            "a whole training step (forward + backward of the model)")
    lines = [
        f"# The model's own loss vs the chunked cross-entropy: {what} (CPU)",
        "",
        f"`{meta['command']}`",
        "",
        f"CPU: {meta['cpu_capability']}, {meta['threads']} torch threads ({meta['cpus']} CPUs, nice {meta['nice']}); "
        f"torch {meta['torch']}, transformers {meta['transformers']}. {meta['model']}, "
        f"{'float32 weights under bfloat16 autocast' if meta['precision'] == 'bf16' else 'float32'}, "
        + ("its tied head (frozen, as under LoRA)" if head else "LoRA r=16 on q/k/v/o, gradient checkpointing, sdpa")
        + f"; chunks of {meta['chunk']} rows. Forward + backward of {'the head and loss on ' if head else ''}one "
        f"row, median of {meta['repeats']} repeats (old and new interleaved); load average {meta['load_start'][0]:.2f} "
        f"at the start, {meta.get('load_end', ['?'])[0]} at the end.",
        "",
        ("`old`: the head on every position, then transformers' `ForCausalLMLoss` (the (T x V) logits upcast to "
         "float32)." if head else "`old`: `model(..., labels=...)` (the (T x V) logits, float32 log-softmax).")
        + " `new`: `loss=ce` through `chunked_ce` (only the scored positions, in chunks). Times are of this "
        "shared, CPU-capped machine: read the ratios.",
        "",
        "| row | T | targets | **new / old, wall** | new / old, CPU time | old (s) | new (s) | loss old | loss new | "
        f"{'hidden-state' if head else 'LoRA'} grad gap (rel.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, c = {k: _med(v) for k, v in r["wall_s"].items()}, {k: _med(v) for k, v in r["cpu_s"].items()}
        lines.append(
            f"| {r['row']} | {r['T']} | {r['targets']} | **{w['new'] / w['old']:.2f}** | {c['new'] / c['old']:.2f} | "
            f"{w['old']:.1f} | {w['new']:.1f} | {r['loss_old']:.5f} | {r['loss_new']:.5f} | {r['grad_gap_rel']:g} |"
        )
    if meta.get("partial"):
        lines += ["", f"**Partial:** {meta['partial']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--answer", type=int, default=25, help="scored targets of the answer-only row")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="full,answer-only")
    ap.add_argument("--part", choices=("step", "head"), default="step",
                    help="step: the whole training step; head: the LM head + loss alone")
    ap.add_argument("--name", default=NAME, help="results/NAME.json and NAME.md")
    ap.add_argument("--render", action="store_true", help="only rebuild NAME.md from the committed NAME.json")
    args = ap.parse_args(argv)
    name = args.name
    if args.render:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(markdown(data["meta"], data["rows"]))
        return

    import torch
    import transformers

    given = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["nice -n 19 python benchmarks/train/chunked_ce.py", *given]),
            "model": args.model, "part": args.part, "length": args.length, "answer": args.answer, "chunk": args.chunk,
            "precision": args.precision, "repeats": args.repeats,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "nice": os.nice(0), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "load_start": _load()}
    model, recipe = _model(args)
    data = _rows(args, model.config.vocab_size)
    wanted = args.rows.split(",")
    rows: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in wanted:
        rows.append(measure(model, recipe, row, *data[row], args))
        print(json.dumps(rows[-1]), flush=True)
        # Written after each row, marked partial, so that a stopped benchmark still leaves what it measured.
        meta["partial"] = f"{len(rows)} of {len(wanted)} rows measured"
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    meta.pop("partial")
    meta["load_end"] = _load()
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
