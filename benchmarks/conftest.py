"""The pytest-benchmark suite (``python -m pytest benchmarks/ --benchmark-only``); not part of
``pytest tests/``. Small shapes only: the full measurement is ``benchmarks/run.py``.

The cases are the harness's (harness.py: the same callables run.py times); pytest-benchmark keeps
its own rounds, statistics and storage, but reads the project's clock
(:func:`crossvit_kernels.timing.clock`, which waits for the GPU) unless ``--benchmark-timer``
names another.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

torch.set_num_threads(max(1, os.cpu_count() or 1))

PROJECT_CLOCK = "crossvit_kernels.timing.clock"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    try:
        from pytest_benchmark.timers import default_timer
        from pytest_benchmark.utils import NameWrapper
    except ImportError:  # pytest-benchmark absent: the suite's tests report the missing fixture
        return
    if getattr(config.option, "benchmark_timer", None) == str(NameWrapper(default_timer)):
        config.option.benchmark_timer = PROJECT_CLOCK
