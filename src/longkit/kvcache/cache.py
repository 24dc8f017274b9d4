"""The compressing KV cache: a transformers ``Cache`` of :class:`~longkit.kvcache.storage.RaggedLayer` layers.

``get_seq_length()`` counts the tokens seen, so new tokens keep their true positions after an eviction. The attention
hook (:mod:`longkit.kvcache.hook`) compresses it after each attention call; once any layer has evicted, the hook
builds the mask of the stored slots itself (per sequence and per head) and keeps transformers' mask only for the new
tokens.

Other ``generate`` modes: beam search and ``num_return_sequences`` move whole sequences (``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``): per-head storage, per-slot extras and ``real_seen`` move
together. ``crop(-n)`` (assisted decoding's rollback) is checked on every layer before any changes; evictions decided
while the removed tokens were cached, and the count of decoding steps, stay as they are.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache

from longkit.errors import MethodError
from longkit.kvcache.storage import RaggedLayer


class CompressedCache(Cache):
    """A transformers ``Cache`` of :class:`RaggedLayer` layers, compressed by a KV method through the attention hook.

    ``compressing`` switches compression off (e.g. after :func:`longkit.runtime.compress_context`, to ask questions against the
    compressed context without compressing them too). ``nbytes()`` is the exact bytes of every stored tensor.
    """

    def __init__(self, config: Any, method: Any, rotary: Any = None):
        from transformers.cache_utils import get_layer_types_and_kwargs

        text = config.get_text_config(decoder=True)
        kinds = sorted(set(get_layer_types_and_kwargs(text)[0]) - {"full_attention"})
        if kinds:
            # The hook's masks know stored slots and causality only, not sliding windows or linear attention.
            raise MethodError(
                f"kv method '{getattr(method, 'name', method)}' supports full-attention layers only; this model has "
                f"{', '.join(kinds)} layers"
            )
        self.num_layers = text.num_hidden_layers
        track = tuple(getattr(method, "track", ()))
        super().__init__(layers=[RaggedLayer(track) for _ in range(self.num_layers)])
        self.method = method
        self.rotary = rotary
        self.compressing = True
        self.decode_steps = 0
        # (B,) real tokens seen per sequence (left padding excluded); set on the first forward
        self.real_seen: torch.Tensor | None = None
        self.own_mask = False
        self.hooked = False

    def any_compacted(self) -> bool:
        return any(layer.compacted for layer in self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def stored_tokens(self) -> list[torch.Tensor]:
        """Per layer, (B, H_kv) tokens stored per head."""
        return [layer.stored_lengths() for layer in self.layers]

    def copy(self) -> CompressedCache:
        """An independent copy (compress a context once, then ask several questions, each against a copy)."""
        rotary, self.rotary = self.rotary, None
        try:
            out = copy.deepcopy(self)
        finally:
            self.rotary = rotary
        out.rotary = rotary
        return out

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            # The first layer's update starts a forward: decide once how its masks are built.
            self.own_mask = self.any_compacted()
        if self.own_mask and not self.hooked:
            raise MethodError(
                "this compressed KV cache must be used with its KV method applied "
                "(with longkit.apply(model, kv=...)): its stored lengths differ per head and need the method's mask"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.real_seen is not None:
            self.real_seen = self.real_seen.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.real_seen is not None:
            self.real_seen = self.real_seen[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.real_seen is not None:
            self.real_seen = self.real_seen.index_select(0, beam_idx.to(self.real_seen.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens of every sequence from every layer (see
        :meth:`RaggedLayer.crop`); checked on every layer first, so a refused crop changes nothing."""
        counts = {layer.check_crop(tokens_to_remove) for layer in self.layers if layer.is_initialized}
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        n = max(counts, default=0)
        if n and self.real_seen is not None:
            self.real_seen = self.real_seen - n

    def reset(self) -> None:
        super().reset()
        self.real_seen, self.decode_steps, self.own_mask = None, 0, False
