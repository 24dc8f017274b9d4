"""Tools: searches and analyses built over the methods and the evaluation runtime.

- :mod:`longkit.tools.longrope_search`: LongRoPE's evolutionary search of per-dimension rescale factors.
- :mod:`longkit.tools.scaling_laws`: RoPE scaling laws (critical dimension, extrapolation bound, minimum base).
- :mod:`longkit.tools.minference_search`: MInference's offline per-head sparse-pattern search.

Imported on demand (``from longkit.tools import longrope_search``); importing longkit does not load them.
"""
