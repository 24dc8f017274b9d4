"""Parallel Context Windows (PCW, Ratner et al. ACL 2023, https://arxiv.org/abs/2212.10947).

The context is cut into windows that each fit the trained length. Every window is read as if it came right after
the prompt's front (BOS, chat head, instruction): its tokens take the positions ``F, F+1, ...`` (``F`` front
tokens), the same positions in every window, and attend to the front and to their own window only. The task tokens
(question, chat tail, answer prefix) then take the positions after the LONGEST window, ``F + max_window, ...``,
and attend to the front, to every window and to themselves (causally); generation continues with the same rule.

This follows the official implementation (AI21Labs/Parallel-Context-Windows, ``pcw_wrapper.py``): each window is
encoded alone starting at position 0 with its own BOS and all BOS but the longest window's are dropped from the
joint cache (``combine_past_key_values``), which is the same as one shared front that every window attends to; the
task tokens' positions start at the longest window's length (``generate_pcw_position_ids``, left indentation, the
paper's default) and their attention mask covers every cached token. Here the shared front is the whole prompt
before the context, encoded once.

Fast path, through transformers' own inputs (no patched modules): the front is prefilled into a DynamicCache;
each window is run against it with explicit ``position_ids``, its keys and values set aside and the cache cropped
back to the front (so the next window does not see it); the cache then gets the windows appended in order, and the
task tokens run against it with ``position_ids`` after the longest window. A cache of ``S`` tokens and ``T`` new
tokens get the ordinary causal mask (every cached token visible, the new ones causal), which is exactly PCW's rule
for the task tokens, so no custom mask is materialised. ``tests/memory/test_memory_pcw.py`` checks the fast path
against one full forward with PCW's explicit 4D mask and position ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkit.errors import MethodError
from longkit.memory.windows import ParallelWindows, WindowedPrompt, WindowState
from longkit.registry import register


@register("memory", "pcw")
@dataclass
class PCW(ParallelWindows):
    """Parallel Context Windows: windows share position ids and see only themselves; the question sees them all."""

    paper: ClassVar[str] = ("Ratner et al. 2023, Parallel Context Windows for Large Language Models "
                            "(https://arxiv.org/abs/2212.10947)")
    # The windows live in PCW's own cache (a plain DynamicCache laid out window by window): a KV method's cache
    # would not be used, so a combination with one is refused.
    keeps_cache: ClassVar[bool] = True

    def apply(self, model: Any) -> Any:
        impl = getattr(model.config, "_attn_implementation", "")
        if isinstance(impl, str) and impl.startswith("longkit_"):
            # longkit's attention functions (position remaps, sparse patterns) read distances from the sequence
            # order; PCW's shared positions are not in sequence order, so they would silently compute the wrong thing.
            raise MethodError(f"memory method '{self.name}' gives windows shared position ids; it cannot be combined "
                              f"with the attention method already applied ({impl})")
        return super().apply(model)

    def make_cache(self, model: Any) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def start(self, model: Any, prompt: WindowedPrompt, max_new_tokens: int, new_cache: Any) -> WindowState:
        device = next(model.parameters()).device
        spans = self.spans(prompt, max_new_tokens)
        cache = new_cache()
        F = len(prompt.front)
        if F:
            model(input_ids=_ids(prompt.front, device), cache=cache, use_cache=True, logits_to_keep=1)
        # Each window against the front alone: positions F.., its keys/values kept aside, the cache cropped back.
        parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for s, e in spans:
            model(input_ids=_ids(prompt.context[s:e], device), position_ids=_pos(F, e - s, device), cache=cache,
                  use_cache=True, logits_to_keep=1)
            parts.append([(layer.keys[..., F:, :], layer.values[..., F:, :]) for layer in cache.layers])
            cache.crop(-(e - s))
        for i in range(len(cache.layers)):
            # One update per layer (in window order): the joint cache is [front, window 1, ..., window N].
            cache.update(torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2), i)
        del parts
        # The task tokens: positions after the longest window, the plain causal mask over the joint cache.
        longest = max(e - s for s, e in spans)
        T = len(prompt.task)
        out = model(input_ids=_ids(prompt.task, device), position_ids=_pos(F + longest, T, device), cache=cache,
                    use_cache=True, logits_to_keep=1)
        state = WindowState(out.logits[0, -1], [cache], spans, processed=len(prompt.ids))
        state.extra["next_position"] = F + longest + T
        return state

    def step(self, model: Any, state: WindowState, token: int) -> None:
        (cache,) = state.caches
        device = state.scores.device
        pos = state.extra["next_position"]
        out = model(input_ids=_ids([token], device), position_ids=_pos(pos, 1, device), cache=cache, use_cache=True,
                    logits_to_keep=1)
        state.extra["next_position"] = pos + 1
        state.scores = out.logits[0, -1]
        state.processed += 1


def _ids(ids: list[int], device: Any) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


def _pos(start: int, n: int, device: Any) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]
