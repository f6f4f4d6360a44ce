"""Timing cases are collected with the rest of the suite but run only under ``--benchmark-only``: a normal test run
(the cpu tier, CI) never times anything."""

import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="timing case: run with `pytest tests/benchmarks --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
