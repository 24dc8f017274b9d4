"""Naive Bayes-based Context Extension (NBCE, Su et al. NAACL 2024; https://github.com/bojone/NBCE).

The context is cut into windows that each fit the trained length; window ``k`` becomes an ordinary prompt
``front + window_k + task`` (the official demo: ``'User: %s\\n\\n%s\\n\\nAssistant:' % (context, question)``), and
one more prompt has no context at all, ``front + task``. Every prompt is decoded with its own KV cache; at each
step the per-prompt next-token log-probabilities are pooled and the chosen token is fed back to every prompt.

Pooling, as the official ``test.py`` (latest version, "添加转移概率"), with log-probabilities ``l_0`` (no context)
and ``l_1..l_N`` (the windows), each first truncated by top-p (transformers' ``TopPLogitsWarper``, 0.95):

- ``min_entropy`` (official): the window whose truncated distribution has the least entropy,
  ``H_k = -sum exp(l_k) * clip(l_k, -100, 0)``, where the window chosen at the previous step gets ``eta`` off its
  entropy (the "transfer probability" that keeps an answer on one window); then
  ``l = (1 + beta) * l_k - beta * l_0`` where ``l_0 > -100``, else ``l_k``;
- ``mean``: the naive-Bayes average of the blog (https://kexue.fm/archives/9617),
  ``l = (1 + beta) * mean_k l_k - beta * l_0``, on the full (untruncated) log-probabilities.

The next token is the arg-max of ``l`` (greedy; the official demo samples at temperature 0.01, near-greedy).
``beta = 0.25`` and ``eta = 0.1`` are the official values. Each window is a plain prompt at ordinary positions, so
NBCE composes with the other method kinds: every window gets the combination's own cache (``new_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkit.memory.windows import ParallelWindows, WindowedPrompt, WindowState
from longkit.registry import param, register


def nbce_pool(logp: torch.Tensor, pooling: str, beta: float, eta: float, top_p: float,
              previous: int | None) -> tuple[torch.Tensor, int | None]:
    """Pooled next-token scores (V,) from per-prompt log-probabilities ``logp`` (N+1, V), row 0 without context,
    and the window chosen (row index; None for ``mean``). ``previous``: the row chosen at the previous step."""
    logp = logp.float()
    if pooling == "mean":
        return (1 + beta) * logp[1:].mean(dim=0) - beta * logp[0], None
    if top_p < 1.0:
        from transformers import TopPLogitsWarper

        # The warper's input_ids are unused by top-p; it filters each row to its smallest nucleus (-inf elsewhere).
        logp = TopPLogitsWarper(top_p)(None, logp)
    entropy = -(logp.exp() * logp.clip(-100, 0)).sum(dim=-1)
    if previous is not None:
        entropy[previous] -= eta
    k = int(entropy[1:].argmin()) + 1
    merged = (1 + beta) * logp[k] - beta * logp[0]
    # Where the context-free prompt has truncated a token away, its log-probability is no evidence: keep window k's.
    return torch.where(logp[0] > -100, merged, logp[k]), k


@register("memory", "nbce")
@dataclass
class NBCE(ParallelWindows):
    """NBCE: each window a separate prompt, the next-token distributions pooled by naive Bayes (min-entropy window)."""

    paper: ClassVar[str] = ("Su et al. NAACL 2024, Naive Bayes-based Context Extension for Large Language Models "
                            "(https://aclanthology.org/2024.naacl-long.431)")

    pooling: str = param("min_entropy", choices=("min_entropy", "mean"),
                         help="min_entropy (official: the most confident window) or mean (naive-Bayes average)")
    beta: float = param(0.25, ge=0.0, le=100.0, help="weight of the windows over the context-free prompt")
    eta: float = param(0.1, ge=0.0, le=100.0, help="entropy bonus of the window chosen at the previous step")
    top_p: float = param(0.95, gt=0.0, le=1.0, help="nucleus each distribution is truncated to before pooling "
                                                     "(min_entropy); 1: no truncation")

    def start(self, model: Any, prompt: WindowedPrompt, max_new_tokens: int, new_cache: Any) -> WindowState:
        device = next(model.parameters()).device
        spans = self.spans(prompt, max_new_tokens)
        prompts = [prompt.front + prompt.task] + [prompt.front + prompt.context[s:e] + prompt.task for s, e in spans]
        caches, rows = [], []
        for ids in prompts:
            cache = new_cache()
            out = model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)
            caches.append(out.cache if getattr(out, "cache", None) is not None else cache)
            rows.append(out.logits[0, -1])
        state = WindowState(None, caches, spans, processed=sum(map(len, prompts)))
        state.extra["chosen"] = []
        self._pool(state, torch.stack(rows))
        return state

    def step(self, model: Any, state: WindowState, token: int) -> None:
        device = state.scores.device
        rows = []
        for i, cache in enumerate(state.caches):
            out = model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
            state.caches[i] = out.cache if getattr(out, "cache", None) is not None else cache
            rows.append(out.logits[0, -1])
        state.processed += len(state.caches)
        self._pool(state, torch.stack(rows))

    def _pool(self, state: WindowState, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = state.extra["chosen"]
        state.scores, k = nbce_pool(logp, self.pooling, self.beta, self.eta, self.top_p, chosen[-1] if chosen else None)
        chosen.append(k)
