"""Budgets: how many cached tokens to keep, and which ones, from per-token scores.

All functions take scores ``(B, H_kv, S)`` (``-inf`` = not a real token, ``+inf`` = must keep) and return a boolean
keep mask of the same shape. Selection is per head (each head keeps its own top-k), layer-wide across heads
(Ada-KV: per-head budgets that sum to the layer budget, with a safeguard floor per head), or by threshold.
"""

from __future__ import annotations

import torch


def target_tokens(real_seen: torch.Tensor, ratio: float = 1.0, tokens: int | None = None) -> torch.Tensor:
    """(B,) tokens to keep per head: ``tokens`` if set, else ``round(ratio * real tokens seen)``, at least 1."""
    if tokens is not None:
        out = torch.full_like(real_seen, tokens)
    else:
        out = torch.round(real_seen.double() * ratio).long()
    return out.clamp(min=1)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, 0 = highest score (ties broken by position, earliest first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def keep_topk(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Each head keeps its ``k`` best tokens; ``k`` is an int or a (B,) tensor (one budget per sequence)."""
    if not isinstance(k, torch.Tensor):
        k = torch.full((scores.shape[0],), int(k), dtype=torch.long, device=scores.device)
    real = scores > float("-inf")
    return (_ranks(scores) < k.view(-1, 1, 1)) & real


def keep_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep every token whose score is >= ``threshold`` (per head: budgets differ per head)."""
    return scores >= threshold


def keep_layerwide(scores: torch.Tensor, k: torch.Tensor, alpha: float) -> torch.Tensor:
    """Ada-KV: the layer keeps ``H_kv * k`` tokens chosen by one top-k across its heads.

    Each head first keeps its own ``floor(alpha * k)`` best tokens (the safeguard), then the rest of the layer
    budget goes to the best remaining scores of any head. ``k`` is (B,).
    """
    B, H, S = scores.shape
    real = scores > float("-inf")
    floor = torch.floor(k.double() * alpha).long()
    safe = (_ranks(scores) < floor.view(-1, 1, 1)) & real
    # (B, H_kv * S): one top-k over the whole layer, the safeguarded entries ranked first
    keep = _ranks_first(scores.reshape(B, H * S), safe.reshape(B, H * S)) < (k * H).view(-1, 1)
    return keep.view(B, H, S) & real


def _ranks_first(scores: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Ranks by score (descending), except that entries flagged ``first`` come before all others."""
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    flags = torch.gather(first.to(torch.int8), -1, by_score)
    order = torch.gather(by_score, -1, torch.sort(flags, dim=-1, descending=True, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def pyramid_budgets(k: float, num_layers: int, beta: float) -> list[float]:
    """PyramidKV: per-layer budgets falling linearly from ``2k - k/beta`` (first layer) to ``k/beta`` (last).

    Their mean is ``k``, so the cache holds as many tokens in total as a uniform budget ``k``.
    """
    if num_layers == 1:
        return [k]
    low = k / beta
    high = 2 * k - low
    step = (high - low) / (num_layers - 1)
    return [high - i * step for i in range(num_layers)]
