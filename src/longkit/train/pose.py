"""PoSE: positional skip-wise training (Zhu et al. 2024, https://arxiv.org/abs/2309.10400).

A training window of ``L_c`` tokens is given position ids that span a target length ``L_t`` > ``L_c``: the window
is cut into two chunks, positions are consecutive inside each chunk, and a random skip between the chunks
moves the second chunk further out, so over training every relative distance below ``L_t`` is seen while the
attention cost stays that of ``L_c`` tokens.

The rule, checked against the official code (dwzhu-pku/PoSE, ``src/train_pose.py``,
``train_preprocess_function_pose``, commit a3d4ba8): for a document of ``n`` tokens and ``L = min(n, L_c)``,
with Python's ``random.randint`` (both ends included) drawn in this order:

1. ``r1 = randint(1, (L + 1) // 2)``: the first chunk is the document's tokens ``[0, r1)``, at positions
   ``0 .. r1 - 1`` (the first chunk always starts at 0; the reference's comment: this makes the coverage of
   large relative positions more uniform than a random start).
2. ``e = randint(L, n)``: the second chunk is the document's tokens ``[e - (L - r1), e)`` (text taken from
   anywhere after the first chunk, up to the document's end).
3. ``skip = randint(0, L_t - L)``: the second chunk's positions are ``r1 + skip .. L - 1 + skip``, so the
   largest position is at most ``L_t - 1``.

The reference tokenizes each document truncated to ``5 * L_c`` tokens first; pass that truncated length as
``length`` to reproduce it (``tests/train/test_pose.py`` replays the official function's draws, seed for seed).

Only two chunks: the official training code has no N-chunk variant (the paper's general form), so none is
offered here. The published models add linear position interpolation on top (their issue #4); that is a
``rope`` method, applied separately.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from longkit.errors import MethodError


@dataclass(frozen=True)
class PoseSample:
    """One PoSE training window: ``token_index`` (L,) indices into the document of the tokens to train on,
    ``position_ids`` (L,) their positions, ``first`` the first chunk's length and ``skip`` the shift added to
    the second chunk's positions."""

    token_index: torch.Tensor
    position_ids: torch.Tensor
    first: int
    skip: int

    def take(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The window's entries of per-token tensors of the document (ids, the loss mask of an answer-only
        document, labels...), each indexed along its last dimension by ``token_index``: whatever is selected
        travels together, so a token keeps its own mask."""
        for t in tensors:
            if t.shape[-1] <= int(self.token_index.max()):
                raise MethodError(f"pose: a tensor of {t.shape[-1]} tokens is shorter than the sampled document "
                                  f"(index {int(self.token_index.max())})")
        return tuple(t[..., self.token_index] for t in tensors)


def _check_int(name: str, value: object, low: int, high: int | None, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise MethodError(f"pose: parameter '{name}' must be an int {rule} (got {value!r})")
    return value


def _rng(rng: random.Random | int) -> random.Random:
    # Python's Mersenne Twister, as the reference, so a seed reproduces the reference's draws exactly.
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise MethodError(f"pose: parameter 'rng' must be a random.Random or an int seed (got {type(rng).__name__})")


def pose_sample(length: int, window: int, target: int, *, rng: random.Random | int) -> PoseSample:
    """Draw one PoSE window from a document of ``length`` tokens: which tokens and at which positions.

    Parameters:
        length: int >= 2, tokens in the document (a shorter document than ``window`` gives a shorter window).
        window: int >= 2, the training window L_c.
        target: int >= window, the simulated context length L_t (positions stay below it).
        rng: a ``random.Random`` (consumed: three ``randint`` draws, as the reference) or an int seed.

    Returns a :class:`PoseSample`; errors (:class:`longkit.errors.MethodError`) name the parameter and range.
    """
    _check_int("window", window, 2, None, ">= 2")
    _check_int("target", target, window, None, f">= window = {window}")
    _check_int("length", length, 2, None, ">= 2")
    r = _rng(rng)
    L = min(length, window)
    first = r.randint(1, (L + 1) // 2)
    end = r.randint(L, length)
    skip = r.randint(0, target - L)
    start2 = end - (L - first)
    token_index = torch.cat([torch.arange(first), torch.arange(start2, end)])
    position_ids = torch.arange(L)
    position_ids[first:] += skip
    return PoseSample(token_index, position_ids, first, skip)


def pose_position_ids(window: int, target: int, *, rng: random.Random | int) -> torch.Tensor:
    """(window,) PoSE position ids for a window of ``window`` tokens simulating ``target``: the positions of
    :func:`pose_sample` for a document exactly one window long (same draws, so the same stream of ``rng``)."""
    return pose_sample(window, window, target, rng=rng).position_ids
