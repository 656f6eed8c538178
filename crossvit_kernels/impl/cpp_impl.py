"""Backend ``cpp``: the compiled extension's C++ CPU kernels (csrc/crossvit_cpu.cpp).

Implements the backend contract of ``crossvit_kernels.backends`` with exactly the semantics of
``crossvit_kernels.impl.torch_impl``: the one-pass cross-attention core (OpenMP over batch rows and
token splits, vectorised, results independent of the thread count) and the patch embedding
(patch gather + GEMM with bias, position embedding and CLS row written into the output).

Dtypes: float32, bfloat16 and float16 (float32 accumulation); float64 for patch_embed only (the
cross-attention core has no float64 kernel: ``supports`` rejects it and ``auto`` picks "torch").
The extension is imported through ``crossvit_kernels._ext`` the first time this backend is asked
about; a broken build raises ImportError from :func:`unavailable_reason`, which the registry
reports as "failed to import" and warns about once.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext

_XATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PATCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unavailable_reason() -> Optional[str]:
    st = _ext.status("cpu")
    if st.broken:
        raise ImportError(st.reason)
    return st.reason


def supports(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if torch.device(device).type != "cpu":
        return f"the cpp backend runs CPU tensors only, got {torch.device(device).type} tensors"
    allowed = _XATTN_DTYPES if op == "cross_attention" else _PATCH_DTYPES
    if dtype not in allowed:
        return f"the cpp {op} kernel supports {', '.join(str(d).replace('torch.', '') for d in allowed)}, not {dtype}"
    return None


def cross_attention_core_forward(x_cls, x_tokens, w, eps):
    return _ext.get("cpu").cross_attention_core_forward(x_cls, x_tokens, w, float(eps))


def cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz):
    return _ext.get("cpu").cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz)


def patch_embed_forward(images, weight, bias, pos_embed, cls_token):
    return _ext.get("cpu").patch_embed_forward(images, weight, bias, pos_embed, cls_token)


def patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad):
    return _ext.get("cpu").patch_embed_backward(grad_out, images, weight, bool(has_bias), bool(needs_images_grad))
