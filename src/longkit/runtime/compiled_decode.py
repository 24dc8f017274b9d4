"""A compiled decode step: one-token forwards through ``torch.compile`` on a fixed-capacity cache.

An eager decode step of a small model is mostly fixed overhead: about 600 small ATen calls and transformers' Python
per step (SmolLM2-135M bf16 on a 2-core AVX-512 CPU: 39 ms per step at a 10-token context against a 9.6 ms weight-read
floor, issue 24). Compiling the one-token forward removes the Python and fuses the small element-wise operations;
with inductor's ``freezing`` the weights become constants of the compiled graph, and on CPUs with bf16 support the
linear layers run on weights prepacked for oneDNN. Measurements: ``benchmarks/decode/results/compile.notes.md``.

A compiled graph needs shapes that do not change from step to step. :class:`CompiledDecoder` therefore copies the
prefilled cache once into preallocated buffers of a fixed capacity (transformers' ``StaticCache``, capacity =
stored tokens + ``max_new_tokens`` rounded up to :data:`BUCKET` slots so that nearby lengths share one compiled
graph), and every step writes one slot and attends over the whole buffer under a boolean mask of the filled slots.
The mask is per layer and per key/value head, so caches whose layers or heads kept different tokens (PyramidKV,
AdaKV) decode too.
Attention during these steps is registered as the attention implementation ``longkit_decode`` for the decoder's
lifetime (restored when it closes), in one of two forms (``attention``):

- ``native`` (the default wherever it builds, ``auto``): the C kernel of :mod:`longkit.kvcache.decode_native`, called
  from the compiled graph as the operator ``longkit::decode_attend``: the query heads of a kv head packed, K and V read
  once, the sequence split over the threads, and only each layer's filled slots read (the capacity's spare slots
  cost nothing). At 8K on SmolLM2-135M bf16 it took about 0.53x the time of torch's fused kernel inside the
  compiled step (profiles of one A/B run on a shared CPU, ``benchmarks/decode/results/compile.notes.md``);
- ``sdpa``: torch's fused kernel on the packed query (:mod:`longkit.kvcache.decode`) over the whole buffer under the
  mask.

The model's linear layers (``linear``, opt-in): ``torch`` (the default) leaves them to inductor (with ``freezing``:
oneDNN linears on prepacked bf16 weights, and inductor's ``cpp.enable_concat_linear``: linears sharing an input, q/k/v
and gate/up, concatenated into one; quiet A/B at 8K on SmolLM2-135M, 2 threads: 27.6 vs 30.5 ms per step,
``benchmarks/decode/results/compiled_ab_concat_8k_quiet.md``); ``native`` (or ``auto``: where it builds) calls the C GEMV of
:mod:`longkit.runtime.gemv_native` as the operator ``longkit::gemv`` for every ``nn.Linear`` during the steps (at most
4 rows; prefill and any forward outside :meth:`CompiledDecoder.step` keep torch's linear): each weight row read once,
bf16 dot products on AVX512-BF16, the weights not prepacked. On a shared, capped CPU it read SmolLM2's weights as
fast as ``w.sum()`` (0.90x the time of the compiled oneDNN linears over all shapes) and the whole compiled step took
0.85-1.02x the time of the default one (four A/B runs, quartiles spanning 1.0: not confirmed), so it stays opt-in
(``benchmarks/decode/results/compile.notes.md``, 2026-12-06, branch ``gemv``).

What it takes (anything else is refused with a :class:`~longkit.errors.MethodError` saying why):

- the model's attention implementation ``sdpa`` (or a KV method's ``longkit_kv_sdpa`` wrapper): an attention method
  (Quest, MInference...) computes attention its own way, which the decoder would replace;
- a cache after prefill whose layers are all full-attention layers holding plain keys and values: the seam's default
  cache, transformers' ``DynamicCache``, or a compressing cache (:class:`~longkit.kvcache.cache.CompressedCache`)
  whose method compresses only after prefill (``decode_every=0``: SnapKV, PyramidKV, AdaKV...); or a KIVI cache
  (below). Methods that act on every decoding step (H2O, TOVA, DuoAttention's streaming heads, KIVI after H2O or
  Scissorhands) keep their eager path.

KIVI caches (``kv=kivi:...``: :class:`~longkit.kvcache.kivi.KIVICache`, and KIVI after a one-shot eviction such as
SnapKV, :class:`~longkit.kvcache.kivi.KIVICompressedCache`) are not copied: the packed codes are what a step should
read, and they grow and flush as eagerly. The compiled graph (linear layers, norms, RoPE...) sees a pass-through
cache whose ``update`` returns the step's own key and value, and the attention calls the operator
``longkit::kivi_decode_step`` with them and the query: it runs the layer's eager step on the real cache (``update``
appends the token to the exact residual, KIVI's attention hook reads the packed codes with
:func:`~longkit.kvcache.kivi_attention.kivi_decode`, the native kernel where it builds, then ``finish_step`` quantises
the due groups) and returns the attention output. The operator finds the cache through a handle the decoder owns
(a tensor input of the graph, so every KIVI decoder of a model runs one compiled graph) and releases on close. Its
side effects on the cache are declared as none; that is safe because the graph calls it once per layer per step and
consumes its output. The model must run KIVI's attention hook (``longkit.apply(model, kv="kivi...")`` on sdpa or
eager), ``attention`` stays ``auto`` (``dec.attention == "kivi"``), and there is no capacity (``dec.capacity`` None).
The steps, the cache's bytes and its quantised tokens equal the eager steps' (fp32 logits within 1e-5).

Costs: the first step compiles (tens of seconds to minutes per capacity bucket; ``compile_s``), each new bucket
compiles again (after torch's ``cache_size_limit`` recompiles dynamo runs the forward eagerly), and with ``freezing``
the compiled graph keeps its own prepacked copy of the weights for the life of dynamo's cache: weights changed later
are not seen by it.

Outputs equal the eager path up to float rounding (the masked buffer adds zero-weight slots, inductor fuses
element-wise operations): greedy tokens identical and fp32 logits within 1e-5 on the tiny test models.

>>> with longkit.apply(model) as applied:
...     cache = applied.new_cache()
...     out = model(ids, cache=cache, use_cache=True)        # prefill, eager
...     with compiled_decode(model, cache, max_new_tokens=64) as dec:
...         logits = dec.step(out.logits[:, -1:].argmax(-1))  # (B, vocab)
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

import torch

from longkit.errors import MethodError

#: capacities are rounded up to a multiple of this many slots (one compiled graph serves every length in a bucket)
BUCKET = 256
#: the attention implementation registered for compiled decode steps
ATTENTION = "longkit_decode"
#: attention implementations a compiled decoder may stand in for during decoding
REPLACEABLE = ("sdpa", "longkit_kv_sdpa")
#: the keyword argument that hands the attention calls every layer's mask (transformers passes a model's extra
#: keyword arguments on to the attention functions; its own ``attention_mask`` is one tensor for all layers)
MASK_KWARG = "longkit_decode_mask"
#: the keyword argument that hands the attention calls every layer's filled slots (layers,) int64 (native attention)
LIMIT_KWARG = "longkit_decode_limits"
#: the keyword argument that hands the attention calls the decoder's handle (1,) int64 in :data:`_KIVI` (KIVI caches)
KIVI_KWARG = "longkit_decode_kivi"
#: how a compiled step computes attention (the ``attention`` parameter)
ATTENTIONS = ("auto", "native", "sdpa")
#: how a compiled step computes the model's linear layers (the ``linear`` parameter)
LINEARS = ("torch", "auto", "native")


def _decode_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention of compiled decode steps: q (B, H, 1, D) against the whole buffer (B, H_kv, cap, D) under the
    layer's mask (B, H_kv, 1, cap) from the decoder's (layers, B, H_kv, 1, cap) mask, kv heads read once. Returns
    (B, 1, H, D) as transformers expects."""
    from longkit.kvcache.decode import pack_query

    if query.shape[2] != 1:
        raise MethodError(f"compiled decode: attention takes one query token per step (got {query.shape[2]})")
    handle = kwargs.get(KIVI_KWARG)
    if handle is not None:
        # KIVI: the layer's append, its quantised read and its flush in one opaque operator; (B, 1, H, D)
        return torch.ops.longkit.kivi_decode_step(query, key, value, handle, module.layer_idx, float(scaling)), None
    B, H, _, D = query.shape
    masks = kwargs.get(MASK_KWARG)
    limits = kwargs.get(LIMIT_KWARG)
    if limits is not None:
        # the native kernel over the layer's filled slots only; (B, H, 1, D) -> (B, 1, H, D)
        out = torch.ops.longkit.decode_attend(query, key, value, masks, limits, module.layer_idx, float(scaling))
        return out.transpose(1, 2), None
    mask = attention_mask if masks is None else masks[module.layer_idx]
    # (B, H, 1, D) -> (B, H_kv, G, D): the G query heads of a kv head are the rows of one product against its K and V,
    # and the (B, H_kv, 1, cap) mask broadcasts over them
    out = torch.nn.functional.scaled_dot_product_attention(
        pack_query(query, key.shape[1]), key, value, attn_mask=mask, scale=scaling
    )
    # (B, H_kv, G, D) -> (B, 1, H, D)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _decode_attention_fn)
    _register_op()


_OP_REGISTERED = False


def _register_op() -> None:
    """``torch.ops.longkit.decode_attend``: the native single-query kernel as an operator the compiled graph calls
    (opaque to dynamo and inductor: no graph break, its shape declared by the fake implementation)."""
    global _OP_REGISTERED
    if _OP_REGISTERED:
        return
    _OP_REGISTERED = True

    @torch.library.custom_op("longkit::decode_attend", mutates_args=())
    def decode_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: torch.Tensor,
                      limits: torch.Tensor, layer: int, scale: float) -> torch.Tensor:  # fmt: skip
        """q (B, H, 1, D) over the first ``limits[layer]`` slots of key/value (B, H_kv, cap, D) under
        ``masks[layer]`` (B, H_kv, 1, cap); returns (B, H, 1, D) contiguous."""
        from longkit.kvcache import decode_native

        n = int(limits[layer])
        mask = masks[layer]
        if decode_native.available(query, key) is True:
            return decode_native.decode_attend(query, key, value, mask, scale, limit=n)
        # the kernel is off or cannot build: torch's fused kernel on the packed query over the same filled slots
        from longkit.kvcache.decode import pack_query

        out = torch.nn.functional.scaled_dot_product_attention(
            pack_query(query, key.shape[1]), key[..., :n, :], value[..., :n, :], attn_mask=mask[..., :n], scale=scale
        )
        return out.reshape(query.shape).contiguous()

    @decode_attend.register_fake
    def _(query, key, value, masks, limits, layer, scale):
        return torch.empty_like(query, memory_format=torch.contiguous_format)

    _register_kivi_op()


class _KIVIStep:
    """What a KIVI decoder's operator needs at a step: the cache, the model's own (hooked) attention function and
    its attention modules by layer index."""

    def __init__(self, cache: Any, attend: Any, modules: dict[int, Any]):
        self.cache, self.attend, self.modules = cache, attend, modules


#: the KIVI caches of live decoders by handle. An operator takes tensors and numbers, not a Python object, so the
#: compiled graph carries the decoder's handle (a tensor input: a new decoder reuses the graph) and the operator
#: looks the cache up here; the decoder removes its entry when it closes
_KIVI: dict[int, _KIVIStep] = {}
_KIVI_HANDLES = itertools.count(1)


def _register_kivi_op() -> None:
    """``torch.ops.longkit.kivi_decode_step``: one layer's decode step on a KIVI cache, eagerly, as an operator the
    compiled graph calls (opaque to dynamo and inductor: no graph break, its shape declared by the fake
    implementation)."""

    @torch.library.custom_op("longkit::kivi_decode_step", mutates_args=())
    def kivi_decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, handle: torch.Tensor,
                         layer: int, scale: float) -> torch.Tensor:  # fmt: skip
        """q (B, H, 1, D) and the step's own key and value (B, H_kv, 1, D) of layer ``layer`` of the cache of
        decoder ``handle``: the layer's ``update`` (the token joins the exact residual), the model's KIVI attention
        (the packed codes read by :func:`longkit.kvcache.kivi_attention.kivi_decode`) and the flush of due groups
        (``finish_step``), exactly as an eager step. Returns (B, 1, H, D) contiguous.

        Side effects on the cache, declared as none (``mutates_args=()``: the cache is no tensor argument): safe
        because the graph calls the operator once per layer per step and consumes its output (the layer's
        ``o_proj`` reads it), so inductor neither drops, repeats nor merges a call, and each call only touches its
        own layer, so the order between layers, which data dependencies fix anyway, does not matter. The key and
        value are copied into the cache's buffers (never kept), so inductor may reuse their memory afterwards."""
        from longkit.kvcache.hook import CACHE_KWARG

        step = _KIVI.get(int(handle))
        if step is None:
            raise MethodError(f"compiled_decode: KIVI decoder {int(handle)} was closed")
        cache = step.cache
        # the attention pre-hook's flag: a compressed cache whose heads differ needs its method's mask
        cache.hooked = True
        keys, values = cache.update(key, value, layer, kwargs={CACHE_KWARG: cache})
        # (B, 1, H, D); one query token without padding: transformers' mask of an eager step is None too
        out, _ = step.attend(step.modules[layer], query, keys, values, None, scaling=scale, **{CACHE_KWARG: cache})
        return out.contiguous()

    @kivi_decode_step.register_fake
    def _(query, key, value, handle, layer, scale):
        B, H, T, _ = query.shape
        return query.new_empty(B, T, H, value.shape[-1])


class _Passthrough:
    """The cache the compiled graph sees in a KIVI decoder: ``update`` returns the step's own key and value, which
    the attention function hands to the operator with the query (the KIVI cache is updated there, outside the
    graph)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return key_states, value_states


def _kivi_step(model: Any, cache: Any) -> _KIVIStep | None:
    """The operator's state for a KIVI ``cache`` (None for any other cache). Raises a MethodError for a KIVI cache
    whose decode steps do more than append, read and flush (an eviction method scoring every step, sliding-window
    layers) or a model whose attention is not KIVI's hook."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longkit.kvcache.hook import WRAPPABLE, KVAttention
    from longkit.kvcache.kivi import KIVICache, KIVICompressedCache, KIVILayer, KIVIRaggedLayer
    from longkit.kvcache.kivi_attention import KIVIAttention

    if isinstance(cache, KIVICache):
        layer_type, hook = KIVILayer, KIVIAttention
    elif isinstance(cache, KIVICompressedCache):
        layer_type, hook = KIVIRaggedLayer, KVAttention
        method = cache.method
        if (
            cache.compressing
            and method is not None
            and (getattr(method, "decode_every", 0) or method.wants_compression(cache, 1))
        ):
            raise MethodError(
                f"compiled_decode: kv method 'kivi' with evict='{method.name}': the eviction method scores every "
                "decoding step (it reads the dequantised cache then); it decodes eagerly (only one-shot eviction "
                "such as snapkv compiles)"
            )
    else:
        return None
    for i, layer in enumerate(cache.layers):
        if type(layer) is not layer_type:
            raise MethodError(
                f"compiled_decode: cache layer {i} is a {type(layer).__name__}; a KIVI cache compiles with "
                f"{layer_type.__name__} layers only (full-attention models)"
            )
        if not layer.is_initialized:
            raise MethodError(f"compiled_decode: layer {i} of the cache is empty; prefill the cache first")
    if len({int(layer.seen) for layer in cache.layers}) != 1:
        raise MethodError("compiled_decode: the cache's layers have seen different numbers of tokens")
    impl = model.config._attn_implementation
    attend = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None
    if not (type(attend) is hook and attend.inner in WRAPPABLE):
        raise MethodError(
            f"compiled_decode: the model's attention implementation is {impl!r}; a KIVI cache compiles under KIVI's "
            "own attention hook on sdpa or eager (longkit.apply(model, kv='kivi...') on such a model), which reads "
            "the packed codes"
        )
    modules = {
        m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
    }
    if set(modules) != set(range(len(cache.layers))):
        raise MethodError(
            f"compiled_decode: the cache has {len(cache.layers)} layers, the model's attention modules {len(modules)}"
        )
    return _KIVIStep(cache, attend, modules)


_GEMV_REGISTERED = False


def _register_gemv_op() -> None:
    """``torch.ops.longkit.gemv``: :func:`longkit.runtime.gemv_native.gemv` as an operator the compiled graph calls
    for the decode step's linear layers (opaque to inductor, which would otherwise prepack the weight for oneDNN)."""
    global _GEMV_REGISTERED
    if _GEMV_REGISTERED:
        return
    _GEMV_REGISTERED = True

    @torch.library.custom_op("longkit::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., d_in) of 1-4 rows, weight (d_out, d_in), bias (d_out,) or None -> (..., d_out)."""
        from longkit.runtime import gemv_native

        if gemv_native.available(x, weight) is True:
            return gemv_native.gemv(x, weight, bias)
        # the kernel is off or cannot build: torch's linear
        return torch.nn.functional.linear(x, weight, bias)

    @gemv.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def _gemv_forward(module: torch.nn.Linear, state: dict):
    """The forward a decoder gives ``module`` for its lifetime: the native GEMV while a step runs (``state["on"]``)
    for at most :data:`~longkit.runtime.gemv_native.MAX_ROWS` rows, the module's own linear otherwise (prefill, or
    any forward outside the decoder's steps)."""
    from longkit.runtime.gemv_native import MAX_ROWS

    def forward(x: torch.Tensor) -> torch.Tensor:
        if state["on"] and x.shape[-1] and x.numel() // x.shape[-1] <= MAX_ROWS:
            return torch.ops.longkit.gemv(x, module.weight, module.bias)
        return torch.nn.functional.linear(x, module.weight, module.bias)

    return forward


def _dense_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
    """Per layer ``(keys, values, valid, seen)`` of a prefilled cache: keys/values (B, H_kv, S, D), validity
    (B, H_kv, S) bool or None when every slot holds a token; ``seen`` the tokens the layer has seen. Raises a
    MethodError for caches whose decoding is not a plain append."""
    from transformers.cache_utils import DynamicLayer

    from longkit.kvcache.cache import CompressedCache
    from longkit.kvcache.grow import GrowingLayer
    from longkit.kvcache.storage import RaggedLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        raise MethodError(f"compiled_decode: parameter 'cache' must be a prefilled transformers Cache (got {type(cache).__name__})")
    if isinstance(cache, CompressedCache):
        method = cache.method
        if getattr(method, "decode_every", 0):
            raise MethodError(
                f"compiled_decode: kv method '{method.name}' compresses during decoding (decode_every="
                f"{method.decode_every}); it decodes eagerly (only methods that compress after prefill compile)"
            )
        if "sliding_attention" in cache.layer_types:
            raise MethodError("compiled_decode: sliding-window layers are not supported (full-attention models only)")
    out = []
    for i, layer in enumerate(layers):
        if type(layer) is RaggedLayer and isinstance(cache, CompressedCache):
            keys, values, valid, _ = layer.padded()
            if layer.last_valid is not None and valid is None:
                valid = layer.last_valid[..., : keys.shape[-2]]
            out.append((keys, values, valid, int(layer.seen)))
        elif type(layer) in (DynamicLayer, GrowingLayer):
            if not layer.is_initialized or layer.keys.numel() == 0:
                raise MethodError(f"compiled_decode: layer {i} of the cache is empty; prefill the cache first")
            out.append((layer.keys, layer.values, None, layer.keys.shape[-2]))
        else:
            raise MethodError(
                f"compiled_decode: cache layer {i} is a {type(layer).__name__}; supported: the seam's default cache, "
                "DynamicCache (full-attention layers) and CompressedCache of methods that compress after prefill only"
            )
    if len({seen for *_, seen in out}) != 1:
        raise MethodError("compiled_decode: the cache's layers have seen different numbers of tokens")
    return out


class CompiledDecoder:
    """Decode steps of ``model`` through one compiled forward on a fixed-capacity copy of a prefilled cache.

    Built by :func:`compiled_decode`; use as a context manager (or call :meth:`close`), which restores the model's
    attention implementation. ``compile_s`` is the time of the first step (compilation included), ``steps`` the
    steps run; ``capacity`` the buffer's slots (None for a KIVI cache, decoded in place) and ``kv_read_bytes`` the KV
    bytes a step reads (the filled slots with native attention, the whole buffer with sdpa; KIVI: the cache's
    bytes after prefill).
    """

    def __init__(self, model: Any, cache: Any, max_new_tokens: int, *, compile: bool = True, freezing: bool = True,
                 bucket: int = BUCKET, attention: str = "auto", options: dict[str, Any] | None = None,
                 linear: str = "torch"):  # fmt: skip
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MethodError(f"compiled_decode: parameter 'max_new_tokens' must be an int >= 1 (got {max_new_tokens!r})")
        if not isinstance(bucket, int) or bucket < 1:
            raise MethodError(f"compiled_decode: parameter 'bucket' must be an int >= 1 (got {bucket!r})")
        if attention not in ATTENTIONS:
            raise MethodError(
                f"compiled_decode: parameter 'attention' must be one of {', '.join(ATTENTIONS)} (got {attention!r})"
            )
        if linear not in LINEARS:
            raise MethodError(
                f"compiled_decode: parameter 'linear' must be one of {', '.join(LINEARS)} (got {linear!r})"
            )
        if options is not None and not isinstance(options, dict):
            raise MethodError(f"compiled_decode: parameter 'options' must be a dict of inductor settings (got {options!r})")
        impl = model.config._attn_implementation
        self.model = model
        self.max_new_tokens = max_new_tokens
        # KIVI: the cache stays KIVI's (its packed storage is what a step reads); each layer's append, quantised read
        # and flush run eagerly in an operator the compiled graph calls (_register_kivi_op)
        self._kivi = _kivi_step(model, cache)
        if self._kivi is not None:
            if attention != "auto":
                raise MethodError(
                    f"compiled_decode: a KIVI cache attends with KIVI's own quantised read; parameter 'attention' "
                    f"must be 'auto' for it (got {attention!r})"
                )
            self._init_kivi(cache)
        else:
            self._init_static(model, cache, max_new_tokens, bucket, impl)
            self.attention = self._choose_attention(attention, model, self.cache)
            self.kv_read_bytes = self._kv_read_bytes()
        self.linear = self._choose_linear(linear, model)
        self.options = dict(options or {})
        self.steps = 0
        self.compile_s: float | None = None
        self.compiled = compile
        self._previous_impl = impl
        _register_attention()
        model.set_attn_implementation(ATTENTION)
        # the native GEMV: each nn.Linear's forward replaced for the decoder's lifetime (restored by close), switched
        # on only inside step(), so that a prefill or an eager forward meanwhile keeps torch's linear
        self._gemv_state = {"on": False}
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        if self.linear == "native":
            _register_gemv_op()
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    self._patched.append((module, module.__dict__.get("forward")))
                    module.forward = _gemv_forward(module, self._gemv_state)
        if self._kivi is not None:
            # registered last: close() releases it, and nothing above may fail after it
            self._handle_id = next(_KIVI_HANDLES)
            _KIVI[self._handle_id] = self._kivi
            # (1,) int64 on the CPU: a graph input (not a constant), so every decoder runs the same compiled graph
            self._handle = torch.tensor([self._handle_id])
        self._closed = False
        forward = model.forward
        if compile:
            # the options also go to torch.compile itself: dynamo reuses a compiled graph for an equal compile call
            # (equal when their options are), so without them a decoder with other settings would run the graph an
            # earlier decoder compiled (they are patched in again where inductor reads them, see step())
            forward = torch.compile(model.forward, dynamic=False, options=self.options or None)
        self._forward = forward
        self.freezing = bool(compile and freezing)

    def _init_static(self, model: Any, cache: Any, max_new_tokens: int, bucket: int, impl: str) -> None:
        """The fixed-capacity copy of a cache of plain keys and values, and its per-layer, per-head mask."""
        from transformers import StaticCache

        # the cache first: its refusal names the method more precisely than its attention function would
        layers = _dense_layers(cache)
        if impl not in REPLACEABLE:
            raise MethodError(
                f"compiled_decode: the model's attention implementation is {impl!r}; the decoder replaces the "
                f"attention during decoding and supports {', '.join(REPLACEABLE)} only (a method that computes "
                "attention its own way decodes eagerly)"
            )
        self.seen = layers[0][3]
        stored = max(k.shape[-2] for k, *_ in layers)
        self.capacity = -(-(stored + max_new_tokens) // bucket) * bucket
        k0 = layers[0][0]
        B = k0.shape[0]
        static = StaticCache(config=model.config, max_cache_len=self.capacity)
        if len(static.layers) != len(layers):
            raise MethodError(
                f"compiled_decode: the cache has {len(layers)} layers, the model {len(static.layers)}"
            )
        # (B, H_kv, 1, capacity): which slots each kv head attends to (filled ones; the step's slot is set before it)
        heads = max(k.shape[1] for k, *_ in layers)
        self.mask = torch.zeros((len(layers), B, heads, 1, self.capacity), dtype=torch.bool, device=k0.device)
        self._slots = []
        for i, ((keys, values, valid, _), layer) in enumerate(zip(layers, static.layers, strict=True)):
            layer.lazy_initialization(keys[..., :1, :], values[..., :1, :])
            # fresh tensors in place of the ones lazy_initialization marked as static addresses: with freezing, inductor
            # folds static-address inputs into the graph as constants, so a later decoder of the same capacity would
            # reuse this one's buffers (its own cache ignored)
            layer.keys, layer.values = torch.zeros_like(layer.keys), torch.zeros_like(layer.values)
            layer.cumulative_length = torch.zeros_like(layer.cumulative_length)
            n = keys.shape[-2]
            layer.keys[..., :n, :].copy_(keys)
            layer.values[..., :n, :].copy_(values)
            # the slot the next token goes to
            layer.cumulative_length.fill_(n)
            self._slots.append(n)
            if valid is None:
                self.mask[i, ..., :n] = True
            else:
                self.mask[i, :, :, 0, :n] = valid
        # (layers,): the slot each layer's next token goes to (layers may store different numbers: PyramidKV)
        self._slots = torch.tensor(self._slots, device=k0.device)
        self._layer_ids = torch.arange(len(layers), device=k0.device)
        self.cache = static

    def _kv_read_bytes(self) -> int:
        """The KV bytes a step reads: the filled slots after prefill (native attention) or the whole buffer."""
        static = self.cache
        if self.attention == "native":
            # the filled slots of every layer after prefill (a step reads those and its own)
            slot_bytes = [2 * layer.keys[..., :1, :].numel() * layer.keys.element_size() for layer in static.layers]
            return sum(b * int(n) for b, n in zip(slot_bytes, self._slots.tolist(), strict=True))
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in static.layers
        )

    def _init_kivi(self, cache: Any) -> None:
        """A KIVI cache decodes in place: the graph sees a pass-through cache and the operator the real one."""
        from longkit.kvcache import cache_nbytes

        self.seen = int(cache.get_seq_length())
        self.cache = cache
        # no fixed-capacity buffer: the packed storage grows as eagerly
        self.capacity = None
        self.attention = "kivi"
        # what a step reads: the packed codes, scales and zeros and the exact residual after prefill
        self.kv_read_bytes = cache_nbytes(cache)
        self._passthrough = _Passthrough()
        layer = cache.layers[0]
        B = layer.q_lengths.shape[0] if layer.packed else layer.keys.shape[0]
        # (B, 1, 1, 1): a prepared mask that transformers passes on untouched (the operator attends unmasked, as an
        # eager step of an unpadded batch)
        self._kivi_mask = torch.ones((B, 1, 1, 1), dtype=torch.bool, device=layer.keys.device)

    @staticmethod
    def _choose_attention(attention: str, model: Any, static: Any) -> str:
        """``native`` where the kernel builds for the cache's shape and dtype (``auto`` falls back to ``sdpa``
        otherwise; ``native`` asked for and unavailable is refused with the reason)."""
        if attention == "sdpa":
            return "sdpa"
        from longkit.kvcache import decode_native

        k = static.layers[0].keys
        heads = model.config.num_attention_heads
        ok = decode_native.available(k.new_empty(k.shape[0], heads, 1, k.shape[-1]), k)
        if ok is True:
            return "native"
        if attention == "native":
            raise MethodError(f"compiled_decode: attention='native' is not available here: {ok}")
        return "sdpa"

    @staticmethod
    def _choose_linear(linear: str, model: Any) -> str:
        """``native`` where the GEMV builds for the model's dtype (``auto`` falls back to ``torch`` otherwise;
        ``native`` asked for and unavailable is refused with the reason)."""
        if linear == "torch":
            return "torch"
        from longkit.runtime import gemv_native

        w = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
        ok = "the model has no nn.Linear" if w is None else gemv_native.available(w[:1], w)
        if ok is True:
            return "native"
        if linear == "native":
            raise MethodError(f"compiled_decode: linear='native' is not available here: {ok}")
        return "torch"

    @torch.inference_mode()
    def inductor_settings(self) -> dict[str, Any]:
        """What inductor is patched with while a step compiles (:func:`_inductor_settings`; none when not compiled)."""
        return _inductor_settings(self.freezing, self.options if self.compiled else {})

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B, 1) ids, return the next-token logits (B, vocab) and advance by one token."""
        if self._closed:
            raise MethodError("compiled_decode: step() after close()")
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise MethodError(f"compiled_decode: parameter 'tokens' must have shape (B, 1) (got {tuple(tokens.shape)})")
        if self.steps >= self.max_new_tokens:
            raise MethodError(
                f"compiled_decode: max_new_tokens={self.max_new_tokens} steps already decoded; build a new decoder"
            )
        if self._kivi is not None:
            # the graph's cache hands each layer's key and value to the operator, which updates the KIVI cache
            inputs = {"attention_mask": self._kivi_mask, "cache": self._passthrough, KIVI_KWARG: self._handle}
        else:
            # the slot each layer writes this step becomes visible (it holds the token's own key and value)
            self.mask[self._layer_ids, :, :, :, self._slots + self.steps] = True
            inputs = {"attention_mask": self.mask[0], "cache": self.cache, MASK_KWARG: self.mask}
            if self.attention == "native":
                # (layers,): the slots filled once this step's token is written (native attention reads those only)
                inputs[LIMIT_KWARG] = self._slots + (self.steps + 1)
        # (B, 1): the token's true position (after an eviction it is past the stored slots)
        position = torch.full((tokens.shape[0], 1), self.seen + self.steps, dtype=torch.long, device=tokens.device)
        t0 = time.perf_counter() if self.steps == 0 else None
        # inductor reads ``freezing`` when it compiles, which is inside this call (the first step, or a recompile);
        # torch.compile(options={"freezing": True}) does not reach it (torch 2.13: the weights stay graph inputs and
        # the linears plain mm)
        # (imported here, not at module level: inductor's config costs seconds of import time for every user of
        # longkit.runtime, and only a compiled decoder needs it)
        from torch._inductor import config as inductor_config

        settings = self.inductor_settings()
        self._gemv_state["on"] = True
        try:
            with inductor_config.patch(**settings) if settings else contextlib.nullcontext():
                out = self._forward(input_ids=tokens, position_ids=position, use_cache=True, **inputs)
        finally:
            self._gemv_state["on"] = False
        if t0 is not None:
            self.compile_s = time.perf_counter() - t0
        self.steps += 1
        return out.logits[:, -1]

    def close(self) -> None:
        """Restore the model's attention implementation and its linear layers' forwards (idempotent)."""
        if not self._closed:
            self._closed = True
            if self._kivi is not None:
                _KIVI.pop(self._handle_id, None)
            self.model.set_attn_implementation(self._previous_impl)
            for module, previous in self._patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            self._patched = []

    def __enter__(self) -> CompiledDecoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _inductor_settings(freezing: bool, options: dict[str, Any]) -> dict[str, Any]:
    """The inductor settings patched while a step compiles. With freezing, linears that read the same input (q/k/v,
    gate/up) become one linear over concatenated weights: 121 linear calls per SmolLM2 step instead of 211, 0.91x the
    step at 8K (quiet A/B, benchmarks/decode/results/compiled_ab_concat_8k_quiet.md); ``options`` can turn it off."""
    return {**({"freezing": True, "cpp.enable_concat_linear": True} if freezing else {}), **options}


def compiled_decode(model: Any, cache: Any, max_new_tokens: int, *, compile: bool = True, freezing: bool = True,
                    bucket: int = BUCKET, attention: str = "auto",
                    options: dict[str, Any] | None = None, linear: str = "torch") -> CompiledDecoder:  # fmt: skip
    """A :class:`CompiledDecoder` for ``model`` continuing from the prefilled ``cache``.

    Parameters: ``max_new_tokens`` >= 1, the steps it may decode (the buffers' capacity is the stored tokens plus
    this, rounded up to ``bucket`` >= 1 slots); ``compile`` False runs the same fixed-capacity steps eagerly (the
    reference the compiled steps are tested against); ``freezing`` (inductor's constant weights and bf16 weight
    prepacking; the compiled step then keeps its own copy of the weights: build a new decoder after changing them);
    ``attention`` one of ``auto`` (default: ``native`` where its kernel builds, else ``sdpa``), ``native`` (the C
    kernel of :mod:`longkit.kvcache.decode_native` over the filled slots only, refused where it cannot build) or
    ``sdpa`` (torch's fused kernel over the whole buffer under the mask); ``options`` more inductor settings patched
    while the step compiles (e.g. ``{"cpp_wrapper": True}``; with ``freezing``, ``cpp.enable_concat_linear`` is on
    unless ``options`` sets it, see the module docstring); ``linear``
    one of ``torch`` (default: the model's nn.Linear layers as they are, prepacked for oneDNN by ``freezing``),
    ``native`` (the C GEMV of :mod:`longkit.runtime.gemv_native` as the operator ``longkit::gemv`` for every
    nn.Linear during the steps, for at most 4 rows; refused where it cannot build) or ``auto`` (``native`` where it
    builds, else ``torch``). The ``cache`` is read, not changed (a KIVI cache excepted: the steps decode it in place,
as eager steps do, with ``attention`` ``auto``). See the module docstring for what is supported.
    """
    return CompiledDecoder(model, cache, max_new_tokens, compile=compile, freezing=freezing, bucket=bucket,
                           attention=attention, options=options, linear=linear)  # fmt: skip
