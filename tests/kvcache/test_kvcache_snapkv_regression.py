"""Issue #4 (SnapKV fails passkey at ratio 0.99 with window 32): what was checked to rule out a cache bug.

On smollm2-135m the failure is SnapKV's own scoring (kvpress's SnapKVPress evicts the same needle digits and gives
the same wrong answer; see benchmarks/kvcache/results/snapkv_parity_smollm2-135m.md). These tests pin down the cache
mechanics that could otherwise have caused it: after a dense (same count per head) SnapKV eviction, decoding the way
``longkit eval`` does (no attention mask, no positions passed) gives exactly the logits of the full cache with the
evicted entries masked per kv head — so the decode step's RoPE position, ``get_seq_length`` and the mask of the
stored slots are right — and the observation window's own tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import longkit
from conftest import sample_ids
from longkit.kvcache.snapkv import SnapKV
from longkit.registry import REGISTRIES, register

PROMPT, DECODE = 45, 5


@dataclass
class _PosSnapKV(SnapKV):
    # the "pos" track records each stored key's prompt position, so the test can read back the kept sets
    track: ClassVar[tuple[str, ...]] = ("pos",)


def _kept_positions(cache, n: int) -> list[torch.Tensor]:
    """Per layer, (1, H_kv, n) bool: which of the first ``n`` positions each kv head still stores."""
    out = []
    for layer in cache.layers:
        _, _, valid, extras = layer.padded()
        pos = extras["pos"]
        valid = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid
        mask = torch.zeros((pos.shape[0], pos.shape[1], n + DECODE), dtype=torch.bool)
        mask.scatter_(-1, torch.where(valid, pos, torch.zeros_like(pos)), valid)
        out.append(mask[..., :n])
    return out


def _masked_reference(model, ids, kept, impl):
    """Full DynamicCache, the evicted (layer, kv head, position) entries masked for the decode queries only."""

    def masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        S, T = key.shape[-2], query.shape[2]
        g = query.shape[1] // key.shape[1]
        # (1, H_kv, S) allowed keys: during prefill everything (SnapKV compresses after the prefill attention)
        allow = torch.ones((1, key.shape[1], S), dtype=torch.bool)
        if T == 1:
            allow[..., :PROMPT] = kept[module.layer_idx]
        k = key.repeat_interleave(g, 1).float()
        v = value.repeat_interleave(g, 1).float()
        # (B, H, T, S)
        w = (query.float() @ k.transpose(-1, -2)) * scaling
        causal = torch.ones((T, S), dtype=torch.bool).tril(S - T)
        w = w.masked_fill(~(allow.repeat_interleave(g, 1)[:, :, None] & causal), float("-inf"))
        return (torch.softmax(w, -1) @ v).to(query.dtype).transpose(1, 2), None

    AttentionInterface.register("_snapinv_masked", masked)
    try:
        model.set_attn_implementation("_snapinv_masked")
        with torch.inference_mode():
            dyn = DynamicCache(config=model.config)
            out = model(ids[:, :PROMPT], cache=dyn, use_cache=True)
            logits = [out.logits[:, -1:]]
            for i in range(PROMPT, PROMPT + DECODE - 1):
                logits.append(model(ids[:, i : i + 1], cache=dyn, use_cache=True).logits)
    finally:
        model.set_attn_implementation(impl)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_after_snapkv_eviction_equals_masking_the_evicted_entries(impl, dtype):
    lm = longkit.load_model("tiny-qwen2", dtype="float32" if dtype == torch.float32 else "bfloat16")
    model = lm.model
    model.set_attn_implementation(impl)
    ids = sample_ids(lm, n=PROMPT + DECODE)
    window = 7
    register("kv", "_snapinv_pos_snapkv")(_PosSnapKV)
    try:
        with torch.inference_mode(), longkit.apply(model, kv=f"_snapinv_pos_snapkv:ratio=0.6,window={window}") as ap:
            cache = ap.new_cache()
            # as greedy_generate decodes: no attention mask, no position ids, no cache positions
            out = model(ids[:, :PROMPT], cache=cache, use_cache=True)
            got = [out.logits[:, -1:]]
            for i in range(PROMPT, PROMPT + DECODE - 1):
                got.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    finally:
        REGISTRIES["kv"].unregister("_snapinv_pos_snapkv")
    got = torch.cat(got, 1)
    budget = round(0.6 * PROMPT)
    # dense storage (every head evicted the same count), true length for the positions of new tokens
    assert all(not layer.packed for layer in cache.layers)
    assert [int(n.max()) for n in cache.stored_tokens()] == [budget + DECODE - 1] * cache.num_layers
    assert cache.get_seq_length() == PROMPT + DECODE - 1
    kept = _kept_positions(cache, PROMPT)
    for layer_kept in kept:
        assert bool(layer_kept[..., PROMPT - window :].all()), "the observation window must always be kept"
        assert bool((~layer_kept).any()), "something must have been evicted for the test to mean anything"
    ref = _masked_reference(model, ids, kept, impl)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    if dtype == torch.float32:
        # and masking does matter: the uncompressed logits differ, so the comparison above can fail
        with torch.inference_mode():
            full = model(ids[:, : PROMPT + DECODE - 1]).logits[:, PROMPT - 1 :]
        assert (full - ref).abs().max() > 100 * tol["atol"]


def test_pooling_padding_does_not_favour_or_evict_the_edges_beyond_the_kernel(tiny_llama):
    """avg pooling pads with zeros (count_include_pad): only the first and last kernel//2 prefix slots are damped."""
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=PROMPT)
    window, kernel = 6, 5
    captured = {}

    @dataclass
    class _Capture(SnapKV):
        def score(self, ctx):
            s = super().score(ctx)
            captured.setdefault(ctx.layer_idx, (s, window_attention_prefix(ctx)))
            return s

    def window_attention_prefix(ctx):
        from longkit.kvcache.scores import per_kv_head, window_attention

        attn = window_attention(ctx, window)
        return per_kv_head(attn[..., : attn.shape[-1] - window].mean(2), ctx.groups)

    register("kv", "_snapinv_capture")(_Capture)
    try:
        spec = f"_snapinv_capture:ratio=0.5,window={window},kernel={kernel}"
        with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
            model(ids, cache=applied.new_cache(), use_cache=True)
    finally:
        REGISTRIES["kv"].unregister("_snapinv_capture")
    assert captured
    for scores, raw in captured.values():
        P = raw.shape[-1]
        assert torch.isinf(scores[..., P:]).all()
        # interior slots: a plain moving average of width `kernel`, computed here by hand
        half = kernel // 2
        for j in (half, P // 2, P - half - 1):
            torch.testing.assert_close(scores[..., j], raw[..., j - half : j + half + 1].mean(-1))
        # edge slots: zero padding counted, i.e. the sum of the real neighbours divided by `kernel`
        torch.testing.assert_close(scores[..., 0], raw[..., : half + 1].sum(-1) / kernel)
