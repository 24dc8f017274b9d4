"""RoPE scaling laws: what a RoPE base allows, and which base a target context length needs.

Two published laws, as small pure functions (float64 throughout; arrays are ``torch.float64`` tensors):

- Liu et al. 2023, *Scaling Laws of RoPE-based Extrapolation* (https://arxiv.org/abs/2310.05209): the
  **critical dimension** ``d_extra = 2 * ceil((d/2) * log_base(T_train / 2pi))`` counts the leading dimensions
  whose wavelength ``2pi * base^(2i/d)`` fits inside the training length (they saw a full period); the
  **extrapolation bound** ``T_extra = 2pi * base^(d_extra/d)`` is the wavelength of the first dimension that did
  not, and its inverse ``base = (T / 2pi)^(d/d_extra)`` is the base a target length needs.
  (:func:`critical_dimension`, :func:`extrapolation_bound`, :func:`base_for_length`.)
- Men et al. 2024, *Base of RoPE Bounds Context Length* (https://arxiv.org/abs/2405.14591): the ability to
  attend more to similar tokens decays with distance as ``B_m = sum_i cos(m * theta_i)``; a base supports a
  context length ``L`` only if ``B_m >= 0`` for every ``m`` in ``[0, L]``. (:func:`decay_curve`,
  :func:`first_negative`, :func:`min_base_for_length`.)

:func:`bound_report` gathers everything in one JSON-serialisable dict (``longkit rope bound --json``);
:func:`plot_wavelengths` draws the per-dimension wavelengths against the trained and target lengths.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch

from longkit.errors import LongkitError, MethodError

TWO_PI = 2.0 * math.pi
LIU_2023 = "Scaling Laws of RoPE-based Extrapolation (Liu et al. 2023) https://arxiv.org/abs/2310.05209"
MEN_2024 = "Base of RoPE Bounds Context Length (Men et al. 2024) https://arxiv.org/abs/2405.14591"
#: The base Liu et al.'s pre-trained models (LLaMA 2) use; the default pre-training base of :func:`base_for_length`.
LIU_PRETRAIN_BASE = 10000.0
#: Float64 elements (positions x frequency pairs) per chunk of the decay curve: 2 MiB, cache-sized.
_CHUNK_ELEMENTS = 1 << 18
#: The first chunk of a scan for negative B_m: small, because most failing bases fail early.
_FIRST_ROWS = 512
#: Min-base search: witnesses kept (positions that gave the recent steps) and the positions looked at around each.
_WITNESSES = 8
_NEAR = 32
#: Min-base search: a log-base step this long is enough; shorter ones widen the scan of positions.
_CHEAP_STEP = 1e-3
#: Min-base search: how many of the best first-order candidates get the (tighter) second-order bound.
_REFINE = 8
#: Min-base search: witnesses that give this fraction of the last complete scan's step are good enough.
_GOOD_ENOUGH = 0.25
#: Min-base search: the bases tried go up to this before giving up.
_MAX_BASE = 1e15


def _check_head_dim(head_dim: Any) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, Integral) or head_dim < 2 or head_dim % 2:
        raise MethodError(f"rope scaling law: parameter 'head_dim' must be an even integer >= 2 (got {head_dim!r})")
    return int(head_dim)


def _check_base(base: Any, name: str = "base") -> float:
    if isinstance(base, bool) or not isinstance(base, Real) or not math.isfinite(base) or base <= 1:
        raise MethodError(f"rope scaling law: parameter '{name}' must be a finite number > 1 (got {base!r})")
    return float(base)


def _check_length(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise MethodError(f"rope scaling law: parameter '{name}' must be an integer >= 1 token (got {n!r})")
    return int(n)


def frequencies(head_dim: int, base: float) -> torch.Tensor:
    """RoPE angular frequencies ``theta_i = base^(-2i/d)``, ``i = 0..d/2-1``, as transformers' ``inv_freq``.

    Pair ``i`` rotates dimensions ``2i`` and ``2i+1`` by ``m * theta_i`` at position ``m``.

    Based on Su et al. 2021, RoFormer (https://arxiv.org/abs/2104.09864).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base (``rope_theta``), > 1.
    """
    d = _check_head_dim(head_dim)
    base = _check_base(base)
    # (d/2,)
    return base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def wavelengths(head_dim: int, base: float) -> torch.Tensor:
    """Per-pair wavelengths ``lambda_i = 2pi / theta_i = 2pi * base^(2i/d)`` in tokens, ``i = 0..d/2-1``.

    The number of positions pair ``i`` needs for one full turn; it grows geometrically from ``2pi`` (pair 0)
    to ``2pi * base^((d-2)/d)`` (the last pair).

    Based on Liu et al. 2023, Scaling Laws of RoPE-based Extrapolation (https://arxiv.org/abs/2310.05209).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base (``rope_theta``), > 1.
    """
    return TWO_PI / frequencies(head_dim, base)


def critical_dimension(head_dim: int, base: float, train_len: int) -> int:
    """Liu et al.'s critical dimension ``d_extra = 2 * ceil((d/2) * log_base(T_train / 2pi))``, clipped to [0, d].

    ``(d/2) * log_base(T_train / 2pi)`` is where the wavelength ``2pi * base^(2i/d)`` crosses ``T_train``, so
    ``d_extra / 2`` is the number of pairs with ``lambda_i < T_train``: dimensions ``0..d_extra-1`` saw a full
    period during training, dimensions ``d_extra..d-1`` did not and are the ones that go out of distribution
    beyond ``T_train``. (Exactly on a boundary, ``lambda_i == T_train``, the pair does not count.)

    Based on Liu et al. 2023, Scaling Laws of RoPE-based Extrapolation (https://arxiv.org/abs/2310.05209), Eq. for
    ``d_extra``; LLaMA 2 (d=128, base 1e4, T_train=4096) gives 92.

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base the model was trained with, > 1.
    train_len: training context length ``T_train`` in tokens, >= 1.
    """
    d = _check_head_dim(head_dim)
    base = _check_base(base)
    train_len = _check_length(train_len, "train_len")
    crossing = (d / 2) * math.log(train_len / TWO_PI) / math.log(base)
    return int(min(d, max(0, 2 * math.ceil(crossing))))


def extrapolation_bound(head_dim: int, base: float, train_len: int, *, pretrain_base: float | None = None) -> float:
    """Liu et al.'s extrapolation upper bound ``T_extra = 2pi * base^(d_extra/d)`` in tokens.

    ``d_extra`` is :func:`critical_dimension` at ``pretrain_base`` (default: ``base``) and ``T_train``;
    ``T_extra`` is the wavelength of dimension ``d_extra``, the first that did not see a full period, so
    ``T_extra >= T_train`` when ``pretrain_base == base``. With ``pretrain_base`` set this is the paper's
    "larger base" law: a model pre-trained at ``pretrain_base``, tuned with a larger ``base`` at the same
    ``T_train``, extrapolates up to ``T_extra``. For a base smaller than the pre-training one (their "smaller
    base" regime) and when every dimension saw a full period (``d_extra == d``) the paper predicts
    extrapolation without an upper bound in theory; the formula's value (here ``2pi * base``, the longest
    wavelength, when ``d_extra == d``) is returned regardless. Men et al. 2024 show such bases still lose the
    ability to tell similar tokens apart at long range (:func:`first_negative`).

    Based on Liu et al. 2023, Scaling Laws of RoPE-based Extrapolation (https://arxiv.org/abs/2310.05209).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base of the model whose bound is asked (the tuned base), > 1.
    train_len: training context length ``T_train`` in tokens, >= 1.
    pretrain_base: base of pre-training, which sets ``d_extra`` (> 1); default: ``base``.
    """
    d = _check_head_dim(head_dim)
    base = _check_base(base)
    d_extra = critical_dimension(d, base if pretrain_base is None else _check_base(pretrain_base, "pretrain_base"),
                                 train_len)
    return TWO_PI * base ** (d_extra / d)


def base_for_length(head_dim: int, train_len: int, target_len: int, *,
                    pretrain_base: float = LIU_PRETRAIN_BASE) -> float:
    """Liu et al.'s base for a target length: ``base = (T / 2pi)^(d / d_extra)``, the inverse of the bound.

    ``d_extra`` is :func:`critical_dimension` of the pre-trained model (``pretrain_base``, ``T_train``); tuning
    with the returned base gives ``extrapolation_bound(d, base, T_train, pretrain_base=...) == T`` (the paper's
    "larger base" law, ``base = 10000^(log_{T_train/2pi}(T/2pi))`` up to the rounding of ``d_extra``). A result
    at or below ``pretrain_base`` means the pre-trained base already reaches ``T``.

    Based on Liu et al. 2023, Scaling Laws of RoPE-based Extrapolation (https://arxiv.org/abs/2310.05209).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    train_len: training context length ``T_train`` in tokens, >= 7 (a wavelength is at least 2pi).
    target_len: target context length ``T`` in tokens, >= 7.
    pretrain_base: base of pre-training, > 1 (10000 in the paper).
    """
    d = _check_head_dim(head_dim)
    train_len = _check_length(train_len, "train_len")
    target_len = _check_length(target_len, "target_len")
    pretrain_base = _check_base(pretrain_base, "pretrain_base")
    for name, value in (("train_len", train_len), ("target_len", target_len)):
        if value <= TWO_PI:
            raise MethodError(f"rope scaling law: parameter '{name}' must be >= 7 tokens for base_for_length "
                              f"(the shortest wavelength is 2pi; got {value})")
    d_extra = critical_dimension(d, pretrain_base, train_len)
    return (target_len / TWO_PI) ** (d / d_extra)


def _positions(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.float64)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread, then restore the caller's setting.

    The decay curve is many small vectorised ops (about 1 ns per cosine on one core); handing each to a
    second OpenMP thread costs milliseconds when the other core is busy (measured 7.7 ms vs 0.03 ms per
    32K-element ``cos`` on a loaded 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rows(theta: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // theta.numel())


def _decay(theta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``B_m`` at the float64 positions ``m`` (M,), in chunks of :func:`_rows` positions."""
    rows = _rows(theta)
    # (rows, d/2) angles m * theta_i -> (rows,) sums of cosines
    parts = [torch.cos(m[s:s + rows, None] * theta[None, :]).sum(dim=1) for s in range(0, m.numel(), rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def decay_curve(head_dim: int, base: float, max_len: int) -> torch.Tensor:
    """Men et al.'s ``B_m = sum_{i=0}^{d/2-1} cos(m * theta_i)`` for every relative position ``m = 0..max_len``.

    ``B_m`` is (up to a positive factor) how much more attention a token's exact copy gets than a random
    token at distance ``m``; it starts at ``d/2`` and decays. Evaluated in float64 in chunks of positions,
    so ``max_len`` of millions fits in memory (the result is ``8 * (max_len + 1)`` bytes).

    Based on Men et al. 2024, Base of RoPE Bounds Context Length (https://arxiv.org/abs/2405.14591), Theorem 1.

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base, > 1.
    max_len: the last relative position, >= 1.
    """
    theta = frequencies(head_dim, base)
    max_len = _check_length(max_len, "max_len")
    with _one_thread():
        # (max_len + 1,)
        return _decay(theta, _positions(0, max_len + 1))


def _first_negative(theta: torch.Tensor, max_len: int) -> int | None:
    """The first ``m`` in ``[0, max_len]`` with ``B_m < 0``; chunks grow from small so early failures are cheap."""
    start, rows, cap = 0, _FIRST_ROWS, _rows(theta)
    while start <= max_len:
        stop = min(start + rows, max_len + 1)
        negative = torch.nonzero(_decay(theta, _positions(start, stop)) < 0)
        if negative.numel():
            return start + int(negative[0, 0])
        start, rows = stop, min(2 * rows, cap)
    return None


def first_negative(head_dim: int, base: float, max_len: int) -> int | None:
    """The first relative position ``m <= max_len`` where Men et al.'s ``B_m`` goes negative, or None.

    A base supports, by Men et al.'s criterion, contexts up to ``first_negative - 1`` tokens of distance: the
    "effective length bound" of that base. None means ``B_m >= 0`` on all of ``[0, max_len]``.

    Based on Men et al. 2024, Base of RoPE Bounds Context Length (https://arxiv.org/abs/2405.14591).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base, > 1.
    max_len: the last relative position searched, >= 1.
    """
    theta, max_len = frequencies(head_dim, base), _check_length(max_len, "max_len")
    with _one_thread():
        return _first_negative(theta, max_len)


class _Search:
    """Walks up the bases, each step as long as some ``B_m`` provably stays negative over it.

    With ``x = ln(base)``, ``phi_i = m theta_i = m e^(-a_i x)`` and ``a_i = 2i/d``:
    ``dB_m/dx = sum_i a_i phi_i sin(phi_i)`` and ``|d2B_m/dx2| <= M2 = sum_i a_i^2 phi_i (1 + phi_i)``, and every
    ``phi_i`` only shrinks as the base grows, so ``|dB_m/dx| <= D = sum_i a_i phi_i`` and ``M2`` hold for all
    larger bases. A ``B_m = -v < 0`` therefore stays negative for a log-base step ``h`` with ``D h < v``
    (first order) or ``B'_m h + M2 h^2 / 2 < v`` (second order, with the exact ``B'_m``): no base in that step
    can pass. The step is the longest such bound over the ``m`` looked at. A base close to one that failed
    usually fails near the same positions, so the positions that gave the last steps (witnesses) are looked at
    first, then ever wider chunks around the latest one until the step is long enough (a quarter of the last
    complete scan's, or :data:`_CHEAP_STEP`) or all of ``m`` in ``[1, L]`` is covered (``B_0 = d/2 > 0``).
    """

    def __init__(self, head_dim: int, target_len: int) -> None:
        self.max_len = target_len
        # The same expression as frequencies(): theta_i = base ** (-2i/d).
        self.exponents = -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.witnesses: deque[int] = deque(maxlen=_WITNESSES)
        self.near = torch.empty(0, dtype=torch.float64)
        # The step of the last complete scan.
        self.reference = math.inf

    def _witness(self, m: int) -> None:
        if m in self.witnesses:
            self.witnesses.remove(m)
        self.witnesses.append(m)
        offsets = torch.arange(-_NEAR, _NEAR + 1)
        near = (torch.tensor(list(self.witnesses))[:, None] + offsets[None, :]).flatten()
        self.near = torch.unique(near[(near >= 1) & (near <= self.max_len)]).double()

    def step(self, base: float) -> float | None:
        """None when ``B_m >= 0`` for every ``m`` in ``[0, L]`` at ``base``, else a provably failing log-step."""
        theta, a = base ** self.exponents, -self.exponents
        enough = min(_CHEAP_STEP, self.reference * _GOOD_ENOUGH)
        best, best_m = _failing_step(theta, a, self.near) if self.near.numel() else (0.0, None)
        if best >= enough:
            return best
        center = self.witnesses[-1] if self.witnesses else 1
        complete = True
        for start, stop in _outward(center, 1, self.max_len, _FIRST_ROWS, _rows(theta)):
            value, m = _failing_step(theta, a, _positions(start, stop))
            if value > best:
                best, best_m = value, m
            if best >= enough:
                complete = False
                break
        if best_m is None:
            return None
        self._witness(best_m)
        if complete:
            self.reference = best
        return best


def _outward(center: int, lo: int, hi: int, first: int, cap: int) -> Iterator[tuple[int, int]]:
    """Half-open chunks covering ``[lo, hi]``: one of ``first`` positions around ``center``, then alternately to
    its right and left, doubling up to ``cap`` positions each."""
    left, right = max(lo, center - first // 2), min(hi + 1, center + first // 2 + 1)
    yield left, right
    size = first
    while left > lo or right <= hi:
        size = min(2 * size, cap)
        if right <= hi:
            yield right, min(hi + 1, right + size)
            right = min(hi + 1, right + size)
        if left > lo:
            yield max(lo, left - size), left
            left = max(lo, left - size)


def _failing_step(theta: torch.Tensor, a: torch.Tensor, positions: torch.Tensor) -> tuple[float, int | None]:
    """The longest log-base step over which some ``B_m`` (m in ``positions``) provably stays negative, and m.

    (0, None) when no ``B_m`` is negative. ``a`` holds ``2i/d``; see :class:`_Search` for the bounds.
    """
    values = _decay(theta, positions)
    negative = values < 0
    m, v = positions[negative], -values[negative]
    if not m.numel():
        return 0.0, None
    # (k,) first-order steps v / (m sum_i a_i theta_i); the second-order bound only for the best few
    first = v / (m * (a * theta).sum())
    top = first.topk(min(_REFINE, first.numel())).indices
    # (k, d/2)
    phi = m[top, None] * theta[None, :]
    slope = (a * phi * torch.sin(phi)).sum(dim=1)
    curvature = (a * a * phi * (1 + phi)).sum(dim=1)
    # the root of -v + slope h + curvature h^2 / 2 = 0, in the form without cancellation
    second = 2 * v[top] / (torch.sqrt(slope * slope + 2 * curvature * v[top]) + slope)
    steps = torch.maximum(first[top], second)
    k = int(steps.argmax())
    return float(steps[k]), int(m[top[k]])


def min_base_for_length(head_dim: int, target_len: int, *, rtol: float = 1e-6) -> float:
    """Men et al.'s lower bound on the base: the smallest base with ``B_m >= 0`` for every ``m`` in ``[0, L]``.

    ``B_m = sum_i cos(m * base^(-2i/d))`` (:func:`decay_curve`). The set of passing bases is *not* an
    interval: just above the smallest one there are windows where some ``B_m`` dips below zero again (for
    d=128 and L=4096 passing and failing bases alternate up to about 2.2x the minimum, some passing windows
    narrower than 0.1%), so neither a bisection nor a grid finds it reliably. The search walks up from base 1
    in steps over which some ``B_m`` provably stays negative (see :class:`_Search`), at least ``rtol``
    (relative) each: the result passes, and every base below it fails except possibly inside the gaps, each
    narrower than ``rtol``, where a step of ``rtol`` was longer than the proof. To check whether a particular
    base supports ``L`` use :func:`first_negative`, not a comparison with this value. ``target_len == 1``
    holds for every base > 1 (all ``theta_i <= 1 < pi/2``); 1.0 is returned. Cost on one CPU core (d=128):
    about 0.15 s for L = 4K, 0.6 s for 32K, 2 s for 128K, 17 s for 1M.

    Based on Men et al. 2024, Base of RoPE Bounds Context Length (https://arxiv.org/abs/2405.14591), the lower
    bound of base from ``B_{m,theta} >= 0``.

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2 (d=2 has no base for L >= 2: ``B_2 = cos 2 < 0``).
    target_len: the context length ``L`` in tokens, >= 1.
    rtol: the smallest relative step of the walk, in (0, 1e-3].
    """
    d = _check_head_dim(head_dim)
    target_len = _check_length(target_len, "target_len")
    if isinstance(rtol, bool) or not isinstance(rtol, Real) or not 0 < rtol <= 1e-3:
        raise MethodError(f"rope scaling law: parameter 'rtol' must be in (0, 0.001] (got {rtol!r})")
    if target_len == 1:
        return 1.0
    if d == 2:
        # theta_0 = 1 for every base: B_m = cos(m), and B_2 < 0.
        raise MethodError(f"rope scaling law: no base keeps B_m >= 0 on [0, {target_len}] with head_dim=2; "
                          "parameter 'head_dim' must be >= 4")
    search, floor = _Search(d, target_len), math.log1p(rtol)
    base = 1.0 + rtol
    with _one_thread():
        while base <= _MAX_BASE:
            skip = search.step(base)
            if skip is None:
                return base
            base *= math.exp(max(skip, floor))
    raise MethodError(f"rope scaling law: no base up to {_MAX_BASE:.0e} keeps B_m >= 0 on [0, {target_len}] "
                      f"with head_dim={d}; parameter 'target_len' must be smaller or 'head_dim' larger")


def bound_report(head_dim: int, base: float, train_len: int, target_len: int | None = None) -> dict[str, Any]:
    """Every number of both laws for one model, as a JSON-serialisable dict (``longkit rope bound --json``).

    Keys: the inputs; ``critical_dimension`` and ``extrapolation_bound`` (Liu, at the model's own base);
    ``liu_unbounded`` (every dimension saw a full period: no bound in theory); ``men_first_negative`` (the
    first ``m`` with ``B_m < 0`` at this base, searched up to ``men_search_limit`` = 4x the longest of the
    lengths, None if none) and ``men_covers_train``. With a target: ``liu_base_for_target`` (tuning base
    for the target, pre-trained at ``base``), ``liu_covers_target`` (``extrapolation_bound >= target``),
    ``men_min_base_for_target`` and ``men_covers_target`` (``B_m >= 0`` up to the target at this base, checked
    directly because the passing bases are not an interval). Without a target these are None.

    Based on Liu et al. 2023 (https://arxiv.org/abs/2310.05209) and Men et al. 2024
    (https://arxiv.org/abs/2405.14591).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: the model's RoPE base, > 1.
    train_len: its training context length in tokens, >= 1.
    target_len: a context length to reach, >= 1 (optional).
    """
    d = _check_head_dim(head_dim)
    base = _check_base(base)
    train_len = _check_length(train_len, "train_len")
    if target_len is not None:
        target_len = _check_length(target_len, "target_len")
    d_extra = critical_dimension(d, base, train_len)
    limit = 4 * max(train_len, target_len or 0)
    first = first_negative(d, base, limit)
    report: dict[str, Any] = {
        "head_dim": d,
        "base": base,
        "train_len": train_len,
        "target_len": target_len,
        "critical_dimension": d_extra,
        "extrapolation_bound": extrapolation_bound(d, base, train_len),
        "liu_unbounded": d_extra == d,
        "men_first_negative": first,
        "men_search_limit": limit,
        "men_covers_train": first is None or first > train_len,
        "liu_base_for_target": None,
        "liu_covers_target": None,
        "men_min_base_for_target": None,
        "men_covers_target": None,
        "papers": [LIU_2023, MEN_2024],
    }
    if target_len is not None:
        report["liu_base_for_target"] = base_for_length(d, train_len, target_len, pretrain_base=base) \
            if min(train_len, target_len) > TWO_PI and d_extra > 0 else None
        report["liu_covers_target"] = report["extrapolation_bound"] >= target_len
        report["men_min_base_for_target"] = min_base_for_length(d, target_len)
        report["men_covers_target"] = first is None or first > target_len
    return report


def plot_wavelengths(head_dim: int, base: float, train_len: int, target_len: int | None = None,
                     path: str | Path = "rope_wavelengths.png") -> Path:
    """Draw each dimension's wavelength (log scale) against the trained and target lengths; write a PNG.

    Pairs whose wavelength fits in ``train_len`` (they saw a full period) and those that did not are drawn in
    two colours, the critical dimension ``d_extra`` is a vertical line and the extrapolation bound (the
    wavelength at ``d_extra``) a dotted horizontal one. Uses matplotlib's ``Figure`` with the Agg canvas (no
    pyplot), 150 dpi.

    Based on Liu et al. 2023, Scaling Laws of RoPE-based Extrapolation (https://arxiv.org/abs/2310.05209).

    Parameters
    ----------
    head_dim: rotary dimension ``d``, an even integer >= 2.
    base: RoPE base, > 1.
    train_len: training context length in tokens, >= 1.
    target_len: target context length in tokens, >= 1 (optional).
    path: the PNG to write (parent directories are created).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise LongkitError("the wavelength plot needs matplotlib: pip install 'longkit[eval]'") from exc
    waves = wavelengths(head_dim, base).tolist()
    d_extra = critical_dimension(head_dim, base, train_len)
    bound = extrapolation_bound(head_dim, base, train_len)
    if target_len is not None:
        target_len = _check_length(target_len, "target_len")
    # Pair i is drawn at dimension 2i; pairs 0..d_extra/2-1 saw a full period.
    dims, seen = list(range(0, head_dim, 2)), d_extra // 2

    fig = Figure(figsize=(7.5, 4.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    marker = dict(marker="o", markersize=3.5, linestyle="none")
    if seen:
        ax.plot(dims[:seen], waves[:seen], color="tab:blue", label="full period seen in training", **marker)
    if seen < len(dims):
        ax.plot(dims[seen:], waves[seen:], color="tab:orange", label="no full period in training", **marker)
    ax.axhline(train_len, color="black", linewidth=1.2, label=f"trained length {_tokens(train_len)}")
    if target_len is not None:
        ax.axhline(target_len, color="tab:red", linewidth=1.2, linestyle="--",
                   label=f"target length {_tokens(target_len)}")
    ax.axhline(bound, color="tab:green", linewidth=1.2, linestyle=":",
               label=f"extrapolation bound {_tokens(round(bound))} (Liu et al.)")
    ax.axvline(d_extra - 1, color="grey", linewidth=1.0, linestyle="-.",
               label=f"critical dimension $d_{{extra}}$ = {d_extra}")
    ax.set_yscale("log")
    # Room above the highest line or point, so no line sits on the frame.
    lines = [train_len, bound] + ([target_len] if target_len is not None else [])
    ax.set_ylim(0.5 * min(waves[0], *lines), 2.5 * max(waves[-1], *lines))
    ax.set_xlim(-2, head_dim)
    ax.set_xlabel("dimension index 2i (pair i rotates dimensions 2i, 2i+1)")
    ax.set_ylabel(r"wavelength $2\pi \cdot base^{2i/d}$ (tokens)")
    ax.set_title(f"RoPE wavelengths: d = {head_dim}, base = {base:g}", fontsize=12)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def _tokens(n: int) -> str:
    """4096 -> 4K, 131072 -> 128K, 1048576 -> 1M, 4711 -> 4711."""
    if n >= 1 << 20 and n % (1 << 19) == 0:
        return f"{n / (1 << 20):g}M"
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}K"
    return str(n)
