"""StreamingLLM: attention sinks plus a window of recent tokens, with positions re-assigned inside the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkit.errors import MethodError
from longkit.kvcache.base import CompressionMethod, rotary_inv_freq
from longkit.registry import param, register
from longkit.rope.rotation import rotate_by


@register("kv", "streaming_llm")
@dataclass
class StreamingLLM(CompressionMethod):
    """StreamingLLM: keep the first ``sink`` tokens and the most recent ones, evict the middle.

    Positions are those of the paper's rolling cache: after each eviction the kept keys are re-rotated so that
    they sit at consecutive positions ending at the newest token (sinks first). New tokens keep their true
    position, so the distance between a query and every cached key is exactly its distance in the rolling
    cache, while ``generate``'s position ids stay valid. Re-rotation uses the model's own rotary frequencies
    (``R(p + d) k = R(d) R(p) k``); the current position of each key is tracked (8 bytes per kept key and head,
    counted in ``nbytes``).
    Based on Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks
    (https://arxiv.org/abs/2309.17453).

    Parameters: ratio in (0, 1], tokens >= 1 (sinks included), threshold, decode_every >= 0 (default 1);
    sink >= 0 (attention-sink tokens kept at the start).
    """

    paper = (
        "Efficient Streaming Language Models with Attention Sinks (Xiao et al. 2024) https://arxiv.org/abs/2309.17453"
    )
    track: ClassVar[tuple[str, ...]] = ("pos",)

    sink: int = param(4, ge=0, help="attention-sink tokens kept at the start")
    decode_every: int = param(1, ge=0, help="compress every N decoding steps (0 = only after multi-token forwards)")

    def score(self, ctx) -> torch.Tensor:
        # (B, H_kv, S) 1-based rank of each real slot in order of arrival: sinks first, then the most recent
        order = ctx.valid.long().cumsum(-1)
        return torch.where(order <= self.sink, torch.full_like(order, 0).float() + float("inf"), order.float())

    def on_compact(self, ctx, keep: torch.Tensor):
        # this layer's frequencies (Gemma 3's full-attention layers have their own base)
        inv_freq = rotary_inv_freq(ctx.cache.rotary, ctx.module)
        if inv_freq is None:
            raise MethodError(
                f"kv method '{self.name}' needs a model with a rotary embedding (model.model.rotary_emb.inv_freq)"
            )
        _, _, _, extras = ctx.layer.view(ctx.keys.shape[-2])
        # (B, H_kv, S) position each key is rotated at now, and the one it moves to
        pos = extras["pos"]
        newest = torch.where(ctx.valid, pos, torch.full_like(pos, -1)).amax(-1, keepdim=True)
        n_kept = keep.sum(-1, keepdim=True)
        rank = keep.long().cumsum(-1) - 1
        target = newest - (n_kept - 1) + rank
        moved = torch.where(keep, target, pos)
        # the model's own frequencies (scaled RoPE included); a pure rotation, so any attention scaling stays as is
        keys = rotate_by(ctx.keys, pos, moved, inv_freq)
        extras["pos"] = moved
        return keys, extras
