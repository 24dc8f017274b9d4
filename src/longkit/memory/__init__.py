"""Memory room: retrieval, block memory and offload methods, registered under kind ``memory``.

``rag`` and ``self_route`` (:mod:`longkit.memory.rag`) are prompt-level: they keep the context chunks most relevant
to the question; the eval runner builds the prompt from :meth:`~longkit.memory.rag.RetrievalMemory.retrieve`.
"""

from longkit.memory import infllm, rag  # noqa: F401  (registration)
from longkit.memory.base import MemoryMethod
from longkit.memory.rag import RAG, RetrievalMemory, SelfRoute

__all__ = ["RAG", "MemoryMethod", "RetrievalMemory", "SelfRoute"]
