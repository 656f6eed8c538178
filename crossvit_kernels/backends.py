"""Backend registry and dispatch.

Every op of the package (``cross_attention``, ``patch_embed``) has one public entry and several
interchangeable backends:

============  =====================================================================
``triton``    fused Triton kernels: CUDA tensors (CPU only under TRITON_INTERPRET=1)
``cuda``      the compiled extension's CUDA kernels (fallback where Triton is missing)
``cpp``       the compiled extension's C++ CPU kernels (OpenMP)
``torch``     the absorbed one-pass math of DESIGN.md in plain PyTorch ops
``reference`` the textbook math, exactly as timm computes it (the test oracle)
============  =====================================================================

``auto`` (the default) picks, per call, the first backend in the device's preference list that is
available and supports the inputs: CUDA tensors -> triton, cuda, torch; CPU tensors -> cpp, torch.
``reference`` is never chosen automatically.

Nothing here imports Triton or the compiled extension at import time: a backend module is
imported the first time it is asked about, and a failure to import it (ImportError, OSError,
undefined symbols) makes that backend unavailable with the reason recorded, never a crash.

Backend module contract (``crossvit_kernels.impl.torch_impl`` is the model): a module may define
any of the functions below; ``unavailable_reason()`` and ``supports(op, device, dtype)`` return
``None`` when usable, else a one-line reason.

    cross_attention_core_forward(x_cls, x_tokens, w, eps) -> (z, lse, mean, rstd)
    cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz)
        -> (dx_cls, dx_tokens, dw)
    patch_embed_forward(images, weight, bias, pos_embed, cls_token) -> out
    patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad)
        -> (d_images | None, d_weight, d_bias | None, d_pos_embed, d_cls_token)
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Dict, Iterator, Optional, Union

import torch

__all__ = [
    "BACKENDS",
    "available_backends",
    "use_backend",
    "get_default_backend",
    "resolve_backend",
    "explain_dispatch",
]

#: Every backend name, in no particular order; ``"auto"`` is accepted wherever a name is.
BACKENDS = ("triton", "cuda", "cpp", "torch", "reference")
OPS = ("cross_attention", "patch_embed")
ENV_VAR = "CROSSVIT_KERNELS_BACKEND"

_MODULES = {
    "torch": "crossvit_kernels.impl.torch_impl",
    "triton": "crossvit_kernels.triton",
    "cpp": "crossvit_kernels.impl.cpp_impl",
    "cuda": "crossvit_kernels.impl.cuda_impl",
}
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_lock = threading.Lock()
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def _check_name(name: str, allow_auto: bool = True) -> str:
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
        return _check_name(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_VAR}={value!r} is invalid: {exc}") from None


_default_backend: str = _default_from_env()


def get_default_backend() -> str:
    """The backend used when an op is called with ``backend=None``."""
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: ops called with ``backend=None`` inside the block use ``name``.

    >>> with crossvit_kernels.use_backend("reference"):
    ...     logits = model(images)
    """
    global _default_backend
    key = _check_name(name)
    previous = _default_backend
    _default_backend = key
    try:
        yield key
    finally:
        _default_backend = previous


def _load(name: str):
    """Import a backend module once; remember why it failed."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        try:
            module = importlib.import_module(_MODULES[name])
            reason = module.unavailable_reason()
        except Exception as exc:  # ImportError, OSError, undefined symbols, broken installs
            reason = f"failed to import: {type(exc).__name__}: {exc}"
            module = None
        if reason is not None:
            _load_errors[name] = reason
            return None
        _loaded[name] = module
        return module


def backend_module(name: str):
    """The implementation module of backend ``name`` (not ``reference``), or raise why not."""
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is unavailable: {_load_errors[name]}")
    return module


def _unsupported_reason(name: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if name == "reference":
        return None
    module = _load(name)
    if module is None:
        return _load_errors[name]
    if not hasattr(module, f"{op}_core_forward" if op == "cross_attention" else f"{op}_forward"):
        return f"backend {name!r} has no {op} implementation"
    return module.supports(op, device, dtype)


def available_backends() -> Dict[str, Union[bool, str]]:
    """``{name: True}`` for each usable backend, else ``{name: "the reason it is unavailable"}``.

    A backend counts as available when it can run at least one op on at least one device of this
    machine; :func:`explain_dispatch` tells what ``auto`` picks for given inputs.
    """
    result: Dict[str, Union[bool, str]] = {}
    for name in BACKENDS:
        if name == "reference":
            result[name] = True
            continue
        module = _load(name)
        result[name] = True if module is not None else _load_errors[name]
    return result


def resolve_backend(op: str, requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend that runs ``op`` for inputs on ``device`` of ``dtype``.

    ``requested`` None means the current default (``use_backend`` / ``CROSSVIT_KERNELS_BACKEND``).
    An explicitly requested backend that cannot run the inputs raises RuntimeError saying why.
    """
    name = _check_name(requested if requested is not None else _default_backend)
    if name != "auto":
        reason = _unsupported_reason(name, op, device, dtype)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run {op} on {device.type} {dtype}: {reason}")
        return name
    skipped = []
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        reason = _unsupported_reason(candidate, op, device, dtype)
        if reason is None:
            if skipped:
                _warn_skipped_once(op, device, candidate, skipped)
            return candidate
        skipped.append((candidate, reason))
    raise RuntimeError(f"no backend can run {op} on {device.type} {dtype}: " + "; ".join(f"{n}: {r}" for n, r in skipped))


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


def explain_dispatch(op: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """A human-readable account of what ``auto`` picks for ``op`` and why the others were skipped."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: choose one of {OPS}")
    device = torch.device(device)
    lines = []
    chosen = None
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        reason = _unsupported_reason(candidate, op, device, dtype)
        if reason is None and chosen is None:
            chosen = candidate
            lines.append(f"  {candidate}: chosen")
        elif reason is None:
            lines.append(f"  {candidate}: available (lower priority)")
        else:
            lines.append(f"  {candidate}: skipped ({reason})")
    head = f"{op} on {device.type} {dtype}: auto -> {chosen}"
    return "\n".join([head] + lines)
