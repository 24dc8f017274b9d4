"""KIVI read quantised: single-query attention from the packed 2-/4-bit keys and values, one tile at a time.

A KIVI layer (dense layout: plain KIVI; ragged per-head rows under an eviction method) stores ``S_q`` quantised tokens (packed codes, per-channel key scales and
zeros per group of ``G`` tokens, per-token value scales and zeros per group of ``G`` channels) and an exact residual.
At a decode step the attention of the packed query heads of each kv head (``(B, H_kv, G_q, D)``, as in
:mod:`longkit.kvcache.decode`) is computed by the native kernel (:mod:`longkit.kvcache.kivi_native`: C loops over the
packed bytes, no code ever written out as a tensor; the default wherever it compiles) or, as a fallback, in PyTorch in
two passes over the storage, a tile of ``tile`` tokens at a time:

1. scores: each tile of keys is unpacked (one table lookup per byte) and dequantised (``codes * scale + zero``, the scale broadcast over its
   group, never repeated), multiplied by the queries; the residual's scores follow; one float32 softmax over all.
2. values: each tile of values is dequantised and weighted by its probabilities, summed into the output.

Only a tile is ever dequantised, so the bytes read per step are the packed cache's (about a quarter of the full
cache's at 2 bits plus the scales) instead of a dequantised copy of the whole cache written and read again; but each
tile is still written out as float32 codes and dequantised in several passes, which costs more than the bytes saved
(SmolLM2-135M bf16 at 8K: 1.75x the full cache's ms/token, against 0.8x with the native kernel). Scores
and softmax are float32; keys and values are used in float32 as dequantised (the reference rounds them to the
model's dtype first: equal in float32, within bfloat16's rounding otherwise). The reference is
:func:`longkit.kvcache.naive.kivi_decode_reference`.

Ragged rows (:class:`~longkit.kvcache.kivi.KIVIRaggedLayer`, read from the eviction hook,
:meth:`~longkit.kvcache.kivi.KIVIRaggedLayer.attend_deferred`): the native kernel reads each head's rows from their
offsets; the tiled path first pads each head's packed codes, scales and residual to the longest head's (bytes of
codes, not dequantised values) and masks the padding.

:class:`KIVIAttention` is the registered attention function ``longkit_kivi_<sdpa|eager>``: it runs
:func:`kivi_decode` for the layers whose ``update`` deferred to it (a decode step with quantised tokens) and the
model's own attention otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from longkit.errors import MethodError
from longkit.kvcache import kivi_native
from longkit.kvcache.decode import pack_mask, pack_query
from longkit.kvcache.hook import CACHE_KWARG, inner_attention
from longkit.kvcache.naive import bool_mask
from longkit.kvcache.quant import unpack
from longkit.kvcache.storage import gather_padded

if TYPE_CHECKING:
    from longkit.kvcache.kivi import KIVILayer

#: tokens dequantised at a time (rounded down to whole groups): a 1024-token tile of 3 heads x 64 channels is 768 KB
#: in float32, which stays in cache between its dequantisation and its product; larger tiles measured no faster
TILE = 1024


_LUTS: dict[int, torch.Tensor] = {}


def _codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 ``(..., M)`` -> float32 codes ``(..., M * 8 / bits)`` in one gather from a 256-row table (each
    byte's codes, little end first as :func:`longkit.kvcache.quant.pack` writes them): one pass instead of
    shift, mask, reshape and conversion (``unpack(...).float()``)."""
    lut = _LUTS.get(bits)
    if lut is None or lut.device != packed.device:
        lut = unpack(torch.arange(256, dtype=torch.uint8, device=packed.device)[:, None], bits).float()
        _LUTS[bits] = lut
    return torch.nn.functional.embedding(packed.int(), lut).flatten(-2)


def _tiles(n: int, tile: int, g: int) -> list[tuple[int, int]]:
    step = max(tile // g, 1) * g
    return [(a, min(a + step, n)) for a in range(0, n, step)]


#: what :func:`kivi_decode` may run: the native kernel (:mod:`longkit.kvcache.kivi_native`) or the tiled PyTorch path
KERNELS = ("native", "tiled")


def kivi_decode(
    layer: KIVILayer,
    q: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    tile: int = TILE,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention of one query token over a :class:`~longkit.kvcache.kivi.KIVILayer`, read quantised.

    q (B, H, 1, D); mask (B|1, H|1, 1, S) bool (True = visible) or additive, or None, over the layer's stored tokens
    (quantised first): dense (plain KIVI), ``S = S_q + S_r``; ragged per-head rows (KIVI under eviction), each head's
    rows padded to the longest head's (columns past a head's rows are ignored). Returns (B, H, 1, D) in q's dtype.
    ``kernel``: ``native`` (:func:`longkit.kvcache.kivi_native.kivi_decode_native`, the default where
    :func:`~longkit.kvcache.kivi_native.available`), ``tiled`` (PyTorch, ``tile`` tokens at a time), or None (native
    where available, else tiled).
    """
    if kernel is None:
        kernel = "native" if kivi_native.available(layer, q) is True else "tiled"
    if kernel == "native":
        return kivi_native.kivi_decode_native(layer, q, mask, scale)
    if kernel != "tiled":
        raise MethodError(f"kivi_decode: parameter 'kernel' must be one of {', '.join(KERNELS)} or None (got {kernel!r})")
    H = q.shape[1]
    if not layer.packed:
        h_kv = layer.keys.shape[1]
        stored = {n: getattr(layer, n) for n in (*_QUANTISED, "keys", "values")}
        return _tiled(q, stored, bool_mask(pack_mask(mask, H, h_kv)), layer.group_size, layer.bits, scale, tile)
    stored, m = _padded_rows(layer, bool_mask(pack_mask(mask, H, layer.q_lengths.shape[1])))
    return _tiled(q, stored, m, layer.group_size, layer.bits, scale, tile)


#: the stored tensors of a KIVI layer's quantised tokens
_QUANTISED = ("qkeys", "k_scale", "k_zero", "qvalues", "v_scale", "v_zero")


def _padded_rows(layer: KIVILayer, m: torch.Tensor | None) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """A ragged layer's packed codes, scales and residual padded per head to the longest head's (zeros), as the dense
    layout :func:`_tiled` reads, and the (B, H_kv, G|1, Sq + Sr) bool mask of its columns: each head's real ones, and
    of those what ``m`` (packed layout, over each head's rows) shows. Codes stay packed: nothing is dequantised here."""
    g = layer.group_size
    qlen, rlen = layer.q_lengths, layer.r_lengths
    sq, sr = int(qlen.max()), int(rlen.max())
    stored: dict[str, torch.Tensor | None] = dict.fromkeys(_QUANTISED)
    # (B, H_kv, sq) real quantised slots; each head's quantised rows are whole key groups, so sq is too
    qvalid = torch.arange(sq, device=qlen.device) < qlen[..., None]
    if layer.qkeys is not None:
        for name in _QUANTISED:
            counts, width = (qlen // g, sq // g) if name in ("k_scale", "k_zero") else (qlen, sq)
            stored[name] = gather_padded(getattr(layer, name), counts, width)[0]
    stored["keys"], rvalid = gather_padded(layer.keys, rlen, sr)
    stored["values"] = gather_padded(layer.values, rlen, sr)[0]
    # (B, H_kv, 1, sq + sr) real columns
    valid = torch.cat([qvalid, rvalid], dim=-1)[:, :, None]
    if m is None:
        return stored, valid
    # column j of the padded layout is the head's row j (quantised) or q_length + j - sq (residual)
    col = torch.arange(sq + sr, device=qlen.device)
    src = torch.where(col < sq, col, qlen[..., None] + col - sq).clamp(max=m.shape[-1] - 1)
    B, H_kv = qlen.shape
    m = m.expand(B, H_kv, m.shape[2], m.shape[-1])
    return stored, valid & m.gather(-1, src[:, :, None].expand(B, H_kv, m.shape[2], sq + sr))


def _tiled(
    q: torch.Tensor, stored: dict[str, torch.Tensor | None], m: torch.Tensor | None, g: int, bits: int,
    scale: float | None, tile: int,
) -> torch.Tensor:
    """The tiled PyTorch read over dense (B, H_kv, n, ...) storage ``stored`` (codes, scales and zeros None when
    nothing is quantised); ``m`` the bool mask in the packed layout (B|1, H_kv|1, G|1, S) or None."""
    B, H, _, D = q.shape
    keys, values = stored["keys"], stored["values"]
    h_kv = keys.shape[1]
    scale = D**-0.5 if scale is None else scale
    # (B, H_kv, G_q, D) float32, pre-scaled so the scores need no further pass
    qp = pack_query(q, h_kv).float() * scale
    qkeys, k_scale, k_zero = stored["qkeys"], stored["k_scale"], stored["k_zero"]
    qvalues, v_scale, v_zero = stored["qvalues"], stored["v_scale"], stored["v_zero"]
    n_q = 0 if qkeys is None else qkeys.shape[2]
    tiles = _tiles(n_q, tile, g)
    parts = []
    for a, b in tiles:
        # (B, H_kv, n/G, G, D): codes * the scale/zero of their (group, channel)
        codes = _codes(qkeys[:, :, a:b], bits).unflatten(2, (-1, g))
        k = codes.mul_(k_scale[:, :, a // g : b // g, None].float()).add_(k_zero[:, :, a // g : b // g, None].float())
        parts.append(torch.matmul(qp, k.flatten(2, 3).transpose(-1, -2)))
    parts.append(torch.matmul(qp, keys.float().transpose(-1, -2)))
    # (B, H_kv, G_q, S) float32
    s = torch.cat(parts, dim=-1)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p[..., n_q:], values.float())
    for a, b in tiles:
        # (B, H_kv, n, D/G, G): codes * the scale/zero of their (token, channel group)
        codes = _codes(qvalues[:, :, a:b], bits).unflatten(-1, (-1, g))
        v = codes.mul_(v_scale[:, :, a:b, :, None].float()).add_(v_zero[:, :, a:b, :, None].float())
        out.add_(torch.matmul(p[..., a:b], v.flatten(-2)))
    return out.to(q.dtype).reshape(B, H, 1, D)


#: longkit.kvcache.kivi's cache and layer classes, bound at the first call of :class:`KIVIAttention`
KIVICache: Any = None
KIVILayer: Any = None


class KIVIAttention:
    """The registered attention function ``longkit_kivi_<inner>``: quantised read for deferred decode steps."""

    def __init__(self, inner: str):
        self.inner = inner

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs: Any):
        # imported here (kivi imports this module), once: this runs at every layer of every decode step
        global KIVICache, KIVILayer
        if KIVICache is None:
            from longkit.kvcache.kivi import KIVICache, KIVILayer

        cache = kwargs.pop(CACHE_KWARG, None)
        if isinstance(cache, KIVICache):
            cache.hooked = False
            layer = cache.layers[module.layer_idx]
            if isinstance(layer, KIVILayer) and layer.deferred:
                out = kivi_decode(layer, query, attention_mask, scaling)
                layer.finish_step()
                return out.transpose(1, 2).contiguous(), None
        return inner_attention(self.inner)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
