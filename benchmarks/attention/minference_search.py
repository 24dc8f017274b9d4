"""MInference's offline pattern search on a real model: one sparse pattern per attention head, saved as a config.

Runs :func:`longkit.tools.minference_search.search_patterns` on a calibration prompt of ``--length`` tokens taken
from the *end* of Python's documentation topics (the perplexity task reads from the start, the passkey task uses
its own filler, so the calibration text is held out from both), optionally under a RoPE method (the q and k the
search sees must be the ones the evaluation will see). Writes the config that the ``minference`` attention method
reads (``attention=minference:config=FILE``) and a summary: which pattern each layer's heads chose and their
output error against dense attention. Run::

    .venv/bin/python benchmarks/attention/minference_search.py --length 16384 --rope ntk:factor=4 \\
        --name minference_smollm2_16k

``--render`` only rewrites ``results/NAME.md`` from the saved ``results/NAME.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def candidate_label(entry: dict) -> str:
    """``vertical_slash:vertical_size=1000,slash_size=3000`` for a candidate entry."""
    args = ",".join(f"{k}={v}" for k, v in entry.items() if k != "pattern")
    return f"{entry['pattern']}:{args}" if args else entry["pattern"]


def summary(found: dict, header: str) -> str:
    """Markdown: the candidates' head counts overall, then per layer the chosen patterns and the errors."""
    layers, errors = found["layers"], found["errors"]
    total = collections.Counter(candidate_label(e) for heads in layers.values() for e in heads)
    all_err = [x for errs in errors.values() for x in errs]
    lines = [header, "", "| candidate | heads chosen |", "|---|---|"]
    lines += [f"| `{label}` | {n} |" for label, n in total.most_common()]
    lines += [
        "",
        f"Output error of the chosen pattern (||o - o_dense|| / ||o_dense|| per head): median "
        f"{statistics.median(all_err):.3f}, max {max(all_err):.3f}.",
        "",
        "| layer | chosen patterns (heads) | median error | max error |",
        "|---|---|---|---|",
    ]
    for layer in sorted(layers, key=int):
        counts = collections.Counter(candidate_label(e) for e in layers[layer])
        chosen = ", ".join(f"`{label}` ({n})" for label, n in counts.most_common())
        errs = errors[layer]
        lines.append(f"| {layer} | {chosen} | {statistics.median(errs):.3f} | {max(errs):.3f} |")
    return "\n".join(lines) + "\n"


def header(meta: dict, name: str) -> str:
    """The summary's title and config line, from the ``meta`` the search stores in its config."""
    return (
        f"# MInference pattern search: {meta['model']}, {meta['length']}-token calibration prompt (end of Python's "
        f"doc topics), rope {meta['rope'] or 'none'}, {meta['dtype']}, {meta['seconds']:.0f} s\n\nConfig: "
        f"`{name}.json` (use `attention=minference:config=benchmarks/attention/results/{name}.json`)."
    )


def render(name: str) -> str:
    """Rewrite results/NAME.md from the saved config results/NAME.json; return the text."""
    config = RESULTS / f"{name}.json"
    if not config.is_file():
        raise SystemExit(f"--render: no saved search {config} (give the --name of an existing results/NAME.json)")
    found = json.loads(config.read_text())
    text = summary(found, header(found["meta"], name))
    (RESULTS / f"{name}.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=16384, help="calibration prompt length in tokens")
    ap.add_argument("--rope", default=None, help="RoPE method spec applied during the search, e.g. ntk:factor=4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--name", default="minference_search")
    ap.add_argument("--render", action="store_true", help="only rewrite results/NAME.md from results/NAME.json")
    args = ap.parse_args()
    if args.render:
        print(render(args.name), end="")
        return

    import longkit
    from longkit.eval.haystack import pydoc_text
    from longkit.eval.prompt import encode
    from longkit.tools.minference_search import DEFAULT_CANDIDATES, search_patterns

    lm = longkit.load_model(args.model, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    ids = encode(tok, pydoc_text())
    if len(ids) < 2 * args.length:
        raise SystemExit(
            f"--length {args.length}: the documentation text has {len(ids)} tokens; the calibration window (its "
            "last --length tokens) would overlap the perplexity windows at the start"
        )
    calib = torch.tensor([ids[-args.length :]])
    start = time.perf_counter()
    with longkit.apply(model, f"rope={args.rope}" if args.rope else None):
        found = search_patterns(model, calib, DEFAULT_CANDIDATES)
    elapsed = time.perf_counter() - start

    RESULTS.mkdir(parents=True, exist_ok=True)
    found["meta"] = {
        "model": args.model,
        "length": args.length,
        "rope": args.rope,
        "dtype": args.dtype,
        "calibration": f"last {args.length} tokens of Python's documentation topics",
        "candidates": [dict(c) for c in DEFAULT_CANDIDATES],
        "seconds": round(elapsed, 1),
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(found, indent=1) + "\n")
    print(render(args.name), end="")


if __name__ == "__main__":
    main()
