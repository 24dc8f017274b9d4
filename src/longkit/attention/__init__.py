"""Attention room: attention implementations registered under kind ``attention``, and their shared parts.

``reference_attention`` (plain, O(T·S)) is the ground truth; ``blockwise_attention`` is the FlashAttention
algorithm in PyTorch; ``merge_partials`` is the one log-sum-exp merge for combining partial attentions;
``MaskSpec`` describes masks (causal, window, sinks, documents, block-sparse, dense). Training-free position
remaps (``self_extend``, ``rerope``, ``leaky_rerope``, ``lm_infinite``, ``dca``) share ``position_remap.py``: RoPE
re-rotation and a near part + far part, each blockwise, merged by log-sum-exp. ``sliding_window`` computes a hybrid
model's sliding-window layers by chunked SDPA over each query chunk's key band (O(T·W), ``sliding.py``) instead of
transformers' SDPA under a dense T×T mask. Every plain-PyTorch reference (the ground truth of the fast paths'
tests) lives in ``naive.py``.
"""

from longkit.attention import (  # noqa: F401  (registration)
    a_shape,
    block_sparse,
    blockwise,
    dca,
    eager,
    entropy_scaling,
    lm_infinite,
    logn,
    minference,
    moba,
    quest,
    rerope,
    ring,
    s2_attn,
    sdpa,
    self_extend,
    sliding,
    ulysses,
    vertical_slash,
)
from longkit.attention.base import AttentionMethod
from longkit.attention.blockwise import Blockwise, blockwise_attention
from longkit.attention.lse import merge_partials, merge_partials_
from longkit.attention.masks import EMPTY, FULL, PARTIAL, MaskSpec
from longkit.attention.naive import reference_attention
from longkit.attention.position_remap import RemapAttention, remapped_attention
from longkit.attention.rerope import LeakyReRoPE, ReRoPE, rerope_attention
from longkit.attention.ring import Ring, ring_attention
from longkit.attention.self_extend import SelfExtend, self_extend_attention
from longkit.attention.sequence_parallel import SequenceParallel, default_backend, init_distributed, sequence_parallel
from longkit.attention.sliding import SlidingWindow, sliding_window_attention
from longkit.attention.ulysses import Ulysses, ulysses_attention

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "AttentionMethod",
    "Blockwise",
    "LeakyReRoPE",
    "MaskSpec",
    "ReRoPE",
    "RemapAttention",
    "SelfExtend",
    "SlidingWindow",
    "blockwise_attention",
    "merge_partials",
    "merge_partials_",
    "reference_attention",
    "remapped_attention",
    "rerope_attention",
    "self_extend_attention",
    "sliding_window_attention",
    "Ring",
    "SequenceParallel",
    "Ulysses",
    "default_backend",
    "init_distributed",
    "ring_attention",
    "sequence_parallel",
    "ulysses_attention",
]
