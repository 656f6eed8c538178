"""Backend registry and dispatch.

Every op of the package (``cross_attention``, ``patch_embed``) has one public entry and several
interchangeable backends:

============  =====================================================================
``triton``    fused Triton kernels: CUDA tensors (CPU only under TRITON_INTERPRET=1)
``cuda``      the compiled extension's CUDA kernels (fallback where Triton is missing)
``cpp``       the compiled extension's C++ CPU kernels (OpenMP)
``torch``     the absorbed one-pass math of docs/design.md in plain PyTorch ops
``reference`` the textbook math, exactly as timm computes it (the test oracle)
============  =====================================================================

``auto`` (the default) picks, per call, the first backend in the device's preference list that is
available and supports the inputs: CUDA tensors -> triton, cuda, torch; CPU tensors -> cpp, torch.
``reference`` is never chosen automatically.

Each backend is a :class:`~crossvit_kernels.backends.base.Backend` that declares what it supports
as data (devices, dtypes per op, the reason for what it leaves out, and the limits of its kernels
on each op's sizes, such as a CUDA grid dimension or a GPU's shared memory, each with its reason);
:func:`supports` and :func:`explain_dispatch` read that data. The ops pass their inputs' sizes
(``base.OP_SIZES``): ``auto`` skips a backend whose limits they exceed, and a backend requested
by name raises NotImplementedError naming the limit. Nothing here imports Triton or the compiled
extension at import time: a backend's module is imported the first time it is asked about, and a failure to
import it (ImportError, OSError, undefined symbols) makes that backend unavailable with the reason
recorded, never a crash.

The default backend (``use_backend``, or the environment variable ``CROSSVIT_KERNELS_BACKEND`` at
import) is held in a :class:`contextvars.ContextVar`: a ``with use_backend(...)`` block applies to
its own thread and asyncio task only, never to code running concurrently elsewhere.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
import warnings
from typing import Dict, Iterator, Mapping, Optional, Union

import torch

from .base import OP_SIZES, OPS, Backend, constant_under_compile

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "use_backend",
    "get_default_backend",
    "get_backend",
    "resolve_backend",
    "supports",
    "explain_dispatch",
]

#: Every backend name; ``"auto"`` is accepted wherever a name is.
BACKENDS = ("triton", "cuda", "cpp", "torch", "reference")
ENV_VAR = "CROSSVIT_KERNELS_BACKEND"

#: name -> (module, class) of each backend's implementation, imported on first use
_CLASSES = {
    "reference": ("crossvit_kernels.backends.reference", "ReferenceBackend"),
    "torch": ("crossvit_kernels.backends.pytorch", "TorchBackend"),
    "triton": ("crossvit_kernels.backends.triton", "TritonBackend"),
    "cpp": ("crossvit_kernels.backends.extension", "CppBackend"),
    "cuda": ("crossvit_kernels.backends.extension", "CudaBackend"),
}
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_lock = threading.Lock()
_loaded: Dict[str, Backend] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def check_name(name, allow_auto: bool = True) -> str:
    """``name`` normalised ("auto" or one of :data:`BACKENDS`), or a TypeError / ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string such as 'auto' or one of {BACKENDS}, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto" and allow_auto:
        return key
    if key not in BACKENDS:
        valid = ("auto",) + BACKENDS if allow_auto else BACKENDS
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(repr(b) for b in valid)}")
    return key


def _default_from_env() -> str:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return "auto"
    try:
        return check_name(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_VAR}={value!r} is invalid: {exc}") from None


_ENV_DEFAULT: str = _default_from_env()
_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar("crossvit_kernels_backend",
                                                                       default=_ENV_DEFAULT)


def get_default_backend() -> str:
    """The backend used when an op is called with ``backend=None`` (in this thread / task)."""
    return _default_backend.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: ops called with ``backend=None`` inside the block use ``name``.

    The setting belongs to the current thread and asyncio task (a :mod:`contextvars` variable):
    other threads, and tasks started outside the block, keep their own default.

    >>> with crossvit_kernels.use_backend("reference"):
    ...     logits = model(images)
    """
    token = _default_backend.set(check_name(name))
    try:
        yield _default_backend.get()
    finally:
        _default_backend.reset(token)


def _load(name: str) -> Optional[Backend]:
    """The backend ``name``, imported and instantiated once; None (reason recorded) when unusable."""
    backend = _loaded.get(name)
    if backend is not None or name in _load_errors:
        return backend
    with _lock:
        if name in _loaded or name in _load_errors:
            return _loaded.get(name)
        module, cls = _CLASSES[name]
        try:
            backend = getattr(importlib.import_module(module), cls)()
            reason = backend.unavailable_reason()
        except Exception as exc:  # ImportError, OSError, undefined symbols, broken installs
            reason = f"failed to import: {type(exc).__name__}: {exc}"
        if reason is not None:
            _load_errors[name] = reason
            return None
        _loaded[name] = backend
        return backend


def get_backend(name: str) -> Backend:
    """The :class:`Backend` object of ``name`` (not "auto"); NotImplementedError (a RuntimeError)
    saying why when it is unavailable on this machine."""
    backend = _loaded.get(name) or _load(check_name(name, allow_auto=False))
    if backend is None:
        raise NotImplementedError(f"backend {name!r} is unavailable: {_load_errors[name]}")
    return backend


def supports(name: str, op: str, device: Union[str, torch.device], dtype: torch.dtype,
             sizes: Optional[Mapping[str, int]] = None, backward: bool = True) -> Optional[str]:
    """None when backend ``name`` can run ``op`` on ``device`` tensors of ``dtype``, else the reason.

    With ``sizes`` (the op's sizes by name, every name of ``base.OP_SIZES[op]``, e.g.
    ``dict(B=64, M=196, C=448, H=7)`` for cross_attention) also within the limits of its kernels,
    its backward's included unless ``backward`` is False (inputs that need no gradient).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: choose one of {OPS}")
    name, device = check_name(name, allow_auto=False), torch.device(device)
    _check_sizes(op, sizes)
    return _reason(name, op, device, dtype, sizes, backward)


def _check_sizes(op: str, sizes) -> None:
    if sizes is None:
        return
    if not isinstance(sizes, Mapping):
        raise TypeError(f"sizes must be a mapping of {op}'s sizes {OP_SIZES[op]} to ints, got {type(sizes).__name__}")
    missing = [k for k in OP_SIZES[op] if k not in sizes]
    if missing:
        raise ValueError(f"sizes of {op} must give {', '.join(OP_SIZES[op])}; missing {', '.join(missing)}")


def _reason(name: str, op: str, device: torch.device, dtype: torch.dtype, sizes: Optional[Mapping[str, int]],
            backward: bool = True) -> Optional[str]:
    reason = _supports(name, op, device, dtype)
    if reason is None and sizes is not None:
        # traced (the sizes may be symbolic under torch.compile: each comparison becomes a guard);
        # the backend was loaded by the check above
        reason = _loaded[name].limits(op, device, dtype, sizes, backward)
    return reason


@constant_under_compile   # Dynamo cannot follow the first load of a backend (a lock, an import)
def _supports(name: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    backend = _load(name)
    return _load_errors[name] if backend is None else backend.supports(op, device, dtype)


def available_backends() -> Dict[str, Union[bool, str]]:
    """``{name: True}`` for each usable backend, else ``{name: "the reason it is unavailable"}``.

    A backend counts as available when it can run at least one op on at least one device of this
    machine; :func:`explain_dispatch` tells what ``auto`` picks for given inputs.
    """
    return {name: True if _load(name) is not None else _load_errors[name] for name in BACKENDS}


def resolve_backend(op: str, requested: Optional[str], device: torch.device, dtype: torch.dtype,
                    sizes: Optional[Mapping[str, int]] = None, backward: bool = True) -> str:
    """The concrete backend that runs ``op`` for inputs on ``device`` of ``dtype`` (and of
    ``sizes``, needing a gradient or not, as :func:`supports` takes them: the ops pass them).

    ``requested`` None means the current default (``use_backend`` / ``CROSSVIT_KERNELS_BACKEND``).
    An explicitly requested backend that cannot run the inputs, or inputs no backend can run, raise
    NotImplementedError (a RuntimeError) saying why.
    """
    name = check_name(requested if requested is not None else _default_backend.get())
    if name != "auto":
        reason = _reason(name, op, device, dtype, sizes, backward)
        if reason is not None:
            raise NotImplementedError(f"backend {name!r} cannot run {op} on {device.type} {dtype}: {reason}")
        return name
    skipped = []
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        reason = _reason(candidate, op, device, dtype, sizes, backward)
        if reason is None:
            if skipped:
                _warn_skipped_once(op, device, candidate, skipped)
            return candidate
        skipped.append((candidate, reason))
    reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise NotImplementedError(f"no backend can run {op} on {device.type} {dtype}: {reasons}")


def _warn_skipped_once(op: str, device: torch.device, chosen: str, skipped) -> None:
    # Only a *broken* backend deserves a warning; one that is merely absent (no GPU, extension
    # not built) is normal and is reported by explain_dispatch() and `python -m crossvit_kernels.info`.
    broken = [(n, r) for n, r in skipped if r.startswith("failed to import")]
    key = (op, device.type, tuple(n for n, _ in broken))
    if broken and key not in _warned:
        _warned.add(key)
        details = "; ".join(f"{n}: {r}" for n, r in broken)
        warnings.warn(f"crossvit_kernels: {op} on {device.type} falls back to backend {chosen!r} ({details})",
                      RuntimeWarning, stacklevel=4)


def explain_dispatch(op: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                     sizes: Optional[Mapping[str, int]] = None, backward: bool = True) -> str:
    """A human-readable account of what ``auto`` picks for ``op`` and why the others were skipped;
    with ``sizes`` and ``backward`` (as :func:`supports` takes them) for inputs of those sizes."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: choose one of {OPS}")
    device = torch.device(device)
    _check_sizes(op, sizes)
    lines = []
    chosen = None
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        reason = _reason(candidate, op, device, dtype, sizes, backward)
        if reason is None and chosen is None:
            chosen = candidate
            lines.append(f"  {candidate}: chosen")
        elif reason is None:
            lines.append(f"  {candidate}: available (lower priority)")
        else:
            lines.append(f"  {candidate}: skipped ({reason})")
    shape = ""
    if sizes is not None:
        shape = f" ({', '.join(f'{k}={sizes[k]}' for k in OP_SIZES[op])}{'' if backward else '; forward only'})"
    head = f"{op}{shape} on {device.type} {dtype}: auto -> {chosen}"
    return "\n".join([head] + lines)
