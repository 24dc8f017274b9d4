"""Parallel Context Windows: the fast path (windows through a cropped DynamicCache) against PCW's rule written as
one full forward with an explicit 4D mask and position ids, and the rule's consequences (one window is the plain
model, windows do not see each other, shared positions, the task sees every window)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import longkit
from longkit.errors import MethodError
from longkit.memory.windows import WindowedPrompt, balanced_spans
from longkit.runtime.generate import greedy_generate
from longkit.runtime.windows import parallel_generate
from longkit.seam import MethodSpec


def random_prompt(lm, front=5, context=120, task=7, seed=0) -> WindowedPrompt:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.model.config.vocab_size, (front + context + task,), generator=g).tolist()
    return WindowedPrompt(ids[:front], ids[front : front + context], ids[front + context :])


def start(lm, spec: str, prompt: WindowedPrompt, max_new: int = 4):
    applied = longkit.apply(lm.model, spec)
    with torch.inference_mode():
        state = applied.spec.memory.start(lm.model, prompt, max_new, applied.new_cache)
    applied.remove()
    return applied.spec.memory, state


def pcw_rule(F: int, sizes: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCW's rule over the sequence [front, window 1..N, task] (Ratner et al. 2023 §2; AI21's pcw_wrapper.py):
    (L, L) bool "query may attend key" and (L,) position ids. Windows take positions F.. and see the front and
    themselves (causally); task tokens take positions after the longest window and see everything before them."""
    L = F + sum(sizes) + T
    group = torch.full((L,), -1)  # -1: front or task (sees all earlier tokens); k: window k
    pos = torch.arange(L)
    at = F
    for k, n in enumerate(sizes):
        group[at : at + n] = k
        pos[at : at + n] = torch.arange(F, F + n)
        at += n
    pos[at:] = torch.arange(F + max(sizes), F + max(sizes) + T)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    other_window = (group[:, None] >= 0) & (group[None, :] >= 0) & (group[:, None] != group[None, :])
    return causal & ~other_window, pos


def reference_logits(model, prompt: WindowedPrompt, spans, extra: list[int] = ()) -> torch.Tensor:
    """One full forward (eager attention: plain matmul + softmax) with PCW's explicit mask; ``extra`` generated
    tokens continue the task. Logits (L, V)."""
    sizes = [e - s for s, e in spans]
    task = prompt.task + list(extra)
    allowed, pos = pcw_rule(len(prompt.front), sizes, len(task))
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    ids = torch.tensor([prompt.front + prompt.context + task])
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos[None]).logits[0]


@pytest.fixture(scope="module")
def eager_llama(tiny_llama):
    lm = longkit.load_model("tiny-llama", attn_implementation="eager")
    lm.model.load_state_dict(tiny_llama.model.state_dict())
    assert lm.model.config._attn_implementation == "eager"
    return lm


def test_the_rule_itself_is_pcw():
    allowed, pos = pcw_rule(2, [3, 2], 2)
    # Windows share positions 2.. ; the task continues after the longest window (2 + 3).
    assert pos.tolist() == [0, 1, 2, 3, 4, 2, 3, 5, 6]
    assert not allowed[5, 2:5].any() and allowed[5, :2].all()  # window 2 sees the front, not window 1
    assert allowed[7].tolist() == [True] * 8 + [False] and allowed[8].all()


@pytest.mark.parametrize("n_windows", [2, 3, 5])
def test_fast_path_equals_one_forward_with_the_explicit_mask(tiny_llama, eager_llama, n_windows):
    prompt = random_prompt(tiny_llama, context=121)
    applied = longkit.apply(tiny_llama.model, f"memory=pcw:n_windows={n_windows}")
    with torch.inference_mode():
        method = applied.spec.memory
        state = method.start(tiny_llama.model, prompt, 4, applied.new_cache)
        first = state.scores.clone()
        method.step(tiny_llama.model, state, 17)
        method.step(tiny_llama.model, state, 23)
    applied.remove()
    assert len(state.windows) == n_windows
    ref = reference_logits(eager_llama.model, prompt, state.windows, [17, 23])
    torch.testing.assert_close(first, ref[-3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.scores, ref[-1], rtol=1e-4, atol=1e-4)
    # A different window layout gives different logits: the comparison can tell layouts apart.
    other = reference_logits(eager_llama.model, prompt, balanced_spans(121, n_windows + 1), [17, 23])
    assert not torch.allclose(other[-1], ref[-1], atol=1e-3)


def test_one_window_is_the_plain_model(tiny_llama):
    prompt = random_prompt(tiny_llama)
    _, state = start(tiny_llama, "memory=pcw:n_windows=1", prompt)
    with torch.inference_mode():
        plain = tiny_llama.model(torch.tensor([prompt.ids]), use_cache=True)
    torch.testing.assert_close(state.scores, plain.logits[0, -1], rtol=1e-5, atol=1e-5)
    (cache,) = state.caches
    for mine, theirs in zip(cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
    with longkit.apply(tiny_llama.model, "memory=pcw:n_windows=1") as applied:
        gen = parallel_generate(tiny_llama.model, applied.spec.memory, prompt, 10, set(), applied.new_cache)
    base = greedy_generate(tiny_llama.model, prompt.ids, 10, None, set())
    assert gen.tokens == base.tokens and gen.window_sizes == [120]
    assert gen.tokens_processed == len(prompt.ids) + 9


def _window_keys(state, F, spans, layer=1):
    keys = state.caches[0].layers[layer].keys[0]  # (H_kv, S, D)
    return [keys[:, F + s : F + e] for s, e in spans]


def test_windows_do_not_see_each_other_and_share_positions(tiny_llama):
    prompt = random_prompt(tiny_llama, context=90)
    F = len(prompt.front)
    _, state = start(tiny_llama, "memory=pcw:n_windows=3", prompt)
    spans = state.windows
    assert spans == [(0, 30), (30, 60), (60, 90)]
    # Window 2 changed: window 1 and 3 (and the front) keep exactly their keys; the task's logits move.
    changed = WindowedPrompt(prompt.front, prompt.context[:30] + prompt.context[30:60][::-1] + prompt.context[60:],
                             prompt.task)
    _, other = start(tiny_llama, "memory=pcw:n_windows=3", changed)
    a, b = _window_keys(state, F, spans), _window_keys(other, F, spans)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.allclose(a[1], b[1])
    assert torch.equal(state.caches[0].layers[1].keys[0, :, :F], other.caches[0].layers[1].keys[0, :, :F])
    assert not torch.allclose(state.scores, other.scores, atol=1e-4)
    # Every window changes what the task tokens see (each window is attended, not only the last).
    for k in range(3):
        s, e = spans[k]
        ctx = list(prompt.context)
        ctx[s:e] = ctx[s:e][::-1]
        _, moved = start(tiny_llama, "memory=pcw:n_windows=3", WindowedPrompt(prompt.front, ctx, prompt.task))
        assert not torch.allclose(state.scores, moved.scores, atol=1e-4), f"window {k} is not seen by the task"
    # Identical windows get identical keys: same tokens at the same (shared) positions, seeing the same front.
    same = WindowedPrompt(prompt.front, prompt.context[:30] * 3, prompt.task)
    _, rep = start(tiny_llama, "memory=pcw:n_windows=3", same)
    w = _window_keys(rep, F, spans)
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    # The task continues after the longest window: 3 windows of 30 -> F + 30 + len(task).
    assert rep.extra["next_position"] == F + 30 + len(prompt.task)


def test_window_sizes_fit_the_trained_length(tiny_llama):
    method = MethodSpec.parse("memory=pcw").memory
    prompt = random_prompt(tiny_llama, front=10, context=1000, task=6)
    spans = method.spans(prompt, 20, trained=512)
    room = 512 - 10 - 6 - 20
    assert len(spans) == math.ceil(1000 / room) == 3
    assert spans[0] == (0, 334) and spans[-1][1] == 1000 and max(e - s for s, e in spans) <= room
    assert MethodSpec.parse("memory=pcw:window=100").memory.spans(prompt, 20, trained=512) == balanced_spans(1000, 10)
    assert balanced_spans(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_bad_window_settings_are_clear_errors(tiny_llama):
    prompt = random_prompt(tiny_llama, front=10, context=1000, task=6)
    spans = lambda spec, p=prompt, new=20: MethodSpec.parse(spec).memory.spans(p, new, trained=512)  # noqa: E731
    with pytest.raises(MethodError, match=r"parameter 'window' = 477 is larger than the trained length 512 allows.*"
                                          r"use window <= 476"):
        spans("memory=pcw:window=477")
    with pytest.raises(MethodError, match=r"parameter 'n_windows' = 2 makes windows of 500 tokens.*use n_windows >= 3"):
        spans("memory=pcw:n_windows=2")
    with pytest.raises(MethodError, match=r"parameter 'n_windows' must be >= 1"):
        MethodSpec.parse("memory=pcw:n_windows=0")
    with pytest.raises(MethodError, match=r"'n_windows' = 1001 is more than the context's 1000 tokens"):
        spans("memory=pcw:n_windows=1001")
    with pytest.raises(MethodError, match="both set the window size"):
        MethodSpec.parse("memory=pcw:n_windows=2,window=10")
    with pytest.raises(MethodError, match="empty context: zero windows"):
        spans("memory=pcw", WindowedPrompt([1], [], [2]))
    with pytest.raises(MethodError, match="needs a question after the context"):
        spans("memory=pcw", WindowedPrompt([1], [5, 6], []))
    with pytest.raises(MethodError, match=r"plus 600 new tokens already fill the trained length 512"):
        spans("memory=pcw", prompt, 600)
    # Combinations that would silently not be PCW are refused.
    with pytest.raises(MethodError, match="each keep their own KV cache"):
        MethodSpec.parse("kv=snapkv+memory=pcw")
    with pytest.raises(MethodError, match="memory method 'pcw' gives windows shared position ids.*cannot be combined"):
        longkit.apply(tiny_llama.model, "attention=self_extend:group_size=4,window=16+memory=pcw")
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_eval_cli_runs_pcw_and_nbce_with_cost_fields(tmp_path):
    from typer.testing import CliRunner

    from longkit.cli import app

    run = tmp_path / "run"
    out = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--task", "passkey", "--lengths", "512",
                                   "--depths", "0.5", "--memory", "pcw:window=128", "--memory", "nbce:n_windows=3",
                                   "--no-report", "--out", str(run)])
    assert out.exit_code == 0, out.output
    records = {r["method"]: r for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
    assert set(records) == {"baseline", "memory=pcw:window=128", "memory=nbce:n_windows=3"}
    pcw, nbce = records["memory=pcw:window=128"], records["memory=nbce:n_windows=3"]
    for r in (pcw, nbce):
        assert r["n_tokens"] == 512 and r["score"] is not None and "error" not in r
        assert r["peak_mem_bytes"] is not None and r["kv_bytes"] > 0 and r["prefill_s"] > 0
    n_ctx = pcw["context_tokens"]
    assert pcw["windows"] == math.ceil(n_ctx / 128) and pcw["window_tokens"] <= 128
    # PCW reads the prompt once; NBCE reads front + task once per window plus the context-free prompt.
    assert pcw["tokens_processed"] == 512 + pcw["new_tokens"] - 1
    fixed = 512 - n_ctx
    assert nbce["windows"] == 3 and nbce["tokens_processed"] == n_ctx + 4 * fixed + 4 * (nbce["new_tokens"] - 1)
    # The joint PCW cache holds the whole prompt once (plus nothing else); baseline's holds the same tokens.
    assert pcw["kv_bytes"] == records["baseline"]["kv_bytes"]
