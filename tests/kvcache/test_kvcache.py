"""KV-cache eviction room: every registered eviction method through the seam, the cache storage, the scorers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import longkit
from conftest import run_kv, sample_ids
from longkit.errors import MethodError
from longkit.kvcache import CompressedCache, CompressionMethod, cache_nbytes
from longkit.kvcache.budget import keep_layerwide, keep_topk, pyramid_budgets
from longkit.kvcache.snapkv import SnapKV
from longkit.registry import REGISTRIES, register
from longkit.rope.rotation import rotate_by
from longkit.runtime import compress_context

EVICTION = sorted(n for n in REGISTRIES["kv"].names() if issubclass(REGISTRIES["kv"].get(n), CompressionMethod))


def _reference(model, ids, n_decode=3, mask=None):
    with torch.inference_mode():
        full = model(ids, attention_mask=mask).logits
    T = ids.shape[1] - n_decode
    return full[:, T - 1 :]


def _kv_bytes(cache: CompressedCache) -> int:
    """What nbytes() must be: stored keys + values, plus per-head lengths of packed layers, plus tracked extras."""
    total = 0
    for layer in cache.layers:
        lengths = layer.stored_lengths()
        n = int(lengths.sum())
        D = layer.keys.shape[-1]
        total += 2 * n * D * layer.keys.element_size()
        if layer.packed:
            total += lengths.numel() * 8
        total += n * sum(t.element_size() for t in layer.extras.values())
    return total


# ---- keep everything = the uncompressed model ---------------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTION)
def test_keep_everything_reproduces_uncompressed_logits_exactly(tiny_llama, name):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=45)
    got, cache = run_kv(model, f"{name}:ratio=1.0", ids)
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        out = model(ids[:, :42], cache=dyn, use_cache=True)
        ref = [out.logits[:, -1:]] + [model(ids[:, i : i + 1], cache=dyn, use_cache=True).logits for i in range(42, 45)]
    assert torch.equal(got, torch.cat(ref, 1))
    assert cache.get_seq_length() == 45 and all(int(n.min()) == 45 for n in cache.stored_tokens())
    # tracked per-key extras: StreamingLLM's positions (int64), H2O's attention sums (float32)
    per_key = {"streaming_llm": 8, "h2o": 4, "scissorhands": 4}.get(name, 0)
    assert cache_nbytes(cache) == cache_nbytes(dyn) + per_key * 45 * 2 * 2


@pytest.mark.parametrize("name", ["snapkv", "knorm", "adakv"])
def test_budget_above_the_context_keeps_everything_through_the_selection_path(tiny_llama, name):
    # tokens >= the context goes through scoring, selection and compaction (own masks) and must change nothing.
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=45)
    got, cache = run_kv(model, f"{name}:tokens=500", ids)
    assert not any(layer.compacted for layer in cache.layers)
    torch.testing.assert_close(got, _reference(model, ids), rtol=1e-4, atol=1e-5)


# ---- budgets, bytes, decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTION)
def test_budget_is_honoured_bytes_drop_and_decoding_runs(tiny_llama, name):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=67)
    got, cache = run_kv(model, f"{name}:ratio=0.25", ids, n_decode=3)
    assert torch.isfinite(got).all()
    per_layer = [int(n.sum()) for n in cache.stored_tokens()]
    H_kv = model.config.num_key_value_heads
    # after prefill each head holds round(0.25 * 64) = 16 (per-layer mean for pyramidkv, per-layer sum for adakv);
    # decoding appends one token per step, unless the method evicts while decoding: round(0.25 * 67) = 17
    k = 17 if REGISTRIES["kv"].get(name)().decode_every else 16 + 3
    assert sum(per_layer) == len(per_layer) * H_kv * k
    if name not in ("pyramidkv", "adakv"):
        assert per_layer == [H_kv * k] * len(per_layer)
    assert cache.get_seq_length() == 67
    assert cache_nbytes(cache) == _kv_bytes(cache)
    full_bytes = 2 * 2 * 67 * H_kv * 16 * 4  # layers x (k, v) x tokens x heads x head_dim x fp32
    assert cache_nbytes(cache) < 0.35 * full_bytes


def test_pyramidkv_budgets_fall_with_depth_and_average_the_uniform_budget():
    b = pyramid_budgets(40.0, 5, beta=4.0)
    assert b[0] == pytest.approx(70.0) and b[-1] == pytest.approx(10.0)
    assert sum(b) / 5 == pytest.approx(40.0)
    assert all(x > y for x, y in zip(b, b[1:], strict=False))


def test_pyramidkv_per_layer_counts(tiny_llama):
    ids = sample_ids(tiny_llama, n=64)
    _, cache = run_kv(tiny_llama.model, "pyramidkv:tokens=24,window=4,beta=2", ids, n_decode=0)
    # beyond the window: k=20 -> layers [30, 10] (beta 2), plus the window of 4
    assert [int(n.flatten()[0]) for n in cache.stored_tokens()] == [34, 14]


def test_adakv_layerwide_topk_with_safeguard():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0], [0.5, 0.4, 0.3, 0.2, 0.1]]])
    k = torch.tensor([3])
    keep = keep_layerwide(scores, k, alpha=0.0)
    # 6 tokens for the layer, all from the first head except what it cannot hold
    assert keep.sum().item() == 6 and keep[0, 0].all() and keep[0, 1].tolist() == [True, False, False, False, False]
    keep = keep_layerwide(scores, k, alpha=0.67)
    # the safeguard gives head 1 floor(0.67 * 3) = 2 tokens
    assert keep[0, 1].tolist() == [True, True, False, False, False] and keep.sum().item() == 6
    # per-head top-k for comparison
    assert keep_topk(scores, 3).sum(-1).tolist() == [[3, 3]]


def test_adakv_stores_ragged_heads_and_frees_their_bytes(tiny_llama):
    ids = sample_ids(tiny_llama, n=64)
    _, cache = run_kv(tiny_llama.model, "adakv:tokens=16,alpha=0.1", ids, n_decode=0)
    lengths = cache.stored_tokens()
    assert any(layer.packed for layer in cache.layers), "expected different budgets per head"
    for layer, n in zip(cache.layers, lengths, strict=True):
        assert int(n.sum()) == 2 * 16 and int(n.min()) >= 1
        if layer.packed:
            # packed rows: exactly the kept tokens, no padding
            assert layer.keys.shape == (int(n.sum()), 16)
    assert cache_nbytes(cache) == _kv_bytes(cache)


# ---- ragged storage = masking the evicted entries of a full cache -------------------------------------------------


@dataclass
class _TrackedAdaKV(CompressionMethod):
    """Ada-KV over K-norm scores, tracking positions, so the test knows what each head kept."""

    paper = "Test (no paper) http://example.invalid"
    track: ClassVar[tuple[str, ...]] = ("pos",)

    def score(self, ctx):
        return -ctx.keys.float().norm(dim=-1)

    def select(self, ctx, scores):
        return keep_layerwide(scores, torch.full((scores.shape[0],), 12), alpha=0.0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_cache_equals_masking_the_evicted_entries(impl, dtype):
    lm = longkit.load_model("tiny-qwen2", dtype="float32" if dtype == torch.float32 else "bfloat16")
    model = lm.model
    model.set_attn_implementation(impl)
    ids = sample_ids(lm, n=41)
    register("kv", "_tracked_adakv")(_TrackedAdaKV)
    try:
        got, cache = run_kv(model, "_tracked_adakv", ids, n_decode=4)
    finally:
        REGISTRIES["kv"].unregister("_tracked_adakv")
    assert any(layer.packed for layer in cache.layers)
    # kept[layer]: (B, H_kv, S) bool over the 37 prompt positions
    kept = []
    for layer in cache.layers:
        _, _, valid, extras = layer.padded()
        pos = extras["pos"]
        valid = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid
        mask = torch.zeros((1, pos.shape[1], 41), dtype=torch.bool)
        mask.scatter_(-1, torch.where(valid, pos, torch.zeros_like(pos)), valid)
        kept.append(mask[..., :37])

    def masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # full cache, evicted entries masked per kv head: what "fake" compression computes
        S = key.shape[-2]
        allow = torch.ones((1, key.shape[1], S), dtype=torch.bool)
        if S > 37:
            allow[..., :37] = kept[module.layer_idx]
        g = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(g, 1).float()
        v = value.repeat_interleave(g, 1).float()
        w = (query.float() @ k.transpose(-1, -2)) * scaling
        causal = torch.ones((query.shape[2], S), dtype=torch.bool).tril(S - query.shape[2])
        w = w.masked_fill(~(allow.repeat_interleave(g, 1)[:, :, None] & causal), float("-inf"))
        return (torch.softmax(w, -1) @ v).to(query.dtype).transpose(1, 2), None

    AttentionInterface.register("_test_masked", masked)
    try:
        model.set_attn_implementation("_test_masked")
        with torch.inference_mode():
            dyn = DynamicCache(config=model.config)
            out = model(ids[:, :37], cache=dyn, use_cache=True)
            ref = [out.logits[:, -1:]] + [
                model(ids[:, i : i + 1], cache=dyn, use_cache=True).logits for i in range(37, 41)
            ]
    finally:
        model.set_attn_implementation(impl)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), torch.cat(ref, 1).float(), **tol)


# ---- SnapKV against a plain reference -----------------------------------------------------------------------------


@dataclass
class _TrackedSnapKV(SnapKV):
    track: ClassVar[tuple[str, ...]] = ("pos",)


def test_snapkv_keeps_what_explicit_window_attention_selects(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=53)
    window, kernel, k = 6, 3, 20
    register("kv", "_tracked_snapkv")(_TrackedSnapKV)
    try:
        _, cache = run_kv(model, f"_tracked_snapkv:tokens={k},window={window},kernel={kernel}", ids, n_decode=0)
    finally:
        REGISTRIES["kv"].unregister("_tracked_snapkv")
    with torch.inference_mode(), longkit.apply(model, attention="eager"):
        # (B, H, T, T) attention probabilities of every layer, from the model itself
        attentions = model(ids, output_attentions=True).attentions
    H_kv = model.config.num_key_value_heads
    for layer_idx, attn in enumerate(attentions):
        T = attn.shape[-1]
        # mean over the window queries of the attention to the tokens before the window, avg-pooled, GQA-averaged
        s = attn[0, :, -window:, : T - window].float().mean(1)
        s = torch.nn.functional.avg_pool1d(s[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        s = s.view(H_kv, -1, T - window).mean(1)
        top = s.topk(k - window, dim=-1).indices
        for h in range(H_kv):
            expected = sorted(top[h].tolist() + list(range(T - window, T)))
            got = sorted(cache.layers[layer_idx].extras["pos"][0, h].tolist())
            assert got == expected, (layer_idx, h)


# ---- StreamingLLM -------------------------------------------------------------------------------------------------


def test_rotate_by_equals_rotating_at_the_new_position(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = tiny_llama.model.model.rotary_emb
    k = torch.randn(1, 2, 5, 16)
    old = torch.tensor([[3, 9, 17, 40, 41]])
    new = torch.tensor([[0, 1, 38, 39, 41]])
    cos, sin = rotary(k, old)
    k_old = apply_rotary_pos_emb(k, k, cos, sin)[1]
    cos, sin = rotary(k, new)
    k_new = apply_rotary_pos_emb(k, k, cos, sin)[1]
    moved = rotate_by(k_old, old[:, None].expand(1, 2, 5), new[:, None].expand(1, 2, 5), rotary.inv_freq)
    torch.testing.assert_close(moved, k_new, rtol=1e-5, atol=1e-5)


def test_streaming_llm_keeps_sinks_and_recent_tokens_at_rolled_positions(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    _, cache = run_kv(model, "streaming_llm:tokens=10,sink=2", ids, n_decode=4)
    layer = cache.layers[0]
    kept = [0, 1] + list(range(32, 40))
    assert layer.keys.shape[-2] == 10 and cache.get_seq_length() == 40
    # layer 0 keys depend on the token and its position only: recompute them at the rolled positions 30..39
    attn = model.model.layers[0].self_attn
    with torch.inference_mode():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, kept]))
        k = attn.k_proj(h).view(1, 10, -1, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(k, torch.arange(30, 40)[None])
        k = apply_rotary_pos_emb(k, k, cos, sin)[1]
    torch.testing.assert_close(layer.keys, k, rtol=1e-4, atol=1e-5)
    assert layer.extras["pos"][0, 0].tolist() == list(range(30, 40))


# ---- generate, batches, models ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["snapkv:ratio=0.5,window=4", "adakv:ratio=0.4,scorer=knorm", "tova:tokens=12", "expected_attention:ratio=0.5"],
)
def test_generate_greedy_batch_with_left_padding_matches_each_row_alone(tiny_llama, spec):
    model = tiny_llama.model
    a = sample_ids(tiny_llama, n=30, seed=1)
    b = sample_ids(tiny_llama, n=22, seed=2)
    pad = model.config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 8), pad), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        both = model.generate(batch, attention_mask=mask, cache=applied.new_cache(), **kw)
        alone = [model.generate(x, attention_mask=torch.ones_like(x), cache=applied.new_cache(), **kw) for x in (a, b)]
    for row, single in enumerate(alone):
        assert both.sequences[row, -6:].tolist() == single.sequences[0, -6:].tolist()
        for s_both, s_one in zip(both.scores, single.scores, strict=True):
            torch.testing.assert_close(s_both[row], s_one[0], rtol=1e-4, atol=1e-4)


def test_generate_with_sampling_and_several_sequences(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=33)
    with torch.inference_mode(), longkit.apply(model, kv="snapkv:ratio=0.3,window=4") as applied:
        cache = applied.new_cache()
        torch.manual_seed(0)
        out = model.generate(ids, cache=cache, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2)
    assert out.shape == (2, 38)
    # round(0.3 * 33) = 10 after the prompt, plus the 4 decoded tokens fed back
    assert [int(n.max()) for n in cache.stored_tokens()] == [14, 14]


@pytest.mark.parametrize(
    "spec",
    ["snapkv:ratio=0.25,window=4", "adakv:ratio=0.25", "streaming_llm:tokens=12", "expected_attention:ratio=0.25"],
)
def test_every_tiny_model_family(any_tiny, spec):
    ids = sample_ids(any_tiny, n=43)
    got, cache = run_kv(any_tiny.model, spec, ids, n_decode=3)
    assert torch.isfinite(got).all()
    assert cache.get_seq_length() == 43
    assert cache_nbytes(cache) == _kv_bytes(cache)


# ---- chunked prefill with compression, query-agnostic reuse --------------------------------------------------------


def test_chunked_prefill_keeps_the_cache_within_budget_plus_chunk(tiny_llama):
    from longkit.runtime.chunked_prefill import chunked_prefill

    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=150)
    sizes = []
    attn = model.model.layers[1].self_attn
    with torch.inference_mode(), longkit.apply(model, kv="snapkv:tokens=24,window=4") as applied:
        cache = applied.new_cache()
        # what layer 1 holds when each chunk's attention runs: stored + the chunk
        handle = attn.register_forward_pre_hook(
            lambda m, a, kw: sizes.append(cache.layers[1].max_length() + kw["hidden_states"].shape[1]), with_kwargs=True
        )
        try:
            out = chunked_prefill(model, ids, cache, chunk_size=16)
        finally:
            handle.remove()
    assert len(sizes) == 10 and max(sizes) <= 24 + 16
    assert [int(n.max()) for n in cache.stored_tokens()] == [24, 24]
    assert cache.get_seq_length() == 150 and torch.isfinite(out.logits).all()


def test_greedy_generate_with_prefill_chunks_and_compression(tiny_llama):
    from longkit.runtime.generate import greedy_generate

    ids = sample_ids(tiny_llama, n=120)[0].tolist()
    with longkit.apply(tiny_llama.model, kv="knorm:tokens=32") as applied:
        gen = greedy_generate(tiny_llama.model, ids, 5, applied.new_cache(), set(), prefill_chunk=20)
    assert len(gen.tokens) == 5 and gen.kv_bytes == 2 * 2 * 2 * 32 * 16 * 4


def test_compress_context_once_then_ask_many_questions(tiny_llama):
    model = tiny_llama.model
    context = sample_ids(tiny_llama, n=80)
    cache = compress_context(model, context, "knorm:tokens=20")
    assert cache.compressing is False and cache.get_seq_length() == 80
    before = cache_nbytes(cache)
    answers = []
    with torch.inference_mode(), longkit.apply(model, kv=cache.method):
        for seed in (1, 2, 1):
            q = sample_ids(tiny_llama, n=6, seed=seed)
            copy = cache.copy()
            answers.append(model(q, cache=copy, use_cache=True).logits)
            # the question is appended, not compressed
            assert copy.get_seq_length() == 86 and [int(n.max()) for n in copy.stored_tokens()] == [26, 26]
    assert cache_nbytes(cache) == before and cache.get_seq_length() == 80
    assert torch.equal(answers[0], answers[2]) and not torch.allclose(answers[0], answers[1])


def test_compress_context_with_quantised_eviction(tiny_llama):
    """KIVI composed with an eviction method compresses a context once too (it has no ``tokens`` budget itself)."""
    model = tiny_llama.model
    context = sample_ids(tiny_llama, n=80)
    cache = compress_context(model, context, "kivi:evict=snapkv,ratio=0.25,group_size=8,residual=8")
    assert cache.compressing is False and cache.get_seq_length() == 80
    assert [int(n.max()) for n in cache.stored_tokens()] == [20, 20]


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,match",
    [
        ("snapkv:ratio=0", "'ratio' must be > 0.0 and <= 1.0"),
        ("knorm:ratio=1.5", "'ratio' must be > 0.0 and <= 1.0"),
        ("tova:tokens=0", "'tokens' must be >= 1"),
        ("snapkv:kernel=4", "'kernel' must be odd"),
        ("snapkv:pooling=median", "'pooling' must be one of"),
        ("adakv:scorer=nope", "'scorer' must be one of"),
        ("pyramidkv:beta=1", "'beta' must be > 1.0"),
        ("streaming_llm:decode_every=-1", "'decode_every' must be >= 0"),
    ],
)
def test_bad_parameters_are_clear_errors(tiny_llama, spec, match):
    with pytest.raises(MethodError, match=match):
        longkit.apply(tiny_llama.model, kv=spec)


def test_budget_larger_than_the_context_is_an_error_for_compress_context(tiny_llama):
    with pytest.raises(MethodError, match="'tokens' must be <= the context length 10"):
        compress_context(tiny_llama.model, sample_ids(tiny_llama, n=10), "knorm:tokens=11")


def test_attention_implementation_that_cannot_be_wrapped_is_an_error(tiny_llama):
    with pytest.raises(MethodError, match="attention implementation to be one of sdpa, eager"):
        longkit.apply(tiny_llama.model, "attention=blockwise+kv=snapkv")
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_compressed_cache_without_its_method_is_an_error(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    with torch.inference_mode():
        with longkit.apply(model, kv="knorm:ratio=0.5") as applied:
            cache = applied.new_cache()
            model(ids, cache=cache, use_cache=True)
        with pytest.raises(MethodError, match="must be used with its KV method applied"):
            model(ids[:, :1], cache=cache, use_cache=True)


def test_attention_module_that_drops_its_keyword_arguments_is_an_error(tiny_llama):
    # The cache reaches the attention function through the module's keyword arguments; a model whose attention
    # module did not pass them on would otherwise run uncompressed without a word.
    from longkit.kvcache.hook import CACHE_KWARG

    model = tiny_llama.model
    drop = lambda module, args, kwargs: (args, {k: v for k, v in kwargs.items() if k != CACHE_KWARG})  # noqa: E731
    with longkit.apply(model, kv="knorm:ratio=0.5") as applied:
        handles = [m.register_forward_pre_hook(drop, with_kwargs=True) for m in model.modules() if hasattr(m, "layer_idx")]
        try:
            with pytest.raises(MethodError, match="does not pass its keyword arguments"):
                model(sample_ids(tiny_llama, n=20), cache=applied.new_cache(), use_cache=True)
        finally:
            for h in handles:
                h.remove()


# ---- H2O ----------------------------------------------------------------------------------------------------------


def test_h2o_accumulates_the_attention_every_query_paid(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    # keep everything: the sums then cover all 30 tokens and can be checked against the model's attentions
    _, cache = run_kv(model, "h2o:tokens=100", ids, n_decode=2)
    with torch.inference_mode(), longkit.apply(model, attention="eager"):
        attentions = model(ids, output_attentions=True).attentions
    H_kv = model.config.num_key_value_heads
    for layer, attn in zip(cache.layers, attentions, strict=True):
        # (B, H, T, S) -> summed over queries and over the query heads of each kv head
        expected = attn.float().sum(2).view(1, H_kv, -1, 30).sum(2)
        torch.testing.assert_close(layer.extras["acc"], expected, rtol=1e-4, atol=1e-4)


def test_h2o_accumulation_in_query_chunks(tiny_llama, monkeypatch):
    """The prefill's column sums are computed in query chunks that skip the keys no query of the chunk sees; with
    chunks of 7 over 30 tokens they must equal the one-chunk sums."""
    import longkit.kvcache.h2o as h2o

    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    _, whole = run_kv(model, "h2o:tokens=100", ids, n_decode=0)
    monkeypatch.setattr(h2o, "_QUERY_CHUNK", 7)
    _, chunked = run_kv(model, "h2o:tokens=100", ids, n_decode=0)
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        torch.testing.assert_close(b.extras["acc"], a.extras["acc"], rtol=1e-5, atol=1e-6)


def test_h2o_keeps_heavy_hitters_and_recent_tokens(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    _, full = run_kv(model, "h2o:tokens=100", ids, n_decode=0)
    _, cache = run_kv(model, "h2o:tokens=12,recent=0.25", ids, n_decode=0)
    for layer_full, layer in zip(full.layers, cache.layers, strict=True):
        acc = layer_full.extras["acc"][0]
        for h in range(acc.shape[0]):
            heavy = acc[h, :37].topk(9).indices.tolist()
            expected = sorted(heavy + [37, 38, 39])
            kept = torch.isin(acc[h], layer.extras["acc"][0, h]).nonzero().flatten().tolist()
            assert kept == expected


def test_scissorhands_counts_the_queries_for_which_a_token_was_unimportant(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    _, cache = run_kv(model, "scissorhands:tokens=100,history=8", ids, n_decode=0)
    with torch.inference_mode(), longkit.apply(model, attention="eager"):
        attentions = model(ids, output_attentions=True).attentions
    H_kv = model.config.num_key_value_heads
    for layer, attn in zip(cache.layers, attentions, strict=True):
        # the last 8 queries vote; query t sees t + 1 tokens, so its uniform share is 1 / (t + 1)
        a = attn[0, :, -8:].float().view(H_kv, -1, 8, 30).mean(1)
        t = torch.arange(22, 30)
        low = (a < 1.0 / (t + 1)[:, None]) & (torch.arange(30)[None, :] <= t[:, None])
        assert torch.equal(layer.extras["acc"][0], low.sum(1).float())


def test_all_sliding_window_models_are_refused():
    from transformers import MistralConfig

    from longkit.kvcache.cache import CompressedCache

    config = MistralConfig(sliding_window=16, num_hidden_layers=2)
    # every layer is already bounded by its window: nothing to compress, said so
    with pytest.raises(MethodError, match="every layer of this model is a sliding-window layer"):
        CompressedCache(config, REGISTRIES["kv"].create("snapkv"))


def test_periodic_eviction_keeps_decoding_at_the_budget(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    sizes = []
    with torch.inference_mode(), longkit.apply(model, kv="knorm:tokens=8,decode_every=2") as applied:
        cache = applied.new_cache()
        model(ids[:, :20], cache=cache, use_cache=True)
        for i in range(20, 30):
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
            sizes.append(int(cache.stored_tokens()[0].max()))
    # evicted back to 8 every second step, one token above it in between
    assert sizes == [9, 8] * 5
    assert cache.get_seq_length() == 30


def test_threshold_budget_keeps_every_score_above_it_per_head(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    _, full = run_kv(model, "h2o:tokens=100", ids, n_decode=0)
    _, cache = run_kv(model, "h2o:threshold=1.5,recent=0", ids, n_decode=0)
    for layer_full, layer in zip(full.layers, cache.layers, strict=True):
        expected = (layer_full.extras["acc"][0] >= 1.5).sum(-1)
        assert layer.stored_lengths()[0].tolist() == expected.tolist()


def test_adakv_scorer_args_reach_the_scorer(tiny_llama):
    """With alpha=1 every head keeps exactly its own top-k, so adakv over snapkv(window=4) must keep what
    snapkv:window=4 keeps, and differ from the scorer at its default window."""
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=60)
    _, wrapped = run_kv(model, "adakv:ratio=0.3,alpha=1,scorer=snapkv,scorer_args=window=4;kernel=3", ids, n_decode=0)
    _, plain = run_kv(model, "snapkv:ratio=0.3,window=4,kernel=3", ids, n_decode=0)
    _, default = run_kv(model, "snapkv:ratio=0.3", ids, n_decode=0)

    def kept(cache):
        return [torch.sort(layer.padded()[0].sum(-1), dim=-1).values for layer in cache.layers]

    assert all(torch.allclose(a, b) for a, b in zip(kept(wrapped), kept(plain), strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(kept(wrapped), kept(default), strict=True))


@pytest.mark.parametrize(
    "args,match",
    [
        ("ratio=0.5", "cannot set the budget parameter 'ratio'"),
        ("window", "must be 'key=value;key=value'"),
        ("nope=1", "'scorer_args': kv method 'snapkv' has no parameter 'nope'"),
        ("window=0", "'scorer_args': kv method 'snapkv': parameter 'window' must be >= 1"),
    ],
)
def test_adakv_bad_scorer_args(tiny_llama, args, match):
    with pytest.raises(MethodError, match=match):
        longkit.apply(tiny_llama.model, kv=f"adakv:scorer_args={args}")
