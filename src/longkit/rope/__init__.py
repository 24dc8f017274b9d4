"""Position extrapolation room: RoPE scaling methods, one file each, registered under kind ``rope``.

Each method file also holds its pure frequency function, registered in :data:`FREQUENCIES`:
``frequencies("yarn", head_dim=128, base=1e4, factor=4, ...) -> (inv_freq, attention_factor)``.
Training-free position remaps (Self-Extend, ReRoPE, DCA, LM-Infinite) are pure functions in ``remap.py``:
``relative_positions("self_extend", 4096, group_size=4, window=512) -> (T, T)`` relative positions.
The LongRoPE factor search and the RoPE scaling laws are tools over these methods: :mod:`longkit.tools`.
"""

from longkit.models.introspect import rotary_modules, trained_length
from longkit.rope import abf, default, dynamic, linear, llama3, longrope, ntk, yarn  # noqa: F401  (registration)
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import (
    FREQUENCIES,
    RopeParams,
    frequencies,
    frequencies_from_config,
    register_frequencies,
    rope_params,
)
from longkit.rope.remap import REMAPS, register_remap, relative_positions

__all__ = [
    "FREQUENCIES",
    "REMAPS",
    "HFRopeMethod",
    "RopeParams",
    "frequencies",
    "frequencies_from_config",
    "register_frequencies",
    "register_remap",
    "relative_positions",
    "rope_params",
    "rotary_modules",
    "trained_length",
]
