import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.runtime.chunked_prefill import chunked_prefill
from longkit.runtime.generate import greedy_generate


@pytest.mark.parametrize("chunk", [1, 7, 64, 200, None])
@pytest.mark.parametrize("method", [None, "rope=yarn:factor=4", "attention=eager"])
def test_chunked_prefill_matches_one_forward(any_tiny, chunk, method):
    model = any_tiny.model
    ids = sample_ids(any_tiny, n=131)
    with torch.inference_mode(), longkit.apply(model, method) as applied:
        full = model(ids).logits
        out = chunked_prefill(model, ids, applied.new_cache(), chunk, logits_to_keep=0 if chunk is None else 1)
        last = out.logits[:, -1]
        torch.testing.assert_close(last, full[:, -1], rtol=1e-4, atol=1e-5)
        assert out.cache.get_seq_length() == 131
        # decoding continues identically from a chunk-filled cache
        nxt = last.argmax(-1, keepdim=True)
        step = model(nxt, cache=out.cache, use_cache=True).logits[:, -1]
        ref = model(torch.cat([ids, nxt], 1)).logits[:, -1]
        torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_with_left_padding(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=50).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.inference_mode():
        full = model(ids, attention_mask=mask).logits[:, -1]
        out = chunked_prefill(model, ids, DynamicCache(config=model.config), 16, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_greedy_generate_with_chunked_prefill_gives_the_same_tokens(tiny_llama):
    ids = sample_ids(tiny_llama, n=97)[0].tolist()
    a = greedy_generate(tiny_llama.model, ids, 12, DynamicCache(config=tiny_llama.model.config), set())
    b = greedy_generate(tiny_llama.model, ids, 12, DynamicCache(config=tiny_llama.model.config), set(), prefill_chunk=10)
    assert a.tokens == b.tokens and a.kv_bytes == b.kv_bytes


@pytest.mark.parametrize("kw,match", [({"chunk_size": 0}, "'chunk_size' must be an int >= 1"),
                                      ({"attention_mask": torch.ones(1, 3)}, "'attention_mask' must have the shape")])
def test_bad_input(tiny_llama, kw, match):
    with pytest.raises(MethodError, match=match):
        chunked_prefill(tiny_llama.model, sample_ids(tiny_llama, n=10), None, **kw)
