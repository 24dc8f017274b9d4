"""The OpenMP wait policy chosen by the ``longkit`` script before torch loads, and the thread settings recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longkit_launch
from longkit.eval.runner import hardware
from longkit.runtime.threads import thread_settings

SRC = str(Path(longkit_launch.__file__).resolve().parent)


@pytest.mark.parametrize("environ, load, value, reason", [
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 9.0, "ACTIVE", "set by the user"),
    ({"OMP_WAIT_POLICY": "passive", "LONGKIT_OMP_WAIT_POLICY": "active"}, 0.0, "passive", "set by the user"),
    ({}, 0.2, None, "quiet CPU"),
    ({}, 0.5, "passive", "shared CPU"),
    ({"LONGKIT_OMP_WAIT_POLICY": "AUTO"}, 3.1, "passive", "load average 3.10"),
    ({"LONGKIT_OMP_WAIT_POLICY": "active"}, 5.0, "active", "LONGKIT_OMP_WAIT_POLICY=active"),
    ({"LONGKIT_OMP_WAIT_POLICY": "passive"}, 0.0, "passive", "LONGKIT_OMP_WAIT_POLICY=passive"),
    ({"LONGKIT_OMP_WAIT_POLICY": "default"}, 7.0, None, "OpenMP's default"),
])
def test_choose_wait_policy(environ, load, value, reason):
    got, why = longkit_launch.choose_wait_policy(environ, load)
    assert got == value
    assert reason in why


def test_configure_writes_choice_and_reason():
    env = {"LONGKIT_OMP_WAIT_POLICY": "passive"}
    longkit_launch.configure(env)
    assert env["OMP_WAIT_POLICY"] == "passive"
    assert env["LONGKIT_OMP_WAIT_POLICY_REASON"] == "LONGKIT_OMP_WAIT_POLICY=passive"
    env = {"LONGKIT_OMP_WAIT_POLICY": "default"}
    longkit_launch.configure(env)
    assert "OMP_WAIT_POLICY" not in env


def _run(code: str, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LONGKIT_OMP"))}
    env.update(PYTHONPATH=SRC, OMP_DISPLAY_ENV="TRUE", **extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("asked", ["passive", "active"])
def test_policy_reaches_openmp(asked):
    # OpenMP prints the policy it read when it loads (OMP_DISPLAY_ENV): configure() before `import torch` must be
    # what it sees — set afterwards, it would be ignored.
    proc = _run("import longkit_launch; longkit_launch.configure(); import torch; torch.ones(64, 64) @ torch.ones(64, 64)",
                LONGKIT_OMP_WAIT_POLICY=asked)
    assert proc.returncode == 0, proc.stderr
    assert f"OMP_WAIT_POLICY = '{asked.upper()}'" in proc.stderr


def test_script_refuses_a_bad_policy_before_loading_torch():
    proc = _run("import longkit_launch, sys; longkit_launch.main()", LONGKIT_OMP_WAIT_POLICY="spin")
    assert proc.returncode == 1
    assert "error: LONGKIT_OMP_WAIT_POLICY must be one of" in proc.stderr
    assert "OPENMP DISPLAY ENVIRONMENT" not in proc.stderr  # torch never loaded


def test_thread_settings_recorded(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setenv("LONGKIT_OMP_WAIT_POLICY_REASON", "because")
    got = thread_settings()
    assert got["omp_wait_policy"] == "passive" and got["omp_wait_policy_reason"] == "because"
    assert got["torch_threads"] >= 1 and len(got["load_average"]) == 3
    assert got["cpu_capability"] not in ("", None)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("LONGKIT_OMP_WAIT_POLICY_REASON")
    got = thread_settings()
    assert got["omp_wait_policy"] == "default"
    assert "not chosen by the longkit script" in got["omp_wait_policy_reason"]
    hw = hardware()
    assert hw["threads"]["omp_wait_policy"] == "default"
    # the thread count is recorded once, inside "threads"
    assert hw["threads"]["torch_threads"] == torch.get_num_threads() and "torch_threads" not in hw
