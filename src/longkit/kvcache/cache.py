"""The compressing KV cache: a transformers ``Cache`` of :class:`~longkit.kvcache.storage.RaggedLayer` layers.

``get_seq_length()`` counts the tokens seen, so new tokens keep their true positions after an eviction. The attention
hook (:mod:`longkit.kvcache.hook`) compresses it after each attention call; once any layer has evicted, the hook
builds the mask of the stored slots itself (per sequence and per head) and keeps transformers' mask only for the new
tokens.

Other ``generate`` modes: beam search and ``num_return_sequences`` move whole sequences (``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``): per-head storage, per-slot extras and ``real_seen`` move
together. ``crop(-n)`` (assisted decoding's rollback) is checked on every layer before any changes; evictions decided
while the removed tokens were cached, and the count of decoding steps, stay as they are.

Models whose layers differ (Gemma 3: sliding-window and full-attention layers): a sliding layer is transformers' own
``DynamicSlidingWindowLayer``, already bounded by its window, which the KV method leaves alone; only the
full-attention layers are :class:`RaggedLayer` layers that the method compresses. ``nbytes()`` counts both.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

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
        types, per_layer = get_layer_types_and_kwargs(text)
        kinds = sorted(set(types) - {"full_attention", "sliding_attention"})
        if kinds:
            # The hook's masks know stored slots and causality; other layer kinds (chunked, linear attention) keep
            # state this cache cannot hold.
            raise MethodError(
                f"kv method '{getattr(method, 'name', method)}' supports full-attention and sliding-window layers "
                f"only; this model has {', '.join(kinds)} layers"
            )
        self.num_layers = text.num_hidden_layers
        #: the ``config.layer_types`` entry of every layer ("full_attention" or "sliding_attention")
        self.layer_types = tuple(types)
        #: the first layer the method compresses: it counts the tokens seen and the decoding steps
        self.first_full = types.index("full_attention") if "full_attention" in types else None
        if self.first_full is None:
            raise MethodError(
                f"kv method '{getattr(method, 'name', method)}': every layer of this model is a sliding-window layer, "
                "already bounded by its window; there is no full-attention layer to compress"
            )
        track = tuple(getattr(method, "track", ()))
        super().__init__(
            layers=[
                self.full_layer(track) if kind == "full_attention" else DynamicSlidingWindowLayer(**kw)
                for kind, kw in zip(types, per_layer, strict=True)
            ]
        )
        self.method = method
        self.rotary = rotary
        self.compressing = True
        self.decode_steps = 0
        # (B,) real tokens seen per sequence (left padding excluded); set on the first forward
        self.real_seen: torch.Tensor | None = None
        self.own_mask = False
        self.hooked = False

    def full_layer(self, track: tuple[str, ...]) -> RaggedLayer:
        """The storage of one full-attention layer (KIVI's cache quantises it)."""
        return RaggedLayer(track)

    def compressed(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` is a full-attention layer the method compresses (not a sliding window)."""
        return isinstance(self.layers[layer_idx], RaggedLayer)

    def any_compacted(self) -> bool:
        return any(getattr(layer, "compacted", False) for layer in self.layers)

    def nbytes(self) -> int:
        return sum(layer_nbytes(layer) for layer in self.layers)

    def stored_tokens(self) -> list[torch.Tensor]:
        """Per layer, (B, H_kv) tokens stored per head (a sliding layer: the tokens of its window it holds)."""
        return [
            layer.stored_lengths() if isinstance(layer, RaggedLayer) else _window_lengths(layer) for layer in self.layers
        ]

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
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, RaggedLayer) and layer.get_seq_length() >= layer.sliding_window:
                raise MethodError(
                    f"this compressed KV cache cannot be cropped: its sliding-window layer {i} has dropped the tokens "
                    f"before its window of {layer.sliding_window}, so earlier states cannot be restored"
                )
        counts = {
            layer.check_crop(tokens_to_remove)
            for layer in self.layers
            if isinstance(layer, RaggedLayer) and layer.is_initialized
        }
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        n = max(counts, default=0)
        if n and self.real_seen is not None:
            self.real_seen = self.real_seen - n

    def reset(self) -> None:
        super().reset()
        self.real_seen, self.decode_steps, self.own_mask = None, 0, False


def layer_nbytes(layer: Any) -> int:
    """Exact bytes of one layer: a RaggedLayer counts its own storage, a sliding layer its key and value tensors."""
    if isinstance(layer, RaggedLayer):
        return layer.nbytes()
    if not layer.is_initialized:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def _window_lengths(layer: DynamicSlidingWindowLayer) -> torch.Tensor:
    """(B, H_kv) tokens a sliding layer holds (the same for every head)."""
    if not layer.is_initialized:
        return torch.zeros(0, 0, dtype=torch.long)
    B, H_kv, n = layer.keys.shape[:3]
    return torch.full((B, H_kv), n, dtype=torch.long, device=layer.keys.device)
