"""MInference's offline pattern search: give each attention head the sparse pattern closest to dense attention.

Writes the per-head config that ``attention=minference:config=FILE`` loads
(:class:`longkit.attention.minference.MInference`).
Based on Jiang et al. 2024, MInference 1.0 (https://arxiv.org/abs/2407.02490).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from longkit.attention.base import AttentionMethod
from longkit.attention.minference import pattern_method, per_head_attention
from longkit.attention.sparse import dense_attention, transformers_inputs

#: Candidates of the offline search: MInference's three patterns at comparable budgets (about 4K keys per query
#: at long context), plus a lighter vertical-slash.
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"pattern": "a_shape", "sinks": 128, "window": 4096},
    {"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 3000},
    {"pattern": "vertical_slash", "vertical_size": 3000, "slash_size": 1000},
    {"pattern": "vertical_slash", "vertical_size": 300, "slash_size": 800},
    {"pattern": "block_sparse", "block_size": 64, "top_k": 64},
)


@dataclass
class _Capture(AttentionMethod):
    """Dense sdpa attention that records each layer's q, k, v, mask and scale (for the offline search)."""

    seen: dict = field(default_factory=dict, init=False)

    def attention(self, module, query, key, value, attention_mask, scaling, kwargs):
        dense = transformers_inputs(self, module, query, key, attention_mask, kwargs)
        self.seen[module.layer_idx] = (query, key, value, dense, scaling)
        return dense_attention(query, key, value, dense, scaling)


_Capture.name = "minference_search"


def search_patterns(
    model: Any, input_ids: torch.Tensor, candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES
) -> dict[str, Any]:
    """Pick each head's pattern: the candidate with the lowest output error against dense attention.

    Runs ``model`` densely on ``input_ids`` (a calibration prompt, (1, T)), captures every layer's q, k, v, and for
    every candidate computes all heads' sparse outputs on them; the relative error ``||o - o_dense|| /
    ||o_dense||`` per head picks the candidate. MInference's search picks by attention recall under a FLOPs
    budget on a real kernel; the candidates here have comparable budgets, so the lowest error plays that role.
    Returns ``{"layers": {"<layer>": [entry per head]}, "errors": {"<layer>": [error per head]}}``, which
    :class:`MInference` reads (``json.dumps`` it to a file or pass it inline).
    """
    for i, entry in enumerate(candidates):
        pattern_method(entry, f"candidates[{i}]")
    capture = _Capture()
    with torch.inference_mode():
        undo = capture.apply(model)
        try:
            model(input_ids)
        finally:
            undo()
        layers, errors = {}, {}
        for layer, (q, k, v, dense, scale) in sorted(capture.seen.items()):
            H = q.shape[1]
            # (B, H, T, D_v) -> (H,) norms over batch, positions and channels
            ref = dense_attention(q, k, v, dense, scale).float()
            norm = ref.pow(2).sum((0, 2, 3)).sqrt().clamp(min=1e-12)
            errs = torch.stack(
                [
                    (per_head_attention(q, k, v, [entry] * H, dense, scale).float() - ref).pow(2).sum((0, 2, 3)).sqrt()
                    / norm
                    for entry in candidates
                ]
            )
            best = errs.argmin(0)
            layers[str(layer)] = [dict(candidates[int(c)]) for c in best]
            errors[str(layer)] = [round(float(errs[int(c), h]), 6) for h, c in enumerate(best)]
    return {"layers": layers, "errors": errors}
