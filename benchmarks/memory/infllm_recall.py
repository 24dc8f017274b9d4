"""Is it the memory or the model? InfLLM's retrieval of the needle, layer by layer, beside its answer (issue #22).

For each passkey / needle sample — the memory grid's prompts (seed 0, the same builders, so the same keys and
positions as ``grid.py``'s records) — this finds the answer's tokens in the prompt and the memory blocks that hold
them, generates as the grid does (``memory=infllm`` with the reference defaults, prefill in chunks of 512, the last
prompt token in a forward of its own), and records, for the step that produces the answer's first token, in how many
layers the blocks InfLLM loaded include every needle block (and at least one). A needle among the last ``n_local``
tokens is in the local window and needs no retrieval ("local"). A sample that retrieves the needle in every layer
and still answers wrong is the model failing to read what its memory handed it, not the memory failing to find it.

    python benchmarks/memory/infllm_recall.py --lengths 16384,32768 --tasks passkey,needle --depths 0.1,0.5,0.9

Writes ``results/infllm_recall.jsonl`` (one line per sample, appended as it finishes; a rerun skips the samples the
file holds) and ``results/infllm_recall.md`` (``--name`` to change both).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASKS = ("passkey", "needle")


def answer_positions(tokenizer, ids: list[int], answer: str) -> list[int]:
    """Token indices of every occurrence of ``answer`` in ``ids`` (with or without a leading space)."""
    found: set[int] = set()
    for text in (" " + answer, answer):
        pat = tokenizer.encode(text, add_special_tokens=False)
        n = len(pat)
        found |= {i + j for i in range(len(ids) - n + 1) if ids[i : i + n] == pat for j in range(n)}
    return sorted(found)


def needle_blocks(positions: list[int], length: int, n_init: int, n_local: int, block_size: int) -> list[int] | None:
    """Memory blocks holding the answer's tokens; None when they are all in the answer step's local window (the last
    n_local tokens) or among the initial tokens, which every query sees."""
    far = [p for p in positions if n_init <= p < length - n_local]
    return sorted({(p - n_init) // block_size for p in far}) or None


def one_sample(lm, task_name: str, length: int, depth: float, sample: int) -> dict:
    import longkit
    import longkit.eval.tasks  # noqa: F401  (registers the tasks)
    from longkit.eval.tasks.base import TaskContext, get_task
    from longkit.runtime.generate import greedy_generate

    task = get_task(task_name)
    built = task.build(TaskContext(lm.tokenizer, seed=0), length, depth, sample)
    ids = list(built.prompt.input_ids)
    answer = built.answers[0]
    positions = answer_positions(lm.tokenizer, ids, answer)
    with longkit.apply(lm.model, memory="infllm") as applied:
        cfg = applied.spec.memory
        cache = applied.new_cache()
        t0 = time.perf_counter()
        gen = greedy_generate(lm.model, ids, built.max_new_tokens, cache, {lm.tokenizer.eos_token_id},
                              prefill_chunk=cfg.exec_chunk, last_token_alone=True)
        seconds = time.perf_counter() - t0
        blocks = needle_blocks(positions, len(ids), cfg.n_init, cfg.n_local, cfg.block_size)
        # The answer's first token: the forward of the last prompt token, after ceil((L - 1) / chunk) chunk forwards
        # (one execution chunk each, one selection per layer each).
        step = math.ceil((len(ids) - 1) / cfg.exec_chunk)
        all_layers = any_layers = 0
        states = cache.states()
        for state in states:
            chosen = set(state.selections[step][0].tolist())
            hit = [b in chosen for b in blocks or []]
            all_layers += bool(hit) and all(hit)
            any_layers += any(hit)
    prediction = lm.tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return {
        "task": task_name, "length": len(ids), "depth": depth, "sample": sample, "answer": answer,
        "answer_tokens": positions, "needle_blocks": blocks, "n_blocks": states[0].n_blocks(),
        "layers": len(states), "layers_all_needle_blocks": None if blocks is None else all_layers,
        "layers_any_needle_block": None if blocks is None else any_layers,
        "score": task.score(prediction, built.answers), "prediction": prediction, "seconds": round(seconds, 1),
    }


def render(rows: list[dict], meta: dict) -> str:
    out = [
        "# InfLLM: does the memory hand the model its needle? (SmolLM2-135M, reference defaults)", "",
        f"`{meta['command']}`", "",
        f"{meta['versions']}; CPU capability {meta['cpu']}, {meta['threads']} threads. Same prompts as the memory grid "
        "(seed 0). For the answer's first token (the last prompt token's own forward): the memory blocks holding the "
        "answer's tokens, and in how many layers InfLLM's top-k selection loaded all of them (any of them); "
        "'local' = the answer is in the local window, no retrieval needed.", "",
        "| task | length | depth | sample | answer tokens | needle blocks (of all) | layers with all | with any "
        "| score | answer | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["length"], r["depth"], r["sample"])):
        local = r["needle_blocks"] is None
        pos = r["answer_tokens"]
        out.append(
            f"| {r['task']} | {r['length']} | {r['depth']} | {r['sample']} | {pos[0] if pos else '-'}-"
            f"{pos[-1] if pos else '-'} | {'local' if local else ', '.join(map(str, r['needle_blocks']))} "
            f"({r['n_blocks']}) | {'-' if local else r['layers_all_needle_blocks']} / {r['layers']} | "
            f"{'-' if local else r['layers_any_needle_block']} | {r['score']:.0f} | "
            f"{json.dumps(r['prediction'].strip()[:40])} | {r['seconds']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,32768", help="comma-separated prompt lengths, 32768 or 32k (> 4096 + 128 to retrieve)")
    ap.add_argument("--tasks", default="passkey,needle", help=f"comma-separated subset of {', '.join(TASKS)}")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated needle depths in [0, 1]")
    ap.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth), >= 1")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, >= 1")
    ap.add_argument("--name", default="infllm_recall")
    args = ap.parse_args(argv)
    from longkit.cli import parse_depths, parse_lengths
    from longkit.errors import EvalError

    try:
        lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    except EvalError as err:
        sys.exit(f"error: {err}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if any(t not in TASKS for t in tasks) or not tasks:
        sys.exit(f"error: --tasks must name {', '.join(TASKS)} (got {args.tasks!r})")
    if any(n < 4096 + 128 + 1 for n in lengths) or any(not 0 <= d <= 1 for d in depths):
        sys.exit("error: --lengths must be > 4224 (InfLLM's n_init + n_local) and --depths in [0, 1]")
    if args.samples < 1 or args.threads < 1:
        sys.exit("error: --samples and --threads must be >= 1")

    import torch
    import transformers

    import longkit

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / f"{args.name}.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    done = {(r["task"], r["length"], r["depth"], r["sample"]) for r in rows}
    lm = longkit.load_model("smollm2-135m", dtype="bfloat16")
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for sample in range(args.samples):
                    if (task, length, depth, sample) in done:
                        continue
                    row = one_sample(lm, task, length, depth, sample)
                    print(json.dumps(row), flush=True)
                    with jsonl.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    rows.append(row)
    meta = {
        "command": "python benchmarks/memory/infllm_recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "cpu": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
    }
    (RESULTS / f"{args.name}.md").write_text(render(rows, meta))
    print(f"wrote {jsonl} and {RESULTS / f'{args.name}.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
