"""Helpers shared by the attention tests: random q/k/v, tiny-model RoPE frequencies, a largest-tensor probe."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: inv_freq of the tiny models (head_dim 16, base 1e4).
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))


def qkv(T, S, H_kv, dtype=torch.float32, seed=0, D=16, H=4, B=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, T), (H_kv, S), (H_kv, S)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any torch op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
