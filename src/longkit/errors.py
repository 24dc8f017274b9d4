"""Error types. Every user-facing error names the parameter and the valid values."""

from __future__ import annotations


class LongkitError(Exception):
    """Base class of every error longkit raises on purpose."""


class MethodError(LongkitError, ValueError):
    """Unknown method name, bad method parameter, or a method that does not fit the model."""


class ModelError(LongkitError, ValueError):
    """A model that cannot be found, loaded, or used for what was asked."""


class EvalError(LongkitError, ValueError):
    """Bad evaluation settings (task, length, depth, run directory...)."""


class DataError(LongkitError, ValueError):
    """Training data that cannot be read or used (missing, empty or malformed files, bad packing settings)."""


class TrainError(LongkitError, RuntimeError):
    """A training run that cannot start or must stop (an output directory holding another run, a NaN loss...)."""
