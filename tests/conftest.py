"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before
anything imports Triton), so the same kernel tests run on the CPU in CI. GPU-only tests use the
``gpu`` marker / ``requires_gpu`` and skip with a reason on a CPU machine.
"""
import os
import tempfile

import pytest
import torch

# A private compile cache per test run: Inductor's cache key does not cover a custom op's fake
# implementation, so a cache left by an older checkout could replay a graph built from a stale fake.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="crossvit-kernels-inductor-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_FAIL_LOG = os.environ.get("CROSSVIT_KERNELS_TEST_FAIL_LOG")


def pytest_runtest_logreport(report):
    """With CROSSVIT_KERNELS_TEST_FAIL_LOG set, append each failure (test id and traceback) to that
    file as it happens: a run cut short by a time limit (a borrowed GPU machine) still says what
    failed and why. Written by the controlling process only (pytest-xdist forwards the reports)."""
    if _FAIL_LOG and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(_FAIL_LOG, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
