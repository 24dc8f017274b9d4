"""PeakMemory: the peak of one request above the live memory at its start, whatever the previous request left."""

import gc

import torch

from longkit.runtime.generate import PeakMemory

MIB = 2**20


class _Cycle:
    """A previous request's cache: tensors held by a reference cycle, freed only by the garbage collector."""

    def __init__(self, mib: int):
        self.me = self
        self.tensors = [torch.ones(MIB // 4) for _ in range(mib)]


def _request(mib: int) -> None:
    # The collector frees the previous request's cycle during this one, then this request allocates.
    gc.collect()
    held = [torch.ones(MIB // 4) for _ in range(mib)]
    held[0].add_(1)


def test_peak_counts_a_request_after_garbage_from_the_previous_one():
    gc.disable()
    try:
        _Cycle(300)  # garbage at once, but still resident
        with PeakMemory(torch.device("cpu")) as pm:
            _request(120)
    finally:
        gc.enable()
    # Entry level measured with the 300 MiB still resident would leave this request ~0.
    assert pm.peak_bytes is not None and pm.peak_bytes >= 100 * MIB, pm.peak_bytes / MIB


def test_two_equal_requests_measure_alike():
    peaks = []
    for _ in range(2):
        with PeakMemory(torch.device("cpu")) as pm:
            _request(120)
        peaks.append(pm.peak_bytes)
    assert min(peaks) >= 100 * MIB, [p / MIB for p in peaks]
