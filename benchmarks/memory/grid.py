"""The memory room's benchmark grid (issue #22): bounded memory, retrieval and compression against long context on
SmolLM2-135M (trained window 8K) at 16K, 32K, 64K and 128K tokens, on the same prompts, with their cost.

    python benchmarks/memory/grid.py eval --buckets 16k,32k,64k,128k [--only infllm,rag_bm25,...] [--tasks depth,ruler]
    python benchmarks/memory/grid.py eval ... --dry-run   # the commands, nothing run or written
    python benchmarks/memory/grid.py render               # table.md + results.json from the committed records

Every step is one ``longkit eval`` (seed 0, so every method sees the same prompts) into its own run directory
``results/grid/<method>-<bucket>-<tasks>/``: an interrupted or partial grid still gives whole lengths of whole
methods, and rerunning the same command resumes each directory where it stopped (finished ones return at once).
Tasks: ``depth`` = passkey and needle at depths 0.1/0.5/0.9, 3 samples per (length, depth), at every bucket;
``ruler`` = RULER's niah_single_2 and niah_multikey_1, 5 samples per length, at 16K and 32K only.

Methods (rows; ``longkit methods --kind memory|kv|rope`` for their parameters):

- ``infllm``: InfLLM with the reference defaults (block 128, n_init 128, n_local 4096, topk 16, repr_topk 4, exec
  chunk 512), prefilled in chunks of 512 tokens (its execution chunk), so activations too are bounded.
- ``rag_bm25`` / ``rag_dense``: retrieval (chunks of 256 tokens, top 4, 1024-token budget) by BM25 (bm25s) or by
  all-MiniLM-L6-v2 embeddings; the model reads about 1.1K tokens whatever the length.
- ``self_route``: BM25 retrieval first; when the model answers "unanswerable" it is asked again with the whole
  context under the long-context comparison below (NTK), which is the long path Self-Route falls back to.
- ``lingua4`` / ``lingua8``: LongLLMLingua at 4x and 8x compression, SmolLM2-135M as the compressor. Where the
  compressed context reaches the trained window (length / ratio >= 8K: 4x from 32K, 8x from 64K), the answering
  model also gets the NTK rule below for that compressed length (x4), since it would otherwise read past its window.
- ``pcw``: parallel context windows (as many windows of up to the trained length as the context needs).
- ``ntk``: the long-context comparison, the best training-free RoPE scaling on this model: NTK x4 (passkey 100 at
  16K in benchmarks/rope/results/smollm2-135m/table.md and benchmarks/train/results/extend_32k/table.md, where
  Self-Extend, an attention remap, had a higher 16K mean). The factor covers the length: max(4, length / 8K),
  so x4 at 16K and 32K, x8 at 64K, x16 at 128K. One full-attention prefill.
- ``snapkv``: SnapKV keeping ``n_init + n_local + topk * block_size`` = 6272 tokens, InfLLM's working set, with
  the prompt prefilled in chunks of 512 tokens (the cache compressed after every chunk, so it never holds more than
  6272 + 512 tokens), on top of the same NTK factor (SnapKV keeps tokens at their positions, up to the length).
- ``self_extend``: Self-Extend, the other long-context comparison (an attention remap, no RoPE change): window
  2048 and group 5 as in benchmarks/train/extend_32k.py, where (8192 - 2048) x 5 + 2048 = 32K covers 16K and 32K;
  beyond, the smallest group that covers the length, (8192 - 2048) x G + 2048 >= length: G = 11 at 64K and 21 at
  128K. One full-attention prefill (blockwise, neighbour and grouped parts).

Skips: a (method, bucket) the CPU cannot afford is skipped with its reason written to the run directory
(``skipped.json``) and shown in the table; ``--force`` runs it anyway. Skipped by default: ``ntk`` at 128K (a
full-attention prefill at 128K: about 20 min per sample here, 18 samples ~ 6 h), ``self_extend`` at 128K (the
same full-attention cost, 1.0-1.3x NTK's prefill at 16K and 32K in train/results/extend_32k) and ``self_route`` at
128K (its fall-back is the NTK path).

Table (``render``, from the records only): one table per length, rows = methods, columns = the score of each task
(% correct), their mean, median seconds per sample (prefill + decode + retrieval or compression), peak memory (the
largest of the runner's ``peak_mem_bytes``, resident set above the sample's start on CPU, and the compressor's
``memory_peak_mem_bytes``), KV bytes after the prefill (all of InfLLM's blocks included; on a CPU its offloaded
blocks live in the same RAM) and tokens the answering model processed; then the effective length by RULER's rule
(the longest length whose mean is above 85.6) on the tasks run at each length. The renderer refuses records that do
not agree on the prompts (each (task, length, depth, sample) must have one answer and needle position) or on the
model and seed of their run.json.

Cost on this machine (2 cores shared with other jobs, 23 GiB RAM; the model runs in bfloat16 here, dtype auto).
Measured: one 16K passkey sample of ``rag_bm25`` end to end through ``longkit eval`` (run under nice 19, whose
CPU-capped group gave it a fraction of a core beside another eval): 2 min 4 s wall, 23 s of CPU for the whole command
(imports and model load included); BM25 over the 16K context 0.08 s; the model read 1,073 tokens (prefill 39.9 s and
8-token decode 55.9 s wall under that cap, where an uncapped 2K prefill takes 0.9 s); peak 50 MiB above the start,
KV 23 MiB; correct. The rest is estimated from committed records: full prefill 23 s at 16K and 77 s at 32K
(train/results/extend_32k), about x4 per doubling beyond; 8K windows 7 s each; chunked prefill against a bounded
cache grows linearly (kvcache/results/chunked_prefill_memory.md). Minutes per bucket per method with the CPU to
itself, all tasks of the bucket (16K and 32K: 28 samples; 64K and 128K: 18), about 30 s of start-up per step
included; under the nice-19 cap multiply by about 5:

    method      16K    32K    64K    128K   basis (per sample)
    rag_bm25      1      1      1      1    ~1 s: a 1.1K-token prompt, BM25 under 1 s
    rag_dense     5     10     12     24    + MiniLM embeddings of every 256-token chunk (~0.15 s each)
    self_route    2+     2+     2+  skip    as rag_bm25, + one NTK answer per refusal (25 s, 80 s, 5 min)
    pcw           8     14     18     36    one 8K window prefill (~7 s) per 8K of context
    lingua8       7     14     19     40    the compressor reads ~1.3x the context, scores the kept 1/8 twice
    lingua4      10     21     30     70    as lingua8, 1/4 kept; answers of 8K-32K under NTK x4 from 32K
    infllm       14     28     36     72    ~1.3x a 16K full prefill per 16K (6.9K keys per query; untested here)
    snapkv       12     23     30     60    ~25 s per 16K (a 6.8K-token cache, chunks of 512)
    ntk          12     37     90   skip    full attention: 25 s, 80 s, ~5 min per sample
    self_extend  14     43    105   skip    as ntk x 1.15 (its measured prefill: 28 s at 16K, 116 s at 32K)
    total       ~85   ~195   ~345   ~300    minutes; ~15 h for the whole grid

Measured at 16K (18 depth samples per row, the CPU mostly to itself, median s per sample; a few samples ran 4-10x
slower while another job had the CPU): rag_bm25 1.0, rag_dense 3.7, self_route 1.1, pcw 19, lingua8 71 (its float32
compressor: ~5x the estimate), infllm 53 (after its fused chunk attention; 98 at 32K: linear in the length), snapkv
39, ntk 20, self_extend 26; at 32K rag_bm25 0.7, rag_dense 7.8, self_route 1.1. So lingua4 / lingua8 are the costly
rows (about 25-40 min per bucket at 16K, growing with the length) and infllm ~55 min at 64K, ~2 h at 128K.

Peak memory to expect: a full cache is 23 KiB per token in bfloat16 (1.4 GiB at 64K, 2.8 GiB at 128K): ntk holds it
plus attention working memory, self_extend the same cache (its blockwise attention never forms the T x S
matrix), pcw holds every window's cache, infllm's offloaded blocks hold the same amount in RAM
on a CPU (its compute working set stays bounded); rag, lingua and snapkv stay near the model's own footprint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import evalgrid  # noqa: E402  (benchmarks/evalgrid.py, on the path above)
from evalgrid import Tasks, fmt, mib  # noqa: E402

RESULTS = HERE / "results" / "grid"
#: The accuracy-vs-cost figure render writes beside table.md (linked from it once a length has a mean).
PLOT = "accuracy_vs_cost.png"
LONGKIT = evalgrid.LONGKIT

MODEL = "smollm2-135m"
#: SmolLM2-135M's trained window: the unit of the NTK factor rule.
TRAINED = 8192
BUCKETS = {"16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
DEPTHS = "0.1,0.5,0.9"
THRESHOLD = evalgrid.RULER_THRESHOLD
SKIPPED_FILE = evalgrid.SKIPPED_FILE

TASK_GROUPS = {
    "depth": Tasks(("passkey", "needle"), 3, DEPTHS, tuple(BUCKETS)),
    "ruler": Tasks(("niah_single_2", "niah_multikey_1"), 5, None, ("16k", "32k")),
}
TASKS = tuple(t for g in TASK_GROUPS.values() for t in g.tasks)


def ntk_factor(length: int) -> int:
    """The NTK factor at a context length: x4 (the best measured at 16K) or enough to cover the length."""
    return max(4, -(-length // TRAINED))


def ntk(length: int) -> str:
    return f"rope=ntk:factor={ntk_factor(length)}"


def infllm_budget() -> int:
    """InfLLM's working set with its defaults: initial tokens + local window + top-k blocks (SnapKV's budget)."""
    from longkit.memory.infllm import InfLLM

    m = InfLLM()
    return m.n_init + m.n_local + m.topk * m.block_size


#: Self-Extend's neighbour window and its group size up to 32K (benchmarks/train/extend_32k.py's comparison row).
SELF_EXTEND_WINDOW, SELF_EXTEND_GROUP = 2048, 5


def self_extend_group(length: int) -> int:
    """The group size at a context length: 5, or the smallest G with (8K - W) * G + W >= length (the grouped
    positions then stay inside the trained window)."""
    W = SELF_EXTEND_WINDOW
    return max(SELF_EXTEND_GROUP, -(-(length - W) // (TRAINED - W)))


def self_extend(length: int) -> str:
    return f"attention=self_extend:group_size={self_extend_group(length)},window={SELF_EXTEND_WINDOW}"


def lingua(ratio: int) -> Callable[[int], str]:
    def spec(length: int) -> str:
        method = f"memory=longllmlingua:ratio={ratio}"
        # The compressed context reaches the trained window: the answering model needs the NTK rule for it.
        return f"{ntk(length // ratio)}+{method}" if length // ratio >= TRAINED else method

    return spec


Method = evalgrid.Method


NTK_128K = ("full-attention prefill at 128K: about 20 min per sample on 2 CPU cores (16K: 23 s, 32K: 77 s, about "
            "x4 per doubling), 18 samples ~ 6 h")
SELF_EXTEND_128K = ("full-attention prefill at 128K, as NTK's (Self-Extend's prefill took 1.0-1.3x NTK's at 16K and "
                    "32K in train/results/extend_32k): about 20 min or more per sample, 18 samples ~ 6 h")
#: Cheap rows first, so a partial grid has the most rows.
METHODS = {
    "rag_bm25": Method("RAG (BM25)", lambda n: "memory=rag:retriever=bm25"),
    "rag_dense": Method("RAG (dense, MiniLM)", lambda n: "memory=rag:retriever=dense"),
    "self_route": Method("Self-Route (BM25, NTK fall-back)", lambda n: f"{ntk(n)}+memory=self_route",
                         skip={"128k": "its fall-back is the NTK full-attention path, skipped at 128K"}),
    "pcw": Method("PCW", lambda n: "memory=pcw"),
    "lingua8": Method("LongLLMLingua 8x", lingua(8)),
    "lingua4": Method("LongLLMLingua 4x", lingua(4)),
    "infllm": Method("InfLLM", lambda n: "memory=infllm", prefill_chunk=512),
    "snapkv": Method("SnapKV, chunked prefill (InfLLM's budget)",
                     lambda n: f"{ntk(n)}+kv=snapkv:tokens={infllm_budget()}", prefill_chunk=512),
    "ntk": Method("NTK (long context)", ntk, skip={"128k": NTK_128K}),
    "self_extend": Method("Self-Extend (long context)", self_extend, skip={"128k": SELF_EXTEND_128K}),
}


def commands(args: argparse.Namespace) -> list[evalgrid.Step]:
    """Every step of the grid: its run directory and ``longkit eval`` command, or the record of its skip."""
    return evalgrid.grid_steps(args, BUCKETS, TASK_GROUPS, METHODS)


def evaluate(args: argparse.Namespace) -> None:
    evalgrid.run_steps(commands(args), args.dry_run)


# ----------------------------------------------------------------------------------------------------- render


def load(results: Path = RESULTS) -> tuple[list[dict], list[dict], list[dict]]:
    """(sample records, skip records, run.json configs) of every run directory, each record tagged with its
    method (``row``) and bucket."""
    return evalgrid.load(results, evalgrid.grid_tagger(results, METHODS, BUCKETS, TASK_GROUPS))


def check_same_prompts(rows: list[dict], configs: list[dict]) -> int:
    """Every run used the same model and seed, and every (task, length, depth, sample) was asked with the same
    answer and needle position in every run: the same prompts. Returns the number of prompts."""
    return evalgrid.check_same_prompts(rows, configs, ("model", *evalgrid.PROMPT_SETTINGS))


def _planned(bucket: str) -> list[str]:
    return evalgrid.planned(TASK_GROUPS, bucket)


FIELDS = ("scores", "n", "seconds", "peak", "kv", "working", "tokens", "mean", "measured_mean", "effective")


def working(r: dict) -> int | None:
    """KV bytes on the compute device after the prefill: what a cache records (InfLLM: initial and recent tokens,
    its offloaded blocks excluded), else all of its KV."""
    value = r.get("working_set_bytes", r.get("kv_bytes"))
    return None if value is None else int(value)


def summarize(rows: list[dict], skips: list[dict]) -> dict:
    # RULER's rule on the mean of the tasks run at each length, where all of them were measured.
    bucket_of = {int(r["length"]): r["bucket"] for r in rows}
    full = evalgrid.summarize(rows, lambda n: _planned(bucket_of[n]), THRESHOLD)
    for name, m in full.items():
        # The plot's y: the mean over the tasks measured at a length (all planned ones or not), so a partial grid
        # is drawn; the table's mean and effective length keep RULER's rule over every planned task.
        lengths = {n for by in m["scores"].values() for n in by}
        m["measured_mean"] = {n: statistics.mean(by[n] for by in m["scores"].values() if n in by) for n in lengths}
        m["working"] = {}
        for r in rows:
            if r["row"] == name and r.get("score") is not None and working(r) is not None:
                n = int(r["length"])
                m["working"][n] = max(m["working"].get(n, 0), working(r))
    out: dict = {}
    for name, m in full.items():
        scored = [r for r in rows if r["row"] == name and r.get("score") is not None]
        out[name] = {"label": METHODS[name].label, **{f: m[f] for f in FIELDS}, "skipped": {},
                     "buckets": {int(r["length"]): r["bucket"] for r in scored},
                     "specs": {n: sorted({r["method"] for r in scored if int(r["length"]) == n})
                               for n in {int(r["length"]) for r in scored}}}
    for s in skips:
        empty = {**evalgrid.empty_summary(), "working": {}, "measured_mean": {}}
        m = out.setdefault(s["method"], {"label": METHODS[s["method"]].label, "specs": {}, "buckets": {},
                                         "skipped": {}, **{f: empty[f] for f in FIELDS}})
        m["skipped"][s["bucket"]] = s["reason"]
    return out


def table(results: Path = RESULTS) -> tuple[str, dict]:
    """The markdown table and the per-method summary, from the records only (nothing measured, nothing written)."""
    rows, skips, configs = load(results)
    if not rows and not skips:
        raise SystemExit(f"no records under {results}: run `grid.py eval` first")
    prompts = check_same_prompts(rows, configs)
    summary = summarize(rows, skips)
    keys = [k for k in METHODS if k in summary]
    lengths = sorted({int(r["length"]) for r in rows})
    bucket_of = evalgrid.buckets_of(rows)
    model = configs[0]["model"] if configs else MODEL
    lines = [f"# The memory room on {model}: bounded memory, retrieval and compression vs long context", "",
             *evalgrid.records_header(Path(__file__).resolve(), results, prompts, summary, keys, lengths)]
    for n in lengths:
        tasks = _planned(bucket_of[n])
        lines += [f"**{evalgrid.k(n)} tokens**", "",
                  "| method | " + " | ".join(tasks) + " | mean | s / sample | peak MiB | KV MiB | working set MiB | "
                  "tokens processed |", "|---|" + "---|" * (len(tasks) + 6)]
        for k in keys:
            m = summary[k]
            if n not in m["seconds"]:
                continue
            cells = [m["label"], *[fmt(m["scores"].get(t, {}).get(n), ".0f") for t in tasks],
                     fmt(m["mean"].get(n), ".0f"), fmt(m["seconds"][n], ".1f"), mib(m["peak"].get(n)),
                     mib(m["kv"].get(n)), mib(m["working"].get(n)), fmt(m["tokens"][n], ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [f"{summary[k]['label']} ({summary[k]['skipped'][bucket_of[n]]})" for k in keys
                   if bucket_of[n] in summary[k]["skipped"]]
        lines += ["", f"Skipped at {evalgrid.k(n)}: {'; '.join(skipped)}.", ""] if skipped else [""]
    lines += ["**Effective length** (RULER's rule: the longest length whose mean is above 85.6, on the tasks run at "
              "each length)", "", "| method | lengths measured | skipped | effective length |", "|---|---|---|---|"]
    for k in keys:
        m = summary[k]
        skipped = ", ".join(b for b in BUCKETS if b in m["skipped"]) or "-"
        # Known only once every measured length has all its planned tasks: a length still missing one could be the
        # longest above the threshold.
        known = bool(m["mean"]) and set(m["seconds"]) <= set(m["mean"])
        effective = (evalgrid.k(m["effective"]) if m["effective"] else "none") if known else "-"
        lines.append(f"| {m['label']} | {', '.join(evalgrid.k(n) for n in sorted(m['seconds'])) or '-'} | {skipped} | "
                     f"{effective} |")
    unskipped = sorted({b for m in summary.values() for b in m["skipped"]} - {bucket_of[n] for n in lengths},
                       key=list(BUCKETS).index)
    for b in unskipped:
        lines += ["", f"Skipped at {b}: " + "; ".join(f"{summary[k]['label']} ({summary[k]['skipped'][b]})"
                                                       for k in keys if b in summary[k]["skipped"]) + "."]
    counts = sorted({c for k in keys for by in summary[k]["n"].values() for c in by.values()})
    lines += ["", f"Scores: % correct; samples per cell: {', '.join(map(str, counts)) or '-'} (passkey, needle: 3 "
              "depths x 3 samples; RULER tasks: 5 samples). `-` = not measured (yet). s / sample: prefill + decode "
              "(+ retrieval or compression), median. Peak MiB: the largest peak above the sample's start (resident set "
              "on a CPU; the compressor's included). KV MiB: the largest cache after the prefill (InfLLM: every "
              "block, offloaded ones included). Working set MiB: the KV kept on the compute device after the prefill (InfLLM: "
              "initial and recent tokens, its offloaded blocks excluded; other methods: all of their KV). Tokens processed: by the answering model, mean per sample "
              "(LongLLMLingua's compressor not included)."]
    if any(summary[k]["measured_mean"] for k in keys):
        lines += ["", f"![accuracy vs cost per length: seconds per sample and peak memory]({PLOT})"]
    return "\n".join(lines) + "\n", {k: evalgrid.jsonable(summary[k]) for k in keys}


def plot(summary: dict, path: Path) -> bool:
    """Accuracy against cost, one column per length: the mean score of the tasks measured at that length against
    seconds per sample (top) and peak memory (bottom), one marker per method. False (nothing written) without a
    scored length."""
    # results.json's summary: length keys are strings.
    lengths = sorted({int(n) for m in summary.values() for n in m["measured_mean"]})
    if not lengths:
        return False
    # matplotlib's Figure without pyplot: render() runs inside the test process, which must not import pyplot
    # (tests/benchmarks/test_prefill_benchmark.py checks it stays out).
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(lengths) + 2.4, 6.4))
    axes = fig.subplots(2, len(lengths), squeeze=False, sharey=True)
    cmap, markers = matplotlib.colormaps["tab10"], "os^Dv<>PX*"
    for col, n in enumerate(lengths):
        for row_, (field, label, scale) in enumerate((("seconds", "s / sample (log)", 1.0),
                                                      ("peak", "peak MiB (log)", 2.0**-20))):
            ax = axes[row_][col]
            for i, m in enumerate(summary.values()):
                x = m[field].get(str(n))
                if str(n) in m["measured_mean"] and x:
                    ax.plot([x * scale], [m["measured_mean"][str(n)]], marker=markers[i % len(markers)], color=cmap(i % 10),
                            ls="none", ms=7, label=m["label"])
            ax.set_xscale("log")
            ax.set_ylim(-5, 105)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            if row_ == 0:
                ax.set_title(f"{evalgrid.k(n)} tokens")
            if col == 0:
                ax.set_ylabel("mean accuracy, tasks measured (%)")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return True


def render(args: argparse.Namespace | None = None) -> None:
    results = Path(args.results) if args is not None else RESULTS
    text, summary = table(results)
    plot(summary, results / PLOT)
    evalgrid.write(results, text, summary)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    evalgrid.add_eval_arguments(e, BUCKETS, METHODS, TASK_GROUPS, MODEL, RESULTS)
    r = sub.add_parser("render")
    r.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    {"eval": evaluate, "render": render}[args.cmd](args)


if __name__ == "__main__":
    main()
