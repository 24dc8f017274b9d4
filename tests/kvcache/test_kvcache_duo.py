"""DuoAttention (training-free): the retrieval probe, the per-head split into full and streaming heads, heads files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes
from longkit.kvcache.duo_attention import DuoAttention, build_probe, load_heads, save_heads


def _probe_reference(model, method: DuoAttention) -> torch.Tensor:
    """(layers, kv heads) attention mass of the answer queries on the needle, from eager ``output_attentions``."""
    text = model.config
    probe = build_probe(text.vocab_size, method.probe_tokens, method.probes, method.needle, method.seed)
    with torch.no_grad():
        attentions = model(probe.ids, output_attentions=True).attentions
    out = []
    for att in attentions:
        # (B, H, R, S) answer-query rows, then (B, H, R) mass on the needle columns
        per_row = torch.stack([att[b, :, probe.rows[b]] for b in range(att.shape[0])])
        mass = torch.stack([per_row[b][..., probe.cols[b]].sum(-1) for b in range(att.shape[0])]).float().mean(-1)
        groups = text.num_attention_heads // text.num_key_value_heads
        out.append(mass.view(mass.shape[0], -1, groups).mean((0, 2)))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_probe_scores_equal_a_reference_from_output_attentions(dtype, atol):
    lm = longkit.load_model("tiny-qwen2")  # own copy: this test switches it to eager and casts it
    model = lm.model.to(dtype)
    method = DuoAttention(probe_tokens=61, probes=3, needle=6, seed=5)
    got_sdpa = method.probe_scores(model)
    model.set_attn_implementation("eager")
    ref = _probe_reference(model, method)
    torch.testing.assert_close(method.probe_scores(model), ref, rtol=0, atol=atol)
    torch.testing.assert_close(got_sdpa, ref, rtol=0, atol=atol)
    assert model.config._attn_implementation == "eager"  # the probe undid its hook


def test_probe_prompt_hides_the_needle_and_asks_for_it_again():
    p = build_probe(vocab=50, length=40, probes=2, needle=6, seed=1, exclude=(0, 1))
    assert p.ids.shape == (2, 40) and not bool((p.ids <= 1).any())
    for b in range(2):
        needle = p.ids[b, p.cols[b]]
        assert torch.equal(p.ids[b, -6:], needle)  # key and value repeated at the end
        # each answer query predicts the next value token: the token after it is the value
        assert torch.equal(p.ids[b, p.rows[b] + 1], needle[3:])
    assert int(p.cols[0, 0]) != int(p.cols[1, 0])  # different depths


def test_calibrate_picks_the_top_scoring_heads_deterministically(tiny_llama):
    model = tiny_llama.model
    method = DuoAttention(retrieval_ratio=0.5, probe_tokens=64, probes=2)
    scores = method.probe_scores(model)
    mask = method.calibrate(model)
    assert mask.shape == scores.shape and int(mask.sum()) == round(0.5 * scores.numel())
    assert scores[mask].min() >= scores[~mask].max()
    assert method.calibrate(model) is mask  # cached per model
    again = DuoAttention(retrieval_ratio=0.5, probe_tokens=64, probes=2)
    assert torch.equal(again.calibrate(model), mask) and torch.equal(again.probe_scores(model), scores)
    assert not torch.equal(DuoAttention(probe_tokens=64, probes=2, seed=1).probe_scores(model), scores)
    assert int(DuoAttention(retrieval_ratio=0.0, probe_tokens=64).calibrate(model).sum()) == 0
    assert bool(DuoAttention(retrieval_ratio=1.0, probe_tokens=64).calibrate(model).all())


def _heads_file(tmp_path, mapping) -> str:
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(mapping))
    return str(path)


def test_retrieval_heads_keep_everything_streaming_heads_keep_sinks_and_window(tiny_llama, tmp_path):
    model = tiny_llama.model
    # layer 0: kv head 1 retrieves; layer 1: no retrieval head (dense streaming layer)
    heads = _heads_file(tmp_path, {"0": [1], "1": []})
    ids = sample_ids(tiny_llama, n=40)
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        model(ids, cache=dyn, use_cache=True)
        with longkit.apply(model, kv=f"duo_attention:heads={heads},sinks=2,window=5") as applied:
            cache = applied.new_cache()
            model(ids, cache=cache, use_cache=True)
    counts = cache.stored_tokens()
    assert counts[0].tolist() == [[7, 40]] and counts[1].tolist() == [[7, 7]]
    kept = torch.tensor([0, 1, 35, 36, 37, 38, 39])
    k0, v0, _, _ = cache.layers[0].padded()
    assert torch.equal(k0[0, 0, :7], dyn.layers[0].keys[0, 0, kept])
    assert torch.equal(v0[0, 1], dyn.layers[0].values[0, 1])
    assert torch.equal(cache.layers[1].keys, dyn.layers[1].keys[:, :, kept])
    D, size = dyn.layers[0].keys.shape[-1], dyn.layers[0].keys.element_size()
    # layer 0 packed: 47 rows + (1, 2) int64 lengths; layer 1 dense: 2 heads x 7
    assert cache_nbytes(cache) == 2 * (47 + 14) * D * size + 2 * 8
    assert cache_nbytes(cache) < cache_nbytes(dyn)


def test_retrieval_ratio_one_reproduces_uncompressed_logits_exactly(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=45)
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        ref = [model(ids[:, :42], cache=dyn, use_cache=True).logits[:, -1:]]
        ref += [model(ids[:, i : i + 1], cache=dyn, use_cache=True).logits for i in range(42, 45)]
        with longkit.apply(model, kv="duo_attention:retrieval_ratio=1,window=4,probe_tokens=64") as applied:
            cache = applied.new_cache()
            got = [model(ids[:, :42], cache=cache, use_cache=True).logits[:, -1:]]
            got += [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(42, 45)]
    assert torch.equal(torch.cat(got, 1), torch.cat(ref, 1))
    assert cache_nbytes(cache) == cache_nbytes(dyn)


def _masked_reference(model, ids, prefill, retrieval, sinks, window):
    """Logits of a full eager forward where each streaming head's decode queries see only sinks + window + itself."""
    from transformers import AttentionInterface

    S = ids.shape[1]
    q = torch.arange(S)[:, None]
    k = torch.arange(S)[None, :]
    causal = k <= q
    # decode queries (q >= prefill) on a streaming head: sinks, the `window` keys before it, and itself
    stream = causal & ((q < prefill) | (k < sinks) | (k >= q - window))

    def masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(groups, 1)
        vals = value.repeat_interleave(groups, 1)
        heads = retrieval[module.layer_idx].repeat_interleave(groups)
        # (H, S, S) visible keys per query head
        visible = torch.where(heads[:, None, None], causal, stream)
        logits = (query @ keys.transpose(-1, -2)) * scaling
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1, dtype=torch.float32)
        return (probs.to(query.dtype) @ vals).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("test_duo_masked", masked)
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_duo_masked")
    try:
        with torch.inference_mode():
            return model(ids).logits[:, prefill - 1 :]
    finally:
        model.set_attn_implementation(previous)


def test_decoding_equals_masking_the_evicted_entries_and_streaming_heads_stay_bounded(tiny_llama, tmp_path):
    model = tiny_llama.model
    retrieval = torch.tensor([[False, True], [True, False]])
    heads = tmp_path / "heads.json"
    save_heads(retrieval, heads)
    ids = sample_ids(tiny_llama, n=39, seed=3)
    prefill, sinks, window = 31, 2, 6
    with torch.inference_mode(), longkit.apply(model, kv=f"duo_attention:heads={heads},sinks=2,window=6") as applied:
        cache = applied.new_cache()
        logits = [model(ids[:, :prefill], cache=cache, use_cache=True).logits[:, -1:]]
        for i in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
            for layer, counts in enumerate(cache.stored_tokens()):
                want = torch.where(retrieval[layer], i + 1, sinks + window)
                assert torch.equal(counts[0], want)
    ref = _masked_reference(model, ids, prefill, retrieval, sinks, window)
    torch.testing.assert_close(torch.cat(logits, 1), ref, rtol=1e-4, atol=1e-5)


def test_generate_runs_greedy_and_left_padded(tiny_llama, tmp_path):
    model = tiny_llama.model
    a, b = sample_ids(tiny_llama, n=30, seed=1), sample_ids(tiny_llama, n=24, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros((1, 6), dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), longkit.apply(model, kv="duo_attention:window=8,sinks=2,probe_tokens=64") as applied:
        cache = applied.new_cache()
        both = model.generate(batch, attention_mask=mask, cache=cache, **kw)
        alone = model.generate(b, attention_mask=torch.ones_like(b), cache=applied.new_cache(), **kw)
    assert both.shape == (2, 36)
    assert torch.equal(both[1, -6:], alone[0, -6:])
    stream = ~cache.retrieval_heads
    for layer, counts in enumerate(cache.stored_tokens()):
        assert bool((counts[:, stream[layer]] == 10).all())


def test_heads_json_round_trip_and_explicit_heads_skip_the_probe(tiny_llama, tmp_path):
    model = tiny_llama.model
    method = DuoAttention(retrieval_ratio=0.5, probe_tokens=64)
    path = tmp_path / "duo.json"
    method.save(model, path)
    data = json.loads(path.read_text())
    assert set(data) == {"0", "1"} and sum(len(v) for v in data.values()) == 2
    assert torch.equal(load_heads(path, 2, 2), method.calibrate(model))
    explicit = DuoAttention(heads=str(path), retrieval_ratio=0.0)
    assert torch.equal(explicit.calibrate(model), method.calibrate(model))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("duo_attention:retrieval_ratio=1.5", "retrieval_ratio"),
        ("duo_attention:window=0", "window"),
        ("duo_attention:sinks=-1", "sinks"),
        ("duo_attention:probe_tokens=32,needle=16", "probe_tokens"),
        ("duo_attention:heads=/nonexistent/duo.json", "heads"),
    ],
)
def test_bad_parameters_are_clear_errors(tiny_llama, spec, match):
    with pytest.raises(MethodError, match=match):
        with longkit.apply(tiny_llama.model, kv=spec):
            pass


@pytest.mark.parametrize(
    "mapping,match",
    [({"2": [0]}, "layer '2'"), ({"0": [2]}, r"0\.\.1"), ({"x": []}, "layer 'x'"), ([0, 1], "JSON object")],
)
def test_bad_heads_files_name_the_parameter(tiny_llama, tmp_path, mapping, match):
    with pytest.raises(MethodError, match=match):
        DuoAttention(heads=_heads_file(tmp_path, mapping)).calibrate(tiny_llama.model)
