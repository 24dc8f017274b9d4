"""MInference: one sparse pattern per attention head (A-shape, vertical-slash, block-sparse), from an offline search.

A per-head config maps layer -> head -> pattern and its parameters. The offline search that builds one lives with
the tools (:func:`longkit.tools.minference_search.search_patterns`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longkit.attention.a_shape import AShape
from longkit.attention.block_sparse import BlockSparse
from longkit.attention.sparse import SparseAttention, dense_attention
from longkit.attention.vertical_slash import VerticalSlashAttention
from longkit.errors import MethodError
from longkit.registry import Registry, param, register

#: Patterns a head may use, name -> attention class; "dense" (None) keeps the head's full causal attention.
PATTERNS = Registry("attention", "minference pattern")
PATTERNS.add("a_shape", AShape)
PATTERNS.add("vertical_slash", VerticalSlashAttention)
PATTERNS.add("block_sparse", BlockSparse)
PATTERNS.add("dense", None)


def pattern_method(entry: Any, where: str) -> SparseAttention | None:
    """Build one head's pattern from ``{"pattern": name, **params}``; errors name the config entry."""
    if not isinstance(entry, dict) or entry.get("pattern") not in PATTERNS:
        raise MethodError(
            f"minference attention: parameter 'config' entry {where} must be an object with \"pattern\" one of "
            f"{', '.join(PATTERNS)} (got {entry!r})"
        )
    cls = PATTERNS[entry["pattern"]]
    args = {key: value for key, value in entry.items() if key != "pattern"}
    if cls is None:
        if args:
            raise MethodError(f"minference attention: config entry {where}: pattern 'dense' takes no parameters")
        return None
    try:
        return cls(**args)
    except TypeError:
        raise MethodError(
            f"minference attention: config entry {where}: unknown parameter for pattern '{entry['pattern']}' "
            f"in {sorted(args)}"
        ) from None


def load_config(config: str | dict) -> dict[int, list[dict[str, Any]]]:
    """Read a per-head config: a dict, inline JSON, or a JSON file path, ``{"<layer>": [entry per head], ...}``.

    Each entry is ``{"pattern": "a_shape" | "vertical_slash" | "block_sparse" | "dense", **parameters}``.
    A top-level ``"layers"`` key holding that mapping is accepted too (the form :func:`search_patterns` writes).
    """
    if isinstance(config, str):
        text = config.strip()
        if not text.startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise MethodError(
                    f"minference attention: parameter 'config' must be inline JSON or a JSON file; {text!r} is neither"
                )
            text = path.read_text()
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise MethodError(f"minference attention: parameter 'config' is not valid JSON ({err})") from None
    if isinstance(config, dict) and "layers" in config:
        config = config["layers"]
    if not isinstance(config, dict):
        raise MethodError("minference attention: parameter 'config' must map layer -> list of head entries")
    out = {}
    for layer, heads in config.items():
        if not str(layer).isdigit() or not isinstance(heads, list) or not heads:
            raise MethodError(
                f"minference attention: parameter 'config': layer {layer!r} must be a layer index mapping to a "
                "non-empty list with one entry per head"
            )
        for h, entry in enumerate(heads):
            pattern_method(entry, f"[{layer}][{h}]")
        out[int(layer)] = heads
    return out


def per_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: Sequence[dict[str, Any]],
    dense: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """(B, H, T, D_v) attention with each query head under its own pattern (heads sharing one run together)."""
    B, H, T, _ = q.shape
    if len(heads) != H:
        raise MethodError(f"minference attention: the config lists {len(heads)} heads for a layer with H = {H}")
    group = H // k.shape[1]
    out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
    by_pattern: dict[str, list[int]] = {}
    for h, entry in enumerate(heads):
        by_pattern.setdefault(json.dumps(entry, sort_keys=True), []).append(h)
    for key, hs in by_pattern.items():
        idx = torch.tensor(hs, device=q.device)
        # (B, h, S, D): each selected query head with its own key/value head, so the pattern sees no GQA
        q_h, k_h, v_h = q[:, idx], k[:, idx // group], v[:, idx // group]
        d_h = dense if dense is None or dense.shape[1] == 1 else dense[:, idx]
        method = pattern_method(json.loads(key), f"for heads {hs}")
        out[:, idx] = (
            dense_attention(q_h, k_h, v_h, d_h, scale)
            if method is None
            else method.attend(None, q_h, k_h, v_h, d_h, scale)
        )
    return out


@register("attention", "minference")
@dataclass
class MInference(SparseAttention):
    """MInference: each attention head uses its own sparse pattern (A-shape, vertical-slash, block-sparse, dense).

    The patterns come from a per-head config (layer -> head -> pattern and parameters), found offline by
    :func:`search_patterns` on a calibration prompt; the dynamic indices of vertical-slash and block-sparse are
    still estimated online per prompt. Layers missing from the config use ``default``. Decoding is dense.
    Based on https://arxiv.org/abs/2407.02490 (Jiang et al. 2024, MInference 1.0: offline kernel-aware pattern
    search, online index estimation).

    Parameters:
        config: inline JSON, or a path to a JSON file, ``{"<layer>": [{"pattern": ..., **params}, ...]}``.
        default: pattern of layers not in the config: one of a_shape, vertical_slash, block_sparse, dense
            (default vertical_slash with its own defaults).
        skip_layers, skip_last: int >= 0, leading / trailing layers kept dense (default 0, 0).
    """

    paper = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
        "(Jiang et al. 2024) https://arxiv.org/abs/2407.02490"
    )
    config: str = param("{}", file=True, help="per-head pattern config: inline JSON or a JSON file path")
    default: str = param("vertical_slash", choices=tuple(PATTERNS), help="pattern of layers missing from config")
    _layers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers = load_config(self.config)

    def attend(self, module, q, k, v, dense, scale):
        layer = getattr(module, "layer_idx", None)
        heads = self._layers.get(layer, [{"pattern": self.default}] * q.shape[1])
        return per_head_attention(q, k, v, heads, dense, scale)
