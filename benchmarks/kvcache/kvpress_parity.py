"""Parity with NVIDIA kvpress 0.5.5: the same model, prompt and budgets; compare kept positions and answers.

    bash benchmarks/kvcache/kvpress_env.sh                 # once: kvpress in its own venv (transformers 5.2)
    .venv/bin/python benchmarks/kvcache/kvpress_parity.py  # -> results/kvpress_parity.json + kvpress_parity.md

kvpress pins transformers < 5.3 and longkit runs on 5.24, so the two never share a process. This script saves
longkit's model (default ``tiny-llama``, seeded random weights) with ``save_pretrained`` to a temporary directory,
writes a request (prompt token ids, presses, keep ratios), runs ``kvpress_runner.py`` under the kvpress venv, then
runs longkit's method of the same name with matched hyper-parameters on the same model and prompt.

What is compared, per (method, keep ratio): the prompt positions kept after prefill for every (layer, KV head)
(Jaccard similarity, the share of heads whose sets are identical, the kept counts) and the greedy answer (token ids
after the prompt). Both sides compress once, at the end of prefill, with the whole prompt (question included) in
the observation window; longkit's methods that evict while decoding by default run with ``decode_every=0`` here.
Keep ratios map to kvpress's ``compression_ratio = 1 - keep``. Kept positions come from each side's stored cache:
kvpress's pruned key rows are matched to the unpruned rows; longkit's from its position track or, without one,
by matching the stored key rows to an uncompressed prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".venv-kvpress"
RESULTS = HERE / "results"

#: (kvpress press, its kwargs, longkit method, its args, kvpress attention implementation). Hyper-parameters are
#: matched: kvpress SnapKV's default window is 64, longkit's 32, so both run 32 here.
PAIRS: list[dict[str, Any]] = [
    {
        "method": "snapkv",
        "press": "snapkv",
        "press_kwargs": {"window_size": 32, "kernel_size": 5},
        "longkit": {"window": 32, "kernel": 5},
    },
    {
        "method": "streaming_llm",
        "press": "streaming_llm",
        "press_kwargs": {"n_sink": 4},
        "longkit": {"sink": 4, "decode_every": 0},
    },
    {"method": "tova", "press": "tova", "press_kwargs": {}, "longkit": {"decode_every": 0}},
    {"method": "knorm", "press": "knorm", "press_kwargs": {}, "longkit": {}},
    {
        "method": "pyramidkv",
        "press": "pyramidkv",
        "press_kwargs": {"window_size": 32, "kernel_size": 5, "beta": 20},
        "longkit": {"window": 32, "kernel": 5, "beta": 20},
    },
    {
        "method": "adakv",
        "press": "adakv",
        "press_kwargs": {"inner": "snapkv", "inner_kwargs": {"window_size": 32}, "alpha_safeguard": 0.2},
        "longkit": {"scorer": "snapkv", "alpha": 0.2},
    },
    {
        "method": "expected_attention",
        "press": "expected_attention",
        "press_kwargs": {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True},
        "longkit": {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True},
    },
    {
        "method": "h2o",
        "press": "observed_attention",
        "press_kwargs": {},
        "longkit": {"recent": 0.0, "decode_every": 0},
        "attn": "eager",
    },
]

PROMPT_TEXT = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The pass key is 71432. Remember it. 71432 is the pass key. "
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def build_prompt(tokenizer: Any, length: int) -> list[int]:
    """A fixed passkey-style prompt of exactly ``length`` tokens ending in the question."""
    question = "What is the pass key? The pass key is"
    q_ids = tokenizer(question, add_special_tokens=False).input_ids
    body = tokenizer(PROMPT_TEXT * 40, add_special_tokens=False).input_ids
    return body[: length - len(q_ids)] + q_ids


# ---------------------------------------------------------------- comparison (pure functions, tested)


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def compare_kept(ours: list[list[list[int]]], theirs: list[list[list[int]]]) -> dict[str, Any]:
    """Kept positions per [layer][head] on both sides -> Jaccard (mean, min), identical-set share, counts."""
    if len(ours) != len(theirs) or any(len(a) != len(b) for a, b in zip(ours, theirs, strict=True)):
        raise ValueError("the two sides report different numbers of layers or heads")
    js, same, n_ours, n_theirs = [], 0, [], []
    for la, lb in zip(ours, theirs, strict=True):
        for a, b in zip(la, lb, strict=True):
            js.append(jaccard(a, b))
            same += set(a) == set(b)
            n_ours.append(len(a))
            n_theirs.append(len(b))
    return {
        "jaccard_mean": sum(js) / len(js),
        "jaccard_min": min(js),
        "identical_heads": same / len(js),
        "kept_longkit": n_ours,
        "kept_kvpress": n_theirs,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def match_rows(reference: Any, stored: Any, valid: Any = None, rtol: float = 1e-4) -> list[list[int]]:
    """Positions in ``reference`` (H_kv, S, D) of the stored key rows (H_kv, S', D) of one sequence, per head.

    Eviction only selects rows, so each stored row is its nearest reference row; a row farther than ``rtol`` of
    its norm from every reference row is an error (keys re-rotated or modified). The tolerance absorbs the float
    noise of a different attention implementation in the layers below (eager vs sdpa).
    """
    import torch

    out = []
    for h in range(reference.shape[0]):
        rows = (stored[h] if valid is None else stored[h][valid[h]]).float()
        ref = reference[h].float()
        # (S', S) distances; eviction only selects rows
        dist = torch.cdist(rows, ref, compute_mode="donot_use_mm_for_euclid_dist")
        best = dist.min(-1)
        if bool((best.values > rtol * rows.norm(dim=-1).clamp_min(1e-12)).any()):
            raise ValueError("a stored key row matches no uncompressed row (keys were re-rotated or modified)")
        out.append(sorted(int(i) for i in best.indices))
    return out


# ---------------------------------------------------------------- longkit side


def uncompressed_keys(model: Any, prompt: list[int], attention: str | None = None) -> list[Any]:
    """Per layer, the (B, H_kv, S, D) post-RoPE keys of an uncompressed prefill (with ``attention`` if given)."""
    import torch
    from transformers import DynamicCache

    import longkit

    with torch.inference_mode(), longkit.apply(model, attention=attention):
        cache = DynamicCache(config=model.config)
        model(torch.tensor([prompt]), cache=cache, use_cache=True)
    return [layer.keys for layer in cache.layers]


def ties_only(reference_keys: list[Any], ours: list[list[list[int]]], theirs: list[list[list[int]]]) -> bool:
    """Whether every position kept by one side only has the same key norm as the last one kept (K-norm ties)."""
    for i, (la, lb) in enumerate(zip(ours, theirs, strict=True)):
        for h, (a, b) in enumerate(zip(la, lb, strict=True)):
            diff = set(a) ^ set(b)
            if not diff:
                continue
            norms = reference_keys[i][0, h].float().norm(dim=-1)
            boundary = float(norms[sorted(a, key=lambda p: float(norms[p]))[-1]])
            if any(float(norms[p]) != boundary for p in diff):
                return False
    return True


def run_longkit(
    lm: Any, prompt: list[int], pairs: list[dict], keeps: list[float], new_tokens: int, reference_keys: list[Any]
) -> list[dict]:
    import torch

    import longkit
    from longkit.kvcache import cache_nbytes
    from longkit.registry import registry

    model = lm.model
    ids = torch.tensor([prompt])
    out = []
    for pair in pairs:
        for keep in keeps:
            entry: dict[str, Any] = {"id": f"{pair['method']}@{keep:g}", "method": pair["method"], "keep": keep}
            if pair["method"] not in registry("kv"):
                entry["error"] = "not registered in longkit"
                out.append(entry)
                continue
            args = {**pair["longkit"], "ratio": keep}
            attn = pair.get("attn")
            try:
                spec = {"kv": pair["method"], "kv_args": args}
                if attn:
                    spec.update(attention=attn)
                ref = uncompressed_keys(model, prompt, attn) if attn else reference_keys
                with torch.inference_mode(), longkit.apply(model, **spec) as applied:
                    entry["spec"] = applied.spec.label()
                    cache = applied.new_cache()
                    t0 = time.perf_counter()
                    logits = model(ids, cache=cache, use_cache=True).logits
                    entry["prefill_s"] = time.perf_counter() - t0
                    entry["kv_bytes"] = cache_nbytes(cache)
                    entry["cache_lengths"] = [int(layer.max_length()) for layer in cache.layers]
                    entry["kept"] = kept_positions(
                        cache,
                        ref,
                        keep_order=pair["method"] == "streaming_llm",
                        prompt_len=len(prompt),
                    )
                    tokens = [int(logits[0, -1].argmax())]
                    for _ in range(new_tokens - 1):
                        logits = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits
                        tokens.append(int(logits[0, -1].argmax()))
                    entry["answer"] = tokens
                entry["error"] = None
            except Exception as exc:  # one failing method must not hide the others
                entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            out.append(entry)
            print(f"longkit {entry['id']}: {'ok' if entry['error'] is None else entry['error']}", file=sys.stderr)
    return out


def kept_positions(
    cache: Any, reference_keys: list[Any], *, keep_order: bool, prompt_len: int
) -> list[list[list[int]]]:
    """Kept prompt positions per [layer][head] for sequence 0 of a longkit CompressedCache.

    Key rows are matched to an uncompressed prefill. StreamingLLM re-rotates the kept keys (rolling-cache
    positions), so rows no longer match; its kept set is the sinks plus the most recent tokens, read from the count.
    """
    kept = []
    for i, layer in enumerate(cache.layers):
        keys, _, valid, _ = layer.padded()
        v0 = None if valid is None else valid[0]
        if keep_order:
            sink = cache.method.sink
            heads = []
            for n in layer.stored_lengths()[0].tolist():
                n_sink = min(sink, n)
                heads.append(list(range(n_sink)) + list(range(prompt_len - (n - n_sink), prompt_len)))
            kept.append(heads)
        else:
            kept.append(match_rows(reference_keys[i][0], keys[0], v0))
    return kept


# ---------------------------------------------------------------- kvpress side


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_kvpress(
    venv: Path, model_dir: str, prompt: list[int], pairs: list[dict], keeps: list[float], new_tokens: int, timeout: int
) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no kvpress venv at {venv}; create it with: bash {HERE / 'kvpress_env.sh'}")
    runs = [
        {
            "id": f"{p['method']}@{k:g}",
            "press": p["press"],
            "keep": k,
            "kwargs": p["press_kwargs"],
            "attn_implementation": p.get("attn", "sdpa"),
        }
        for p in pairs
        for k in keeps
    ]
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "out.json"
        req.write_text(
            json.dumps({"model_dir": model_dir, "prompt_ids": prompt, "max_new_tokens": new_tokens, "runs": runs})
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": str(torch_threads()),
        }
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run(
                [str(python), str(HERE / "kvpress_runner.py"), str(req), str(out)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            # keep the runs that finished (the runner rewrites its output after each one)
            if out.exists():
                print(f"kvpress runner timed out after {timeout} s; keeping the finished runs", file=sys.stderr)
                return json.loads(out.read_text())
            raise SystemExit(f"kvpress runner timed out after {timeout} s before finishing one run") from None
        if proc.returncode != 0:
            raise SystemExit(f"kvpress runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------- report


def compare(ours: list[dict], theirs: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in theirs}
    rows = []
    for o in ours:
        t = by_id.get(o["id"], {})
        row: dict[str, Any] = {
            "id": o["id"],
            "method": o["method"],
            "keep": o["keep"],
            "longkit_error": o.get("error"),
            "kvpress_error": t.get("error", "not run"),
            "kvpress_decode_error": t.get("decode_error"),
        }
        if o.get("kept") is not None and t.get("kept") is not None:
            row.update(compare_kept(o["kept"], t["kept"]))
        if o.get("answer") is not None and t.get("answer") is not None:
            row["answer_match"] = o["answer"] == t["answer"]
            row["answer_common_prefix"] = common_prefix(o["answer"], t["answer"])
            row["answer_longkit"], row["answer_kvpress"] = o["answer"], t["answer"]
        row["cache_lengths_longkit"] = o.get("cache_lengths")
        row["cache_lengths_kvpress"] = t.get("cache_lengths")
        row["kv_bytes_longkit"] = o.get("kv_bytes")
        rows.append(row)
    return rows


#: Why the two sides can differ, per method (rendered under the table for the methods in the run).
NOTES = {
    "snapkv": "Same algorithm (window queries' softmax over the whole prompt, mean over the window, average pooling "
    "with zero padding, mean over the GQA group, window always kept). Equal settings give equal sets.",
    "streaming_llm": "Same kept set (sinks + most recent). kvpress keeps each key at its original RoPE position "
    "(its KeyRerotationPress wrapper would re-rotate); longkit re-rotates the kept keys to "
    "rolling-cache positions, as the paper does, so answers can differ while the sets agree.",
    "tova": "Same algorithm: the last query's attention averaged over all query heads, one selection shared by "
    "the KV heads; the last token always kept.",
    "knorm": "Same score (minus the key L2 norm). Repeated tokens give equal key norms in the first layer (RoPE "
    "keeps the norm), so the budget boundary can fall inside a tie: longkit keeps the earliest tied "
    "positions (stable sort), kvpress whatever torch.topk returns. The note column says when every "
    "difference is such a tie.",
    "pyramidkv": "Different per-layer budget schedules with the same total. kvpress uses KVCache-Factory's "
    "formula (budget beyond the window from 2(k-w)-min down to min=(k-w)/beta, capped at S-w) and falls "
    "back to a uniform budget when min < window; longkit always applies its pyramid (the budget "
    "beyond the window falls linearly from 2k-k/beta to k/beta). Layer lengths are in the note column.",
    "adakv": "Same per-head selection (layer-wide top-k with a floor(alpha*k) safeguard per head). kvpress does not "
    "free memory: it keeps every key and, while decoding, overwrites the evicted ones with a 'fake key' "
    "found by a hyperplane search, which can fail ('Could not find fake keys'); longkit stores the ragged "
    "heads and frees the bytes (cache lengths in the note column).",
    "expected_attention": "Same statistics and score (pre-RoPE query mean and covariance over the prompt past the "
    "sinks, RoPE averaged over the next 512 positions, softmax of k.mu/sqrt(d) + k^T Sigma k/(2d) over the non-sink "
    "keys, mean over the GQA group, times ||v||, 4 sinks kept). kvpress projects the hidden states again; longkit "
    "un-rotates the post-RoPE queries it already has, equal up to float rounding.",
    "h2o": "Different scores. kvpress's ObservedAttentionPress (eager attention) averages each key's attention over "
    "the queries that can see it (sum / (S - j)); longkit's h2o keeps H2O's accumulated sum, which favours "
    "early tokens (run here with recent=0 and decode_every=0 to isolate the score).",
}

ROUNDING = (
    "Budgets: kvpress keeps int(S * (1 - compression_ratio)) (floor, with 1 - cr in floating point: "
    "cr = 0.9 gives 0.0999..., so S = 100 keeps 9), longkit round(keep * S); the kept counts are compared "
    "in the table and differ only where these roundings do."
)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# kvpress parity ({meta['model']}, {meta['prompt_tokens']}-token prompt, {meta['new_tokens']} greedy tokens)",
        "",
        f"kvpress {meta['kvpress_versions'].get('kvpress')} (transformers {meta['kvpress_versions'].get('transformers')}) "
        f"vs longkit (transformers {meta['longkit_transformers']}), torch {meta['torch']}. "
        f"Written by `{meta['command']}`.",
        "",
        "| method | keep | kept longkit / kvpress (mean per head) | Jaccard mean | Jaccard min | identical heads | "
        "answer match (common prefix) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "jaccard_mean" in r:
            kl = sum(r["kept_longkit"]) / len(r["kept_longkit"])
            kp = sum(r["kept_kvpress"]) / len(r["kept_kvpress"])
            ans = "—"
            if "answer_match" in r:
                ans = f"{'yes' if r['answer_match'] else 'no'} ({r['answer_common_prefix']})"
            note = []
            if r.get("kvpress_decode_error"):
                note.append(f"kvpress decoding failed: {r['kvpress_decode_error']}")
            if r.get("ties_only"):
                note.append("every difference is a tie in the score (equal key norms)")
            if r.get("cache_lengths_longkit") != r.get("cache_lengths_kvpress"):
                note.append(
                    f"layer lengths longkit {r.get('cache_lengths_longkit')}, kvpress {r.get('cache_lengths_kvpress')}"
                )
            lines.append(
                f"| {r['method']} | {r['keep']:g} | {kl:.1f} / {kp:.1f} | {r['jaccard_mean']:.3f} | "
                f"{r['jaccard_min']:.3f} | {100 * r['identical_heads']:.0f}% | {ans} | "
                f"{'; '.join(note).replace('|', '/')} |"
            )
        else:
            note = "; ".join(
                f"{side}: {err}"
                for side, err in (("longkit", r["longkit_error"]), ("kvpress", r["kvpress_error"]))
                if err
            )
            lines.append(f"| {r['method']} | {r['keep']:g} | — | — | — | — | — | {note.replace('|', '/')} |")
    lines += ["", "## Differences explained", "", ROUNDING, ""]
    for method in dict.fromkeys(r["method"] for r in rows):
        if method in NOTES:
            lines.append(f"- **{method}**: {NOTES[method]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--length", type=int, default=384, help="prompt tokens")
    ap.add_argument("--keeps", default="0.5,0.25,0.1", help="keep ratios (kvpress compression_ratio = 1 - keep)")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--methods", default=",".join(p["method"] for p in PAIRS))
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown table of an existing results JSON")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(data["rows"], data["meta"]))
        return

    import torch
    import transformers

    import longkit

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",")]
    wanted = set(args.methods.split(","))
    pairs = [p for p in PAIRS if p["method"] in wanted]
    lm = (
        longkit.load_model(args.model, dtype="float32")
        if args.model.startswith("smollm2")
        else longkit.load_model(args.model)
    )
    prompt = build_prompt(lm.tokenizer, args.length)
    with tempfile.TemporaryDirectory() as tmp:
        lm.model.save_pretrained(tmp)
        t0 = time.perf_counter()
        theirs = run_kvpress(args.venv, tmp, prompt, pairs, keeps, args.new_tokens, args.timeout)
        kvpress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference_keys = uncompressed_keys(lm.model, prompt)
    ours = run_longkit(lm, prompt, pairs, keeps, args.new_tokens, reference_keys)
    longkit_s = time.perf_counter() - t0
    rows = compare(ours, theirs["results"])
    by_id = {o["id"]: o for o in ours}
    theirs_by_id = {t["id"]: t for t in theirs["results"]}
    for row in rows:
        o, t = by_id[row["id"]], theirs_by_id.get(row["id"], {})
        if row["method"] == "knorm" and o.get("kept") and t.get("kept"):
            row["ties_only"] = ties_only(reference_keys, o["kept"], t["kept"])
    meta = {
        "model": args.model,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "keeps": keeps,
        "kvpress_versions": theirs["versions"],
        "longkit_transformers": transformers.__version__,
        "torch": torch.__version__,
        "kvpress_wall_s": kvpress_s,
        "longkit_wall_s": longkit_s,
        "command": "python benchmarks/kvcache/kvpress_parity.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kvpress_parity" if args.model == "tiny-llama" else f"kvpress_parity_{args.model}"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "kvpress": theirs["results"], "longkit": ours}, indent=1)
    )
    (args.out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
