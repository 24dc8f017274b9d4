"""Plain-PyTorch references of the runtime room's fast paths: the ground truth their tests compare against.

:func:`linear_reference` is ``y = x W^T + b`` with float32 products and sums, rounded once to the input's dtype:
what :mod:`longkit.runtime.gemv_native` computes, up to the order of the sums.
"""

from __future__ import annotations

import torch


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., d_in), weight (d_out, d_in), bias (d_out,) or None -> (..., d_out) in x's dtype, summed in float32."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
