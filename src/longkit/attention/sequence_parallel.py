"""Sequence parallelism on torch.distributed: shard one long sequence across ranks, attend exactly, gather back.

Each rank of a process group holds a slice of the tokens. Attention is the only layer that mixes tokens, so only
it communicates: ring attention (``ring.py``) passes key/value blocks around the ring, Ulysses (``ulysses.py``)
swaps a sequence split for a head split with an all-to-all. Everything else (embeddings, MLPs, norms, RoPE from
the global ``position_ids``) runs on the local slice unchanged.

Layouts: ``zigzag`` (ring) cuts the sequence into 2W chunks and gives rank r chunks r and 2W-1-r, so every rank
does the same causal work; ``contiguous`` (Ulysses) gives rank r tokens ``[r L, (r + 1) L)``.

Packed rows (several documents per row, positions restarting per document, or PoSE's skipped positions): the
whole rows' positions and document ids are set with :func:`sharded_row` (``SequenceParallel`` does it for its
forward); each rank then checks its shard's positions against them, and ring / Ulysses attention keeps every token
causal within its document across the shards, exactly the single-process block-causal mask.

The backend follows the device: NCCL for CUDA tensors, gloo for CPU (:func:`default_backend`). With no process
group initialised, or a group of one rank, the ring and Ulysses methods run single-process exact attention.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longkit.attention.base import AttentionMethod
from longkit.attention.blockwise import MIN_BLOCK, blockwise_attention
from longkit.errors import MethodError
from longkit.registry import param

LAYOUTS = ("zigzag", "contiguous")

# The process group the ring / ulysses attention methods use; None means the default (WORLD) group.
_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("longkit_sequence_parallel_group", default=None)


def default_backend(device: torch.device | str | None = None) -> str:
    """The torch.distributed backend for a device: ``nccl`` for CUDA, ``gloo`` for CPU (and anything else)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; return ``(rank, world_size)``.

    The backend comes from :func:`default_backend`; on CUDA each process takes GPU ``LOCAL_RANK``. Does nothing
    (except returning rank and size) when a group is already initialised.
    """
    if not dist.is_available():
        raise MethodError("sequence parallelism needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MethodError(
                f"init_distributed: environment variables {missing} are not set; start the script with "
                "`torchrun --nproc-per-node N script.py`"
            )
        backend = default_backend(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active_group() -> Any:
    """The group the ring / ulysses attention methods use now: the one set by :func:`use_group`, else WORLD."""
    return _GROUP.get()


@contextlib.contextmanager
def use_group(group: Any) -> Iterator[None]:
    """Make the ring / ulysses attention methods use ``group`` (a ProcessGroup, or None for WORLD) inside."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


@dataclass(frozen=True)
class ShardedRow:
    """The whole rows behind the shards of a sequence-parallel forward (see :func:`sharded_row`).

    ``position_ids`` (B, T): every token's RoPE position (packed documents restart at 0, PoSE skips);
    ``doc_ids`` (B, T): non-decreasing document ids (packed documents attend only within themselves), or None
    for one document per row; ``group``: the process group the sequence is sharded over (None: WORLD).
    """

    position_ids: torch.Tensor
    doc_ids: torch.Tensor | None = None
    group: Any = None


# Not a ContextVar (unlike the group above): autograd may run a backward, and with it activation checkpointing's
# recomputed forward, on a worker thread that a context variable does not reach, and that recompute must see
# the same documents as the forward did.
_ROW: list[ShardedRow | None] = [None]


def current_row() -> ShardedRow | None:
    """The rows set by :func:`sharded_row`, or None."""
    return _ROW[0]


def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) document ids of packed rows from their position ids: a new document wherever the position does not
    go up by one (transformers' rule, ``find_packed_sequence_indices``); None when every row is one document."""
    from transformers.masking_utils import find_packed_sequence_indices

    return find_packed_sequence_indices(position_ids)


@contextlib.contextmanager
def sharded_row(position_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, group: Any = None) -> Iterator[None]:
    """Tell the ring / ulysses attention methods the whole rows of the sharded forwards (and backwards) inside.

    Inside, a sharded forward must pass this rank's shard of ``position_ids`` (checked), and attention keeps
    every token within its document of ``doc_ids`` (causal and block-diagonal, exactly the single-process mask
    of packed rows). Wrap the backward too when the model recomputes its forward (activation checkpointing).

    Parameters:
        position_ids: (B, T) integer positions of the whole rows (any values: packed restarts, PoSE skips).
        doc_ids: (B, T) integer document ids, non-decreasing along each row (documents are contiguous), or None.
        group: the ProcessGroup the rows are sharded over, or None for WORLD.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.dtype.is_floating_point:
        raise MethodError("sharded_row: parameter 'position_ids' must be a (B, T) integer tensor")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != position_ids.shape or \
                doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise MethodError(f"sharded_row: parameter 'doc_ids' must be an integer tensor of the shape of "
                              f"position_ids {tuple(position_ids.shape)}")
        if bool((doc_ids.diff(dim=-1) < 0).any()):
            raise MethodError("sharded_row: parameter 'doc_ids' must be non-decreasing along each row (packed "
                              "documents are contiguous)")
    old = _ROW[0]
    _ROW[0] = ShardedRow(position_ids, doc_ids, group)
    try:
        yield
    finally:
        _ROW[0] = old


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """``(rank in group, group size)``, or ``(0, 1)`` when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_length(T: int, world_size: int, layout: str, name: str = "sequence length") -> None:
    """Raise a MethodError unless T tokens split evenly in ``layout`` over ``world_size`` ranks."""
    if layout not in LAYOUTS:
        raise MethodError(f"parameter 'layout' must be one of {LAYOUTS} (got {layout!r})")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if T < parts or T % parts:
        raise MethodError(
            f"{name} T = {T} must be a positive multiple of {parts} ({'2 × ' if layout == 'zigzag' else ''}world size "
            f"{world_size}) for the {layout} layout"
        )


def shard_index(T: int, world_size: int, rank: int, layout: str = "zigzag", device: Any = None) -> torch.Tensor:
    """The global token indices rank ``rank`` holds, in its local order: (T // world_size,) int64.

    zigzag: chunks ``rank`` and ``2 W - 1 - rank`` of 2W equal chunks, which balances causal work (the zigzag
    layout of https://github.com/zhuzilin/ring-flash-attention). contiguous: ``[rank L, (rank+1) L)``.
    """
    check_length(T, world_size, layout)
    if layout == "contiguous":
        L = T // world_size
        return torch.arange(rank * L, (rank + 1) * L, device=device)
    c = T // (2 * world_size)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c, device=device)
    return torch.cat([first, second])


def gather_order(T: int, world_size: int, layout: str = "zigzag", device: Any = None) -> torch.Tensor:
    """Where each global token sits in the rank-ordered concatenation of all shards: (T,) int64."""
    # (T,): position k of the concatenation holds global token order[k]; invert it.
    order = torch.cat([shard_index(T, world_size, r, layout, device) for r in range(world_size)])
    return torch.empty_like(order).scatter_(0, order, torch.arange(T, device=device))


def shard(x: torch.Tensor, dim: int = 1, group: Any = None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (tokens) in ``layout``; differentiable (an index_select)."""
    rank, W = rank_and_size(group)
    return x.index_select(dim, shard_index(x.shape[dim], W, rank, layout, x.device))


class _GatherReplicated(torch.autograd.Function):
    """All-gather along ``dim``. Backward keeps this rank's slice of the gradient: valid when every rank computes
    the same function of the gathered tensor (a replicated loss), so each rank's gradient is already the total."""

    @staticmethod
    def forward(ctx, x, dim, group):
        rank, W = rank_and_size(group)
        ctx.dim, ctx.rank, ctx.n = dim, rank, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(W)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None, None


class _SumReplicated(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: every rank then backpropagates the same (replicated) total."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def unshard(x: torch.Tensor, dim: int = 1, group: Any = None, layout: str = "zigzag") -> torch.Tensor:
    """Gather every rank's slice along ``dim`` and restore the global token order (inverse of :func:`shard`).

    Differentiable for a replicated downstream computation (every rank computes the same loss from the result).
    """
    rank, W = rank_and_size(group)
    if W == 1:
        return x
    full = _GatherReplicated.apply(x, dim, group)
    return full.index_select(dim, gather_order(full.shape[dim], W, layout, x.device))


def sum_across(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks, the same on every rank; the backward passes the gradient through."""
    _, W = rank_and_size(group)
    return x if W == 1 else _SumReplicated.apply(x, group)


def sync_gradients(model: torch.nn.Module, group: Any = None) -> None:
    """Sum parameter gradients over the group (every rank then holds the full-sequence gradient).

    Each rank's backward reaches the parameters only through its own tokens; the full-sequence gradient is the
    sum over ranks (not the mean: the ranks hold disjoint parts of one sequence, not separate samples).
    """
    _, W = rank_and_size(group)
    if W == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def check_positions(
    position_ids: torch.Tensor | None, T: int, group: Any, layout: str, method: str, row: ShardedRow | None = None
) -> None:
    """Refuse position ids that are not this rank's global positions in ``layout`` (RoPE would be silently wrong):
    its shard of ``row.position_ids`` when rows are set (:func:`sharded_row`), else of ``0 .. T - 1``."""
    if position_ids is None:
        if row is not None:
            raise MethodError(f"attention method '{method}': sharded rows are set (sharded_row) but the forward "
                              "passed no 'position_ids'; pass this rank's shard of them")
        return
    rank, W = rank_and_size(group)
    index = shard_index(T, W, rank, layout, position_ids.device)
    flat = position_ids.reshape(-1, position_ids.shape[-1])
    if row is not None:
        if row.position_ids.shape[-1] != T:
            raise MethodError(f"attention method '{method}' on {W} ranks: the sharded rows hold "
                              f"{row.position_ids.shape[-1]} tokens but the forward's shards make {T}")
        want = row.position_ids.to(position_ids.device).index_select(-1, index)
    else:
        want = index.expand(flat.shape[0], -1)
    if not torch.equal(flat, want.expand(flat.shape[0], -1)):
        raise MethodError(
            f"attention method '{method}' on {W} ranks: 'position_ids' must be this rank's global positions in the "
            f"{layout} layout (rank {rank}: {want[:3].tolist()}...); shard with longkit.attention.sequence_parallel"
        )


def single_process_mask(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
):
    """The exact mask for one process from transformers' flash-attention mask format.

    The ring / ulysses methods register transformers' ``flash_attention_2`` mask function, which passes None or
    the (B, S) padding mask (and, on the sharded path, no packed-sequence mask built from zigzag positions). Here
    it becomes a :class:`MaskSpec`: causal aligned at the end of the keys (caches), the module's sliding window,
    padding, and packed sequences found from ``position_ids`` as transformers does.
    """
    from longkit.attention.masks import MaskSpec

    if attention_mask is not None and attention_mask.ndim == 4:
        return MaskSpec.from_transformers(module, query, key, attention_mask, **kwargs)
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None)) or None
    dense = doc_ids = None
    if attention_mask is not None:
        if attention_mask.ndim != 2 or attention_mask.shape[1] < S:
            raise MethodError(
                f"attention_mask must be a (B, S) padding mask covering the {S} keys; got {tuple(attention_mask.shape)}"
            )
        # (B, 1, T, S): key padding, the same for every query
        dense = attention_mask[:, -S:].bool()[:, None, None, :].expand(B, 1, T, S)
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and T == S and T > 1:
            from transformers.masking_utils import find_packed_sequence_indices

            doc_ids = find_packed_sequence_indices(position_ids.expand(B, -1))
    if not is_causal:
        return MaskSpec(causal=False, dense=dense, doc_ids=doc_ids)
    return MaskSpec(causal=True, window=window, q_offset=S - T, dense=dense, doc_ids=doc_ids)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@dataclass
class SPOutput:
    """What :class:`SequenceParallel` returns: ``logits`` (B, T, V) gathered in global order (or this rank's
    (B, T / W, V) slice with ``gather_logits=False``), and the full-sequence mean next-token ``loss`` (the same on
    every rank) when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SequenceParallel:
    """Runs a causal LM on a sequence split across the ranks of a process group (see :func:`sequence_parallel`)."""

    def __init__(self, model: Any, group: Any, layout: str) -> None:
        self.model, self.group, self.layout = model, group, layout
        self.rank, self.world_size = rank_and_size(group)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard(x, dim, self.group, self.layout)

    def unshard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return unshard(x, dim, self.group, self.layout)

    def sync_gradients(self) -> None:
        sync_gradients(self.model, self.group)

    def __call__(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, gather_logits: bool = True, *,
        position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
        num_items: torch.Tensor | int | None = None, **kwargs: Any,
    ) -> SPOutput:
        """Forward the whole ``input_ids`` (B, T) (the same on every rank); each rank computes its shard.

        T need not divide: the sequence is right-padded to the layout's multiple, which changes no real token's
        logits because attention is causal. ``labels`` (B, T) are the model's usual labels (shifted inside; -100
        ignored); the loss is the mean over the whole sequence, identical to a single-process forward, and its
        backward followed by :meth:`sync_gradients` gives the single-process parameter gradients.

        Packed rows: ``position_ids`` (B, T) give every token's position (documents restarting at 0, PoSE skips);
        the documents are ``doc_ids`` (B, T, non-decreasing) or, when not given, found from the position ids as
        transformers does (a new document wherever the position does not go up by one). Each token then attends
        causally within its document only, as in a single-process forward of the packed rows. ``num_items``:
        the loss's divisor (default: the scored targets of these rows; a training step over several micro-batches
        gives the count of the whole step). With activation checkpointing, run the backward inside
        :func:`sharded_row` with the same rows (the recomputed forward must see them).
        """
        if input_ids.ndim != 2:
            raise MethodError(f"parameter 'input_ids' must be (B, T); got shape {tuple(input_ids.shape)}")
        for name, x in (("labels", labels), ("position_ids", position_ids), ("doc_ids", doc_ids)):
            if x is not None and x.shape != input_ids.shape:
                raise MethodError(
                    f"parameter '{name}' must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(x.shape)}"
                )
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise MethodError("sequence_parallel: padded batches are not supported ('attention_mask' has zeros); "
                              "give packed documents as position_ids / doc_ids")
        for bad in ("cache", "past_key_values", "use_cache"):
            if kwargs.get(bad) is not None and kwargs.get(bad) is not False:
                raise MethodError(
                    f"sequence_parallel: '{bad}' is not supported (whole unpadded sequences, no KV cache)"
                )
        kwargs.pop("use_cache", None)
        B, T = input_ids.shape
        parts = 2 * self.world_size if self.layout == "zigzag" else self.world_size
        pad = -T % parts
        ids = F.pad(input_ids, (0, pad), value=0)
        if position_ids is None:
            if doc_ids is not None:
                raise MethodError("sequence_parallel: parameter 'doc_ids' needs 'position_ids'")
            positions = torch.arange(T + pad, device=ids.device)[None].expand(B, -1)
            docs = None
        else:
            docs = doc_ids if doc_ids is not None else documents_from_positions(position_ids)
            # The padding continues the last positions as its own document: after every real token, it is seen
            # by none of them (causal), and it sees none of them.
            positions = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(1, pad + 1, device=ids.device)], 1)
            if docs is not None:
                docs = F.pad(docs, (0, pad), value=int(docs.max()) + 1)
        outer = current_row()
        if outer is not None and not (
            outer.group is self.group and _same(outer.position_ids, positions) and _same(outer.doc_ids, docs)
        ):
            # The caller's rows (kept for the backward's recompute) must be the rows of this forward.
            raise MethodError("sequence_parallel: the rows set by sharded_row differ from this forward's position_ids "
                              "/ doc_ids / group")
        with sharded_row(positions, docs, self.group):
            out = self.model(input_ids=self.shard(ids), position_ids=self.shard(positions), use_cache=False, **kwargs)
        local_logits = out.logits
        loss = None
        if labels is not None:
            # Next-token targets in global order, padded with ignore; each rank scores its own tokens.
            targets = F.pad(labels[:, 1:], (0, 1 + pad), value=-100)
            local_targets = self.shard(targets)
            count = (targets != -100).sum().clamp(min=1) if num_items is None else num_items
            local_sum = F.cross_entropy(
                local_logits.float().flatten(0, 1), local_targets.flatten(), ignore_index=-100, reduction="sum"
            )
            loss = sum_across(local_sum, self.group) / count
        if not gather_logits:
            return SPOutput(local_logits, loss)
        return SPOutput(self.unshard(local_logits)[:, :T], loss)


@contextlib.contextmanager
def sequence_parallel(
    model: Any, group: Any = None, method: str = "ring", **method_args: Any
) -> Iterator[SequenceParallel]:
    """Run ``model``'s attention sequence-parallel over ``group`` (default WORLD) inside the block.

    Applies the attention method (``ring``: zigzag ring attention; ``ulysses``: all-to-all head/sequence swap)
    through the method seam and yields a :class:`SequenceParallel` that shards the inputs and position ids, runs
    the forward, and gathers logits; undone on exit. Every rank must enter with the same model and inputs.
    Based on Liu et al. 2023, Ring Attention (https://arxiv.org/abs/2310.01889) and Jacobs et al. 2023,
    DeepSpeed-Ulysses (https://arxiv.org/abs/2309.14509).

    Parameters:
        model: a transformers causal LM whose attention goes through AttentionInterface.
        group: a torch.distributed ProcessGroup, or None for WORLD (or a single process when none is initialised).
        method: ``ring`` or ``ulysses``.
        method_args: the method's parameters (e.g. ``block_q`` / ``block_k`` for ring).

    Example (``torchrun --nproc-per-node 2 script.py``)::

        init_distributed()
        with sequence_parallel(model, method="ring") as sp:
            out = sp(input_ids, labels=input_ids)
            out.loss.backward()
            sp.sync_gradients()
    """
    from longkit.registry import registry

    if method not in ("ring", "ulysses"):
        raise MethodError(f"sequence_parallel: parameter 'method' must be 'ring' or 'ulysses' (got {method!r})")
    impl = registry("attention").create(method, method_args)
    with use_group(group):
        undo = impl.apply(model)
        try:
            yield SequenceParallel(model, group, impl.layout)
        finally:
            undo()


@dataclass
class SequenceParallelAttention(AttentionMethod):
    """Shared part of the sequence-parallel attention methods (``ring``, ``ulysses``).

    On one rank (or without a process group) attention is exact single-process blockwise attention, caches and
    padding included; on several ranks each rank holds a shard laid out as ``layout`` and
    :meth:`sharded_attention` attends over the whole sequence.
    """

    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")
    #: How :func:`sequence_parallel` shards a sequence for this method.
    layout: ClassVar[str] = "contiguous"
    # The flash-attention mask format hands over None or the (B, S) padding mask, never a local (L, L) mask
    # built from sharded (e.g. zigzag) positions, which transformers would read as packed sequences.
    mask_format: ClassVar[str] = "flash_attention_2"
    # Each rank holds a shard of the sequence: a sliding-window layer is attended here (exactly, on one rank; on
    # several only while the window covers the whole sequence), never handed to the model's unsharded attention.
    own_sliding_layers: ClassVar[bool] = True

    def sharded_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float | None,
        group: Any, doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H, T_local, D) queries and keys/values of this rank's shard -> (B, H, T_local, D_v) output;
        ``doc_ids`` (B, T) are the whole rows' document ids (causal attention within each document) or None."""
        raise NotImplementedError

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        row = current_row()
        group = row.group if row is not None else active_group()
        _, size = rank_and_size(group)
        if size == 1:
            mask = single_process_mask(module, query, key, attention_mask, **kwargs)
            out, _ = blockwise_attention(query, key, value, mask, scaling, block_q=self.block_q, block_k=self.block_k)
        else:
            causal = check_sharded_call(self.name, module, query, key, attention_mask, size, kwargs)
            check_positions(kwargs.get("position_ids"), query.shape[2] * size, group, self.layout, self.name, row)
            docs = None if row is None else row.doc_ids
            if docs is not None:
                if not causal:
                    raise MethodError(f"attention method '{self.name}' on {size} ranks: packed documents need "
                                      "causal attention")
                if docs.shape[0] != query.shape[0]:
                    raise MethodError(f"attention method '{self.name}': the sharded rows hold {docs.shape[0]} rows "
                                      f"but the forward has a batch of {query.shape[0]}")
                docs = docs.to(query.device)
            out = self.sharded_attention(query, key, value, causal, scaling, group, docs)
        return out


def check_sharded_call(
    method: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    size: int,
    kwargs: dict[str, Any],
) -> bool:
    """Refuse what a sharded forward cannot do exactly; return whether attention is causal."""
    T, S = query.shape[2], key.shape[2]
    if S != T:
        raise MethodError(
            f"attention method '{method}' on {size} ranks: no KV cache (got {S} keys for {T} queries); run prefill "
            "or training forwards with use_cache=False"
        )
    if attention_mask is not None:
        raise MethodError(
            f"attention method '{method}' on {size} ranks: padding masks are not supported; pass whole sequences"
        )
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window and window < T * size:
        raise MethodError(
            f"attention method '{method}' on {size} ranks: sliding-window attention (window {window}) is not "
            f"supported for sequences longer than the window ({T * size} tokens)"
        )
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
