"""KIVI: asymmetric 2-/4-bit KV-cache quantisation, keys per channel and values per token.

Every cache layer holds a packed integer part and a full-precision residual of the most recent tokens. Keys are
quantised **per channel** (each channel's ``G`` consecutive tokens share a scale and a zero), values **per token**
(each token's ``G`` consecutive channels share one), as the paper prescribes: key outliers sit in fixed channels,
value errors must stay local to a token. New tokens enter the residual; once it holds ``R + G`` tokens, its
oldest ``G`` are quantised together, so the latest ``R`` tokens are always exact and key groups are whole.
Prefill attends to the exact keys, like KIVI; quantisation affects the tokens that come after.

Decoding reads the cache quantised. Plain KIVI installs an attention hook (sdpa and eager models): at a decode step
``update()`` only appends the new token to the residual and hands the attention function the layer, which computes
single-query attention from the packed codes (:func:`longkit.kvcache.kivi_attention.kivi_decode`: a native kernel
that unpacks the codes in registers, :mod:`longkit.kvcache.kivi_native`, or a tiled PyTorch fallback), never
dequantising the whole cache; quantising the residual's
oldest group waits until after that attention call, so every step sees what the reference sees. Without the hook
(prefill, other attention implementations) ``update()`` returns the dequantised cache followed by the residual, the
reference path (:func:`longkit.kvcache.naive.kivi_decode_reference` attends over exactly that).
The stored tensors of plain KIVI are views of growing buffers (:mod:`longkit.kvcache.grow`): appending a token or a
quantised group copies nothing already stored.

Storage per layer, with ``S_q`` quantised tokens (a multiple of ``G``) and ``S_r`` residual tokens:
packed codes ``2 x B x H_kv x S_q x D x bits / 8`` bytes (uint8, four 2-bit or two 4-bit codes a byte),
key scales and zeros ``2 x B x H_kv x (S_q / G) x D``, value scales and zeros ``2 x B x H_kv x S_q x (D / G)``
elements of ``scale_dtype`` (float16 by default, as KIVI), residual ``2 x B x H_kv x S_r x D`` elements of the
model dtype. :meth:`KIVICache.nbytes` returns exactly that sum.

Composition with eviction (``kv=kivi:bits=2,evict=snapkv,ratio=0.25``): the eviction method (any registered
:class:`~longkit.kvcache.base.CompressionMethod` that does not merge values, run with its defaults and this
``ratio``) selects the tokens in full precision at the end of prefill (one-shot: ``decode_every=0``, since evicting
single quantised tokens while decoding would break key groups); the kept tokens are then stored KIVI-quantised with
eviction's ragged per-head storage (:class:`KIVILayer`, packed). Per head the ``residual`` most recent kept tokens
stay exact. Decode steps the eviction leaves alone (all of them, eviction being one-shot; not the methods that score
every step, H2O and Scissorhands) are read quantised too: the step's token joins each head's residual rows and the
eviction hook's attention reads every head's packed rows where they are stored (the native kernel takes per-head
offsets, :func:`longkit.kvcache.kivi_native.kivi_decode_native`; the tiled path pads the packed codes per head), never
dequantising the cache; :attr:`KIVICompressedCache.read_quantised` ``= False`` keeps the reference path, the padded
view of the whole cache dequantised at every step. An eviction that drops quantised tokens (between chunks of a chunked prefill) re-quantises the kept rows
from their dequantised values, so errors can compound there. ``crop`` (assisted decoding) removes the newest tokens
while they are still exact residual rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache

from longkit.errors import MethodError
from longkit.kvcache.base import CompressionMethod, KVMethod
from longkit.kvcache.cache import CompressedCache, layer_nbytes
from longkit.kvcache.hook import CACHE_KWARG
from longkit.kvcache.quant import SCALE_DTYPES, dequantize, pack, quantize, unpack
from longkit.kvcache.storage import RaggedLayer, first_rows, head_ids
from longkit.methods import Undo
from longkit.models.introspect import head_dim_of
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


def _merge_by_head(old: torch.Tensor, old_heads: torch.Tensor, new: torch.Tensor, new_heads: torch.Tensor):
    """Rows of ``old`` then ``new`` regrouped by head, each head's old rows before its new ones."""
    order = torch.sort(torch.cat([old_heads, new_heads]), stable=True).indices
    return torch.cat([old, new])[order]


class KIVILayer(RaggedLayer):
    """A :class:`~longkit.kvcache.storage.RaggedLayer` whose tokens are stored KIVI-quantised.

    Per head: quantised rows (the oldest, a whole number of key groups) then exact residual rows. Storage:
    ``qkeys``/``qvalues`` (``D * bits / 8`` uint8 per row) with key scales/zeros (one ``D`` row per ``G`` rows of a
    head) and value scales/zeros (``D / G`` per row); the residual ``keys``/``values``; tracked side arrays
    ``extras`` (one per row). Plain KIVI never evicts, so every head holds the same rows and the layer keeps them
    dense, ``(B, H_kv, n, ...)``. Under an eviction method (:class:`KIVIRaggedLayer`) heads differ: packed rows in
    (sequence, head, slot) order with per-head counts ``q_lengths``/``r_lengths`` (B, H_kv) int64, so a key group
    never spans two heads. Both layouts list the same rows in the same order: every operation works on rows
    (:meth:`_as_rows`). :meth:`padded` dequantises into the view attention and eviction work on.

    Tokens enter the residual exact; whole groups beyond the newest ``residual`` rows of a head are quantised. Under
    an eviction method a call's own new tokens are not quantised by that call, so the eviction that follows it
    chooses among exact tokens.
    """

    #: whether an eviction method compacts this layer after each attention call (see :class:`KIVIRaggedLayer`)
    evicts: ClassVar[bool] = False

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 32,
        residual: int = 128,
        scale_dtype: str = "float16",
        track: tuple[str, ...] = (),
    ):
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        super().__init__(track)

    def _reset_state(self) -> None:
        super()._reset_state()
        for name in _STORED:
            setattr(self, name, None)
        # (B, H_kv) int64 quantised / exact rows per head when packed; None when dense
        self.q_lengths: torch.Tensor | None = None
        self.r_lengths: torch.Tensor | None = None
        #: a decode step whose attention reads the quantised storage (kivi_attention) is under way: the residual's
        #: due groups are quantised after it (:meth:`finish_step`)
        self.deferred = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_head_dim(key_states.shape[-1], self.bits, self.group_size)
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        if self.evicts:
            self.q_lengths = torch.zeros(key_states.shape[:2], dtype=torch.long, device=key_states.device)
            self.r_lengths = torch.zeros_like(self.q_lengths)
            self.keys, self.values = self.keys.flatten(0, 2), self.values.flatten(0, 2)
            self.extras = {n: t.flatten() for n, t in self.extras.items()}

    # ---- layout --------------------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return self.q_lengths is not None

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H_kv) quantised and exact rows per head."""
        if self.q_lengths is not None:
            return self.q_lengths, self.r_lengths
        B, H, r = self.keys.shape[:3]
        q = 0 if self.qkeys is None else self.qkeys.shape[2]
        return tuple(torch.full((B, H), n, dtype=torch.long, device=self.keys.device) for n in (q, r))  # type: ignore

    @contextmanager
    def _as_rows(self):
        """Dense storage viewed as packed rows (the same rows, in the same order) for an operation, then dense again."""
        if self.q_lengths is not None:
            yield
            return
        H = self.keys.shape[1]
        self.q_lengths, self.r_lengths = self._counts()
        for name in (*_STORED, "keys", "values"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).flatten(0, 2))
        self.extras = {n: t.flatten() for n, t in self.extras.items()}
        try:
            yield
        finally:
            B = self.q_lengths.shape[0]
            for name in (*_STORED, "keys", "values"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.reshape(B, H, -1, *t.shape[1:]))
            self.extras = {n: t.reshape(B, H, -1) for n, t in self.extras.items()}
            self.q_lengths = self.r_lengths = None
            self.prune_buffers()

    def _buffered(self) -> dict[str, torch.Tensor]:
        stored = {n: getattr(self, n) for n in _STORED if getattr(self, n) is not None}
        return {**super()._buffered(), **stored}

    # ---- decoding (plain KIVI, dense layout) ---------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``T`` tokens to the residual. Returns the dequantised cache followed by the residual, except at a
        decode step under KIVI's attention hook with quantised tokens stored: then only the residual (the attention
        function reads the quantised part itself, :mod:`longkit.kvcache.kivi_attention`)."""
        if self.evicts or self.packed or self.track:
            # eviction's ragged rows: the per-row reference path
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.deferred:
            raise MethodError(
                "kv method 'kivi': the previous decode step's attention did not read this cache layer (the model's "
                "attention module must pass its keyword arguments on to its attention function)"
            )
        T = key_states.shape[-2]
        self.keys = self._grow("keys", self.keys, key_states, -2)
        self.values = self._grow("values", self.values, value_states, -2)
        self.seen += T
        self.tail += T
        self.last_valid = None
        hooked = (kwargs.get("kwargs") or {}).get(CACHE_KWARG) is not None
        if hooked and T == 1 and self.qkeys is not None:
            self.deferred = True
            return self.keys, self.values
        keys, values, _, _ = self.padded()
        if keys is self.keys and self.keys.shape[-2] - self.residual >= self.group_size:
            # the flush below moves the residual inside its buffer, which the returned view would see
            keys, values = keys.clone(), values.clone()
        self._flush_dense()
        return keys, values

    def finish_step(self) -> None:
        """After the attention of a deferred decode step: quantise the residual's due groups."""
        self.deferred = False
        self._flush_dense()

    def _quantized(self, keys: torch.Tensor, values: torch.Tensor, key_axis: int) -> dict[str, torch.Tensor]:
        """KIVI's packed codes, scales and zeros of ``keys`` (grouped along ``key_axis``: per channel over tokens)
        and ``values`` (grouped along the last axis: per token)."""
        g, sd = self.group_size, self.scale_dtype
        kc, ks, kz = quantize(keys, self.bits, g, axis=key_axis, scale_dtype=sd)
        vc, vs, vz = quantize(values, self.bits, g, axis=-1, scale_dtype=sd)
        return {"qkeys": pack(kc, self.bits), "k_scale": ks, "k_zero": kz,
                "qvalues": pack(vc, self.bits), "v_scale": vs, "v_zero": vz}

    def _flush_dense(self) -> None:
        """Quantise the residual's oldest whole groups beyond the newest ``residual`` tokens (dense layout): the codes,
        scales and zeros are appended to their growing buffers and the rest of the residual moves to the front of
        its own, so nothing already stored is copied (the same groups, codes and scales as :meth:`_flush` on rows)."""
        g, r = self.group_size, self.keys.shape[-2]
        n = max(r - self.residual, 0) // g * g
        if n == 0:
            return
        new = self._quantized(self.keys[:, :, :n], self.values[:, :, :n], key_axis=-2)
        for name, t in new.items():
            old = getattr(self, name)
            setattr(self, name, self._grow(name, t[:, :, :0] if old is None else old, t, -2))
        for name in ("keys", "values"):
            rest = getattr(self, name)[:, :, n:].clone()
            kept = getattr(self, name)[:, :, : r - n]
            kept.copy_(rest)
            setattr(self, name, kept)

    def stored_lengths(self) -> torch.Tensor:
        q, r = self._counts()
        return q + r

    def max_length(self) -> int:
        lengths = self.stored_lengths() if self.is_initialized else None
        return int(lengths.max()) if lengths is not None and lengths.numel() else 0

    @property
    def n_quantized(self) -> int:
        """Quantised tokens of the head that holds the most."""
        q = self._counts()[0] if self.is_initialized else None
        return int(q.max()) if q is not None and q.numel() else 0

    def kv_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) keys and values of every stored token, dequantised, in (sequence, head, slot) order."""
        flat = self.flat
        if self.qkeys is None:
            return flat(self.keys), flat(self.values)
        g = self.group_size
        # keys: one scale per (G rows of a head, channel); values: one per (row, G channels)
        codes = unpack(flat(self.qkeys), self.bits)
        k = dequantize(codes, flat(self.k_scale), flat(self.k_zero), g, axis=0, dtype=self.dtype)
        codes = unpack(flat(self.qvalues), self.bits)
        v = dequantize(codes, flat(self.v_scale), flat(self.v_zero), g, axis=-1, dtype=self.dtype)
        qh, rh = (head_ids(n) for n in self._counts())
        return _merge_by_head(k, qh, flat(self.keys), rh), _merge_by_head(v, qh, flat(self.values), rh)

    def padded(self):
        if self.packed:
            return self.padded_rows()
        # Dense (plain KIVI, every head the same rows): dequantise in the (B, H_kv, S, D) layout and append the
        # exact residual, without regrouping rows per head — the decode-time path, run once per step and layer.
        keys, values = self.keys, self.values
        if self.qkeys is not None:
            g = self.group_size
            k = dequantize(unpack(self.qkeys, self.bits), self.k_scale, self.k_zero, g, axis=-2, dtype=self.dtype)
            v = dequantize(unpack(self.qvalues, self.bits), self.v_scale, self.v_zero, g, axis=-1, dtype=self.dtype)
            keys, values = torch.cat([k, keys], dim=-2), torch.cat([v, values], dim=-2)
        return keys, values, None, dict(self.extras)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as attention sees it: (B, H_kv, S, D) keys and values (dense layout)."""
        return self.padded()[:2]

    # ---- storage operations (on rows) ----------------------------------------------------------------------

    def _store(self, keys, values, keep, extras, appended: int = 0) -> None:
        """Append (the last ``appended`` slots of the view, from :meth:`update`) or replace (eviction, batch moves)
        the stored rows, then quantise whole groups."""
        if appended and keep is None and not self.packed:
            # Plain KIVI while decoding: append to the dense (B, H_kv, r, D) residual directly; the per-row path runs
            # only when whole groups are due for quantisation (every G-th step), so a step costs no regrouping.
            S, t = keys.shape[-2], appended
            self.keys = torch.cat([self.keys, keys[..., S - t :, :]], dim=-2)
            self.values = torch.cat([self.values, values[..., S - t :, :]], dim=-2)
            self.extras = dict(extras)
            if self.keys.shape[-2] - self.residual >= self.group_size:
                with self._as_rows():
                    self._flush(protect=self.residual)
            return
        with self._as_rows():
            B, H, S, _ = keys.shape
            sel = keep if keep is not None else torch.ones((B, H, S), dtype=torch.bool, device=keys.device)
            self.extras = {n: t[sel] for n, t in extras.items()}
            if appended:
                # Only the last t slots are new; the stored rows stay as they are. (B*H_kv*t, D) in (b, h, slot) order.
                t = appended
                new_k = keys[..., S - t :, :].reshape(-1, keys.shape[-1])
                new_v = values[..., S - t :, :].reshape(-1, values.shape[-1])
                fresh = head_ids(torch.full_like(self.r_lengths, t))
                self.keys = _merge_by_head(self.keys, head_ids(self.r_lengths), new_k, fresh)
                self.values = _merge_by_head(self.values, head_ids(self.r_lengths), new_v, fresh)
                self.r_lengths = self.r_lengths + t
                self._flush(protect=max(self.residual, t) if self.evicts else self.residual)
                return
            # Replace: every kept token becomes an exact residual row, then whole groups beyond the residual are
            # quantised.
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
        with self._as_rows():
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
        with self._as_rows():
            # (B',) the source sequence of every sequence after the move
            src = fn(torch.arange(self.q_lengths.shape[0], device=self.q_lengths.device))

            def take(flat: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor | None:
                if flat is None:
                    return None
                per = counts.sum(-1)
                starts = torch.cumsum(per, 0) - per
                n = per[src]
                # (N',) row index: the source block's start plus the row's offset inside its block
                offset = torch.arange(int(n.sum()), device=per.device) - torch.repeat_interleave(
                    torch.cumsum(n, 0) - n, n
                )
                return flat[torch.repeat_interleave(starts[src], n) + offset]

            g = self.group_size
            for name in ("qkeys", "qvalues", "v_scale", "v_zero"):
                setattr(self, name, take(getattr(self, name), self.q_lengths))
            for name in ("k_scale", "k_zero"):
                setattr(self, name, take(getattr(self, name), self.q_lengths // g))
            self.keys, self.values = take(self.keys, self.r_lengths), take(self.values, self.r_lengths)
            self.extras = {name: take(t, self.stored_lengths()) for name, t in self.extras.items()}
            self.q_lengths, self.r_lengths = self.q_lengths[src], self.r_lengths[src]

    @property
    def is_croppable(self) -> bool:
        # Plain KIVI declines assisted decoding; under eviction the newest exact rows of every head can be removed.
        return self.evicts and super().is_croppable

    def check_crop(self, tokens_to_remove: int) -> int:
        n = super().check_crop(tokens_to_remove)
        exact = int(self._counts()[1].min()) if n else 0
        if n > exact:
            raise MethodError(
                f"crop: parameter 'tokens_to_remove' must be in [-{min(exact, self.tail)}, 0] for kivi: only the newest "
                f"{exact} tokens of every head are still exact (kivi can only crop the {exact} full-precision residual "
                f"tokens); older ones are quantised, and their exact values, which a rollback would need, are gone; "
                f"got {tokens_to_remove}"
            )
        return n

    def drop_newest(self, n: int) -> None:
        """The last ``n`` exact residual rows of each head go; rows that a flush quantised while those tokens were
        cached stay quantised."""
        with self._as_rows():
            rows = first_rows(self.r_lengths, self.r_lengths - n)
            self.keys, self.values = self.keys[rows], self.values[rows]
            lengths = self.stored_lengths()
            self.extras = {name: t[first_rows(lengths, lengths - n)] for name, t in self.extras.items()}
            self.r_lengths = self.r_lengths - n

    def _flush(self, protect: int) -> None:
        """Per head, quantise the oldest whole groups of residual rows beyond the newest ``protect``."""
        g = self.group_size
        n = torch.clamp((self.r_lengths - protect) // g * g, min=0)
        if not bool((n > 0).any()):
            return
        # (N_r,) rows to quantise: the first n[head] rows of each head
        move = first_rows(self.r_lengths, n)
        # (N_new, D): groups of G consecutive rows along axis 0 never span heads (each head moves a multiple of G)
        new = self._quantized(self.keys[move], self.values[move], key_axis=0)
        row_old, row_new = head_ids(self.q_lengths), head_ids(n)
        grp_old, grp_new = head_ids(self.q_lengths // g), head_ids(n // g)
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


class KIVIRaggedLayer(KIVILayer):
    """A :class:`KIVILayer` under an eviction method: packed per-head rows, new tokens exact until evicted among.

    A decode step that the eviction method leaves alone (one-shot eviction: every step after prefill) is read
    quantised, as plain KIVI's: :class:`KIVICompressedCache` sets :attr:`read_next`, :meth:`update` appends the token
    to each head's residual rows and returns only it, the attention hook calls :meth:`attend_deferred`, which reads
    every head's rows where they are stored (:func:`longkit.kvcache.kivi_attention.kivi_decode`), and then the
    residual's due groups are quantised, as the reference path (``update`` returning the dequantised padded view)
    would have done during ``update``.
    """

    evicts = True

    def _reset_state(self) -> None:
        super()._reset_state()
        #: the next update is a decode step the hook's attention reads quantised (set by KIVICompressedCache.update)
        self.read_next = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """The reference path (:meth:`KIVILayer.update`), or under :attr:`read_next` the deferred append: the
        ``T`` new tokens (B, H_kv, T, D) become the newest residual rows of their heads, nothing is quantised yet,
        and they alone are returned."""
        if self.deferred:
            raise MethodError(
                "kv method 'kivi': the previous decode step's attention did not read this cache layer (the model's "
                "attention module must pass its keyword arguments on to its attention function)"
            )
        if not self.read_next:
            return super().update(key_states, value_states, *args, **kwargs)
        self.read_next = False
        B, H, T, D = key_states.shape
        # (B*H_kv*T,) the head of every new row; each head's new rows go after its residual rows
        fresh = head_ids(torch.full_like(self.r_lengths, T))
        rows = head_ids(self.r_lengths)
        self.keys = _merge_by_head(self.keys, rows, key_states.reshape(-1, D), fresh)
        self.values = _merge_by_head(self.values, rows, value_states.reshape(-1, value_states.shape[-1]), fresh)
        if self.extras:
            rows = head_ids(self.stored_lengths())
            self.extras = {
                name: _merge_by_head(t, rows, self.fresh_extra(name, B, H, T, t.device, kwargs).reshape(-1), fresh)
                for name, t in self.extras.items()
            }
        self.r_lengths = self.r_lengths + T
        self.seen += T
        self.tail += T
        self.last_valid = None
        self.deferred = True
        return key_states, value_states

    def attend_deferred(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """(B, 1, H, D): the deferred decode step's attention from the stored rows (mask over each head's rows, or
        None: all visible); then the residual's due groups are quantised."""
        from longkit.kvcache.kivi_attention import kivi_decode

        out = kivi_decode(self, query, mask, scaling)
        self.finish_step()
        return out.transpose(1, 2).contiguous()

    def finish_step(self) -> None:
        # the reference path's update quantises what is due beyond max(residual, T) once the step's token is stored
        self.deferred = False
        self._flush(protect=max(self.residual, 1))


def _check_config(config: Any, bits: int, group_size: int) -> Any:
    """The text config of ``config``, checked against KIVI's grouping (see :func:`check_head_dim`)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    check_head_dim(head_dim_of(text), bits, group_size)
    return text


class KIVICache(Cache):
    """A transformers ``Cache`` with one :class:`KIVILayer` per decoder layer; ``nbytes()`` is exact."""

    def __init__(
        self, config: Any, bits: int = 2, group_size: int = 32, residual: int = 128, scale_dtype: str = "float16"
    ):
        from transformers.cache_utils import DynamicSlidingWindowLayer, get_layer_types_and_kwargs

        types, per_layer = get_layer_types_and_kwargs(_check_config(config, bits, group_size))
        kinds = sorted(set(types) - {"full_attention", "sliding_attention"})
        if kinds:
            raise MethodError(
                f"kv method 'kivi' supports full-attention and sliding-window layers only; this model has "
                f"{', '.join(kinds)} layers"
            )
        # Sliding-window layers stay transformers' own, already bounded by their window; full layers are quantised.
        super().__init__(
            layers=[
                KIVILayer(bits, group_size, residual, scale_dtype) if kind == "full_attention"
                else DynamicSlidingWindowLayer(**kw)
                for kind, kw in zip(types, per_layer, strict=True)
            ]
        )

        #: set by KIVI's attention pre-hook, reset by its attention function (see longkit.kvcache.hook.install)
        self.hooked = False

    def nbytes(self) -> int:
        return sum(layer_nbytes(layer) for layer in self.layers)


class KIVICompressedCache(CompressedCache):
    """An eviction method's :class:`~longkit.kvcache.cache.CompressedCache` with KIVI-quantised storage (of the
    full-attention layers; sliding-window layers stay transformers' own)."""

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
        _check_config(config, bits, group_size)
        # read by full_layer, which the base class calls while building the layers
        self._kivi = (bits, group_size, residual, scale_dtype)
        super().__init__(config, method, rotary=rotary)
        #: decode steps the eviction method leaves alone read the packed codes (:class:`KIVIRaggedLayer`); False
        #: runs the reference path: every step attends over the dequantised padded cache
        self.read_quantised = True

    def full_layer(self, track: tuple[str, ...]) -> KIVIRaggedLayer:
        return KIVIRaggedLayer(*self._kivi, track)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, KIVIRaggedLayer):
            layer.read_next = self._reads_quantised(layer, layer_idx, key_states, kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _reads_quantised(self, layer: KIVIRaggedLayer, layer_idx: int, key_states: torch.Tensor, kwargs: dict) -> bool:
        """Whether this update is a decode step whose attention reads the layer quantised: one token, quantised rows
        stored, the call going through the attention hook (its keyword arguments carry this cache), and the eviction
        method not compressing after it (it would score the padded view, which this step never builds)."""
        if not (self.read_quantised and key_states.shape[-2] == 1 and layer.is_initialized and layer.qkeys is not None):
            return False
        if (kwargs.get("kwargs") or {}).get(CACHE_KWARG) is not self:
            return False
        if not self.compressing:
            return True
        # the hook counts this step (decode_steps) at the first compressed layer before it asks the method
        steps = self.decode_steps
        self.decode_steps += int(layer_idx == self.first_full)
        try:
            return not self.method.wants_compression(self, 1)
        finally:
            self.decode_steps = steps


@register("kv", "kivi")
@dataclass
class KIVI(KVMethod):
    """KIVI: tuning-free asymmetric 2-/4-bit KV quantisation (keys per channel, values per token).

    Keys are quantised per channel and values per token in groups of ``group_size``, min/max asymmetric, stored as
    packed uint8; the most recent ``residual`` tokens stay in full precision and older ones are quantised in whole
    groups. Decode steps (sdpa/eager models, no eviction) read the packed codes directly (a native C kernel where a C
    compiler is available, :mod:`longkit.kvcache.kivi_native`); prefill attends to the exact keys.

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

    def check_model(self, model: Any) -> None:
        _check_config(model.config, self.bits, self.group_size)
        if self._evictor is not None:
            self._evictor.check_model(model)

    def apply(self, model: Any) -> Undo:
        if self._evictor is not None:
            return self._evictor.apply(model)
        from longkit.kvcache.hook import install, wrappable
        from longkit.kvcache.kivi_attention import KIVIAttention

        if not wrappable(str(getattr(getattr(model, "config", None), "_attn_implementation", None))):
            # Other attention implementations attend over the dequantised cache (the reference path).
            return lambda: None
        # Decode steps read the cache quantised (longkit.kvcache.kivi_attention).
        return install(model, self.name, prefix="longkit_kivi", attention=KIVIAttention, cache_type=KIVICache)

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
