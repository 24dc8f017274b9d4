"""Quest: query-aware page selection for decoding, by an upper bound of each page's attention score."""

from __future__ import annotations

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


def quest_select(q: torch.Tensor, k: torch.Tensor, top_k: int, page_size: int) -> torch.Tensor:
    """The pages each query head reads: long (B, H, T, min(top_k, n_pages)), ascending page ids.

    Per page and key head, the channel-wise minimum and maximum of its keys; the page's score upper bound for
    query q is ``sum_d max(q_d · min_d, q_d · max_d)`` (>= q · k for every key of the page), and the ``top_k``
    highest pages are read. Based on https://arxiv.org/abs/2406.10774 (Tang et al. 2024, Quest, Algorithm 1).
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, k)
    n_pages = -(-S // page_size)
    pad = n_pages * page_size - S
    # (B, H_kv, n_pages, D): a last partial page is bounded by the keys it has
    kf = k.float()
    kmin = F.pad(kf, (0, 0, 0, pad), value=float("inf")).view(B, H_kv, n_pages, page_size, D).amin(3)
    kmax = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(B, H_kv, n_pages, page_size, D).amax(3)
    # (B, H_kv, group · T, 1, D) against (B, H_kv, 1, n_pages, D) -> (B, H, T, n_pages)
    qg = q.float().reshape(B, H_kv, -1, 1, D)
    bound = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1).view(B, H, T, n_pages)
    return bound.topk(min(top_k, n_pages), dim=-1).indices.sort(-1).values


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
    The min/max are recomputed from the cache at each step (a reduction over the keys, cheaper than attention
    but still O(S · D); Quest's kernel keeps them per page).
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
        if query.shape[2] == 1 and self.sparse_layer(module):
            pages = quest_select(query, key, self.top_k, self.page_size)
            out, _ = quest_attention(
                query, key, value, pages, self.page_size, dense=dense, scale=scaling, need_lse=False
            )
        else:
            out = dense_attention(query, key, value, dense, scaling)
        return out
