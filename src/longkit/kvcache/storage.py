"""Ragged per-head KV storage: one cache layer that frees the bytes of evicted tokens.

Each :class:`RaggedLayer` holds its keys/values either **dense** ``(B, H_kv, S, D)`` (every head of every sequence
keeps the same number of tokens: no eviction yet, or a per-layer budget) or **packed** ``(N, D)`` with per-head
lengths ``(B, H_kv)`` (per-head budgets, Ada-KV style; ``N`` = the sum of the lengths). Only those bytes are stored:
``update()`` builds a transient padded ``(B, H_kv, S_max + T, D)`` view for the attention call, and the padded slots
are masked by the attention hook (:mod:`longkit.kvcache.hook`). :meth:`RaggedLayer.nbytes` is exact.

Dense storage grows in place: the stored keys, values and extras are views of growing buffers
(:mod:`longkit.kvcache.grow`), so a decode step writes its token into spare capacity instead of re-copying the cache.
``nbytes()`` counts the stored tokens only; :meth:`RaggedLayer.capacity_nbytes` adds the spare capacity (at most an
eighth of the stored length plus 256 slots). A compaction (eviction) replaces the stored tensors and drops the
buffers; the next append starts new ones. Packed (ragged) storage is rebuilt per step as before.

Positions. ``get_seq_length()`` is the number of tokens *seen*, not kept, so transformers gives new tokens their
true RoPE positions after an eviction. ``get_mask_sizes()`` reports the stored length with offset ``seen - S_max``,
which keeps the mask's causal column of each new token right.

``crop(-n)``, assisted decoding's rollback, removes the newest ``n`` tokens of every head; it is refused
(:class:`~longkit.errors.MethodError`, nothing changed) when eviction dropped one of them from some head, and for
methods that accumulate attention over all queries (H2O, Scissorhands: ``is_croppable`` is False).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from longkit.errors import MethodError
from longkit.kvcache.grow import capacity_nbytes, grow_append, is_prefix

#: dtypes of the per-slot side arrays a method may track ("pos": RoPE position, "acc": accumulated attention)
_EXTRA_DTYPES = {"pos": torch.long, "acc": torch.float32}


def gather_padded(flat: torch.Tensor, lengths: torch.Tensor, s_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(N, *rest)`` + lengths ``(B, H_kv)`` -> padded ``(B, H_kv, s_max, *rest)`` (zeros) and validity."""
    B, H = lengths.shape
    starts = torch.cumsum(lengths.flatten(), 0) - lengths.flatten()
    ar = torch.arange(s_max, device=lengths.device)
    # (B*H_kv, s_max) index into the packed rows; padded slots read row 0 and are zeroed below
    valid = ar[None, :] < lengths.flatten()[:, None]
    idx = torch.where(valid, starts[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
    if flat.shape[0] == 0:
        out = flat.new_zeros((B * H, s_max, *flat.shape[1:]))
    else:
        out = flat[idx].masked_fill(~valid.view(*valid.shape, *([1] * (flat.dim() - 1))), 0)
    return out.view(B, H, s_max, *flat.shape[1:]), valid.view(B, H, s_max)


class RaggedLayer(DynamicLayer):
    """One layer of a :class:`CompressedCache`: dense or packed per-head storage (see the module docstring)."""

    #: the last :meth:`update` stored its tokens and returned only them: the attention hook must call
    #: :meth:`attend_deferred`, which reads the storage itself (KIVI under eviction: the packed codes)
    deferred: bool = False

    def __init__(self, track: tuple[str, ...] = ()):
        super().__init__()
        #: names of per-slot float/int side arrays kept aligned with the keys ("pos": the RoPE position of a key)
        self.track = track
        self._reset_state()

    def _reset_state(self) -> None:
        self.seen = 0
        # (B, H_kv) int64 per-head lengths when packed; None when dense
        self.lengths: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}
        self.compacted = False
        self.last_valid: torch.Tensor | None = None
        #: the newest ``tail`` tokens seen are stored in every head of every sequence (what :meth:`crop` may remove)
        self.tail = 0
        #: growing buffers of the dense layout ("keys", "values", extras' names): the stored tensors are views of
        #: their filled part (see :mod:`longkit.kvcache.grow`)
        self.buffers: dict[str, torch.Tensor] = {}
        #: per buffer name, (buffer, view) as :meth:`_grow` last returned them: a stored tensor that *is* that view is
        #: known to be the buffer's filled part, so the next append skips :func:`~longkit.kvcache.grow.is_prefix`
        self._grown: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros((B, H, 0, D))
        self.values = value_states.new_zeros((B, H, 0, value_states.shape[-1]))
        self.extras = {
            name: torch.zeros((B, H, 0), dtype=_EXTRA_DTYPES[name], device=self.device) for name in self.track
        }
        self.is_initialized = True

    # ---- storage ---------------------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return self.lengths is not None

    def stored_lengths(self) -> torch.Tensor:
        """(B, H_kv) tokens stored per head."""
        if self.lengths is not None:
            return self.lengths
        B, H, S = self.keys.shape[:3]
        return torch.full((B, H), S, dtype=torch.long, device=self.keys.device)

    def max_length(self) -> int:
        if not self.is_initialized:
            return 0
        return int(self.lengths.max()) if self.lengths is not None and self.lengths.numel() else self.keys.shape[-2]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(keys, values) as ``(B, H_kv, S_max, D)``, validity ``(B, H_kv, S_max)`` (None when dense), extras."""
        if self.lengths is None:
            return self.keys, self.values, None, dict(self.extras)
        return self.padded_rows()

    def padded_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """:meth:`rows` padded per head, as :meth:`padded` returns them (validity None when every head is full)."""
        lengths, s_max = self.stored_lengths(), self.max_length()
        keys, values, extras = self.rows()
        pk, valid = gather_padded(keys, lengths, s_max)
        pv, _ = gather_padded(values, lengths, s_max)
        extras = {n: gather_padded(t, lengths, s_max)[0] for n, t in extras.items()}
        if lengths.numel() and bool((lengths == lengths.flatten()[0]).all()):
            valid = None
        return pk, pv, valid, extras

    def _store(
        self, keys, values, keep: torch.Tensor | None, extras: dict[str, torch.Tensor], appended: int = 0
    ) -> None:
        """Store the slots of the padded ``keys``/``values`` where ``keep`` is True (all slots when None); the last
        ``appended`` slots are new tokens (storage that keeps its older rows as they are, KIVI's, uses that)."""
        if keep is None:
            self.keys, self.values, self.extras, self.lengths = keys, values, extras, None
            if not appended:
                self.prune_buffers()
            return
        B, H, S = keep.shape
        counts = keep.sum(-1)
        if counts.numel() and bool((counts == counts.flatten()[0]).all()):
            # Every head keeps the same count: stay dense (the selection keeps each head's order).
            n = int(counts.flatten()[0])
            self.keys = keys[keep].view(B, H, n, keys.shape[-1])
            self.values = values[keep].view(B, H, n, values.shape[-1])
            self.extras = {k: t[keep].view(B, H, n) for k, t in extras.items()}
            self.lengths = None
        else:
            # Packed rows in (batch, head, slot) order: the ragged bytes only.
            self.keys = keys[keep]
            self.values = values[keep]
            self.extras = {k: t[keep] for k, t in extras.items()}
            self.lengths = counts
        self.prune_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``T`` new tokens to every head; return the padded view ``(B, H_kv, S_max + T, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, _ = key_states.shape
        old_k, old_v, old_valid, old_extras = self.padded()
        if old_valid is None:
            # Dense: append into the growing buffers (no copy of the stored tokens; see longkit.kvcache.grow).
            keys, values = self._grow("keys", old_k, key_states, -2), self._grow("values", old_v, value_states, -2)
        else:
            keys = torch.cat([old_k, key_states], dim=-2)
            values = torch.cat([old_v, value_states], dim=-2)
        new_extras = {}
        for name, t in old_extras.items():
            fresh = self.fresh_extra(name, B, H, T, keys.device, kwargs)
            new_extras[name] = self._grow(name, t, fresh, -1) if old_valid is None else torch.cat([t, fresh], dim=-1)
        valid = None
        if old_valid is not None:
            valid = torch.cat([old_valid, old_valid.new_ones((B, H, T))], dim=-1)
        self.seen += T
        self.tail += T
        self._store(keys, values, valid, new_extras, appended=T)
        # (B, H_kv, S_max + T): which slots of the returned view are real; None = all
        self.last_valid = valid
        return keys, values

    def fresh_extra(self, name: str, B: int, H: int, T: int, device, kwargs: dict) -> torch.Tensor:
        """(B, H_kv, T) the side array ``name`` of ``T`` new tokens (before :attr:`seen` counts them): their true
        RoPE positions for "pos" (the call's ``position_ids``, else the next positions), zeros otherwise."""
        dtype = _EXTRA_DTYPES[name]
        if name != "pos":
            return torch.zeros((B, H, T), dtype=dtype, device=device)
        pos = (kwargs.get("kwargs") or {}).get("position_ids")
        if pos is None or pos.shape[-1] != T:
            pos = torch.arange(self.seen, self.seen + T, device=device)[None]
        return pos.to(device=device, dtype=dtype).expand(B, T)[:, None, :].expand(B, H, T)

    def attend_deferred(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The attention of a decode step whose :meth:`update` left it to the layer (:attr:`deferred`): storage that
        computes attention where its tokens are stored (KIVI's packed codes) overrides this; (B, T, H, D) out."""
        raise NotImplementedError(f"{type(self).__name__} does not defer attention to its storage")

    def finish_step(self) -> None:
        """After a deferred step's attention (computed by :meth:`attend_deferred` or by the hook over
        :meth:`padded`): the storage's own follow-up (KIVI quantises its residual's due groups)."""
        self.deferred = False

    def _grow(self, name: str, cur: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """``cat([cur, new], dim)`` written into the growing buffer ``name`` when ``cur`` is its filled part."""
        buf = self.buffers.get(name)
        last = self._grown.get(name)
        if last is not None and last[1] is cur and last[0] is buf:
            # cur is the view this method returned from buf (a decode step's append, every layer every token):
            # grow_append's own path without re-checking that cur is buf's prefix
            n, t = cur.shape[dim], new.shape[dim]
            if t and n and n + t <= buf.shape[dim]:
                buf.narrow(dim, n, t).copy_(new)
                out = buf.narrow(dim, 0, n + t)
                self._grown[name] = (buf, out)
                return out
        self.buffers[name], out = grow_append(buf, cur, new, dim)
        self._grown[name] = (self.buffers[name], out)
        return out

    def capacity_nbytes(self) -> int:
        """Bytes allocated for this layer: :meth:`nbytes` plus the spare capacity of its growing buffers."""
        if not self.is_initialized:
            return 0
        self.prune_buffers()
        stored = self._buffered()
        spare = capacity_nbytes(self.buffers) - sum(t.numel() * t.element_size() for n, t in stored.items()
                                                    if n in self.buffers)
        return self.nbytes() + spare

    def prune_buffers(self) -> None:
        """Forget the growing buffers whose stored tensor was replaced (compaction, beam moves, packing): they hold
        the old tokens' memory, and the next append starts a fresh buffer anyway."""
        stored = self._buffered()
        dims = {"keys": -2, "values": -2}
        self.buffers = {
            n: b for n, b in self.buffers.items()
            if isinstance(stored.get(n), torch.Tensor) and is_prefix(b, stored[n], dims.get(n, -1) % b.dim())
        }
        # a forgotten buffer's last view must not keep its memory alive
        self._grown = {n: bv for n, bv in self._grown.items() if self.buffers.get(n) is bv[0]}

    def _buffered(self) -> dict[str, torch.Tensor]:
        """The stored tensors that may be views of :attr:`buffers`, by buffer name."""
        return {"keys": self.keys, "values": self.values, **self.extras}

    def compact(self, keep: torch.Tensor, keys=None, values=None, extras: dict | None = None) -> None:
        """Keep only the slots ``keep`` (B, H_kv, S_view) of the view the last ``update`` returned, optionally with
        replacement keys/values/extras in that layout (a :class:`~longkit.kvcache.base.Decision`)."""
        pk, pv, valid, pextras = self.view(keep.shape[-1])
        keys = pk if keys is None else keys
        extras = pextras if extras is None else extras
        pv = pv if values is None else values
        if valid is None and bool(keep.all()):
            # Nothing evicted from dense storage: keep the layout (and transformers' own masks) as they are.
            self.keys, self.values, self.extras = keys, pv, extras
            self.prune_buffers()
            return
        if valid is not None:
            keep = keep & valid
        self.track_tail(keep, valid)
        self._store(keys, pv, keep, extras)
        self.compacted = True

    def track_tail(self, keep: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Shorten :attr:`tail` to the newest slots that ``keep`` (B, H_kv, S_view) keeps in every head.

        Each head's real slots of the view are its tokens in order of arrival, so the slots after a head's last
        dropped one are its newest tokens, all still stored.
        """
        real = torch.ones_like(keep) if valid is None else valid
        # (B, H_kv, 1) 1-based slot of the last dropped real slot of each head (0: nothing dropped)
        slot = torch.arange(1, keep.shape[-1] + 1, device=keep.device)
        last = ((real & ~keep).long() * slot).amax(-1, keepdim=True)
        intact = (real & (slot > last)).sum(-1)
        if intact.numel():
            self.tail = min(self.tail, int(intact.min()))

    def view(self, s_view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The storage laid out as the padded view of the last ``update`` (keys, values, validity, extras).

        After a ragged update the view is [each head's old slots padded to the longest | the new tokens], while the
        storage is [each head's old slots + new tokens]: the stored rows are the view's valid slots, in order.
        """
        view_valid = self.last_valid
        if view_valid is None or view_valid.shape[-1] != s_view:
            return self.padded()
        B, H = view_valid.shape[:2]
        keys, values, extras = self.rows()

        def to_view(flat: torch.Tensor) -> torch.Tensor:
            out = flat.new_zeros((B, H, s_view, *flat.shape[1:]))
            out[view_valid] = flat
            return out

        return to_view(keys), to_view(values), view_valid, {n: to_view(t) for n, t in extras.items()}

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Every stored slot as one row, ``(N, D)`` keys and values and ``(N,)`` extras, in (batch, head, slot)
        order (the order in which :meth:`view` and boolean masks of a padded layout list them)."""
        keys, values = self.kv_rows()
        return keys, values, {n: self.flat(t) for n, t in self.extras.items()}

    def kv_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of :meth:`rows`, ``(N, D)``."""
        return self.flat(self.keys), self.flat(self.values)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """A stored tensor as rows: dense storage is (B, H_kv, n, *rest), packed storage already (N, *rest)."""
        return t if self.packed else t.reshape(-1, *t.shape[3:])

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        total = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        if self.lengths is not None:
            total += self.lengths.numel() * self.lengths.element_size()
        return total + sum(t.numel() * t.element_size() for t in self.extras.values())

    # ---- transformers Cache-layer protocol --------------------------------------------------------------------

    def get_seq_length(self) -> int:
        # Tokens seen, so that positions continue from the true length after an eviction.
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        s_max = self.max_length()
        return s_max + query_length, self.seen - s_max

    def _map_batch(self, fn) -> None:
        if not self.is_initialized or self.seen == 0:
            return
        keys, values, valid, extras = self.padded()
        keys, values = fn(keys), fn(values)
        extras = {k: fn(t) for k, t in extras.items()}
        self._store(keys, values, None if valid is None else fn(valid), extras)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def is_croppable(self) -> bool:
        # Attention accumulated into the older keys' scores (H2O, Scissorhands) includes the queries of the tokens a
        # crop removes and cannot be taken back out.
        return "acc" not in self.track

    def check_crop(self, tokens_to_remove: int) -> int:
        """The number of tokens ``crop(tokens_to_remove)`` removes, or a MethodError if it cannot."""
        if tokens_to_remove > 0:
            raise MethodError(
                f"crop: parameter 'tokens_to_remove' must be <= 0 (minus the number of newest tokens to remove, as for "
                f"transformers' DynamicLayer.crop); got {tokens_to_remove}"
            )
        n = -int(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return 0
        if "acc" in self.track:
            raise MethodError(
                f"crop: this cache tracks attention accumulated over all queries ({', '.join(self.track)}), which "
                "already includes the queries of the tokens to remove; it cannot be rolled back (no assisted decoding)"
            )
        if n > self.tail:
            raise MethodError(
                f"crop: parameter 'tokens_to_remove' must be in [-{self.tail}, 0]: only the newest {self.tail} tokens "
                f"are still stored in every head (eviction dropped older ones from some heads); got {tokens_to_remove}"
            )
        return n

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens from every head (assisted decoding's rollback).

        Each head's newest stored slots are those tokens (see :attr:`tail`); their per-slot extras go with them and
        ``seen`` steps back, so the next tokens get the right positions. Evictions decided while they were cached stay.
        """
        n = self.check_crop(tokens_to_remove)
        if n == 0:
            return
        self.drop_newest(n)
        self.seen -= n
        self.tail -= n
        self.last_valid = None

    def drop_newest(self, n: int) -> None:
        """Remove the newest ``n`` stored slots of every head (checked by :meth:`check_crop`)."""
        if self.lengths is None:
            # (B, H_kv, S - n, D)
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
            self.extras = {k: t[..., :-n] for k, t in self.extras.items()}
        else:
            # every head loses the same count, so packed storage stays packed (its lengths stay unequal)
            rows = first_rows(self.lengths, self.lengths - n)
            self.keys, self.values = self.keys[rows], self.values[rows]
            self.extras = {k: t[rows] for k, t in self.extras.items()}
            self.lengths = self.lengths - n

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._reset_state()


def head_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) flat head index (b * H_kv + h) of every packed row, from per-head row counts (B, H_kv)."""
    flat = lengths.flatten()
    return torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)


def first_rows(lengths: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(N,) bool over packed rows in (batch, head, slot) order with per-head counts ``lengths`` (B, H_kv): True for
    the first ``n`` (B, H_kv) rows of every head."""
    flat = lengths.flatten()
    heads = head_ids(lengths)
    starts = torch.cumsum(flat, 0) - flat
    # (N,) each row's slot within its head
    slot = torch.arange(heads.numel(), device=flat.device) - starts[heads]
    return slot < n.flatten()[heads]
