"""Training losses: plain causal-LM cross-entropy and LongCE (Fang et al. 2024, https://arxiv.org/abs/2410.23771).

LongCE re-weights each token's cross-entropy by how much the long context helps predict it: with ``CE_long`` the
token's loss given the whole sequence and ``CE_short`` its loss given only a truncated window before it,

    w = min(exp(CE_short - CE_long), cap) = min(p_long / p_short, cap),

and the loss is ``mean(w · CE_long)``. Checked against the official code (PKU-ML/LongPPL ``finetune/finetune.py``,
``loss_weight`` and its use in ``train``):

- the short context of a target token is a window sliding in steps of ``stride`` (their ``internal``, 1024): the
  targets ``[a + trunc_len, a + trunc_len + stride)`` are scored by one forward over tokens ``[a, a + trunc_len +
  stride)``, so each sees between ``trunc_len`` (4096) and ``trunc_len + stride - 1`` tokens; the window starts
  run over ``range(0, T - trunc_len, stride)`` and the last is clipped to the sequence;
- targets before position ``trunc_len`` have no short window and weight 1;
- the weights are computed under ``torch.no_grad`` (no gradient flows through them); ``cap`` (their ``thre``) is 5;
- the loss is the plain mean of ``w · CE`` over all targets (here: over the targets not equal to ``ignore_index``;
  the same when nothing is ignored).

Log-probabilities are computed in float32 here (the reference uses the logits' dtype).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longkit.errors import MethodError

IGNORE_INDEX = -100


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MethodError(f"losses: parameter '{name}' must be an int >= {low} (got {value!r})")
    return value


def _check_lm(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        raise MethodError("losses: parameter 'logits' must be a float tensor (B, T, V)")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.shape != logits.shape[:2]
        or labels.dtype not in (torch.int64, torch.int32)
    ):
        raise MethodError(f"losses: parameter 'labels' must be an int tensor (B, T) = {tuple(logits.shape[:2])}")
    if logits.shape[1] < 2:
        raise MethodError(f"losses: sequences need T >= 2 tokens (got T = {logits.shape[1]})")


def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T - 1) float32 negative log-likelihood of ``labels[:, 1:]`` from ``logits[:, :-1]`` (the causal-LM
    shift, as transformers' ``labels``); ignored targets give 0.

    Parameters: logits (B, T, V) float, labels (B, T) int (``ignore_index`` marks targets not scored)."""
    _check_lm(logits, labels)
    target = labels[:, 1:]
    keep = target != ignore_index
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(~keep, 0.0)


def _mean(values: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    keep = labels[:, 1:] != ignore_index
    count = int(keep.sum())
    if count == 0:
        raise MethodError(f"losses: every target equals ignore_index = {ignore_index}; nothing to score")
    return values.sum() / count


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Plain causal-LM cross-entropy: the mean of :func:`token_nll` over the targets not equal to ``ignore_index``."""
    return _mean(token_nll(logits, labels, ignore_index=ignore_index), labels, ignore_index)


def longce_weights(nll_long: torch.Tensor, nll_short: torch.Tensor, *, cap: float = 5.0) -> torch.Tensor:
    """LongCE weights ``min(exp(nll_short - nll_long), cap)``, detached; NaN in ``nll_short`` (a target without a
    short window) gives weight 1.

    Parameters: nll_long, nll_short: same-shape float tensors of per-token losses. cap: a number > 0 (default 5)."""
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap) or cap <= 0:
        raise MethodError(f"losses: parameter 'cap' must be a finite number > 0 (got {cap!r})")
    if nll_long.shape != nll_short.shape:
        raise MethodError(
            f"losses: 'nll_short' must have the shape of the long-context losses {tuple(nll_long.shape)}; got "
            f"{tuple(nll_short.shape)}"
        )
    diff = nll_short.detach().float() - nll_long.detach().float()
    w = torch.exp(diff).clamp(max=cap)
    return torch.where(torch.isnan(nll_short), torch.ones_like(w), w)


def longce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    nll_short: torch.Tensor,
    *,
    cap: float = 5.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """LongCE: the mean over scored targets of ``w · CE_long`` with :func:`longce_weights` (no gradient through
    ``w``). ``nll_short`` (B, T - 1): the short-context losses, from :func:`short_context_nll`."""
    nll = token_nll(logits, labels, ignore_index=ignore_index)
    w = longce_weights(nll, nll_short, cap=cap)
    return _mean(nll * w, labels, ignore_index)


def _window(inputs: dict[str, Any], a: int, b: int, T: int) -> dict[str, Any]:
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] == T:
            value = value[:, a:b]
        elif isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-2:] == (T, T):
            value = value[:, :, a:b, a:b]
        out[key] = value
    return out


@torch.no_grad()
def short_context_nll(model: Any, input_ids: torch.Tensor, *, trunc_len: int = 4096, stride: int = 1024,
                      inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """(B, T - 1) float32 losses of ``input_ids[:, 1:]`` given a truncated context, NaN for targets before
    position ``trunc_len`` (they have none): one forward of ``model`` per window of ``trunc_len + stride``
    tokens sliding by ``stride`` (positions restart at 0 in each window, as the reference's separate forwards).

    Parameters:
        model: a causal LM called as ``model(input_ids).logits``.
        input_ids: (B, T) int token ids (no padding: every row is scored with the same windows).
        trunc_len: int >= 1, the shortest short context (default 4096). stride: int >= 1, targets per window
            (default 1024).
    """
    _check_int("trunc_len", trunc_len, 1)
    _check_int("stride", stride, 1)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise MethodError("losses: parameter 'input_ids' must be an int tensor (B, T)")
    B, T = input_ids.shape
    out = torch.full((B, max(T - 1, 0)), float("nan"), device=input_ids.device)
    for a in range(0, T - trunc_len, stride):
        n = min(stride, T - a - trunc_len)
        b = a + trunc_len + n
        logits = model(input_ids[:, a:b], **_window(inputs or {}, a, b, T)).logits
        # logits at window rows trunc_len - 1 .. trunc_len + n - 2 predict tokens a + trunc_len .. a + trunc_len + n - 1
        logp = torch.log_softmax(logits[:, trunc_len - 1 : trunc_len + n - 1].float(), dim=-1)
        target = input_ids[:, a + trunc_len : a + trunc_len + n]
        out[:, a + trunc_len - 1 : a + trunc_len + n - 1] = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return out
