"""Position extrapolation room: RoPE scaling methods, one file each, registered under kind ``rope``."""

from longkit.rope import default, dynamic, linear, llama3, longrope, yarn  # noqa: F401  (registration)
from longkit.rope.base import HFRopeMethod, rotary_modules, trained_length

__all__ = ["HFRopeMethod", "rotary_modules", "trained_length"]
