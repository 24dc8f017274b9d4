"""Runtime: how a model is run over long inputs, whatever methods are applied.

Chunked prefill, greedy generation with measured cost, windowed NLL, compress-once-ask-many, prefill
capture/replay for sweeping KV methods over one prefill, and compiled decode steps (``compiled_decode``). Sits above
the seam and the method rooms, below eval.
"""

from longkit.runtime.chunked_prefill import chunked_prefill
from longkit.runtime.compiled_decode import CompiledDecoder, compiled_decode
from longkit.runtime.compress_context import compress_context
from longkit.runtime.generate import Generation, PeakMemory, greedy_generate, window_nll
from longkit.runtime.prefill_capture import Prefill, capture_prefill

__all__ = [
    "CompiledDecoder",
    "Generation",
    "PeakMemory",
    "Prefill",
    "capture_prefill",
    "chunked_prefill",
    "compiled_decode",
    "compress_context",
    "greedy_generate",
    "window_nll",
]
