"""Expected Attention (kv=expected_attention) against a plain, loop-by-head computation of the paper's formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache.expected_attention import ExpectedAttention
from longkit.runtime import compress_context


def _record(monkeypatch):
    """Spy on ExpectedAttention.score: [(layer_idx, keys, values, valid, scores)] of every call, unchanged."""
    calls = []
    inner = ExpectedAttention.score

    def spy(self, ctx):
        out = inner(self, ctx)
        calls.append((ctx.layer_idx, ctx.keys.clone(), ctx.values.clone(), ctx.valid.clone(), out.clone()))
        return out

    monkeypatch.setattr(ExpectedAttention, "score", spy)
    return calls


def _hidden_states(model):
    """Forward pre-hooks recording each attention layer's input hidden states (B, T, hidden)."""
    seen, handles = {}, []
    for layer in model.model.layers:
        attn = layer.self_attn

        def hook(module, args, kwargs):
            seen[module.layer_idx] = (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _rope_matrix(model, p: int, D: int) -> torch.Tensor:
    """(D, D) the model's RoPE at position p, built by rotating the basis vectors (scaling included)."""
    rotary = model.model.rotary_emb
    eye = torch.eye(D)
    cos, sin = rotary(eye[None], position_ids=torch.tensor([[p]]))
    cos, sin = cos[0, 0].float(), sin[0, 0].float()
    rot = torch.cat((-eye[:, D // 2 :], eye[:, : D // 2]), dim=-1)
    # row i is R(p) e_i, so the matrix is its transpose
    return (eye * cos + rot * sin).T


def _reference_scores(
    model, layer_idx, hidden, keys, values, valid_row, n_sink, n_future, use_cov, use_vnorm, eps, start=None
):
    """Plain per-head computation for one sequence: (H_kv, S) scores, +inf on the sinks; future from ``start``."""
    attn = model.model.layers[layer_idx].self_attn
    cfg = model.config
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = keys.shape[-1]
    T = hidden.shape[0]
    q = attn.q_proj(hidden).float().view(T, H, D)[n_sink:]
    start = T if start is None else start
    R = sum(_rope_matrix(model, p, D) for p in range(start, start + n_future)) / n_future
    S = keys.shape[1]
    sinks = [s for s in range(S) if valid_row[s]][:n_sink]
    out = torch.zeros(H_kv, S)
    for kv in range(H_kv):
        acc = torch.zeros(S)
        for h in range(kv * H // H_kv, (kv + 1) * H // H_kv):
            x = q[:, h].double()
            mu = x.mean(0)
            cov = (x - mu).T @ (x - mu) / x.shape[0]
            mu, cov = R.double() @ mu, R.double() @ cov @ R.double().T
            logit = torch.full((S,), -math.inf, dtype=torch.float64)
            for s in range(S):
                if valid_row[s] and s not in sinks:
                    k = keys[kv, s].double()
                    logit[s] = k @ mu / math.sqrt(D) + (k @ cov @ k / (2 * D) if use_cov else 0.0)
            acc += torch.softmax(logit, 0).float()
        score = acc / (H // H_kv)
        if use_vnorm:
            score = (score + eps) * values[kv].float().norm(dim=-1)
        score[sinks] = math.inf
        out[kv] = score
    return out


@pytest.mark.parametrize(
    "dtype,args",
    [
        (torch.float32, dict(n_sink=4, n_future=16, use_cov=True, use_vnorm=True, eps=0.0)),
        (torch.float32, dict(n_sink=0, n_future=3, use_cov=False, use_vnorm=False, eps=0.0)),
        (torch.bfloat16, dict(n_sink=2, n_future=9, use_cov=True, use_vnorm=True, eps=0.05)),
    ],
)
def test_scores_equal_the_plain_formula(tiny_llama, monkeypatch, dtype, args):
    # a copy: the shared fixture must stay in fp32
    model = copy.deepcopy(tiny_llama.model).to(dtype)
    ids = sample_ids(tiny_llama, n=37)
    calls = _record(monkeypatch)
    hidden, handles = _hidden_states(model)
    spec = (
        f"expected_attention:ratio=0.5,n_sink={args['n_sink']},n_future_positions={args['n_future']},"
        f"use_covariance={args['use_cov']},use_vnorm={args['use_vnorm']},epsilon={args['eps']}"
    )
    try:
        with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
            model(ids, cache=applied.new_cache(), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == model.config.num_hidden_layers
    for layer_idx, keys, values, valid, got in calls:
        with torch.no_grad():
            ref = _reference_scores(model, layer_idx, hidden[layer_idx][0], keys[0], values[0], valid[0, 0], **args)
        assert torch.equal(torch.isinf(got[0]), torch.isinf(ref))
        fin = ~torch.isinf(ref)
        # bf16: the post-RoPE queries are rounded to bf16 before being un-rotated (measured error ~1e-5 relative)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(got[0][fin], ref[fin], **tol)


def test_keeps_the_sinks_and_the_top_scores(tiny_llama, monkeypatch):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=41)
    calls = _record(monkeypatch)
    with torch.inference_mode(), longkit.apply(model, kv="expected_attention:tokens=10,n_sink=3") as applied:
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
    for (_, keys, _, _, scores), layer in zip(calls, cache.layers, strict=True):
        top = scores[0].topk(10, dim=-1).indices.sort(-1).values
        assert (top[:, :3] == torch.arange(3)).all()
        # (H_kv, 10, D) stored keys are the top-scored rows, in order
        expected = torch.stack([keys[0, h, top[h]] for h in range(keys.shape[1])])
        assert torch.equal(layer.keys[0], expected)


def test_query_agnostic_compress_once_then_ask(tiny_llama):
    model = tiny_llama.model
    context = sample_ids(tiny_llama, n=40, seed=3)
    cache = compress_context(model, context, "expected_attention:tokens=12")
    assert all(int(n.max()) == 12 for n in cache.stored_tokens())
    answers = []
    for seed in (4, 5):
        question = sample_ids(tiny_llama, n=5, seed=seed)
        full = torch.cat([context, question], 1)
        with torch.inference_mode(), longkit.apply(model, kv=cache.method):
            out = model.generate(full, cache=cache.copy(), max_new_tokens=4, do_sample=False)
        answers.append(out[0, -4:])
        assert out.shape[1] == 49
    # the compressed context is untouched by the questions
    assert all(int(n.max()) == 12 for n in cache.stored_tokens())


@pytest.mark.parametrize(
    "spec,match",
    [
        ("expected_attention:n_future_positions=0", "'n_future_positions' must be >= 1"),
        ("expected_attention:n_sink=-1", "'n_sink' must be >= 0"),
        ("expected_attention:epsilon=-0.5", "'epsilon' must be >= 0"),
    ],
)
def test_bad_parameters_are_clear_errors(tiny_llama, spec, match):
    with pytest.raises(MethodError, match=match):
        with longkit.apply(tiny_llama.model, kv=spec):
            pass


def test_left_padded_plain_forward_scores_the_row_as_alone(tiny_llama, monkeypatch):
    # A plain forward counts the padding in the RoPE positions; the recorded position_ids keep the statistics exact
    # (RoPE is relative, so the scores of the real slots equal those of the row alone).
    model = tiny_llama.model
    row = sample_ids(tiny_llama, n=23, seed=7)
    pad = model.config.pad_token_id
    batch = torch.cat([torch.full((1, 6), pad), row], 1)
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    calls = _record(monkeypatch)
    with torch.inference_mode(), longkit.apply(model, kv="expected_attention:tokens=8,n_future_positions=32") as a:
        model(batch, attention_mask=mask, cache=a.new_cache(), use_cache=True)
        model(row, cache=a.new_cache(), use_cache=True)
    n = model.config.num_hidden_layers
    for padded, alone in zip(calls[:n], calls[n:], strict=True):
        got, ref = padded[4][0][:, 6:], alone[4][0]
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        torch.testing.assert_close(got[~torch.isinf(ref)], ref[~torch.isinf(ref)], rtol=1e-4, atol=1e-6)


def test_as_adakv_scorer_and_while_decoding(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=50)
    for spec in ("adakv:ratio=0.25,scorer=expected_attention", "expected_attention:tokens=16,decode_every=2"):
        with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
            cache = applied.new_cache()
            out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
        assert out.shape[1] == 56
        stored = [int(n.sum()) for n in cache.stored_tokens()]
        H_kv = model.config.num_key_value_heads
        # adakv: a layer-wide budget of round(0.25 * 50) = 12 per head, +5 decoded; periodic: back to 16 every 2 steps
        expected = H_kv * (12 + 5) if spec.startswith("adakv") else H_kv * 17
        assert stored == [expected] * len(stored)


def test_uses_the_models_own_position_ids(tiny_llama, monkeypatch):
    # Positions with a gap (as after a custom position_ids): the queries are un-rotated at their true positions and
    # the future starts after the last one; assuming contiguous positions would give other statistics.
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=23, seed=8)
    pos = torch.cat([torch.arange(10), torch.arange(30, 43)])[None]
    calls = _record(monkeypatch)
    hidden, handles = _hidden_states(model)
    try:
        with torch.inference_mode(), longkit.apply(model, kv="expected_attention:tokens=8,n_future_positions=5") as a:
            model(ids, position_ids=pos, cache=a.new_cache(), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    args = dict(n_sink=4, n_future=5, use_cov=True, use_vnorm=True, eps=0.0, start=43)
    for layer_idx, keys, values, valid, got in calls:
        with torch.no_grad():
            ref = _reference_scores(model, layer_idx, hidden[layer_idx][0], keys[0], values[0], valid[0, 0], **args)
        fin = ~torch.isinf(ref)
        torch.testing.assert_close(got[0][fin], ref[fin], rtol=1e-4, atol=1e-6)
