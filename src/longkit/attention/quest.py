"""Quest: query-aware page selection for decoding, by an upper bound of each page's attention score."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longkit.attention.base import check_qkv, transformers_inputs
from longkit.attention.naive import masked_reference
from longkit.attention.sparse import (
    SparseAttention,
    check_sparse,
    dense_attention,
    expand_blocks,
    gathered_attention,
)
from longkit.registry import param, register


def page_bounds(k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page of ``page_size`` keys and key head, the channel-wise minimum and maximum: two float32
    (B, H_kv, n_pages, D); a last partial page is bounded by the keys it has."""
    B, H_kv, S, D = k.shape
    n_pages = -(-S // page_size)
    pad = n_pages * page_size - S
    kf = k.float()
    kmin = F.pad(kf, (0, 0, 0, pad), value=float("inf")).view(B, H_kv, n_pages, page_size, D).amin(3)
    kmax = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(B, H_kv, n_pages, page_size, D).amax(3)
    return kmin, kmax


def select_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` pages of highest score bound for each query head (see :func:`quest_select`), from page bounds
    (B, H_kv, n_pages, D): long (B, H, T, min(top_k, n_pages)), ascending page ids."""
    B, H, T, D = q.shape
    H_kv, n_pages = kmin.shape[1], kmin.shape[2]
    # (B, H_kv, group · T, 1, D) against (B, H_kv, 1, n_pages, D) -> (B, H, T, n_pages)
    qg = q.float().reshape(B, H_kv, -1, 1, D)
    bound = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1).view(B, H, T, n_pages)
    return bound.topk(min(top_k, n_pages), dim=-1).indices.sort(-1).values


def quest_select(
    q: torch.Tensor, k: torch.Tensor, top_k: int, page_size: int, bounds: PageBounds | None = None
) -> torch.Tensor:
    """The pages each query head reads: long (B, H, T, min(top_k, n_pages)), ascending page ids.

    Per page and key head, the channel-wise minimum and maximum of its keys; the page's score upper bound for
    query q is ``sum_d max(q_d · min_d, q_d · max_d)`` (>= q · k for every key of the page), and the ``top_k``
    highest pages are read. ``bounds``: the layer's :class:`PageBounds` kept between decoding steps (only the last
    page is recomputed when the cache grew in place), or None to compute them from ``k``.
    Based on https://arxiv.org/abs/2406.10774 (Tang et al. 2024, Quest, Algorithm 1).
    """
    check_qkv(q, k, k)
    kmin, kmax = page_bounds(k, page_size) if bounds is None else bounds.update(k, page_size)
    return select_pages(q, kmin, kmax, top_k)


class PageBounds:
    """The page bounds of one layer's growing key cache, kept between decoding steps (Quest's page metadata).

    :meth:`update` recomputes only the last page when the keys are the previous step's plus one token appended in
    place: the same memory (address and strides) one token longer and, where torch tracks it (outside
    ``inference_mode``), exactly one in-place write since. longkit's caches (growing buffers) and transformers'
    static cache append that way; a cache that re-concatenates (transformers' DynamicCache), a compaction, a
    beam move or a crop changes the address or the length, and the bounds are recomputed from all keys. Limit:
    under ``inference_mode`` a cache rewritten in place at the same address and grown by one token (a static
    cache reordered by beam search) cannot be told apart.
    """

    def __init__(self) -> None:
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self._seen: tuple | None = None

    @staticmethod
    def _stamp(k: torch.Tensor) -> tuple:
        try:
            version = k._version
        except RuntimeError:  # inference tensors track no version
            version = None
        return k.data_ptr(), k.stride(), k.shape[:2], k.shape[3], k.shape[2], version

    def _continues(self, k: torch.Tensor) -> bool:
        if self._seen is None or self.kmin is None:
            return False
        ptr, stride, bh, d, length, version = self._stamp(k)
        p_ptr, p_stride, p_bh, p_d, p_length, p_version = self._seen
        same = (ptr, stride, bh, d) == (p_ptr, p_stride, p_bh, p_d) and length == p_length + 1
        return same and (version is None or p_version is None or version == p_version + 1)

    def update(self, k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds of ``k`` (B, H_kv, S, D), as :func:`page_bounds` computes them."""
        S = k.shape[2]
        if self._continues(k):
            last = (S - 1) // page_size
            # (B, H_kv, 1, D) the last page's bounds from its keys (at most page_size of them)
            tail = k[:, :, last * page_size : S].float()
            lo, hi = tail.amin(2, keepdim=True), tail.amax(2, keepdim=True)
            if last == self.kmin.shape[2]:
                self.kmin, self.kmax = torch.cat([self.kmin, lo], 2), torch.cat([self.kmax, hi], 2)
            else:
                self.kmin[:, :, last : last + 1] = lo
                self.kmax[:, :, last : last + 1] = hi
        else:
            self.kmin, self.kmax = page_bounds(k, page_size)
        self._seen = self._stamp(k)
        return self.kmin, self.kmax


def quest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    reference: bool = False,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each query over the keys of its selected pages (causal on positions S - T + i).

    Fast path: the selected pages' keys and values are gathered per query (O(T · top_k · page_size));
    ``reference=True`` builds the (T, S) mask and calls the reference attention.

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        pages: long (B, H, T, k) page ids from :func:`quest_select`. page_size: int >= 1.
        dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    B, H, _, T, S, _ = check_sparse(Quest, q, k, v, dense, page_size=page_size)
    idx = expand_blocks(pages, page_size, S)
    if reference:
        # (B, H, T, S + 1): the last column collects the -1 padding
        visible = torch.zeros(B, H, T, S + 1, dtype=torch.bool, device=q.device)
        visible.scatter_(3, torch.where(idx >= 0, idx, torch.full_like(idx, S)), True)
        return masked_reference(q, k, v, visible[..., :S], dense=dense, scale=scale, block_q=1)
    return gathered_attention(q, k, v, idx, block_q=1, dense=dense, scale=scale, need_lse=need_lse)


@register("attention", "quest")
@dataclass
class Quest(SparseAttention):
    """Quest: query-aware KV-cache page selection for decoding (prefill stays dense).

    The cache is split into pages of ``page_size`` tokens; each page keeps the channel-wise min and max of its
    keys. At every decoding step each head scores pages by the upper bound ``sum_d max(q_d min_d, q_d max_d)``
    and attends only the ``top_k`` best pages (and the current token itself). The first ``skip_layers`` layers
    stay dense, as in the paper.
    The min/max are kept per layer between decoding steps (:class:`PageBounds`): a step recomputes only the last,
    partial page when the cache grew in place (longkit's caches), and all pages otherwise.
    Based on https://arxiv.org/abs/2406.10774 (Tang et al. 2024, Quest).

    Parameters:
        page_size: int >= 1, tokens per page (default 16, the paper's).
        top_k: int >= 1, pages read per head and step (default 64: a 1024-token budget).
        skip_layers: int >= 0, leading layers kept dense (default 2, the paper's).
        skip_last: int >= 0, trailing layers kept dense (default 0).
    """

    paper = (
        "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al. 2024) "
        "https://arxiv.org/abs/2406.10774"
    )
    page_size: int = param(16, ge=1, help="tokens per page")
    top_k: int = param(64, ge=1, help="pages read per head and decoding step")
    skip_layers: int = param(2, ge=0, help="leading layers kept dense (the paper: 2)")

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        dense = transformers_inputs(self, module, query, key, attention_mask, kwargs)
        states = self.__dict__.setdefault("_pages", weakref.WeakKeyDictionary())
        if query.shape[2] == 1 and self.sparse_layer(module):
            # page metadata kept per layer between decoding steps: only the last page is recomputed per step
            pages = quest_select(query, key, self.top_k, self.page_size, states.setdefault(module, PageBounds()))
            out, _ = quest_attention(
                query, key, value, pages, self.page_size, dense=dense, scale=scaling, need_lse=False
            )
        else:
            states.pop(module, None)
            out = dense_attention(query, key, value, dense, scaling)
        return out
