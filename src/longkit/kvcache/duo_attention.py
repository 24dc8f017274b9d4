"""DuoAttention, training-free: retrieval heads (found by a synthetic needle probe) keep the full cache, the rest stream."""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from longkit.errors import MethodError
from longkit.kvcache.base import Decision, KVMethod
from longkit.methods import Undo
from longkit.registry import param, register


class _PerModel(weakref.WeakKeyDictionary):
    """model -> value; shared, not copied, when a cache holding the method is deep-copied (cache.copy())."""

    def __deepcopy__(self, memo: dict) -> _PerModel:
        return self


def _shape(model: Any) -> tuple[int, int, int]:
    """(layers, kv heads, vocabulary size) of a transformers model."""
    text = model.config.get_text_config(decoder=True)
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return int(text.num_hidden_layers), int(kv), int(text.vocab_size)


@dataclass
class Probe:
    """A batch of synthetic retrieval prompts: ``ids`` (B, S); per row the answer queries and the needle slots."""

    ids: torch.Tensor
    # (B, R) positions of the queries that generate the answer (each predicts the next needle value token)
    rows: torch.Tensor
    # (B, N) positions of the needle (key + value tokens) inside the haystack
    cols: torch.Tensor


def build_probe(vocab: int, length: int, probes: int, needle: int, seed: int, exclude: tuple[int, ...] = ()) -> Probe:
    """Random-token haystacks, each with a ``key -> value`` needle at its own depth, then ``key`` and ``value`` again.

    Row ``b`` places the needle at depth ``(b + 0.5) / probes`` of the haystack. The prompt ends with the key
    repeated and the value teacher-forced, so the queries that predict the value tokens are the ones a retrieval
    head serves: they must look the value up in the needle.
    """
    g = torch.Generator().manual_seed(seed)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in exclude if 0 <= i < vocab]] = False
    pool = allowed.nonzero().flatten()
    key_len = max(1, needle // 2)
    val_len = needle - key_len
    hay = length - 2 * needle
    ids, rows, cols = [], [], []
    for b in range(probes):
        tok = pool[torch.randint(0, pool.numel(), (hay + needle,), generator=g)]
        key, value = tok[hay : hay + key_len], tok[hay + key_len :]
        depth = int(round((b + 0.5) / probes * hay))
        seq = torch.cat([tok[:depth], key, value, tok[depth:hay], key, value])
        start = hay + needle  # where the repeated key starts
        ids.append(seq)
        # the last key token predicts value[0]; value[j] predicts value[j + 1]
        rows.append(torch.arange(start + key_len - 1, start + key_len + val_len - 1))
        cols.append(torch.arange(depth, depth + needle))
    return Probe(torch.stack(ids), torch.stack(rows), torch.stack(cols))


class _Capture:
    """The policy of the probe's cache: records the retrieval score of every head, evicts nothing."""

    track: ClassVar[tuple[str, ...]] = ()

    def __init__(self, probe: Probe, num_layers: int):
        self.probe = probe
        self.scores: list[torch.Tensor | None] = [None] * num_layers

    def wants_compression(self, cache: Any, n_new: int) -> bool:
        return n_new > 1

    def decide(self, ctx: Any) -> None:
        rows, cols = self.probe.rows.to(ctx.keys.device), self.probe.cols.to(ctx.keys.device)
        B, H, _, D = ctx.queries.shape
        S = ctx.keys.shape[-2]
        # (B, H, R, D) answer queries; (B, H, S, D) keys repeated for their query heads
        q = torch.gather(ctx.queries.float(), 2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))
        k = ctx.keys.float().repeat_interleave(ctx.groups, dim=1)
        # (B, H, R, S) causal softmax attention of the answer queries, as eager attention computes it
        logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling
        visible = torch.arange(S, device=k.device)[None, None, :] <= rows[:, :, None]
        probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        # (B, H) attention mass on the needle, averaged over the answer queries
        mass = torch.gather(probs, 3, cols[:, None, None, :].expand(B, H, rows.shape[1], cols.shape[1])).sum(-1)
        mass = mass.mean(-1)
        # (H_kv,) averaged over the query heads of each kv head and over the probes
        self.scores[ctx.layer_idx] = mass.view(B, H // ctx.groups, ctx.groups).mean((0, 2)).cpu()
        return None


def save_heads(mask: torch.Tensor, path: str | Path) -> None:
    """Write a (layers, kv heads) bool retrieval-head mask as JSON: ``{"layer": [retrieval kv heads]}``."""
    data = {str(layer): [int(h) for h in row.nonzero().flatten()] for layer, row in enumerate(mask.bool())}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_heads(path: str | Path, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """Read a JSON retrieval-head file (see :func:`save_heads`) into a (layers, kv heads) bool mask for a model."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MethodError(
            f"kv method 'duo_attention': parameter 'heads' must be a readable JSON file ({err})"
        ) from None
    if not isinstance(data, dict):
        raise MethodError("kv method 'duo_attention': parameter 'heads' must hold a JSON object layer -> [kv heads]")
    mask = torch.zeros((num_layers, num_kv_heads), dtype=torch.bool)
    for key, heads in data.items():
        if not str(key).isdigit() or not 0 <= int(key) < num_layers:
            raise MethodError(
                f"kv method 'duo_attention': parameter 'heads' names layer {key!r}; layers are 0..{num_layers - 1}"
            )
        if not isinstance(heads, list) or any(not isinstance(h, int) or not 0 <= h < num_kv_heads for h in heads):
            raise MethodError(
                f"kv method 'duo_attention': parameter 'heads' layer {key}: kv heads must be a list of integers in "
                f"0..{num_kv_heads - 1} (got {heads!r})"
            )
        mask[int(key), heads] = True
    return mask


@register("kv", "duo_attention")
@dataclass
class DuoAttention(KVMethod):
    """DuoAttention (training-free): retrieval heads keep the full cache, streaming heads keep sinks + a window.

    A synthetic probe finds the retrieval heads: random-token haystacks hide a ``key -> value`` needle at several
    depths and end with the key again and the value teacher-forced. Each (layer, kv head) is scored by the
    attention mass the answer-generating queries put on the needle (mean over the answer queries, the query
    heads of the kv head and the probes); the top ``retrieval_ratio`` fraction of heads are retrieval heads. The
    paper learns these gates by optimisation; here the probe replaces the training. After every multi-token
    forward, and every ``decode_every`` decoding steps, the other (streaming) heads drop everything but the
    first ``sinks`` and the last ``window`` real tokens. Heads then hold different numbers of tokens, and the
    cache stores them ragged, so the streaming heads' bytes are freed. Streaming heads keep their keys at their
    original positions (as DuoAttention's streaming heads do), with no re-rotation.
    Based on Xiao et al. 2024, DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
    Heads (https://arxiv.org/abs/2410.10819).

    Parameters: retrieval_ratio in [0, 1] (fraction of kv heads that keep everything; 1 = no compression);
    sinks >= 0; window >= 1; heads (JSON file layer -> retrieval kv heads; skips the probe and retrieval_ratio);
    decode_every >= 0 (0 = streaming heads grow while decoding); probe_tokens >= 32, probes >= 1,
    needle >= 2 (probe size); seed >= 0 (probe tokens).
    """

    paper = (
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads "
        "(Xiao et al. 2024) https://arxiv.org/abs/2410.10819"
    )
    track: ClassVar[tuple[str, ...]] = ()

    retrieval_ratio: float = param(0.25, ge=0.0, le=1.0, help="fraction of kv heads that keep the full cache")
    sinks: int = param(4, ge=0, help="attention-sink tokens streaming heads keep at the start")
    window: int = param(256, ge=1, help="recent tokens streaming heads keep")
    heads: str | None = param(None, file=True, help="JSON file layer -> list of retrieval kv heads (skips the probe)")
    decode_every: int = param(1, ge=0, help="evict streaming heads every N decoding steps (0 = only after prefill)")
    probe_tokens: int = param(256, ge=32, help="length of each probe prompt")
    probes: int = param(4, ge=1, help="probe prompts (needle depths)")
    needle: int = param(8, ge=2, help="needle tokens (half key, half value)")
    seed: int = param(0, ge=0, help="seed of the probe's random tokens")
    #: model -> (layers, kv heads) bool retrieval-head mask, filled by calibrate()
    _masks: Any = field(default_factory=_PerModel, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if 2 * self.needle + self.probes > self.probe_tokens:
            raise MethodError(
                f"kv method '{self.name}': parameter 'probe_tokens' must be >= 2 * needle + probes "
                f"= {2 * self.needle + self.probes} (got {self.probe_tokens})"
            )

    # ---- finding the retrieval heads ---------------------------------------------------------------------------

    def probe_scores(self, model: Any, tokenizer: Any = None) -> torch.Tensor:
        """(layers, kv heads) float32 retrieval scores from the synthetic probe (deterministic for a seed)."""
        from longkit.kvcache.cache import CompressedCache
        from longkit.kvcache.hook import install

        num_layers, _, vocab = _shape(model)
        special = tuple(getattr(tokenizer, "all_special_ids", None) or ())
        probe = build_probe(vocab, self.probe_tokens, self.probes, self.needle, self.seed, special)
        capture = _Capture(probe, num_layers)
        impl = model.config._attn_implementation
        # Already applied (make_cache after apply): the hook is in place and serves any CompressedCache.
        undo = (lambda: None) if str(impl).startswith("longkit_kv_") else install(model, self.name)
        try:
            device = next(model.parameters()).device
            inner = getattr(model, "model", model)
            cache = CompressedCache(model.config, capture, rotary=getattr(inner, "rotary_emb", None))
            with torch.no_grad():
                model(probe.ids.to(device), cache=cache, use_cache=True)
        finally:
            undo()
        if any(s is None for i, s in enumerate(capture.scores) if cache.compressed(i)):
            raise MethodError(f"kv method '{self.name}': the probe saw no attention call in some layers")
        num_kv = next(s for s in capture.scores if s is not None).shape[0]
        # Sliding-window layers are never compressed (their window bounds them): -inf keeps them out of the ranking.
        return torch.stack([s if s is not None else torch.full((num_kv,), float("-inf")) for s in capture.scores])

    def calibrate(self, model: Any, tokenizer: Any = None) -> torch.Tensor:
        """(layers, kv heads) bool mask of the retrieval heads of ``model``: from ``heads`` or from the probe.

        Cached per model on this method instance.
        """
        if model in self._masks:
            return self._masks[model]
        num_layers, num_kv, _ = _shape(model)
        if self.heads is not None:
            mask = load_heads(self.heads, num_layers, num_kv)
        else:
            scores = self.probe_scores(model, tokenizer).flatten()
            # the ratio counts the heads of the compressed (full-attention) layers only
            n = math.floor(self.retrieval_ratio * int(torch.isfinite(scores).sum()) + 0.5)
            n = max(n, 1) if self.retrieval_ratio > 0 else 0
            # ties go to the earlier head, so the choice is deterministic
            order = torch.sort(scores, descending=True, stable=True).indices
            mask = torch.zeros(scores.numel(), dtype=torch.bool)
            mask[order[:n]] = True
            mask = mask.view(num_layers, num_kv)
        self._masks[model] = mask
        return mask

    def save(self, model: Any, path: str | Path) -> None:
        """Write the retrieval heads of ``model`` as a JSON file usable as ``heads=FILE``."""
        save_heads(self.calibrate(model), path)

    # ---- the seam ----------------------------------------------------------------------------------------------

    def apply(self, model: Any) -> Undo:
        from longkit.kvcache.hook import install

        self.calibrate(model)
        return install(model, self.name)

    def make_cache(self, model: Any) -> Any:
        from longkit.kvcache.cache import CompressedCache

        inner = getattr(model, "model", model)
        cache = CompressedCache(model.config, self, rotary=getattr(inner, "rotary_emb", None))
        # (layers, kv heads) bool: which heads of this cache keep everything
        cache.retrieval_heads = self.calibrate(model).clone()
        return cache

    # ---- policy (called by the cache's attention hook) ---------------------------------------------------------

    def wants_compression(self, cache: Any, n_new: int) -> bool:
        if n_new > 1:
            return True
        return self.decode_every > 0 and cache.decode_steps % self.decode_every == 0

    def decide(self, ctx: Any) -> Decision | None:
        """Keep everything on retrieval heads, sinks + window on streaming heads (slots of the view, (B, H_kv, S))."""
        # (H_kv,) bool
        retrieval = ctx.cache.retrieval_heads[ctx.layer_idx].to(ctx.valid.device)
        if bool(retrieval.all()):
            return None
        # (B, H_kv, S) 1-based rank of each real slot in order of arrival, and real slots per head
        order = ctx.valid.long().cumsum(-1)
        count = order[..., -1:]
        stream = ctx.valid & ((order <= self.sinks) | (order > count - self.window))
        return Decision(torch.where(retrieval[None, :, None], ctx.valid, stream))
