"""Does the Gemma 3 grid's prefill route for the KV rows keep each method's protocol on the real model? One full
prefill on sdpa (transformers' masked T x T path on the sliding layers: the KV methods' route before) against one
full prefill under ``attention=sliding_window`` (the sliding layers banded, no dense mask; the full-attention layers
plain sdpa under the KV method's hook: the grid's KV rows now), for SnapKV 25% and KIVI 4-bit.

Gemma 3 270M (``gemma3-270m``, bfloat16 as the grid runs it), one passkey prompt of 8,192 tokens (the passkey task's
prompt at depth 0.5, seed 0, sample 0), greedy answer of 8 tokens. Per method and route: the answer and its score,
the prefill seconds; between the routes: the next-token logits' largest absolute difference (and relative to the
largest logit), whether the greedy token is the same, and what the method kept: SnapKV's kept slots per full layer
(the fraction that is the same), KIVI's codes (the fraction equal, the largest difference in levels).

    python benchmarks/models/gemma3_kv_prefill_check.py                   # ~5 min on 2 cores; results/gemma3_kv_prefill_check.{json,md}
    python benchmarks/models/gemma3_kv_prefill_check.py --dtype float32   # ~8 min; results/gemma3_kv_prefill_check_float32.{json,md}

float32 separates the routes' arithmetic from bfloat16's rounding: there the two routes must agree to float32
rounding (logits, SnapKV's slots, KIVI's codes up to a level at a rounding boundary).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import longkit
from longkit.eval.tasks import get_task
from longkit.eval.tasks.base import TaskContext
from longkit.kvcache.quant import unpack
from longkit.runtime.chunked_prefill import chunked_prefill

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "gemma3_kv_prefill_check"
LENGTH, DEPTH, NEW_TOKENS = 8192, 0.5, 8
METHODS = {"snapkv": "kv=snapkv:ratio=0.25", "kivi": "kv=kivi:bits=4"}
#: the two prefill routes: before (plain sdpa) and the grid's KV rows now
ROUTES = {"sdpa": "", "sliding_window": "attention=sliding_window+"}


def _record_keeps(method, kept: list) -> None:
    """Record every keep mask the eviction method decides (per full-attention layer, in call order)."""
    compress = method.compress

    def recording(ctx):
        keep = compress(ctx)
        kept.append(None if keep is None else keep.clone())
        return keep

    method.compress = recording


def run(model, spec: str, ids: list[int], eos: set[int]) -> dict:
    """One prefill and greedy answer under ``spec``: the next-token logits, the answer, the prefill seconds, what the
    method kept (SnapKV's keep masks, KIVI's codes of the full-attention layers)."""
    kept: list = []
    with longkit.apply(model, spec) as applied, torch.inference_mode():
        if "snapkv" in spec:
            _record_keeps(applied.spec.kv, kept)
        cache = applied.new_cache()
        t0 = time.perf_counter()
        out = chunked_prefill(model, torch.tensor([ids]), cache, None)
        prefill_s = time.perf_counter() - t0
        logits = out.logits[0, -1].float()
        codes = [(unpack(layer.qkeys, 4), unpack(layer.qvalues, 4)) for layer in cache.layers
                 if getattr(layer, "qkeys", None) is not None]
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(out.logits[0, -1].argmax()))
            if tokens[-1] in eos:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True, logits_to_keep=1)
    return {"logits": logits, "tokens": tokens, "prefill_s": prefill_s, "kept": kept, "codes": codes}


def compare(a: dict, b: dict) -> dict:
    """What differs between the two routes of one method."""
    diff = float((a["logits"] - b["logits"]).abs().max())
    out = {"max_abs_diff": diff, "relative": diff / float(a["logits"].abs().max()),
           "same_argmax": bool(a["logits"].argmax() == b["logits"].argmax())}
    if a["kept"]:
        out["kept_same"] = [float((x == y).float().mean()) for x, y in zip(a["kept"], b["kept"], strict=True)]
        out["kept_slots"] = [int(x.sum()) for x in a["kept"]]
    if a["codes"]:
        pairs = [(x, y) for (ka, va), (kb, vb) in zip(a["codes"], b["codes"], strict=True) for x, y in ((ka, kb), (va, vb))]
        out["codes_same"] = sum(int((x == y).sum()) for x, y in pairs) / sum(x.numel() for x, _ in pairs)
        out["codes_max_level_diff"] = max(int((x.int() - y.int()).abs().max()) for x, y in pairs)
    return out


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# KV methods' prefill route on {m['model']} ({m['dtype']}): plain sdpa vs attention=sliding_window, "
             f"{m['length']} tokens", "",
             "`python benchmarks/models/gemma3_kv_prefill_check.py"
             + ("" if m["dtype"] == "bfloat16" else f" --dtype {m['dtype']}") + "`", "",
             f"torch {m['torch']}, CPU capability {m['cpu']}, {m['threads']} threads, "
             + ("under `nice -n 19` (a capped cgroup)" if m.get("niceness", 19) else "at normal priority")
             + " beside another benchmark on a shared 2-core CPU: the seconds are only comparable with each "
             f"other. One passkey prompt (depth {m['depth']}, seed 0; key {m['key']}), one full prefill by each route, "
             f"then {m['new_tokens']} greedy tokens. `sdpa`: transformers' masked T x T path on the 15 sliding layers "
             "(the KV rows' route before); `sliding_window`: `attention=sliding_window+kv=...`, the sliding layers by "
             "chunked SDPA over each query chunk's key band, no dense mask, the full-attention layers plain sdpa under "
             "the KV method's hook (the Gemma 3 grid's KV rows now).", "",
             "| method | route | answer | passkey | prefill s |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| `{r['spec']}` | {r['route']} | `{r['answer'].strip()}` | {r['score']:.0f} | {r['prefill_s']:.1f} |")
    lines += ["", "| method | next-token logits max abs diff | relative to max logit | same greedy token | same answer "
              "| what the method kept |", "|---|---|---|---|---|---|"]
    for c in data["compare"]:
        if "kept_same" in c:
            kept = ("keep masks identical in " + ", ".join(f"{x:.2%}" for x in c["kept_same"])
                    + f" of slots (3 full layers; {', '.join(map(str, c['kept_slots']))} slots kept)")
        else:
            kept = f"codes identical: {c['codes_same']:.4%}, at most {c['codes_max_level_diff']} levels apart"
        lines.append(f"| `{c['spec']}` | {c['max_abs_diff']:.3g} | {c['relative']:.3g} | "
                     f"{'yes' if c['same_argmax'] else 'no'} | {'yes' if c['same_answer'] else 'no'} | {kept} |")
    if m["dtype"] != "bfloat16":
        lines += ["", f"In {m['dtype']} the two routes differ only by the order of the band's SDPA sums against the "
                  "masked kernel's: this run shows the route itself keeps each method's protocol on the real model; "
                  "the bfloat16 run (gemma3_kv_prefill_check.md) shows how far bfloat16's rounding moves it."]
        return "\n".join(lines) + "\n"
    lines += ["", "The next-token logits come from the prefill itself, which attends to the whole uncompressed prompt "
              "(the method compresses after each full layer's attention, and KIVI quantises after the prefill): their "
              "difference is the two routes' bfloat16 rounding alone (the band's SDPA calls against the masked "
              "kernel), carried through 18 layers. The SnapKV slots and KIVI codes that differ come from the keys "
              "and values that rounding moved (near-tied scores; a KIVI key group's scale and zero follow its "
              "extremes); not investigated further here: on tiny-gemma3 in float32 both routes keep the same slots "
              "and codes exactly, in bfloat16 codes at most one level apart (tests/kvcache/"
              "test_kvcache_band_prefill.py), and a float32 run of this check would show how much of what differs here "
              "is bfloat16."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the model's dtype (bfloat16: as the grid runs it; float32: the routes' arithmetic alone)")
    dtype = parser.parse_args().dtype
    name = NAME if dtype == "bfloat16" else f"{NAME}_{dtype}"
    lm = longkit.load_model("gemma3-270m", dtype=dtype)
    model = lm.model.eval()
    task = get_task("passkey")
    sample = task.build(TaskContext(lm.tokenizer, seed=0), LENGTH, DEPTH, 0)
    ids = sample.prompt.input_ids
    tok = lm.tokenizer
    eos = {i for i in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if i is not None}
    eos = {j for i in eos for j in (i if isinstance(i, list) else [i])}
    rows, comparisons = [], []
    for spec in METHODS.values():
        runs = {}
        for route, prefix in ROUTES.items():
            runs[route] = r = run(model, prefix + spec, ids, eos)
            answer = tok.decode(r["tokens"], skip_special_tokens=True)
            rows.append({"spec": spec, "route": route, "answer": answer, "score": task.score(answer, sample.answers),
                         "prefill_s": r["prefill_s"], "tokens": r["tokens"]})
            print(json.dumps(rows[-1]), flush=True)
        comparisons.append({"spec": spec, **compare(runs["sdpa"], runs["sliding_window"]),
                            "same_answer": runs["sdpa"]["tokens"] == runs["sliding_window"]["tokens"]})
        print(json.dumps(comparisons[-1]), flush=True)
    meta = {"model": "gemma3-270m", "dtype": dtype, "length": len(ids), "depth": DEPTH, "key": sample.answers[0],
            "new_tokens": NEW_TOKENS, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "niceness": os.nice(0)}
    data = {"meta": meta, "rows": rows, "compare": comparisons}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
