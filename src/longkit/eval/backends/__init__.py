"""Generation backends: the local HF model under longkit methods, or any OpenAI-compatible endpoint."""

from longkit.eval.backends.base import Backend, GenerationRequest, GenerationResult, NLLRequest, messages_for
from longkit.eval.backends.hf import HFBackend
from longkit.eval.backends.openai import OpenAIBackend

__all__ = ["Backend", "GenerationRequest", "GenerationResult", "HFBackend", "NLLRequest", "OpenAIBackend",
           "messages_for"]
