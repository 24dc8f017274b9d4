"""Attention room: attention implementations registered under kind ``attention``."""

from longkit.attention import eager, sdpa  # noqa: F401  (registration)
from longkit.attention.base import AttentionMethod

__all__ = ["AttentionMethod"]
