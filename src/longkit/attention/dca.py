"""Dual Chunk Attention (DCA): chunked key positions with intra-, successive- and inter-chunk query positions.

The sequence is cut into chunks of c = s - w tokens and every key sits at ``j mod c``. A query in chunk b
attends its own chunk with its query at ``p mod c`` (exact, causal), chunk b - 1 with its query at
``min(p mod c + c, s)`` and chunks 0 .. b - 2 with its query at ``min(2c - 1, s)``, so no relative distance
exceeds s. Each part runs blockwise per query chunk and the parts are merged through their log-sum-exp,
as ``HKUNLP/ChunkLlama`` merges its three flash-attention calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import check_args
from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.lse import merge_partials
from longkit.attention.masks import MaskSpec
from longkit.attention.position_remap import RemapAttention, attend_part, check_remap_qkv
from longkit.errors import MethodError
from longkit.registry import param, register
from longkit.rope.rotation import rotate_by


def check_sizes(chunk_size: int, local_window: int) -> tuple[int, int]:
    """``(s, w)`` if the local window fits inside a chunk, w < s (the relation the declared ranges cannot say)."""
    if local_window >= chunk_size:
        raise MethodError(
            f"dca attention: parameter 'local_window' must be < chunk_size = {chunk_size} (got {local_window})"
        )
    return chunk_size, local_window


def _part(
    qb: torch.Tensor,
    qpos: torch.Tensor,
    kc: torch.Tensor,
    v: torch.Tensor,
    dense: torch.Tensor | None,
    inv_freq: torch.Tensor,
    scale: float | None,
    tiles: dict[str, Any],
    new_pos: torch.Tensor,
    j0: int,
    j1: int,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DCA part: the query rows ``qb`` (rotated at ``qpos``) moved to ``new_pos`` against keys j0 .. j1 - 1.

    Causal (the intra-chunk part) aligns the first query position with its own key; the successive and
    inter parts see every key of their range.
    """
    # (B, H, rows, D) queries at the part's positions (chunk 0's intra part keeps them where they are)
    qr = qb if torch.equal(qpos, new_pos) else rotate_by(qb, qpos, new_pos, inv_freq)
    part_dense = None if dense is None else dense[..., j0:j1]
    if causal:
        mask = MaskSpec(causal=True, q_offset=int(qpos[0]) - j0, dense=part_dense)
    else:
        mask = None if part_dense is None else MaskSpec(causal=False, dense=part_dense)
    return attend_part(qr, kc[:, :, j0:j1], v[:, :, j0:j1], mask, scale, **tiles)


def dca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    chunk_size: int,
    local_window: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention (:class:`DualChunkAttention`) over RoPE-rotated q and k: intra + successive + inter
    parts, each blockwise, LSE-merged.

    Query i sits at position ``p = S - T + i`` and key j at position j (a cache holds the keys in order), so
    prefill and cached decoding take the same path. Keys are re-rotated once to ``j mod c``; for each query
    chunk b the queries are re-rotated to the intra, successive and inter positions and attend keys of chunk b
    (causal), chunk b - 1 and chunks < b - 1. Memory O(S·D + tiles), never O(T·S). Based on
    https://arxiv.org/abs/2402.17463 (An et al. 2024, ``HKUNLP/ChunkLlama``).

    chunk_size: int >= 2, s. local_window: int >= 0 and < s, w; chunks hold c = s - w tokens. The tensors, the
    keyword arguments and the result ``(out, lse)`` are as :func:`remapped_attention`'s.
    """
    check_args(DualChunkAttention, chunk_size=chunk_size, local_window=local_window)
    s, w = check_sizes(chunk_size, local_window)
    _, _, _, T, S, _ = check_remap_qkv("dca", q, k, v)
    tiles = {"block_q": block_q, "block_k": block_k, "fused": fused}
    c, off = s - w, S - T
    # (B, H_kv, S, D): every key at its in-chunk position j mod c; chunk 0's keys are there already (a prefill
    # shorter than one chunk rotates nothing)
    kc = k
    if S > c:
        kpos = torch.arange(c, S, device=q.device)
        kc = torch.cat([k[:, :, :c], rotate_by(k[:, :, c:], kpos, kpos % c, inv_freq)], dim=2)
    outs, lses = [], []
    for b in range(off // c, (S - 1) // c + 1):
        # queries of chunk b: positions p0 .. p1 - 1, rows r0 .. r1 - 1 of q; their chunk starts at key k0
        p0, p1 = max(b * c, off), min((b + 1) * c, S)
        r0, r1, k0 = p0 - off, p1 - off, b * c
        qpos = torch.arange(p0, p1, device=q.device)
        rows = (q[:, :, r0:r1], qpos, kc, v, None if dense is None else dense[:, :, r0:r1], inv_freq, scale, tiles)
        out, lse = _part(*rows, qpos % c, k0, p1, causal=True)
        if b >= 1:
            out, lse = merge_partials(out, lse, *_part(*rows, (qpos % c + c).clamp(max=s), k0 - c, k0))
        if b >= 2:
            out, lse = merge_partials(out, lse, *_part(*rows, torch.full_like(qpos, min(2 * c - 1, s)), 0, k0 - c))
        outs.append(out.to(q.dtype))
        lses.append(lse.float())
    # (B, H, T, D_v) and (B, H, T)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@register("attention", "dca")
@dataclass
class DualChunkAttention(RemapAttention):
    """Dual Chunk Attention: chunked positions so no relative distance exceeds the chunk size (training-free).

    Keys sit at ``j mod c`` (c = s - w); a query attends its own chunk at ``p mod c``, the previous chunk at
    ``min(p mod c + c, s)`` and older chunks at ``min(2c - 1, s)``: intra-, successive- and inter-chunk
    attention, merged by log-sum-exp. With the model's own RoPE, blockwise, in prefill and cached decoding.
    Based on An et al. 2024, Training-Free Long-Context Scaling of Large Language Models,
    https://arxiv.org/abs/2402.17463 (``HKUNLP/ChunkLlama``).

    Parameters:
        chunk_size: int >= 2 or None, s (default None: 3/4 of the trained length, ChunkLlama's choice).
        local_window: int >= 0 or None, w < s (default None: 1/16 of the trained length, ChunkLlama's choice).
        block_q, block_k: int >= 16, tile edges of the blockwise passes.
    """

    paper = (
        "Training-Free Long-Context Scaling of Large Language Models (An et al. 2024) https://arxiv.org/abs/2402.17463"
    )
    chunk_size: int | None = param(None, ge=2, help="chunk size s (None: 3/4 of the trained length)")
    local_window: int | None = param(None, ge=0, help="local window w < s (None: 1/16 of the trained length)")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size is not None and self.local_window is not None:
            check_sizes(self.chunk_size, self.local_window)

    def sizes(self, trained: int) -> tuple[int, int]:
        """(s, w) for a model trained at ``trained`` tokens; the defaults follow ``replace_with_chunkllama``."""
        s = trained * 3 // 4 if self.chunk_size is None else self.chunk_size
        w = trained // 16 if self.local_window is None else self.local_window
        return check_sizes(s, w)

    def attend(self, q, k, v, inv_freq, trained, **kw):
        return dca_attention(q, k, v, inv_freq, *self.sizes(trained), **kw)
