"""Shared machinery of the training-free position remaps (Self-Extend, (Leaky) ReRoPE, LM-Infinite, DCA) as attention.

transformers hands the attention function RoPE-rotated queries and keys (query i at position p_i = S - T + i,
key j at position j). Every remap here keeps exact distances below a window W and, for farther keys, moves
queries and keys to new positions. RoPE rotations compose, so rotating an already rotated vector by
``new - old`` equals rotating the raw vector at ``new`` (:func:`longkit.rope.rotation.rotate_by`). The near part (d < W) and the
far part (d >= W) are each one :func:`blockwise_attention` call with a causal mask, merged through their
log-sum-exp with :func:`merge_partials`: no (T, S) matrix is built. Its plain O(T·S·D) reference from an
explicit relative-position matrix is :func:`longkit.attention.naive.remapped_reference`. Dual Chunk Attention
(``dca.py``) splits by chunk instead of by distance but uses the same re-rotation and merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longkit.attention.base import (
    BoundAttention,
    check_qkv,
    find_rotary,
    full_layer_trained_length,
    layer_inv_freq,
    transformers_inputs,
)
from longkit.attention.blockwise import blockwise_attention
from longkit.attention.lse import fused_cpu_kernel, merge_partials
from longkit.attention.masks import MaskSpec
from longkit.errors import MethodError
from longkit.methods import Undo
from longkit.models.introspect import rope_config
from longkit.rope.rotation import rotate_by

Positions = Callable[[torch.Tensor], torch.Tensor]


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    # (B, H, T, D) queries, (B, H_kv, S, D) keys: the kernel maps query head h to key head h // (H / H_kv) itself
    # (grouped-query attention, as repeat_interleave would), so K and V are not copied once per query head;
    # causal is aligned at the first key
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = kernel(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
    return out, lse.float()


def _fused_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float):
    # Query i sees keys j <= offset + i: keys 0 .. offset - 1 are seen by every query (a full part) and the
    # rest is causal aligned at key ``offset`` (a causal part), merged by log-sum-exp. One query at the last
    # key (a decoding step) sees every key: one full call.
    S = k.shape[2]
    if offset >= S or (q.shape[2] == 1 and offset >= S - 1):
        return _fused(q, k, v, False, scale)
    if offset == 0:
        return _fused(q, k, v, True, scale)
    full = _fused(q, k[:, :, :offset], v[:, :, :offset], False, scale)
    return merge_partials(*full, *_fused(q, k[:, :, offset:], v[:, :, offset:], True, scale))


def _fused_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, offset: int, scale: float):
    # Query i at p = offset + i sees keys p - W < j <= p. Per block of n <= W - 1 queries at P .. P + n - 1:
    # keys P .. P + n - 1 are causal aligned at P; keys max(0, P - W + 1) .. P - 1 are seen when
    # j >= p - W + 1, which reversing both the queries and those keys turns into causal with offset W - 1 - n.
    T, W = q.shape[2], window
    n_rows = max(1, W - 1)
    outs, lses = [], []
    for i0 in range(0, T, n_rows):
        i1 = min(i0 + n_rows, T)
        P, n = offset + i0, i1 - i0
        out, lse = _fused(q[:, :, i0:i1], k[:, :, P : P + n], v[:, :, P : P + n], True, scale)
        lo = max(0, P - W + 1)
        if lo < P:
            # (B, H, n, D) queries and (B, H_kv, P - lo, D) keys, both reversed
            back, back_lse = _fused_causal(
                q[:, :, i0:i1].flip(2), k[:, :, lo:P].flip(2), v[:, :, lo:P].flip(2), W - 1 - n, scale
            )
            out, lse = merge_partials(out, lse, back.flip(2), back_lse.flip(2))
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attend_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | None,
    scale: float | None,
    *,
    block_q: int = 128,
    block_k: int = 128,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of a remapped attention: ``(out (B, H, T, D_v), lse (B, H, T) float32)`` as
    :func:`blockwise_attention` returns them.

    Without gradients, on CPU, for the masks built from PyTorch's fused flash kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp, memory
    O(tiles)): no mask, causal with any ``q_offset >= 0``, and causal with a sliding ``window``, each split
    into full / causal-at-the-first-key pieces merged by log-sum-exp. That is about 10-30x faster than the
    Python tile loop on CPU. Every other mask (dense, documents, block-sparse, sinks), every call that needs
    gradients (the kernel's log-sum-exp is not differentiable) and ``fused=False`` (benchmarks compare the two)
    run :func:`blockwise_attention`; the two agree to float rounding (tested).
    """
    simple = mask is None or (
        mask.causal
        and mask.q_offset >= 0
        and mask.sinks == 0
        and mask.doc_ids is None
        and mask.block_mask is None
        and mask.dense is None
    )
    if not (fused and simple and q.shape[2] > 0 and k.shape[2] > 0 and fused_cpu_kernel(q, k, v) is not None):
        return blockwise_attention(q, k, v, mask, scale, block_q=block_q, block_k=block_k)
    _, _, _, T, S, D = check_qkv(q, k, v)
    if mask is not None:
        mask.check(q.shape[0], q.shape[1], T, S)
    scale = D**-0.5 if scale is None else float(scale)
    if mask is None:
        out, lse = _fused(q, k, v, False, scale)
    elif mask.window is None or mask.window > mask.q_offset + T - 1:
        # a window longer than the last query's position hides no key (Self-Extend at S <= W): plain causal
        out, lse = _fused_causal(q, k, v, mask.q_offset, scale)
    else:
        out, lse = _fused_band(q, k, v, mask.window, mask.q_offset, scale)
    return out.to(q.dtype), lse


def causal_tail_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' sdpa mask function, except for a causal full-attention mask with nothing else to hide: None there.

    That is a call with the plain causal mask function, no sliding window (``local_size``), no padding (or all
    tokens real), keys at positions 0 .. S - 1 and the queries the last T of them; packed documents and custom
    patterns clear transformers' ``allow_is_causal_skip`` and keep their mask. transformers gives such a mask up by
    itself only when T == S or T == 1; a chunked prefill (1 < T < S) got a dense (T, S) mask, which sent every part
    of a remap to the Python tile loop (:func:`blockwise_attention`, about 3x a prefill's time on Gemma 3). A remap
    takes a missing mask as causal aligned at the last key (query i at position S - T + i), which is what it
    computes anyway, so the result is the same and every part runs on the fused kernel. Sliding-window layers get
    their mask as before (the model's own attention needs it).
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    sizes = [kwargs.get(name, 0) for name in ("q_length", "kv_length", "q_offset", "kv_offset")]
    plain = (
        not args
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("allow_is_causal_skip", True)
        # (a static cache passes tensor offsets: its mask is kept)
        and all(isinstance(n, int) for n in sizes)
        and sizes[3] == 0
        and sizes[2] + sizes[0] == sizes[1]
    )
    if plain:
        padding = prepare_padding_mask(kwargs.get("attention_mask"), sizes[1], 0)
        if padding is None or bool(padding.all()):
            return None
    return sdpa_mask(*args, **kwargs)


def check_remap_qkv(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """:func:`check_qkv` for a remap, whose queries are the last T of its S keys: ``(B, H, H_kv, T, S, D)``."""
    dims = check_qkv(q, k, v)
    if dims[3] > dims[4]:
        raise MethodError(f"{method} attention: more queries (T = {dims[3]}) than keys (S = {dims[4]})")
    return dims


def remapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    far_query: Positions,
    far_key: Positions,
    *,
    q_factor: torch.Tensor | None = None,
    far_keys: int | None = None,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise attention with exact positions below ``window`` and remapped positions at or beyond it.

    Query i sits at position ``S - T + i`` and key j at position j. Near part: keys at distance < W with their
    own rotations. Far part: keys at distance >= W, queries moved to ``far_query(p)`` and keys to
    ``far_key(j)``. Memory O(T·D + tiles), never O(T·S). The remap functions (``self_extend_attention``, ...)
    take the tensors and the keyword arguments dense, scale, block_q, block_k and fused described here.

    Parameters:
        q: (B, H, T, D) rotated at positions S - T .. S - 1. k: (B, H_kv, S, D) rotated at 0 .. S - 1.
        v: (B, H_kv, S, D_v). inv_freq: (rotary_dim / 2,) the model's RoPE inverse frequencies.
        window: int >= 1, W. far_query, far_key: position tensor (N,) -> new positions (N,), int or float.
        q_factor: optional (T,) per-query multiplier (log-n scaling). far_keys: int >= 0 or None; only keys
        j < far_keys take part in the far part (LM-Infinite's sinks), None for all. dense: optional bool (B|1, 1|H, T, S)
        extra mask (padding), True = visible. scale: score scale (default D ** -0.5).
        block_q, block_k: int >= 16, tile edges. fused: let :func:`attend_part` use the fused CPU kernel.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    B, H, _, T, S, D = check_remap_qkv("remapped", q, k, v)
    W, off = window, S - T
    tiles = {"block_q": block_q, "block_k": block_k, "fused": fused}
    if q_factor is not None:
        # (B, H, T, D): the factor multiplies the logits of every key, so it scales the query itself
        q = (q.float() * q_factor.to(q.device)[:, None]).to(q.dtype)
    near, near_lse = attend_part(q, k, v, MaskSpec(causal=True, window=W, q_offset=off, dense=dense), scale, **tiles)
    # Queries before position W have no key at distance >= W: the far part starts at query index i0.
    i0 = max(0, W - off)
    # Only keys 0 .. S - 1 - W are at distance >= W from the last query.
    n_far = S - W if far_keys is None else min(S - W, far_keys)
    if i0 >= T or n_far <= 0:
        return near, near_lse
    qpos = torch.arange(off + i0, S, device=q.device)
    kpos = torch.arange(n_far, device=q.device)
    # (B, H, T - i0, D) and (B, H_kv, n_far, D) at their remapped positions
    qf = rotate_by(q[:, :, i0:], qpos, far_query(qpos), inv_freq)
    kf = rotate_by(k[:, :, :n_far], kpos, far_key(kpos), inv_freq)
    # Key j is far for the query at p iff j <= p - W: causal with the query offset moved back by W.
    far_dense = None if dense is None else dense[:, :, i0:, :n_far]
    far_mask = MaskSpec(causal=True, q_offset=off + i0 - W, dense=far_dense)
    far, far_lse = attend_part(qf, kf, v[:, :, :n_far], far_mask, scale, **tiles)
    out, lse = merge_partials(near[:, :, i0:], near_lse[:, :, i0:], far, far_lse)
    # (B, H, T, D_v): rows before i0 keep the near part alone
    return torch.cat([near[:, :, :i0], out.to(q.dtype)], dim=2), torch.cat([near_lse[:, :, :i0], lse], dim=2)


@dataclass
class RemapAttention(BoundAttention):
    """Base of the position-remap attention methods: finds the model's RoPE at apply, checks the inputs and
    calls :meth:`attend` with RoPE-rotated q, k, the model's inverse frequencies and trained length.

    Every remap declares ``block_q`` and ``block_k`` (in its own field order, which its labels follow).
    ``fused_cpu`` is not a parameter: set it False on an instance to run every part on the blockwise primitive.
    """

    fused_cpu: bool = field(default=True, init=False, repr=False, compare=False)

    def apply(self, model: Any) -> Undo:
        found = find_rotary(model)
        if not found or not getattr(rope_config(model), "rope_parameters", None):
            raise MethodError(
                f"attention method '{self.name}' needs a model with rotary position embeddings (RoPE); "
                f"{type(model).__name__} has none"
            )
        if len(found) > 1:
            raise MethodError(
                f"attention method '{self.name}': {type(model).__name__} has {len(found)} rotary modules; only "
                "models with one are supported"
            )
        parent, attr = found[0]
        return self.bind(model, (parent, attr, full_layer_trained_length(model)))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, trained: int, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The remap's function on rotated q (B, H, T, D), k and v (B, H_kv, S, D): ``(out, lse)``; ``kw`` are
        dense, scale and :meth:`tiles`, as :func:`remapped_attention` takes them."""
        raise NotImplementedError

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        parent, attr, trained = self.bound(module)
        dense = transformers_inputs(self, module, query, key, attention_mask, kwargs)
        T, S = query.shape[2], key.shape[2]
        pos = kwargs.get("position_ids")
        # The remap needs each key's position; the cache gives only its index, so the two must agree.
        if pos is not None and not bool((pos == torch.arange(S - T, S, device=pos.device)).all()):
            raise MethodError(
                f"attention method '{self.name}' needs position_ids = cache index (S - T .. S - 1); left-padded "
                "or packed batches are not supported"
            )
        # inv_freq is read at call time (a RoPE method applied before this one swaps the rotary module), for this
        # layer's type: Gemma 3's full-attention layers rotate with their own base.
        inv_freq = layer_inv_freq(self, getattr(parent, attr), module)
        return self.attend(query, key, value, inv_freq, trained, dense=dense, scale=scaling, **self.tiles())[0]

    def mask_function(self) -> Any:
        return causal_tail_sdpa_mask

    def tiles(self) -> dict[str, Any]:
        """The execution options of :meth:`attend`: tile edges and whether the fused CPU kernel may run."""
        return {"block_q": self.block_q, "block_k": self.block_k, "fused": self.fused_cpu}
