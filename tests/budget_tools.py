"""Test tooling for the kernel budgets: counting Triton launches and the other device kernels a
call runs, and recording the memory the kernels touch under the interpreter.

* :class:`TritonLaunches` records every Triton launch (kernel name) made inside it, under the
  interpreter and on a GPU alike (it wraps the launch entry points of Triton's runtime).
* :func:`kernel_ops` runs a function under the PyTorch profiler and returns the ATen operators
  that launch a device kernel: leaf operators (no ATen operator below them) that are not
  allocations, views or metadata, outside the Triton launches (the interpreter's own tensor
  bookkeeping stays out of the count).
* :class:`AddressRecorder` (interpreter only) records, per launch, the unique byte addresses the
  kernel loads (excluding those it wrote first, which come back from L2) and stores.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

#: ATen leaf operators that launch no device kernel (allocation, views, metadata, no-op composites)
NON_KERNEL_OPS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::_reshape_alias", "aten::reshape", "aten::contiguous", "aten::set_", "aten::result_type", "aten::size",
    "aten::stride", "aten::numel", "aten::dim", "aten::is_contiguous", "aten::to", "aten::_to_copy_noop",
    "aten::unbind", "aten::split", "aten::chunk", "aten::narrow", "aten::_local_scalar_dense", "aten::item",
}

_TRITON_RECORD = "triton_launch::"


def _triton_entry_points():
    """(class, method name) of the launch entry points: the interpreter's and the JIT's."""
    points = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        points.append((InterpretedFunction, "run"))
    except ImportError:  # pragma: no cover
        pass
    from triton.runtime.jit import JITFunction
    points.append((JITFunction, "run"))
    return points


class TritonLaunches:
    """Context manager: ``names`` lists the Triton kernels launched inside it, in order. Each
    launch also runs inside a profiler range ``triton_launch::<name>``."""

    def __init__(self):
        self.names: List[str] = []
        self._saved = []

    def __enter__(self):
        for cls, attr in _triton_entry_points():
            original = getattr(cls, attr)
            self._saved.append((cls, attr, original))

            def run(fn_self, *args, _original=original, **kwargs):
                if kwargs.get("warmup"):
                    return _original(fn_self, *args, **kwargs)
                name = getattr(fn_self, "__name__", None) or fn_self.fn.__name__
                self.names.append(name)
                with torch.profiler.record_function(_TRITON_RECORD + name):
                    return _original(fn_self, *args, **kwargs)
            setattr(cls, attr, run)
        return self

    def __exit__(self, *exc):
        for cls, attr, original in reversed(self._saved):
            setattr(cls, attr, original)
        self._saved.clear()
        return False


def kernel_ops(fn: Callable[[], object]) -> Tuple[object, List[str], List[str]]:
    """Run ``fn()``: (its result, the Triton kernels launched, the other device-kernel ATen ops)."""
    from torch.profiler import ProfilerActivity, profile

    with TritonLaunches() as launches, profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    events = prof.events()
    inside = set()

    def mark(ev):
        for ch in ev.cpu_children:
            inside.add(id(ch))
            mark(ch)

    for ev in events:
        if ev.name.startswith(_TRITON_RECORD):
            mark(ev)
    ops = []
    for ev in events:
        if id(ev) in inside or not ev.name.startswith("aten::"):
            continue
        if any(ch.name.startswith("aten::") for ch in ev.cpu_children):
            continue
        if ev.name not in NON_KERNEL_OPS:
            ops.append(ev.name)
    return result, list(launches.names), ops


class AddressRecorder:
    """Interpreter only. Context manager recording, per launch (in order), the unique byte
    addresses loaded and stored: ``launches`` is a list of (kernel name, read addresses, written
    addresses) with reads of addresses the launch stored earlier left out (those come from L2).
    Addresses are those of the CPU tensors themselves (the interpreter works on their storage)."""

    def __init__(self):
        self.launches: List[Tuple[str, np.ndarray, np.ndarray]] = []
        self._cur = None

    def __enter__(self):
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        self._orig = (builder.create_masked_load, builder.create_masked_store, interp.InterpretedFunction.run)
        rec = self

        def expand(ptrs, mask, dtype_tt):
            size = dtype_tt.primitive_bitwidth // 8
            base = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.uint64)
            return (base[:, None] + np.arange(size, dtype=np.uint64)[None, :]).ravel()

        def load(self_b, ptrs, mask, other, *a, **k):
            if rec._cur is not None:
                addrs = expand(ptrs, mask, ptrs.get_element_ty())
                written = rec._cur["w"]
                if written:
                    addrs = np.setdiff1d(addrs, np.concatenate(written), assume_unique=False)
                rec._cur["r"].append(addrs)
            return rec._orig[0](self_b, ptrs, mask, other, *a, **k)

        def store(self_b, ptrs, value, mask, *a, **k):
            if rec._cur is not None:
                rec._cur["w"].append(np.unique(expand(ptrs, mask, ptrs.get_element_ty())))
            return rec._orig[1](self_b, ptrs, value, mask, *a, **k)

        def run(fn_self, *args, **kwargs):
            if kwargs.get("warmup"):
                return rec._orig[2](fn_self, *args, **kwargs)
            rec._cur = {"r": [], "w": []}
            try:
                return rec._orig[2](fn_self, *args, **kwargs)
            finally:
                cur, rec._cur = rec._cur, None
                r = np.unique(np.concatenate(cur["r"])) if cur["r"] else np.zeros(0, np.uint64)
                w = np.unique(np.concatenate(cur["w"])) if cur["w"] else np.zeros(0, np.uint64)
                rec.launches.append((fn_self.__name__, r, w))

        builder.create_masked_load = load
        builder.create_masked_store = store
        interp.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        builder.create_masked_load, builder.create_masked_store, interp.InterpretedFunction.run = self._orig
        return False

    def totals(self) -> List[Tuple[str, int, int]]:
        """[(kernel, bytes read, bytes written)] per launch."""
        return [(n, int(r.size), int(w.size)) for n, r, w in self.launches]


def by_tensor(addrs: np.ndarray, tensors: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """How many of ``addrs`` fall in each named tensor's storage (diagnostics)."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            continue
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        out[name] = int(((addrs >= lo) & (addrs < hi)).sum())
    return out


@contextlib.contextmanager
def nothing():
    yield
