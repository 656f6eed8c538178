"""Backend ``triton``: fused Triton kernels.

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1), which
is how the kernels are tested on machines without a GPU. Importing this package imports Triton,
so nothing imports it until an op asks for the ``triton`` backend.

The backend implements the whole cross-attention forward (``projections.py``: its projections as
three kernels around the one-pass core of ``cross_attention.py``) for float16, bfloat16 and
float32, and the core's backward; float64 and the backward's projections use the inherited
absorbed formulation around the core. ``fusion.py`` runs a multi-scale block's whole
cross-attention fusion stage (both directions) in three launches forward and three backward.
``patch_embed.py`` holds the patch embedding.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..base import FLOAT_DTYPES, HALF_AND_SINGLE, Backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_bf16() -> None:
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


if _interpreting():
    _patch_interpreter_bf16()


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = {"cross_attention": FLOAT_DTYPES, "patch_embed": FLOAT_DTYPES, "fusion_stage": HALF_AND_SINGLE}
    why_not = {"fusion_stage": "float64 runs the fusion per piece"}

    def __init__(self):
        # imports Triton: fails here if it is broken
        from . import cross_attention, fusion, patch_embed, projections
        self._core, self._patch, self._proj, self._fusion = cross_attention, patch_embed, projections, fusion

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu" and not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)"
        return None

    def cross_attention_forward(self, x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo,
                                num_heads, eps, residual):
        if x_cls.dtype in HALF_AND_SINGLE and self._proj.fused_projections_enabled():
            return self._proj.cross_attention_forward_fused(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv,
                                                            bv, wo, bo, num_heads, eps, residual)
        return super().cross_attention_forward(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo,
                                               num_heads, eps, residual)

    def cross_attention_core_forward(self, x_cls, x_tokens, w, eps):
        return self._core.cross_attention_core_forward(x_cls, x_tokens, w, eps)

    def cross_attention_core_backward(self, x_cls, x_tokens, w, z, lse, dz, eps):
        return self._core.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, eps)

    def fusion_stage_forward(self, x0, x1, params, heads, eps):
        return self._fusion.fusion_stage_forward(x0, x1, params, heads, eps)

    def fusion_stage_backward(self, dout0, dout1, x0, x1, params, saved, heads, eps):
        return self._fusion.fusion_stage_backward(dout0, dout1, x0, x1, params, saved, heads, eps)

    def patch_embed_forward(self, images, weight, bias, pos_embed, cls_token):
        return self._patch.patch_embed_forward(images, weight, bias, pos_embed, cls_token)

    def patch_embed_backward(self, grad_out, images, weight, has_bias, needs_images_grad):
        return self._patch.patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad)
