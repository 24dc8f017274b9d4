"""Plain-PyTorch references of the attention room: the ground truth every faster path is tested against.

Each builds the explicit (T, S) scores, float32, O(B·H·T·S) memory: :func:`reference_attention` under a mask;
:func:`masked_reference` under a sparse method's selection (the ``reference=True`` path of the sparse
functions); :func:`remapped_reference` from an explicit relative-position matrix, and one reference per position
remap with the call signature of its blockwise function (so a test can substitute one for the other);
:func:`log_n_reference`. As flash-linear-attention keeps ``naive.py`` beside its kernels, the fast paths live in
their method files and their references here.
"""

from __future__ import annotations

from typing import Any

import torch

from longkit.attention.base import check_qkv
from longkit.attention.logn import log_n_factors
from longkit.attention.masks import MaskSpec
from longkit.attention.sparse import own_tile_mask
from longkit.rope.remap import dca_matrix, lm_infinite_matrix, rerope_matrix, self_extend_matrix
from longkit.rope.rotation import rotate_by


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention with masks: softmax(q k^T * scale + mask) v, materialising the (T, S) scores.

    Float32 throughout; GQA by repeating each key/value head for its group of query heads. A row that sees
    no key (everything masked) returns out = 0 and lse = -inf, with zero gradients. O(B·H·T·S) memory.
    Based on https://arxiv.org/abs/1706.03762 (Vaswani et al. 2017, scaled dot-product attention).

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, S, D). v: (B, H_kv, S, D_v); H a multiple of H_kv.
        mask: a :class:`MaskSpec`, or None for no mask (every query sees every key).
        scale: score scale, default ``D ** -0.5``.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    scale = D**-0.5 if scale is None else scale
    group = H // H_kv
    # (B, H, S, D): each key/value head repeated for its group of query heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    # (B, H, T, S)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if mask is not None:
        visible = mask.to_dense(B, H, T, S, device=q.device)
        # (B|1, H|1, T, 1): rows without a visible key get finite scores so neither value nor gradient is NaN
        empty = ~visible.any(-1, keepdim=True)
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
        lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    else:
        probs = torch.softmax(scores, dim=-1)
        lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(probs, vf)
    return out.to(q.dtype), lse


def masked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse methods' reference path: causal attention under an explicit selection mask ``visible``
    (B|1, H|1, T, S), widened by the keys of each query's own tile of ``block_q`` rows when given (what the
    gathered fast path adds)."""
    T, S = q.shape[2], k.shape[2]
    if block_q is not None:
        visible = visible | own_tile_mask(T, S, block_q, q.device)
    if dense is not None:
        visible = visible & dense
    return reference_attention(q, k, v, MaskSpec(causal=True, q_offset=S - T, dense=visible), scale)


def remapped_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    rel: torch.Tensor,
    *,
    q_factor: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remapped attention from an explicit (T, S) relative-position matrix ``rel``.

    Un-rotates q and k to position 0, then scores query i against key j with q_i rotated by ``rel[i, j]``
    (RoPE scores depend only on the distance); ``rel < 0`` hides the pair. Arguments as
    :func:`longkit.attention.position_remap.remapped_attention`; returns ``(out (B, H, T, D_v), lse (B, H, T))``.
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    off = S - T
    scale = D**-0.5 if scale is None else scale
    qf = q.float() if q_factor is None else q.float() * q_factor[:, None]
    # (B, H, T, D) and (B, H, S, D): the raw projections, as if RoPE had rotated them at position 0
    q0 = rotate_by(qf, torch.arange(off, S), torch.zeros(T), inv_freq)
    k0 = rotate_by(k.float(), torch.arange(S), torch.zeros(S), inv_freq).repeat_interleave(H // H_kv, dim=1)
    vf = v.float().repeat_interleave(H // H_kv, dim=1)
    # (B, H, T, S, D): every query rotated by every relative position it uses
    qr = rotate_by(
        q0[:, :, :, None].expand(B, H, T, S, D).reshape(B, H, T * S, D),
        torch.zeros(T * S),
        rel.clamp(min=0).reshape(-1),
        inv_freq,
    ).view(B, H, T, S, D)
    scores = (qr * k0[:, :, None]).sum(-1) * scale
    vis = (rel >= 0)[None, None]
    vis = vis if dense is None else vis & dense
    empty = ~vis.any(-1, keepdim=True)
    scores = scores.masked_fill(~vis, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.matmul(probs, vf).to(q.dtype), lse


# The references of the position remaps: the (T, S) relative positions of the queries at S - T .. S - 1 from
# the paper's matrix (longkit.rope.remap; -1 marks hidden pairs), through remapped_reference. They take the
# arguments of their blockwise function and ignore its execution options (tiles, fused kernel), ``**_``.


def self_extend_reference(q, k, v, inv_freq, group_size: int, window: int, *, dense=None, scale=None, **_: Any):
    """Plain :func:`longkit.attention.self_extend.self_extend_attention`."""
    rel = self_extend_matrix(k.shape[2], group_size, window)[k.shape[2] - q.shape[2] :]
    return remapped_reference(q, k, v, inv_freq, rel, dense=dense, scale=scale)


def rerope_reference(q, k, v, inv_freq, window: int, *, leak=None, trained=None, dense=None, scale=None, **_: Any):
    """Plain :func:`longkit.attention.rerope.rerope_attention` (Leaky ReRoPE when ``leak`` is given)."""
    T, S = q.shape[2], k.shape[2]
    factor = None if trained is None else log_n_factors(torch.arange(S - T, S), trained)
    rel = rerope_matrix(S, window, leak)[S - T :]
    return remapped_reference(q, k, v, inv_freq, rel, q_factor=factor, dense=dense, scale=scale)


def lm_infinite_reference(q, k, v, inv_freq, window: int, n_sinks: int, *, dense=None, scale=None, **_: Any):
    """Plain :func:`longkit.attention.lm_infinite.lm_infinite_attention`."""
    rel = lm_infinite_matrix(k.shape[2], window, n_sinks)[k.shape[2] - q.shape[2] :]
    return remapped_reference(q, k, v, inv_freq, rel, dense=dense, scale=scale)


def dca_reference(q, k, v, inv_freq, chunk_size: int, local_window: int, *, dense=None, scale=None, **_: Any):
    """Plain :func:`longkit.attention.dca.dca_attention`."""
    rel = dca_matrix(k.shape[2], chunk_size, local_window)[k.shape[2] - q.shape[2] :]
    return remapped_reference(q, k, v, inv_freq, rel, dense=dense, scale=scale)


def log_n_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, trained: int, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal attention with the logits of query i (at position S - T + i) multiplied by
    ``max(1, log_L (S - T + i + 1))``: explicit (T, S) scores. q (B, H, T, D), k, v (B, H_kv, S, D).
    Returns ``(out (B, H, T, D_v), lse (B, H, T))``."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kf = k.float().repeat_interleave(H // k.shape[1], dim=1)
    vf = v.float().repeat_interleave(H // v.shape[1], dim=1)
    p = torch.arange(S - T, S)
    lam = torch.clamp(torch.log(p.double() + 1) / torch.log(torch.tensor(float(trained), dtype=torch.float64)), min=1)
    # (B, H, T, S): the logits, then each query row multiplied by its factor
    scores = (q.float() @ kf.transpose(-1, -2)) * scale * lam.float()[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > p[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ vf, torch.logsumexp(scores, -1)


def s2_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size_ratio: float = 0.25,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain :func:`longkit.attention.s2_attn.s2_attention` from an explicit (H, T, T) mask: with the group size
    ``g = max(1, int(T · ratio))`` and ``s = g // 2``, query i sees key j <= i when both are in the same group,
    group ``i // g`` for heads ``h < H // 2`` and ``floor((i - s) / g)`` (so positions ``< s`` form their own first
    group, nothing wraps around) for the others. Returns ``(out (B, H, T, D_v), lse (B, H, T))``."""
    H, T = q.shape[1], q.shape[2]
    g = max(1, int(T * group_size_ratio))
    i = torch.arange(T)
    plain = i // g
    shifted = torch.div(i - g // 2, g, rounding_mode="floor")
    # (H, T): each head's group of each position
    group = torch.stack([plain if h < H // 2 else shifted for h in range(H)])
    visible = (group[:, :, None] == group[:, None, :])[None].to(q.device)
    if dense is not None:
        visible = visible & dense
    return reference_attention(q, k, v, MaskSpec(causal=True, dense=visible), scale)
