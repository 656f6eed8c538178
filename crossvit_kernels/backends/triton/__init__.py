"""Backend ``triton``: fused Triton kernels.

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1), which
is how the kernels are tested on machines without a GPU. Importing this package imports Triton,
so nothing imports it until an op asks for the ``triton`` backend.

The backend implements the whole cross-attention forward (``projections.py``: its projections as
three kernels around the one-pass core of ``cross_attention.py``) for float16, bfloat16 and
float32, and the core's backward; float64 and the backward's projections use the inherited
absorbed formulation around the core. ``fusion.py`` runs a multi-scale block's whole
cross-attention fusion stage (both directions) in three launches forward and three backward.
``patch_embed.py`` holds the patch embedding. ``limits.py`` declares the kernels' hard limits on
the ops' sizes (``size_limits``: 16-bit widths, shared memory per program, grid sizes).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..base import FLOAT_DTYPES, HALF_AND_SINGLE, Backend
from .interpreter import interpreting, serialized

if interpreting():
    from .interpreter import patch_bf16
    patch_bf16()


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = {"cross_attention": FLOAT_DTYPES, "patch_embed": FLOAT_DTYPES, "fusion_stage": HALF_AND_SINGLE}
    why_not = {"fusion_stage": "float64 runs the fusion per piece"}

    def __init__(self):
        # imports Triton: fails here if it is broken
        from . import cross_attention, fusion, patch_embed, projections
        from .limits import SIZE_LIMITS
        self._core, self._patch, self._proj, self._fusion = cross_attention, patch_embed, projections, fusion
        self.size_limits = SIZE_LIMITS

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available() and not interpreting():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu" and not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)"
        return None

    def cross_attention_forward(self, x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo,
                                num_heads, eps, residual):
        if x_cls.dtype in HALF_AND_SINGLE and self._proj.fused_projections_enabled():
            with serialized():
                return self._proj.cross_attention_forward_fused(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk,
                                                                wv, bv, wo, bo, num_heads, eps, residual)
        return super().cross_attention_forward(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo,
                                               num_heads, eps, residual)

    def cross_attention_core_forward(self, x_cls, x_tokens, w, eps):
        with serialized():
            return self._core.cross_attention_core_forward(x_cls, x_tokens, w, eps)

    def cross_attention_core_backward(self, x_cls, x_tokens, w, z, lse, dz, eps):
        with serialized():
            return self._core.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, eps)

    def fusion_stage_forward(self, x0, x1, params, heads, eps):
        with serialized():
            return self._fusion.fusion_stage_forward(x0, x1, params, heads, eps)

    def fusion_stage_backward(self, dout0, dout1, x0, x1, params, saved, heads, eps):
        with serialized():
            return self._fusion.fusion_stage_backward(dout0, dout1, x0, x1, params, saved, heads, eps)

    def patch_embed_forward(self, images, weight, bias, pos_embed, cls_token):
        with serialized():
            return self._patch.patch_embed_forward(images, weight, bias, pos_embed, cls_token)

    def patch_embed_backward(self, grad_out, images, weight, has_bias, needs_images_grad):
        with serialized():
            return self._patch.patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad)
