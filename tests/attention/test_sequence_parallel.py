"""Ring (zigzag) and Ulysses sequence parallelism: 2 gloo ranks on CPU against single-process attention.

Each launch spawns two processes (a few seconds each), so one launch checks many cases; a failed assertion in a
rank fails the launch with that rank's traceback.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longkit
from longkit.attention import reference_attention, ring_attention, ulysses_attention
from longkit.attention.masks import MaskSpec
from longkit.attention.sequence_parallel import (
    check_length,
    gather_order,
    rank_and_size,
    sequence_parallel,
    shard,
    shard_index,
    unshard,
)
from longkit.errors import MethodError

WORLD = 2


def _entry(rank: int, fn_name: str, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world)
        # No rank tears gloo down while a peer may still be reading its last message: that race aborted a rank
        # (SIGABRT, "terminate called without an active exception") once in CI after the checks had run.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check passed: leave without interpreter finalisation, where gloo's worker threads can abort a
    # process that has already succeeded (pytorch/pytorch#179291). A failed check raised above and is reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(fn_name: str, tmp_path, world: int = WORLD) -> None:
    # A file store needs no free port; each launch gets a fresh file.
    init_file = str(tmp_path / f"{fn_name}.store")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(fn_name, world, init_file), nprocs=world, join=True)


def _inputs(B, H, H_kv, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, H_kv, H_kv))
    # Upstream gradients for out and lse, so both backward paths are checked.
    g_out, g_lse = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, generator=g)
    return q, k, v, g_out, g_lse


def _reference(q, k, v, causal, g_out, g_lse, with_lse=True, docs=None):
    leaves = [x.float().detach().requires_grad_() for x in (q, k, v)]
    out, lse = reference_attention(*leaves, MaskSpec(causal=True, doc_ids=docs) if causal else None)
    loss = (out * g_out).sum() + ((lse * g_lse).sum() if with_lse else 0)
    loss.backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def _close(actual, expected, dtype, what):
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")


def _check_ring(rank, W, B, H, H_kv, T, D, dtype, causal, seed, group=None, docs=None):
    q, k, v, g_out, g_lse = _inputs(B, H, H_kv, T, D, dtype, seed)
    out, lse, grads = _reference(q, k, v, causal, g_out, g_lse, docs=docs)
    local = [shard(x, 2, group).detach().requires_grad_() for x in (q, k, v)]
    o, lse_local = ring_attention(*local, causal=causal, group=group, block_q=16, block_k=16, doc_ids=docs)
    assert o.dtype == dtype and lse_local.dtype == torch.float32
    # Rows that see no key (none with causal documents: a query sees itself) would have lse -inf.
    ((o.float() * shard(g_out, 2, group)).sum() + (lse_local * shard(g_lse, 2, group)).sum()).backward()
    case = f"ring rank {rank}/{W} {dtype} causal={causal} T={T} H={H} H_kv={H_kv} docs={docs is not None}"
    _close(o, shard(out, 2, group), dtype, f"{case} out")
    _close(lse_local, shard(lse, 2, group), dtype, f"{case} lse")
    for name, x, g in zip("qkv", local, grads, strict=True):
        _close(x.grad, shard(g, 2, group), dtype, f"{case} d{name}")
    # The gathered output is the whole sequence in global order.
    _close(unshard(o.detach(), 2, group), out, dtype, f"{case} unshard")


def _check_ulysses(rank, W, B, H, H_kv, T, D, dtype, causal, seed, docs=None):
    q, k, v, g_out, g_lse = _inputs(B, H, H_kv, T, D, dtype, seed)
    out, _, grads = _reference(q, k, v, causal, g_out, g_lse, with_lse=False, docs=docs)
    local = [shard(x, dim=2, layout="contiguous").detach().requires_grad_() for x in (q, k, v)]
    o = ulysses_attention(*local, causal=causal, doc_ids=docs, block_q=16, block_k=16)
    assert o.dtype == dtype
    (o.float() * shard(g_out, 2, layout="contiguous")).sum().backward()
    case = f"ulysses rank {rank}/{W} {dtype} causal={causal} T={T} H={H} H_kv={H_kv}"
    _close(o, shard(out, 2, layout="contiguous"), dtype, f"{case} out")
    for name, x, g in zip("qkv", local, grads, strict=True):
        _close(x.grad, shard(g, 2, layout="contiguous"), dtype, f"{case} d{name}")


def _primitives(rank, W):
    assert rank_and_size() == (rank, W)
    # Zigzag: per-rank length 2c with an odd chunk c = 5 (T = 20), GQA, blocks smaller than a chunk.
    _check_ring(rank, W, 2, 4, 2, 20, 16, torch.float32, True, 0)
    # Local length 36 > block 16: several tiles per step, and a half-query step that starts mid-tile.
    _check_ring(rank, W, 1, 4, 1, 72, 8, torch.float32, True, 1)
    _check_ring(rank, W, 1, 2, 2, 12, 16, torch.float32, False, 2)
    _check_ring(rank, W, 1, 4, 2, 44, 16, torch.bfloat16, True, 3)
    # Ulysses: odd per-rank length 7, GQA split over ranks, replicated single key/value head, bf16.
    _check_ulysses(rank, W, 2, 4, 2, 14, 16, torch.float32, True, 4)
    _check_ulysses(rank, W, 1, 4, 1, 10, 8, torch.float32, True, 5)
    _check_ulysses(rank, W, 1, 2, 2, 12, 16, torch.float32, False, 6)
    _check_ulysses(rank, W, 1, 4, 2, 22, 16, torch.bfloat16, True, 7)
    # Bad input is refused before any communication, identically on every rank.
    q = torch.randn(1, 4, 7, 16)
    with pytest.raises(MethodError, match="must be even"):
        ring_attention(q, q[:, :2], q[:, :2])
    with pytest.raises(MethodError, match="query heads H = 3 must be a multiple of the world size 2"):
        ulysses_attention(q[:, :3], q[:, :3], q[:, :3])
    with pytest.raises(MethodError, match="H_kv = 3 must be a multiple or a divisor of the world size 2"):
        ulysses_attention(torch.randn(1, 6, 7, 16), q[:, :3], q[:, :3])
    with pytest.raises(MethodError, match="block_q"):
        ring_attention(q[:, :, :6], q[:, :2, :6], q[:, :2, :6], block_q=8)


def _model(rank, W):
    lm = longkit.load_model("tiny-llama")
    model = lm.model
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    previous = model.config._attn_implementation
    for method in ("ring", "ulysses"):
        model.zero_grad()
        with sequence_parallel(model, method=method, block_q=16, block_k=16) as sp:
            out = sp(ids, labels=ids)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
            out.loss.backward()
            sp.sync_gradients()
            for n, p in model.named_parameters():
                torch.testing.assert_close(
                    p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n, method=method: f"{method} {n}: {m}"
                )
            # Local logits only, and a sharded forward with the wrong positions is refused (RoPE would be wrong).
            assert sp(ids[:, :8], gather_logits=False).logits.shape == (2, 8 // W, model.config.vocab_size)
            with torch.no_grad(), pytest.raises(MethodError, match="position_ids"):
                model(input_ids=ids[:, : 8 // W], position_ids=torch.arange(8 // W)[None] + 100, use_cache=False)
            # Decoding after a sharded prefill would attend to this rank's keys only: refused.
            with torch.no_grad():
                pre = model(
                    input_ids=sp.shard(ids[:, :8]), position_ids=sp.shard(torch.arange(8)[None]), use_cache=True
                )
                with pytest.raises(MethodError, match="no KV cache"):
                    model(input_ids=ids[:, 8:9], cache=pre.cache, use_cache=True)
        assert model.config._attn_implementation == previous


def _docs(lengths_per_row):
    """(B, T) document ids of rows packed from documents of the given lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def _packed_attention(rank, W):
    # T = 40 in 2W = 4 zigzag chunks of 10: documents inside a chunk, across one chunk boundary and across
    # several (the second row's long document spans chunks 0-2), a one-token document, rows that differ.
    docs = _docs([[3, 9, 1, 14, 13], [25, 5, 10]])
    _check_ring(rank, W, 2, 4, 2, 40, 8, torch.float32, True, 20, docs=docs)
    _check_ulysses(rank, W, 2, 4, 2, 40, 8, torch.float32, True, 21, docs=docs)
    # A document boundary exactly on the chunk boundaries, and one document over the whole row (= no docs).
    docs = _docs([[10, 10, 20], [40]])
    _check_ring(rank, W, 2, 2, 1, 40, 8, torch.float32, True, 22, docs=docs)
    _check_ulysses(rank, W, 2, 2, 2, 40, 8, torch.float32, True, 23, docs=docs)
    q = torch.randn(2, 2, 10, 8)
    with pytest.raises(MethodError, match="'doc_ids' must be non-decreasing"):
        ring_attention(q, q, q, doc_ids=torch.tensor([[0] * 10 + [1] * 5 + [0] * 5] * 2))
    with pytest.raises(MethodError, match="needs causal=True"):
        ring_attention(q, q, q, causal=False, doc_ids=torch.zeros(2, 20, dtype=torch.long))


def _packed_model(rank, W):
    # Packed rows (positions restarting per document) and PoSE-like rows (skipped positions, documents given):
    # logits, loss and gradients of the sharded forward equal one process's forward with the block-causal mask.
    from longkit.train.data import block_causal_mask

    model = longkit.load_model("tiny-llama").model
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    docs = _docs([[7, 15, 18], [30, 10]])
    starts = torch.cat([torch.zeros(2, 1, dtype=torch.long), (docs.diff(dim=1) != 0).long()], 1)
    # position within the document
    restart = torch.arange(40)[None] - torch.cummax(torch.arange(40)[None] * starts, dim=1).values
    skipped = restart + 100 * docs + torch.where(restart >= 4, 1000, 0)
    labels = ids.masked_fill(starts.bool(), -100)
    for positions, given in ((restart, None), (skipped, docs)):
        mask = block_causal_mask(docs)
        model.zero_grad()
        ref = model(input_ids=ids, labels=labels, position_ids=positions, attention_mask=mask, use_cache=False)
        ref.loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        for method in ("ring", "ulysses"):
            model.zero_grad()
            with sequence_parallel(model, method=method, block_q=16, block_k=16) as sp:
                out = sp(ids, labels=labels, position_ids=positions, doc_ids=given)
                torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
                out.loss.backward()
                sp.sync_gradients()
                for n, p in model.named_parameters():
                    torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4,
                                               msg=lambda m, n=n, method=method: f"{method} {n}: {m}")
                # Without the documents the sharded forward attends across them: the check above would fail.
                assert not torch.allclose(sp(ids, position_ids=torch.arange(40)[None].expand(2, -1)).logits,
                                          ref.logits, atol=1e-3)


def _three_ranks(rank, W):
    # W = 3: next and previous rank differ, and dK/dV make three hops, which two ranks cannot show.
    _check_ring(rank, W, 1, 2, 1, 18, 8, torch.float32, True, 10)
    _check_ring(rank, W, 1, 2, 2, 12, 8, torch.float32, False, 11)
    _check_ulysses(rank, W, 1, 6, 3, 9, 8, torch.float32, True, 12)
    _check_ulysses(rank, W, 1, 3, 1, 15, 8, torch.float32, True, 13)
    # A subgroup of global ranks 1 and 2: group ranks must map to the right global peers.
    sub = dist.new_group([1, 2])
    if rank > 0:
        _check_ring(rank - 1, 2, 1, 2, 1, 12, 8, torch.float32, True, 14, group=sub)
    # Packed documents over 6 zigzag chunks of 5: both off-diagonal step kinds meet shared documents.
    docs = _docs([[2, 6, 11, 3, 8], [12, 18]])
    _check_ring(rank, W, 2, 2, 1, 30, 8, torch.float32, True, 15, docs=docs)
    _check_ulysses(rank, W, 2, 3, 3, 30, 8, torch.float32, True, 16, docs=docs)


def _all(rank, W):
    _primitives(rank, W)
    _model(rank, W)
    _packed_attention(rank, W)
    _packed_model(rank, W)


def test_ring_and_ulysses_on_two_gloo_ranks_equal_single_process_attention_and_model(tmp_path):
    # One launch (spawning costs seconds): ring / Ulysses forward and dQ, dK, dV against reference attention,
    # then tiny-llama logits, loss and parameter gradients sequence-parallel against one process.
    _launch("_all", tmp_path)


def test_ring_and_ulysses_on_three_gloo_ranks_and_a_subgroup(tmp_path):
    _launch("_three_ranks", tmp_path, world=3)


def test_zigzag_shards_cover_the_sequence_and_balance_causal_work():
    T, W = 24, 3
    parts = [shard_index(T, W, r) for r in range(W)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(T))
    assert parts[0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    # Causal work of a token is its position + 1; zigzag gives every rank the same total.
    assert len({int((p + 1).sum()) for p in parts}) == 1
    order = gather_order(T, W)
    assert torch.equal(torch.cat(parts)[order], torch.arange(T))
    contiguous = [shard_index(T, W, r, "contiguous") for r in range(W)]
    assert contiguous[1].tolist() == list(range(8, 16))


def test_bad_lengths_and_layouts_name_the_rule():
    with pytest.raises(MethodError, match="multiple of 4"):
        check_length(10, 2, "zigzag")
    with pytest.raises(MethodError, match="multiple of 3"):
        check_length(10, 3, "contiguous")
    with pytest.raises(MethodError, match="layout"):
        check_length(12, 2, "striped")
    with pytest.raises(MethodError, match="method"):
        with sequence_parallel(torch.nn.Linear(1, 1), method="megatron"):
            pass


def test_single_process_ring_and_ulysses_equal_the_reference(tiny_llama):
    # No process group: world size 1, the ring is one local causal step and Ulysses plain attention.
    q, k, v, _, _ = _inputs(1, 4, 2, 18, 16, torch.float32, 9)
    ref, lse, _ = _reference(q, k, v, True, torch.zeros(1, 4, 18, 16), torch.zeros(1, 4, 18))
    out, out_lse = ring_attention(q, k, v, block_q=16, block_k=16)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out_lse, lse, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ulysses_attention(q, k, v), ref, atol=2e-6, rtol=1e-5)
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_llama.model(ids).logits
        for method in ("ring", "ulysses"):
            with sequence_parallel(tiny_llama.model, method=method) as sp:
                torch.testing.assert_close(sp(ids).logits, want, atol=1e-5, rtol=1e-4)
                # An all-ones mask (as tokenizers return) is accepted; padding and caches are refused.
                sp(ids, attention_mask=torch.ones_like(ids))
                with pytest.raises(MethodError, match="padded"):
                    sp(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))
                with pytest.raises(MethodError, match="use_cache"):
                    sp(ids, use_cache=True)


def test_backend_follows_the_device():
    from longkit.attention.sequence_parallel import default_backend

    assert default_backend("cuda") == "nccl"
    assert default_backend(torch.device("cuda", 1)) == "nccl"
    assert default_backend("cpu") == "gloo"
    assert default_backend(None) == ("nccl" if torch.cuda.is_available() else "gloo")


def test_init_distributed_without_torchrun_environment_names_the_variables(monkeypatch):
    from longkit.attention.sequence_parallel import init_distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MethodError, match=r"RANK.*WORLD_SIZE.*MASTER_ADDR.*MASTER_PORT.*torchrun"):
        init_distributed("cpu")


def test_init_distributed_on_cuda_takes_nccl_and_the_local_rank_gpu(monkeypatch):
    # No GPU here: record what init_distributed asks torch for on a CUDA device instead of running it.
    import importlib

    sp = importlib.import_module("longkit.attention.sequence_parallel")  # the module, not the function
    calls = []
    monkeypatch.setattr(sp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(sp.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(sp.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(sp.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sp.init_distributed("cuda") == (3, 4)
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    assert sp.init_distributed("cpu") == (3, 4)
    assert calls == [("init", "gloo")]
