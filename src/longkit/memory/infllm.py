"""InfLLM (Xiao et al. 2024): training-free block memory for long contexts.

Every query attends to (1) the initial tokens, (2) a local window of the ``n_local`` most recent tokens and
(3) the ``topk`` memory blocks most relevant to its execution chunk. The context is processed in execution
chunks of ``exec_chunk`` tokens; tokens that leave the local window become the initial tokens (the first
``n_init``) or, ``block_size`` at a time, memory blocks. A block is represented by the mean key of its
``repr_topk`` tokens that received the most attention from the local window's queries (per head); a chunk
scores a block by the dot product of its mean query with the representative key, summed over the heads
(thunlp/InfLLM ``ContextManager``: ``VectorTensor.get_topk`` over the heads' concatenated vectors).

Positions, as the reference: local keys keep their true relative positions; every key beyond the window
(initial tokens, retrieved blocks and the not-yet-full block) is seen at the fixed distance ``n_local - 1``
(the reference rotates the query with its table's row ``n_local - 1`` and keeps far keys unrotated). The
model rotates queries and keys at their true positions before the attention function runs, so far keys are
moved back to position 0 with :func:`longkit.rope.rotation.rotate_by` when they leave the window, and the
queries of the far part are moved to position ``n_local - 1``.

Working set: the cache keeps, per layer, the initial tokens, the tokens not yet in a block (at most
``n_local + block_size - 1`` between forwards) and one representative key per block on the compute device;
the blocks' keys and values live on ``offload`` (CPU by default) and only the selected ``topk`` are brought
to the compute device for a chunk. Per query at most ``n_init + topk * block_size + n_local + block_size +
exec_chunk - 1`` keys are attended (the last two terms: tokens beyond the window that do not fill a block
yet, as the reference's global buffer), whatever the context length.

One deliberate difference from the reference: its mask of the not-yet-full block is offset by the whole
input length (``global_remainder[0].size(-2)``), which lets a chunk's early queries also see, at the far
position, up to ``exec_chunk - 1`` tokens they already see in their local window; here every token is seen
once, locally when it is closer than ``n_local`` and at the far position otherwise, as the paper defines.
Not implemented: the reference's GPU cache of recently loaded blocks (``max_cached_block``, LRU); blocks are
loaded afresh for each chunk.

Models whose layers differ (Gemma 3: five of six layers sliding-window attention, RoPE given per layer type): the
block memory runs on the full-attention layers, with the far position rotated by those layers' own frequencies
(``full_attention_inv_freq``, read when the layer runs, so a RoPE method applied first is honoured). A
sliding-window layer keeps the model's own attention over its window at the true positions, and its cache is
transformers' ``DynamicSlidingWindowLayer`` (the last ``window - 1`` tokens): its cost and its positions are
already bounded by the window, and InfLLM's memory there would let it see beyond the window it was trained with.
Other layer kinds (chunked or linear attention) are refused, and so is a model with no full-attention layer.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from longkit.attention.base import BoundAttention, check_qkv, find_rotary, layer_inv_freq
from longkit.errors import MethodError
from longkit.memory.base import MemoryMethod
from longkit.methods import Undo
from longkit.registry import param, register
from longkit.rope.rotation import rotate_by


@register("memory", "infllm")
@dataclass
class InfLLM(MemoryMethod):
    """InfLLM: initial tokens + local window + top-k memory blocks chosen by representative tokens (on a model
    whose layers differ, in its full-attention layers; sliding-window layers keep their window)."""

    paper = "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory (https://arxiv.org/abs/2402.04617)"
    keeps_cache = True
    # The reference's generation loop (inf_llm/utils/greedy_search.py) prefills all but the last prompt token and
    # runs that one alone: the first answer token comes from the blocks the last token's own query retrieves, not
    # from the mean query of a 512-token chunk of the haystack's tail.
    prefill_last_token_alone = True

    block_size: int = param(128, ge=1, help="tokens per memory block")
    n_init: int = param(128, ge=0, help="initial tokens always attended")
    n_local: int = param(4096, ge=1, help="local window (most recent tokens, true relative positions)")
    topk: int = param(16, ge=1, help="memory blocks retrieved per execution chunk")
    repr_topk: int = param(4, ge=1, help="representative tokens per block (most attended by local queries)")
    exec_chunk: int = param(512, ge=1, help="queries processed together (share one block selection); <= n_local")
    offload: str = param("cpu", choices=("cpu", "none"), help="where memory blocks live: CPU memory, or none (compute device)")
    impl: str = param("flash", choices=("flash", "reference"),
                      help="chunk attention: fused flash calls (CPU; elsewhere the reference) or the float32 reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.exec_chunk > self.n_local:
            # A chunk's queries must all see the chunk's own keys in the local window (the reference asserts it).
            self.fail("exec_chunk", f"must be <= n_local = {self.n_local} (got {self.exec_chunk})")
        if self.repr_topk > self.block_size:
            self.fail("repr_topk", f"must be <= block_size = {self.block_size} (got {self.repr_topk})")

    def keys_per_query_bound(self) -> int:
        """The most keys one query attends to, whatever the context length (see the module docstring)."""
        return self.n_init + self.topk * self.block_size + self.n_local + self.block_size + self.exec_chunk - 1

    def check_model(self, model: Any) -> tuple[Any, str]:
        """The (parent, attribute) of the model's one rotary module; refuses models InfLLM cannot run on."""
        found = find_rotary(model)
        if len(found) != 1:
            raise MethodError(
                f"memory method '{self.name}' needs a model with one rotary embedding module (RoPE); "
                f"{type(model).__name__} has {len(found)}"
            )
        types = layer_types(model)
        kinds = sorted(set(types) - {"full_attention", "sliding_attention"})
        if kinds:
            raise MethodError(
                f"memory method '{self.name}' supports full-attention and sliding-window layers only; this model has "
                f"{', '.join(kinds)} layers"
            )
        if "full_attention" not in types:
            raise MethodError(
                f"memory method '{self.name}': every layer of this model is a sliding-window layer, already bounded "
                "by its window; there is no full-attention layer for the block memory"
            )
        return found[0]

    def apply(self, model: Any) -> Undo:
        rotary = self.check_model(model)
        impl = getattr(model.config, "_attn_implementation", "")
        if isinstance(impl, str) and impl.startswith("longkit_"):
            # InfLLM is an attention function of its own: it would silently replace the other method's.
            raise MethodError(
                f"memory method '{self.name}' replaces the attention function; it cannot be combined with the "
                f"attention method already applied ({impl})"
            )
        attn = _InfLLMAttention()
        attn._owner = self
        return attn.bind(model, rotary)

    def make_cache(self, model: Any) -> InfLLMCache:
        return InfLLMCache(model.config, self)


def layer_types(model_or_config: Any) -> list[str]:
    """The ``config.layer_types`` entry of every decoder layer (inferred by transformers where the config has none)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = getattr(model_or_config, "config", model_or_config)
    return list(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])


# ---- the per-layer state: initial tokens, recent tokens, block store ---------------------------------------------


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, N, D) -> (B, H_kv * groups, N, D): key/value heads shared by groups of query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class InfLLMState:
    """One layer's memory. Sequence indices count tokens (the distances of the local window); rotary positions
    come from the model's ``position_ids`` (what the keys were rotated with)."""

    def __init__(self, cfg: InfLLM):
        self.cfg = cfg
        self.seen = 0
        # Tokens not yet initial or in a block, as the model rotated them: sequence indices rstart, rstart+1, ...
        self.rk: torch.Tensor | None = None  # (B, H_kv, R, D)
        self.rv: torch.Tensor | None = None
        self.rpos: torch.Tensor | None = None  # (R,) rotary positions
        self.rscore: torch.Tensor | None = None  # (B, H, R) float32 attention received from local queries
        self.rstart = 0
        self.init_k: torch.Tensor | None = None  # (B, H_kv, I, D) at position 0
        self.init_v: torch.Tensor | None = None
        self.block_k: list[torch.Tensor] = []  # each (B, H_kv, block_size, D) at position 0, on the offload device
        self.block_v: list[torch.Tensor] = []
        self.repr: torch.Tensor | None = None  # (B, H, n_blocks, D) float32 representative keys
        # Diagnostics the tests read: the most keys one query attended, and the blocks each chunk attended (B, k).
        self.max_keys_per_query = 0
        self.selections: list[torch.Tensor] = []

    def n_blocks(self) -> int:
        return len(self.block_k)

    def device_tokens(self) -> int:
        """Key/value tokens held on the compute device between forwards (blocks excluded)."""
        n = 0 if self.rk is None else self.rk.shape[-2]
        return n + (0 if self.init_k is None else self.init_k.shape[-2])

    def nbytes(self) -> int:
        ts = [self.rk, self.rv, self.init_k, self.init_v, self.repr, self.rscore, *self.block_k, *self.block_v]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def working_set_nbytes(self) -> int:
        """Bytes of the initial and recent tokens' keys, values and scores (blocks and representative keys excluded)."""
        ts = [self.rk, self.rv, self.init_k, self.init_v, self.rscore]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ---- forward ----

    def forward(self, q, k, v, pos, scaling: float, inv_freq: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) output for the new queries q (B, H, T, D) and their keys/values (B, H_kv, T, D) rotated at
        rotary positions ``pos`` (T,), in execution chunks."""
        T = q.shape[2]
        outs = []
        for st in range(0, T, self.cfg.exec_chunk):
            ed = min(st + self.cfg.exec_chunk, T)
            outs.append(self._chunk(q[:, :, st:ed], k[:, :, st:ed], v[:, :, st:ed], pos[st:ed], scaling, inv_freq))
        return torch.cat(outs, dim=2)

    def _append_recent(self, k, v, pos) -> None:
        B, H_kv, T, D = k.shape
        if self.rk is None:
            self.rk, self.rv, self.rpos = k, v, pos
            self.rscore = torch.zeros(B, self.H, 0, device=k.device, dtype=torch.float32)
        else:
            self.rk, self.rv = torch.cat([self.rk, k], 2), torch.cat([self.rv, v], 2)
            self.rpos = torch.cat([self.rpos, pos])
        self.rscore = torch.cat([self.rscore, self.rscore.new_zeros(B, self.H, T)], 2)

    def select(self, qg: torch.Tensor) -> torch.Tensor | None:
        """(B, k) indices of the blocks chunk queries qg (B, H, T, D, at the far position) retrieve; None = all."""
        if self.n_blocks() <= self.cfg.topk:
            return None
        score = block_scores(qg, self.repr)
        return score.topk(self.cfg.topk, dim=-1).indices.sort(dim=-1).values

    def _chunk(self, q, k, v, pos, scaling, inv_freq) -> torch.Tensor:
        cfg = self.cfg
        B, H, Tc, D = q.shape
        self.H = H
        self._append_recent(k, v, pos)
        R = self.rk.shape[2]
        dev = q.device
        # Every layer of a forward sees the same window: its masks are built once (see ChunkWindow).
        win = chunk_window(self.seen, self.rstart, R, Tc, cfg.n_local, dev)
        local, n_far = win.local, win.n_far

        # The far part: the query moved to position n_local - 1, the keys at position 0.
        qg = rotate_by(q.float(), pos, torch.full_like(pos, cfg.n_local - 1, dtype=torch.float32), inv_freq)
        sel = self.select(qg.mean(dim=2))
        self.selections.append(torch.arange(self.n_blocks()).expand(B, -1) if sel is None else sel.cpu())
        gk, gv = [], []
        if self.init_k is not None:
            gk.append(self.init_k)
            gv.append(self.init_v)
        if self.n_blocks():
            bk, bv = self._load(sel, dev)
            gk.append(bk)
            gv.append(bv)
        n_fixed = sum(t.shape[2] for t in gk)
        if n_far:
            gk.append(rotate_by(self.rk[:, :, :n_far], self.rpos[:n_far], torch.zeros_like(self.rpos[:n_far]), inv_freq))
            gv.append(self.rv[:, :, :n_far])
        far = (torch.cat(gk, 2), torch.cat(gv, 2)) if gk else None  # (B, H_kv, G, D)
        visible = win.visible(n_fixed)
        self.max_keys_per_query = max(self.max_keys_per_query, win.max_keys(n_fixed))

        if self.cfg.impl == "flash" and _flash_usable(q):
            out, score = _attend_flash(q, qg, self.rk, self.rv, far, local, visible, scaling, win.additive(n_fixed))
        else:
            out, score = _attend_reference(q, qg, self.rk, self.rv, far, local, visible, scaling)
        # Representative tokens are the ones the local window's queries attend most (summed over the queries).
        self.rscore = self.rscore + score
        self.seen += Tc
        self._retire(inv_freq)
        return out.to(q.dtype)

    def _load(self, sel: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected blocks' keys and values on the compute device: (B, H_kv, k * block_size, D)."""
        if sel is None:
            return torch.cat(self.block_k, 2).to(dev), torch.cat(self.block_v, 2).to(dev)
        ks, vs = [], []
        for b, idx in enumerate(sel.tolist()):
            ks.append(torch.cat([self.block_k[i][b : b + 1] for i in idx], 2))
            vs.append(torch.cat([self.block_v[i][b : b + 1] for i in idx], 2))
        return torch.cat(ks, 0).to(dev, non_blocking=True), torch.cat(vs, 0).to(dev, non_blocking=True)

    def _retire(self, inv_freq: torch.Tensor) -> None:
        """Move recent tokens beyond the window to the initial tokens, then whole blocks to the store."""
        cfg = self.cfg
        R = self.rk.shape[2]
        n_init = 0 if self.init_k is None else self.init_k.shape[2]
        if n_init < cfg.n_init and R > cfg.n_local:
            take = min(cfg.n_init - n_init, R - cfg.n_local)
            k0, v0 = self._pop(take, inv_freq)
            self.init_k = k0 if self.init_k is None else torch.cat([self.init_k, k0], 2)
            self.init_v = v0 if self.init_v is None else torch.cat([self.init_v, v0], 2)
            R -= take
        while R - cfg.block_size >= cfg.n_local:
            score = self.rscore[:, :, : cfg.block_size]
            k0, v0 = self._pop(cfg.block_size, inv_freq)
            rep = representative_keys(k0, score, cfg.repr_topk)[:, :, None]
            self.repr = rep if self.repr is None else torch.cat([self.repr, rep], 2)
            store = k0.device if cfg.offload == "none" else torch.device("cpu")
            self.block_k.append(k0.to(store))
            self.block_v.append(v0.to(store))
            R -= cfg.block_size

    def _pop(self, n: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the n oldest recent tokens; their keys moved to position 0, and their values."""
        k0 = rotate_by(self.rk[:, :, :n], self.rpos[:n], torch.zeros_like(self.rpos[:n]), inv_freq)
        v0 = self.rv[:, :, :n]
        self.rk, self.rv = self.rk[:, :, n:].contiguous(), self.rv[:, :, n:].contiguous()
        self.rpos, self.rscore = self.rpos[n:], self.rscore[:, :, n:]
        self.rstart += n
        return k0.contiguous(), v0.contiguous()


def representative_keys(k0: torch.Tensor, score: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """(B, H, D) float32 representative key of one block: per query head, the mean of the keys k0 (B, H_kv, n, D)
    of its ``repr_topk`` tokens with the highest ``score`` (B, H, n)."""
    groups = score.shape[1] // k0.shape[1]
    idx = score.topk(repr_topk, dim=-1).indices  # (B, H, r)
    kh = _expand(k0, groups).float()
    picked = torch.gather(kh, 2, idx[..., None].expand(*idx.shape, kh.shape[-1]))
    return picked.mean(dim=2)


def block_scores(q_mean: torch.Tensor, repr: torch.Tensor) -> torch.Tensor:
    """(B, n_blocks) relevance: the chunk's mean query (B, H, D) times each block's representative key
    (B, H, n_blocks, D), summed over the heads."""
    return torch.einsum("bhd,bhnd->bn", q_mean.float(), repr.float())


class ChunkWindow:
    """The masks of one execution chunk: ``local`` (Tc, R) (key within ``n_local`` tokens before the query, causal),
    ``far`` (Tc, R) (beyond the window), ``n_far`` (the oldest recent tokens some query sees far), and, for
    ``n_fixed`` initial and retrieved tokens, ``visible(n_fixed)`` (Tc, n_fixed + n_far) and the additive float
    masks the flash path takes. The same for every layer of a forward (same tokens seen, same window), so
    :func:`chunk_window` builds them once per chunk instead of once per layer."""

    def __init__(self, seen: int, rstart: int, R: int, Tc: int, n_local: int, device: torch.device):
        qi = seen + torch.arange(Tc, device=device)  # sequence indices of the queries
        kj = rstart + torch.arange(R, device=device)  # of the recent keys
        dist = qi[:, None] - kj[None, :]  # (Tc, R)
        self.local = (dist >= 0) & (dist < n_local)
        self.far = dist >= n_local
        self.n_far = int(self.far.any(0).sum())
        self._local_keys = self.local.sum(1)  # (Tc,)
        self._memo: dict = {}

    def visible(self, n_fixed: int) -> torch.Tensor:
        key = ("visible", n_fixed)
        if key not in self._memo:
            ones = torch.ones(self.local.shape[0], n_fixed, dtype=torch.bool, device=self.local.device)
            self._memo[key] = torch.cat([ones, self.far[:, : self.n_far]], 1)
        return self._memo[key]

    def max_keys(self, n_fixed: int) -> int:
        """The most keys one query of the chunk attends (local + far)."""
        key = ("max_keys", n_fixed)
        if key not in self._memo:
            self._memo[key] = int((self._local_keys + self.visible(n_fixed).sum(1)).max())
        return self._memo[key]

    def additive(self, n_fixed: int) -> Callable[[str, torch.dtype, int], torch.Tensor | None]:
        """``get(name, dtype, groups)``: the additive masks of :func:`_attend_flash`, built once per dtype and group
        count: "local" (groups * Tc, R) tiled per packed head, "local_T" (R, Tc), "far" (groups * Tc, G) or None
        when every query sees every far key."""

        def get(name: str, dtype: torch.dtype, groups: int) -> torch.Tensor | None:
            key = (name, n_fixed if name == "far" else None, dtype, groups if name != "local_T" else 1)
            if key not in self._memo:
                self._memo[key] = _masks_of(self.local, self.visible(n_fixed))(name, dtype, groups)
            return self._memo[key]

        return get


@functools.lru_cache(maxsize=2)
def chunk_window(seen: int, rstart: int, R: int, Tc: int, n_local: int, device: torch.device) -> ChunkWindow:
    """The :class:`ChunkWindow` of a chunk, shared by the layers of one forward (the last two kept: a model's
    layers run one chunk at a time)."""
    return ChunkWindow(seen, rstart, R, Tc, n_local, device)


# ---- a chunk's attention: the plain reference and the fused path ------------------------------------------------


def _attend_reference(q, qg, rk, rv, far, local, visible, scaling):
    """One chunk's attention in float32, every logit materialised (the reference the fused path is tested against).

    q (B, H, Tc, D): queries at their positions; qg: the same (float32) at the far position; rk, rv (B, H_kv, R, D):
    the recent tokens; far: (keys, values) (B, H_kv, G, D) beyond the window (initial tokens, retrieved blocks, far
    recent tokens) or None; local (Tc, R) and visible (Tc, G) bool masks. Returns the output (B, H, Tc, D) float32
    and each recent token's attention summed over the chunk's queries, (B, H, R) float32 (one softmax over the local
    and far keys together)."""
    groups = q.shape[1] // rk.shape[1]
    R = rk.shape[2]
    logits_local = torch.matmul(q.float(), _expand(rk, groups).float().transpose(-1, -2)) * scaling
    logits_local.masked_fill_(~local, float("-inf"))
    if far is None:
        logits_far = logits_local.new_zeros(*logits_local.shape[:-1], 0)
    else:
        logits_far = torch.matmul(qg, _expand(far[0], groups).float().transpose(-1, -2)) * scaling
        logits_far.masked_fill_(~visible, float("-inf"))
    p = torch.softmax(torch.cat([logits_local, logits_far], dim=-1), dim=-1)
    p_local, p_far = p[..., :R], p[..., R:]
    out = torch.matmul(p_local, _expand(rv, groups).float())
    if far is not None:
        out = out + torch.matmul(p_far, _expand(far[1], groups).float())
    return out, p_local.sum(dim=2)


#: torch's CPU flash attention that also returns the log-sum-exp of every query row (what merging two softmax parts
#: and the representative scores need); absent from a build, the reference runs.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_usable(q: torch.Tensor) -> bool:
    return _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask as the additive float mask flash attention takes (0 visible, -inf hidden)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _masks_of(local: torch.Tensor, visible: torch.Tensor) -> Callable[[str, torch.dtype, int], torch.Tensor | None]:
    """The additive masks of :func:`_attend_flash` from the bool masks, built on each call (:meth:`ChunkWindow.additive`
    keeps them per chunk)."""

    def get(name: str, dtype: torch.dtype, groups: int) -> torch.Tensor | None:
        if name == "local":
            return _additive(local, dtype).repeat(groups, 1)
        if name == "local_T":
            return _additive(local.T, dtype)
        return None if bool(visible.all()) else _additive(visible, dtype).repeat(groups, 1)

    return get


def _attend_flash(q, qg, rk, rv, far, local, visible, scaling, masks=None):
    """The same chunk attention as :func:`_attend_reference` without materialising a float32 logit matrix: three
    calls of torch's CPU flash attention in the model's dtype (AMX bf16 where present), float32 accumulation inside.

    1. local part: the query heads of each key/value head packed along the sequence (K and V read once, not
       repeated), the (Tc, R) window mask tiled per head; 2. far part: the same with the far-position queries;
    3. the two merged by their log-sum-exps (one softmax over both parts). The recent tokens' summed attention
       sum_i p_ij = sum_i exp(s q_i . k_j - lse_i) is a flash call with the roles swapped (keys as queries, queries as
       keys), the bias -lse_i folded into one extra channel: its log-sum-exp per key is log of the sum.
    Outputs equal the reference within float32 rounding (bf16: within the rounding of the inputs)."""
    B, H, Tc, D = q.shape
    H_kv, R = rk.shape[1], rk.shape[2]
    groups = H // H_kv
    dt = q.dtype
    if masks is None:  # called on its own (the tests): the additive masks from these bool masks
        masks = _masks_of(local, visible)
    # (B, H_kv, groups * Tc, D): query head h = kv * groups + j uses kv head h // groups (repeat_interleave's order).
    qp = q.reshape(B, H_kv, groups * Tc, D)
    o1, l1 = _FLASH_CPU(qp, rk.to(dt), rv.to(dt), 0.0, False, attn_mask=masks("local", dt, groups), scale=scaling)
    l1 = l1.float()
    if far is None:
        out, lse = o1.float(), l1
    else:
        qgp = qg.to(dt).reshape(B, H_kv, groups * Tc, D)
        o2, l2 = _FLASH_CPU(qgp, far[0].to(dt), far[1].to(dt), 0.0, False, attn_mask=masks("far", dt, groups),
                            scale=scaling)
        # A row that sees no far key: flash returns output 0 and log-sum-exp 0; its far weight must be 0.
        has_far = visible.any(1).repeat(groups)  # (groups * Tc,)
        l2 = torch.where(has_far, l2.float(), float("-inf"))
        mx = torch.maximum(l1, l2)
        w1, w2 = (l1 - mx).exp(), (l2 - mx).exp()
        den = w1 + w2
        out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / den[..., None]
        lse = mx + den.log()
    out = out.reshape(B, H, Tc, D)
    lse = lse.reshape(B, H, Tc)

    # Summed attention per recent token. (B, H, R, D + P) keys-as-queries [k_j, 1, 1, 0...] against (B, H, Tc, D + P)
    # queries-as-keys [q_i, b_hi, b_lo, 0...] with b_hi + b_lo = -(lse_i - c) / s: s * dot = s q_i . k_j - lse_i + c.
    # c = the row's max lse keeps the bias small; the bias split in two parts keeps it exact to ~2^-16 in bf16, so
    # the scores rank the tokens as the float32 reference does. P pads the extra channels to a multiple of 8.
    P = 8
    c = lse.amax(dim=-1, keepdim=True)  # (B, H, 1)
    bias = -(lse - c) / scaling
    b_hi = bias.to(dt)
    kq = q.new_zeros(B, H, R, D + P)
    kq[..., :D] = _expand(rk.to(dt), groups)
    kq[..., D : D + 2] = 1
    qk = q.new_zeros(B, H, Tc, D + P)
    qk[..., :D] = q
    qk[..., D] = b_hi
    qk[..., D + 1] = (bias - b_hi.float()).to(dt)
    _, ls = _FLASH_CPU(kq, qk, qk, 0.0, False, attn_mask=masks("local_T", dt, 1), scale=scaling)
    # A key no query sees locally (older than the window for all of them) received nothing.
    score = torch.where(local.any(0), (ls.float() - c).exp(), 0.0)
    return out, score


# ---- the cache and the attention function -------------------------------------------------------------------------

# The cache's update hands its layer state to the attention call that follows in the same module forward.
_handoff = threading.local()


class _InfLLMLayer(CacheLayerMixin):
    """A transformers cache layer holding an :class:`InfLLMState`; ``keys``/``values`` stay None (no full KV)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cfg: InfLLM):
        self.cfg = cfg
        self.state = InfLLMState(cfg)
        self.keys = self.values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to allocate ahead: the state grows with the first forward."""

    def update(self, key_states, value_states, *args, **kwargs):
        _handoff.item = (self.state, key_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = InfLLMState(self.cfg)

    def _refuse(self, *args, **kwargs):
        raise MethodError(
            "the InfLLM cache keeps only its block memory: it supports greedy or sampled decoding of one sequence "
            "batch, not beam search, cropping or reordering"
        )

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = prefetch = _refuse


class InfLLMCache(Cache):
    """The KV cache of :class:`InfLLM`: per full-attention layer an :class:`InfLLMState` (initial tokens, recent
    tokens, the block store with its representative keys); per sliding-window layer transformers' own
    ``DynamicSlidingWindowLayer`` (its window). ``get_seq_length()`` counts the tokens seen."""

    def __init__(self, config: Any, method: InfLLM):
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, per_layer = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        super().__init__(
            layers=[
                DynamicSlidingWindowLayer(**kw) if kind == "sliding_attention" else _InfLLMLayer(method)
                for kind, kw in zip(types, per_layer, strict=True)
            ]
        )
        self.method = method

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def states(self) -> list[InfLLMState]:
        """The block memories, one per full-attention layer (in layer order; sliding layers have none)."""
        return [layer.state for layer in self.layers if isinstance(layer, _InfLLMLayer)]

    def window_layers(self) -> list[DynamicSlidingWindowLayer]:
        """The sliding-window layers' caches (empty on a model whose layers are all full attention)."""
        return [layer for layer in self.layers if isinstance(layer, DynamicSlidingWindowLayer)]

    def nbytes(self) -> int:
        """Exact bytes of every tensor held: block memories (offloaded blocks included) and the sliding windows."""
        return sum(s.nbytes() for s in self.states()) + sum(_window_nbytes(w) for w in self.window_layers())

    def working_set_nbytes(self) -> int:
        """Bytes of keys and values held on the compute device between forwards: initial and recent tokens of the
        full-attention layers (with their attention scores) and the sliding windows; bounded by the configuration.
        Excluded: the offloaded blocks and the representative keys (one per block and query head, as the
        reference keeps them on the compute device: they grow with the context, 1/block_size of its keys)."""
        return sum(s.working_set_nbytes() for s in self.states()) + sum(_window_nbytes(w) for w in self.window_layers())


def _window_nbytes(layer: DynamicSlidingWindowLayer) -> int:
    if not layer.is_initialized or layer.keys is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


class _InfLLMAttention(BoundAttention):
    """The attention function InfLLM registers (not a registered method of its own). Sliding-window layers never
    reach :meth:`attention`: :meth:`AttentionMethod.forward` hands them to the model's own attention
    (``own_sliding_layers`` is False), over the keys their sliding cache layer returns."""

    name = "infllm"
    kind = "memory"

    def mask_function(self):
        # A causal mask with nothing else to hide comes as None (the chunks' own masks are causal): transformers
        # would otherwise build, and _check_mask compare, a (T, S) mask per forward that grows with the context.
        from longkit.attention.position_remap import causal_tail_sdpa_mask

        return causal_tail_sdpa_mask

    def attention(self, module, query, key, value, attention_mask, scaling, kwargs):
        B, H, H_kv, T, S, D = check_qkv(query, key, value)
        cfg: InfLLM = self._owner
        parent, attr = self.bound(module)
        # Read when the layer runs (a RoPE method applied first swaps the rotary module), for this layer's type:
        # Gemma 3's full-attention layers rotate with their own base. Sliding layers never get here (forward()).
        inv_freq = layer_inv_freq(self, getattr(parent, attr), module)
        item = getattr(_handoff, "item", None)
        _handoff.item = None
        if item is not None and item[1] is key:
            state = item[0]
        elif S == T:
            # No InfLLM cache (a plain forward, or a DynamicCache on its first call): a fresh memory for this call.
            state = InfLLMState(cfg)
        else:
            raise MethodError(
                f"memory method '{cfg.name}' needs its own cache for cached decoding: pass cache=applied.new_cache() "
                f"(got keys for {S - T} earlier tokens from another cache)"
            )
        _check_mask(cfg, attention_mask, T, state.seen)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = state.seen + torch.arange(T, device=query.device)
        else:
            if pos.ndim == 2 and pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
                raise MethodError(f"memory method '{cfg.name}' needs the same position ids for every sequence of a batch")
            pos = pos.reshape(-1, pos.shape[-1])[0]
        if scaling is None:
            scaling = D**-0.5
        return state.forward(query, key, value, pos, float(scaling), inv_freq)


def _check_mask(cfg: InfLLM, mask: torch.Tensor | None, T: int, seen: int) -> None:
    """Refuse padding and custom masks: InfLLM's chunks, windows and blocks assume one causal sequence."""
    if mask is None:
        return
    visible = mask if mask.dtype == torch.bool else mask == 0
    S = visible.shape[-1]
    causal = torch.ones(T, S, dtype=torch.bool, device=visible.device).tril(S - T)
    if S != seen + T or not bool((visible == causal).all()):
        raise MethodError(
            f"memory method '{cfg.name}' supports causal attention over one unpadded sequence per batch row only "
            "(got an attention mask with padding or a custom pattern)"
        )
