"""Memory room: retrieval, block memory and offload methods, registered under kind ``memory``.

``rag`` and ``self_route`` (:mod:`longkit.memory.rag`) are prompt-level: they keep the context chunks most relevant
to the question; ``longllmlingua`` (:mod:`longkit.memory.longllmlingua`) compresses the context with a small LM;
the eval runner builds the prompt from :meth:`~longkit.memory.base.PromptMemory.retrieve`. ``pcw`` and ``nbce``
(:mod:`longkit.memory.windows`) read the context in parallel windows that each fit the trained length; the eval
runner hands them the prompt cut around its context. ``infllm`` (:mod:`longkit.memory.infllm`) is block memory in
the model's attention with its own cache; on models whose layers differ (Gemma 3) it runs on the full-attention
layers and leaves the sliding-window layers their window.
"""

from longkit.memory import infllm, longllmlingua, nbce, pcw, rag  # noqa: F401  (registration)
from longkit.memory.base import MemoryMethod, PromptMemory
from longkit.memory.longllmlingua import LongLLMLingua
from longkit.memory.rag import RAG, RetrievalMemory, SelfRoute

__all__ = ["RAG", "LongLLMLingua", "MemoryMethod", "PromptMemory", "RetrievalMemory", "SelfRoute"]
