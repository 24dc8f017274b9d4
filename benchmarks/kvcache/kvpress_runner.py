"""The kvpress side of the parity harness; runs under benchmarks/kvcache/.venv-kvpress (kvpress 0.5.5,
transformers < 5.3), never imports longkit.

    .venv-kvpress/bin/python kvpress_runner.py REQUEST.json OUT.json

REQUEST: {"model_dir", "prompt_ids": [...], "max_new_tokens", "runs": [{"id", "press", "keep", "kwargs"}]}.
For each run it loads the saved model, prefills the prompt inside ``with press(model)`` (kvpress compresses at the
end of prefill: the question is in the observation window) and records, per layer and KV head, the sorted prompt
positions kept, then greedy-decodes ``max_new_tokens`` tokens with explicit position ids, as kvpress's pipeline does.
Kept positions come from the press's own output: each kept key row is matched to its row in the uncompressed
keys (exact equality), so no press internals are re-implemented here. Head-wise presses (AdaKV) do not shrink the
cache; their kept set is the complement of ``module.masked_key_indices``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch


def _make_press(name: str, ratio: float, kwargs: dict):
    import kvpress as kp

    simple = {
        "snapkv": kp.SnapKVPress,
        "streaming_llm": kp.StreamingLLMPress,
        "tova": kp.TOVAPress,
        "knorm": kp.KnormPress,
        "pyramidkv": kp.PyramidKVPress,
        "expected_attention": kp.ExpectedAttentionPress,
        "observed_attention": kp.ObservedAttentionPress,
        "random": kp.RandomPress,
        "keydiff": kp.KeyDiffPress,
        "lagkv": kp.LagKVPress,
    }
    kwargs = dict(kwargs)
    if name == "adakv":
        inner = kwargs.pop("inner", "snapkv")
        inner_kwargs = kwargs.pop("inner_kwargs", {})
        return kp.AdaKVPress(press=simple[inner](compression_ratio=ratio, **inner_kwargs), **kwargs)
    if name == "none":
        return None
    return simple[name](compression_ratio=ratio, **kwargs)


def _match_rows(before: torch.Tensor, after: torch.Tensor) -> list[list[list[int]]]:
    """Positions in ``before`` (B, H_kv, S, D) of each row of ``after`` (B, H_kv, n, D), per batch and head."""
    out = []
    for b in range(before.shape[0]):
        heads = []
        for h in range(before.shape[1]):
            # (n, S): exact equality of key rows; pruning only gathers rows, so each kept row occurs in `before`
            eq = (after[b, h, :, None, :] == before[b, h, None, :, :]).all(-1)
            if not bool(eq.any(-1).all()):
                raise RuntimeError("a kept key row is not a row of the uncompressed keys (keys were modified)")
            heads.append(sorted(int(i) for i in eq.float().argmax(-1)))
        out.append(heads)
    return out


def run_one(model, prompt: torch.Tensor, press, max_new_tokens: int) -> dict:
    from transformers import DynamicCache

    kept: dict[int, list[list[int]]] = {}
    if press is not None:
        # Spy on the instance's compress (the hook calls self.compress): record what it kept, change nothing.
        inner_compress = press.compress

        def spy(module, hidden_states, keys, values, attentions, kwargs):
            new_keys, new_values = inner_compress(module, hidden_states, keys, values, attentions, kwargs)
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None and new_keys.shape == keys.shape:
                b_idx, h_idx, s_idx = (t.tolist() for t in masked)
                heads = []
                for h in range(keys.shape[1]):
                    gone = {s for bb, hh, s in zip(b_idx, h_idx, s_idx, strict=True) if bb == 0 and hh == h}
                    heads.append([s for s in range(keys.shape[2]) if s not in gone])
                kept[module.layer_idx] = heads
            else:
                kept[module.layer_idx] = _match_rows(keys, new_keys)[0]
            return new_keys, new_values

        press.compress = spy
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if press is not None:
            with press(model):
                out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        else:
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        result = {
            "kept": [kept[i] for i in sorted(kept)] if press is not None else None,
            "cache_lengths": [int(layer.keys.shape[-2]) for layer in cache.layers],
            "prefill_s": time.perf_counter() - t0,
            "answer": None,
            "decode_error": None,
        }
        try:
            result["answer"], _ = decode(model, cache, int(out.logits[0, -1].argmax()), prompt.shape[1], max_new_tokens)
        except Exception as exc:  # kept positions are still valid when decoding fails
            result["decode_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def decode(model, cache, first: int, prompt_len: int, max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens after the prompt from a filled cache, with explicit positions (the cache may be shorter than
    the prompt), as ``kvpress_runner.run_one`` and kvpress's pipeline do; and the seconds of the decoding steps."""
    tokens = [first]
    pos = prompt_len
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(max_new_tokens - 1):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
                cache_position=torch.tensor([pos]),
                use_cache=True,
            )
            tokens.append(int(out.logits[0, -1].argmax()))
            pos += 1
    return tokens, time.perf_counter() - t0


def main(request_path: str, out_path: str) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    req = json.loads(open(request_path).read())
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    prompt = torch.tensor([req["prompt_ids"]])
    models: dict[str, object] = {}
    results: list[dict] = []
    versions = {
        "kvpress": _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    for run in req["runs"]:
        attn = run.get("attn_implementation", "sdpa")
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(
                req["model_dir"], dtype=torch.float32, attn_implementation=attn
            ).eval()
        entry = {"id": run["id"], "press": run["press"], "keep": run["keep"], "kwargs": run.get("kwargs", {})}
        try:
            press = _make_press(run["press"], round(1.0 - run["keep"], 10), run.get("kwargs", {}))
            entry.update(run_one(models[attn], prompt, press, req["max_new_tokens"]))
            entry["error"] = None
        except Exception as exc:  # recorded per run: one failing press must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            entry["traceback"] = traceback.format_exc()[-2000:]
        results.append(entry)
        print(f"kvpress {entry['id']}: {'ok' if entry['error'] is None else entry['error']}", file=sys.stderr)
        # written after every run, so a caller that times out still has the finished ones
        with open(out_path, "w") as f:
            json.dump({"versions": versions, "results": results, "complete": False}, f)
    with open(out_path, "w") as f:
        json.dump({"versions": versions, "results": results, "complete": True}, f)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
