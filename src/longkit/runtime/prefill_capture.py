"""One prefill, many KV methods: capture a prompt's prefill once, then build each method's compressed cache from it.

A KV method compresses a layer *after* that layer's attention call, so the prefill forward (its logits, every
layer's queries, keys and values) is the same whatever method runs; only what each layer keeps differs. Sweeping
methods and budgets over long prompts (the kvcache benchmark: 40 method/ratio cells per prompt) therefore needs one
prefill per prompt, not one per cell. :func:`capture_prefill` runs the prompt once with the model's plain attention
and records, per attention call, the post-RoPE queries, keys and values and the call's other keyword arguments;
:meth:`Prefill.cache` replays, under an applied KV method, exactly what the real forward does around attention —
``cache.update`` with those arguments, the method's compression — and returns the cache a real prefill would have
left. :meth:`Prefill.generate` then decodes from it with ``model.generate`` (greedy).

    pre = capture_prefill(model, ids)
    for spec in ("snapkv:ratio=0.25", "tova:ratio=0.1"):
        with longkit.apply(model, kv=spec) as applied:
            cache = pre.cache(applied)                     # as after model(ids, cache=applied.new_cache())
            out = pre.generate(cache, max_new_tokens=16)   # == model.generate(ids, cache=..., do_sample=False)

Tested equal to the real path (cache contents, bytes and generated tokens) for every registered KV method.
Limits: batch size 1 without padding, one-shot prefill (not chunked), KV methods on sdpa/eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longkit.errors import MethodError


@dataclass
class _Call:
    module: torch.nn.Module
    #: the attention call's keyword arguments (those the module also passes on to ``cache.update``)
    kwargs: dict[str, Any]
    # (1, H, T, D) post-RoPE queries; (1, H_kv, T, D) keys and values as the attention call saw them
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float


@dataclass
class Prefill:
    """A captured prefill: the prompt, the last position's logits and every attention call's inputs."""

    model: Any
    input_ids: torch.Tensor
    # (1, V) logits of the last prompt position
    logits: torch.Tensor
    calls: list[_Call] = field(default_factory=list)

    def cache(self, applied: Any) -> Any:
        """The cache of ``applied`` (a ``longkit.apply(model, kv=...)`` context, still open) after this prefill."""
        from longkit.kvcache.hook import replay_attention

        if applied.model is not self.model:
            raise MethodError("parameter 'applied': the methods were applied to another model than the captured one")
        impl = str(self.model.config._attn_implementation)
        # longkit_kivi_*: KIVI's quantised-read hook, which attends like the model at a prefill
        if impl not in ("sdpa", "eager") and not impl.startswith(("longkit_kv_", "longkit_kivi_")):
            raise MethodError(
                f"replaying a prefill supports KV methods on sdpa/eager attention only; the model now uses {impl!r}"
            )
        cache = applied.new_cache()
        with torch.inference_mode():
            for call in self.calls:
                module, pos = call.module, call.kwargs.get("position_ids")
                key, value = cache.update(call.key, call.value, module.layer_idx, kwargs=call.kwargs)
                if impl.startswith("longkit_kv_"):
                    replay_attention(cache, module, call.query, key, value, call.attention_mask, call.scaling, pos)
        return cache

    def generate(self, cache: Any, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """(1, T + n) greedy continuation of the prompt from ``cache`` (filled by :meth:`cache`), equal to
        ``model.generate(ids, cache=..., do_sample=False)``; other ``model.generate`` arguments pass through (no
        sampling: the first new token is the argmax of the captured logits)."""
        if max_new_tokens < 1:
            raise MethodError(f"parameter 'max_new_tokens' must be >= 1 (got {max_new_tokens})")
        if kwargs.get("do_sample"):
            raise MethodError("parameter 'do_sample': a replayed prefill decodes greedily only")
        first = self.logits.argmax(-1, keepdim=True).to(self.input_ids.device)
        ids = torch.cat([self.input_ids, first], dim=-1)
        # eos_token_id=None means "no end token", as in model.generate
        eos = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if max_new_tokens == 1 or int(first) in eos_ids:
            return ids
        kwargs.pop("do_sample", None)
        with torch.inference_mode():
            return self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
                **kwargs,
            )


#: the keyword argument through which capture_prefill's pre-hooks hand each attention call its recorder
_RECORDER = "longkit_capture_record"


def _capturing(impl: str):
    """The attention function ``longkit_capture_<impl>``: hand the call to the recorder it carries, then attend.
    It holds no recorder itself, so the registry that keeps it keeps no captured tensors alive."""
    from longkit.kvcache.hook import inner_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        kwargs.pop(_RECORDER)(module, query, key, value, attention_mask, scaling, dict(kwargs))
        return inner_attention(impl)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return attention


def capture_prefill(model: Any, input_ids: torch.Tensor) -> Prefill:
    """Run ``input_ids`` (1, T) through ``model`` once and record what :meth:`Prefill.cache` replays.

    The model must use sdpa or eager attention with no longkit method applied. Memory: the queries, keys, values and
    the attention calls' other arguments of every layer are kept (about 1 GB for a 30-layer 135M model at 8K in bf16).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise MethodError(f"parameter 'input_ids' must have shape (1, T) (got {tuple(input_ids.shape)})")
    if input_ids.shape[1] < 2:
        raise MethodError(f"parameter 'input_ids' must hold at least 2 tokens (got {input_ids.shape[1]})")
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise MethodError(
            f"capture_prefill needs a model on sdpa or eager attention with no method applied (got {impl!r})"
        )
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise MethodError(f"capture_prefill: found no attention modules with a layer_idx in {type(model).__name__}")
    calls: list[_Call] = []

    def record(module, query, key, value, attention_mask, scaling, kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        calls.append(_Call(module, kwargs, query, key, value, attention_mask, scaling))

    def pre_hook(module, args, kwargs):
        return args, {**kwargs, _RECORDER: record}

    name = f"longkit_capture_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(impl))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    model.set_attn_implementation(name)
    try:
        with torch.inference_mode():
            # no cache: the attention calls see exactly the prompt's keys and values, as on a fresh cache
            out = model(input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(impl)
    if len(calls) != len(modules):
        raise MethodError(f"capture_prefill saw {len(calls)} attention calls for {len(modules)} attention modules")
    return Prefill(model=model, input_ids=input_ids, logits=out.logits[:, -1].float(), calls=calls)
