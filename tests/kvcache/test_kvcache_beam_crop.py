"""Compressed caches in generate's other modes: beam search (reorder_cache) and cropping (assisted decoding).

Beam search moves whole rows of the cache between beams: the per-head ragged storage, its per-slot extras and the
per-sequence ``real_seen`` must move together. The reference is a beam search in which every beam owns an
independent cache (a copy of its parent's, then its own token), which is what reordering must be equivalent to.

``crop(-n)`` removes the newest ``n`` tokens of every head: it must give what feeding only the kept tokens gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.errors import MethodError

STEPS = 5


def _batch(lm, pad_left: int = 8):
    """Two prompts (30 and 22 tokens), the second left-padded: ids, mask, and each prompt alone."""
    a, b = sample_ids(lm, n=30, seed=1), sample_ids(lm, n=22, seed=2)
    pad = lm.model.config.pad_token_id
    ids = torch.cat([a, torch.cat([torch.full((1, pad_left), pad), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad_left] = 0
    return ids, mask, (a, b)


def _beam_generate(model, ids, mask, cache):
    kw = dict(num_beams=3, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return model.generate(ids, attention_mask=mask, cache=cache, return_dict_in_generate=True, output_scores=True, **kw)


def _reference_beam_search(model, spec, prompt, num_beams=3):
    """Beam search over ``STEPS`` tokens where every beam has its own cache: (best tokens, best sum of log-probs).

    As transformers' beam search with no finished beam (EOS is masked, as min_new_tokens does): keep the
    ``num_beams`` best (beam, token) continuations by accumulated log-probability; all end at the same length.
    """
    eos = model.config.eos_token_id
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        logits = model(prompt, cache=cache, use_cache=True).logits[0, -1]
        beams = [([], torch.tensor(0.0), cache, logits)]
        for step in range(STEPS):
            # (beams, V) accumulated log-probabilities of every continuation
            logp = torch.stack([torch.log_softmax(b[3].float(), -1) for b in beams])
            logp[:, eos] = float("-inf")
            total = torch.stack([b[1] for b in beams])[:, None] + logp
            top = torch.topk(total.flatten(), num_beams).indices
            chosen = [(int(i) // total.shape[1], int(i) % total.shape[1]) for i in top]
            if step == STEPS - 1:
                parent, token = chosen[0]
                return beams[parent][0] + [token], float(total[parent, token])
            nxt = []
            for parent, token in chosen:
                own = beams[parent][2].copy()
                out = model(torch.tensor([[token]]), cache=own, use_cache=True).logits[0, -1]
                nxt.append((beams[parent][0] + [token], total[parent, token], own, out))
            beams = nxt


@pytest.mark.parametrize("lm_name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("spec", ["snapkv:ratio=1.0", "streaming_llm:ratio=1.0", "h2o:ratio=1.0"])
def test_beam_search_keeping_everything_gives_the_beams_of_a_dynamic_cache(request, lm_name, spec):
    lm = request.getfixturevalue(lm_name)
    model = lm.model
    ids, mask, _ = _batch(lm)
    with torch.inference_mode():
        ref = _beam_generate(model, ids, mask, DynamicCache(config=model.config))
        with longkit.apply(model, kv=spec) as applied:
            cache = applied.new_cache()
            got = _beam_generate(model, ids, mask, cache)
    assert got.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    # 3 beams per prompt; the padded prompt's padding was dropped at prefill; extras moved with their rows
    assert cache.real_seen.tolist() == [30 + STEPS - 1] * 3 + [22 + STEPS - 1] * 3
    for layer in cache.layers:
        assert layer.stored_lengths()[:, 0].tolist() == cache.real_seen.tolist()
        for t in layer.extras.values():
            assert t.shape[0] == int(layer.stored_lengths().sum())


@pytest.mark.parametrize(
    "lm_name,spec",
    [
        ("tiny_llama", "adakv:ratio=0.5,decode_every=2"),
        ("tiny_qwen2", "adakv:ratio=0.5,decode_every=2"),
        ("tiny_qwen2", "streaming_llm:ratio=0.5"),
        ("tiny_llama", "kivi:bits=4,group_size=8,residual=4,evict=adakv,ratio=0.5"),
    ],
)
def test_beam_search_with_compression_equals_a_cache_per_beam(request, lm_name, spec):
    # decode_every=2 (adakv) and 1 (streaming_llm) evict while decoding: reordered rows carry their own history
    lm = request.getfixturevalue(lm_name)
    model = lm.model
    ids, mask, prompts = _batch(lm)
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        got = _beam_generate(model, ids, mask, cache)
    for row, prompt in enumerate(prompts):
        tokens, score = _reference_beam_search(model, spec, prompt)
        assert got.sequences[row, -STEPS:].tolist() == tokens
        # transformers divides by the generated length (length_penalty=1)
        assert float(got.sequences_scores[row]) == pytest.approx(score / STEPS, abs=1e-4)
    H_kv = model.config.num_key_value_heads
    for layer in cache.layers:
        lengths = layer.stored_lengths()
        for row, n in enumerate(cache.real_seen.tolist()):
            if spec.startswith("adakv"):
                # compressed at decoding steps 2 and 4 to round(0.5 * (prompt + 4)) per head on average, then one more
                assert int(lengths[row].sum()) == H_kv * (round(0.5 * (n - 1)) + 1)
            elif spec.startswith("streaming_llm"):
                assert lengths[row].tolist() == [round(0.5 * n)] * H_kv
            else:
                # evicted once after prefill (KIVI's eviction is one-shot), then every decoded token appended
                assert int(lengths[row].sum()) == H_kv * (round(0.5 * (n - STEPS + 1)) + STEPS - 1)


# ---- crop ------------------------------------------------------------------------------------------------------------


def _feed(model, cache, ids, mask, start, end):
    """Feed ``ids[:, start:end]`` one token at a time (the prompt in one forward when start == 0); last logits."""
    if start == 0:
        return model(ids[:, :end], attention_mask=mask[:, :end], cache=cache, use_cache=True).logits[:, -1]
    out = None
    for i in range(start, end):
        out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache, use_cache=True).logits[:, -1]
    return out


def _state(cache):
    out = []
    for layer in cache.layers:
        keys, values, valid, extras = layer.padded()
        out.append((layer.stored_lengths(), keys, values, valid, extras, layer.seen))
    return out, cache.real_seen, cache.nbytes()


def _assert_same_state(a, b):
    (layers_a, seen_a, bytes_a), (layers_b, seen_b, bytes_b) = a, b
    assert torch.equal(seen_a, seen_b) and bytes_a == bytes_b
    for (la, ka, va, ma, ea, sa), (lb, kb, vb, mb, eb, sb) in zip(layers_a, layers_b, strict=True):
        assert torch.equal(la, lb) and sa == sb
        assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma, mb))
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[n], eb[n]) for n in ea)


@pytest.mark.parametrize(
    "spec",
    [
        "snapkv:ratio=1.0",
        "adakv:ratio=0.5",
        "streaming_llm:ratio=0.5,decode_every=0",
        "kivi:bits=2,group_size=4,residual=64,evict=adakv,ratio=0.5",
    ],
)
def test_crop_gives_what_feeding_fewer_tokens_gives(tiny_llama, spec):
    model = tiny_llama.model
    ids, mask, _ = _batch(tiny_llama)
    ids = torch.cat([ids, torch.cat([sample_ids(tiny_llama, n=5, seed=s) for s in (7, 8)])], 1)
    mask = torch.cat([mask, torch.ones((2, 5), dtype=mask.dtype)], 1)
    P = 30
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cropped = applied.new_cache()
        _feed(model, cropped, ids, mask, 0, P)
        _feed(model, cropped, ids, mask, P, P + 5)
        assert cropped.is_croppable
        if spec.startswith("adakv"):
            # per-head budgets: the tokens to remove are the last rows of every head of packed storage
            assert all(layer.packed for layer in cropped.layers)
        cropped.crop(-3)
        fresh = applied.new_cache()
        _feed(model, fresh, ids, mask, 0, P)
        _feed(model, fresh, ids, mask, P, P + 2)
        _assert_same_state(_state(cropped), _state(fresh))
        # and the next token sees the same cache at the same position
        assert cropped.get_seq_length() == fresh.get_seq_length() == P + 2
        nxt = _feed(model, cropped, ids, mask, P + 2, P + 3)
        assert torch.equal(nxt, _feed(model, fresh, ids, mask, P + 2, P + 3))


def test_crop_refuses_tokens_that_some_head_evicted_and_changes_nothing(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40, seed=3)
    # knorm keeps the keys of smallest norm: with 4 tokens kept per head, some head drops one of the newest
    with torch.inference_mode(), longkit.apply(model, kv="knorm:tokens=4") as applied:
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        tail = min(layer.tail for layer in cache.layers)
        assert tail < 4
        before = _state(cache)
        with pytest.raises(MethodError, match=rf"'tokens_to_remove' must be in \[-{tail}, 0\]"):
            cache.crop(-(tail + 1))
        _assert_same_state(_state(cache), before)
        with pytest.raises(MethodError, match=r"'tokens_to_remove' must be <= 0"):
            cache.crop(3)
        # decoding appends to every head: those tokens can be removed again
        model(sample_ids(tiny_llama, n=1, seed=4), cache=cache, use_cache=True)
        cache.crop(-1)
        _assert_same_state(_state(cache), before)


def test_crop_refuses_accumulated_attention_and_quantised_tokens(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40, seed=5)
    with torch.inference_mode(), longkit.apply(model, kv="h2o:ratio=0.5") as applied:
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        assert not cache.is_croppable
        cache.crop(0)
        with pytest.raises(MethodError, match="accumulated over all queries"):
            cache.crop(-1)
    spec = "kivi:bits=2,group_size=4,residual=2,evict=streaming_llm,ratio=0.5"
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        exact = int(cache.layers[0].r_lengths.min())
        assert cache.is_croppable and 2 <= exact < 6
        before = _state(cache)
        with pytest.raises(MethodError, match=rf"must be in \[-{exact}, 0\] for kivi: only the newest {exact} tokens"):
            cache.crop(-(exact + 1))
        _assert_same_state(_state(cache), before)


# ---- assisted decoding -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helper(tiny_llama):
    """An assistant close to tiny-llama (perturbed weights): it drafts tokens the model partly accepts."""
    model = copy.deepcopy(tiny_llama.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.005)
    # drafts of 5 tokens whatever the assistant's confidence, so that a crop often removes several tokens
    model.generation_config.num_assistant_tokens = 5
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.generation_config.assistant_confidence_threshold = 0.0
    return model


def _spy_crops(cache) -> list[int]:
    log: list[int] = []
    crop = cache.crop

    def spy(tokens_to_remove):
        log.append(-tokens_to_remove)
        crop(tokens_to_remove)

    cache.crop = spy
    return log


GREEDY = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)


@pytest.mark.parametrize("spec", ["snapkv:ratio=1.0", "streaming_llm:ratio=1.0", "adakv:ratio=1.0"])
def test_assisted_generation_keeping_everything_is_greedy_generation(tiny_llama, helper, spec):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40, seed=3)
    with torch.inference_mode():
        ref = model.generate(ids, cache=DynamicCache(config=model.config), **GREEDY)
        with longkit.apply(model, kv=spec) as applied:
            cache = applied.new_cache()
            crops = _spy_crops(cache)
            got = model.generate(ids, cache=cache, assistant_model=helper, **GREEDY)
    assert got.tolist() == ref.tolist()
    # drafts were both accepted and rejected: the cache was rolled back by more than one token at a time
    assert max(crops) > 1 and 0 in crops
    assert cache.get_seq_length() == 40 + 15


@pytest.mark.parametrize("spec,n", [("snapkv:ratio=0.5,window=8", 60), ("adakv:ratio=0.5", 80)])
def test_assisted_generation_while_compressing_keeps_the_budget(tiny_llama, helper, spec, n):
    # Every verification forward is a multi-token forward, so the method compresses after it. Drafts of 5 tokens
    # stay inside the observation window (SnapKV's 8; Ada-KV's scorer's 32, with a budget above it), so the tokens
    # a crop removes are always still stored. (transformers 5.x's assisted decoding re-feeds the whole prompt when
    # given a pre-filled cache, so a compressed context cannot be continued with an assistant.)
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=n, seed=3)
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        crops = _spy_crops(cache)
        got = model.generate(ids, cache=cache, assistant_model=helper, **GREEDY)
    assert got.shape == (1, n + 16) and max(crops) > 1
    assert cache.get_seq_length() == n + 15 and cache.real_seen.tolist() == [n + 15]
    H_kv = model.config.num_key_value_heads
    for lengths in cache.stored_tokens():
        # the budget of the last compression, plus at most the 5 drafts + 1 token accepted after it
        assert int(lengths.sum()) <= H_kv * (round(0.5 * (n + 15)) + 6)
        if spec.startswith("snapkv"):
            assert lengths.tolist() == [[int(lengths[0, 0])] * H_kv]
