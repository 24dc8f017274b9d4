"""Shared machinery of the sparse-attention methods (A-shape, vertical-slash, block-sparse, MoBA, Quest).

Every sparse method first *selects* which keys each query may see (a small index structure), then attends
over that selection in one of two ways that must agree:

- the reference path builds the explicit boolean (T, S) mask from the selection and calls
  :func:`longkit.attention.naive.masked_reference` (O(T·S) memory; tests only);
- the fast path, :func:`gathered_attention`, gathers per query tile the selected key indices, so a tile of
  ``block_q`` queries attends to ``L`` gathered keys instead of all ``S``: cost O(T·L·D) instead of O(T·S·D).

Positions: query ``i`` sits at position ``S - T + i`` (queries at the end of their keys: prefill, chunked
prefill, decoding) and key ``j`` at position ``j``; every method is causal on these positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from longkit.attention.base import AttentionMethod, check_args, check_qkv, transformers_inputs
from longkit.attention.masks import MaskSpec
from longkit.errors import MethodError
from longkit.registry import param

#: Float32 elements one chunk of query tiles may hold in scores and gathered keys (about 128 MB).
CHUNK_ELEMENTS = 32 * 2**20

#: Extra visibility rule for tiles ``t0 .. t1 - 1``: returns bool (B, H, t1 - t0, block_q, L) or None.
VisibleFn = Callable[[int, int], torch.Tensor]


def check_sparse(
    cls: type, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor | None, **args: Any
) -> tuple[int, int, int, int, int, int]:
    """The checks a sparse method's attention function starts with: ``args`` against the ranges ``cls`` declares,
    q, k, v (:func:`check_qkv`, whose ``(B, H, H_kv, T, S, D)`` it returns) and the optional extra (padding) mask
    ``dense``, bool (B|1, H|1, T, S), True = visible."""
    check_args(cls, **args)
    dims = B, H, _, T, S, _ = check_qkv(q, k, v)
    if dense is not None:
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or dense.ndim != 4:
            raise MethodError(f"{cls.name} attention: parameter 'dense' must be a bool tensor (B|1, H|1, T, S)")
        MaskSpec(causal=False, dense=dense).check(B, H, T, S)
    return dims


def positions(T: int, S: int, device: Any) -> torch.Tensor:
    """(T,) positions of the queries: the last T of S keys."""
    return torch.arange(S - T, S, device=device)


def grouped_keys(k: torch.Tensor, H: int) -> torch.Tensor:
    """(B, H, S, D) float32 keys per query head (GQA: each key head repeated for its group)."""
    return k.float().repeat_interleave(H // k.shape[1], dim=1)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` rows along dim 2: (B, h, N, D) -> (B, h, ceil(N / block), D) float32.

    A last partial block is averaged over the rows it has, not padded with zeros.
    """
    B, h, N, D = x.shape
    nb = -(-N // block)
    pad = nb * block - N
    xs = F.pad(x.float(), (0, 0, 0, pad)).view(B, h, nb, block, D).sum(3)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return xs / counts[:, None]


def mask_from_blocks(selected: torch.Tensor, T: int, S: int, block_q: int, block_k: int) -> torch.Tensor:
    """Expand a block selection (B, H, n_q_tiles, n_k_blocks) bool to a causal token mask (B, H, T, S)."""
    rows = torch.arange(T, device=selected.device) // block_q
    cols = torch.arange(S, device=selected.device) // block_k
    causal = torch.arange(S, device=selected.device)[None, :] <= positions(T, S, selected.device)[:, None]
    return selected[:, :, rows][:, :, :, cols] & causal


def blocks_from_flags(selected: torch.Tensor) -> torch.Tensor:
    """Selected block ids per query tile: bool (B, H, nq, nk) -> long (B, H, nq, U), ascending, -1 = padding.

    ``U`` is the largest number of blocks any tile selects.
    """
    nk = selected.shape[-1]
    U = max(int(selected.sum(-1).max()), 1)
    # Selected blocks first, in key order: topk of the flag plus a tie-break that decreases with the block id.
    order = torch.arange(nk, 0, -1, device=selected.device, dtype=torch.float32) / (nk + 1)
    top = (selected.float() + order).topk(min(U, nk), dim=-1).indices
    keep = torch.gather(selected, -1, top)
    return torch.where(keep, top, torch.full_like(top, -1))


def expand_blocks(blocks: torch.Tensor, block_k: int, S: int) -> torch.Tensor:
    """Key indices of block ids: long (B, H, nq, U) -> (B, H, nq, U · block_k), -1 for padding and past S."""
    # (B, H, nq, U, block_k)
    idx = blocks[..., None] * block_k + torch.arange(block_k, device=blocks.device)
    idx = torch.where((blocks[..., None] >= 0) & (idx < S), idx, torch.full_like(idx, -1))
    return idx.flatten(-2)


def tile_firsts(T: int, S: int, block_q: int, device: Any) -> torch.Tensor:
    """(nq,) position of the first query of each tile of ``block_q`` rows."""
    return torch.arange(-(-T // block_q), device=device) * block_q + (S - T)


def own_tile_mask(T: int, S: int, block_q: int, device: Any) -> torch.Tensor:
    """(T, S) bool: the keys of the query's own tile (positions from the tile's first query on), causal.

    The fast path always attends them, so every reference mask includes them."""
    first = tile_firsts(T, S, block_q, device).repeat_interleave(block_q)[:T, None]
    j = torch.arange(S, device=device)[None, :]
    return (j >= first) & (j <= positions(T, S, device)[:, None])


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    block_q: int,
    visible: VisibleFn | None = None,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each query tile over its own tile (causally) plus gathered earlier keys: the sparse fast path.

    Query tile ``t`` (rows ``t·block_q ..``, first position ``f_t``) attends to (a) the gathered keys
    ``idx[b, h, t]`` that lie before ``f_t`` (-1 = padding; each index at most once per tile; indices at or after
    ``f_t`` are ignored) and (b) the keys ``f_t ..`` of its own rows, causally. ``visible`` may narrow part (a) per
    row (a method's token-level rule) and ``dense`` both parts (padding). Per chunk of tiles, the keys of (a) and
    (b) are gathered into one block with an additive mask, vectorised over batch, heads and tiles; an ``idx``
    with one head (a selection shared by all heads) gathers once per key head. With ``need_lse=False`` and no
    padding mask the block runs through torch's fused sdpa; otherwise a float32 softmax that also gives the
    log-sum-exp. Memory O(chunk · block_q · L), never O(T · S).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        idx: long (B|1, H|1, ceil(T / block_q), L) earlier key indices per query tile.
        block_q: int >= 1, query rows per tile.
        visible: optional rule on part (a), see :data:`VisibleFn`.
        dense: optional bool (B|1, H|1, T, S) mask, True = visible.
        scale: score scale, default ``D ** -0.5``.
        need_lse: also return the log-sum-exp (else None, and the fused kernel may be used).

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32 or None)``.
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    nq = -(-T // block_q)
    if (
        idx.dtype != torch.long
        or idx.ndim != 4
        or idx.shape[0] not in (1, B)
        or idx.shape[1] not in (1, H)
        or idx.shape[2] != nq
    ):
        raise MethodError(
            f"sparse attention: 'idx' must be a long tensor (B|1, H|1, ceil(T / block_q), L) = ({B}, {H}, {nq}, L); "
            f"got {idx.dtype} {tuple(idx.shape)}"
        )
    group, Dv, L = H // H_kv, v.shape[-1], idx.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    pad = nq * block_q - T
    dev = q.device
    # One gather per query head, or per key head when the selection is shared by all heads.
    Bi, Hk_i, G = idx.shape[0], (H_kv if idx.shape[1] == H else 1), (group if idx.shape[1] == H else 1)
    # (B, H_kv, group, nq, block_q, D): padded rows are computed and dropped
    qt = F.pad(q, (0, 0, 0, pad)).view(B, H_kv, group, nq, block_q, D)
    first = tile_firsts(T, S, block_q, dev)
    # (nq, block_q) own-tile key positions; those past S are masked
    own = first[:, None] + torch.arange(block_q, device=dev)
    own_bias = torch.zeros(nq, block_q, block_q, device=dev).masked_fill_(
        ~(torch.ones(block_q, block_q, dtype=torch.bool, device=dev).tril() & (own < S)[:, None, :]), float("-inf")
    )
    own = own.clamp(max=S - 1)
    if dense is not None:
        # (B|1, H|1, nq · block_q, S): padded rows see nothing
        dense_p = F.pad(dense, (0, 0, 0, pad), value=False)
    # Fully masked rows (padding) would come out NaN from sdpa, so a padding mask takes the float32 path.
    fused = not need_lse and dense is None
    out = torch.empty(B, H_kv, group, nq, block_q, Dv, dtype=q.dtype if fused else torch.float32, device=dev)
    lse = None if fused else torch.empty(B, H_kv, group, nq, block_q, dtype=torch.float32, device=dev)
    chunk = max(1, CHUNK_ELEMENTS // max(1, B * H * (L + block_q) * (block_q + D + Dv)))
    b_ix = torch.arange(B, device=dev)[:, None, None, None, None]
    h_ix = torch.arange(H_kv, device=dev)[None, :, None, None, None]
    kc, vc = (k, v) if fused else (k.float(), v.float())
    for t0 in range(0, nq, chunk):
        t1 = min(nq, t0 + chunk)
        c = t1 - t0
        # (B|1, H_kv|1, group|1, c, L): earlier keys only; the rest is padding
        ic = idx[:, :, t0:t1].reshape(Bi, Hk_i, G, c, L)
        valid = (ic >= 0) & (ic < first[t0:t1, None])
        full = torch.cat([torch.where(valid, ic, torch.zeros_like(ic)), own[t0:t1].expand(Bi, Hk_i, G, -1, -1)], -1)
        # (B, H_kv, group|1, c, L + block_q, D): advanced indexing copies whole rows of D channels
        kg, vg = kc[b_ix, h_ix, full], vc[b_ix, h_ix, full]
        # (..., c, block_q, L + block_q) additive mask: the gathered part per column, the own tile a triangle
        past = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))[..., None, :]
        past = past.expand(*past.shape[:-2], block_q, L)
        if visible is not None:
            vis = visible(t0, t1).view(B, H_kv, group, c, block_q, L)
            past = past.masked_fill(~vis, float("-inf"))
        bias = torch.cat([past, own_bias[t0:t1].expand(*past.shape[:-1], block_q)], -1)
        if dense is not None:
            d = dense_p[:, :, t0 * block_q : t1 * block_q].expand(B, H, -1, -1)
            cols = full.expand(B, H_kv, group, -1, -1).reshape(B, H, c, 1, L + block_q)
            rows = cols.expand(-1, -1, -1, block_q, -1).reshape(B, H, c * block_q, L + block_q)
            seen = torch.gather(d, 3, rows).view(B, H_kv, group, c, block_q, L + block_q)
            bias = bias.masked_fill(~seen, float("-inf"))
        q_c = qt[:, :, :, t0:t1]
        if fused:
            # Fold the query heads of a key-head group into the rows when they share one gathered block.
            if G == 1 and group > 1:
                q_f = q_c.transpose(2, 3).reshape(B * H_kv, c, group * block_q, D)
                b_f = bias.expand(B, H_kv, 1, c, block_q, -1).transpose(2, 3)
                b_f = b_f.expand(-1, -1, -1, group, -1, -1).reshape(B * H_kv, c, group * block_q, L + block_q)
            else:
                q_f, b_f = (
                    q_c.reshape(-1, c, block_q, D),
                    bias.expand(B, H_kv, G, -1, -1, -1).reshape(-1, c, block_q, L + block_q),
                )
            k_f = kg.reshape(-1, c, L + block_q, D)
            v_f = vg.reshape(-1, c, L + block_q, Dv)
            o = F.scaled_dot_product_attention(q_f, k_f, v_f, attn_mask=b_f.to(q.dtype), scale=scale)
            if G == 1 and group > 1:
                o = o.view(B, H_kv, c, group, block_q, Dv).transpose(2, 3)
            out[:, :, :, t0:t1] = o.reshape(B, H_kv, group, c, block_q, Dv)
            continue
        # (B, H_kv, group, c, block_q, L + block_q) float32 scores
        s = torch.matmul(q_c.float(), kg.transpose(-1, -2)).mul_(scale).add_(bias)
        m = s.amax(-1)
        # Rows that see no key have max -inf; shifting them by 0 keeps exp(-inf) = 0 instead of NaN.
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m[..., None]).exp_()
        total = p.sum(-1)
        out[:, :, :, t0:t1] = torch.matmul(p, vg) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        lse[:, :, :, t0:t1] = m + torch.log(total)
    out = out.view(B, H, nq * block_q, Dv)[:, :, :T].to(q.dtype)
    return out, None if lse is None else lse.view(B, H, nq * block_q)[:, :, :T]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Dense causal attention with torch's sdpa (the decoding path of prefill-only methods): (B, H, T, D_v)."""
    T, S = q.shape[2], k.shape[2]
    mask = dense
    if mask is None and 1 < T < S:
        # Queries at the end of their keys: torch's is_causal would align them at the first key instead.
        mask = (torch.arange(S, device=q.device)[None, :] <= positions(T, S, q.device)[:, None])[None, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


@dataclass
class SparseAttention(AttentionMethod):
    """Base of sparse methods: ``attend`` for a prefill (T > 1) in a sparse layer, dense sdpa otherwise.

    The first ``skip_layers`` and the last ``skip_last`` layers stay dense. Quest keeps its first two layers
    dense, whose heads attend broadly; MoBA's layer-wise hybrid keeps the last three full (Lu et al. 2025, §2.3).
    ``fused_cpu`` is not a parameter: set it False on an instance to run the gathered path where a method has a
    gather-free CPU path (MoBA's grouped, vertical-slash's banded).
    """

    skip_layers: int = param(0, ge=0, help="leading layers kept dense")
    skip_last: int = param(0, ge=0, help="trailing layers kept dense")
    fused_cpu: bool = field(default=True, init=False, repr=False, compare=False)

    def attend(
        self,
        module: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor:
        """(B, H, T, D_v) sparse attention output for a prefill (or prefill chunk) of T > 1 queries."""
        raise NotImplementedError

    def sparse_layer(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` (an attention layer with ``layer_idx``) is outside the dense first and last layers."""
        if not self.skip_layers and not self.skip_last:
            return True
        layer = getattr(module, "layer_idx", None)
        n = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if layer is None or (self.skip_last and n is None):
            raise MethodError(
                f"attention method '{self.name}': parameters 'skip_layers' / 'skip_last' need attention modules "
                "with 'layer_idx' and a config with 'num_hidden_layers'"
            )
        return layer >= self.skip_layers and (not self.skip_last or layer < n - self.skip_last)

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        dense = transformers_inputs(self, module, query, key, attention_mask, kwargs)
        if query.shape[2] == 1 or not self.sparse_layer(module):
            out = dense_attention(query, key, value, dense, scaling)
        else:
            out = self.attend(module, query, key, value, dense, scaling)
        return out
