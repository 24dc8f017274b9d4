"""The ``longkit`` script's entry point: choose the OpenMP wait policy *before* torch is imported, then run the CLI.

Why a separate top-level module: GNU OpenMP (torch's CPU thread pool) reads ``OMP_WAIT_POLICY`` once, when the
library loads, i.e. at ``import torch``; ``import longkit`` imports torch, so the choice has to be made by a module
that imports neither.

Why it matters (issue #24, measured on a 2-core AVX-512 host, SmolLM2-135M bf16 decode at 8K): with OpenMP's default
spin-waiting a decode step took 84 ms on a quiet machine and 595 ms when other processes kept the load at 4.7;
with ``passive`` waiting 104 ms and 141 ms. Spinning wins by ~20% when the cores are ours and loses 4x when they are
shared, so the policy follows the load at start:

- ``OMP_WAIT_POLICY`` already set by the user: kept as is.
- otherwise ``LONGKIT_OMP_WAIT_POLICY``: ``auto`` (default) = ``passive`` when the 1-minute load average at start
  is >= 0.5 (other work on the machine), else OpenMP's default (spin a while, then sleep); ``passive``/``active``
  force one; ``default`` leaves OpenMP's default.

The choice and its reason go into the environment (``LONGKIT_OMP_WAIT_POLICY_REASON``) so that the run records
(``run.json`` of ``longkit eval``, ``train_run.json`` of ``longkit train``) state them with the load average
(:func:`longkit.runtime.threads.thread_settings`). The thread count is torch's default (one per physical core),
overridable with ``OMP_NUM_THREADS``. The Python API (``import longkit``) changes nothing: set the variables
yourself before importing torch.
"""

from __future__ import annotations

import os

POLICIES = ("auto", "passive", "active", "default")
#: 1-minute load average from which the machine counts as shared (a quiet machine reads < 0.5).
BUSY_LOAD = 0.5


def choose_wait_policy(environ: dict[str, str], load1: float) -> tuple[str | None, str]:
    """(value for ``OMP_WAIT_POLICY`` or None for OpenMP's default, reason). Pure: reads only its arguments.

    Raises ValueError naming ``LONGKIT_OMP_WAIT_POLICY`` and its valid values for anything else."""
    if environ.get("OMP_WAIT_POLICY"):
        return environ["OMP_WAIT_POLICY"], "OMP_WAIT_POLICY set by the user"
    asked = environ.get("LONGKIT_OMP_WAIT_POLICY", "auto").strip().lower() or "auto"
    if asked not in POLICIES:
        raise ValueError(f"LONGKIT_OMP_WAIT_POLICY must be one of {', '.join(POLICIES)} (got {asked!r})")
    if asked in ("passive", "active"):
        return asked, f"LONGKIT_OMP_WAIT_POLICY={asked}"
    if asked == "default":
        return None, "LONGKIT_OMP_WAIT_POLICY=default (OpenMP's default: spin, then sleep)"
    if load1 >= BUSY_LOAD:
        return "passive", f"auto: load average {load1:.2f} >= {BUSY_LOAD} at start (shared CPU: passive waiting)"
    return None, f"auto: load average {load1:.2f} < {BUSY_LOAD} at start (quiet CPU: OpenMP's default spin-wait)"


def configure(environ: dict[str, str] | None = None) -> None:
    """Set ``OMP_WAIT_POLICY`` (and the reason) in ``environ`` (default ``os.environ``); call before importing torch."""
    env = os.environ if environ is None else environ
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # no load average on this platform: treat as quiet
        load1 = 0.0
    value, reason = choose_wait_policy(dict(env), load1)
    if value is not None:
        env["OMP_WAIT_POLICY"] = value
    env["LONGKIT_OMP_WAIT_POLICY_REASON"] = reason


def main() -> None:
    try:
        configure()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    from longkit.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
