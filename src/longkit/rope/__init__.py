"""Position extrapolation room: RoPE scaling methods, one file each, registered under kind ``rope``.

Each method file also holds its pure frequency function, registered in :data:`FREQUENCIES`:
``frequencies("yarn", head_dim=128, base=1e4, factor=4, ...) -> (inv_freq, attention_factor)``.
"""

from longkit.rope import abf, default, dynamic, linear, llama3, longrope, ntk, yarn  # noqa: F401  (registration)
from longkit.rope.base import HFRopeMethod, rotary_modules, trained_length
from longkit.rope.frequencies import FREQUENCIES, frequencies, frequencies_from_config, register_frequencies
from longkit.rope.params import RopeParams, rope_params

__all__ = [
    "FREQUENCIES",
    "HFRopeMethod",
    "RopeParams",
    "frequencies",
    "frequencies_from_config",
    "register_frequencies",
    "rope_params",
    "rotary_modules",
    "trained_length",
]
