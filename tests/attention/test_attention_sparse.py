"""Sparse attention (A-shape, vertical-slash, block-sparse, MoBA, Quest): fast path == reference path on the same
selection, keep-everything == dense causal attention, selections against brute-force formulas, bad input."""

import pytest
import torch
from attention_helpers import qkv
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.attention import MaskSpec, reference_attention
from longkit.attention.a_shape import a_shape_attention
from longkit.attention.block_sparse import block_sparse_attention, block_sparse_select
from longkit.attention.moba import moba_attention, moba_select
from longkit.attention.quest import quest_attention, quest_select
from longkit.attention.sparse import gathered_attention
from longkit.attention.vertical_slash import vertical_slash_attention, vertical_slash_mask, vertical_slash_select
from longkit.errors import MethodError
from longkit.registry import registry

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# (T, S): prefill with odd lengths, a chunk at the end of its keys, a single decoding query
SHAPES = [(77, 77), (45, 131), (1, 83)]


def dense(q, k, v):
    T, S = q.shape[2], k.shape[2]
    return reference_attention(q, k, v, MaskSpec(causal=True, q_offset=S - T))[0]


def run_a_shape(q, k, v, sparse, reference=False, mask=None, need_lse=True):
    sinks, window = (3, 10) if sparse else (0, 10**6)
    return a_shape_attention(q, k, v, sinks, window, block_q=16, reference=reference, dense=mask, need_lse=need_lse)


def run_vertical_slash(q, k, v, sparse, reference=False, mask=None, need_lse=True):
    sizes = (5, 7) if sparse else (10**6, 1)
    sel = vertical_slash_select(q, k, *sizes, last_q=8, sinks=2, local=3, dense=mask)
    return vertical_slash_attention(q, k, v, sel, block=16, reference=reference, dense=mask, need_lse=need_lse)


def run_block_sparse(q, k, v, sparse, reference=False, mask=None, need_lse=True):
    sel = block_sparse_select(q, k, 2 if sparse else 10**6, 16)
    return block_sparse_attention(q, k, v, sel, 16, reference=reference, dense=mask, need_lse=need_lse)


def run_moba(q, k, v, sparse, reference=False, mask=None, need_lse=True):
    sel = moba_select(q, k, 2 if sparse else 10**6, 16)
    return moba_attention(q, k, v, sel, 16, block_q=24, reference=reference, dense=mask, need_lse=need_lse)


def run_quest(q, k, v, sparse, reference=False, mask=None, need_lse=True):
    pages = quest_select(q, k, 2 if sparse else 10**6, 16)
    return quest_attention(q, k, v, pages, 16, reference=reference, dense=mask, need_lse=need_lse)


METHODS = {
    "a_shape": run_a_shape,
    "vertical_slash": run_vertical_slash,
    "block_sparse": run_block_sparse,
    "moba": run_moba,
    "quest": run_quest,
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", SHAPES)
@pytest.mark.parametrize("H_kv", [2, 4])
def test_fast_path_equals_reference_on_the_same_selection(name, dtype, T, S, H_kv):
    q, k, v = qkv(T, S, H_kv, dtype)
    fast, fast_lse = METHODS[name](q, k, v, True)
    ref, ref_lse = METHODS[name](q, k, v, True, reference=True)
    assert fast.dtype == dtype and fast.shape == q.shape
    torch.testing.assert_close(fast.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(fast_lse, ref_lse, **TOL[dtype])
    if T > 1:
        # The sparse setting really is sparse: it differs from dense attention.
        assert not torch.allclose(fast.float(), dense(q, k, v).float(), atol=1e-2)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", SHAPES)
def test_fused_path_without_lse_equals_reference(name, dtype, T, S):
    # The path the models use: torch's fused sdpa over the gathered block (GQA folded into rows where shared).
    q, k, v = qkv(T, S, 2, dtype, seed=2)
    fused, lse = METHODS[name](q, k, v, True, need_lse=False)
    ref, _ = METHODS[name](q, k, v, True, reference=True)
    assert lse is None and fused.dtype == dtype
    torch.testing.assert_close(fused.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", SHAPES)
def test_keep_everything_equals_dense_causal_attention(name, dtype, T, S):
    q, k, v = qkv(T, S, 2, dtype, seed=1)
    fast, _ = METHODS[name](q, k, v, False)
    torch.testing.assert_close(fast.float(), dense(q, k, v).float(), **TOL[dtype])


@pytest.mark.parametrize("name", METHODS)
def test_padding_mask_is_honoured(name):
    T, S = 53, 53
    q, k, v = qkv(T, S, 2)
    # Batch row 1 is left-padded by 9 tokens.
    mask = torch.ones(2, 1, T, S, dtype=torch.bool)
    mask[1, :, :, :9] = False
    mask &= torch.ones(T, S, dtype=torch.bool).tril()
    fast, _ = METHODS[name](q, k, v, True, mask=mask)
    ref, _ = METHODS[name](q, k, v, True, reference=True, mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    full, _ = METHODS[name](q, k, v, False, mask=mask)
    want = reference_attention(q, k, v, MaskSpec(causal=False, dense=mask))[0]
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)


def test_a_shape_sees_sinks_the_window_before_its_tile_and_its_tile():
    T, sinks, window, bq = 101, 5, 17, 16
    q, k, v = qkv(T, T, 2)
    out, lse = a_shape_attention(q, k, v, sinks, window, block_q=bq)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        first = (i // bq) * bq
        for j in range(i + 1):
            mask[i, j] = j < sinks or j >= first - window
    want, want_lse = reference_attention(q, k, v, MaskSpec(causal=True, dense=mask))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_vertical_slash_selection_matches_brute_force_estimate():
    T, last_q, n_v, n_s = 90, 12, 9, 6
    q, k, _ = qkv(T, T, 2, seed=3)
    sel = vertical_slash_select(q, k, n_v, n_s, last_q=last_q, sinks=2, local=3)
    # The last queries' causal attention, brute force per head: sums per column and per diagonal.
    kk = k.repeat_interleave(2, 1)
    for b in range(2):
        for h in range(4):
            probs = torch.zeros(last_q, T)
            for r in range(last_q):
                p = T - last_q + r
                probs[r, : p + 1] = torch.softmax(q[b, h, p] @ kk[b, h, : p + 1].T * 16**-0.5, -1)
            col = probs.sum(0)
            col[:2] = float("inf")
            diag = torch.zeros(T)
            for r in range(last_q):
                for j in range(T - last_q + r + 1):
                    diag[T - last_q + r - j] += probs[r, j]
            diag[:3] = float("inf")
            assert set(sel.columns[b, h].tolist()) == set(col.topk(n_v).indices.tolist())
            assert set(sel.offsets[b, h].tolist()) == set(diag.topk(n_s).indices.tolist())
    # The mask is exactly: a selected column, or a key r >= 1 positions before the query's tile whose offset from
    # the tile's first row is within a selected diagonal's reach from some row of the tile (o - 15 <= r <= o).
    mask = vertical_slash_mask(sel, T, T, 16)
    p = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    r = (p // 16) * 16 - j
    for b in range(2):
        for h in range(4):
            offsets = set(sel.offsets[b, h].tolist())
            near = torch.tensor([[any(o in offsets for o in range(x, x + 16)) for x in row] for row in r.tolist()])
            want = sel.vertical[b, h][None, :] | ((r >= 1) & near)
            assert torch.equal(mask[b, h], want)
    # which covers every key of a selected column or diagonal outside the query's own tile
    exact = (sel.vertical[:, :, None, :] | sel.slash[:, :, (p - j).clamp(min=0)]) & (j <= p)
    own = (j >= (p // 16) * 16) & (j <= p)
    assert not (exact & ~mask & ~own).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(77, 77), (45, 131), (200, 200)])
@pytest.mark.parametrize("need_lse", [True, False])
def test_vertical_slash_banded_and_gathered_paths_equal_the_reference(dtype, T, S, need_lse):
    q, k, v = qkv(T, S, 2, dtype, seed=8)
    sel = vertical_slash_select(q, k, 6, 9, last_q=8, sinks=2, local=3)
    ref, ref_lse = vertical_slash_attention(q, k, v, sel, block=16, reference=True)
    outs = {}
    for banded in (True, False):
        outs[banded] = vertical_slash_attention(q, k, v, sel, block=16, need_lse=need_lse, fused=banded)
        torch.testing.assert_close(outs[banded][0].float(), ref.float(), **TOL[dtype])
        if need_lse:
            torch.testing.assert_close(outs[banded][1], ref_lse, **TOL[dtype])


@pytest.mark.parametrize("max_runs", [32, 2, 1])
def test_vertical_slash_banded_path_joins_close_runs_and_masks_their_gaps(monkeypatch, max_runs):
    from longkit.attention import vertical_slash as vs

    monkeypatch.setattr(vs, "MAX_RUNS", max_runs)

    T, block = 150, 16
    q, k, v = qkv(T, T, 2, seed=9)
    B, H = 2, 4
    # Diagonals 1, 20, 40, 90 reach r = 1, 5..20, 25..40 and 75..90: four windows, or, with fewer kernel calls
    # allowed, gaps of 3 and 4 keys joined (then the gap of 34 keys too) and masked; column 3 lies inside the
    # band of later tiles.
    offsets = torch.tensor([1, 20, 40, 90]).expand(B, H, -1)
    columns = torch.tensor([0, 3, 100]).expand(B, H, -1)
    flags = [torch.zeros(B, H, T, dtype=torch.bool).scatter_(2, x, True) for x in (columns, offsets)]
    sel = vs.VerticalSlash(flags[0], flags[1], columns, offsets)
    band = vs.slash_band(sel, block)[0, 0]
    assert vs._runs(band, 0) == [(1, 1), (5, 20), (25, 40), (75, 90)]
    want = {32: [(1, 1), (5, 20), (25, 40), (75, 90)], 2: [(1, 40), (75, 90)], 1: [(1, 90)]}[max_runs]
    assert vs._band_runs(band, block) == want
    ref, ref_lse = vs.vertical_slash_attention(q, k, v, sel, block=block, reference=True)
    out, lse = vs.banded_attention(q, k, v, sel, block, 16**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    T, D = 128, 16
    q, k, _ = qkv(T, T, 4, seed=4)
    u = torch.randn(D, generator=torch.Generator().manual_seed(0))
    q, k = q * 0.01 + u, k * 0.01
    # Every query strongly matches key 40 (a vertical line) ...
    k[:, :, 40] = 5 * u
    sel = vertical_slash_select(q, k, 3, 4, last_q=16, sinks=1, local=2)
    assert sel.vertical[:, :, 40].all()
    # ... and each key j strongly matches the query at j + 25 (a slash line at offset 25).
    q2, k2, _ = qkv(T, T, 4, seed=5)
    k2 = torch.zeros_like(k2)
    k2[:, :, : T - 25] = q2[:, :, 25:] * 3
    sel = vertical_slash_select(q2, k2, 1, 3, last_q=16, sinks=1, local=2)
    assert sel.slash[:, :, 25].all()


def test_block_sparse_selection_matches_pooled_brute_force():
    T, bs, top_k = 100, 16, 3
    q, k, _ = qkv(T, T, 2, seed=6)
    sel = block_sparse_select(q, k, top_k, bs)
    nq = -(-T // bs)
    kk = k.repeat_interleave(2, 1)
    for h in range(4):
        for qi in range(nq):
            qm = q[0, h, qi * bs : (qi + 1) * bs].mean(0)
            scores = torch.tensor([float(qm @ kk[0, h, j * bs : (j + 1) * bs].mean(0)) for j in range(qi)])
            want = {qi} | set(scores.topk(min(top_k - 1, qi)).indices.tolist())
            assert set(sel[0, h, qi].nonzero().flatten().tolist()) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(77, 77), (51, 131), (20, 84), (128, 128)])
@pytest.mark.parametrize("need_lse", [True, False])
def test_moba_grouped_and_gathered_paths_equal_the_reference(dtype, T, S, need_lse):
    # block_q divides block_size and S - T is a multiple of block_q: the grouped path applies. (51, 131) and
    # (20, 84) start inside a block (the block's earlier keys are seen in full).
    q, k, v = qkv(T, S, 2, dtype, seed=10)
    sel = moba_select(q, k, 2, 32)
    ref, ref_lse = moba_attention(q, k, v, sel, 32, block_q=16, reference=True)
    for grouped in (True, False):
        out, lse = moba_attention(q, k, v, sel, 32, block_q=16, need_lse=need_lse, fused=grouped)
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
        if need_lse:
            torch.testing.assert_close(lse, ref_lse, **TOL[dtype])
        else:
            assert lse is None
    # the selection is sparse: some queries do not see every earlier block
    assert not torch.allclose(ref.float(), dense(q, k, v).float(), atol=1e-2)


def test_moba_selection_matches_per_query_gate():
    T, bs, top_k = 70, 16, 3
    q, k, _ = qkv(T, T, 2, seed=7)
    sel = moba_select(q, k, top_k, bs)
    kk = k.repeat_interleave(2, 1)
    means = torch.stack([kk[:, :, j * bs : (j + 1) * bs].mean(2) for j in range(-(-T // bs))], 2)
    for i in (0, 15, 16, 40, 69):
        own = i // bs
        for h in range(4):
            gate = means[1, h, :own] @ q[1, h, i]
            want = {own} | set(gate.topk(min(top_k - 1, own)).indices.tolist())
            got = {b for b in sel[1, h, i].tolist() if b >= 0}
            assert got == want


def test_quest_bound_is_an_upper_bound_and_selects_brute_force_pages():
    S, ps = 100, 16
    q, k, _ = qkv(1, S, 2, seed=8)
    pages = quest_select(q, k, 3, ps)
    kk = k.repeat_interleave(2, 1)
    for h in range(4):
        bounds, exact = [], []
        for p in range(-(-S // ps)):
            kp = kk[0, h, p * ps : (p + 1) * ps]
            bound = torch.maximum(q[0, h, 0] * kp.amin(0), q[0, h, 0] * kp.amax(0)).sum()
            bounds.append(bound)
            exact.append((kp @ q[0, h, 0]).max())
        bounds = torch.stack(bounds)
        assert (bounds >= torch.stack(exact) - 1e-5).all()
        assert set(pages[0, h, 0].tolist()) == set(bounds.topk(3).indices.tolist())


def test_gathered_attention_rejects_bad_indices():
    q, k, v = qkv(20, 20, 2)
    with pytest.raises(MethodError, match="'idx'"):
        gathered_attention(q, k, v, torch.zeros(2, 4, 3, 5, dtype=torch.long), block_q=16)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: a_shape_attention(q, k, v, -1, 4), "'sinks' must be an int >= 0"),
        (lambda q, k, v: a_shape_attention(q, k, v, 1, 0), "'window' must be an int >= 1"),
        (lambda q, k, v: block_sparse_attention(q, k, v, block_sparse_select(q, k, 2, 16), 0), "'block_size'"),
        (lambda q, k, v: moba_attention(q, k, v, moba_select(q, k, 2, 16), 16, block_q=0), "'block_q'"),
        (lambda q, k, v: a_shape_attention(q, k, v, 1, 4, dense=torch.ones(3, 3, dtype=torch.bool)), "'dense'"),
    ],
)
def test_bad_parameters_name_the_parameter(call, match):
    q, k, v = qkv(20, 20, 2)
    with pytest.raises(MethodError, match=match):
        call(q, k, v)


@pytest.mark.parametrize(
    "name,args",
    [
        ("moba", {"top_k": 0}),
        ("block_sparse", {"block_size": 8}),
        ("quest", {"page_size": 0}),
        ("vertical_slash", {"last_q": 0}),
        ("moba", {"skip_layers": -1}),
        ("a_shape", {"skip_last": -1}),
    ],
)
def test_registered_methods_check_their_ranges(name, args):
    with pytest.raises(MethodError, match=f"parameter '{next(iter(args))}' must be"):
        registry("attention").create(name, args)


def test_quest_changes_decoding_only_when_pages_are_dropped(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=150)
    with torch.inference_mode():
        ref = model(ids).logits[:, -1]
        results = {}
        for top_k in (2, 10):
            with longkit.apply(
                model, attention="quest", attention_args={"page_size": 16, "top_k": top_k, "skip_layers": 0}
            ) as applied:
                cache = applied.new_cache()
                prefill = model(ids[:, :-1], cache=cache, use_cache=True).logits[:, -1]
                results[top_k] = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
            # Prefill is dense.
            torch.testing.assert_close(prefill, model(ids[:, :-1]).logits[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[10], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(results[2], ref, atol=1e-3)


@pytest.mark.parametrize(
    "name,args",
    [
        ("vertical_slash", {"vertical_size": 4, "slash_size": 4, "sinks": 1, "local": 1, "block": 16}),
        ("block_sparse", {"block_size": 16, "top_k": 2}),
        ("moba", {"block_size": 16, "top_k": 2, "block_q": 16}),
        ("a_shape", {"sinks": 2, "window": 16, "block_q": 16}),
    ],
)
def test_model_prefill_matches_reference_path_layer_by_layer(tiny_llama, name, args):
    # Through the seam, the method's output per layer equals its reference path on the same q, k, v.

    method = registry("attention").create(name, args)
    seen = []
    original = method.attend

    def spy(module, q, k, v, dense_mask, scale):
        out = original(module, q, k, v, dense_mask, scale)
        seen.append((q, k, v, scale, out))
        return out

    method.attend = spy
    ids = sample_ids(tiny_llama, n=70)
    with torch.inference_mode():
        undo = method.apply(tiny_llama.model)
        try:
            tiny_llama.model(ids)
        finally:
            undo()
    assert len(seen) == tiny_llama.model.config.num_hidden_layers
    for q, k, v, scale, out in seen:
        torch.testing.assert_close(out, _reference_of(name, q, k, v, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["a_shape", "vertical_slash", "block_sparse", "moba", "minference", "quest"])
@pytest.mark.parametrize("skip_layers,skip_last", [(1, 0), (0, 1), (1, 1), (0, 0)])
def test_skipped_layers_are_dense_and_the_others_sparse(monkeypatch, tiny_llama, name, skip_layers, skip_last):
    import longkit.attention.quest as quest_module

    model = tiny_llama.model
    n = model.config.num_hidden_layers
    method = registry("attention").create(name, {"skip_layers": skip_layers, "skip_last": skip_last})
    calls, current = [], []
    if name == "quest":
        # Quest is sparse at decoding only: record the layer of each page selection.
        select, attention = quest_module.quest_select, method.attention
        monkeypatch.setattr(quest_module, "quest_select", lambda *a: calls.append(current[-1]) or select(*a))
        method.attention = lambda module, *a: current.append(module.layer_idx) or attention(module, *a)
    else:
        attend = method.attend
        method.attend = lambda module, *a: calls.append(module.layer_idx) or attend(module, *a)
    ids = sample_ids(tiny_llama, n=70)
    with torch.inference_mode():
        undo = method.apply(model)
        try:
            cache = DynamicCache(config=model.config)
            model(ids, cache=cache, use_cache=True)
            model(ids[:, -1:], cache=cache, use_cache=True)
        finally:
            undo()
    assert sorted(set(calls)) == list(range(skip_layers, n - skip_last))


def test_all_layers_skipped_gives_the_dense_model(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=97)
    n = model.config.num_hidden_layers
    with torch.inference_mode():
        ref = model(ids).logits
        with longkit.apply(model, attention="moba", attention_args={"block_size": 16, "top_k": 1, "block_q": 16}):
            sparse = model(ids).logits
        for args in ({"skip_layers": n}, {"skip_last": n}, {"skip_layers": 1, "skip_last": n - 1}):
            args |= {"block_size": 16, "top_k": 1, "block_q": 16}
            with longkit.apply(model, attention="moba", attention_args=args):
                torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        with longkit.apply(
            model, attention="moba", attention_args={"block_size": 16, "top_k": 1, "block_q": 16, "skip_layers": 1}
        ):
            partial = model(ids).logits
    # One dense layer changes the result, and it is neither the dense nor the all-sparse one.
    assert not torch.allclose(sparse, ref, atol=1e-3)
    assert not torch.allclose(partial, ref, atol=1e-3) and not torch.allclose(partial, sparse, atol=1e-3)


def _reference_of(name, q, k, v, scale):
    """The reference path of the settings used in test_model_prefill_matches_reference_path_layer_by_layer."""
    if name == "vertical_slash":
        sel = vertical_slash_select(q, k, 4, 4, sinks=1, local=1, scale=scale)
        return vertical_slash_attention(q, k, v, sel, scale=scale, block=16, reference=True)[0]
    if name == "block_sparse":
        return block_sparse_attention(q, k, v, block_sparse_select(q, k, 2, 16), 16, scale=scale, reference=True)[0]
    if name == "moba":
        return moba_attention(q, k, v, moba_select(q, k, 2, 16), 16, scale=scale, block_q=16, reference=True)[0]
    return a_shape_attention(q, k, v, 2, 16, scale=scale, block_q=16, reference=True)[0]


@pytest.mark.parametrize(
    "name,args", [("moba", {"block_size": 32, "top_k": 2, "block_q": 16}), ("vertical_slash", {"block": 16})]
)
def test_fused_cpu_is_an_instance_switch_not_a_parameter(name, args):
    # The gather-free CPU path (MoBA grouped, vertical-slash banded) is on by default; turning it off on an
    # instance runs the gathered path, with the same output.
    method = registry("attention").create(name, args)
    assert method.fused_cpu and "fused_cpu" not in method.params()
    q, k, v = qkv(96, 96, 2, seed=11)
    outs = []
    for fused in (True, False):
        method.fused_cpu = fused
        outs.append(method.attend(None, q, k, v, None, None))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
