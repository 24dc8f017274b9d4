"""Memory methods (retrieval, block memory, offload) register under kind ``memory``."""

from __future__ import annotations

from dataclasses import dataclass

from longkit.methods import Method


@dataclass
class MemoryMethod(Method):
    """Base of memory methods: override :meth:`apply` (hooks) and/or :meth:`make_cache`."""
