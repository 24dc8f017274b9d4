"""The one log-sum-exp merge of partial attentions (blockwise tiles, ring steps, sparse or remapped parts).

Attention over a key set split into parts A and B is recovered from each part's normalised output and
log-sum-exp: ``lse = log(e^lse_a + e^lse_b)`` and ``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``.
A part that sees no key has ``lse = -inf`` and contributes nothing; if neither part sees a key the merged
row is ``out = 0, lse = -inf``.
"""

from __future__ import annotations

from typing import Any

import torch

from longkit.errors import MethodError


def _merge_weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Subtract the larger lse so one exponent is exactly 0; a row where both are -inf keeps finite arithmetic.
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return w_a / safe, w_b / safe, lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets into the attention over their union.

    Each part is softmax-normalised over its own keys; weighting by ``exp(lse_part - lse)`` rescales both to
    the union's normaliser. Stable (the larger lse is subtracted first), differentiable, and exact for parts
    that see no key (``lse = -inf``). Based on https://arxiv.org/abs/2205.14135 (FlashAttention's online
    softmax) and https://github.com/zhuzilin/ring-flash-attention (``update_out_and_lse``).

    Parameters:
        out_a, out_b: (..., D) partial outputs, any float dtype (the result is float32 or wider).
        lse_a, lse_b: (...) their log-sum-exps, -inf where the part sees no key.

    Returns ``(out (..., D), lse (...))``.
    """
    c_a, c_b, lse = _merge_weights(lse_a.float(), lse_b.float())
    out = c_a[..., None] * out_a.float() + c_b[..., None] * out_b.float()
    return out, lse


def merge_partials_(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place :func:`merge_partials` for running accumulators: ``out`` and ``lse`` (float32) are updated.

    The same weights as :func:`merge_partials`; used inside loops (blockwise tiles, ring steps) so the
    accumulator is not reallocated per step. Not for tensors that need gradients.

    Parameters:
        out: (..., D) float32 accumulator. lse: (...) float32 accumulator, -inf where nothing is seen yet.
        out_b: (..., D) the new part. lse_b: (...) its log-sum-exp.
    """
    c_a, c_b, new = _merge_weights(lse, lse_b.float())
    out.mul_(c_a[..., None]).add_(c_b[..., None] * out_b)
    lse.copy_(new)
    return out, lse


def fused_cpu_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """torch's fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the
    log-sum-exp beside the output, ready for :func:`merge_partials`) when it can run these inputs, else None:
    on CPU, float32 or bfloat16 of one dtype, and no gradients (its log-sum-exp is not differentiable)."""
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grads and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype:
        return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return None


def require_fused_cpu_kernel(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """:func:`fused_cpu_kernel` for a gather-free path called directly: a clear error when it cannot run."""
    kernel = fused_cpu_kernel(q, k, v)
    if kernel is None:
        raise MethodError(
            f"{method}: the gather-free path needs CPU float32/bfloat16 q, k, v of one dtype, without gradients, "
            "and torch's fused CPU flash kernel"
        )
    return kernel
