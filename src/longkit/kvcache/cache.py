"""The compressing KV cache: ragged per-head storage that frees real memory, and the attention hook that compresses it.

Storage. Each :class:`RaggedLayer` holds its keys/values either **dense** ``(B, H_kv, S, D)`` (every head of every
sequence keeps the same number of tokens: no eviction yet, or a per-layer budget) or **packed** ``(N, D)`` with
per-head lengths ``(B, H_kv)`` (per-head budgets, Ada-KV style; ``N`` = the sum of the lengths). Only those bytes are
stored: ``update()`` builds a transient padded ``(B, H_kv, S_max + T, D)`` view for the attention call, and the
padded slots are masked by the attention hook. :meth:`CompressedCache.nbytes` is exact.

Positions. ``get_seq_length()`` is the number of tokens *seen*, not kept, so transformers gives new tokens their
true RoPE positions after an eviction. ``get_mask_sizes()`` reports the stored length with offset ``seen - S_max``,
which keeps the mask's causal column of each new token right; once any layer has evicted, the hook builds the mask
of the stored slots itself (per sequence and per head) and keeps transformers' mask only for the new tokens.

Compression. The KV method's :meth:`~longkit.kvcache.base.CompressionMethod.apply` selects a registered attention
function ``longkit_kv_<sdpa|eager>`` that wraps the model's implementation and installs forward pre-hooks that tell it
which cache a call belongs to. After each attention call it hands the layer's queries and cached keys to the method
(:class:`ScoreContext`), which returns the slots to keep; the layer then drops the others. Nothing in the model's
code is patched.

Other ``generate`` modes: beam search and ``num_return_sequences`` move whole sequences (``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``): per-head storage, per-slot extras and ``real_seen`` move
together. ``crop(-n)``, assisted decoding's rollback, removes the newest ``n`` tokens of every head; it is refused
(:class:`~longkit.errors.MethodError`, nothing changed) when eviction dropped one of them from some head, and for
methods that accumulate attention over all queries (H2O, Scissorhands: ``is_croppable`` is False). Evictions decided
while the removed tokens were cached, and the count of decoding steps, stay as they are.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from longkit.errors import MethodError

#: attention module -> the cache its current forward uses (set by the pre-hooks of an applied KV method)
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: attention module -> the attention implementation the KV hook wraps ("sdpa" or "eager")
_INNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
WRAPPABLE = ("sdpa", "eager")


@dataclass
class ScoreContext:
    """What a scorer sees after one attention call of one layer.

    ``keys``/``values`` are the padded view of the whole cache including this call's new tokens (the last ``n_new``
    slots); ``valid`` marks real slots (padded slots and left-padding tokens are False). ``queries`` are the
    post-RoPE queries of this call.
    """

    module: torch.nn.Module
    layer: RaggedLayer
    cache: CompressedCache
    layer_idx: int
    num_layers: int
    # (B, H, T, D)
    queries: torch.Tensor
    # (B, H_kv, S, D)
    keys: torch.Tensor
    values: torch.Tensor
    # (B, H_kv, S) bool
    valid: torch.Tensor
    n_new: int
    scaling: float
    #: (B,) real (non-padding) tokens seen so far per sequence, this call included
    real_seen: torch.Tensor
    decoding: bool
    #: free slot for a method to pass what it computed in ``compress`` on to ``on_compact``
    scratch: Any = None

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


def _gather_padded(flat: torch.Tensor, lengths: torch.Tensor, s_max: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        s_max = self.max_length()
        keys, valid = _gather_padded(self.keys, self.lengths, s_max)
        values, _ = _gather_padded(self.values, self.lengths, s_max)
        extras = {n: _gather_padded(t, self.lengths, s_max)[0] for n, t in self.extras.items()}
        return keys, values, valid, extras

    def _store(self, keys, values, keep: torch.Tensor | None, extras: dict[str, torch.Tensor]) -> None:
        """Store the slots of the padded ``keys``/``values`` where ``keep`` is True (all slots when None)."""
        if keep is None:
            self.keys, self.values, self.extras, self.lengths = keys, values, extras, None
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``T`` new tokens to every head; return the padded view ``(B, H_kv, S_max + T, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, _ = key_states.shape
        old_k, old_v, old_valid, old_extras = self.padded()
        keys = torch.cat([old_k, key_states], dim=-2)
        values = torch.cat([old_v, value_states], dim=-2)
        new_extras = {}
        for name, t in old_extras.items():
            if name == "pos":
                pos = (kwargs.get("kwargs") or {}).get("position_ids")
                if pos is None or pos.shape[-1] != T:
                    pos = torch.arange(self.seen, self.seen + T, device=keys.device)[None]
                # (B, H_kv, T) true positions of the new keys
                fresh = pos.to(device=keys.device, dtype=t.dtype).expand(B, T)[:, None, :].expand(B, H, T)
            else:
                fresh = torch.zeros((B, H, T), dtype=t.dtype, device=keys.device)
            new_extras[name] = torch.cat([t, fresh], dim=-1)
        valid = None
        if old_valid is not None:
            valid = torch.cat([old_valid, old_valid.new_ones((B, H, T))], dim=-1)
        self.seen += T
        self.tail += T
        self._store(keys, values, valid, new_extras)
        # (B, H_kv, S_max + T): which slots of the returned view are real; None = all
        self.last_valid = valid
        return keys, values

    def compact(
        self,
        keep: torch.Tensor,
        keys: torch.Tensor | None = None,
        extras: dict | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        """Keep only the slots ``keep`` (B, H_kv, S_view) of the view the last ``update`` returned (optionally with
        new keys/values in that layout)."""
        pk, pv, valid, pextras = self.view(keep.shape[-1])
        keys = pk if keys is None else keys
        extras = pextras if extras is None else extras
        pv = pv if values is None else values
        if valid is None and bool(keep.all()):
            # Nothing evicted from dense storage: keep the layout (and transformers' own masks) as they are.
            self.keys, self.values, self.extras = keys, pv, extras
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

        def flat(t: torch.Tensor) -> torch.Tensor:
            # dense storage is (B, H_kv, n, *rest); packed storage is already (N, *rest)
            return t.reshape(-1, *t.shape[3:]) if self.lengths is None else t

        return flat(self.keys), flat(self.values), {n: flat(t) for n, t in self.extras.items()}

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
        if not self.is_croppable:
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
        if self.lengths is None:
            # (B, H_kv, S - n, D)
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
            self.extras = {k: t[..., :-n] for k, t in self.extras.items()}
        else:
            # every head loses the same count, so packed storage stays packed (its lengths stay unequal)
            rows = keep_oldest_rows(self.lengths, n)
            self.keys, self.values = self.keys[rows], self.values[rows]
            self.extras = {k: t[rows] for k, t in self.extras.items()}
            self.lengths = self.lengths - n
        self.seen -= n
        self.tail -= n
        self.last_valid = None

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._reset_state()


_EXTRA_DTYPES = {"pos": torch.long, "acc": torch.float32}


def keep_oldest_rows(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) bool over packed rows in (batch, head, slot) order with per-head counts ``lengths`` (B, H_kv): False for
    the last ``n`` rows of every head."""
    flat = lengths.flatten()
    heads = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)
    starts = torch.cumsum(flat, 0) - flat
    # (N,) each row's slot within its head
    slot = torch.arange(heads.numel(), device=flat.device) - starts[heads]
    return slot < (flat - n)[heads]


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


# ---- the attention hook ----------------------------------------------------------------------------------------


def _mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    # eager masks are additive: 0 where visible, the dtype's minimum where masked
    return mask > torch.finfo(mask.dtype).min / 2


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (repeat the kv heads, softmax in float32)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _inner(name: str):
    if name == "eager":
        return _eager
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[name]


def _own_mask(
    layer: RaggedLayer, incoming: torch.Tensor | None, B: int, H: int, T: int, S: int, device
) -> torch.Tensor:
    """(B, H or 1, T, S) bool: stored slots by the layer's validity, new tokens by transformers' mask (or causal).

    Dense layers (every head holds the same real tokens) get one mask for all heads, ragged ones a mask per head.
    """
    s_old = S - T
    if layer.last_valid is not None:
        # (B, H_kv, S_old) -> the query heads of each kv head
        old = layer.last_valid[..., :s_old]
        old = old.repeat_interleave(H // old.shape[1], dim=1)[:, :, None, :]
    else:
        old = torch.ones((B, 1, 1, s_old), dtype=torch.bool, device=device)
    heads = old.shape[1]
    old = old.expand(B, heads, T, s_old)
    if incoming is not None:
        new = _mask_to_bool(incoming)[..., -T:].expand(B, heads, T, T)
    else:
        new = torch.ones((T, T), dtype=torch.bool, device=device).tril()[None, None].expand(B, heads, T, T)
    return torch.cat([old, new], dim=-1)


def _key_validity(incoming: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor | None:
    """(B, S) which keys the last query may see, from the first forward's mask (left padding); None = all."""
    if incoming is None:
        return None
    valid = _mask_to_bool(incoming)[:, 0, -1, :]
    return None if bool(valid.all()) else valid.expand(B, S)


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function of KV methods: mask ragged storage, attend, then compress the layer."""
    cache = _ACTIVE.get(module)
    inner = _inner(_INNER.get(module, "sdpa"))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not isinstance(cache, CompressedCache):
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cache.hooked = False
    layer = cache.layers[module.layer_idx]
    B, H, T, _ = query.shape
    S = key.shape[-2]
    mask = attention_mask
    if cache.own_mask:
        own = _own_mask(layer, attention_mask, B, H, T, S, query.device)
        if _INNER.get(module) == "eager":
            mask = torch.zeros(own.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~own, torch.finfo(query.dtype).min
            )
        else:
            mask = own
    out = inner(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    _after_attention(cache, layer, module, query, key, value, attention_mask, scaling)
    return out


def replay_attention(module, query, key, value, attention_mask, scaling) -> None:
    """What :func:`kv_attention` does around the attention itself, for a first (prefill) call replayed from a
    captured prefill (:mod:`longkit.runtime.prefill_capture`): the compression never depends on the attention output."""
    cache = _ACTIVE.get(module)
    if not isinstance(cache, CompressedCache):
        return
    if cache.own_mask:
        raise MethodError("a replayed prefill must start from an empty cache")
    cache.hooked = False
    _after_attention(cache, cache.layers[module.layer_idx], module, query, key, value, attention_mask, scaling)


def _after_attention(cache, layer, module, query, key, value, incoming, scaling) -> None:
    B, H, T, _ = query.shape
    S = key.shape[-2]
    first = layer.seen == T
    pad_valid = _key_validity(incoming, B, S, key.device) if first and not cache.own_mask else None
    if module.layer_idx == 0:
        if cache.real_seen is None or first:
            cache.real_seen = (
                pad_valid.sum(-1) if pad_valid is not None else torch.full((B,), S, dtype=torch.long, device=key.device)
            )
        else:
            cache.real_seen = cache.real_seen + T
        if T == 1:
            cache.decode_steps += 1
    # (B, H_kv, S) real slots of the view
    valid = (
        layer.last_valid
        if layer.last_valid is not None
        else torch.ones(key.shape[:3], dtype=torch.bool, device=key.device)
    )
    if pad_valid is not None:
        valid = valid & pad_valid[:, None, :]
    keep = None if pad_valid is None else valid
    method = cache.method
    if cache.compressing and method is not None and method.wants_compression(cache, T):
        ctx = ScoreContext(
            module=module,
            layer=layer,
            cache=cache,
            layer_idx=module.layer_idx,
            num_layers=cache.num_layers,
            queries=query,
            keys=key,
            values=value,
            valid=valid,
            n_new=T,
            scaling=scaling,
            real_seen=cache.real_seen,
            decoding=T == 1,
        )
        chosen = method.compress(ctx)
        if chosen is not None:
            keep = chosen & valid
            merged = method.merge_values(ctx, keep)
            moved = method.on_compact(ctx, keep)
            if merged is not None:
                # only merging methods pass values (layers overriding compact, e.g. KIVI's, need not take them)
                if "values" not in inspect.signature(layer.compact).parameters:
                    raise MethodError(
                        f"kv method '{getattr(method, 'name', method)}' merges values, which the storage of "
                        f"{type(layer).__name__} cannot take; use it without quantised storage"
                    )
                keys, extras = (None, None) if moved is None else moved
                layer.compact(keep, keys=keys, extras=extras, values=merged)
                return
            if moved is not None:
                layer.compact(keep, keys=moved[0], extras=moved[1])
                return
    if keep is not None:
        layer.compact(keep)


def install(model: Any, method_name: str) -> Any:
    """Select ``longkit_kv_<impl>`` on ``model`` and hook its attention modules; return the undo callable."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not hasattr(model, "set_attn_implementation"):
        raise MethodError(f"kv method '{method_name}' needs a transformers PreTrainedModel")
    previous = model.config._attn_implementation
    if previous not in WRAPPABLE:
        raise MethodError(
            f"kv method '{method_name}' needs the model's attention implementation to be one of "
            f"{', '.join(WRAPPABLE)} (got {previous!r}); use attention=sdpa or attention=eager"
        )
    name = f"longkit_kv_{previous}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, kv_attention)
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[previous])
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise MethodError(
            f"kv method '{method_name}': found no attention modules with a layer_idx in {type(model).__name__}"
        )

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("cache")
        _ACTIVE[module] = cache
        if isinstance(cache, CompressedCache):
            cache.hooked = True

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    for m in modules:
        _INNER[m] = previous
    model.set_attn_implementation(name)

    def undo() -> None:
        for h in handles:
            h.remove()
        for m in modules:
            _ACTIVE.pop(m, None)
            _INNER.pop(m, None)
        model.set_attn_implementation(previous)

    return undo


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, rotary: Any) -> torch.Tensor:
    """Move RoPE-rotated ``keys`` (B, H_kv, S, D) by ``delta`` (B, H_kv, S) positions: R(p + d) k = R(d) R(p) k."""
    B, H, S, D = keys.shape
    # (B, H_kv*S) position offsets -> cos/sin (B, H_kv*S, D) of the model's own rotary embedding
    cos, sin = rotary(keys.float(), position_ids=delta.reshape(B, H * S))
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos = (cos.float() / scale).view(B, H, S, D)
    sin = (sin.float() / scale).view(B, H, S, D)
    k = keys.float()
    half = D // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)
