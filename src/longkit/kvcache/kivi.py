"""KIVI: asymmetric 2-/4-bit KV-cache quantisation, keys per channel and values per token.

Every cache layer holds a packed integer part and a full-precision residual of the most recent tokens. Keys are
quantised **per channel** (each channel's ``G`` consecutive tokens share a scale and a zero), values **per token**
(each token's ``G`` consecutive channels share one), as the paper prescribes: key outliers sit in fixed channels,
value errors must stay local to a token. New tokens enter the residual; once it holds ``R + G`` tokens, its
oldest ``G`` are quantised together, so the latest ``R`` tokens are always exact and key groups are whole.
``update()`` returns the dequantised part followed by the residual (a reference path: it dequantises the whole
cache every step; no fused kernel). Prefill attends to the exact keys, like KIVI; quantisation affects the tokens
that come after.

Storage per layer, with ``S_q`` quantised tokens (a multiple of ``G``) and ``S_r`` residual tokens:
packed codes ``2 x B x H_kv x S_q x D x bits / 8`` bytes (uint8, four 2-bit or two 4-bit codes a byte),
key scales and zeros ``2 x B x H_kv x (S_q / G) x D``, value scales and zeros ``2 x B x H_kv x S_q x (D / G)``
elements of ``scale_dtype`` (float16 by default, as KIVI), residual ``2 x B x H_kv x S_r x D`` elements of the
model dtype. :meth:`KIVICache.nbytes` returns exactly that sum.

Composition with eviction (``kv=kivi:bits=2,evict=snapkv,ratio=0.25``): the eviction method (any registered
:class:`~longkit.kvcache.base.CompressionMethod`, run with its defaults and this ``ratio``) selects the tokens in
full precision at the end of prefill (one-shot: ``decode_every=0``, since evicting single quantised tokens while
decoding would break key groups), then the kept tokens are stored KIVI-quantised in a
:class:`KIVIRaggedLayer`, which keeps eviction's ragged per-head storage: packed rows in (sequence, head, slot)
order, every head's quantised rows a whole number of key groups, so a key group never spans two heads. Per head
the ``residual`` most recent kept tokens stay exact. An eviction that drops quantised tokens (between chunks of a
chunked prefill) re-quantises the kept rows from their dequantised values, so errors can compound there. Such an
eviction's mask is read in the layout of the attention call's view (see ``RaggedLayer.view``), also after an update
of ragged storage. ``crop`` (assisted decoding) removes the newest tokens while they are still exact residual rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from longkit.errors import MethodError
from longkit.kvcache.base import CompressionMethod, KVMethod
from longkit.kvcache.cache import CompressedCache
from longkit.kvcache.quant import SCALE_DTYPES, dequantize, pack, quantize, unpack
from longkit.kvcache.storage import RaggedLayer, gather_padded, keep_oldest_rows
from longkit.methods import Undo
from longkit.registry import param, params_of, register, registry

_PAPER = (
    "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al. 2024) https://arxiv.org/abs/2402.02750"
)

_STORED = ("qkeys", "k_scale", "k_zero", "qvalues", "v_scale", "v_zero")


def check_head_dim(head_dim: int, bits: int, group_size: int, method: str = "kivi") -> None:
    """Values are grouped along the head dimension and codes are packed along it: both must divide it."""
    if head_dim % group_size:
        raise MethodError(
            f"kv method '{method}': parameter 'group_size' must divide the head dimension {head_dim} "
            f"(values are quantised per token in groups of group_size channels; got {group_size})"
        )
    if (head_dim * bits) % 8:
        raise MethodError(f"kv method '{method}': head dimension {head_dim} cannot be packed into bytes at {bits} bits")


class KIVILayer(DynamicLayer):
    """One layer of a KIVI cache: packed keys/values + scales/zeros, and an exact residual in ``keys``/``values``."""

    # Cropping into the quantised part would need the exact tokens back; assisted decoding is not supported.
    is_croppable = False

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128, scale_dtype: str = "float16"):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.residual = residual
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        self._clear()

    def _clear(self) -> None:
        for name in _STORED:
            setattr(self, name, None)
        self.n_quantized = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim(key_states.shape[-1], self.bits, self.group_size)
        self.device = key_states.device
        self.dtype = key_states.dtype
        # (B, H_kv, 0, D): empty residual with the right shape
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # (B, H_kv, S_r + T, D)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.dequantized()
        self._flush()
        return keys, values

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as attention sees it: dequantised part then exact residual, (B, H_kv, S, D) each."""
        if self.n_quantized == 0:
            return self.keys, self.values
        g = self.group_size
        # keys: (B, H_kv, S_q, D) codes, one scale per (G tokens, channel)
        k = dequantize(unpack(self.qkeys, self.bits), self.k_scale, self.k_zero, g, axis=-2, dtype=self.dtype)
        # values: (B, H_kv, S_q, D) codes, one scale per (token, G channels)
        v = dequantize(unpack(self.qvalues, self.bits), self.v_scale, self.v_zero, g, axis=-1, dtype=self.dtype)
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def _flush(self) -> None:
        """Quantise the oldest whole groups of the residual while it holds more than ``residual + G - 1`` tokens."""
        g = self.group_size
        extra = self.keys.shape[-2] - self.residual
        n = (extra // g) * g if extra >= g else 0
        if n == 0:
            return
        sd = self.scale_dtype
        # (B, H_kv, n, D) -> codes packed along D; key scales (B, H_kv, n/G, D), value scales (B, H_kv, n, D/G)
        kc, ks, kz = quantize(self.keys[..., :n, :], self.bits, g, axis=-2, scale_dtype=sd)
        vc, vs, vz = quantize(self.values[..., :n, :], self.bits, g, axis=-1, scale_dtype=sd)
        new = {
            "qkeys": pack(kc, self.bits),
            "k_scale": ks,
            "k_zero": kz,
            "qvalues": pack(vc, self.bits),
            "v_scale": vs,
            "v_zero": vz,
        }
        for name, t in new.items():
            old = getattr(self, name)
            setattr(self, name, t if old is None else torch.cat([old, t], dim=-2))
        self.n_quantized += n
        # Clone so the quantised tokens' full-precision storage is actually freed.
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quantized + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Exact bytes held: packed codes + scales + zeros + residual."""
        if not self.is_initialized:
            return 0
        tensors = [getattr(self, n) for n in _STORED] + [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in (*_STORED, "keys", "values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if tokens_to_remove > 0 or n > self.keys.shape[-2]:
            raise MethodError(
                f"kv method 'kivi': can only crop the {self.keys.shape[-2]} full-precision residual tokens "
                f"(asked to remove {tokens_to_remove})"
            )
        self.keys = self.keys[..., :-n, :].clone()
        self.values = self.values[..., :-n, :].clone()

    def reset(self) -> None:
        super().reset()
        self._clear()


class KIVICache(Cache):
    """A transformers ``Cache`` with one :class:`KIVILayer` per decoder layer; ``nbytes()`` is exact."""

    def __init__(
        self, config: Any, bits: int = 2, group_size: int = 32, residual: int = 128, scale_dtype: str = "float16"
    ):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        check_head_dim(head_dim, bits, group_size)
        layers = [KIVILayer(bits, group_size, residual, scale_dtype) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def _head_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) flat head index (b * H_kv + h) of every packed row, from per-head row counts (B, H_kv)."""
    flat = lengths.flatten()
    return torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)


def _merge_by_head(old: torch.Tensor, old_heads: torch.Tensor, new: torch.Tensor, new_heads: torch.Tensor):
    """Rows of ``old`` then ``new`` regrouped by head, each head's old rows before its new ones."""
    order = torch.sort(torch.cat([old_heads, new_heads]), stable=True).indices
    return torch.cat([old, new])[order]


class KIVIRaggedLayer(RaggedLayer):
    """A :class:`~longkit.kvcache.storage.RaggedLayer` whose kept tokens are stored KIVI-quantised.

    Storage, all packed rows in (sequence, head, slot) order: quantised rows ``qkeys``/``qvalues`` ``(N_q, D*bits/8)``
    uint8 with key scales/zeros ``(N_q / G, D)`` and value scales/zeros ``(N_q, D / G)``; exact residual rows
    ``keys``/``values`` ``(N_r, D)``; per-head counts ``q_lengths``/``r_lengths`` ``(B, H_kv)`` int64; any tracked
    side arrays (``extras``) as ``(N_q + N_r,)`` rows. :meth:`padded` dequantises into the ragged view the eviction
    hook works on. Tokens enter the residual exact; a call's own new tokens are never quantised by that call, so an
    eviction at the end of prefill chooses among exact tokens, and whatever it keeps beyond the ``residual`` newest
    per head is then quantised in whole groups.
    """

    def __init__(
        self,
        track: tuple[str, ...] = (),
        bits: int = 2,
        group_size: int = 32,
        residual: int = 128,
        scale_dtype: str = "float16",
    ):
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        self._appending = 0
        super().__init__(track)

    def _reset_state(self) -> None:
        super()._reset_state()
        for name in _STORED:
            setattr(self, name, None)
        self.q_lengths: torch.Tensor | None = None
        self.r_lengths: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim(key_states.shape[-1], self.bits, self.group_size)
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.dtype = key_states.dtype
        self.keys = key_states.new_zeros((0, D))
        self.values = value_states.new_zeros((0, value_states.shape[-1]))
        self.q_lengths = torch.zeros((B, H), dtype=torch.long, device=key_states.device)
        self.r_lengths = torch.zeros((B, H), dtype=torch.long, device=key_states.device)
        self.extras = {n: t.reshape(-1) for n, t in self.extras.items()}

    # ---- storage -------------------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return True

    def stored_lengths(self) -> torch.Tensor:
        return self.q_lengths + self.r_lengths

    def max_length(self) -> int:
        if not self.is_initialized or self.q_lengths.numel() == 0:
            return 0
        return int(self.stored_lengths().max())

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) keys and values of every stored token, dequantised, in (sequence, head, slot) order."""
        if self.qkeys is None:
            return self.keys, self.values
        g = self.group_size
        # keys: one scale per (G rows of a head, channel); values: one per (row, G channels)
        k = dequantize(unpack(self.qkeys, self.bits), self.k_scale, self.k_zero, g, axis=0, dtype=self.dtype)
        v = dequantize(unpack(self.qvalues, self.bits), self.v_scale, self.v_zero, g, axis=-1, dtype=self.dtype)
        qh, rh = _head_ids(self.q_lengths), _head_ids(self.r_lengths)
        return _merge_by_head(k, qh, self.keys, rh), _merge_by_head(v, qh, self.values, rh)

    def padded(self):
        lengths = self.stored_lengths()
        s_max = self.max_length()
        keys, values = self._rows()
        pk, valid = gather_padded(keys, lengths, s_max)
        pv, _ = gather_padded(values, lengths, s_max)
        extras = {n: gather_padded(t, lengths, s_max)[0] for n, t in self.extras.items()}
        if lengths.numel() and bool((lengths == lengths.flatten()[0]).all()):
            valid = None
        return pk, pv, valid, extras

    def rows(self):
        keys, values = self._rows()
        return keys, values, dict(self.extras)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._appending = key_states.shape[-2]
        try:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        finally:
            self._appending = 0
        return keys, values

    def _store(self, keys, values, keep, extras) -> None:
        """Append (from :meth:`update`) or replace (eviction, batch moves) the stored rows, then quantise."""
        B, H, S, _ = keys.shape
        sel = keep if keep is not None else torch.ones((B, H, S), dtype=torch.bool, device=keys.device)
        self.extras = {n: t[sel] for n, t in extras.items()}
        t = self._appending
        if t:
            # Only the last t slots are new; the stored rows are unchanged. (B*H_kv*t, D) in (b, h, slot) order.
            new_k = keys[..., S - t :, :].reshape(-1, keys.shape[-1])
            new_v = values[..., S - t :, :].reshape(-1, values.shape[-1])
            fresh = torch.full_like(self.r_lengths, t)
            self.keys = _merge_by_head(self.keys, _head_ids(self.r_lengths), new_k, _head_ids(fresh))
            self.values = _merge_by_head(self.values, _head_ids(self.r_lengths), new_v, _head_ids(fresh))
            self.r_lengths = self.r_lengths + t
            self._flush(protect=max(self.residual, t))
            return
        # Replace: every kept token becomes an exact residual row, then whole groups beyond the residual are quantised.
        for name in _STORED:
            setattr(self, name, None)
        self.keys, self.values = keys[sel], values[sel]
        self.r_lengths = sel.sum(-1)
        self.q_lengths = torch.zeros_like(self.r_lengths)
        self._flush(protect=self.residual)

    def compact(self, keep: torch.Tensor, keys=None, values=None, extras: dict | None = None) -> None:
        """Keep the slots ``keep`` (B, H_kv, S_view) of the view the last ``update`` returned (optionally with moved
        keys/extras in that layout); quantised rows are re-quantised only if hit."""
        # After a ragged update the view is [old slots padded | new tokens], not the padded storage: read it as such.
        pk, pv, valid, pextras = self.view(keep.shape[-1])
        B, H, S = keep.shape
        slot = torch.arange(S, device=keep.device)
        real = slot < self.stored_lengths()[..., None] if valid is None else valid
        keep = keep & real
        if keys is None and bool(keep[real].all()):
            # Nothing evicted and nothing moved: keep the layout (and transformers' masks); quantise what is due.
            self._flush(protect=self.residual)
            return
        # (B, H_kv, S) each head's real slots are its rows in order: the first q_lengths of them are quantised
        rank = real.long().cumsum(-1) - 1
        quantised = real & (rank < self.q_lengths[..., None])
        self.track_tail(keep, real)
        if keys is None and bool((keep | ~quantised).all()):
            # Only exact residual rows go: drop them and keep every quantised row as it is (no re-quantisation).
            in_residual = real & ~quantised
            self.keys, self.values = self.keys[keep[in_residual]], self.values[keep[in_residual]]
            self.extras = {n: t[keep[real]] for n, t in self.extras.items()}
            self.r_lengths = (keep & in_residual).sum(-1)
            self._flush(protect=self.residual)
        else:
            self._store(pk if keys is None else keys, pv, keep, pextras if extras is None else extras)
        self.compacted = True

    def _map_batch(self, fn) -> None:
        """Move whole sequences (beam search): each sequence's rows are one block in every packed tensor, so the
        blocks are gathered as they are, never dequantised and re-quantised."""
        if not self.is_initialized or self.seen == 0:
            return
        # (B',) the source sequence of every sequence after the move
        src = fn(torch.arange(self.q_lengths.shape[0], device=self.q_lengths.device))

        def take(flat: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor | None:
            if flat is None:
                return None
            per = counts.sum(-1)
            starts = torch.cumsum(per, 0) - per
            n = per[src]
            # (N',) row index: the source block's start plus the row's offset inside its block
            offset = torch.arange(int(n.sum()), device=per.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            return flat[torch.repeat_interleave(starts[src], n) + offset]

        g = self.group_size
        for name in ("qkeys", "qvalues", "v_scale", "v_zero"):
            setattr(self, name, take(getattr(self, name), self.q_lengths))
        for name in ("k_scale", "k_zero"):
            setattr(self, name, take(getattr(self, name), self.q_lengths // g))
        self.keys, self.values = take(self.keys, self.r_lengths), take(self.values, self.r_lengths)
        self.extras = {name: take(t, self.stored_lengths()) for name, t in self.extras.items()}
        self.q_lengths, self.r_lengths = self.q_lengths[src], self.r_lengths[src]

    def check_crop(self, tokens_to_remove: int) -> int:
        n = super().check_crop(tokens_to_remove)
        exact = int(self.r_lengths.min()) if n else 0
        if n > exact:
            raise MethodError(
                f"crop: parameter 'tokens_to_remove' must be in [-{min(exact, self.tail)}, 0] for kivi: only the newest "
                f"{exact} tokens of every head are still exact (residual); older ones are quantised, and their exact "
                f"values, which a rollback would need, are gone; got {tokens_to_remove}"
            )
        return n

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens of every head: the last exact residual rows of each head.

        Rows that a flush quantised while those tokens were cached stay quantised (as :meth:`KIVILayer.crop`).
        """
        n = self.check_crop(tokens_to_remove)
        if n == 0:
            return
        rows = keep_oldest_rows(self.r_lengths, n)
        self.keys, self.values = self.keys[rows], self.values[rows]
        rows = keep_oldest_rows(self.stored_lengths(), n)
        self.extras = {name: t[rows] for name, t in self.extras.items()}
        self.r_lengths = self.r_lengths - n
        self.seen -= n
        self.tail -= n
        self.last_valid = None

    def _flush(self, protect: int) -> None:
        """Per head, quantise the oldest whole groups of residual rows beyond the newest ``protect``."""
        g = self.group_size
        n = torch.clamp((self.r_lengths - protect) // g * g, min=0)
        if not bool((n > 0).any()):
            return
        heads = _head_ids(self.r_lengths)
        starts = torch.cumsum(self.r_lengths.flatten(), 0) - self.r_lengths.flatten()
        # (N_r,) rows to quantise: the first n[head] rows of each head
        move = (torch.arange(heads.numel(), device=heads.device) - starts[heads]) < n.flatten()[heads]
        sd = self.scale_dtype
        # (N_new, D): groups of G consecutive rows along axis 0 never span heads (each head moves a multiple of G)
        kc, ks, kz = quantize(self.keys[move], self.bits, g, axis=0, scale_dtype=sd)
        vc, vs, vz = quantize(self.values[move], self.bits, g, axis=-1, scale_dtype=sd)
        new = {
            "qkeys": pack(kc, self.bits),
            "k_scale": ks,
            "k_zero": kz,
            "qvalues": pack(vc, self.bits),
            "v_scale": vs,
            "v_zero": vz,
        }
        row_old, row_new = _head_ids(self.q_lengths), _head_ids(n)
        grp_old, grp_new = _head_ids(self.q_lengths // g), _head_ids(n // g)
        for name, t in new.items():
            old = getattr(self, name)
            if old is None:
                setattr(self, name, t)
            elif name in ("k_scale", "k_zero"):
                setattr(self, name, _merge_by_head(old, grp_old, t, grp_new))
            else:
                setattr(self, name, _merge_by_head(old, row_old, t, row_new))
        self.keys, self.values = self.keys[~move], self.values[~move]
        self.q_lengths = self.q_lengths + n
        self.r_lengths = self.r_lengths - n

    def nbytes(self) -> int:
        """Exact bytes: packed codes + scales + zeros + exact residual + per-head counts + tracked side arrays."""
        if not self.is_initialized:
            return 0
        tensors = [getattr(self, n) for n in _STORED] + [self.keys, self.values, self.q_lengths, self.r_lengths]
        tensors += list(self.extras.values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KIVICompressedCache(CompressedCache):
    """An eviction method's :class:`~longkit.kvcache.cache.CompressedCache` with KIVI-quantised storage."""

    def __init__(
        self,
        config: Any,
        method: Any,
        rotary: Any = None,
        bits: int = 2,
        group_size: int = 32,
        residual: int = 128,
        scale_dtype: str = "float16",
    ):
        super().__init__(config, method, rotary=rotary)
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        check_head_dim(head_dim, bits, group_size)
        track = tuple(getattr(method, "track", ()))
        self.layers = [KIVIRaggedLayer(track, bits, group_size, residual, scale_dtype) for _ in range(self.num_layers)]


@register("kv", "kivi")
@dataclass
class KIVI(KVMethod):
    """KIVI: tuning-free asymmetric 2-/4-bit KV quantisation (keys per channel, values per token).

    Keys are quantised per channel and values per token in groups of ``group_size``, min/max asymmetric, stored as
    packed uint8; the most recent ``residual`` tokens stay in full precision and older ones are quantised in whole
    groups. Attention sees the dequantised cache (reference path, no fused kernel).

    Based on KIVI (Liu et al. 2024), https://arxiv.org/abs/2402.02750.

    Parameters:
        bits: code width, 2 or 4.
        group_size: tokens per key group and channels per value group, >= 1; must divide the head dimension.
        residual: full-precision recent tokens, >= 0 (the residual holds residual..residual+group_size-1 tokens).
        scale_dtype: storage of scales and zeros, ``float16`` (KIVI) or ``float32``.
        evict: a registered eviction method (snapkv, knorm, adakv, ...) run first, once after prefill, otherwise with
            its defaults; "" = none.
        ratio: the eviction's keep ratio, in (0, 1] (only with ``evict``).
    """

    paper: ClassVar[str] = _PAPER
    shown: ClassVar[tuple[str, ...]] = ("bits",)

    bits: int = param(2, choices=(2, 4), help="bits per quantised key/value element")
    group_size: int = param(32, ge=1, help="tokens per key group / channels per value group; divides head_dim")
    residual: int = param(128, ge=0, help="most recent tokens kept in full precision")
    scale_dtype: str = param("float16", choices=("float16", "float32"), help="dtype of scales and zeros")
    evict: str = param("", help="eviction method composed before quantisation (e.g. snapkv); '' = none")
    ratio: float = param(1.0, gt=0.0, le=1.0, help="keep ratio of the composed eviction method")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._evictor: CompressionMethod | None = None
        if self.evict:
            reg = registry("kv")
            names = [n for n in reg.names() if issubclass(reg.get(n), CompressionMethod)]
            if self.evict not in names:
                raise MethodError(
                    f"kv method 'kivi': parameter 'evict' must be one of {', '.join(names)} or '' (got {self.evict!r})"
                )
            # One-shot eviction (after prefill and between prefill chunks): evicting single tokens while decoding
            # would break key groups and re-quantise them at every step.
            args = {"ratio": self.ratio}
            if "decode_every" in {p.name for p in params_of(reg.get(self.evict))}:
                args["decode_every"] = 0
            self._evictor = reg.create(self.evict, args)
            if self._evictor.merges_values:
                raise MethodError(
                    f"kv method 'kivi': parameter 'evict': {self.evict!r} merges values, which quantised storage "
                    "cannot take; use it without quantisation"
                )
        elif self.ratio != 1.0:
            raise MethodError(
                f"kv method 'kivi': parameter 'ratio' needs an eviction method in 'evict' (got {self.ratio})"
            )

    def apply(self, model: Any) -> Undo:
        return self._evictor.apply(model) if self._evictor is not None else (lambda: None)

    def make_cache(self, model: Any) -> KIVICache | KIVICompressedCache:
        if self._evictor is None:
            return KIVICache(model.config, self.bits, self.group_size, self.residual, self.scale_dtype)
        inner = getattr(model, "model", model)
        return KIVICompressedCache(
            model.config,
            self._evictor,
            getattr(inner, "rotary_emb", None),
            self.bits,
            self.group_size,
            self.residual,
            self.scale_dtype,
        )
