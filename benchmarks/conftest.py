"""pytest-benchmark suites (``python -m pytest benchmarks/ --benchmark-only``); not part of
``pytest tests/``. Small shapes only: the full measurement is ``benchmarks/run.py``."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

torch.set_num_threads(max(1, os.cpu_count() or 1))
