"""Support for running the Triton kernels on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests run without a GPU): the fixes the interpreter needs to
compute what a GPU computes, and the lock that keeps two threads from interpreting at once."""
from __future__ import annotations

import contextlib
import os
import threading


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter swaps module-level state of triton.language while it runs a kernel, so two
# threads interpreting at once break each other: under TRITON_INTERPRET=1 the backend runs one
# call at a time (a compiled kernel on a GPU needs no such lock).
_LOCK = threading.RLock()


def serialized():
    return _LOCK if interpreting() else contextlib.nullcontext()


def patch_bf16() -> None:
    """Two bfloat16 defects of Triton's interpreter (3.6 and 3.8), which keeps bfloat16 values as
    their uint16 bit patterns, fixed so that the CPU runs the arithmetic a GPU runs:

    * ``tl.dot`` multiplies those integers: a bfloat16 x bfloat16 product (the kernels feed the
      tensor cores bfloat16 tiles) comes out as garbage. bfloat16 operands are widened to float32
      first (exact: the tensor cores multiply them exactly and accumulate in float32 too);
    * ``x.to(tl.bfloat16)`` from float32 truncates, where the GPU rounds to nearest even
      (``cvt.rn.bf16.f32``); casts between bfloat16 and float64 / float16 reinterpret the bits.
      They now round to nearest even, through float32.

    Only the interpreter is touched, and only when it runs; compiled kernels are unaffected."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_crossvit_bf16", False):
        return
    import triton.language as tl
    np = interp.np
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty.is_floating() and dst_ty != tl.bfloat16:
            return original_cast(self, widen(src), dst_type)
        if dst_ty == tl.bfloat16 and src_ty.is_floating() and src_ty != tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # nearest even
            nan = np.isnan(np.asarray(src.data, dtype=np.float32))
            data = np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)
            return interp.TensorHandle(data, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder._crossvit_bf16 = True

