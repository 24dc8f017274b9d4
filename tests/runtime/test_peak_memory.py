"""PeakMemory: the peak of one request above the live memory at its start, whatever the previous request left."""

import torch

from longkit.runtime.generate import PeakMemory

MIB = 2**20
_KEPT: list[torch.Tensor] = []


def _request(mib: int) -> None:
    # Many 64 KiB tensors (heap allocations, below malloc's mmap threshold), then one small allocation that outlives
    # the request above them on the heap (a record, a cache's bookkeeping): the freed pages below it stay resident.
    held = [torch.ones(16 * 1024) for _ in range(16 * mib)]
    held[0].add_(1)
    _KEPT.append(torch.ones(16 * 1024))


def test_each_of_equal_requests_measures_its_own_peak():
    peaks = []
    for _ in range(3):
        with PeakMemory(torch.device("cpu")) as pm:
            _request(120)
        peaks.append(pm.peak_bytes)
    # Measured above a level that still held the previous request's freed pages, the later ones would read ~0.
    assert min(peaks) >= 100 * MIB, [p / MIB for p in peaks]
