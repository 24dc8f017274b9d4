"""Attention masks as a small description instead of a (T, S) tensor.

A :class:`MaskSpec` says which keys each query may see: causal, a sliding window, sink tokens kept beside the
window, document ids of packed sequences, an arbitrary block-sparse pattern, or an explicit dense mask. It can
materialise the dense boolean mask (for the reference), one tile of it, or classify every (query block, key
block) tile as empty, partial or full, which is what lets a blockwise kernel skip work and avoid building masks.

Positions: query ``i`` (0 <= i < T) sits at position ``q_offset + i``; key ``j`` (0 <= j < S) at position ``j``.
``q_offset = S - T`` is a chunk of queries at the end of its keys (decoding, chunked prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longkit.errors import MethodError

#: Tile classes returned by :meth:`MaskSpec.tile_classes`.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which keys each query may see; every given rule must hold (logical AND).

    Rules with query position ``p = q_offset + i`` and key index ``j``:
    ``causal``: ``j <= p``. ``window``: ``j > p - window`` (the query and the ``window - 1`` keys before it, the
    transformers ``sliding_window`` convention), or ``j < sinks`` (attention sinks kept beside the window).
    ``doc_ids``: ``doc_ids[..., p] == doc_ids[..., j]`` (packed sequences). ``block_mask``:
    ``block_mask[..., i // block_size, j // block_size]`` (indexed by query index, not position). ``dense``:
    ``dense[..., i, j]``. Based on transformers' mask functions (``transformers/masking_utils.py``: causal,
    ``sliding_window_overlay``, packed sequences) and FlexAttention's block masks
    (https://pytorch.org/blog/flexattention/).

    Parameters:
        causal: hide keys after the query position.
        window: int >= 1 or None; sliding-window length counting the query itself.
        sinks: int >= 0; the first ``sinks`` keys stay visible outside the window (needs ``window``).
        doc_ids: integer tensor (S,) or (B, S), one document id per key position; queries use positions
            ``q_offset .. q_offset + T - 1`` of it.
        block_mask: bool tensor (ceil(T / block_size), ceil(S / block_size)) or (B|1, H|1, n_q_blocks, n_k_blocks).
        block_size: int >= 1, the block edge of ``block_mask`` (required with it).
        dense: bool tensor (T, S) or (B|1, H|1, T, S), an explicit mask (True = visible).
        q_offset: int >= 0, the position of the first query.
    """

    causal: bool = True
    window: int | None = None
    sinks: int = 0
    doc_ids: torch.Tensor | None = None
    block_mask: torch.Tensor | None = None
    block_size: int | None = None
    dense: torch.Tensor | None = None
    q_offset: int = 0

    def __post_init__(self) -> None:
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise MethodError(f"mask parameter 'window' must be an int >= 1 or None (got {self.window!r})")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise MethodError(f"mask parameter 'sinks' must be an int >= 0 (got {self.sinks!r})")
        if self.sinks and self.window is None:
            raise MethodError("mask parameter 'sinks' needs 'window': sinks are keys kept visible outside a window")
        if not _is_int(self.q_offset) or self.q_offset < 0:
            raise MethodError(f"mask parameter 'q_offset' must be an int >= 0 (got {self.q_offset!r})")
        if self.doc_ids is not None:
            if not isinstance(self.doc_ids, torch.Tensor) or self.doc_ids.dtype.is_floating_point or \
                    self.doc_ids.dtype == torch.bool or self.doc_ids.ndim not in (1, 2):
                raise MethodError("mask parameter 'doc_ids' must be an integer tensor of shape (S,) or (B, S)")
        if self.block_mask is not None:
            if not isinstance(self.block_mask, torch.Tensor) or self.block_mask.dtype != torch.bool or \
                    self.block_mask.ndim not in (2, 4):
                raise MethodError(
                    "mask parameter 'block_mask' must be a bool tensor of shape (n_q_blocks, n_k_blocks) "
                    "or (B|1, H|1, n_q_blocks, n_k_blocks)"
                )
            if not _is_int(self.block_size) or self.block_size < 1:
                raise MethodError(f"mask parameter 'block_size' must be an int >= 1 with 'block_mask' (got {self.block_size!r})")
        elif self.block_size is not None:
            raise MethodError("mask parameter 'block_size' is given without 'block_mask'")
        if self.dense is not None and (
            not isinstance(self.dense, torch.Tensor) or self.dense.dtype != torch.bool or self.dense.ndim not in (2, 4)
        ):
            raise MethodError("mask parameter 'dense' must be a bool tensor of shape (T, S) or (B|1, H|1, T, S)")

    @classmethod
    def from_transformers(
        cls, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> MaskSpec:
        """The mask a transformers attention function means, in transformers' sdpa mask format.

        ``attention_mask`` None: causal (when the module is causal and T > 1) aligned at the first key as torch's
        ``is_causal`` is (transformers passes None only when that is right: no cache, or prefill into an empty static
        cache); a single query sees every key. A boolean (B, 1, T, S) mask is used as is (it already holds causality,
        the sliding window and padding); an additive float mask may only hold 0 and -inf / the dtype minimum.
        Based on ``transformers/integrations/sdpa_attention.py`` (``is_causal`` only when T > 1 and no mask).

        Parameters:
            module: the attention module (its ``is_causal`` and ``sliding_window`` are read when not in kwargs).
            query: (B, H, T, D). key: (B, H_kv, S, D).
            attention_mask: None, or a (B|1, 1|H, T, S) bool or additive float mask.
            kwargs: ``is_causal``, ``sliding_window`` as transformers passes them.
        """
        T, S = query.shape[2], key.shape[2]
        if attention_mask is None:
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            if not is_causal:
                return cls(causal=False)
            # The module attribute, not config.sliding_window: Qwen2 configs carry a window even on full layers.
            window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            return cls(causal=True, window=window or None, q_offset=S - 1 if T == 1 else 0)
        if attention_mask.ndim != 4 or attention_mask.shape[-2:] != (T, S):
            raise MethodError(
                f"attention_mask must have shape (B, 1, T, S) = (B, 1, {T}, {S}); got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype == torch.bool:
            return cls(causal=False, dense=attention_mask)
        visible = attention_mask > torch.finfo(attention_mask.dtype).min
        if bool(attention_mask.masked_fill(~visible, 0).any()):
            raise MethodError(
                "attention_mask: an additive float mask may only hold 0 (visible) and -inf or the dtype minimum "
                "(hidden); additive biases are not supported by this attention"
            )
        return cls(causal=False, dense=visible)

    def _doc(self) -> torch.Tensor:
        # (B|1, S)
        return self.doc_ids if self.doc_ids.ndim == 2 else self.doc_ids[None]

    def _block(self) -> torch.Tensor:
        # (B|1, H|1, n_q_blocks, n_k_blocks)
        return self.block_mask if self.block_mask.ndim == 4 else self.block_mask[None, None]

    def _dense(self) -> torch.Tensor:
        # (B|1, H|1, T, S)
        return self.dense if self.dense.ndim == 4 else self.dense[None, None]

    def check(self, B: int, H: int, T: int, S: int) -> None:
        """Raise a MethodError naming the field when a tensor does not fit batch B, H heads, T queries, S keys."""
        def lead_ok(shape: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
            return all(n in (1, want) for n, want in zip(shape, sizes, strict=True))

        if self.doc_ids is not None:
            d = self._doc()
            if d.shape[1] != S or d.shape[0] not in (1, B):
                raise MethodError(
                    f"mask parameter 'doc_ids' must have shape (S,) or (B, S) = ({S},) or ({B}, {S}) "
                    f"(one id per key); got {tuple(self.doc_ids.shape)}"
                )
            if self.q_offset + T > S:
                raise MethodError(
                    f"mask parameter 'q_offset' = {self.q_offset} puts queries past the {S} keys that 'doc_ids' "
                    f"covers (needs q_offset + T <= S, T = {T})"
                )
        if self.block_mask is not None:
            want = (math.ceil(T / self.block_size), math.ceil(S / self.block_size))
            bm = self._block()
            if bm.shape[-2:] != want or not lead_ok(bm.shape[:2], (B, H)):
                raise MethodError(
                    f"mask parameter 'block_mask' must have shape (ceil(T / block_size), ceil(S / block_size)) = "
                    f"{want} for T = {T}, S = {S}, block_size = {self.block_size} (optionally led by (B|1, H|1)); "
                    f"got {tuple(self.block_mask.shape)}"
                )
        if self.dense is not None:
            dm = self._dense()
            if dm.shape[-2:] != (T, S) or not lead_ok(dm.shape[:2], (B, H)):
                raise MethodError(
                    f"mask parameter 'dense' must have shape (T, S) = ({T}, {S}) or (B|1, H|1, T, S) with B = {B}, "
                    f"H = {H}; got {tuple(self.dense.shape)}"
                )

    def tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The boolean mask of queries ``i0..i1-1`` against keys ``j0..j1-1``: (B|1, H|1, i1 - i0, j1 - j0)."""
        # (n, 1) query positions and (1, m) key indices
        qpos = torch.arange(i0, i1, device=device)[:, None] + self.q_offset
        kidx = torch.arange(j0, j1, device=device)[None, :]
        # (1, 1, n, m)
        vis = torch.ones(1, 1, i1 - i0, j1 - j0, dtype=torch.bool, device=device)
        if self.causal:
            vis = vis & (kidx <= qpos)
        if self.window is not None:
            vis = vis & ((kidx > qpos - self.window) | (kidx < self.sinks))
        if self.doc_ids is not None:
            doc = self._doc().to(device)
            # (B|1, 1, n, 1) == (B|1, 1, 1, m)
            q_doc = doc[:, self.q_offset + i0 : self.q_offset + i1]
            vis = vis & (q_doc[:, None, :, None] == doc[:, None, None, j0:j1])
        if self.block_mask is not None:
            rows = torch.arange(i0, i1, device=device) // self.block_size
            cols = torch.arange(j0, j1, device=device) // self.block_size
            vis = vis & self._block().to(device)[:, :, rows][:, :, :, cols]
        if self.dense is not None:
            vis = vis & self._dense()[:, :, i0:i1, j0:j1].to(device)
        return vis

    def to_dense(self, B: int, H: int, T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole boolean mask, (B|1, H|1, T, S), True = visible; checks shapes first. O(T·S) memory."""
        self.check(B, H, T, S)
        return self.tile(0, T, 0, S, device)

    def tile_classes(
        self, B: int, H: int, T: int, S: int, block_q: int, block_k: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Classify every (query block, key block) tile: EMPTY (skip), PARTIAL (mask it) or FULL (no mask needed).

        Exact for causal / window / sinks rules; conservative (PARTIAL where it cannot tell cheaply) for document
        ids, which is always correct because a PARTIAL tile builds its exact mask. Holds for every batch row and
        head. Returns an int8 tensor (ceil(T / block_q), ceil(S / block_k)).
        """
        self.check(B, H, T, S)
        nq, nk = math.ceil(T / block_q), math.ceil(S / block_k)
        # (nq, 1) first/last query index, (1, nk) first/last key index of each tile
        i0 = torch.arange(nq, device=device)[:, None] * block_q
        i1 = torch.clamp(i0 + block_q, max=T)
        j0 = torch.arange(nk, device=device)[None, :] * block_k
        j1 = torch.clamp(j0 + block_k, max=S)
        qlo, qhi, klo, khi = i0 + self.q_offset, i1 - 1 + self.q_offset, j0, j1 - 1
        full = torch.ones(nq, nk, dtype=torch.bool, device=device)
        empty = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        if self.causal:
            full &= khi <= qlo
            empty |= klo > qhi
        if self.window is not None:
            # Either rule alone makes a tile visible; both must fail to hide it.
            full &= (klo > qhi - self.window) | (khi < self.sinks)
            empty |= (khi <= qlo - self.window) & (klo >= self.sinks)
        if self.doc_ids is not None:
            f, e = self._doc_classes(T, S, block_q, block_k, device)
            full &= f
            empty |= e
        if self.block_mask is not None:
            f, e = self._block_classes(i0, i1, j0, j1, device)
            full &= f
            empty |= e
        if self.dense is not None:
            f, e = self._dense_classes(T, S, block_q, block_k, (i1 - i0) * (j1 - j0), device)
            full &= f
            empty |= e
        classes = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
        classes[full] = FULL
        classes[empty] = EMPTY
        return classes

    def _doc_classes(self, T: int, S: int, block_q: int, block_k: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        doc = self._doc().to(device)

        def block_range(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
            # Pad by repeating the last id, which changes no block's min or max. (B|1, n_blocks, block)
            pad = -ids.shape[1] % block
            ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1).view(ids.shape[0], -1, block)
            return ids.amin(-1), ids.amax(-1)

        qmin, qmax = block_range(doc[:, self.q_offset : self.q_offset + T], block_q)
        kmin, kmax = block_range(doc, block_k)
        # (B|1, nq, nk): one shared document, or disjoint id ranges
        full = (qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
        empty = (qmax[:, :, None] < kmin[:, None, :]) | (kmax[:, None, :] < qmin[:, :, None])
        return full.all(0), empty.all(0)

    def _block_classes(self, i0, i1, j0, j1, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        bm = self._block().to(device)
        # 2-D prefix sums over blocks, of "true for every batch row and head" and "true for some".
        def prefix(m: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(m.long().cumsum(0).cumsum(1), (1, 0, 1, 0))

        p_all, p_any = prefix(bm.all(0).all(0)), prefix(bm.any(0).any(0))
        bs = self.block_size
        # (nq, 1) and (1, nk) ranges of mask blocks each tile covers
        r0, r1, c0, c1 = i0 // bs, (i1 - 1) // bs + 1, j0 // bs, (j1 - 1) // bs + 1

        def count(p: torch.Tensor) -> torch.Tensor:
            return p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]

        return count(p_all) == (r1 - r0) * (c1 - c0), count(p_any) == 0

    def _dense_classes(self, T, S, block_q, block_k, area, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dm = self._dense().to(device)
        nq, nk = math.ceil(T / block_q), math.ceil(S / block_k)
        if T % block_q or S % block_k:
            padded = torch.zeros(*dm.shape[:2], nq * block_q, nk * block_k, dtype=torch.bool, device=device)
            padded[:, :, :T, :S] = dm
            dm = padded
        # (B|1, H|1, nq, nk) visible entries per tile
        counts = dm.reshape(*dm.shape[:2], nq, block_q, nk, block_k).sum((3, 5))
        return (counts == area).all(0).all(0), (counts == 0).all(0).all(0)
