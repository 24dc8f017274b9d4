"""MInference vertical-slash: top columns and top diagonals per head, estimated online from the last queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longkit.attention.base import check_qkv
from longkit.attention.lse import fused_cpu_kernel, merge_partials_, require_fused_cpu_kernel
from longkit.attention.naive import masked_reference
from longkit.attention.sparse import (
    SparseAttention,
    check_sparse,
    gathered_attention,
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


def slash_band(sel: VerticalSlash, block: int) -> torch.Tensor:
    """(B, H, S) bool ``band[r]``: the keys ``r >= 1`` positions before a query tile's first position that the
    tile's selected diagonals cross.

    A diagonal at offset o meets rows ``f .. f + block - 1`` of a tile at keys ``f - o .. f + block - 1 - o``, so
    the tile attends every key ``f - r`` with ``o - block + 1 <= r <= o``: the range MInference's kernel computes
    for a slash (``convert_vertical_slash_indexes``), the same for every tile. Keys ``r <= 0`` are the tile's own,
    which it always attends.
    """
    B, H, S = sel.slash.shape
    offsets = sel.offsets
    # A difference array: +1 where a diagonal's range starts, -1 past its end; o = 0 lies in the own tile.
    real = offsets >= 1
    diff = torch.zeros(B, H, S + 1, dtype=torch.int32, device=offsets.device)
    diff.scatter_add_(2, torch.where(real, (offsets - block + 1).clamp(min=1), S), real.int())
    diff.scatter_add_(2, torch.where(real, offsets + 1, S), -real.int())
    band = diff[..., :S].cumsum(-1) > 0
    band[..., 0] = False
    return band


def _relative(T: int, S: int, block: int, device: Any) -> torch.Tensor:
    """(T, S) long: each query's tile first position minus each key's index (r; keys r >= 1 lie before the tile)."""
    first = tile_firsts(T, S, block, device).repeat_interleave(block)[:T]
    return first[:, None] - torch.arange(S, device=device)[None, :]


def vertical_slash_mask(sel: VerticalSlash, T: int, S: int, block: int) -> torch.Tensor:
    """(B, H, T, S) bool mask both paths compute: a selected column, or a key in the band of the query's tile
    (:func:`slash_band`); the reference adds the own tile and causality."""
    band = slash_band(sel, block)
    r = _relative(T, S, block, band.device)
    # (B, H, T, S): band[r] for keys before the tile
    in_band = band[:, :, r.clamp(0, S - 1)] & (r >= 1)
    return sel.vertical[:, :, None, :] | in_band


def vertical_slash_indices(sel: VerticalSlash, T: int, S: int, block: int) -> torch.Tensor:
    """(B, H, nq, L) earlier key indices per query tile of ``block`` rows for the gathered path: the band of the
    tile's diagonals, then the selected columns outside it (so no key is gathered twice), -1 = padding."""
    band = slash_band(sel, block)
    B, H, _ = band.shape
    device = band.device
    first = tile_firsts(T, S, block, device)
    nq = first.shape[0]
    # (B, H, n_r) the band's offsets r, padded with S (past any tile)
    n_r = max(1, int(band.sum(-1).max()))
    rel = torch.where(band, torch.arange(S, device=device), S).sort(-1).values[..., :n_r]
    keys = first[None, None, :, None] - rel[:, :, None, :]
    keys = torch.where(keys >= 0, keys, -1)
    # (B, H, nq, n_v): columns before the tile and not already in its band
    cols = sel.columns[:, :, None, :].expand(-1, -1, nq, -1)
    r = first[None, None, :, None] - cols
    inside = torch.gather(band, 2, r.clamp(0, S - 1).flatten(2)).view(r.shape) & (r >= 1)
    cols = torch.where((r >= 1) & ~inside, cols, torch.full_like(cols, -1))
    return torch.cat([keys, cols], dim=-1)


def _runs(flags: torch.Tensor, gap: int) -> list[tuple[int, int]]:
    """Maximal runs ``(lo, hi)`` of True in a 1-D bool tensor, runs closer than ``gap`` joined into one."""
    f = flags.to(torch.int8)
    edges = torch.diff(f, prepend=f.new_zeros(1), append=f.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = ((edges == -1).nonzero().flatten() - 1).tolist()
    out: list[tuple[int, int]] = []
    for lo, hi in zip(starts, ends, strict=True):
        if out and lo - out[-1][1] - 1 < gap:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


#: Kernel calls per head above which close band runs are joined (their gaps masked).
MAX_RUNS = 32


def _band_runs(flags: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """The band's runs, each its own unmasked window; when there are more than :data:`MAX_RUNS`, runs closer
    than ``block`` (then 2, 4, ... x ``block``) keys are joined, trading masked gap keys for fewer kernel calls."""
    runs, gap = _runs(flags, 0), block
    while len(runs) > MAX_RUNS:
        runs, gap = _runs(flags, gap), 2 * gap
    return runs


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: VerticalSlash, block: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather-free CPU path of :func:`vertical_slash_attention` (no padding mask, no gradients).

    Every tile's band is the same set of offsets r before its first position, so one band run ``lo .. hi``
    is, for all tiles at once, a window of keys ``f_t - hi .. f_t - lo`` that starts ``block`` keys later per
    tile: a strided view of the (left-padded) keys, no copy. Each run, the own tiles and the columns go through
    torch's fused CPU flash kernel (which returns the log-sum-exp) and are merged by log-sum-exp. Many short
    runs are joined and their gaps masked (:func:`_band_runs`), which bounds the number of kernel calls.

    Returns ``(out (B, H, T, D_v) float32, lse (B, H, T) float32)``.
    """
    kernel = require_fused_cpu_kernel("vertical_slash", q, k, v)
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    group, Dv = H // H_kv, v.shape[-1]
    nq = -(-T // block)
    pad = nq * block - T
    device, dtype = q.device, q.dtype
    first = tile_firsts(T, S, block, device)
    band = slash_band(sel, block)
    neg = float("-inf")

    # Own tiles, all heads in one call: (B · nq, H, block, D) queries against their tile's keys, causally.
    # Keys past S (padding of the last tile) sit after every real query, so causality hides them.
    qp = F.pad(q, (0, 0, 0, pad))
    qt = qp.view(B, H, nq, block, D).transpose(1, 2).reshape(B * nq, H, block, D)

    def tiles(x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x[:, :, S - T :], (0, 0, 0, pad)).repeat_interleave(group, dim=1)
        return xp.view(B, H, nq, block, x.shape[-1]).transpose(1, 2).reshape(B * nq, H, block, x.shape[-1])

    o, lse = kernel(qt, tiles(k), tiles(v), 0.0, True, scale=scale)
    # (B, H, nq, block, D_v) float32 accumulators
    out = o.view(B, nq, H, block, Dv).transpose(1, 2).float().contiguous()
    lse = lse.view(B, nq, H, block).transpose(1, 2).float().contiguous()

    # Keys left-padded by S, so the window of any tile starts at a non-negative index: key j is row j + S.
    kp, vp = F.pad(k, (0, 0, S, 0)).contiguous(), F.pad(v, (0, 0, S, 0)).contiguous()
    for b in range(B):
        for h in range(H):
            hk = h // group
            kbh, vbh = kp[b, hk], vp[b, hk]
            qh = qp[b, h].view(nq, 1, block, D)
            for lo, hi in _band_runs(band[b, h], block):
                w = hi - lo + 1
                r = hi - torch.arange(w, device=device)
                gaps = ~band[b, h, r]
                # Tiles t0 .. t1 - 1 see part of the window before key 0; tiles from t1 on see all of it, and need
                # no mask unless joined runs left gaps (a masked kernel call is about 1.5x slower).
                t0, t1 = (int(x) for x in torch.searchsorted(first, torch.tensor([lo, hi], device=device)))
                for ta, tb in ((t0, t1), (t1, nq)):
                    if ta >= tb:
                        continue
                    n, start = tb - ta, int(first[ta]) - hi + S
                    # (n, 1, w, D) windows: tile t sees keys f_t - hi .. f_t - lo, block keys further per tile
                    kw = kbh.as_strided((n, 1, w, D), (block * D, w * D, D, 1), kbh.storage_offset() + start * D)
                    vw = vbh.as_strided((n, 1, w, Dv), (block * Dv, w * Dv, Dv, 1), vbh.storage_offset() + start * Dv)
                    bias = None
                    if ta < t1 or bool(gaps.any()):
                        # (n, 1, 1, w) additive mask: the gaps (r = hi - i off the band) and keys before 0
                        bias = torch.zeros(n, 1, 1, w, device=device, dtype=dtype)
                        bias.masked_fill_(gaps.view(1, 1, 1, w), neg)
                        bias.masked_fill_((first[ta:tb, None] - r[None, :] < 0).view(n, 1, 1, w), neg)
                    o, o_lse = kernel(qh[ta:tb], kw, vw, 0.0, False, attn_mask=bias, scale=scale)
                    merge_partials_(out[b, h, ta:tb], lse[b, h, ta:tb], o.view(n, block, Dv).float(), o_lse.view(n, block))
            # Columns before the tile and outside its band, for every tile at once: (nq, 1, n_v, D) broadcast keys.
            cols = sel.columns[b, h]
            r = first[:, None] - cols[None, :]
            inside = band[b, h][r.clamp(0, S - 1)] & (r >= 1)
            seen = (r >= 1) & ~inside
            rows = seen.any(-1)
            if not bool(rows.any()):
                continue
            n_v = cols.shape[0]
            kc = k[b, hk, cols].expand(nq, 1, n_v, D)
            vc = v[b, hk, cols].expand(nq, 1, n_v, Dv)
            bias = torch.zeros(nq, 1, 1, n_v, device=device, dtype=dtype)
            bias.masked_fill_(~seen.view(nq, 1, 1, n_v), neg)
            o, o_lse = kernel(qh, kc, vc, 0.0, False, attn_mask=bias, scale=scale)
            # Tiles with no column: the kernel returns 0 / 0 for a fully masked row, which must not count.
            o_lse = torch.where(rows[:, None], o_lse.view(nq, block).float(), neg)
            merge_partials_(out[b, h], lse[b, h], o.view(nq, block, Dv).float(), o_lse)
    out = out.view(B, H, nq * block, Dv)[:, :, :T]
    return out, lse.view(B, H, nq * block)[:, :, :T]


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
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention over a vertical-slash selection.

    Each query tile of ``block`` rows attends its own tile causally, the band of keys its selected diagonals
    cross (:func:`slash_band`, the ranges MInference's kernel computes) and its selected columns. Fast paths: on
    CPU without gradients or a padding mask, :func:`banded_attention` (strided windows, no gather); otherwise
    the keys are gathered per tile. ``reference=True`` builds the same (T, S) mask and calls the reference
    attention. Based on https://arxiv.org/abs/2407.02490 (MInference, vertical-slash head).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        sel: a :class:`VerticalSlash` from :func:`vertical_slash_select`. block: int >= 1, tile edge.
        dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        need_lse: False lets the gathered path use torch's fused sdpa (lse is then None).
        fused: False forces the gathered path where the banded one applies (tests compare both).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    _, _, _, T, S, D = check_sparse(VerticalSlashAttention, q, k, v, dense, block=block)
    if reference:
        mask = vertical_slash_mask(sel, T, S, block)
        return masked_reference(q, k, v, mask, dense=dense, scale=scale, block_q=block)
    if fused and dense is None and fused_cpu_kernel(q, k, v) is not None:
        out, lse = banded_attention(q, k, v, sel, block, D**-0.5 if scale is None else float(scale))
        return out.to(q.dtype), lse if need_lse else None
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
        skip_layers, skip_last: int >= 0, leading / trailing layers kept dense (default 0, 0).
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
        out, _ = vertical_slash_attention(
            q, k, v, sel, dense=dense, scale=scale, block=self.block, need_lse=False, fused=self.fused_cpu
        )
        return out
