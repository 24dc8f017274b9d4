"""What the CPU thread pool runs with: thread count, OpenMP wait policy (and why), load average, CPU capability.

Recorded with every evaluation (``run.json``'s ``hardware``) and training run (``train_run.json``), because CPU
timings depend on all of them (issue #24: decode at 8K went from 84 to 595 ms/token with spin-waiting on a shared
CPU). The policy itself is chosen by the ``longkit`` script before torch loads (:mod:`longkit_launch`).
"""

from __future__ import annotations

import os
from typing import Any


def thread_settings() -> dict[str, Any]:
    """A JSON-able snapshot: ``torch_threads``, ``omp_num_threads`` (env or None), ``omp_wait_policy`` (the value
    OpenMP read at start, or ``"default"``), ``omp_wait_policy_reason``, ``load_average`` (1/5/15 min),
    ``cpu_capability`` and ``cpus_available`` (this process's CPU affinity)."""
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch builds have no capability query
        capability = "unknown"
    return {
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
        "omp_wait_policy_reason": os.environ.get("LONGKIT_OMP_WAIT_POLICY_REASON",
                                                 "not chosen by the longkit script (Python API or python -m)"),
        "load_average": load,
        "cpu_capability": capability,
        "cpus_available": available,
    }
