"""Memory room: retrieval, block memory and offload methods, registered under kind ``memory``."""

from longkit.memory import infllm  # noqa: F401  (registration)
from longkit.memory.base import MemoryMethod

__all__ = ["MemoryMethod"]
