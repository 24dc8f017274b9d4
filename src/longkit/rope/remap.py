"""Training-free position remaps as explicit relative-position matrices (for inspection and tests).

A remap method keeps the model's own RoPE but changes which relative distance a (query i, key j) pair is
rotated by. ``relative_positions(name, length, **params)`` returns that (T, T) matrix from the paper's
definition, O(T^2): row i is the query, column j the key, and only the lower triangle (j <= i) is
meaningful. Entries a query does not attend (j > i, or keys a mask hides) are ``-1``. Attention methods
(``longkit.attention.self_extend``) build their fast blockwise path from the same rules and are tested
against these matrices.

>>> longkit.rope.relative_positions("self_extend", 8, group_size=2, window=4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from longkit.errors import MethodError
from longkit.registry import Registry

RemapFn = Callable[..., torch.Tensor]

#: name -> pure function ``(length, **params) -> (T, T) tensor``.
REMAPS = Registry("remap", "position remap", plural="remaps")
#: Function decorator: ``@register_remap("rerope")``.
register_remap = REMAPS.register


def _int(method: str, name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MethodError(f"position remap '{method}': parameter '{name}' must be an int >= {lo} (got {value!r})")
    return value


def _below_length(method: str, name: str, value: int, length: int) -> None:
    # A window covering the whole sequence makes the remap the identity: almost certainly a wrong setting.
    if value >= length:
        raise MethodError(
            f"position remap '{method}': parameter '{name}' must be < length = {length} (got {value}); "
            "with a window covering every key the remap changes nothing"
        )


def _grid(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, 1) query index i, (1, T) key index j, (T, T) distance d = i - j."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return i, j, i - j


def _hide_future(rel: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return rel.masked_fill(d < 0, -1)


def relative_positions(name: str, length: int, **params: Any) -> torch.Tensor:
    """The relative position each (query i, key j) pair is rotated by under remap ``name``: (T, T).

    Row i is the query, column j the key; the lower triangle (j <= i) is meaningful, ``-1`` marks pairs that
    are not attended (the future, or keys a mask hides). Integer remaps return int64; ``leaky_rerope``
    returns float64 (its positions beyond the window are fractional). Remaps and their parameters:

    - ``self_extend``: ``group_size`` G >= 1, ``window`` W >= 1 (W < length). d = i - j if d < W, else
      ``i // G - j // G + W - W // G`` (https://arxiv.org/abs/2401.01325).
    - ``rerope``: ``window`` w >= 1 (w < length). ``min(d, w)`` (https://kexue.fm/archives/9708).
    - ``leaky_rerope``: ``window`` w >= 1 (w < length), ``leak`` k > 1. d if d < w, else ``w + (d - w) / k``.
    - ``lm_infinite``: ``n_sinks`` >= 0, ``window`` L >= 1 (L < length). Keys j < n_sinks or d < L are seen,
      at distance ``min(d, L)``; others are -1 (https://arxiv.org/abs/2308.16137).
    - ``dca``: ``chunk_size`` s >= 2, ``local_window`` w >= 0 (w < s); chunk length c = s - w. Keys sit at
      j mod c; the query sits at i mod c for its own chunk, ``min(i mod c + c, s)`` for the previous chunk and
      ``min(2c - 1, s)`` for older chunks (https://arxiv.org/abs/2402.17463, ``HKUNLP/ChunkLlama``).

    Parameters:
        name: one of ``longkit.rope.REMAPS``.
        length: int >= 1, the sequence length T.
        params: the remap's parameters above; errors name the parameter and its valid range.
    """
    fn = REMAPS.get(name)
    _int(name, "length", length, 1)
    try:
        return fn(length, **params)
    except TypeError as err:
        raise MethodError(f"position remap '{name}': {err}") from None


@register_remap("self_extend")
def self_extend_positions(length: int, *, group_size: int, window: int) -> torch.Tensor:
    """Self-Extend: exact distances inside the neighbour window, grouped (floor-divided) positions beyond it.

    The grouped query sits at ``i // G + W - W // G`` and the key at ``j // G``; the shift ``W - W // G``
    makes the grouped distances continue from the window. Based on https://arxiv.org/abs/2401.01325 (Jin et
    al. 2024, Eq. 4; ``datamllab/LongLM``). group_size G: int >= 1; window W: int >= 1 and < length.
    """
    G = _int("self_extend", "group_size", group_size, 1)
    W = _int("self_extend", "window", window, 1)
    _below_length("self_extend", "window", W, length)
    return self_extend_matrix(length, G, W)


def self_extend_matrix(length: int, group_size: int, window: int) -> torch.Tensor:
    """:func:`self_extend_positions` without the ``window < length`` check (the attention reference uses it)."""
    G, W = group_size, window
    i, j, d = _grid(length)
    grouped = i // G - j // G + W - W // G
    return _hide_future(torch.where(d < W, d, grouped), d)


@register_remap("rerope")
def rerope_positions(length: int, *, window: int) -> torch.Tensor:
    """ReRoPE: relative positions clipped at the window, ``min(i - j, w)``.

    Based on Su 2023, Rectified Rotary Position Embeddings (https://kexue.fm/archives/9708, ``bojone/rerope``).
    window w: int >= 1 and < length.
    """
    w = _int("rerope", "window", window, 1)
    _below_length("rerope", "window", w, length)
    return rerope_matrix(length, w)


def rerope_matrix(length: int, window: int, leak: float | None = None) -> torch.Tensor:
    """ReRoPE (``leak`` None, int64) or Leaky ReRoPE (float64) positions without the ``window < length`` check."""
    _, _, d = _grid(length)
    if leak is None:
        return _hide_future(d.clamp(max=window), d)
    d = d.double()
    return torch.where(d < window, d, window + (d - window) / leak).masked_fill(d < 0, -1.0)


@register_remap("leaky_rerope")
def leaky_rerope_positions(length: int, *, window: int, leak: float = 16.0) -> torch.Tensor:
    """Leaky ReRoPE: exact inside the window, slope 1/k beyond it: ``w + (i - j - w) / k`` (float64).

    Based on Su 2023 (https://kexue.fm/archives/9708, ``bojone/rerope``, ``scaling_factor`` k = 16).
    window w: int >= 1 and < length; leak k: float > 1.
    """
    w = _int("leaky_rerope", "window", window, 1)
    _below_length("leaky_rerope", "window", w, length)
    if isinstance(leak, bool) or not isinstance(leak, int | float) or not leak > 1:
        raise MethodError(f"position remap 'leaky_rerope': parameter 'leak' must be > 1 (got {leak!r})")
    return rerope_matrix(length, w, float(leak))


@register_remap("lm_infinite")
def lm_infinite_positions(length: int, *, window: int, n_sinks: int = 100) -> torch.Tensor:
    """LM-Infinite: a Λ-shaped mask (the first ``n_sinks`` keys plus a local window) with distances capped.

    Keys inside the window (d < L) keep their distance; sink keys beyond it are seen at the cap ``L``: the
    reference code scores them with the query rotated at ``limit_distance = L`` against the un-rotated key
    (``Glaciohound/LM-Infinite``, ``models/llama.py``, its "stationary" branch); all other keys are hidden.
    Based on https://arxiv.org/abs/2308.16137 (Han et al. 2024). window L: int >= 1 and < length (the
    pre-training length in the paper); n_sinks: int >= 0 (the paper's n_global; default 100, the reference
    README's ``global_branch`` and the ``lm_infinite`` attention method's default).
    """
    L = _int("lm_infinite", "window", window, 1)
    _below_length("lm_infinite", "window", L, length)
    n = _int("lm_infinite", "n_sinks", n_sinks, 0)
    return lm_infinite_matrix(length, L, n)


def lm_infinite_matrix(length: int, window: int, n_sinks: int) -> torch.Tensor:
    """:func:`lm_infinite_positions` without the ``window < length`` check (the attention reference uses it)."""
    L, n = window, n_sinks
    _, j, d = _grid(length)
    seen = (d < L) | (j < n)
    return _hide_future(d.clamp(max=L).masked_fill(~seen, -1), d)


@register_remap("dca")
def dca_positions(length: int, *, chunk_size: int, local_window: int) -> torch.Tensor:
    """Dual Chunk Attention: intra-chunk, successive-chunk and inter-chunk query positions over chunked keys.

    Chunks have length c = s - w; keys sit at ``j mod c``. A query sees its own chunk at ``i mod c`` (exact
    distances), the previous chunk at ``min(i mod c + c, s)`` and older chunks at ``min(2c - 1, s)``, so no
    distance exceeds s. Based on https://arxiv.org/abs/2402.17463 (An et al. 2024) as implemented in
    ``HKUNLP/ChunkLlama`` (``chunkllama_attn_replace.py``). chunk_size s: int >= 2; local_window w: int >= 0
    and < s.
    """
    s = _int("dca", "chunk_size", chunk_size, 2)
    w = _int("dca", "local_window", local_window, 0)
    if w >= s:
        raise MethodError(f"position remap 'dca': parameter 'local_window' must be < chunk_size = {s} (got {w})")
    return dca_matrix(length, s, w)


def dca_matrix(length: int, chunk_size: int, local_window: int) -> torch.Tensor:
    """:func:`dca_positions` without parameter checks (the attention reference uses it)."""
    s, c = chunk_size, chunk_size - local_window
    i, j, d = _grid(length)
    ci, cj = i // c, j // c
    q_intra = i % c
    q_succ = (i % c + c).clamp(max=s)
    q_inter = min(2 * c - 1, s)
    q = torch.where(cj == ci, q_intra, torch.where(cj == ci - 1, q_succ, torch.full_like(q_succ, q_inter)))
    return _hide_future(q - j % c, d)
