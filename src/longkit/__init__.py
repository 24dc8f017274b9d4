"""longkit: a tested, composable toolkit for long-context LLMs on PyTorch + Hugging Face transformers.

Importing longkit registers its methods in longkit's own registries and patches nothing.
"""

from longkit import attention, kvcache, memory, rope, runtime  # noqa: F401  (method registration; runtime API)
from longkit.errors import EvalError, LongkitError, MethodError, ModelError
from longkit.methods import Method
from longkit.models import LoadedModel, load_model
from longkit.registry import KINDS, REGISTRIES, param, register, registry
from longkit.seam import Applied, MethodSpec, apply

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "REGISTRIES",
    "Applied",
    "EvalError",
    "LoadedModel",
    "LongkitError",
    "Method",
    "MethodError",
    "MethodSpec",
    "ModelError",
    "apply",
    "load_model",
    "param",
    "register",
    "registry",
]
