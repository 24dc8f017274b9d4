"""kvpress, one prefill and many presses: capture each prompt's uncompressed prefill once, replay every press on it.

Runs under benchmarks/kvcache/.venv-kvpress (kvpress 0.5.5, transformers < 5.3); never imports longkit.

    .venv-kvpress/bin/python kvpress_sweep_runner.py REQUEST.json OUT.jsonl [--check]

A kvpress press compresses a layer's cache in a forward hook that runs AFTER that layer's attention and returns the
attention output unchanged, so the prefill forward (every layer's hidden states, keys, values, the logits) is the
same whatever press runs; only what each layer's cache keeps differs. So, per prompt, ONE uncompressed prefill
records what each attention module's forward hook receives (``input``, ``kwargs``, ``output``), every layer's keys
and values, and the last position's logits. Per run, a fresh ``DynamicCache`` is filled layer by layer with copies
of the captured keys and values (``cache.update``, as the attention forward does) and, inside ``with press(model)``,
the forward hooks the press registered on each attention module are called with the captured arguments and this
cache: kvpress's own code does all the compression. Greedy decoding then continues exactly as
``kvpress_runner.run_one`` does (first token = argmax of the captured logits, explicit position ids).

``--check`` also runs the real path per run (a real prefill inside ``with press(model)``) and asserts equal caches
(every layer's keys and values, bit for bit), equal AdaKV ``masked_key_indices``, equal last logits and equal
greedy answers; it prints a per-run PASS/FAIL table and exits 1 on any FAIL.

REQUEST (JSON)::

    {"model_dir": "/path/to/saved/model", "dtype": "bfloat16" | "float32", "attn_implementation": "sdpa",
     "max_new_tokens": 16,                                        # default for prompts that do not set it
     "max_attention_capture_gb": 4,                               # eager only: cap on the stored attention weights
     "prompts": [{"id": "passkey-4096-d0.5-s0", "ids": [1, 2, ...], "max_new_tokens": 16}],
     "runs": [{"id": "snapkv@0.25", "press": "snapkv", "keep": 0.25, "kwargs": {"window_size": 64}},
              {"id": "adakv@0.25", "press": "adakv", "keep": 0.25,
               "kwargs": {"inner": "snapkv", "inner_kwargs": {"window_size": 64}, "alpha_safeguard": 0.2}},
              {"id": "none", "press": "none", "keep": 1.0},
              {"id": "observed@0.25", "press": "observed_attention", "keep": 0.25, "attn_implementation": "eager"}]}

``press`` and ``kwargs`` are those of ``kvpress_runner._make_press``; ``keep`` = 1 - compression_ratio. A run may
set its own ``attn_implementation`` (ObservedAttentionPress needs ``eager``); its prompts are then captured again
with that implementation (eager stores every layer's (1, H, T, T) attention weights: short prompts only).

OUT (JSONL, appended one line per (prompt, run) as it finishes; a rerun skips the pairs already there)::

    {"prompt_id", "run_id": "__prefill__", "prefill_s", "prompt_tokens", "attn_implementation", "dtype", "threads",
     "versions"}                 # the uncompressed prefill, timed once per prompt ("__prefill__:eager" for the
                                 # captures of runs that set another attn_implementation than the request's)
    {"prompt_id", "run_id", "press", "keep", "kwargs", "prompt_tokens", "answer": [token ids],
     "cache_lengths": [per layer], "cache_bytes", "masked_keys": [per layer] | null, "effective_bytes",
     "prefill_replay_s", "decode_s", "decode_tokens", "error", "check": {...} (with --check)}

``cache_bytes`` is the exact size of the key and value tensors the cache holds after the prompt. AdaKV keeps every
key and masks evicted ones while decoding, so its cache does not shrink: ``masked_keys`` counts the masked
(batch, head, position) key rows per layer and ``effective_bytes`` = ``cache_bytes`` minus those rows' keys and
values (what a cache storing the ragged heads would hold); for other presses ``masked_keys`` is null and
``effective_bytes`` = ``cache_bytes``. ``decode_s`` times the ``decode_tokens`` = max_new_tokens - 1 decoding
forwards (the first answer token comes from the prefill's logits). ``torch.set_num_threads`` follows
``OMP_NUM_THREADS``. Limits: batch size 1, no padding, one-shot prefill, presses that act in attention forward
hooks only (a press that adds forward pre-hooks or hooks on other modules, or returns a modified attention
output, is refused with an error in its record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
PREFILL = "__prefill__"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: stands for the cache in captured attention kwargs
_CACHE = object()


# ---------------------------------------------------------------- capture and replay


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The attention modules kvpress hooks, in layer order (the same walk as ``BasePress.__call__``)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in lm.layers]


@dataclass
class Capture:
    """One uncompressed prefill: what each attention module's forward hook received, and the cache it left."""

    prompt: torch.Tensor
    # (V,) logits of the last prompt position
    logits: torch.Tensor
    # per attention call, in call order: (module, input, kwargs without the cache, output)
    calls: list[tuple[torch.nn.Module, tuple, dict, Any]] = field(default_factory=list)
    # per layer, (1, H_kv, T, D) keys and values after the prompt
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    prefill_s: float = 0.0


def capture_prefill(model: Any, prompt: torch.Tensor) -> Capture:
    """Prefill ``prompt`` (1, T) once without a press, recording every attention module's forward-hook arguments."""
    from transformers import DynamicCache

    calls: list[tuple[torch.nn.Module, tuple, dict, Any]] = []

    def record(module, args, kwargs, output):
        # references only (no copies): the timing below stays that of a plain prefill
        calls.append((module, args, dict(kwargs), output))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in attention_modules(model)]
    cache = DynamicCache()
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            # the same call as kvpress_runner.run_one (full logits), so the first answer token is bit-identical
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
            prefill_s = time.perf_counter() - t0
            logits = out.logits[0, -1].clone()
            del out
    finally:
        for h in handles:
            h.remove()
    for _, _, kwargs, _ in calls:
        # a placeholder where the forward passed its cache: each replay puts its own cache there
        for name in [k for k, v in kwargs.items() if v is cache]:
            kwargs[name] = _CACHE
    return Capture(
        prompt=prompt,
        logits=logits,
        calls=calls,
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        prefill_s=prefill_s,
    )


def _reset_masks(model: Any) -> None:
    # kvpress's attention patch sets masked_key_indices = None in every prefill attention call; a replay makes no
    # attention call, so it must clear what an earlier run (AdaKV) left on the shared modules
    for module in attention_modules(model):
        module.masked_key_indices = None


def replay(model: Any, cap: Capture, press: Any) -> tuple[Any, float]:
    """The cache a real prefill of ``cap.prompt`` inside ``with press(model)`` leaves, and the seconds it took."""
    from transformers import DynamicCache

    _reset_masks(model)
    torch.manual_seed(0)
    cache = DynamicCache()
    before = _hooks(model)
    attention = {id(m) for m in attention_modules(model)}
    t0 = time.perf_counter()
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        # the replay calls only the forward hooks of attention modules; any other hook the press adds would run
        # during a real prefill and not here
        foreign = [
            (kind, name) for mid, kind, name, _ in _hooks(model) - before if kind == "pre" or mid not in attention
        ]
        if foreign:
            kind, name = sorted(foreign)[0]
            raise RuntimeError(f"the press adds hooks a replay cannot run ({kind} hook on {name or 'the model'})")
        for (module, args, kwargs, output), keys, values in zip(cap.calls, cap.keys, cap.values, strict=True):
            # (1, H_kv, T, D): DynamicLayer.update concatenates onto an empty tensor, so the cache owns fresh
            # copies, exactly as after the attention forward's own cache.update
            cache.update(keys, values, module.layer_idx)
            kw = {k: (cache if v is _CACHE else v) for k, v in kwargs.items()}
            for hook_id, hook in list(module._forward_hooks.items()):
                if hook_id in module._forward_hooks_with_kwargs:
                    res = hook(module, args, kw, output)
                else:
                    res = hook(module, args, output)
                if res is not None and res is not output:
                    raise RuntimeError("the press changed an attention output; the prefill is not press-independent")
    return cache, time.perf_counter() - t0


def _hooks(model: Any) -> set[tuple[int, str, str, int]]:
    """(module id, "pre" | "post", module name, hook id) of every forward hook in ``model``."""
    return {
        (id(m), kind, name, hook_id)
        for name, m in model.named_modules()
        for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks))
        for hook_id in hooks
    }


def real_prefill(model: Any, prompt: torch.Tensor, press: Any) -> tuple[Any, torch.Tensor, float]:
    """The real path (``kvpress_runner.run_one``): a prefill inside ``with press(model)``; (cache, logits, s)."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    cache = DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        seconds = time.perf_counter() - t0
        logits = out.logits[0, -1].clone()
    return cache, logits, seconds


# ---------------------------------------------------------------- cache facts and comparison (pure torch)


def snapshot(model: Any, cache: Any, copy: bool = True) -> dict[str, Any]:
    """Each layer's keys, values and AdaKV mask after the prompt; copies with ``copy`` (for a comparison after
    decoding, which replaces the cache's tensors and, for AdaKV, writes fake keys into them)."""

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if copy else t

    masks = []
    for module in attention_modules(model):
        m = getattr(module, "masked_key_indices", None)
        masks.append(None if m is None else tuple(keep(t) for t in m))
    return {
        "keys": [keep(layer.keys) for layer in cache.layers],
        "values": [keep(layer.values) for layer in cache.layers],
        "masks": masks,
    }


def cache_facts(snap: dict[str, Any]) -> dict[str, Any]:
    """Lengths, exact bytes, masked key rows per layer and the bytes without the masked rows."""
    nbytes = sum(t.numel() * t.element_size() for t in snap["keys"] + snap["values"])
    masked = None
    if any(m is not None for m in snap["masks"]):
        masked = [0 if m is None else int(m[0].numel()) for m in snap["masks"]]
    # a masked row is one (batch, head, position): D key elements and the D value elements beside them
    gone = sum(
        n * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
        for n, k, v in zip(masked or [0] * len(snap["keys"]), snap["keys"], snap["values"], strict=True)
    )
    return {
        "cache_lengths": [int(k.shape[-2]) for k in snap["keys"]],
        "cache_bytes": int(nbytes),
        "masked_keys": masked,
        "effective_bytes": int(nbytes - gone),
    }


def compare_snapshots(real: dict[str, Any], replayed: dict[str, Any]) -> dict[str, Any]:
    """Which parts of two post-prompt caches differ: lengths, keys, values (bit for bit), AdaKV masks."""
    out: dict[str, Any] = {"layers_equal": len(real["keys"]) == len(replayed["keys"])}
    if not out["layers_equal"]:
        return {**out, "lengths_equal": False, "keys_equal": False, "values_equal": False, "masks_equal": False}
    out["lengths_equal"] = all(a.shape == b.shape for a, b in zip(real["keys"], replayed["keys"], strict=True))
    out["keys_equal"] = all(_same(a, b) for a, b in zip(real["keys"], replayed["keys"], strict=True))
    out["values_equal"] = all(_same(a, b) for a, b in zip(real["values"], replayed["values"], strict=True))
    out["masks_equal"] = all(
        (a is None and b is None)
        or (a is not None and b is not None and all(_same(x, y) for x, y in zip(a, b, strict=True)))
        for a, b in zip(real["masks"], replayed["masks"], strict=True)
    )
    bad = [
        i
        for i, (a, b) in enumerate(zip(real["keys"], replayed["keys"], strict=True))
        if not _same(a, b) or not _same(real["values"][i], replayed["values"][i])
    ]
    out["first_bad_layer"] = bad[0] if bad else None
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


# ---------------------------------------------------------------- request, records


def load_request(path: str) -> dict[str, Any]:
    """The request with defaults filled in; a bad field exits with a message naming it and its valid values."""
    try:
        req = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"REQUEST {path}: cannot read JSON ({exc})") from None

    def bad(msg: str) -> SystemExit:
        return SystemExit(f"REQUEST {path}: {msg}")

    if not isinstance(req.get("model_dir"), str) or not Path(req["model_dir"]).is_dir():
        raise bad(f"'model_dir' must be an existing directory (got {req.get('model_dir')!r})")
    req.setdefault("dtype", "float32")
    if req["dtype"] not in DTYPES:
        raise bad(f"'dtype' must be one of {sorted(DTYPES)} (got {req['dtype']!r})")
    req.setdefault("attn_implementation", "sdpa")
    req.setdefault("max_attention_capture_gb", 4.0)
    prompts, runs = req.get("prompts"), req.get("runs")
    if not isinstance(prompts, list) or not prompts:
        raise bad("'prompts' must be a non-empty list of {id, ids, max_new_tokens}")
    if not isinstance(runs, list) or not runs:
        raise bad("'runs' must be a non-empty list of {id, press, keep, kwargs}")
    for p in prompts:
        ids = p.get("ids")
        if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise bad(f"prompt {p.get('id')!r}: 'ids' must be a list of >= 2 token ids")
        p.setdefault("max_new_tokens", req.get("max_new_tokens"))
        if not isinstance(p["max_new_tokens"], int) or p["max_new_tokens"] < 1:
            raise bad(f"prompt {p.get('id')!r}: 'max_new_tokens' must be an integer >= 1 (got {p['max_new_tokens']!r})")
    for r in runs:
        if r.get("id") == PREFILL or str(r.get("id", "")).startswith(PREFILL):
            raise bad(f"run id {PREFILL!r} is reserved for the prefill records")
        keep = r.get("keep")
        if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise bad(f"run {r.get('id')!r}: 'keep' must be in (0, 1] (got {keep!r})")
        r.setdefault("kwargs", {})
        r.setdefault("attn_implementation", req["attn_implementation"])
    for what, items in (("prompt", prompts), ("run", runs)):
        ids = [str(x.get("id")) for x in items]
        if len(set(ids)) != len(ids) or any(x.get("id") is None for x in items):
            raise bad(f"every {what} needs a unique 'id'")
    return req


def read_done(out_path: Path) -> list[dict[str, Any]]:
    """Records already in OUT; a last line cut short by a killed run is removed so new lines append cleanly."""
    if not out_path.exists():
        return []
    raw = out_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        print(f"{out_path}: dropping an unfinished last line ({len(raw) - keep} bytes)", file=sys.stderr)
        with open(out_path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def append(out_path: Path, record: dict[str, Any]) -> None:
    with open(out_path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


# ---------------------------------------------------------------- main loop


def run_pair(model: Any, cap: Capture, run: dict, max_new_tokens: int, check: bool) -> dict[str, Any]:
    """One (prompt, run) record: replay the press on the captured prefill, decode, and with ``check`` compare to
    the real path."""
    from kvpress_runner import _make_press, decode

    rec: dict[str, Any] = {
        "run_id": run["id"],
        "press": run["press"],
        "keep": run["keep"],
        "kwargs": run["kwargs"],
        "attn_implementation": run["attn_implementation"],
        "prompt_tokens": int(cap.prompt.shape[1]),
        "answer": None,
        "error": None,
    }
    replayed = None
    try:
        press = _make_press(run["press"], round(1.0 - run["keep"], 10), run["kwargs"])
        cache, rec["prefill_replay_s"] = replay(model, cap, press)
        replayed = snapshot(model, cache, copy=check)
        rec.update(cache_facts(replayed))
        try:
            rec["answer"], rec["decode_s"] = decode(model, cache, int(cap.logits.argmax()), rec["prompt_tokens"],
                                                    max_new_tokens)  # fmt: skip
            rec["decode_tokens"] = max_new_tokens - 1
        except Exception as exc:  # the cache facts stay valid (AdaKV's fake-key search can fail while decoding)
            rec["error"] = "decode: " + _err(exc)
        del cache
    except Exception as exc:  # recorded per run: one failing press must not hide the others
        rec["error"] = _err(exc)
        rec["traceback"] = traceback.format_exc()[-2000:]
    if check:
        rec["check"] = check_pair(model, cap, run, max_new_tokens, replayed, rec)
    return rec


def check_pair(model: Any, cap: Capture, run: dict, max_new_tokens: int, replayed: Any, rec: dict) -> dict:
    """The real path for this run, compared with the replay: caches, masks, last logits, answers."""
    from kvpress_runner import _make_press, decode

    chk: dict[str, Any] = {"pass": False}
    try:
        press = _make_press(run["press"], round(1.0 - run["keep"], 10), run["kwargs"])
        cache, logits, chk["real_prefill_s"] = real_prefill(model, cap.prompt, press)
        real = snapshot(model, cache)
        try:
            chk["real_answer"], _ = decode(model, cache, int(logits.argmax()), cap.prompt.shape[1], max_new_tokens)
        except Exception as exc:
            chk["real_error"] = "decode: " + _err(exc)
    except Exception as exc:
        chk["real_error"] = _err(exc)
        real, logits = None, None
    if real is None or replayed is None:
        # both sides failing the same way is still not a verified replay
        chk["reason"] = f"replay error: {rec['error']}; real error: {chk.get('real_error')}"
        return chk
    chk.update(compare_snapshots(real, replayed))
    chk["logits_equal"] = bool(torch.equal(logits, cap.logits))
    chk["answer_equal"] = chk.get("real_answer") == rec["answer"] and rec["answer"] is not None
    chk["errors_equal"] = chk.get("real_error") == rec["error"]
    parts = ("layers_equal", "lengths_equal", "keys_equal", "values_equal", "masks_equal", "logits_equal")
    failed = [p for p in parts if not chk[p]]
    if not chk["answer_equal"] and not (rec["answer"] is None and chk["errors_equal"]):
        failed.append("answer_equal")
    chk["pass"] = not failed
    chk["reason"] = ", ".join(f"not {p}" for p in failed) or None
    return chk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("request")
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true", help="also run each press's real prefill and compare")
    args = ap.parse_args(argv)
    req = load_request(args.request)
    out_path = Path(args.out)

    # kvpress patches transformers' attention functions at import (AdaKV's masked keys while decoding): import it
    # before the first forward so the capture and every replay run under the same attention as a real prefill
    import kvpress  # noqa: F401
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    sys.path.insert(0, str(HERE))
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from importlib.metadata import version

    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    done = {(r["prompt_id"], r["run_id"]) for r in read_done(out_path)}
    models: dict[str, Any] = {}
    dtype = DTYPES[req["dtype"]]

    def get_model(attn: str) -> Any:
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(
                req["model_dir"], dtype=dtype, attn_implementation=attn
            ).eval()
        return models[attn]

    impls = list(dict.fromkeys([req["attn_implementation"]] + [r["attn_implementation"] for r in req["runs"]]))
    for p in req["prompts"]:
        prompt = torch.tensor([p["ids"]])
        for attn in impls:
            todo = [r for r in req["runs"] if r["attn_implementation"] == attn and (p["id"], r["id"]) not in done]
            pre_id = PREFILL if attn == req["attn_implementation"] else f"{PREFILL}:{attn}"
            if not todo and ((p["id"], pre_id) in done or attn != req["attn_implementation"]):
                continue
            model = get_model(attn)
            cfg = model.config
            if attn == "eager":
                # eager hands every layer's (1, H, T, T) attention weights to the hooks, and the capture keeps them
                need = cfg.num_hidden_layers * cfg.num_attention_heads * prompt.shape[1] ** 2 * dtype.itemsize / 2**30
                if need > req["max_attention_capture_gb"]:
                    for r in todo:
                        msg = (f"eager capture would hold {need:.1f} GB of attention weights "
                               f"(max_attention_capture_gb={req['max_attention_capture_gb']})")  # fmt: skip
                        append(out_path, {"prompt_id": p["id"], "run_id": r["id"], "press": r["press"],
                                          "keep": r["keep"], "answer": None, "error": msg})  # fmt: skip
                    continue
            cap = capture_prefill(model, prompt)
            if (p["id"], pre_id) not in done:
                append(out_path, {"prompt_id": p["id"], "run_id": pre_id, "prefill_s": cap.prefill_s,
                                  "prompt_tokens": int(prompt.shape[1]), "attn_implementation": attn,
                                  "dtype": req["dtype"], "threads": torch.get_num_threads(),
                                  "versions": versions})  # fmt: skip
            for r in todo:
                rec = {"prompt_id": p["id"], **run_pair(model, cap, r, p["max_new_tokens"], args.check)}
                append(out_path, rec)
                status = "ok" if rec["error"] is None else rec["error"]
                if args.check:
                    status += " | check " + ("PASS" if rec["check"]["pass"] else f"FAIL ({rec['check']['reason']})")
                print(f"{p['id']} {r['id']}: {status}", file=sys.stderr)
            del cap
    if args.check:
        return print_check_table(read_done(out_path), {str(r["id"]) for r in req["runs"]})
    return 0


def print_check_table(records: list[dict[str, Any]], run_ids: set[str]) -> int:
    """Per run: prompts checked, PASS/FAIL, median real and replayed prefill seconds; 1 if any FAIL."""
    prefill = {
        (r["prompt_id"], r["attn_implementation"]): r["prefill_s"] for r in records if r["run_id"].startswith(PREFILL)
    }
    by_run: dict[str, list[dict]] = {}
    for r in records:
        if r["run_id"] in run_ids and "check" in r:
            by_run.setdefault(r["run_id"], []).append(r)
    lines = [
        "| run | press | keep | prompts | result | real prefill s | replay s | speed-up | uncompressed prefill s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed = False
    for run_id in sorted(by_run):
        recs = by_run[run_id]
        ok = all(r["check"]["pass"] for r in recs)
        failed |= not ok
        real = [r["check"]["real_prefill_s"] for r in recs if "real_prefill_s" in r["check"]]
        rep = [r["prefill_replay_s"] for r in recs if "prefill_replay_s" in r]
        full = [prefill[k] for k in ((r["prompt_id"], r["attn_implementation"]) for r in recs) if k in prefill]
        med = {k: statistics.median(v) if v else None for k, v in (("real", real), ("rep", rep), ("full", full))}
        notes = sorted({r["check"]["reason"] for r in recs if r["check"].get("reason")})
        notes += sorted({r["error"] for r in recs if r.get("error")})
        masked = [sum(r["masked_keys"]) for r in recs if r.get("masked_keys")]
        if masked:
            notes.append(f"masked key rows {statistics.median(masked):.0f}")
        lines.append(
            f"| {run_id} | {recs[0]['press']} | {recs[0]['keep']:g} | {len(recs)} | {'PASS' if ok else 'FAIL'} | "
            + " | ".join(
                "—" if x is None else f"{x:.3f}"
                for x in (med["real"], med["rep"], med["real"] / med["rep"] if med["real"] and med["rep"] else None)
            )
            + f" | {'—' if med['full'] is None else format(med['full'], '.3f')} | {'; '.join(notes).replace('|', '/')} |"
        )
    missing = sorted(run_ids - set(by_run))
    if missing:
        failed = True
        lines.append(f"\nnot checked: {', '.join(missing)}")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
