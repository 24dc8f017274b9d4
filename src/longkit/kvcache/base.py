"""KV-cache methods: a method provides the cache object of a generation and/or hooks that compress it.

Methods register under kind ``kv``. The seam asks the last method that returns one for a fresh cache
(:meth:`KVMethod.make_cache`); :func:`cache_nbytes` reports the exact bytes a cache holds.

Compression API (eviction methods derive from :class:`CompressionMethod`):

- ``score(ctx) -> (B, H_kv, S)``: how much each cached token of one layer is worth keeping, from a
  :class:`ScoreContext` (the layer's post-RoPE queries of the current call, the padded cached
  keys/values, which slots are real). ``+inf`` marks tokens that must stay (observation window, sinks).
- ``select(ctx, scores) -> (B, H_kv, S) bool``: the budget. ``ratio`` (keep a fraction of the real tokens seen),
  ``tokens`` (keep a count) or ``threshold`` (keep scores >= it) — see :mod:`longkit.kvcache.budget`. Per-layer budgets
  override :meth:`CompressionMethod.layer_target`; per-head budgets (``adakv``) override ``select``.
- ``decide(ctx) -> Decision | None``: the one value the layer applies: the slots to keep plus, where a method
  provides them, keys moved to new positions (``on_compact``: StreamingLLM), values with the evicted ones merged in
  (``merge_values``: CaM) and per-slot side arrays; None keeps everything.
- When: after every multi-token forward (one-shot after prefill; between chunks in a chunked prefill), and every
  ``decode_every`` decoding steps (0 = never). ``cache.compressing = False`` stops it, which is how
  :func:`longkit.runtime.compress_context` compresses a context once for many questions.

``longkit.apply(model, kv="snapkv:ratio=0.25")`` installs the attention hook; ``applied.new_cache()`` gives the
:class:`~longkit.kvcache.cache.CompressedCache`, which frees the evicted bytes (ragged per-head storage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from longkit.errors import MethodError
from longkit.methods import Method, Undo
from longkit.registry import param

if TYPE_CHECKING:
    from longkit.kvcache.cache import CompressedCache
    from longkit.kvcache.storage import RaggedLayer


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
    #: (B or 1, T) the model's RoPE positions of this call's queries, when its attention module passed them on
    position_ids: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass
class Decision:
    """What one compression step leaves in a layer, in the layout of the padded view the attention call saw.

    ``keep`` (B, H_kv, S) bool: the slots that stay. The others are optional replacements of the view's contents,
    stored for the kept slots: ``keys`` (B, H_kv, S, D) moved to new positions, ``values`` (B, H_kv, S, D) with
    evicted values merged in, ``extras`` the per-slot side arrays (B, H_kv, S) of the layer's ``track``.
    """

    keep: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None


@dataclass
class KVMethod(Method):
    """Base of KV-cache methods: override :meth:`make_cache` and/or :meth:`apply` (forward hooks)."""

    def apply(self, model: Any) -> Undo:
        return lambda: None


def rotary_layer_type(rotary: Any, module: Any) -> str | None:
    """The layer type whose RoPE ``rotary`` applies to the attention ``module`` when the rotary module keeps one per
    type (Gemma 3: ``<type>_inv_freq``, and ``forward(x, position_ids, layer_type)``); None when it keeps one."""
    kind = getattr(module, "layer_type", None)
    if kind is None:
        types = getattr(getattr(module, "config", None), "layer_types", None)
        layer = getattr(module, "layer_idx", None)
        kind = types[layer] if types is not None and layer is not None and layer < len(types) else None
    return kind if kind is not None and hasattr(rotary, f"{kind}_inv_freq") else None


def rotary_inv_freq(rotary: Any, module: Any) -> torch.Tensor | None:
    """The inverse frequencies the attention ``module``'s keys were rotated with (its layer type's, where they
    differ per type), or None for a model without them."""
    kind = rotary_layer_type(rotary, module)
    return getattr(rotary, f"{kind}_inv_freq" if kind else "inv_freq", None)


def cache_nbytes(cache: Any) -> int:
    """Exact bytes of the tensors a cache holds (a cache may define ``nbytes()`` for packed storage)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class CompressionMethod(KVMethod):
    """Base of eviction methods: a scorer plus a budget, applied through a :class:`CompressedCache`.

    Parameters (shared by every eviction method):
    ratio: fraction of the real tokens seen to keep, in (0, 1] (1 keeps everything).
    tokens: keep this many tokens per head instead of a ratio, >= 1 (None = use ratio).
    threshold: keep the tokens whose score is >= threshold instead (None = use tokens/ratio).
    decode_every: during decoding, compress back to the budget every this many steps, >= 0 (0 = never).
    """

    ratio: float = param(0.5, gt=0.0, le=1.0, help="fraction of the real tokens seen to keep")
    tokens: int | None = param(None, ge=1, help="keep this many tokens per head (overrides ratio)")
    threshold: float | None = param(None, help="keep tokens with score >= threshold (overrides tokens/ratio)")
    decode_every: int = param(0, ge=0, help="compress every N decoding steps (0 = only after multi-token forwards)")

    #: per-slot side arrays the cache must keep aligned with the keys ("pos": current RoPE position of each key)
    track: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`merge_values` returns merged values (storage that cannot take them refuses the method)
    merges_values: ClassVar[bool] = False

    # ---- the seam ----------------------------------------------------------------------------------------------

    def apply(self, model: Any) -> Undo:
        from longkit.kvcache.hook import install

        return install(model, self.name)

    def make_cache(self, model: Any) -> Any:
        from longkit.kvcache.cache import CompressedCache

        inner = getattr(model, "model", model)
        return CompressedCache(model.config, self, rotary=getattr(inner, "rotary_emb", None))

    # ---- policy ------------------------------------------------------------------------------------------------

    def wants_compression(self, cache: Any, n_new: int) -> bool:
        """After a multi-token forward always; while decoding every ``decode_every`` steps."""
        if n_new > 1:
            return True
        return self.decode_every > 0 and cache.decode_steps % self.decode_every == 0

    def score(self, ctx: Any) -> torch.Tensor:
        """(B, H_kv, S) float scores; higher = keep. ``+inf`` = always keep."""
        raise NotImplementedError

    def layer_target(self, ctx: Any) -> torch.Tensor:
        """(B,) tokens to keep per head in this layer (PyramidKV overrides this)."""
        from longkit.kvcache.budget import target_tokens

        return target_tokens(ctx.real_seen, ratio=self.ratio, tokens=self.tokens)

    def select(self, ctx: Any, scores: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, S) bool slots to keep under the budget."""
        from longkit.kvcache.budget import keep_threshold, keep_topk

        if self.threshold is not None:
            return keep_threshold(scores, self.threshold)
        return keep_topk(scores, self.layer_target(ctx))

    def compress(self, ctx: Any) -> torch.Tensor | None:
        """The slots to keep after this attention call, or None to keep everything."""
        if self.threshold is None and self.tokens is None and self.ratio >= 1.0:
            return None
        scores = self.score(ctx).float().masked_fill(~ctx.valid, float("-inf"))
        return self.select(ctx, scores) & ctx.valid

    def decide(self, ctx: ScoreContext) -> Decision | None:
        """The slots to keep (:meth:`compress`) with this method's replacements for them; None keeps everything."""
        keep = self.compress(ctx)
        if keep is None:
            return None
        keep = keep & ctx.valid
        values = self.merge_values(ctx, keep)
        keys, extras = self.on_compact(ctx, keep) or (None, None)
        return Decision(keep, keys=keys, values=values, extras=extras)

    def on_compact(self, ctx: Any, keep: torch.Tensor) -> tuple[torch.Tensor | None, dict] | None:
        """Optionally return replacement padded (keys, extras) before the layer drops the other slots (StreamingLLM);
        keys None = not moved."""
        return None

    def merge_values(self, ctx: Any, keep: torch.Tensor) -> torch.Tensor | None:
        """Optionally return replacement padded values ``(B, H_kv, S, D)`` before the layer drops the slots not in
        ``keep`` (merging methods such as CaM fold evicted values into kept ones). Default None: values unchanged."""
        return None


@dataclass
class RunningScoreMethod(CompressionMethod):
    """Base of eviction methods scored by a running statistic of every query's attention (H2O's sums,
    Scissorhands' counters). The statistic lives in the cache beside each key (``acc``, 4 bytes per key and head,
    counted in ``nbytes``) and is updated at every forward, so scoring runs at every step while eviction follows
    ``decode_every``; the newest ``recent`` fraction of the budget is always kept.

    Subclasses declare ``recent`` (a float in [0, 1]) and implement :meth:`update` and :meth:`rank`.
    """

    track: ClassVar[tuple[str, ...]] = ("acc",)

    def wants_compression(self, cache: Any, n_new: int) -> bool:
        # The statistic must see every query; whether to evict is decided in compress.
        return True

    def update(self, ctx: Any) -> torch.Tensor:
        """(B, H_kv, S) the statistic after this call's queries (the cached ``acc`` plus their contribution)."""
        raise NotImplementedError

    def rank(self, stat: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, S) eviction scores from the statistic; higher = keep."""
        raise NotImplementedError

    def score(self, ctx: Any) -> torch.Tensor:
        from longkit.kvcache.budget import target_tokens

        if ctx.scratch is None:
            ctx.scratch = self.update(ctx)
        k = target_tokens(ctx.real_seen, ratio=self.ratio, tokens=self.tokens)
        n_recent = torch.round(k.double() * self.recent).long()
        # (B, H_kv, S) 1 = newest real token
        from_end = ctx.valid.long().flip(-1).cumsum(-1).flip(-1)
        recent = ctx.valid & (from_end <= n_recent.view(-1, 1, 1))
        return torch.where(recent, torch.full_like(ctx.scratch, float("inf")), self.rank(ctx.scratch))

    def compress(self, ctx: Any) -> torch.Tensor | None:
        ctx.scratch = self.update(ctx)
        evict = not ctx.decoding or (self.decode_every > 0 and ctx.cache.decode_steps % self.decode_every == 0)
        keep = super().compress(ctx) if evict else None
        # Without eviction every real slot stays, and on_compact still stores the updated statistic.
        return ctx.valid.clone() if keep is None else keep

    def on_compact(self, ctx: Any, keep: torch.Tensor) -> tuple[torch.Tensor, dict]:
        _, _, _, extras = ctx.layer.view(ctx.keys.shape[-2])
        extras["acc"] = ctx.scratch
        return None, extras


def check_scorer_name(method: str, scorer: str) -> type:
    """The registered eviction method named ``scorer`` (for wrappers such as adakv)."""
    from longkit.registry import registry

    reg = registry("kv")
    names = [
        n
        for n in reg.names()
        if issubclass(reg.get(n), CompressionMethod) and not getattr(reg.get(n), "wrapper", False)
    ]
    if scorer not in names:
        raise MethodError(
            f"kv method '{method}': parameter 'scorer' must be one of {', '.join(names)} (got {scorer!r})"
        )
    return reg.get(scorer)


#: budget parameters a wrapper (adakv) owns; its scorer runs with them at their defaults
_BUDGET_PARAMS = ("ratio", "tokens", "threshold", "decode_every")


def make_scorer(method: str, scorer: str, scorer_args: str = "") -> CompressionMethod:
    """The eviction method ``scorer`` built with ``scorer_args`` (``"key=value;key=value"``, e.g. ``"window=8"``),
    for wrappers that re-budget another method's scores. Budget parameters belong to the wrapper and are refused."""
    from longkit.registry import registry

    check_scorer_name(method, scorer)
    args: dict[str, str] = {}
    for item in (x for x in scorer_args.split(";") if x.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(
                f"kv method '{method}': parameter 'scorer_args' must be 'key=value;key=value' (got {scorer_args!r})"
            )
        if key.strip() in _BUDGET_PARAMS:
            raise MethodError(
                f"kv method '{method}': parameter 'scorer_args' cannot set the budget parameter {key.strip()!r}; "
                f"set it on '{method}' itself"
            )
        args[key.strip()] = value.strip()
    try:
        return registry("kv").create(scorer, args)
    except MethodError as exc:
        raise MethodError(f"kv method '{method}': parameter 'scorer_args': {exc}") from None
