"""Backends ``cpp`` and ``cuda``: the optional compiled extension, and its one loader.

Two extension modules may be built by setup.py (csrc/):

* ``crossvit_kernels._C_cpu``  -- C++ CPU kernels (backend ``"cpp"``: OpenMP, vectorised, results
  independent of the thread count), operators ``torch.ops.crossvit_kernels_cpu.*``
* ``crossvit_kernels._C_cuda`` -- CUDA kernels (backend ``"cuda"``: the fallback for CUDA tensors
  where Triton is missing), operators ``torch.ops.crossvit_kernels_cuda.*``

Each module is an empty Python module whose library registers its kernels as torch operators
(:data:`OPS`, with the signatures of the core and patch-embedding contracts of ``base.py``).
Errors raised in a kernel reach Python through torch's dispatcher as ``RuntimeError``.

This module is the only importer of either. Nothing is imported when it is imported; each
extension is imported the first time its backend is asked for, once, under a lock. A failure is
remembered with its reason and never raised from here:

* not built (the module does not exist): a normal state, e.g. a pure-Python install;
* broken (ImportError or OSError while loading, e.g. ``undefined symbol`` after a torch upgrade, a
  missing CUDA library; or a module that does not register :data:`OPS`, a build of another
  source): the backend's ``unavailable_reason`` raises ImportError, so that the registry reports
  "failed to import", warns once and falls back.

Both implement the cores; the whole op around them is the inherited absorbed formulation.
Dtypes: float32, bfloat16 and float16 (float32 accumulation); float64 for patch_embed only.
The CUDA kernels' launch limits (csrc/crossvit_cuda.cu, ``expect_core_inputs`` and ``pick_tile``)
are declared as ``CudaBackend.size_limits``: inputs beyond them go to another backend, never to
the kernels' own RuntimeError.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Dict, NamedTuple, Optional

import torch

from .base import FLOAT_DTYPES, HALF_AND_SINGLE, Backend, SizeLimit, shared_memory_per_block

__all__ = ["CppBackend", "CudaBackend", "Status", "status"]

MODULES = {"cpu": "crossvit_kernels._C_cpu", "cuda": "crossvit_kernels._C_cuda"}
#: the torch.ops namespace of each module's operators
NAMESPACES = {"cpu": "crossvit_kernels_cpu", "cuda": "crossvit_kernels_cuda"}
#: the operators each module registers, the backend's methods of the same names
OPS = ("cross_attention_core_forward", "cross_attention_core_backward", "patch_embed_forward",
       "patch_embed_backward")

_REBUILD = ("rebuild it with `pip install --no-build-isolation -e .` against the installed torch, "
            "or pick another backend (backend='torch')")


class Status(NamedTuple):
    ops: Optional[object]      # the module's torch.ops namespace, or None
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
    ops = getattr(torch.ops, NAMESPACES[kind])
    missing = [op for op in OPS if not hasattr(ops, op)]
    if missing:
        return Status(None, f"the compiled extension {name} ({getattr(module, '__file__', '?')}) does not register "
                            f"the operator {ops.name}::{missing[0]}: it was built from another version of "
                            f"crossvit-kernels; {_REBUILD}", True)
    return Status(ops, None, False)


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


class _ExtensionBackend(Backend):
    kind = ""
    dtypes = {"cross_attention": HALF_AND_SINGLE, "patch_embed": FLOAT_DTYPES}
    why_not = {"cross_attention": "no float64 kernel: backend='torch' runs float64"}

    def unavailable_reason(self) -> Optional[str]:
        st = status(self.kind)
        if st.broken:  # built but not loadable: the registry reports "failed to import" and warns once
            raise ImportError(st.reason)
        if st.ops is not None:
            self._ops = st.ops
        return st.reason

    def cross_attention_core_forward(self, x_cls, x_tokens, w, eps):
        return self._ops.cross_attention_core_forward(x_cls, x_tokens, w, eps)

    def cross_attention_core_backward(self, x_cls, x_tokens, w, z, lse, dz, eps):
        return self._ops.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, eps)

    def patch_embed_forward(self, images, weight, bias, pos_embed, cls_token):
        return self._ops.patch_embed_forward(images, weight, bias, pos_embed, cls_token)

    def patch_embed_backward(self, grad_out, images, weight, has_bias, needs_images_grad):
        return self._ops.patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad)


class CppBackend(_ExtensionBackend):
    """The CPU kernels. Each kernel opens at most one parallel region, with the caller's thread
    count and work handed out dynamically, and each op runs in a serial section of the calling
    thread, where, while the machine is busy (and, around the cross-attention's small steps, while
    the kernels' threads find their cores shared), the small steps around the kernels (the
    B x C x C projections, the CLS's LayerNorm, the batch sums) open no parallel region. On a busy
    machine every region costs up to a scheduler slice (a thread whose core another process holds
    arrives late at its end), so the number of regions, not the work, decides a call's time there
    (docs/design.md, section 10)."""

    name = "cpp"
    kind = "cpu"
    devices = ("cpu",)

    @contextlib.contextmanager
    def _serial(self, small_steps: bool = False):
        self._ops.serial_section(True, small_steps)
        try:
            yield
        finally:
            self._ops.serial_section(False)

    def cross_attention_forward(self, *args):
        with self._serial(small_steps=True):
            return super().cross_attention_forward(*args)

    def cross_attention_backward(self, *args):
        with self._serial(small_steps=True):
            return super().cross_attention_backward(*args)

    def patch_embed_forward(self, *args):
        with self._serial():
            return super().patch_embed_forward(*args)

    def patch_embed_backward(self, *args):
        with self._serial():
            return super().patch_embed_backward(*args)


#: threads per block of the CUDA cross-attention kernels (kThreads): one thread per head at most
CUDA_THREADS = 256
#: the CUDA grid's y dimension, which holds the batch row of the cross-attention kernels
CUDA_GRID_Y = 65535


def cuda_core_shared_bytes(which: str, C: int, H: int) -> int:
    """Shared memory per block of the CUDA cross-attention kernel ``which`` ("fwd" or "bwd") at its
    smallest token tile (one token), in bytes, as pick_tile in csrc/crossvit_cuda.cu computes it:
    forward (2 H C + 3 H) floats for the row's state plus (C + H) per token, backward (3 H C + 2 H)
    plus (2 C + 2 H + 1). It takes a larger tile where that fits."""
    if which == "fwd":
        return 4 * ((2 * H * C + 3 * H) + (C + H))
    return 4 * ((3 * H * C + 2 * H) + (2 * C + 2 * H + 1))


class CudaBackend(_ExtensionBackend):
    name = "cuda"
    kind = "cuda"
    devices = ("cuda",)
    size_limits = {"cross_attention": (
        SizeLimit("the batch size B", lambda s: s["B"], CUDA_GRID_Y,
                  "the CUDA kernels put the batch on the grid's y dimension; split the batch, or use "
                  "backend='triton' or 'torch'"),
        SizeLimit("the number of heads H", lambda s: s["H"], CUDA_THREADS,
                  f"one thread per head in a block of {CUDA_THREADS}; use backend='triton' or 'torch'"),
        SizeLimit("the shared memory of the forward kernel (bytes per block)",
                  lambda s: cuda_core_shared_bytes("fwd", s["C"], s["H"]), shared_memory_per_block,
                  "(2 H C + 4 H + C) floats at its smallest token tile, more than this GPU has per block; use "
                  "backend='triton' or 'torch'"),
        SizeLimit("the shared memory of the backward kernel (bytes per block)",
                  lambda s: cuda_core_shared_bytes("bwd", s["C"], s["H"]), shared_memory_per_block,
                  "(3 H C + 4 H + 2 C + 1) floats at its smallest token tile, more than this GPU has per block; "
                  "use backend='triton' or 'torch'", backward=True),
    )}

    def unavailable_reason(self) -> Optional[str]:
        if torch.version.cuda is None:
            return "torch is a CPU-only build (torch.version.cuda is None)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available (torch.cuda.is_available() is False)"
        return super().unavailable_reason()
