"""CaM (cache merging): the merge rule against plain loops, and the method through the seam on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import run_kv, sample_ids
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes
from longkit.kvcache.base import ScoreContext
from longkit.kvcache.cam import CaM, merge_into_following, merge_weights


def _merge_loop(values, keep, weight, merge):
    """Plain reference: walk every evicted slot and add its share to the next ``merge`` kept slots."""
    out = values.double().clone()
    B, H, S, _ = values.shape
    for b in range(B):
        for h in range(H):
            for e in range(S):
                if keep[b, h, e] or weight[b, h, e] == 0:
                    continue
                targets = [j for j in range(e + 1, S) if keep[b, h, j]][:merge]
                for j in targets:
                    out[b, h, j] += weight[b, h, e].double() * values[b, h, e].double() / merge
    return out


# ---- the merge rule -------------------------------------------------------------------------------------------------


def test_merge_on_a_hand_example_is_exact():
    # one head, 6 slots, D = 2; slots 1, 3 and 4 are evicted
    values = torch.tensor([[1.0, 0.0], [4.0, 8.0], [0.0, 1.0], [2.0, 2.0], [8.0, 0.0], [0.0, 0.0]])[None, None]
    keep = torch.tensor([True, False, True, False, False, True])[None, None]
    weight = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.25, 0.0])[None, None]
    got = merge_into_following(values, keep, weight, merge=2)
    # slot 1 -> slots 2 and 5, 0.5 * (4, 8) / 2 = (1, 2) each; slot 3 -> slot 5 only, (2, 2) / 2 = (1, 1);
    # slot 4 -> slot 5 only, 0.25 * (8, 0) / 2 = (1, 0); kept slot 0 is before every evicted slot: unchanged
    want = torch.tensor([[1.0, 0.0], [4.0, 8.0], [1.0, 3.0], [2.0, 2.0], [8.0, 0.0], [3.0, 3.0]])[None, None]
    assert torch.equal(got, want)


@pytest.mark.parametrize("merge", [1, 3, 20])
def test_merge_equals_the_plain_loop_on_random_ragged_selections(merge):
    g = torch.Generator().manual_seed(merge)
    values = torch.randn(2, 3, 17, 5, generator=g)
    keep = torch.rand(2, 3, 17, generator=g) < 0.4
    keep[0, 0] = False  # a head that keeps nothing receives nothing
    weight = torch.rand(2, 3, 17, generator=g).masked_fill(keep, 0.0)
    got = merge_into_following(values, keep, weight, merge)
    torch.testing.assert_close(got.double(), _merge_loop(values, keep, weight, merge), rtol=0, atol=1e-6)


def test_merge_probability_is_attention_over_the_largest_kept_attention():
    attn = torch.tensor([0.1, 0.4, 0.2, 0.05, 0.25])[None, None]
    keep = torch.tensor([True, False, True, False, True])[None, None]
    got = merge_weights(attn, keep, ~keep)
    # largest kept attention 0.25: 0.4 / 0.25 clamps to 1, 0.05 / 0.25 = 0.2
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.0, 0.2, 0.0])[None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_values_of_the_method_equal_a_plain_computation(dtype):
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, S, D, T = 1, 4, 2, 13, 8, 13
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, S, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, S, D, generator=g).to(dtype)
    valid = torch.ones(B, H_kv, S, dtype=torch.bool)
    ctx = ScoreContext(
        module=None, layer=None, cache=SimpleNamespace(decode_steps=0), layer_idx=0, num_layers=1,
        queries=q, keys=k, values=v, valid=valid, n_new=T, scaling=D**-0.5,
        real_seen=torch.tensor([S]), decoding=False,
    )  # fmt: skip
    method = CaM(tokens=6, window=3, kernel=1, merge=2, mode="expected")
    keep = method.compress(ctx)
    got = method.merge_values(ctx, keep)
    # plain: the window's softmax attention, causal, averaged over window queries and the 2 query heads of a kv head
    qf, kf = q.double(), k.double().repeat_interleave(2, 1)
    logits = qf[:, :, -3:] @ kf.transpose(-1, -2) * D**-0.5
    causal = torch.arange(S)[None, :] <= (S - 3 + torch.arange(3))[:, None]
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).mean(2).view(B, H_kv, 2, S).mean(2)
    kept_max = attn.masked_fill(~keep, 0).amax(-1, keepdim=True)
    prob = (attn / kept_max).clamp(max=1).masked_fill(keep, 0)
    want = _merge_loop(v.float(), keep, prob.float(), 2)
    assert got.dtype == dtype and int(keep.sum()) == 2 * 6
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.01, atol=0.01)
    torch.testing.assert_close(got.double(), want, **tol)
    assert not torch.equal(got, v)


def test_sampled_merge_draws_zero_or_full_weight_and_is_reproducible():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4)
    ctx = ScoreContext(
        module=None, layer=None, cache=SimpleNamespace(decode_steps=0), layer_idx=0, num_layers=1,
        queries=q, keys=k, values=v, valid=torch.ones(1, 2, 9, dtype=torch.bool), n_new=9, scaling=0.5,
        real_seen=torch.tensor([9]), decoding=False,
    )  # fmt: skip
    method = CaM(tokens=4, window=2, kernel=1, merge=1, mode="sample", seed=3)
    keep = method.compress(ctx)
    a, b = method.merge_values(ctx, keep), method.merge_values(ctx, keep)
    assert torch.equal(a, b)
    # with merge=1 each kept slot gains a sum of whole evicted values: solve for the 0/1 draws per head
    evicted = ~keep
    for h in range(2):
        diff = (a - v)[0, h]
        ev = v[0, h][evicted[0, h]]
        assert torch.isfinite(diff).all() and ev.shape[0] == 5
        # every evicted value is added fully or not at all: the total gain is a 0/1 combination of them
        combos = torch.tensor([[(m >> i) & 1 for i in range(5)] for m in range(32)], dtype=torch.float32)
        totals = combos @ ev
        assert bool(((totals - diff.sum(0)).abs().amax(-1) < 1e-5).any())


# ---- through the seam -------------------------------------------------------------------------------------------------


def test_keep_everything_is_the_uncompressed_model(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=30)
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        ref = [model(ids[:, :27], cache=dyn, use_cache=True).logits[:, -1:]]
        ref += [model(ids[:, i : i + 1], cache=dyn, use_cache=True).logits for i in range(27, 30)]
    ref = torch.cat(ref, 1)
    for spec in ("cam:ratio=1.0", "cam:tokens=64,mode=expected"):
        got, cache = run_kv(model, spec, ids)
        assert torch.equal(got, ref), spec
        assert cache_nbytes(cache) == cache_nbytes(dyn)


@pytest.mark.parametrize("spec", ["cam:ratio=0.25", "cam:ratio=0.25,mode=expected,merge=2,decode_every=2"])
def test_budget_is_honoured_bytes_are_exact_and_decoding_runs(tiny_llama, spec):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=67)
    got, cache = run_kv(model, spec, ids)
    assert torch.isfinite(got).all()
    H_kv, D = model.config.num_key_value_heads, 16
    k = 17 if "decode_every" in spec else 16 + 3
    assert [int(n.sum()) for n in cache.stored_tokens()] == [H_kv * k] * len(cache.layers)
    assert cache.get_seq_length() == 67
    # dense fp32 keys + values, no side arrays
    assert cache_nbytes(cache) == len(cache.layers) * 2 * H_kv * k * D * 4


def test_per_head_threshold_budget_stores_ragged_merged_values(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    got, cache = run_kv(model, "cam:threshold=0.03,window=8,kernel=1", ids)
    assert torch.isfinite(got).all()
    assert any(layer.packed for layer in cache.layers)
    for layer in cache.layers:
        n = int(layer.stored_lengths().sum())
        extra = layer.lengths.numel() * 8 if layer.packed else 0
        assert layer.nbytes() == 2 * n * layer.keys.shape[-1] * 4 + extra


def test_merged_values_move_kept_tokens_towards_their_evicted_neighbours(tiny_llama):
    # Layer 0's keys/values depend on the embeddings only, so CaM and SnapKV (same scores) keep the same slots there;
    # SnapKV stores the plain values, CaM adds p_e * v_e (merge=1) to the first kept slot after each evicted e.
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=33)
    common = "tokens=12,window=4,kernel=1"
    _, snap = run_kv(model, f"snapkv:{common}", ids, n_decode=0)
    _, cam = run_kv(model, f"cam:{common},merge=1,mode=expected", ids, n_decode=0)
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        model(ids, cache=dyn, use_cache=True)
    full_k, full_v = dyn.layers[0].keys, dyn.layers[0].values  # (1, H_kv, 33, D)
    s_layer, c_layer = snap.layers[0], cam.layers[0]
    assert torch.equal(s_layer.keys, c_layer.keys)
    checked = 0
    for h in range(full_k.shape[1]):
        # recover the kept slots from the (unchanged) keys
        kept = [int((full_k[0, h] == key).all(-1).nonzero()[0]) for key in c_layer.keys[0, h]]
        assert torch.equal(s_layer.values[0, h], full_v[0, h, kept])
        diff = c_layer.values[0, h] - s_layer.values[0, h]
        assert diff.abs().sum() > 0
        for i, j in enumerate(kept):
            prev = kept[i - 1] if i else -1
            run = list(range(prev + 1, j))
            if not run:
                assert torch.equal(diff[i], torch.zeros_like(diff[i]))  # nothing evicted just before: unchanged
            elif len(run) == 1:
                # a single evicted neighbour: the change is that neighbour's value scaled by its probability in [0, 1]
                ve = full_v[0, h, run[0]]
                coef = (diff[i] @ ve) / (ve @ ve)
                assert 0.0 <= float(coef) <= 1.0 + 1e-6
                torch.testing.assert_close(diff[i], coef * ve, rtol=0, atol=1e-5)
                checked += 1
    assert checked > 0


def test_bad_parameters_are_clear_errors(tiny_llama):
    for spec, match in [("cam:merge=0", "merge"), ("cam:mode=mean", "mode"), ("cam:kernel=2", "kernel")]:
        with pytest.raises(MethodError, match=match):
            with longkit.apply(tiny_llama.model, kv=spec):
                pass


def test_quantised_storage_that_cannot_take_merged_values_is_a_clear_error(tiny_llama):
    ids = sample_ids(tiny_llama, n=20)
    with pytest.raises(MethodError, match="merges values"):
        run_kv(tiny_llama.model, "kivi:bits=2,group_size=16,evict=cam,ratio=0.5", ids, n_decode=0)
