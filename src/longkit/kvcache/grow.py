"""Growing buffers: append along one axis without re-copying what is already stored.

A decode step appends one token to every cache layer. ``torch.cat`` copies the whole cache to do that, so a step at
8K spent about half its time in ``aten::cat`` (issue 24). :func:`grow_append` instead writes the new slice into the
spare capacity of a preallocated buffer and returns a view of its filled part; when the capacity runs out the buffer
is reallocated with room for ``max(CHUNK, n / 8)`` more slots, so the copies cost O(1) amortised per appended slot
and the spare capacity stays within 1/8 of the stored length (plus one chunk).

The stored tensor is always the *view* of the filled part; anything that replaces it with a tensor of its own (an
eviction's compaction, a beam reorder) simply stops being a prefix of the buffer, and the next append starts a new
buffer. Byte counts (``nbytes``) count the view, the bytes the stored tokens occupy, not the spare capacity
(:func:`capacity_nbytes` reports that).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: the fewest slots a (re)allocation adds beyond what is stored
CHUNK = 256


def is_prefix(buf: torch.Tensor | None, cur: torch.Tensor, dim: int) -> bool:
    """Whether ``cur`` is ``buf.narrow(dim, 0, cur.shape[dim])`` (same memory, same strides, same other sizes)."""
    if buf is None or cur.numel() == 0 or cur.dim() != buf.dim():
        return False
    same_rest = all(c == b for i, (c, b) in enumerate(zip(cur.shape, buf.shape, strict=True)) if i != dim)
    return (
        same_rest
        and cur.shape[dim] <= buf.shape[dim]
        and cur.dtype == buf.dtype
        and cur.device == buf.device
        and cur.data_ptr() == buf.data_ptr()
        and cur.stride() == buf.stride()
    )


def grow_append(
    buf: torch.Tensor | None, cur: torch.Tensor, new: torch.Tensor, dim: int, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cat([cur, new], dim)`` as ``(buffer, view)``: written into ``buf``'s spare capacity when ``cur`` is
    its prefix and the new slots fit, else into a new buffer with spare room. The slots of ``buf`` past ``cur``
    are overwritten (they hold nothing: dropped or never filled)."""
    dim = dim % cur.dim()
    n, t = cur.shape[dim], new.shape[dim]
    if t and is_prefix(buf, cur, dim) and n + t <= buf.shape[dim]:
        buf.narrow(dim, n, t).copy_(new)
        return buf, buf.narrow(dim, 0, n + t)
    shape = list(cur.shape)
    shape[dim] = n + t + max(chunk, (n + t) // 8)
    dtype = torch.result_type(cur, new) if cur.numel() else new.dtype
    # zeros, not empty: the spare slots are then a function of what was stored (copies and comparisons of a cache's
    # tensors see no stale memory), for one memset per reallocation
    buf = torch.zeros(shape, dtype=dtype, device=new.device)
    buf.narrow(dim, 0, n).copy_(cur)
    buf.narrow(dim, n, t).copy_(new)
    return buf, buf.narrow(dim, 0, n + t)


def capacity_nbytes(buffers: dict[str, torch.Tensor]) -> int:
    """Bytes allocated by ``buffers`` (stored and spare slots)."""
    return sum(b.numel() * b.element_size() for b in buffers.values())



class GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` whose ``update`` appends into a growing buffer (:func:`grow_append`) instead of
    re-concatenating the cache: the same keys and values, as views of the buffer's filled part. Everything else
    (crop, beam moves, offloading) is DynamicLayer's own; a move that replaces the tensors makes the next append
    start a new buffer."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # DynamicLayer starts from 1-D empty tensors
        keys = self.keys if self.keys.numel() else key_states[..., :0, :]
        values = self.values if self.values.numel() else value_states[..., :0, :]
        self._kbuf, self.keys = grow_append(self._kbuf, keys, key_states, -2)
        self._vbuf, self.values = grow_append(self._vbuf, values, value_states, -2)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None


def growing_cache(config: Any) -> DynamicCache:
    """A transformers ``DynamicCache`` for ``config`` whose full-attention layers grow in place
    (:class:`GrowingLayer`); sliding-window layers stay transformers' own, bounded by their window. The seam's
    default cache (:meth:`longkit.seam.Applied.new_cache`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
