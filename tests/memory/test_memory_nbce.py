"""NBCE: the pooling rule against a transcription of the official code (bojone/NBCE test.py) on hand-made logits,
one window with beta = 0 is plain greedy decoding, and every window is its own ordinary prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TopPLogitsWarper

import longkit
from longkit.errors import MethodError
from longkit.memory.nbce import nbce_pool
from longkit.memory.windows import WindowedPrompt
from longkit.runtime.generate import greedy_generate
from longkit.runtime.windows import parallel_generate
from longkit.seam import MethodSpec


def official_steps(step_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """The core of bojone/NBCE test.py (commit 1a4c178, "添加转移概率"), transcribed line by line: row 0 is the
    context-free prompt; returns the merged logits of each step (the demo then samples at tau = 0.01)."""
    processors = LogitsProcessorList()
    processors.append(TopPLogitsWarper(0.95))
    merged, k = [], None
    for i, raw in enumerate(step_logits):
        beta, eta = 0.25, 0.1
        logits = raw
        logits = logits - logits.logsumexp(dim=-1, keepdims=True)
        logits = processors(None, logits)
        entropy = -(logits.exp() * logits.clip(-100, 0)).sum(dim=-1)
        if i > 0:
            entropy[k] -= eta
        k = entropy[1:].argmin() + 1
        logits_max = logits[k]
        logits_uncond = logits[0]
        logits_merged = (1 + beta) * logits_max - beta * logits_uncond
        logits = torch.where(logits_uncond > -100, logits_merged, logits_max)
        merged.append(logits)
    return merged


def hand_made_steps() -> list[torch.Tensor]:
    """Three steps over a 6-token vocabulary and 3 windows (+ the context-free row). Step 2: window 1 (chosen at
    step 1) is slightly less confident than window 3, so only the eta bonus keeps it; step 3: window 3 is far more
    confident and wins despite the bonus."""
    flat = [0.0] * 6
    return [
        torch.tensor([flat, [4.0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 2.0, 0, 0, 0]]),
        torch.tensor([[0.5, -1.0, 0, 0, 0, 3.0], [0, 3.0, 0, 0, 0, 0], [0.0] * 6, [0, 0, 3.05, 0, 0, 0]]),
        torch.tensor([[0, 1.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0.0] * 6, [0, 0, 0, 9.0, 0, 0]]),
    ]


def test_min_entropy_pooling_matches_the_official_code():
    steps = hand_made_steps()
    want = official_steps(steps)
    previous, chosen = None, []
    for raw, expect in zip(steps, want, strict=True):
        got, previous = nbce_pool(torch.log_softmax(raw, dim=-1), "min_entropy", 0.25, 0.1, 0.95, previous)
        chosen.append(previous)
        assert torch.equal(torch.isinf(got), torch.isinf(expect))
        torch.testing.assert_close(got[~torch.isinf(got)], expect[~torch.isinf(expect)], rtol=1e-6, atol=1e-6)
    assert chosen == [1, 1, 3]
    # Without the bonus, step 2 picks window 3: eta is what keeps window 1.
    logp = torch.log_softmax(steps[1], dim=-1)
    assert nbce_pool(logp, "min_entropy", 0.25, 0.0, 0.95, 1)[1] == 3
    # Step 2's context-free row loses token 1 to top-p: where it is -inf the window's own log-prob stands.
    got, k = nbce_pool(logp, "min_entropy", 0.25, 0.1, 0.95, 1)
    window = TopPLogitsWarper(0.95)(None, logp.clone())[1]
    assert got[1] == window[1] and got[5] == pytest.approx(1.25 * float(window[5]) - 0.25 * float(logp[0, 5]))


def test_mean_pooling_is_the_naive_bayes_average():
    logp = torch.log_softmax(hand_made_steps()[0], dim=-1)
    got, k = nbce_pool(logp, "mean", 0.5, 0.1, 0.95, None)
    assert k is None
    torch.testing.assert_close(got, 1.5 * (logp[1] + logp[2] + logp[3]) / 3 - 0.5 * logp[0])


def random_prompt(lm, front=5, context=96, task=7, seed=1) -> WindowedPrompt:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.model.config.vocab_size, (front + context + task,), generator=g).tolist()
    return WindowedPrompt(ids[:front], ids[front : front + context], ids[front + context :])


def test_one_window_with_beta_0_is_plain_greedy_decoding(tiny_llama):
    prompt = random_prompt(tiny_llama)
    base = greedy_generate(tiny_llama.model, prompt.ids, 12, None, set())
    with longkit.apply(tiny_llama.model, "memory=nbce:n_windows=1,beta=0") as applied:
        gen = parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 12, set(), applied.new_cache)
    assert gen.tokens == base.tokens and gen.window_sizes == [96]
    # Two prompts (the window's and the context-free one), each read once, then 11 tokens fed to both.
    assert gen.tokens_processed == len(prompt.ids) + len(prompt.front + prompt.task) + 2 * 11
    # With the default beta the context-free prompt counts: the answer is not the plain model's.
    with longkit.apply(tiny_llama.model, "memory=nbce:n_windows=1,beta=3") as applied:
        other = parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 12, set(), applied.new_cache)
    assert other.tokens != base.tokens


def test_every_window_is_an_ordinary_prompt_and_the_token_is_fed_back_to_all(tiny_llama):
    model = tiny_llama.model
    prompt = random_prompt(tiny_llama)
    prompts = [prompt.front + prompt.task] + [prompt.front + prompt.context[s:e] + prompt.task
                                              for s, e in [(0, 32), (32, 64), (64, 96)]]
    with longkit.apply(model, "memory=nbce:n_windows=3") as applied, torch.inference_mode():
        method = applied.spec.memory
        state = method.start(model, prompt, 4, applied.new_cache)
        assert state.windows == [(0, 32), (32, 64), (64, 96)]
        first = state.scores.clone()
        method.step(model, state, 11)
        rows = [torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1) for p in prompts]
        want, k = nbce_pool(torch.stack(rows), "min_entropy", 0.25, 0.1, 0.95, None)
        torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
        rows = [torch.log_softmax(model(torch.tensor([p + [11]])).logits[0, -1], -1) for p in prompts]
        want, _ = nbce_pool(torch.stack(rows), "min_entropy", 0.25, 0.1, 0.95, k)
        torch.testing.assert_close(state.scores, want, rtol=1e-4, atol=1e-4)
    assert state.extra["chosen"][0] == k and len(state.caches) == 4


def test_nbce_composes_with_a_kv_method_and_refuses_bad_settings(tiny_llama):
    # Each window is an ordinary prompt, so a KV method's cache serves every window (here: keep everything).
    prompt = random_prompt(tiny_llama)
    with longkit.apply(tiny_llama.model, "memory=nbce:n_windows=2") as applied:
        plain = parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 6, set(), applied.new_cache)
    with longkit.apply(tiny_llama.model, "kv=snapkv:ratio=1+memory=nbce:n_windows=2") as applied:
        cache = applied.new_cache()
        assert type(cache).__name__ != "DynamicCache"
        kv = parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 6, set(), applied.new_cache)
    assert kv.tokens == plain.tokens
    for spec, match in (("memory=nbce:pooling=max", r"parameter 'pooling' must be one of 'min_entropy', 'mean'"),
                        ("memory=nbce:top_p=0", r"parameter 'top_p' must be > 0"),
                        ("memory=nbce:beta=-1", r"parameter 'beta' must be >= 0"),
                        ("memory=nbce:n_windows=0", r"parameter 'n_windows' must be >= 1")):
        with pytest.raises(MethodError, match=match):
            MethodSpec.parse(spec)
    with pytest.raises(MethodError, match=r"memory method 'nbce': parameter 'window' = 900 is larger than the trained "
                                          r"length 512"):
        with longkit.apply(tiny_llama.model, "memory=nbce:window=900") as applied:
            parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 6, set(), applied.new_cache)
