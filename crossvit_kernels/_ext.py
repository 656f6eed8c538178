"""Loader of the optional compiled extension: the only module that imports it.

Two extension modules may be built by setup.py (csrc/):

* ``crossvit_kernels._C_cpu``  -- C++ CPU kernels (backend ``"cpp"``)
* ``crossvit_kernels._C_cuda`` -- CUDA kernels (backend ``"cuda"``)

Nothing is imported when this module is imported; each extension is imported the first time it is
asked for, once. A failure is remembered with its reason and never raised from here:

* not built (the module does not exist): a normal state, e.g. a pure-Python install;
* broken (ImportError or OSError while loading, e.g. ``undefined symbol`` after a torch upgrade, a
  missing CUDA library): reported as such so that the backend registry warns once and falls back.
"""
from __future__ import annotations

import importlib
import threading
from typing import Dict, NamedTuple, Optional

__all__ = ["Status", "status", "get", "reset"]

MODULES = {"cpu": "crossvit_kernels._C_cpu", "cuda": "crossvit_kernels._C_cuda"}

_REBUILD = ("rebuild it with `pip install --no-build-isolation -e .` against the installed torch, "
            "or pick another backend (backend='torch')")


class Status(NamedTuple):
    module: Optional[object]   # the extension module, or None
    reason: Optional[str]      # why it is unavailable, or None
    broken: bool               # True when it exists but failed to load


_lock = threading.Lock()
_status: Dict[str, Status] = {}


def _import(name: str):
    """Imports one extension module (the single place that does; tests patch it)."""
    return importlib.import_module(name)


def _try_load(kind: str) -> Status:
    name = MODULES[kind]
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries: load them first)
        module = _import(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return Status(None, f"the compiled extension {name} is not built (install with "
                                f"`pip install --no-build-isolation -e .` where a C++ compiler"
                                f"{' and nvcc are' if kind == 'cuda' else ' is'} available)", False)
        return Status(None, f"the compiled extension {name} cannot be loaded "
                            f"(ModuleNotFoundError: {exc}); {_REBUILD}", True)
    except (ImportError, OSError) as exc:
        return Status(None, f"the compiled extension {name} cannot be loaded "
                            f"({type(exc).__name__}: {exc}); {_REBUILD}", True)
    return Status(module, None, False)


def status(kind: str) -> Status:
    """The load status of extension ``kind`` ("cpu" or "cuda"), importing it on first call."""
    if kind not in MODULES:
        raise ValueError(f"unknown extension kind {kind!r}: choose one of {tuple(MODULES)}")
    st = _status.get(kind)
    if st is None:
        with _lock:
            st = _status.get(kind)
            if st is None:
                st = _try_load(kind)
                _status[kind] = st
    return st


def get(kind: str):
    """The extension module ``kind``; raises RuntimeError with the reason when it is unavailable."""
    st = status(kind)
    if st.module is None:
        raise RuntimeError(st.reason)
    return st.module


def reset() -> None:
    """Forget every load attempt (tests use it after patching :func:`_import`)."""
    with _lock:
        _status.clear()
