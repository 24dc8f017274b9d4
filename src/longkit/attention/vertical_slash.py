"""MInference vertical-slash: top columns and top diagonals per head, estimated online from the last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.attention.reference import check_qkv
from longkit.attention.sparse import (
    SparseAttention,
    blocks_from_flags,
    check_dense,
    check_int,
    expand_blocks,
    gathered_attention,
    masked_reference,
    positions,
    tile_firsts,
)
from longkit.registry import param, register


@dataclass(frozen=True)
class VerticalSlash:
    """A vertical-slash selection: ``vertical`` (B, H, S) bool columns, ``slash`` (B, H, S) bool offsets.

    Key j is visible to the query at position p when ``vertical[j]`` or ``slash[p - j]`` (and j <= p).
    ``columns`` (B, H, n_v) and ``offsets`` (B, H, n_s) are the same sets as sorted index lists.
    """

    vertical: torch.Tensor
    slash: torch.Tensor
    columns: torch.Tensor
    offsets: torch.Tensor


def vertical_slash_select(
    q: torch.Tensor,
    k: torch.Tensor,
    vertical_size: int,
    slash_size: int,
    *,
    last_q: int = 64,
    sinks: int = 30,
    local: int = 100,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> VerticalSlash:
    """Estimate the vertical and slash indices of each head from the last ``last_q`` queries.

    The last queries' causal softmax attention over all keys is summed per column (vertical score) and per
    diagonal ``p - j`` (slash score). The first ``sinks`` columns and the ``local`` nearest diagonals are always
    kept and count towards the ``max(vertical_size, sinks)`` columns and ``max(slash_size, local)`` diagonals
    kept per head (MInference's ``inf`` trick). Based on ``vertical_slash_sparse_attention`` in
    https://github.com/microsoft/MInference (``minference/modules/minference_forward.py``).
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, k)
    scale = D**-0.5 if scale is None else float(scale)
    n = min(last_q, T)
    group = H // H_kv
    # (B, H_kv, group · n, D) @ (B, H_kv, D, S) -> (B, H, n, S): the last queries against every key
    qa = q[:, :, T - n :].float().reshape(B, H_kv, group * n, D)
    scores = (torch.matmul(qa, k.float().transpose(-1, -2)) * scale).view(B, H, n, S)
    pos = positions(T, S, q.device)[T - n :]
    # (n, S) offsets p - j of each (query, key) pair; negative = future
    off = pos[:, None] - torch.arange(S, device=q.device)[None, :]
    visible = (off >= 0)[None, None]
    if dense is not None:
        visible = visible & dense[:, :, T - n :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    # (B, H, S) attention mass per column and per diagonal
    vertical = probs.sum(2)
    slash = torch.zeros(B, H, S, device=q.device).scatter_add_(
        2, off.clamp(min=0).flatten().expand(B, H, -1), (probs * (off >= 0)).flatten(2)
    )
    vertical[..., :sinks] = float("inf")
    slash[..., :local] = float("inf")
    columns = vertical.topk(min(S, max(vertical_size, sinks)), dim=-1).indices.sort(-1).values
    offsets = slash.topk(min(S, max(slash_size, local)), dim=-1).indices.sort(-1).values
    v_flag = torch.zeros(B, H, S, dtype=torch.bool, device=q.device).scatter_(2, columns, True)
    s_flag = torch.zeros(B, H, S, dtype=torch.bool, device=q.device).scatter_(2, offsets, True)
    return VerticalSlash(v_flag, s_flag, columns, offsets)


def slash_blocks(sel: VerticalSlash, T: int, S: int, block: int) -> torch.Tensor:
    """(B, H, nq, nk) bool: the key blocks of ``block`` keys that each query tile's selected diagonals cross.

    A diagonal at offset o crosses keys ``f - o .. l - o`` for a tile of positions ``f .. l``: at most two blocks
    when tiles and blocks have one edge. MInference's kernel likewise computes the slashes as whole 64-wide blocks.
    """
    B, H, _ = sel.offsets.shape
    device = sel.offsets.device
    nq, nk = -(-T // block), -(-S // block)
    # (nq, 1) first and last position of each tile
    first = tile_firsts(T, S, block, device)[:, None]
    last = torch.clamp(first + block - 1, max=S - 1)
    # (B, H, nq, n_s)
    lo = first[None, None] - sel.offsets[:, :, None, :]
    hi = last[None, None] - sel.offsets[:, :, None, :]
    crosses = hi >= 0
    dump = nq * nk
    tile = torch.arange(nq, device=device)[None, None, :, None] * nk
    touched = torch.zeros(B, H, dump + 1, dtype=torch.bool, device=device)
    for edge in (lo.clamp(min=0), hi.clamp(min=0)):
        flat = torch.where(crosses, tile + edge // block, torch.full_like(edge, dump))
        touched.scatter_(2, flat.flatten(2), True)
    return touched[:, :, :dump].view(B, H, nq, nk)


def vertical_slash_mask(sel: VerticalSlash, T: int, S: int, block: int) -> torch.Tensor:
    """(B, H, T, S) bool mask the fast path computes: a selected column, or a key block a selected diagonal
    crosses in the query's tile (the reference adds the own tile and causality)."""
    device = sel.vertical.device
    rows = torch.arange(T, device=device) // block
    cols = torch.arange(S, device=device) // block
    return sel.vertical[:, :, None, :] | slash_blocks(sel, T, S, block)[:, :, rows][:, :, :, cols]


def vertical_slash_indices(sel: VerticalSlash, T: int, S: int, block: int) -> torch.Tensor:
    """(B, H, nq, L) earlier key indices per query tile of ``block`` rows: the key blocks its diagonals cross,
    then the selected columns outside those blocks (so no key is gathered twice), -1 = padding."""
    touched = slash_blocks(sel, T, S, block)
    nq = touched.shape[2]
    first = tile_firsts(T, S, block, touched.device)[:, None]
    # (B, H, nq, n_v): columns before the tile and not already inside a gathered block
    cols = sel.columns[:, :, None, :].expand(-1, -1, nq, -1)
    inside = torch.gather(touched, 3, cols // block)
    cols = torch.where((cols < first[None, None]) & ~inside, cols, torch.full_like(cols, -1))
    return torch.cat([expand_blocks(blocks_from_flags(touched), block, S), cols], dim=-1)


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: VerticalSlash,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block: int = 64,
    reference: bool = False,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention over a vertical-slash selection.

    Each query tile of ``block`` rows attends its own tile causally, the key blocks its selected diagonals cross
    (whole blocks, as MInference's kernel computes slashes) and its selected columns. Fast path: those keys are
    gathered per tile; ``reference=True`` builds the same (T, S) mask and calls the reference attention.
    Based on https://arxiv.org/abs/2407.02490 (MInference, vertical-slash head).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        sel: a :class:`VerticalSlash` from :func:`vertical_slash_select`. block: int >= 1, tile edge.
        dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    check_int("vertical_slash", "block", block, 1)
    B, H, _, T, S, _ = check_qkv(q, k, v)
    check_dense("vertical_slash", dense, B, H, T, S)
    if reference:
        mask = vertical_slash_mask(sel, T, S, block)
        return masked_reference(q, k, v, mask, dense=dense, scale=scale, block_q=block)
    idx = vertical_slash_indices(sel, T, S, block)
    return gathered_attention(q, k, v, idx, block_q=block, dense=dense, scale=scale, need_lse=need_lse)


@register("attention", "vertical_slash")
@dataclass
class VerticalSlashAttention(SparseAttention):
    """MInference vertical-slash: per head, the top columns and top diagonals estimated from the last queries.

    The last ``last_q`` queries attend to all keys; their attention summed per column and per diagonal picks
    ``vertical_size`` columns and ``slash_size`` diagonals per head (sink columns and local diagonals always
    kept). Prefill then attends exactly over the selected columns, the key blocks of ``block`` keys the selected
    diagonals cross (whole blocks, as MInference's kernel) and each query's own tile. Decoding is dense.
    Based on https://arxiv.org/abs/2407.02490 (Jiang et al. 2024, MInference 1.0).

    Parameters:
        vertical_size: int >= 1, columns kept per head (default 1000, MInference's default).
        slash_size: int >= 1, diagonals kept per head (default 6096, MInference's default).
        last_q: int >= 1, queries used to estimate the pattern (default 64).
        sinks: int >= 0, first columns always kept (default 30). local: int >= 0, nearest diagonals always kept
            (default 100).
        block: int >= 16, query tile / key block edge of the fast path (default 64).
    """

    paper = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
        "(Jiang et al. 2024) https://arxiv.org/abs/2407.02490"
    )
    vertical_size: int = param(1000, ge=1, help="columns kept per head")
    slash_size: int = param(6096, ge=1, help="diagonals kept per head")
    last_q: int = param(64, ge=1, help="last queries that estimate the pattern")
    sinks: int = param(30, ge=0, help="first columns always kept")
    local: int = param(100, ge=0, help="nearest diagonals always kept")
    block: int = param(64, ge=16, help="tile edge of the gathered fast path")

    def attend(self, module, q, k, v, dense, scale):
        sel = vertical_slash_select(
            q,
            k,
            self.vertical_size,
            self.slash_size,
            last_q=self.last_q,
            sinks=self.sinks,
            local=self.local,
            dense=dense,
            scale=scale,
        )
        out, _ = vertical_slash_attention(q, k, v, sel, dense=dense, scale=scale, block=self.block, need_lse=False)
        return out
