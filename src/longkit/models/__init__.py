"""Models: load a local Hugging Face causal LM, the default SmolLM2 alias, or a tiny random model.

>>> lm = longkit.load_model("smollm2-135m")      # provisioned offline on first use
>>> lm = longkit.load_model("tiny-llama")        # random, seeded, byte tokenizer
>>> lm = longkit.load_model("/path/to/hf/dir")   # any local causal-LM directory
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longkit.errors import ModelError
from longkit.models.introspect import trained_length
from longkit.models.smollm2 import cache_dir, smollm2_dir
from longkit.models.tiny import TINY_CONFIGS, tiny_model
from longkit.models.tokenizer import byte_tokenizer

DEFAULT_MODEL = "smollm2-135m"
ALIASES = ("smollm2-135m", *TINY_CONFIGS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    dtype: str

    @property
    def trained_length(self) -> int:
        return trained_length(self.model)

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "dtype": self.dtype,
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "trained_length": self.trained_length,
            "rope_parameters": getattr(cfg, "rope_parameters", None),
            "attn_implementation": cfg._attn_implementation,
        }


def fast_bf16() -> bool:
    """True where bfloat16 matmuls are hardware-accelerated on this CPU (AMX or AVX512-BF16)."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:
        pass
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_dtype(dtype: str | torch.dtype, name: str, device: str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if name in TINY_CONFIGS:
            return torch.float32
        if device.startswith("cuda") or fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"parameter 'dtype' must be one of auto, {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def _check_causal_lm(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model directory {path} has no config.json; expected a Hugging Face model directory")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            AutoConfig.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 - any loading failure is reported the same way
            raise ModelError(f"cannot read the config of {path}: {err}") from None
        raise ModelError(f"model {path} (model_type={model_type!r}) is not a causal language model")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a model by alias (``smollm2-135m``, ``tiny-llama``, ``tiny-qwen2``...) or local directory."""
    torch_dtype = resolve_dtype(dtype, name_or_path, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if name_or_path in TINY_CONFIGS:
        model, tok = tiny_model(name_or_path, seed=seed, dtype=torch_dtype, attn_implementation=attn_implementation)
        return LoadedModel(model.to(device), tok, name_or_path, f"random config, seed {seed}", dtype_name)
    if name_or_path == "smollm2-135m":
        path = smollm2_dir()
        name = name_or_path
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ModelError(
                f"no model alias or directory {name_or_path!r}; aliases: {', '.join(ALIASES)}, "
                "or a local Hugging Face model directory"
            )
        name = path.name
    _check_causal_lm(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the model in {path}: {err}") from None
    return LoadedModel(model.to(device).eval(), tokenizer, name, str(path), dtype_name)


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "byte_tokenizer",
    "cache_dir",
    "load_model",
    "resolve_dtype",
    "tiny_model",
]
