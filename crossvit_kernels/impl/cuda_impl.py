"""Backend ``cuda``: the compiled extension's CUDA kernels (csrc/crossvit_cuda.cu).

The fallback for CUDA tensors where Triton is missing; same contract and semantics as
``crossvit_kernels.impl.torch_impl``. Unavailable, with the reason, when torch is a CPU-only
build, when there is no GPU, or when the CUDA part of the extension was not built; a broken build
raises ImportError from :func:`unavailable_reason` (the registry warns once and falls back).
Dtypes: float32, bfloat16, float16 (float32 accumulation); float64 for patch_embed only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext

_XATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PATCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unavailable_reason() -> Optional[str]:
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    st = _ext.status("cuda")
    if st.broken:
        raise ImportError(st.reason)
    return st.reason


def supports(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if torch.device(device).type != "cuda":
        return f"the cuda backend runs CUDA tensors only, got {torch.device(device).type} tensors"
    allowed = _XATTN_DTYPES if op == "cross_attention" else _PATCH_DTYPES
    if dtype not in allowed:
        return f"the cuda {op} kernel supports {', '.join(str(d).replace('torch.', '') for d in allowed)}, not {dtype}"
    return None


def cross_attention_core_forward(x_cls, x_tokens, w, eps):
    return _ext.get("cuda").cross_attention_core_forward(x_cls, x_tokens, w, float(eps))


def cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz):
    return _ext.get("cuda").cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz)


def patch_embed_forward(images, weight, bias, pos_embed, cls_token):
    return _ext.get("cuda").patch_embed_forward(images, weight, bias, pos_embed, cls_token)


def patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad):
    return _ext.get("cuda").patch_embed_backward(grad_out, images, weight, bool(has_bias), bool(needs_images_grad))
