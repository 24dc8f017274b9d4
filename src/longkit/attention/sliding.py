"""Sliding-window attention in O(T·W): chunked SDPA over each query chunk's key band, and the ``sliding_window``
method that runs a hybrid model's sliding layers through it.

transformers computes a sliding-window layer (Gemma 3, Mistral, Qwen2) with SDPA under a dense (T, S) mask, so
on CPU a sliding layer costs as much as full attention: the kernel scores every key and masks most of them away.
Here queries go in chunks of ``chunk`` rows; a chunk [q0, q1) at positions p0 .. p1 - 1 can only see keys
p0 - W + 1 .. p1 - 1, so one SDPA call per chunk on that (C, C + W - 1) band does all the work, and the cost is
O(T·(C + W)) instead of O(T·S). The band's mask is the model's own mask sliced to the band (so padding and packed
documents stay exact) or, where there is nothing but the window to mask, the causal window built for the band: the
method's mask function (:func:`band_sdpa_mask`) then gives transformers' dense (T, S) sliding-window mask up (16 GiB
of booleans for a 128K prefill), so a long prefill holds no T x T tensor at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.attention.base import AttentionMethod, check_args, check_qkv, layer_window, sliding_layer_attention
from longkit.errors import MethodError
from longkit.registry import param, register


def _band_mask(q0: int, q1: int, k0: int, k1: int, offset: int, window: int, device) -> torch.Tensor:
    """(q1 - q0, k1 - k0) bool, True where query i (position offset + i) sees key j: p - W < j <= p."""
    p = torch.arange(q0, q1, device=device)[:, None] + offset
    j = torch.arange(k0, k1, device=device)[None, :]
    return (j <= p) & (j > p - window)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Causal sliding-window attention, (B, H, T, D_v), in chunks of queries over their key bands.

    The T queries are the last T of the S keys (query i at position S - T + i, the layout of a prefill, a chunked
    prefill after a sliding cache, or a decoding step); query i sees keys j with p - window < j <= p. ``mask``,
    when given, is the layer's own boolean (or additive) mask, broadcastable to (B, H, T, S), holding the window
    and any padding: it must not show a key outside the band (transformers' sliding masks never do, since they
    are the causal window and-ed with padding or documents); each chunk uses its slice of it.

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, S, D). v: (B, H_kv, S, D_v); H a multiple of H_kv; T <= S.
        window: int >= 1, the window counting the query itself (transformers' ``sliding_window``).
        mask: None, or (B|1, H|1, T, S) bool (True = visible) or float (0 / -inf).
        scale: score scale, default ``D ** -0.5``.
        chunk: int >= 1, queries per SDPA call.
    """
    check_args(SlidingWindow, "sliding_window_attention", chunk=chunk)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MethodError(f"sliding_window_attention: parameter 'window' must be an int >= 1 (got {window!r})")
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    if T > S:
        raise MethodError(f"sliding_window_attention: the T = {T} queries must be the last of the S = {S} keys")
    if mask is not None and (mask.ndim != 4 or mask.shape[-2:] != (T, S)):
        raise MethodError(f"sliding_window_attention: 'mask' must be (B|1, H|1, T, S) = (.., .., {T}, {S}); got "
                          f"{tuple(mask.shape)}")
    offset = S - T
    gqa = H != H_kv
    outs = []
    # every full chunk whose band starts inside the keys has the same band relative to its first key: built once
    steady = None
    for q0 in range(0, T, chunk):
        q1 = min(q0 + chunk, T)
        # keys of the chunk's band: from the first query's window start to the last query
        k0, k1 = max(0, q0 + offset - window + 1), q1 + offset
        if mask is None:
            if q0 + offset - window + 1 >= 0 and q1 - q0 == chunk:
                if steady is None:
                    steady = _band_mask(q0, q1, k0, k1, offset, window, q.device)
                band = steady
            else:
                band = _band_mask(q0, q1, k0, k1, offset, window, q.device)
        else:
            band = mask[:, :, q0:q1, k0:k1]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=band, scale=scale, enable_gqa=gqa
        ))
    # (chunks concatenated rather than written into one buffer, so gradients flow through plainly)
    return torch.cat(outs, dim=2)


def band_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' sdpa mask function, except for a sliding-window layer's call with more queries than its window
    and nothing but the window to mask (no padding; packed documents and custom patterns clear transformers'
    ``allow_is_causal_skip``): None there, since :meth:`SlidingWindow.forward` builds the window of every band
    itself (and of the whole call on its fallback path), so the dense (T, S) booleans are never made."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    window, q_length = kwargs.get("local_size"), kwargs.get("q_length")
    if not args and window is not None and q_length is not None and kwargs.get("allow_is_causal_skip", True) \
            and q_length > window:
        padding = prepare_padding_mask(kwargs.get("attention_mask"), kwargs["kv_length"], kwargs.get("kv_offset", 0))
        if padding is None or bool(padding.all()):
            return None
    return sdpa_mask(*args, **kwargs)


@register("attention", "sliding_window")
@dataclass
class SlidingWindow(AttentionMethod):
    """Fast prefill for hybrid models: sliding-window layers in O(T·W) by chunked SDPA over each query chunk's key
    band, full-attention layers with plain SDPA.

    transformers runs a sliding layer (Gemma 3's five of every six) as SDPA under a dense T×T mask, which on CPU
    costs full attention; this computes the same attention from the band alone (equal to float rounding). A
    sliding layer called with a mask whose key length is not the call's (a static cache) or with fewer queries
    than ``chunk`` or the window (decoding, short prompts) keeps the model's own attention, as do full-attention
    layers. Exact: no parameter changes what is computed. A KV method may wrap it (``attention=sliding_window+kv=...``):
    the full-attention layers, which the KV method compresses, are plain SDPA here (``full_layers_sdpa``).
    """

    paper = "Sliding-window attention: Beltagy et al. 2020, Longformer (https://arxiv.org/abs/2004.05150)"
    own_sliding_layers = True
    full_layers_sdpa = True
    chunk: int = param(1024, help="queries per SDPA call on a sliding-window layer", ge=1)

    def forward(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        window = layer_window(module, kwargs)
        T, S = query.shape[2], key.shape[2]
        # T > window: every transformers cache (dynamic, sliding, static) then returns the keys of contiguous
        # positions ending at the last query, the layout the band needs; a static sliding cache that is not yet
        # full returns its whole buffer with the new keys in the middle, which only happens for T <= window.
        # T > chunk: one chunk would be the masked call itself.
        fast = (
            window is not None
            and T > max(window, self.chunk)
            and T <= S
            and not dropout
            and kwargs.get("softcap") is None
            and (attention_mask is None or attention_mask.shape[-1] == S)
        )
        if not fast:
            if attention_mask is None and window is not None and T > window:
                # band_sdpa_mask gave the window mask up (no padding): the window of the call's keys, which are the
                # contiguous positions ending at the last query (T > window), as transformers would have built it
                attention_mask = _band_mask(0, T, 0, S, S - T, window, query.device)[None, None]
            # full-attention layers, decoding steps, short prompts: exactly transformers' SDPA function
            return sliding_layer_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs), None
        out = sliding_window_attention(query, key, value, window, mask=attention_mask, scale=scaling, chunk=self.chunk)
        return out.transpose(1, 2).contiguous(), None

    def mask_function(self):
        return band_sdpa_mask
