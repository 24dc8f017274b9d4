"""Benchmark suites read from local files: LongBench v1/-E, LongBench v2, InfiniteBench, BABILong.

>>> from longkit.eval.suites import get_suite
>>> suite = get_suite("longbench")
>>> records = suite.load("path/to/LongBench/data", "hotpotqa")
"""

from longkit.eval.suites import babilong, infinitebench, longbench, longbench_v2  # noqa: F401  (registration)
from longkit.eval.suites.base import SUITES, Suite, SuitePrompt, get_suite, truncate_middle

__all__ = ["SUITES", "Suite", "SuitePrompt", "get_suite", "truncate_middle"]
