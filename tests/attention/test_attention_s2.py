"""S²-Attn (LongLoRA): the fast path against the explicit-mask reference, the groups by hand, no wrap-around leak,
padding, gradients, and the seam (training mode only)."""

import pytest
import torch
import torch.nn.functional as F
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention.naive import s2_attn_reference
from longkit.attention.s2_attn import s2_attention, s2_runs
from longkit.errors import MethodError

CASES = [
    # T, H, H_kv, ratio
    (64, 4, 4, 0.25),
    (64, 4, 2, 0.25),  # GQA, each half has whole key heads
    (37, 4, 1, 0.25),  # MQA, a length not divisible by the group (g = 9: last groups shorter)
    (50, 6, 3, 0.13),  # H // 2 = 3 query heads: a key head serves both halves
    (23, 5, 5, 1.0),  # odd head count (3 shifted heads), one group
    (7, 4, 2, 0.1),  # g = 1: every token sees itself only
    (1, 4, 2, 0.25),  # T = 1: one token, g = 1
    (9, 9, 3, 0.25),  # SmolLM2's heads (halves of 4 and 5 split a key head), g = 2
    (13, 9, 3, 0.6),  # T < 2g: shifted groups [0, 3), [3, 10), [10, 13)
    (50, 3, 1, 0.25),  # H = 3: one plain head, two shifted
    (40, 7, 7, 0.3),  # MHA, odd head count
]


def _documents(T, seed):
    """(2, 1, T, T) block-causal masks of random document lengths (one row a single document)."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(2, T, dtype=torch.long)
    for c in torch.randint(1, max(2, T), (3,), generator=g).tolist():
        doc[0, c:] += 1
    return ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]


@pytest.mark.parametrize("T,H,H_kv,ratio", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fast_path_matches_the_reference(T, H, H_kv, ratio, dtype, tol):
    q, k, v = qkv(T, T, H_kv, dtype=dtype, H=H, seed=T)
    out = s2_attention(q, k, v, ratio)
    ref, _ = s2_attn_reference(q, k, v, ratio)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("T,H,H_kv,ratio", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_document_mask_matches_the_reference(T, H, H_kv, ratio, dtype, tol):
    q, k, v = qkv(T, T, H_kv, dtype=dtype, H=H, seed=T + 1)
    dense = _documents(T, T)
    out = s2_attention(q, k, v, ratio, dense=dense)
    ref, _ = s2_attn_reference(q, k, v, ratio, dense=dense)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_per_head_dense_mask_and_transformers_layout():
    # A (B, H, T, T) mask differing per head, and inputs laid out as transformers hands them over ((B, T, H, D)
    # transposed): the groups are folded from strided views.
    T, H = 33, 6
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(T, T, 2, H=H, seed=3))
    assert not q.is_contiguous()
    dense = torch.rand(2, H, T, T, generator=torch.Generator().manual_seed(4)) > 0.3
    out = s2_attention(q, k, v, 0.3, dense=dense)
    ref, _ = s2_attn_reference(q, k, v, 0.3, dense=dense)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2_attention(q, k, v, 0.3), s2_attn_reference(q, k, v, 0.3)[0], rtol=1e-5, atol=1e-5)


def test_runs_by_hand():
    assert s2_runs(10, 4, 0) == [(0, 4, 2), (8, 2, 1)]
    assert s2_runs(10, 4, 2) == [(0, 2, 1), (2, 4, 2)]
    assert s2_runs(13, 7, 3) == [(0, 3, 1), (3, 7, 1), (10, 3, 1)]
    assert s2_runs(8192, 2048, 1024) == [(0, 1024, 1), (1024, 2048, 3), (7168, 1024, 1)]
    assert s2_runs(1, 1, 0) == [(0, 1, 1)]


def _sdpa_calls(monkeypatch):
    """Record (4-D inputs, is_causal, has a mask) of every sdpa call S²-Attn makes."""
    import longkit.attention.s2_attn as s2

    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.ndim == 4 and k.ndim == 4, is_causal, attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(s2.F, "scaled_dot_product_attention", spy)
    return calls


def test_fused_path_without_a_mask(monkeypatch):
    # What torch's flash kernels take: 4-D inputs, is_causal, no mask, one call per run of equal groups; a dense
    # mask that is plain causal attention (what transformers may hand over for an unpadded batch) is dropped.
    calls = _sdpa_calls(monkeypatch)
    q, k, v = qkv(40, 40, 3, H=9)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    out = s2_attention(q, k, v, 0.25)
    assert calls == [(True, True, False)] * 4  # plain half: 4 groups of 10; shifted: [0, 5), 3 x 10, [35, 40)
    calls.clear()
    assert torch.equal(s2_attention(q, k, v, 0.25, dense=causal.expand(2, 1, 40, 40)), out)
    assert calls == [(True, True, False)] * 4
    calls.clear()
    dense = causal.repeat(2, 1, 1, 1)
    dense[1, :, :, 7] = False  # a hidden key in row 1: in the plain groups' run and the shifted run [5, 35) only
    s2_attention(q, k, v, 0.25, dense=dense)
    assert all(c[0] for c in calls) and [c[2] for c in calls] == [True, False, True, False]


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


@pytest.mark.parametrize("T,H,H_kv,ratio", [c for c in CASES if c[0] > 1])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_gradients_match_the_reference(T, H, H_kv, ratio, documents):
    q, k, v = qkv(T, T, H_kv, H=H, seed=T + 2)
    dense = _documents(T, T) if documents else None
    w = torch.randn(2, H, T, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (s2_attention, lambda *a, **kw: s2_attn_reference(*a, **kw)[0]):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*x, ratio, dense=dense) * w).sum().backward()
        grads.append([t.grad for t in x])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [32, 37])
def test_first_tokens_get_no_gradient_from_the_last(T):
    # The wrap-around leak in gradients: the outputs of tokens 0 .. s - 1 (the shifted heads' own first group)
    # must not depend on any later key or value; LongLoRA's roll would put the last tokens in their group.
    g, H = int(T * 0.25), 4
    s = g // 2
    x = [t.clone().requires_grad_() for t in qkv(T, T, 2, H=H)]
    s2_attention(*x, 0.25)[:, :, :s].sum().backward()
    for t in x[1:]:
        assert t.grad[:, :, s:].abs().max() == 0 and t.grad[:, :, :s].abs().max() > 0


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
