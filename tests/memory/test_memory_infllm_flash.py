"""InfLLM's fused chunk attention (three CPU flash calls merged by log-sum-exp, the representative scores from a
swapped call) against its float32 reference: outputs, block selections, representative keys and the summed
attention every recent token received, over odd lengths, grouped queries, float32 and bf16, no initial tokens
(query rows that see nothing far), and through a model."""

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.memory.infllm import InfLLM, InfLLMState, _attend_flash, _attend_reference


def _run(impl, q, k, v, dtype, **cfg):
    """One sequence through a fresh state; q (H, N, D), k/v (H_kv, N, D) taken as already rotated."""
    state = InfLLMState(InfLLM(impl=impl, **cfg))
    N = q.shape[1]
    pos = torch.arange(N)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, q.shape[-1], 2).float() / q.shape[-1]))
    out = state.forward(q[None].to(dtype), k[None].to(dtype), v[None].to(dtype), pos, q.shape[-1] ** -0.5, inv_freq)
    return out[0], state


CASES = [
    # (H, H_kv, N, D, config): odd lengths and chunks; n_init=0 leaves early queries with no far key at all.
    (4, 2, 157, 16, dict(block_size=4, n_init=3, n_local=16, topk=3, repr_topk=2, exec_chunk=7)),
    (3, 1, 203, 8, dict(block_size=5, n_init=0, n_local=11, topk=2, repr_topk=3, exec_chunk=11)),
    (6, 3, 95, 64, dict(block_size=8, n_init=4, n_local=24, topk=2, repr_topk=1, exec_chunk=9)),
    (2, 2, 41, 32, dict(block_size=4, n_init=2, n_local=40, topk=1, repr_topk=1, exec_chunk=13)),  # all local
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_chunks_equal_the_reference(case, dtype):
    H, H_kv, N, D, cfg = CASES[case]
    torch.manual_seed(case)
    q, k, v = torch.randn(H, N, D) * 1.5, torch.randn(H_kv, N, D) * 1.5, torch.randn(H_kv, N, D)
    ref, s_ref = _run("reference", q, k, v, dtype, **cfg)
    got, s_got = _run("flash", q, k, v, dtype, **cfg)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    # Same blocks retrieved by every chunk and the same state left behind.
    assert [s.tolist() for s in s_got.selections] == [s.tolist() for s in s_ref.selections]
    assert s_got.n_blocks() == s_ref.n_blocks() and s_got.max_keys_per_query == s_ref.max_keys_per_query
    torch.testing.assert_close(s_got.rscore, s_ref.rscore, **tol)
    if s_ref.n_blocks():
        if dtype == torch.float32:
            torch.testing.assert_close(s_got.repr, s_ref.repr, rtol=1e-5, atol=1e-5)
        else:  # representative tokens picked from bf16-rounded scores: nearly all the same picks
            close = (s_got.repr - s_ref.repr).abs().amax(-1) < 1e-3
            assert close.float().mean() > 0.9


def test_rows_without_far_keys_and_keys_without_local_queries():
    # One query sees no far key (no initial tokens, no block, only some queries beyond the window); the oldest
    # recent key is seen by no query locally: the merge gives the first rows pure local attention and that key a
    # zero score, where a raw flash output (lse 0 for an empty row) would not.
    torch.manual_seed(3)
    B, H, H_kv, Tc, R, G, D = 1, 2, 1, 5, 9, 2, 8
    q, qg = torch.randn(B, H, Tc, D), torch.randn(B, H, Tc, D)
    rk, rv = torch.randn(B, H_kv, R, D), torch.randn(B, H_kv, R, D)
    far = (torch.randn(B, H_kv, G, D), torch.randn(B, H_kv, G, D))
    dist = (torch.arange(Tc) + R - Tc)[:, None] - torch.arange(R)[None]
    local = (dist >= 0) & (dist < 4)
    visible = torch.zeros(Tc, G, dtype=torch.bool)
    visible[2:, 0], visible[4:, 1] = True, True
    assert not local[:, 0].any() and not visible[0].any()
    ref = _attend_reference(q, qg, rk, rv, far, local, visible, 0.3)
    got = _attend_flash(q, qg, rk, rv, far, local, visible, 0.3)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert (got[1][..., 0] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_gives_the_same_logits_and_tokens_with_either_kernel(dtype):
    lm = longkit.load_model("tiny-llama", dtype=dtype)
    ids = sample_ids(lm, 300, seed=4)
    args = {"block_size": 8, "n_init": 4, "n_local": 48, "topk": 3, "repr_topk": 2, "exec_chunk": 16}
    outs = {}
    for impl in ("reference", "flash"):
        with torch.inference_mode(), longkit.apply(lm.model, memory="infllm", memory_args={**args, "impl": impl}) as ap:
            cache = ap.new_cache()
            logits = lm.model(ids, cache=cache, use_cache=True).logits
            tokens = [int(logits[0, -1].argmax())]
            for _ in range(6):
                step = lm.model(torch.tensor([tokens[-1:]]), cache=cache, use_cache=True).logits
                tokens.append(int(step[0, -1].argmax()))
            assert cache.states()[0].n_blocks() > args["topk"]  # retrieval was exercised
            outs[impl] = logits.float(), tokens
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(outs["flash"][0], outs["reference"][0], **tol)
    assert outs["flash"][1] == outs["reference"][1]


def test_impl_is_a_checked_parameter():
    with pytest.raises(Exception, match="impl"):
        InfLLM(impl="triton")
