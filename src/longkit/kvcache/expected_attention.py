"""Expected Attention: score cached tokens by the attention that future queries are expected to pay them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.errors import MethodError
from longkit.kvcache.base import CompressionMethod, rotary_layer_type
from longkit.registry import param, register


def query_positions(ctx) -> torch.Tensor:
    """(B, T) RoPE positions of this call's queries.

    The model's own ``position_ids`` of the attention call when it passed them on. Otherwise positions are assumed to count the real tokens, as ``generate`` does: the new
    tokens are the last ``n_new`` slots and, with left padding, the real ones are right-aligned, so the query in slot
    ``t`` of sequence ``b`` sits at ``real_seen[b] - (T - t)`` (padding slots get negative values, masked later).
    """
    B, T = ctx.queries.shape[0], ctx.n_new
    recorded = ctx.position_ids
    if recorded is not None and recorded.shape[-1] == T:
        return recorded.to(ctx.keys.device).long().expand(B, T)
    ar = torch.arange(T, device=ctx.keys.device)
    return ctx.real_seen.to(ctx.keys.device)[:, None] - T + ar[None, :]


def _cos_sin(
    rotary, like: torch.Tensor, positions: torch.Tensor, layer_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) float32 cos/sin of the model's own rotary embedding (``attention_scaling`` included); for the
    RoPE of ``layer_type`` where the rotary module keeps one per layer type (Gemma 3)."""
    per_type = {"layer_type": layer_type} if layer_type is not None else {}
    cos, sin = rotary(like.float(), position_ids=positions.clamp(min=0), **per_type)
    return cos.float(), sin.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def averaged_rope(
    rotary, like: torch.Tensor, start: torch.Tensor, n_future: int, layer_type: str | None = None
) -> torch.Tensor:
    """(B, D, D) the RoPE matrix averaged over positions ``start[b] .. start[b] + n_future - 1``.

    RoPE rotates pair ``(i, i + D/2)``: ``R(p) x = cos(p) * x + sin(p) * rotate_half(x)``, so
    ``R(p) = diag(cos) + diag(sin) @ P`` with ``P`` the matrix of ``rotate_half``.
    """
    B = start.shape[0]
    D = like.shape[-1]
    # (B, F) future positions -> (B, F, D) cos/sin -> (B, D) averages
    pos = start[:, None] + torch.arange(n_future, device=start.device)[None, :]
    cos, sin = _cos_sin(rotary, like, pos, layer_type)
    eye = torch.eye(D, device=cos.device)
    # (D, D): rotate_half(x) = P @ x
    P = _rotate_half(eye).T
    # mean over p of diag(cos_p) + diag(sin_p) P (linear in cos/sin, so average them first)
    R = torch.diag_embed(cos.mean(1)) + torch.diag_embed(sin.mean(1)) @ P
    return R.view(B, D, D)


@register("kv", "expected_attention")
@dataclass
class ExpectedAttention(CompressionMethod):
    """Expected Attention: the attention future queries will pay each key, from the queries' mean and covariance.

    Query-agnostic (the question need not be in the prompt). After a multi-token forward, the pre-RoPE queries of
    this call's real tokens (the first ``n_sink`` real tokens excluded: outliers) give a per-head mean ``mu`` and
    covariance ``Sigma`` (biased, over the tokens). Both are moved by the RoPE rotation averaged over the next
    ``n_future_positions`` positions, ``R``: ``mu' = R mu``, ``Sigma' = R Sigma R^T``. For Gaussian queries the
    expected un-normalised attention is ``E[exp(s q.k)] = exp(s k.mu' + s^2 k^T Sigma' k / 2)`` with ``s`` the
    attention scaling (``1/sqrt(D)``); it is softmax-normalised over the non-sink cached tokens per query head,
    averaged over the query heads of a kv head (GQA), then ``(score + epsilon) * ||v||`` when ``use_vnorm``.
    The first ``n_sink`` real tokens are always kept. While decoding (``decode_every`` > 0) the statistics come from
    the single new query (covariance zero). Pre-RoPE queries are recovered by inverting RoPE at the model's own
    ``position_ids`` (those of the attention call, :attr:`ScoreContext.position_ids`).
    Based on Devoto et al. 2025, Expected Attention: KV cache compression by estimating attention from future
    queries distribution (https://arxiv.org/abs/2510.00636); reference code NVIDIA kvpress ``ExpectedAttentionPress``.

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod);
    n_future_positions >= 1; n_sink >= 0; use_covariance, use_vnorm (bool); epsilon >= 0.
    """

    paper = (
        "Expected Attention: KV cache compression by estimating attention from future queries distribution "
        "(Devoto et al. 2025) https://arxiv.org/abs/2510.00636"
    )

    n_future_positions: int = param(
        512, ge=1, help="future positions the RoPE rotation of the queries is averaged over"
    )
    n_sink: int = param(4, ge=0, help="first real tokens always kept and left out of the query statistics")
    use_covariance: bool = param(True, help="include the queries' covariance (else the mean only)")
    use_vnorm: bool = param(True, help="rescale scores by the value norm: (score + epsilon) * ||v||")
    epsilon: float = param(0.0, ge=0.0, help="added to the scores before the value-norm rescaling")

    def query_statistics(self, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE-averaged mean (B, H, D) and covariance (B, H, D, D) (None without ``use_covariance``) of the queries."""
        rotary = getattr(ctx.cache, "rotary", None)
        if rotary is None:
            raise MethodError(
                f"kv method '{self.name}' needs the model's rotary embedding (model.model.rotary_emb); found none"
            )
        B, H, T, D = ctx.queries.shape
        pos = query_positions(ctx)
        # (B, T, D) cos/sin of the queries' positions; attention_scaling s is in both: inverse = (x cos - rh(x) sin)/s^2
        kind = rotary_layer_type(rotary, ctx.module)
        cos, sin = _cos_sin(rotary, ctx.queries, pos, kind)
        if cos.shape[-1] != D:
            raise MethodError(
                f"kv method '{self.name}' needs RoPE over the whole head dimension ({D}); the model rotates "
                f"{cos.shape[-1]} (partial rotary is not supported)"
            )
        scale = float(getattr(rotary, f"{kind}_attention_scaling" if kind else "attention_scaling", 1.0) or 1.0)
        q = ctx.queries.float()
        # (B, H, T, D) pre-RoPE queries
        q = (q * cos[:, None] - _rotate_half(q) * sin[:, None]) / scale**2
        # (B, T) real new tokens past the sinks (fall back to all real ones when the call holds only sinks)
        real = ctx.valid[:, 0, -T:]
        # (B, T) index of each new real token among the sequence's real tokens (the sinks are the first n_sink)
        rank = ctx.real_seen.to(real.device)[:, None] - real.sum(-1, keepdim=True) + real.long().cumsum(-1) - 1
        use = real & (rank >= self.n_sink)
        use = torch.where(use.any(-1, keepdim=True), use, real)
        w = use.float()
        n = w.sum(-1).clamp(min=1.0)
        # (B, H, D)
        mu = torch.einsum("bt,bhtd->bhd", w, q) / n[:, None, None]
        cov = None
        if self.use_covariance:
            c = (q - mu[:, :, None]) * w[:, None, :, None]
            # (B, H, D, D)
            cov = torch.einsum("bhti,bhtj->bhij", c, c) / n[:, None, None, None]
        # future positions continue after the newest query
        start = pos.masked_fill(~real, -1).max(-1).values + 1
        R = averaged_rope(rotary, ctx.queries, start, self.n_future_positions, kind)
        mu = torch.einsum("bij,bhj->bhi", R, mu)
        if cov is not None:
            cov = R[:, None] @ cov @ R[:, None].transpose(-1, -2)
        return mu, cov

    def score(self, ctx) -> torch.Tensor:
        mu, cov = self.query_statistics(ctx)
        # (B, H_kv, S) the first n_sink real slots of each head are the sinks (they are never evicted, so they stay
        # the first real slots whatever was evicted since)
        rank = torch.cumsum(ctx.valid.long(), dim=-1) - 1
        sink = ctx.valid & (rank < self.n_sink)
        candidate = ctx.valid & ~sink
        # (B, H, S, D) keys repeated for their query heads
        k = ctx.keys.float().repeat_interleave(ctx.groups, dim=1)
        s = ctx.scaling
        # (B, H, S) expected log-attention
        logits = torch.einsum("bhsd,bhd->bhs", k, mu) * s
        if cov is not None:
            logits = logits + torch.einsum("bhsi,bhij,bhsj->bhs", k, cov, k) * (s * s / 2)
        cand = candidate.repeat_interleave(ctx.groups, dim=1)
        logits = logits.masked_fill(~cand, float("-inf"))
        # heads with no candidate at all give NaN rows: they have nothing to rank
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        B, H, S = probs.shape
        scores = probs.view(B, H // ctx.groups, ctx.groups, S).mean(2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        return scores.masked_fill(sink, float("inf"))
