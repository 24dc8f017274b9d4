"""S²-Attn (LongLoRA): the fast path against the explicit-mask reference, the groups by hand, no wrap-around leak,
padding, gradients, and the seam (training mode only)."""

import pytest
import torch
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention.naive import s2_attn_reference
from longkit.attention.s2_attn import s2_attention
from longkit.errors import MethodError

CASES = [
    # T, H, H_kv, ratio
    (64, 4, 4, 0.25),
    (64, 4, 2, 0.25),  # GQA, each half has whole key heads
    (37, 4, 1, 0.25),  # MQA, a length not divisible by the group (g = 9: last groups shorter)
    (50, 6, 3, 0.13),  # H // 2 = 3 query heads: a key head serves both halves
    (23, 5, 5, 1.0),  # odd head count (3 shifted heads), one group
    (7, 4, 2, 0.1),  # g = 1: every token sees itself only
]


@pytest.mark.parametrize("T,H,H_kv,ratio", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fast_path_matches_the_reference(T, H, H_kv, ratio, dtype, tol):
    q, k, v = qkv(T, T, H_kv, dtype=dtype, H=H, seed=T)
    out = s2_attention(q, k, v, ratio)
    ref, _ = s2_attn_reference(q, k, v, ratio)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def _visibility(fn, T, H, ratio):
    # q = k = 0 gives uniform weights over the visible keys; v = identity reads them off as (H, T, T).
    zeros = torch.zeros(1, H, T, T)
    v = torch.eye(T)[None, None].expand(1, H, T, T).contiguous()
    out = fn(zeros, zeros, v, ratio)
    return (out if isinstance(out, torch.Tensor) else out[0])[0] > 0


@pytest.mark.parametrize("fn", [s2_attention, s2_attn_reference], ids=["fast", "reference"])
def test_groups_by_hand(fn):
    # T = 10, ratio 0.4 -> g = 4, s = 2. Plain heads: {0..3} {4..7} {8, 9}; shifted: {0, 1} {2..5} {6..9}.
    vis = _visibility(fn, 10, 2, 0.4)
    plain, shifted = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    for h, groups in ((0, plain), (1, shifted)):
        expected = torch.zeros(10, 10, dtype=torch.bool)
        for grp in groups:
            for i in grp:
                for j in grp:
                    expected[i, j] = j <= i
        assert torch.equal(vis[h], expected), (h, vis[h].int())


def test_no_wrap_around_leak_into_the_first_half_group():
    # LongLoRA's roll puts tokens 0 .. s - 1 behind the last s tokens in the shifted heads; here changing the
    # last tokens must not change any earlier output.
    T, g = 32, 8
    q, k, v = qkv(T, T, 2, H=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -g // 2 :] += 3.0
    v2[:, :, -g // 2 :] -= 5.0
    a, b = s2_attention(q, k, v, 0.25), s2_attention(q, k2, v2, 0.25)
    torch.testing.assert_close(a[:, :, : T - g // 2], b[:, :, : T - g // 2], rtol=0, atol=0)
    assert not torch.allclose(a[:, :, -1], b[:, :, -1])


def test_padding_and_fully_masked_rows_match_the_reference():
    T, H = 30, 4
    q, k, v = qkv(T, T, 2, H=H)
    dense = torch.ones(2, 1, T, T, dtype=torch.bool)
    dense[0, :, :, :5] = False  # left padding of 5 in the first row of the batch ...
    dense[0, :, :5, :] = False  # ... whose padded queries see nothing
    dense[1, :, :, 12] = False
    out = s2_attention(q, k, v, 0.3, dense=dense)
    ref, _ = s2_attn_reference(q, k, v, 0.3, dense=dense)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    assert out[0, :, :5].abs().max() == 0


def test_gradients_match_the_reference():
    T, H = 29, 4
    q, k, v = qkv(T, T, 2, H=H)
    w = torch.randn(2, H, T, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (s2_attention, lambda *a: s2_attn_reference(*a)[0]):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*x, 0.25) * w).sum().backward()
        grads.append([t.grad for t in x])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: s2_attention(q, k, v, 0.0), "'group_size_ratio'"),
        (lambda q, k, v: s2_attention(q, k, v, 1.5), "'group_size_ratio'"),
        (lambda q, k, v: s2_attention(q, k[:, :, :-1], v[:, :, :-1]), "as many queries as keys"),
        (lambda q, k, v: s2_attention(q, k, v, dense=torch.ones(1, 1, 3, 3)), "'dense'"),
    ],
)
def test_bad_input(call, match):
    q, k, v = qkv(12, 12, 2)
    with pytest.raises(MethodError, match=match):
        call(q, k, v)
    with pytest.raises(MethodError, match="'group_size_ratio'"):
        longkit.apply(longkit.load_model("tiny-llama").model, attention="s2_attn", attention_args={"group_size_ratio": 2})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_seam_training_mode_only_no_leak_and_gradients(name):
    lm = longkit.load_model(name)
    model = lm.model
    ids = sample_ids(lm, n=48)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        plain_eval = model(ids).logits
        model.train()
        plain_train = model(ids).logits
    with longkit.apply(model, attention="s2_attn"):
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        with torch.no_grad():
            # S²-Attn restricts attention: the logits change, but no position sees a later token
            assert not torch.allclose(out.logits, plain_train, atol=1e-4)
            torch.testing.assert_close(model(changed).logits[:, :-1], out.logits[:, :-1].detach())
            model.eval()
            torch.testing.assert_close(model(ids).logits, plain_eval, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.train()
        assert torch.equal(model(ids).logits, plain_train)
