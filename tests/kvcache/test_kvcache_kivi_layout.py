"""KIVI's ragged layer reads ``keep`` (and any moved keys/extras) in the layout of the view the attention call saw.

After an update on ragged (per-head) storage the view is [each head's stored slots, padded to the longest | the new
tokens], while the storage, padded, is [each head's slots + new tokens]: a second compression (a chunked prefill,
or any multi-token forward) must map the mask, or it drops the wrong slots. Same class of bug as
``test_kvcache_ragged_layout.py`` for the plain :class:`~longkit.kvcache.storage.RaggedLayer`. Batch moves (beam
search) must move the packed rows as they are, never re-quantise them.
"""

from __future__ import annotations

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.kvcache import kivi
from longkit.kvcache.kivi import KIVIRaggedLayer
from longkit.runtime.chunked_prefill import chunked_prefill

D = 8


def _prefill(model, ids, spec, mask=None, chunk_size=None):
    """The cache of ``spec`` after a (chunked) prefill of ``ids``."""
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        chunked_prefill(model, ids, cache, chunk_size, attention_mask=mask)
    return cache


def _tokens(values: list[list[float]]) -> torch.Tensor:
    """(1, H_kv, S, D) keys whose token s of head h has every channel equal to values[h][s]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, :, None].expand(1, len(values), len(values[0]), D)


def _heads(layer: KIVIRaggedLayer, which: int = 0) -> list[list[float]]:
    """Per head of sequence 0, the first channel of every stored (dequantised) key (which=0) or value (which=1)."""
    t, valid = layer.padded()[which], layer.padded()[2]
    return [(t[0, h][valid[0, h]] if valid is not None else t[0, h])[:, 0].tolist() for h in range(t.shape[1])]


@pytest.mark.parametrize("residual", [100, 2])
def test_compact_after_a_ragged_update_keeps_the_slots_of_the_view(residual):
    # Token values are multiples of 3 and every key group holds two tokens, so 2-bit codes 0 and 3 dequantise
    # exactly: quantised or exact, the stored numbers are the tokens themselves.
    layer = KIVIRaggedLayer(bits=2, group_size=2, residual=residual, scale_dtype="float32")
    k0 = _tokens([[0, 3, 6, 9, 12, 15], [30, 33, 36, 39, 42, 45]])
    layer.update(k0, -k0)
    # head 0 keeps all 6 tokens, head 1 keeps 30, 36, 42: ragged storage
    layer.compact(torch.tensor([[[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]]], dtype=torch.bool))
    assert layer.stored_lengths().tolist() == [[6, 3]]
    new = _tokens([[90, 93], [96, 99]])
    view_k, _ = layer.update(new, -new)
    # the view: head 1's three tokens padded to 6, then the two new tokens in slots 6 and 7
    assert view_k.shape[2] == 8 and layer.last_valid[0, 1].tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    assert view_k[0, 1, 6:, 0].tolist() == [96, 99]
    keep = layer.last_valid.clone()
    keep[0, 0, 0] = False  # evict head 0's first token
    keep[0, 1, 6] = False  # and head 1's first new token
    layer.compact(keep)
    assert _heads(layer) == [[3, 6, 9, 12, 15, 90, 93], [30, 36, 42, 99]]
    assert _heads(layer, 1) == [[-3, -6, -9, -12, -15, -90, -93], [-30, -36, -42, -99]]
    if residual == 2:
        # the newest two tokens per head stay exact, the older ones are quantised in whole groups
        assert layer.q_lengths.tolist() == [[4, 2]] and layer.r_lengths.tolist() == [[3, 2]]


def test_view_is_the_layout_of_the_last_update():
    # Methods read per-slot extras through layer.view(S) (H2O's attention sums, StreamingLLM's positions).
    layer = KIVIRaggedLayer(track=("pos",), bits=2, group_size=2, residual=0, scale_dtype="float32")
    k0 = _tokens([[0, 3, 6, 9], [30, 33, 36, 39]])
    layer.update(k0, -k0)
    layer.compact(torch.tensor([[[1, 1, 1, 1], [0, 1, 0, 1]]], dtype=torch.bool))
    new = _tokens([[90], [96]])
    view_k, view_v = layer.update(new, -new)
    k, v, valid, extras = layer.view(view_k.shape[2])
    assert torch.equal(valid, layer.last_valid)
    assert torch.equal(k, view_k) and torch.equal(v, view_v)
    assert extras["pos"][0].tolist() == [[0, 1, 2, 3, 4], [1, 3, 0, 0, 4]]


@pytest.mark.parametrize("evict", ["adakv", "pyramidkv"])
def test_chunked_prefill_with_a_large_residual_is_plain_eviction(tiny_llama, evict):
    # With a residual longer than the context nothing is quantised, so the composed cache must hold exactly what the
    # eviction method alone keeps, chunk after chunk; a batch with left padding makes pyramidkv's storage ragged too.
    model = tiny_llama.model
    pad = model.config.pad_token_id
    a, b = sample_ids(tiny_llama, n=60, seed=11), sample_ids(tiny_llama, n=47, seed=12)
    ids = torch.cat([a, torch.cat([torch.full((1, 13), pad), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    plain = _prefill(model, ids, f"{evict}:ratio=0.4,decode_every=0", mask, chunk_size=16)
    spec = f"kivi:bits=2,group_size=8,residual=1000,evict={evict},ratio=0.4"
    kivi = _prefill(model, ids, spec, mask, chunk_size=16)
    for ours, ref in zip(kivi.layers, plain.layers, strict=True):
        assert int(ours.q_lengths.sum()) == 0
        assert torch.equal(ours.stored_lengths(), ref.stored_lengths())
        rk, rv, rvalid, _ = ref.padded()
        ok, ov, ovalid, _ = ours.padded()
        valid = rvalid if rvalid is not None else torch.ones(rk.shape[:3], dtype=torch.bool)
        assert torch.equal(ok[valid], rk[valid]) and torch.equal(ov[valid], rv[valid])


def test_reorder_moves_quantised_rows_without_requantising(tiny_llama, monkeypatch):
    model = tiny_llama.model
    ids = torch.cat([sample_ids(tiny_llama, n=50, seed=s) for s in (1, 2)])
    cache = _prefill(model, ids, "kivi:bits=2,group_size=8,residual=3,evict=adakv,ratio=0.5")
    before = [layer.padded() for layer in cache.layers]
    bytes_before = cache.nbytes()

    def no_quantize(*args, **kwargs):
        raise AssertionError("a batch move re-quantised rows")

    monkeypatch.setattr(kivi, "quantize", no_quantize)
    # after repeating, rows are [s0, s0, s1, s1]; the beams pick [s1, s0, s1, s0]
    beam_idx = torch.tensor([2, 0, 3, 1])
    src = torch.tensor([1, 0, 1, 0])
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(beam_idx)
    assert cache.real_seen.tolist() == [50, 50, 50, 50]
    for layer, (k, v, valid, _) in zip(cache.layers, before, strict=True):
        assert int(layer.q_lengths.sum()) > 0
        k2, v2, valid2, _ = layer.padded()
        assert torch.equal(k2, k.index_select(0, src)) and torch.equal(v2, v.index_select(0, src))
        if valid is not None:
            assert torch.equal(valid2, valid.index_select(0, src))
    assert cache.nbytes() == 2 * bytes_before
