"""Gradients through the position remaps: dQ, dK, dV of every blockwise remap against autograd through its
plain reference (fp32, odd lengths, GQA, queries after a cache), and a tiny model's parameter gradients under
a language-model loss with the blockwise path against the reference path."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import INV_FREQ, qkv

import longkit
from conftest import sample_ids
from longkit.attention import dca, lm_infinite, naive, rerope, self_extend

# name -> (blockwise function, reference function, positional parameters, keyword parameters)
REMAPS = {
    "self_extend": (self_extend.self_extend_attention, naive.self_extend_reference, (3, 5), {}),
    "rerope": (rerope.rerope_attention, naive.rerope_reference, (6,), {"trained": 8}),
    "leaky_rerope": (rerope.rerope_attention, naive.rerope_reference, (6,), {"leak": 3.0, "trained": 8}),
    "dca": (dca.dca_attention, naive.dca_reference, (9, 2), {}),
    "lm_infinite": (lm_infinite.lm_infinite_attention, naive.lm_infinite_reference, (7, 3), {}),
}


def _grads(fn, q, k, v, args, kwargs, w_out, w_lse):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v, INV_FREQ, *args, **kwargs)
    # a loss on both outputs: the LSE merge of the parts must be differentiable too
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("T,S,H_kv", [(37, 37, 2), (11, 43, 1), (1, 29, 2)], ids=["T37", "T11-S43", "decode"])
@pytest.mark.parametrize("name", sorted(REMAPS))
def test_qkv_gradients_match_the_reference(name, T, S, H_kv):
    fast, ref, args, kwargs = REMAPS[name]
    q, k, v = qkv(T, S, H_kv, seed=7)
    g = torch.Generator().manual_seed(8)
    w_out, w_lse = torch.randn(q.shape, generator=g), torch.randn(q.shape[:3], generator=g)
    got = _grads(lambda *a, **kw: fast(*a, **kw, block_q=16, block_k=16), q, k, v, args, kwargs, w_out, w_lse)
    want = _grads(ref, q, k, v, args, kwargs, w_out, w_lse)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert bool(torch.isfinite(a).all()), label
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, label=label: f"{label}: {m}")
    # the gradients are not trivially zero
    assert got[1].abs().max() > 1e-3 and got[2].abs().max() > 1e-3


# name -> (module holding the blockwise function, its name, the reference, method arguments)
MODEL_CASES = {
    "self_extend": (
        self_extend,
        "self_extend_attention",
        naive.self_extend_reference,
        {"group_size": 3, "window": 6},
    ),
    "rerope": (rerope, "rerope_attention", naive.rerope_reference, {"window": 6}),
    "leaky_rerope": (rerope, "rerope_attention", naive.rerope_reference, {"window": 6, "leak": 4.0}),
    "dca": (dca, "dca_attention", naive.dca_reference, {"chunk_size": 10, "local_window": 3}),
    "lm_infinite": (
        lm_infinite,
        "lm_infinite_attention",
        naive.lm_infinite_reference,
        {"window": 8, "n_sinks": 2},
    ),
}


def _param_grads(model, ids, method, args):
    model.zero_grad(set_to_none=True)
    with longkit.apply(model, attention=method, attention_args={**args, "block_q": 16, "block_k": 16}):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_parameter_gradients_match_the_reference_path(tiny_llama, name, monkeypatch):
    module, attr, ref, args = MODEL_CASES[name]
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=29)
    fast = _param_grads(model, ids, name, args)
    monkeypatch.setattr(module, attr, lambda *a, block_q, block_k, **kw: ref(*a, **kw))
    slow = _param_grads(model, ids, name, args)
    model.zero_grad(set_to_none=True)
    assert fast.keys() == slow.keys() and any("q_proj" in n for n in fast)
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
