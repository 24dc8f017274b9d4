"""MaskSpec: the dense mask against rules written out by hand, tile classes against the dense mask, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from longkit.attention import EMPTY, FULL, PARTIAL, MaskSpec
from longkit.errors import MethodError

T, S = 23, 37
OFF = S - T
DOCS = torch.tensor([0] * 9 + [1] * 14 + [2] * 5 + [3] * 9)
BLOCKS = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)


def by_hand(rule) -> torch.Tensor:
    """(T, S) visibility from a per-(i, j) rule, query position p = OFF + i."""
    return torch.tensor([[bool(rule(i, OFF + i, j)) for j in range(S)] for i in range(T)])


RULES = {
    "none": (dict(causal=False), lambda i, p, j: True),
    "causal": (dict(q_offset=OFF), lambda i, p, j: j <= p),
    "window": (dict(q_offset=OFF, window=5), lambda i, p, j: p - 5 < j <= p),
    "window-not-causal": (dict(causal=False, q_offset=OFF, window=5), lambda i, p, j: j > p - 5),
    "sinks+window": (dict(q_offset=OFF, window=4, sinks=3), lambda i, p, j: j <= p and (j > p - 4 or j < 3)),
    "documents": (dict(q_offset=OFF, doc_ids=DOCS), lambda i, p, j: j <= p and DOCS[p] == DOCS[j]),
    "block-sparse": (dict(causal=False, block_mask=BLOCKS, block_size=8), lambda i, p, j: BLOCKS[i // 8, j // 8]),
    "all": (dict(q_offset=OFF, window=12, sinks=2, doc_ids=DOCS, block_mask=BLOCKS, block_size=8),
            lambda i, p, j: j <= p and (j > p - 12 or j < 2) and DOCS[p] == DOCS[j] and BLOCKS[i // 8, j // 8]),
}


@pytest.mark.parametrize("kind", list(RULES))
def test_dense_mask_follows_the_rule(kind):
    fields, rule = RULES[kind]
    dense = MaskSpec(**fields).to_dense(1, 1, T, S)
    assert dense.shape[-2:] == (T, S)
    assert torch.equal(dense.expand(1, 1, T, S)[0, 0], by_hand(rule))


def test_dense_mask_with_batch_and_head_dimensions():
    docs = torch.stack([DOCS, DOCS.flip(0)])
    heads = torch.rand(2, 3, T, S) > 0.5
    dense = MaskSpec(doc_ids=docs, dense=heads, q_offset=OFF).to_dense(2, 3, T, S)
    assert dense.shape == (2, 3, T, S)
    for b in range(2):
        expect = by_hand(lambda i, p, j, b=b: j <= p and docs[b, p] == docs[b, j])
        assert torch.equal(dense[b], expect[None] & heads[b])


@pytest.mark.parametrize("kind", list(RULES))
@pytest.mark.parametrize("block_q,block_k", [(4, 4), (5, 7), (16, 9), (64, 64)])
def test_tile_classes_agree_with_the_dense_mask(kind, block_q, block_k):
    spec = MaskSpec(**RULES[kind][0])
    dense = spec.to_dense(1, 1, T, S).expand(1, 1, T, S)[0, 0]
    classes = spec.tile_classes(1, 1, T, S, block_q, block_k)
    assert classes.shape == (math.ceil(T / block_q), math.ceil(S / block_k))
    for qi in range(classes.shape[0]):
        for kj in range(classes.shape[1]):
            tile = dense[qi * block_q : (qi + 1) * block_q, kj * block_k : (kj + 1) * block_k]
            c = classes[qi, kj].item()
            # EMPTY and FULL must be right (skipping / not masking); causal and window rules are exact.
            if c == EMPTY:
                assert not tile.any()
            elif c == FULL:
                assert tile.all()
            elif kind in ("causal", "window", "sinks+window", "block-sparse"):
                assert tile.any() and not tile.all()


def test_tile_classes_of_a_dense_mask_are_exact():
    dense = torch.zeros(2, 1, T, S, dtype=torch.bool)
    dense[:, :, :8, :10] = True
    dense[0, :, 8:16, 10:20] = True
    classes = MaskSpec(causal=False, dense=dense).tile_classes(2, 4, T, S, 8, 10)
    expect = torch.full((3, 4), EMPTY, dtype=torch.int8)
    expect[0, 0] = FULL
    # visible in batch row 0 only: neither skipped nor unmasked
    expect[1, 1] = PARTIAL
    assert torch.equal(classes, expect)


def test_causal_tiles_are_about_half():
    classes = MaskSpec().tile_classes(1, 1, 256, 256, 32, 32)
    assert (classes == EMPTY).sum() == 28 and (classes == PARTIAL).sum() == 8 and (classes == FULL).sum() == 28


def test_from_transformers_reads_the_sdpa_conventions():
    module = torch.nn.Module()
    module.is_causal = True
    module.sliding_window = None
    q, k = torch.zeros(1, 4, 5, 8), torch.zeros(1, 2, 9, 8)
    # Several queries and no mask: causal from the first key (prefill into an empty static cache).
    spec = MaskSpec.from_transformers(module, q, k, None)
    assert spec.causal and spec.q_offset == 0 and spec.window is None
    # One query: every key.
    spec = MaskSpec.from_transformers(module, q[:, :, :1], k, None, sliding_window=4)
    assert spec.q_offset == 8 and spec.window == 4
    module.is_causal = False
    assert not MaskSpec.from_transformers(module, q, k, None).causal
    boolean = torch.rand(1, 1, 5, 9) > 0.5
    assert MaskSpec.from_transformers(module, q, k, boolean).dense is boolean
    additive = torch.zeros(1, 1, 5, 9).masked_fill(~boolean, torch.finfo(torch.float32).min)
    assert torch.equal(MaskSpec.from_transformers(module, q, k, additive).dense, boolean)
    with pytest.raises(MethodError, match="additive"):
        MaskSpec.from_transformers(module, q, k, additive + 0.5)
    with pytest.raises(MethodError, match="attention_mask must have shape"):
        MaskSpec.from_transformers(module, q, k, boolean[..., :8])


@pytest.mark.parametrize("fields,match", [
    (dict(window=0), "'window' must be an int >= 1"),
    (dict(window=2.5), "'window' must be an int >= 1"),
    (dict(sinks=-1, window=3), "'sinks' must be an int >= 0"),
    (dict(sinks=2), "'sinks' needs 'window'"),
    (dict(q_offset=-1), "'q_offset' must be an int >= 0"),
    (dict(doc_ids=torch.zeros(S)), "'doc_ids' must be an integer tensor"),
    (dict(block_mask=BLOCKS), "'block_size' must be an int >= 1"),
    (dict(block_mask=BLOCKS.long(), block_size=8), "'block_mask' must be a bool tensor"),
    (dict(block_size=8), "'block_size' is given without 'block_mask'"),
    (dict(dense=torch.ones(T, S)), "'dense' must be a bool tensor"),
])
def test_bad_fields_name_the_parameter(fields, match):
    with pytest.raises(MethodError, match=match):
        MaskSpec(**fields)


@pytest.mark.parametrize("fields,match", [
    (dict(doc_ids=DOCS[:-1]), r"'doc_ids' must have shape \(S,\) or \(B, S\) = \(37,\) or \(1, 37\)"),
    (dict(doc_ids=torch.stack([DOCS] * 3)), "'doc_ids' must have shape"),
    (dict(doc_ids=DOCS, q_offset=20), "'q_offset' = 20 puts queries past"),
    (dict(block_mask=BLOCKS[:, :4], block_size=8), r"'block_mask' must have shape .* = \(3, 5\)"),
    (dict(block_mask=BLOCKS, block_size=16), r"'block_mask' must have shape .* = \(2, 3\)"),
    (dict(block_mask=BLOCKS[None, None].expand(1, 2, 3, 5), block_size=8), "'block_mask' must have shape"),
    (dict(dense=torch.ones(T, S + 1, dtype=torch.bool)), r"'dense' must have shape \(T, S\) = \(23, 37\)"),
    (dict(dense=torch.ones(3, 1, T, S, dtype=torch.bool)), "'dense' must have shape"),
])
def test_masks_that_do_not_fit_name_the_parameter(fields, match):
    spec = MaskSpec(**fields)
    with pytest.raises(MethodError, match=match):
        spec.to_dense(1, 4, T, S)
    with pytest.raises(MethodError, match=match):
        spec.tile_classes(1, 4, T, S, 16, 16)
