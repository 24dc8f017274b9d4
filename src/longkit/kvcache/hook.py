"""The attention hook of KV methods: mask ragged storage, attend with the model's own attention, then compress.

A KV method's :meth:`~longkit.kvcache.base.CompressionMethod.apply` calls :func:`install`: it registers (once per
implementation) the attention function ``longkit_kv_<sdpa|eager>``, a :class:`KVAttention` that wraps the model's own
implementation, and adds forward pre-hooks to the attention modules that hand each call's
:class:`~longkit.kvcache.cache.CompressedCache` to it through the call's keyword arguments (transformers passes an
attention module's keyword arguments on to its attention function). After the attention call the method sees the
layer's queries and cached keys (:class:`~longkit.kvcache.base.ScoreContext`) and returns a
:class:`~longkit.kvcache.base.Decision`, which the layer applies. Nothing in the model's code is patched, and no
table of live caches is kept: the cache travels with the call.

A layer whose ``update`` deferred a decode step's attention to its storage (:attr:`RaggedLayer.deferred
<longkit.kvcache.storage.RaggedLayer.deferred>`: KIVI under eviction keeps its packed codes and returns only the new
token) is attended by the layer itself (:meth:`~longkit.kvcache.storage.RaggedLayer.attend_deferred`); the hook
still counts the step.

The hook wraps ``sdpa`` or ``eager``, or an attention method that computes full-attention layers exactly as sdpa and
only changes how sliding-window layers are computed (``full_layers_sdpa``: ``attention=sliding_window``). Then the
full-attention layers, the ones a KV method compresses, run sdpa under the hook as before, and the sliding layers run
the attention method: a hybrid model (Gemma 3) prefills in one forward without transformers' dense T x T
sliding-window path, and the KV method sees the same full-attention calls as on plain sdpa.
"""

from __future__ import annotations

from typing import Any

import torch

from longkit.errors import MethodError
from longkit.kvcache.base import Decision, ScoreContext
from longkit.kvcache.cache import CompressedCache
from longkit.kvcache.storage import RaggedLayer

WRAPPABLE = ("sdpa", "eager")
#: the keyword argument through which the pre-hooks hand an attention call its cache
CACHE_KWARG = "longkit_kv_cache"


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


def _full_layers_sdpa(name: str) -> bool:
    """Whether the attention implementation ``name`` is a longkit attention method that runs full-attention layers
    as transformers' sdpa and only computes sliding-window layers its own way (``full_layers_sdpa``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        return False
    owner = getattr(ALL_ATTENTION_FUNCTIONS[name], "__self__", None)
    return bool(getattr(owner, "full_layers_sdpa", False))


def wrappable(name: str) -> bool:
    """Whether a KV method's attention function can wrap the attention implementation ``name``."""
    return name in WRAPPABLE or _full_layers_sdpa(name)


def full_layer_attention(name: str) -> str:
    """The implementation a wrapped ``name`` runs on full-attention layers: itself, or sdpa for an attention method
    that only changes the sliding-window layers."""
    return name if name in WRAPPABLE else "sdpa"


def inner_attention(name: str):
    """The attention function transformers runs for ``name`` (eager is not registered there: ours, equal to it)."""
    if name == "eager":
        return _eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


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


#: keyword arguments that change what attention computes beyond q, k, v and the mask (the decode kernels do not
#: take them, so a call that sets one runs the model's own attention)
_SPECIAL = ("softcap", "s_aux", "sinks", "position_bias")


def attend(inner_name: str, module, query, key, value, mask, scaling, dropout=0.0, **kwargs):
    """The model's own attention, or for a decode step (one query token) the configured single-query kernel
    (:mod:`longkit.kvcache.decode`, which reads each kv head once); ``sdpa`` models only (eager returns weights)."""
    from longkit.kvcache.decode import decode_attention, resolved_kernel

    if (
        inner_name == "sdpa"
        and query.shape[2] == 1
        and not (dropout and module.training)
        and not any(kwargs.get(name) is not None for name in _SPECIAL)
    ):
        kernel = resolved_kernel(query.dtype)
        if kernel != "sdpa":
            out = decode_attention(query, key, value, mask, scaling, kernel=kernel)
            return out.transpose(1, 2).contiguous(), None
    return inner_attention(inner_name)(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


class KVAttention:
    """The registered attention function ``longkit_kv_<inner>``: mask ragged storage, attend, compress the layer."""

    def __init__(self, inner: str):
        #: the implementation this one wraps ("sdpa", "eager" or a ``full_layers_sdpa`` attention method's)
        self.inner = inner
        #: what the compressed (full-attention) layers run: ``inner`` itself, or sdpa under such a method
        self.full = full_layer_attention(inner)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cache = kwargs.pop(CACHE_KWARG, None)
        inner = inner_attention(self.inner)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if not isinstance(cache, CompressedCache):
            return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        cache.hooked = False
        if not cache.compressed(module.layer_idx):
            # A sliding-window layer: transformers' own cache layer and mask (which holds the window); the method
            # compresses full-attention layers only.
            return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer = cache.layers[module.layer_idx]
        if layer.deferred:
            out = self._deferred(cache, layer, module, query, attention_mask, scaling, dropout, kwargs)
            _compress(cache, layer, module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"))
            return out, None
        B, H, T, _ = query.shape
        mask = attention_mask
        if cache.own_mask:
            mask = _own_mask(layer, attention_mask, B, H, T, key.shape[-2], query.device)
            if self.full == "eager":
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min
                )
        out = attend(self.full, module, query, key, value, mask, scaling, dropout=dropout, **kwargs)
        _compress(cache, layer, module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"))
        return out


    def _deferred(self, cache, layer, module, query, attention_mask, scaling, dropout, kwargs) -> torch.Tensor:
        """(B, T, H, D): a decode step whose ``update`` stored its token and kept the cache as stored (KIVI's packed
        codes): the layer attends from its storage. Once a layer evicted, every stored slot is real and visible (no
        mask); before, transformers' mask covers the stored rows in their order."""
        mask = None if cache.own_mask else attention_mask
        if not (dropout and module.training) and not any(kwargs.get(name) is not None for name in _SPECIAL):
            return layer.attend_deferred(query, mask, scaling)
        # What the layer's read does not compute (a softcap, sinks, dropout): the model's attention over the storage
        # padded per head (the reference path's values, each head's real slots in another order).
        keys, values, valid, _ = layer.padded()
        if valid is not None:
            # (B, H, 1, S) each query head sees its kv head's real slots
            mask = valid.repeat_interleave(query.shape[1] // valid.shape[1], dim=1)[:, :, None]
            if self.full == "eager":
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min
                )
        out = attend(self.full, module, query, keys, values, mask, scaling, dropout=dropout, **kwargs)[0]
        layer.finish_step()
        return out


def replay_attention(cache: Any, module, query, key, value, attention_mask, scaling, position_ids=None) -> None:
    """What :class:`KVAttention` does around the attention itself, for a first (prefill) call replayed from a captured
    prefill (:mod:`longkit.runtime.prefill_capture`): the compression never depends on the attention output."""
    if not isinstance(cache, CompressedCache):
        return
    if cache.own_mask:
        raise MethodError("a replayed prefill must start from an empty cache")
    cache.hooked = False
    if not cache.compressed(module.layer_idx):
        return
    layer = cache.layers[module.layer_idx]
    _compress(cache, layer, module, query, key, value, attention_mask, scaling, position_ids)


def _compress(cache, layer, module, query, key, value, incoming, scaling, position_ids=None) -> None:
    """After one attention call: count the real tokens seen, then apply the method's decision (and drop the first
    forward's left padding in any case)."""
    B, H, T, _ = query.shape
    S = key.shape[-2]
    first = layer.seen == T
    pad_valid = _key_validity(incoming, B, S, key.device) if first and not cache.own_mask else None
    # The first compressed layer counts for the whole forward (layer 0 may be a sliding-window layer).
    if module.layer_idx == cache.first_full:
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
    method, decision = cache.method, None
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
            position_ids=position_ids,
        )
        decision = method.decide(ctx)
    if decision is None and pad_valid is not None:
        decision = Decision(valid)
    if decision is not None:
        layer.compact(decision.keep, decision.keys, decision.values, decision.extras)


def install(
    model: Any, method_name: str, *, prefix: str = "longkit_kv", attention: Any = None, cache_type: Any = None
) -> Any:
    """Select ``<prefix>_<impl>`` on ``model`` and hook its attention modules; return the undo callable.

    ``attention(inner)`` builds the registered attention function (default :class:`KVAttention`); the pre-hooks
    hand it caches of ``cache_type`` (default :class:`CompressedCache`) under :data:`CACHE_KWARG`.
    """
    attention = KVAttention if attention is None else attention
    cache_type = CompressedCache if cache_type is None else cache_type
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(model, "set_attn_implementation"):
        raise MethodError(f"kv method '{method_name}' needs a transformers PreTrainedModel")
    previous = model.config._attn_implementation
    if not wrappable(previous):
        raise MethodError(
            f"kv method '{method_name}' needs the model's attention implementation to be one of "
            f"{', '.join(WRAPPABLE)} or attention=sliding_window (got {previous!r}); use attention=sdpa, "
            "attention=eager or attention=sliding_window"
        )
    name = f"{prefix}_{previous}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, attention(previous))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise MethodError(
            f"kv method '{method_name}': found no attention modules with a layer_idx in {type(model).__name__}"
        )

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("cache")
        if not isinstance(cache, cache_type):
            return None
        # The attention function resets the flag when the cache reached it; still set at the next layer means the
        # model's attention module dropped its keyword arguments, and compression would silently not run.
        if cache.hooked and module.layer_idx != 0:
            raise MethodError(
                f"kv method '{method_name}': {type(module).__name__} does not pass its keyword arguments on to its "
                "attention function, so the KV cache cannot be compressed on this model"
            )
        cache.hooked = True
        return args, {**kwargs, CACHE_KWARG: cache}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    model.set_attn_implementation(name)

    def undo() -> None:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)

    return undo
