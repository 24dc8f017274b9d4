"""CaM: evict by observation-window attention (SnapKV scores), then merge each evicted value into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkit.kvcache.scores import per_kv_head, window_attention
from longkit.kvcache.snapkv import SnapKV
from longkit.registry import param, register


def merge_weights(attn: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, S) merge probability of each evicted slot: its attention over the largest kept attention, in [0, 1].

    A token that drew as much attention as the most-attended kept token is merged for sure; one nobody attended
    to is dropped. Slots that are not evicted get 0.
    """
    kept_max = attn.masked_fill(~keep, float("-inf")).amax(dim=-1, keepdim=True)
    prob = torch.nan_to_num(attn / kept_max, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return torch.where(evicted, prob, torch.zeros_like(prob))


def merge_into_following(values: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, merge: int) -> torch.Tensor:
    """Add ``weight[e] * values[e] / merge`` of every evicted slot ``e`` to the next ``merge`` kept slots after it.

    ``values`` (B, H_kv, S, D), ``keep`` (B, H_kv, S) bool, ``weight`` (B, H_kv, S) (0 on kept/padded slots).
    As in the paper's code the share is ``1 / merge`` even when fewer than ``merge`` kept slots follow.
    Returns float32 values.
    """
    B, H, S, D = values.shape
    v = values.float()
    out = v.clone()
    # (B, H_kv, S) kept slots strictly before each slot, and the slot index of each kept rank
    before = keep.long().cumsum(-1) - keep.long()
    n_kept = keep.sum(-1, keepdim=True)
    # column S collects the evicted slots' writes and is never read
    slot_of_rank = torch.zeros((B, H, S + 1), dtype=torch.long, device=values.device)
    slot_of_rank.scatter_(-1, torch.where(keep, before, S), torch.arange(S, device=values.device).expand(B, H, S))
    # (B, H_kv, S, D) what each evicted slot hands to each of its targets
    share = v * (weight / merge).unsqueeze(-1)
    active = weight > 0
    for k in range(merge):
        rank = before + k
        ok = active & (rank < n_kept)
        target = torch.gather(slot_of_rank, -1, rank.clamp(max=S - 1))
        target = torch.where(ok, target, torch.zeros_like(target))
        contrib = share.masked_fill(~ok.unsqueeze(-1), 0.0)
        out.scatter_add_(2, target.unsqueeze(-1).expand(B, H, S, D), contrib)
    return out


@register("kv", "cam")
@dataclass
class CaM(SnapKV):
    """CaM: cache merging — the values of evicted tokens are merged into the kept tokens that follow them.

    Eviction is SnapKV's (observation-window attention, pooled, window always kept). Before the evicted slots are
    dropped, each evicted token ``e`` is merged with probability ``p_e = a_e / max_kept a`` (``a`` = the window's
    mean attention to a token, per kv head, clamped to [0, 1]): ``v_e / merge`` is added to the values of the next
    ``merge`` kept tokens after it. Keys are kept unchanged, so the merged value stands in for the evicted token's
    share of the attention output. ``mode="sample"`` draws the Bernoulli mask as the paper does (seeded);
    ``mode="expected"`` merges with weight ``p_e`` instead (deterministic). Differences from the paper's code: the
    targets are the next *kept* tokens (the paper evicts one token at a time with the recent window right after it,
    where the two coincide), and the eviction scores are SnapKV's window attention instead of H2O's accumulated
    attention. Based on Zhang et al. 2024, CaM: Cache Merging for Memory-efficient LLMs Inference (ICML 2024,
    https://proceedings.mlr.press/v235/zhang24n.html).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod); window >= 1,
    kernel odd >= 1, pooling "avg" or "max" (see SnapKV); merge >= 1 (kept tokens each evicted value is spread
    over); mode "sample" or "expected"; seed >= 0 (of the Bernoulli draws).
    """

    paper = (
        "CaM: Cache Merging for Memory-efficient LLMs Inference (Zhang et al. 2024) "
        "https://proceedings.mlr.press/v235/zhang24n.html"
    )

    merge: int = param(8, ge=1, help="number of following kept tokens each evicted value is spread over")
    mode: str = param("sample", choices=("sample", "expected"), help="Bernoulli merge mask (paper) or its expectation")
    seed: int = param(0, ge=0, help="seed of the Bernoulli merge draws")
    merges_values: ClassVar[bool] = True

    def merge_values(self, ctx, keep: torch.Tensor) -> torch.Tensor | None:
        evicted = ctx.valid & ~keep
        if not bool(evicted.any()):
            return None
        # (B, H, w, S) -> (B, H_kv, S): the window's mean attention to every slot (unpooled, as in the paper)
        attn = per_kv_head(window_attention(ctx, self.window).mean(dim=2), ctx.groups)
        prob = merge_weights(attn, keep, evicted)
        if self.mode == "sample":
            # One stream per layer and decoding step, reproducible for a given seed.
            gen = torch.Generator(device=prob.device)
            gen.manual_seed(self.seed * 1_000_003 + ctx.layer_idx * 7_919 + int(ctx.cache.decode_steps))
            prob = torch.bernoulli(prob, generator=gen)
        return merge_into_following(ctx.values, keep, prob, self.merge).to(ctx.values.dtype)
