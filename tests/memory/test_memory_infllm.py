"""InfLLM: block selection, representative tokens and chunk attention against a transcription of the paper's
definition (memory/naive.py), fixed far positions, the bounded working set, cached decoding, bad input."""

import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.memory.infllm import InfLLM, InfLLMState, block_scores, representative_keys
from longkit.memory.naive import infllm_block_selection_naive, infllm_naive, rope

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8))  # head dim 8


def run_state(cfg, q, k, v, scaling=0.5):
    """Production InfLLM over one sequence of unrotated q (H, N, D), k, v (H_kv, N, D): rotated as a model does."""
    N = q.shape[1]
    pos = torch.arange(N)
    qr, kr = rope(q, pos, INV_FREQ).float(), rope(k, pos, INV_FREQ).float()
    state = InfLLMState(cfg)
    out = state.forward(qr[None], kr[None], v.float()[None], pos, scaling, INV_FREQ.float())
    return out[0], state


@pytest.mark.parametrize("h_kv", [2, 1])
def test_chunk_attention_and_selection_match_the_paper_definition(h_kv):
    torch.manual_seed(0)
    H, N, D = 2, 66, 8
    cfg = InfLLM(block_size=4, n_init=2, n_local=12, topk=2, repr_topk=2, exec_chunk=5)
    q, k, v = torch.randn(H, N, D) * 2, torch.randn(h_kv, N, D) * 2, torch.randn(h_kv, N, D)
    out, state = run_state(cfg, q, k, v)
    g = H // h_kv
    ref, chosen = infllm_naive(q, k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), INV_FREQ, block_size=4,
                               n_init=2, n_local=12, topk=2, repr_topk=2, exec_chunk=5, scaling=0.5)
    got = [s[0].tolist() for s in state.selections]
    assert got == chosen
    assert any(len(c) == 2 and c != [0, 1] for c in chosen), "the selection was never exercised"
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_block_selection_sums_the_heads_scores():
    # Block 0 is strong in head 0 only (+10, -9); block 1 moderately in both heads (+3, +3): summed over the heads
    # block 1 wins (6 > 1), a per-head or max-over-heads rule would pick block 0.
    D = 8
    qm = torch.zeros(1, 2, D)
    qm[0, :, 0] = 1.0
    rep = torch.zeros(1, 2, 3, D)
    rep[0, 0, 0, 0], rep[0, 1, 0, 0] = 10.0, -9.0
    rep[0, 0, 1, 0], rep[0, 1, 1, 0] = 3.0, 3.0
    rep[0, 0, 2, 0], rep[0, 1, 2, 0] = -1.0, 0.5
    assert block_scores(qm, rep).tolist() == [[1.0, 6.0, -0.5]]
    state = InfLLMState(InfLLM(block_size=1, n_init=0, n_local=4, topk=1, repr_topk=1, exec_chunk=1))
    state.repr, state.block_k = rep, [None] * 3
    assert state.select(qm).tolist() == [[1]]
    # the same blocks through the naive sum over heads, queries and representative tokens (one token per block)
    k0 = rep[0].clone()  # (H, 3 tokens, D): token b is block b's representative
    assert infllm_block_selection_naive(qm[0][:, None], k0, [[[b], [b]] for b in range(3)], topk=1) == [1]
    assert infllm_block_selection_naive(qm[0][:, None], k0, [[[b], [b]] for b in range(3)], topk=2) == [0, 1]


def test_representative_keys_are_the_most_attended_tokens_per_head():
    # One kv head shared by two query heads; head 0 attended tokens 1 and 3 most, head 1 tokens 0 and 2.
    k0 = torch.arange(4 * 2, dtype=torch.float32).reshape(1, 1, 4, 2)
    score = torch.tensor([[[0.1, 0.9, 0.2, 0.8], [0.7, 0.0, 0.6, 0.1]]])
    rep = representative_keys(k0, score, 2)
    torch.testing.assert_close(rep[0, 0], (k0[0, 0, 1] + k0[0, 0, 3]) / 2)
    torch.testing.assert_close(rep[0, 1], (k0[0, 0, 0] + k0[0, 0, 2]) / 2)


def test_far_keys_are_seen_at_the_fixed_distance_n_local_minus_one():
    # Only token 0 has a key and a value: a query's weight on it is e^l / (e^l + s) with s other (zero-logit)
    # keys; beyond the window l must be the logit at distance n_local - 1 whatever the true distance.
    torch.manual_seed(1)
    H, N, D, n_local = 1, 60, 8, 8
    cfg = InfLLM(block_size=4, n_init=1, n_local=n_local, topk=50, repr_topk=1, exec_chunk=4)
    qv, kv = torch.randn(D), torch.randn(D)
    q = qv.expand(H, N, D).clone()
    k = torch.zeros(H, N, D)
    k[0, 0] = kv
    v = torch.zeros(H, N, D)
    v[0, 0, 0] = 1.0
    out, _ = run_state(cfg, q, k, v, scaling=1.0)
    far = float(rope(qv[None], n_local - 1, INV_FREQ)[0] @ kv.double())
    for s in (n_local, 20, 59):
        assert out[0, s, 0].item() == pytest.approx(1 / (1 + s * torch.exp(torch.tensor(-far)).item()), rel=1e-4)
    near = float(rope(qv[None], 5, INV_FREQ)[0] @ rope(kv[None], 0, INV_FREQ)[0])
    assert out[0, 5, 0].item() == pytest.approx(1 / (1 + 5 * torch.exp(torch.tensor(-near)).item()), rel=1e-4)


def test_working_set_is_bounded_by_the_configuration_not_the_context():
    torch.manual_seed(2)
    cfg = InfLLM(block_size=4, n_init=2, n_local=12, topk=2, repr_topk=2, exec_chunk=5)
    peaks = []
    for N in (80, 200, 400):
        _, state = run_state(cfg, torch.randn(2, N, 8), torch.randn(1, N, 8), torch.randn(1, N, 8))
        assert state.max_keys_per_query <= cfg.keys_per_query_bound()
        assert state.device_tokens() <= cfg.n_init + cfg.n_local + cfg.block_size - 1
        assert state.n_blocks() == (N - cfg.n_init - cfg.n_local) // cfg.block_size
        assert all(b.device.type == "cpu" for b in state.block_k)
        peaks.append(state.max_keys_per_query)
    assert peaks[1] == peaks[2] < 200  # flat in the context length


def test_a_context_inside_the_window_is_plain_attention(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    with torch.inference_mode():
        base = model(ids).logits
        with longkit.apply(model, memory="infllm", memory_args={"n_local": 64, "exec_chunk": 16, "block_size": 8}):
            got = model(ids).logits
    torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-5)


def test_cached_prefill_and_decoding_with_retrieval(tiny_llama):
    # Retrieval active (many blocks, topk 2): a cached prefill split on exec-chunk boundaries gives the same
    # logits as one forward; decoding continues from the cache's block memory.
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=100)
    args = {"block_size": 4, "n_init": 2, "n_local": 16, "topk": 2, "repr_topk": 1, "exec_chunk": 8}
    with torch.inference_mode(), longkit.apply(model, memory="infllm", memory_args=args) as applied:
        full = model(ids[:, :96]).logits
        cache = applied.new_cache()
        a = model(ids[:, :48], cache=cache, use_cache=True).logits
        b = model(ids[:, 48:96], cache=cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == 96
        states = cache.states()
        assert states[0].n_blocks() == (96 - 2 - 16) // 4 and any(s.shape[1] == 2 and s[0].tolist() != [0, 1] for s in states[0].selections)
        for i in range(96, 100):
            step = model(ids[:, i : i + 1], cache=cache, use_cache=True).logits
            assert torch.isfinite(step).all()
        assert cache.get_seq_length() == 100
        assert all(s.device_tokens() <= 2 + 16 + 4 - 1 for s in states)


def test_bad_input_is_refused_with_the_parameter_named(tiny_llama):
    with pytest.raises(MethodError, match="exec_chunk.*n_local"):
        InfLLM(n_local=32, exec_chunk=64)
    with pytest.raises(MethodError, match="repr_topk.*block_size"):
        InfLLM(block_size=4, repr_topk=5)
    with pytest.raises(MethodError, match="topk"):
        InfLLM(topk=0)
    with pytest.raises(MethodError, match="offload"):
        InfLLM(offload="gpu")
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=20)
    with torch.inference_mode(), longkit.apply(model, memory="infllm", memory_args={"n_local": 8, "exec_chunk": 4,
                                                                                   "block_size": 4}):
        cache = DynamicCache(config=model.config)
        model(ids[:, :10], cache=cache, use_cache=True)
        with pytest.raises(MethodError, match="applied.new_cache"):
            model(ids[:, 10:], cache=cache, use_cache=True)
        mask = torch.ones_like(ids)
        mask[:, :3] = 0
        with pytest.raises(MethodError, match="padding"):
            model(ids, attention_mask=mask)
    with pytest.raises(MethodError, match="combined"), longkit.apply(model, attention="blockwise", memory="infllm"):
        pass


def test_generation_runs_the_last_prompt_token_alone(tiny_llama):
    # As the reference's generation loop: all but the last prompt token in execution chunks, then the last token
    # in a forward of its own, so the first answer token comes from the blocks its own query retrieves.
    from longkit.eval.backends.base import GenerationRequest
    from longkit.eval.backends.hf import HFBackend
    from longkit.runtime.generate import greedy_generate

    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=100)[0].tolist()
    args = {"block_size": 4, "n_init": 2, "n_local": 16, "topk": 2, "repr_topk": 1, "exec_chunk": 8}
    from longkit.kvcache.snapkv import SnapKV

    assert InfLLM.prefill_last_token_alone and not SnapKV.prefill_last_token_alone
    with torch.inference_mode(), longkit.apply(model, memory="infllm", memory_args=args) as applied:
        caches = []

        class Recording:  # the applied handle, keeping the caches the backend asks for
            spec = applied.spec

            def new_cache(self):
                caches.append(applied.new_cache())
                return caches[-1]

        result = HFBackend(tiny_llama, Recording()).generate(GenerationRequest(3, input_ids=ids))
        sel = caches[0].states()[0].selections
        # 99 tokens in chunks of 8 (13 chunks), the last prompt token alone, then one per decoded token (2 more).
        assert len(sel) == 13 + 1 + (result.completion_tokens - 1) and result.completion_tokens == 3
        # The record keeps the working set beside all of the KV (the offloaded blocks are in kv_bytes only).
        assert 0 < result.stats["working_set_bytes"] < result.stats["kv_bytes"]
        # Directly: 100 tokens together are 13 chunks (the last one of 4 tokens, the last token among them).
        for flag, chunks in ((True, 14), (False, 13)):
            cache = applied.new_cache()
            gen = greedy_generate(model, ids, 3, cache, set(), last_token_alone=flag)
            assert len(cache.states()[0].selections) == chunks + 2 and len(gen.tokens) == 3
    # Without a method whose work depends on the call's queries, running the last token alone changes nothing.
    with torch.inference_mode():
        plain = [greedy_generate(model, ids, 4, None, set(), prefill_chunk=32, last_token_alone=flag).tokens
                 for flag in (False, True)]
    assert plain[0] == plain[1]
