"""Prefill benchmark of the attention room: dense sdpa, eager, blockwise and the sparse methods versus context.

Kernel level, on real activations: SmolLM2-135M's q, k, v of one layer (``--layer``, default 1) are captured at
each context length (the forward stops right after that layer's projections, so only the layers before it run,
densely). Each attention then runs on exactly those tensors in a fresh subprocess, so its peak resident memory
is its own: prefill time (median of repeats), peak RSS increase, and the relative error of the output against
dense sdpa on the same inputs. Ratios are against dense sdpa measured in the same run. Quest is a decoding
method: it is timed for one decoding step over the whole context against dense sdpa decoding.

Model level: a wide 2-layer tiny Llama (SmolLM2's head geometry, random weights, attention-dominated) prefilled
through ``longkit.apply`` with each method.

Passkey accuracy comes from a ``longkit eval`` run directory (``--passkey-run``), e.g.::

    longkit eval --model smollm2-135m --task passkey --lengths 2k,4k --samples 3 \\
        --attention "vertical_slash:vertical_size=300,slash_size=500" --out /tmp/sparse_passkey --no-report

Writes ``results/prefill.json``, ``results/prefill.md`` and ``results/prefill.png`` (``--name`` changes the stem;
``--render`` redraws the table and figure from a saved JSON); ``results/NAME.notes.md``, when present, is
appended to the table. Run::

    nice -n 10 .venv/bin/python benchmarks/attention/prefill.py --lengths 4096,8192,16384,32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Sparse settings of the run: about 1-3K keys per query at long context.
SPARSE = {
    "a_shape": {"sinks": 128, "window": 1024},
    "vertical_slash": {"vertical_size": 1000, "slash_size": 2000},
    "block_sparse": {"block_size": 64, "top_k": 32},
    "moba": {"block_size": 512, "top_k": 3},
}


class _Captured(Exception):
    pass


def capture_qkv(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Run ``model`` densely until ``layer``'s attention and return its q (B, H, T, D), k, v and scale."""
    from longkit.attention.base import AttentionMethod

    store = {}

    class Capture(AttentionMethod):
        def attention(self, module, query, key, value, attention_mask, scaling, kwargs):
            if module.layer_idx == layer:
                store["qkv"] = (query, key, value, scaling)
                raise _Captured
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)

    Capture.name = "prefill_capture"
    undo = Capture().apply(model)
    try:
        with torch.inference_mode():
            model(ids)
    except _Captured:
        pass
    finally:
        undo()
    return store["qkv"]


def run_method(name: str, q, k, v, scale):
    """One prefill attention (B, H, T, D_v) of method ``name`` on q, k, v."""
    from longkit.attention import blockwise_attention, reference_attention
    from longkit.attention.a_shape import a_shape_attention
    from longkit.attention.block_sparse import block_sparse_attention, block_sparse_select
    from longkit.attention.masks import MaskSpec
    from longkit.attention.moba import moba_attention, moba_select
    from longkit.attention.vertical_slash import vertical_slash_attention, vertical_slash_select

    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if name == "eager":
        return reference_attention(q, k, v, MaskSpec(causal=True), scale)[0]
    if name == "blockwise":
        return blockwise_attention(q, k, v, MaskSpec(causal=True), scale)[0]
    a = SPARSE.get(name, {})
    if name == "a_shape":
        return a_shape_attention(q, k, v, a["sinks"], a["window"], scale=scale, need_lse=False)[0]
    if name == "vertical_slash":
        sel = vertical_slash_select(q, k, a["vertical_size"], a["slash_size"], scale=scale)
        return vertical_slash_attention(q, k, v, sel, scale=scale, need_lse=False)[0]
    if name == "block_sparse":
        sel = block_sparse_select(q, k, a["top_k"], a["block_size"])
        return block_sparse_attention(q, k, v, sel, a["block_size"], scale=scale, need_lse=False)[0]
    if name == "moba":
        sel = moba_select(q, k, a["top_k"], a["block_size"])
        return moba_attention(q, k, v, sel, a["block_size"], scale=scale, need_lse=False)[0]
    if name in ("sdpa_decode", "quest_decode"):
        q1 = q[:, :, -1:]
        if name == "sdpa_decode":
            return F.scaled_dot_product_attention(q1, k, v, scale=scale, enable_gqa=True)
        from longkit.attention.quest import quest_attention, quest_select

        pages = quest_select(q1, k, 64, 16)
        return quest_attention(q1, k, v, pages, 16, scale=scale, need_lse=False)[0]
    raise SystemExit(f"unknown method {name}")


def worker(args) -> None:
    """Subprocess: time one method on saved q, k, v; print times and peak RSS increase; save the output."""
    torch.set_num_threads(args.threads)
    q, k, v, scale = torch.load(args.qkv)
    base = _reset_peak_rss()
    times = []
    with torch.inference_mode():
        # Warm-up on a short prefix: thread pools and first-call initialisation are not part of the timing.
        n = min(512, k.shape[2])
        run_method(args.worker, q[:, :, -n:], k[:, :, :n], v[:, :, :n], scale)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run_method(args.worker, q, k, v, scale)
            times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM") - base if base is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out, args.save)
    print(json.dumps({"times": times, "peak_rss_mb": peak / 1024}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset the process's peak resident set (Linux clear_refs 5) and return the current RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except (OSError, KeyError):
        return None


def spawn(method: str, qkv: Path, repeats: int, threads: int, save: Path, timeout: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--qkv",
        str(qkv),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--save",
        str(save),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def kernel_sweep(args) -> list[dict]:
    import longkit

    lm = longkit.load_model("smollm2-135m", dtype="float32")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="prefill_bench_"))
    for T in args.lengths:
        # Natural text (the eval haystack: Python's pydoc, or --text), repeated to the length: real attention
        # patterns, which the dynamic sparse methods depend on.
        from longkit.eval.haystack import haystack_text

        text = Path(args.text).read_text() if args.text else haystack_text()
        text_ids = torch.tensor([lm.tokenizer(text[:400_000])["input_ids"]])
        ids = text_ids.repeat(1, -(-T // text_ids.shape[1]))[:, :T]
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        q, k, v, scale = capture_qkv(lm.model, ids, args.layer)
        capture_s = time.perf_counter() - t0
        qkv = tmp / f"qkv_{T}.pt"
        torch.save((q.contiguous(), k.contiguous(), v.contiguous(), scale), qkv)
        repeats = max(1, args.repeats * 8192 // T) if T > 8192 else args.repeats
        methods = (
            ["sdpa"]
            + (["eager"] if T <= args.eager_max else [])
            + (["blockwise"] if T <= args.blockwise_max else [])
            + list(SPARSE)
            + ["sdpa_decode", "quest_decode"]
        )
        res = {}
        for m in methods:
            r = spawn(m, qkv, repeats if "decode" not in m else 5, args.threads, tmp / f"out_{m}_{T}.pt", args.timeout)
            res[m] = r
            print(
                T,
                m,
                {key: val for key, val in r.items() if key != "times"},
                f"median {statistics.median(r['times']):.3f} s" if "times" in r else "",
                flush=True,
            )
        ref = torch.load(tmp / f"out_sdpa_{T}.pt")
        ref_dec = torch.load(tmp / f"out_sdpa_decode_{T}.pt")
        base = statistics.median(res["sdpa"]["times"])
        base_dec = statistics.median(res["sdpa_decode"]["times"])
        for m, r in res.items():
            row = {
                "length": T,
                "method": m,
                "layer": args.layer,
                "repeats": len(r.get("times", [])),
                "capture_s": round(capture_s, 2),
                "params": SPARSE.get(m, {"page_size": 16, "top_k": 64} if m == "quest_decode" else {}),
            }
            if "times" in r:
                med = statistics.median(r["times"])
                out = torch.load(tmp / f"out_{m}_{T}.pt")
                row.update(
                    median_s=round(med, 4),
                    times_s=[round(t, 4) for t in r["times"]],
                    speedup_vs_sdpa=round((base_dec if "decode" in m else base) / med, 3),
                    peak_rss_mb=round(r["peak_rss_mb"], 1),
                    rel_error_vs_sdpa=round(rel_error(out, ref_dec if "decode" in m else ref), 5),
                )
            else:
                row["error"] = r["error"]
            rows.append(row)
        for f in tmp.glob(f"*_{T}.pt"):
            f.unlink()
    return rows


def model_sweep(args) -> list[dict]:
    """Full prefill of a wide 2-layer tiny Llama (SmolLM2 head geometry) through longkit.apply."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longkit

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    rows = []
    for T in args.model_lengths:
        ids = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(0))
        times = {}
        for m in ["sdpa", "blockwise"] + list(SPARSE):
            if m == "blockwise" and T > args.blockwise_max:
                continue
            with torch.inference_mode(), longkit.apply(model, attention=m, attention_args=SPARSE.get(m, {})):
                ts = []
                for _ in range(args.model_repeats):
                    t0 = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    ts.append(time.perf_counter() - t0)
            times[m] = statistics.median(ts)
            print("model", T, m, f"{times[m]:.3f} s", flush=True)
        for m, t in times.items():
            rows.append(
                {
                    "length": T,
                    "method": m,
                    "median_s": round(t, 4),
                    "repeats": args.model_repeats,
                    "speedup_vs_sdpa": round(times["sdpa"] / t, 3),
                    "params": SPARSE.get(m, {}),
                }
            )
    return rows


def passkey_summary(run: Path) -> list[dict]:
    """Accuracy (mean score, %) and median prefill time per (method, length) from a longkit eval run directory."""
    rows: dict[tuple[str, int], list[dict]] = {}
    path = run / "samples.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec.get("task") == "passkey" and rec.get("score") is not None:
            rows.setdefault((rec["method"], int(rec["length"])), []).append(rec)
    return [
        {
            "method": m,
            "length": n,
            "samples": len(recs),
            "accuracy": round(sum(r["score"] for r in recs) / len(recs), 1),
            "median_prefill_s": round(statistics.median(r.get("prefill_s", 0.0) for r in recs), 2),
        }
        for (m, n), recs in sorted(rows.items())
    ]


def write_outputs(data: dict, name: str = "prefill") -> None:
    """results/NAME.json (the run's records), then the table and figure drawn from them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    # A new run: notes on an earlier run under this name no longer apply.
    render(data, name, notes=False)


def markdown(data: dict, notes: Path | None = None) -> str:
    """The results table of a run's records (``results/NAME.md``), then the ``notes`` file if it exists."""
    lines = [
        "# Attention prefill benchmark",
        "",
        data["note"],
        "",
        "## Kernel (SmolLM2-135M layer activations, B=1, H=9, H_kv=3, D=64, float32)",
        "",
        "| length | method | median s | speedup vs sdpa | peak RSS MB | rel. error vs sdpa |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["kernel"]:
        if "median_s" in r:
            lines.append(
                f"| {r['length']} | {r['method']} | {r['median_s']:.3f} | {r['speedup_vs_sdpa']:.2f}x | "
                f"{r['peak_rss_mb']:.0f} | {r['rel_error_vs_sdpa']:.4f} |"
            )
        else:
            lines.append(f"| {r['length']} | {r['method']} | {r['error']} | | | |")
    if data.get("model"):
        lines += [
            "",
            "## Model prefill (wide 2-layer tiny Llama, random weights)",
            "",
            "| length | method | median s | speedup vs sdpa |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['length']} | {r['method']} | {r['median_s']:.3f} | {r['speedup_vs_sdpa']:.2f}x |"
            for r in data["model"]
        ]
    if data.get("passkey"):
        lines += [
            "",
            "## Passkey accuracy, % (SmolLM2-135M, longkit eval)",
            "",
            "| method | length | samples | accuracy % | median prefill s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['length']} | {r['samples']} | {r['accuracy']:.0f} | {r.get('median_prefill_s', '')} |"
            for r in data["passkey"]
        ]
    table = "\n".join(lines) + "\n"
    return table + "\n" + notes.read_text() if notes is not None and notes.is_file() else table


def render(data: dict, name: str, notes: bool = True) -> None:
    """Write results/NAME.md and results/NAME.png from a run's records; the JSON is left as it is.

    Hand-written notes on a run (measurements made outside this script) live in results/NAME.notes.md and are
    appended to the table, so that redrawing it keeps them.
    """
    (RESULTS / f"{name}.md").write_text(markdown(data, RESULTS / f"{name}.notes.md" if notes else None))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = sorted({r["method"] for r in data["kernel"] if "decode" not in r["method"]})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}

    def series(rows, m, key):
        return [(r["length"], r[key]) for r in rows if r["method"] == m and r.get(key) is not None]

    for m in methods:
        if pts := series(data["kernel"], m, "median_s"):
            ax.plot(*zip(*pts, strict=True), marker="o", color=colors[m], label=m)
            ax2.plot(*zip(*series(data["kernel"], m, "speedup_vs_sdpa"), strict=True), marker="o", color=colors[m])
            ax3.plot(*zip(*series(data["kernel"], m, "peak_rss_mb"), strict=True), marker="o", color=colors[m])
        # The whole (tiny) model's prefill, dashed: attention plus everything around it.
        if pts := series(data.get("model") or [], m, "speedup_vs_sdpa"):
            ax2.plot(*zip(*pts, strict=True), marker="s", ls="--", color=colors[m], alpha=0.7)
    ax2.axhline(2.0, color="grey", ls=":", lw=0.8)
    for a, ylabel, title in (
        (ax, "prefill attention, one layer (s)", "Prefill time (median)"),
        (ax2, "speedup vs dense sdpa", "Speedup vs sdpa (solid: layer, dashed: 2-layer model)"),
        (ax3, "peak RSS increase (MB)", "Peak memory of the attention call"),
    ):
        a.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=ylabel, title=title)
    lengths = sorted({r["length"] for r in data["kernel"]})
    for a in (ax, ax2, ax3):
        a.set_xticks(lengths, [f"{t // 1024}K" for t in lengths])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    lo, hi = ax2.get_ylim()
    ax2.set_yticks([2.0**k for k in range(-6, 7) if lo <= 2.0**k <= hi], minor=False)
    ax2.set_ylim(lo, hi)
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for axis in (ax.yaxis, ax3.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--model-lengths", default="4096,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-repeats", type=int, default=1)
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--eager-max", type=int, default=8192)
    p.add_argument("--blockwise-max", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--text", default=None, help="text file whose tokens (repeated) form the prompt")
    p.add_argument("--passkey-run", default=None)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--worker", default=None)
    p.add_argument("--qkv", default=None)
    p.add_argument("--save", default=None)
    p.add_argument("--name", default="prefill", help="results file stem: results/NAME.{json,md,png}")
    p.add_argument("--render", action="store_true", help="only rewrite results/NAME.{md,png} from NAME.json")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.render:
        saved = RESULTS / f"{args.name}.json"
        if not saved.exists():
            p.error(f"--render: no saved run {saved} (give the --name of an existing results/NAME.json)")
        return render(json.loads(saved.read_text()), args.name)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.model_lengths = [int(x) for x in args.model_lengths.split(",") if x]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kernel = kernel_sweep(args)
    model = [] if args.skip_model else model_sweep(args)
    passkey = passkey_summary(Path(args.passkey_run)) if args.passkey_run else []
    data = {
        "started": started,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "sparse_settings": SPARSE,
        "note": (
            f"CPU timings ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; above the "
            "core count means other jobs shared the CPU); ratios are against dense sdpa measured in the same run."
        ),
        "kernel": kernel,
        "model": model,
        "passkey": passkey,
    }
    write_outputs(data, args.name)


if __name__ == "__main__":
    main()
