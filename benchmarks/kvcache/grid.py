"""KV-cache benchmark grid: every KV method x keep ratio on passkey and needle, side by side with the
full cache (and kvpress, when its runner's output is given), on one model at one or more lengths.

    python benchmarks/kvcache/grid.py --lengths 4096 --depths 0,0.25,0.5,0.75,1 --samples 2     # accuracy
    python benchmarks/kvcache/grid.py --lengths 4096 --speed                                    # prefill/decode
    python benchmarks/kvcache/grid.py --report                                                  # table + plot

Accuracy: each prompt is prefilled ONCE (``longkit.runtime.prefill_capture.capture_prefill``) and every method's compressed
cache is replayed from that prefill (tested equal to a real prefill, cache and tokens, for every registered method
in ``tests/test_kvcache_sweep.py``), then decoded greedily with ``model.generate``. KV bytes are the exact bytes the
cache holds after the prompt (``cache_nbytes``). Records go to ``results/grid/<model>/records.jsonl`` one per line as
they finish; a rerun skips what is done.

Speed (``--speed``): per method (one ratio, default 0.1) a REAL prefill under the applied method, timed, then
``--decode-steps`` decoding steps each timed; medians of ``--repeats`` prompts' runs with the full cache measured in
the same run (ratios against it). Written to ``results/grid/<model>/speed.jsonl``.

Keep ratio: the fraction of the prompt's tokens kept per head (``ratio``); ``duo_attention`` gets the
retrieval-head fraction that keeps the same fraction of tokens overall (streaming heads keep sinks + window);
KIVI cells are 4- and 2-bit quantisation alone and 2-bit on top of SnapKV at each ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import longkit
from longkit.eval.tasks import get_task
from longkit.eval.tasks.base import TaskContext
from longkit.kvcache import cache_nbytes
from longkit.runtime.prefill_capture import capture_prefill

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent
EVICTION = ["snapkv", "pyramidkv", "adakv", "streaming_llm", "tova", "h2o", "scissorhands", "knorm", "random",
            "expected_attention", "cam", "duo_attention"]  # fmt: skip


def duo_retrieval_ratio(keep: float, length: int, sinks: int = 4, window: int = 256) -> float:
    """Retrieval-head fraction r such that r * T + (1 - r) * (sinks + window) = keep * T."""
    stream = min(sinks + window, length) / length
    return round(max(0.0, min(1.0, (keep - stream) / (1.0 - stream))), 4)


def cells(ratios: list[float], length: int, methods: list[str]) -> list[tuple[str, str, float | None]]:
    """(label, kv spec, nominal keep ratio) of every cell; the full cache is label 'full'. A method may carry
    parameters (``snapkv:window=8`` gives cells ``snapkv[window=8]@r``)."""
    out: list[tuple[str, str, float | None]] = [("full", "", 1.0)]
    for entry in methods:
        m, _, extra = entry.partition(":")
        name = f"{m}[{extra}]" if extra else m
        extra = f"{extra}," if extra else ""
        if m == "kivi":
            out += [("kivi:bits=4", "kivi:bits=4", None), ("kivi:bits=2", "kivi:bits=2", None)]
            out += [(f"kivi2+snapkv@{r}", f"kivi:bits=2,evict=snapkv,ratio={r}", r) for r in ratios]
            continue
        for r in ratios:
            if m == "duo_attention":
                out.append((f"{name}@{r}", f"{m}:{extra}retrieval_ratio={duo_retrieval_ratio(r, length)}", r))
            else:
                out.append((f"{name}@{r}", f"{m}:{extra}ratio={r}", r))
    return out


def load_done(path: Path) -> set[str]:
    return {r["id"] for r in _load(path)}


def prompt_grid(args, length: int):
    """(prompt id, task, task name, depth, sample) of every prompt at ``length``, in the order both sides run them."""
    for task_name in args.tasks:
        task = get_task(task_name)
        for depth in args.depths:
            for sample in range(args.samples):
                yield f"{task_name}|{length}|{depth}|{sample}", task, task_name, depth, sample


def append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def accuracy(args, lm, out: Path) -> None:
    model, tok = lm.model, lm.tokenizer
    path = out / "records.jsonl"
    done = load_done(path)
    ctx = TaskContext(tok, seed=0)
    for length in args.lengths:
        grid = cells(args.ratios, length, args.methods)
        for pid, task, task_name, depth, sample in prompt_grid(args, length):
            todo = [c for c in grid if f"{pid}|{c[0]}" not in done]
            if not todo:
                continue
            gs = task.build(ctx, length, depth, sample)
            ids = torch.tensor([gs.prompt.input_ids])
            t0 = time.perf_counter()
            pre = capture_prefill(model, ids)
            capture_s = time.perf_counter() - t0
            for label, spec, keep in todo:
                rec: dict[str, Any] = {"id": f"{pid}|{label}", "task": task_name, "length": length,
                                       "depth": depth, "sample": sample, "cell": label, "spec": spec or "full",
                                       "keep": keep, "n_tokens": ids.shape[1], "capture_s": round(capture_s, 2)}  # fmt: skip
                try:
                    with longkit.apply(model, kv=spec or None) as applied:
                        t1 = time.perf_counter()
                        cache = pre.cache(applied)
                        rec["replay_s"] = round(time.perf_counter() - t1, 3)
                        rec["kv_bytes"] = cache_nbytes(cache)
                        t2 = time.perf_counter()
                        gen = pre.generate(cache, max_new_tokens=gs.max_new_tokens)
                        rec["decode_s"] = round(time.perf_counter() - t2, 3)
                    new = gen[0, ids.shape[1] :].tolist()
                    rec["new_tokens"] = len(new)
                    rec["prediction"] = tok.decode(new, skip_special_tokens=True)
                    rec["answer"] = gs.answers
                    rec["score"] = task.score(rec["prediction"], gs.answers)
                    rec["error"] = None
                except Exception as exc:  # one failing cell is recorded, the grid goes on
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rec["score"] = None
                append(path, rec)
                done.add(rec["id"])
                print(f"{rec['id']}: {rec.get('score')} {rec.get('prediction', rec['error'])!r}", flush=True)
            del pre


def speed(args, lm, out: Path) -> None:
    """Real prefill and per-step decode times per method at one ratio, with the full cache in the same run."""
    model, tok = lm.model, lm.tokenizer
    path = out / "speed.jsonl"
    done = load_done(path)
    ctx = TaskContext(tok, seed=0)
    task = get_task("passkey")
    for length in args.lengths:
        grid = [c for c in cells([args.speed_ratio], length, args.methods) if c[2] in (1.0, args.speed_ratio)]
        grid += [c for c in cells([args.speed_ratio], length, args.methods) if c[0].startswith("kivi:")]
        for rep in range(args.repeats):
            ids = torch.tensor([task.build(ctx, length, 0.5, 100 + rep).prompt.input_ids])
            for label, spec, keep in grid:
                rid = f"{length}|{rep}|{label}"
                if rid in done:
                    continue
                rec: dict[str, Any] = {"id": rid, "length": length, "repeat": rep, "cell": label,
                                       "spec": spec or "full", "keep": keep}  # fmt: skip
                try:
                    with longkit.apply(model, kv=spec or None) as applied, torch.inference_mode():
                        cache = applied.new_cache()
                        t0 = time.perf_counter()
                        o = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                        rec["prefill_s"] = round(time.perf_counter() - t0, 3)
                        rec["kv_bytes"] = cache_nbytes(cache)
                        nxt = o.logits[:, -1:].argmax(-1)
                        steps = []
                        for _ in range(args.decode_steps):
                            t1 = time.perf_counter()
                            o = model(nxt, cache=cache, use_cache=True)
                            steps.append(time.perf_counter() - t1)
                            nxt = o.logits[:, -1:].argmax(-1)
                    rec["decode_step_s"] = round(statistics.median(steps), 4)
                    rec["error"] = None
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                append(path, rec)
                print(f"speed {rid}: {rec.get('prefill_s')} s prefill, {rec.get('decode_step_s')} s/step "
                      f"{rec['error'] or ''}", flush=True)  # fmt: skip


def kvpress(args, lm, out: Path) -> None:
    """kvpress 0.5.5's presses on the same prompts, one prefill per prompt (``kvpress_sweep_runner.py`` in the
    kvpress venv, which replays kvpress's own hooks, checked equal to its real path), scored like ours."""
    import subprocess
    import tempfile

    from kvpress_parity import PAIRS

    python = Path(args.kvpress_venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no kvpress venv at {python.parent.parent}; create it with: bash {HERE / 'kvpress_env.sh'}")
    tok = lm.tokenizer
    ctx = TaskContext(tok, seed=0)
    pairs = [p for p in PAIRS if p["method"] in args.methods and p.get("attn", "sdpa") == "sdpa"]
    runs = [{"id": f"{p['method']}@{r}", "press": p["press"], "keep": r, "kwargs": p["press_kwargs"]}
            for p in pairs for r in args.ratios]  # fmt: skip
    prompts, meta = [], {}
    for length in args.lengths:
        for pid, task, task_name, depth, sample in prompt_grid(args, length):
            gs = task.build(ctx, length, depth, sample)
            prompts.append({"id": pid, "ids": gs.prompt.input_ids, "max_new_tokens": gs.max_new_tokens})
            meta[pid] = (task, gs.answers, length, task_name, depth, sample)
    raw = out / "kvpress_raw.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        lm.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"model_dir": tmp, "dtype": args.dtype, "attn_implementation": "sdpa",
                                   "prompts": prompts, "runs": runs}))  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": str(torch.get_num_threads())}  # fmt: skip
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([str(python), str(HERE / "kvpress_sweep_runner.py"), str(req), str(raw)], env=env)
    scored = []
    for r in _load(raw):
        if r.get("run_id") == "__prefill__" or r.get("prompt_id") not in meta:
            continue
        task, answers, length, task_name, depth, sample = meta[r["prompt_id"]]
        rec = {"id": f"{r['prompt_id']}|{r['run_id']}", "task": task_name, "length": length, "depth": depth,
               "sample": sample, "cell": r["run_id"], "kv_bytes": r.get("effective_bytes", r.get("cache_bytes")), "error": r.get("error")}  # fmt: skip
        if r.get("error") is None:
            rec["prediction"] = tok.decode(r["answer"], skip_special_tokens=True)
            rec["score"] = task.score(rec["prediction"], answers)
        else:
            rec["score"] = None
        scored.append(rec)
    # keep the scored records of other lengths (an earlier invocation's prompts)
    others = [r for r in _load(out / "kvpress.jsonl") if r["length"] not in args.lengths]
    (out / "kvpress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in others + scored))
    print(f"kvpress: {len(scored)} scored records (runner exit {proc.returncode})")


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def family(cell: str) -> str:
    return cell.split("@")[0]


def report(out: Path) -> str:
    """results/grid/<model>/grid.md and pareto_<length>.png from the records (and kvpress.jsonl when present)."""
    text = grid_markdown(out)
    recs = [r for r in _load(out / "records.jsonl") if r.get("error") is None]
    kvp = [r for r in _load(out / "kvpress.jsonl") if r.get("error") is None and r.get("score") is not None]
    for length in sorted({r["length"] for r in recs}):
        at = [r for r in recs if r["length"] == length]
        full_bytes = statistics.mean(r["kv_bytes"] for r in at if r["cell"] == "full")
        _pareto(at, kvp, length, full_bytes, out / f"pareto_{length}.png")
    (out / "grid.md").write_text(text)
    return text


def grid_markdown(out: Path) -> str:
    """The text of grid.md from the records of ``out`` (no figures drawn, nothing written)."""
    recs = [r for r in _load(out / "records.jsonl") if r.get("error") is None]
    errors = [r for r in _load(out / "records.jsonl") if r.get("error") is not None]
    kvp = [r for r in _load(out / "kvpress.jsonl") if r.get("error") is None and r.get("score") is not None]
    speed_recs = [r for r in _load(out / "speed.jsonl") if r.get("error") is None]
    runs = _load(out / "runs.jsonl")
    lines = [f"# KV-cache grid: {runs[0]['model'] if runs else '?'}", ""]
    lines.append("Written by `python benchmarks/kvcache/grid.py --report` from the runs:")
    lines += [f"- `{' '.join(r['argv'])}` ({r['dtype']}, {r['threads']} threads, {r['started']})" for r in runs]
    lines.append("")
    for length in sorted({r["length"] for r in recs}):
        at = [r for r in recs if r["length"] == length]
        prompts = sorted({(r["task"], r["depth"], r["sample"]) for r in at})
        full_bytes = statistics.mean(r["kv_bytes"] for r in at if r["cell"] == "full")
        order = list(dict.fromkeys(r["cell"] for r in at))
        tasks = sorted({r["task"] for r in at})
        depths = sorted({r["depth"] for r in at})
        lines += [f"## {length} tokens", "",
                  f"{len(prompts)} prompts: tasks {', '.join(tasks)} at depths {', '.join(map(str, depths))}, "
                  f"{max(p[2] for p in prompts) + 1} sample(s) each; accuracy in % (mean over prompts), KV bytes "
                  "held after the prompt (mean) and relative to the full cache.", "",
                  "| cell | kept | KV MiB | KV / full | " + " | ".join(tasks) + " | mean | kvpress mean (same score on) | n |",
                  "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]  # fmt: skip
        for cell in order:
            rs = [r for r in at if r["cell"] == cell]
            kb = statistics.mean(r["kv_bytes"] for r in rs)
            per_task = []
            for t in tasks:
                ts = [r["score"] for r in rs if r["task"] == t]
                per_task.append(f"{statistics.mean(ts):.0f}" if ts else "-")
            mean = statistics.mean(r["score"] for r in rs)
            theirs = {
                (r["task"], r["depth"], r["sample"]): r for r in kvp if r["length"] == length and r["cell"] == cell
            }
            kp_s = "-"
            if theirs:
                # the same prompts on both sides: how many got the same score
                same = sum(1 for r in rs if (k := (r["task"], r["depth"], r["sample"])) in theirs
                           and theirs[k]["score"] == r["score"])  # fmt: skip
                kp_s = f"{statistics.mean(t['score'] for t in theirs.values()):.0f} (same {same}/{len(theirs)})"
            keep = rs[0]["keep"]
            lines.append(f"| {cell} | {'-' if keep is None else keep} | {kb / 2**20:.1f} | {kb / full_bytes:.3f} | "
                         + " | ".join(per_task) + f" | {mean:.0f} | {kp_s} | {len(rs)} |")  # fmt: skip
        lines.append("")
        sp = [r for r in speed_recs if r["length"] == length]
        if sp:
            full_pre = statistics.median(r["prefill_s"] for r in sp if r["cell"] == "full")
            full_dec = statistics.median(r["decode_step_s"] for r in sp if r["cell"] == "full")
            lines += [f"Speed at {length} (real prefill with the method applied, then decoding steps; medians over "
                      f"repeats, full cache measured in the same run: prefill {full_pre:.2f} s, "
                      f"decode {1000 * full_dec:.1f} ms/step):", "",
                      "| cell | prefill s | prefill / full | decode ms/step | decode speed-up vs full | n |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for cell in dict.fromkeys(r["cell"] for r in sp):
                rs = [r for r in sp if r["cell"] == cell]
                pre = statistics.median(r["prefill_s"] for r in rs)
                dec = statistics.median(r["decode_step_s"] for r in rs)
                lines.append(f"| {cell} | {pre:.2f} | {pre / full_pre:.2f} | {1000 * dec:.1f} | {full_dec / dec:.2f}x "
                             f"| {len(rs)} |")  # fmt: skip
            lines.append("")
        lines += [f"![accuracy vs KV bytes at {length}](pareto_{length}.png)", ""]
    if errors:
        lines += ["## Errors", ""] + sorted({f"- {r['cell']}: {r['error']}" for r in errors}) + [""]
    return "\n".join(lines)


def _pareto(at: list[dict], kvp: list[dict], length: int, full_bytes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    fams = list(dict.fromkeys(family(r["cell"]) for r in at if r["cell"] != "full"))
    cmap = plt.get_cmap("tab10")
    markers = "os^Dv<>PX*"
    for i, fam in enumerate(fams):
        pts = []
        for cell in dict.fromkeys(r["cell"] for r in at if family(r["cell"]) == fam):
            rs = [r for r in at if r["cell"] == cell]
            pts.append(
                (statistics.mean(r["kv_bytes"] for r in rs) / full_bytes, statistics.mean(r["score"] for r in rs))
            )
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i // 10 % 10], ls="-", color=cmap(i % 10),
                label=fam, ms=5, lw=1)  # fmt: skip
    kfams = list(dict.fromkeys(family(r["cell"]) for r in kvp if r["length"] == length))
    for fam in kfams:
        pts = []
        for cell in dict.fromkeys(r["cell"] for r in kvp if r["length"] == length and family(r["cell"]) == fam):
            rs = [r for r in kvp if r["length"] == length and r["cell"] == cell]
            ours = [r for r in at if r["cell"] == cell]
            x = statistics.mean(r["kv_bytes"] for r in ours) / full_bytes if ours else float(cell.split("@")[1])
            pts.append((x, statistics.mean(r["score"] for r in rs)))
        pts.sort()
        color = cmap(fams.index(fam) % 10) if fam in fams else "k"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", color=color, ms=8, lw=0.8)
    full = statistics.mean(r["score"] for r in at if r["cell"] == "full")
    ax.axhline(full, color="k", lw=1, ls=":")
    ax.plot([1.0], [full], "k*", ms=10, label="full cache")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes held / full cache (log)")
    ax.set_ylabel("accuracy, passkey + needle (%)")
    ax.set_title(f"KV methods at {length} tokens (o longkit, x-- kvpress)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--tasks", default="passkey,needle")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--methods", default=",".join(EVICTION + ["kivi"]))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--speed", action="store_true", help="time real prefills and decode steps instead")
    ap.add_argument("--speed-ratio", type=float, default=0.1)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kvpress", action="store_true", help="run kvpress's presses on the same prompts instead")
    ap.add_argument("--kvpress-venv", default=str(HERE / ".venv-kvpress"))
    ap.add_argument("--report", action="store_true", help="write grid.md and the Pareto plots from the records")
    args = ap.parse_args(argv)
    if args.report:
        print(report(Path(args.out) if args.out else HERE / "results" / "grid" / Path(args.model).name))
        return
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.tasks = args.tasks.split(",")
    args.depths = [float(x) for x in args.depths.split(",")]
    args.methods = args.methods.split(",")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    out = Path(args.out) if args.out else HERE / "results" / "grid" / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)
    lm = longkit.load_model(args.model, dtype=args.dtype)
    meta = {"argv": sys.argv, "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    append(out / "runs.jsonl", meta)
    (speed if args.speed else kvpress if args.kvpress else accuracy)(args, lm, out)


if __name__ == "__main__":
    main()
