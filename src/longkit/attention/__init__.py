"""Attention room: attention implementations registered under kind ``attention``, and their shared parts.

``reference_attention`` (plain, O(T·S)) is the ground truth; ``blockwise_attention`` is the FlashAttention
algorithm in PyTorch; ``merge_partials`` is the one log-sum-exp merge for combining partial attentions;
``MaskSpec`` describes masks (causal, window, sinks, documents, block-sparse, dense).
"""

from longkit.attention import blockwise, eager, sdpa  # noqa: F401  (registration)
from longkit.attention.base import AttentionMethod
from longkit.attention.blockwise import Blockwise, blockwise_attention
from longkit.attention.lse import merge_partials, merge_partials_
from longkit.attention.masks import EMPTY, FULL, PARTIAL, MaskSpec
from longkit.attention.reference import reference_attention

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "AttentionMethod",
    "Blockwise",
    "MaskSpec",
    "blockwise_attention",
    "merge_partials",
    "merge_partials_",
    "reference_attention",
]
