"""Runtime: how a model is run over long inputs, whatever methods are applied.

Chunked prefill, greedy generation with measured cost, windowed NLL, compress-once-ask-many, and prefill
capture/replay for sweeping KV methods over one prefill. Sits above the seam and the method rooms, below eval.
"""

from longkit.runtime.chunked_prefill import chunked_prefill
from longkit.runtime.compress_context import compress_context
from longkit.runtime.generate import Generation, PeakMemory, greedy_generate, window_nll
from longkit.runtime.prefill_capture import Prefill, capture_prefill

__all__ = [
    "Generation",
    "PeakMemory",
    "Prefill",
    "capture_prefill",
    "chunked_prefill",
    "compress_context",
    "greedy_generate",
    "window_nll",
]
