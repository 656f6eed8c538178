"""Backend ``triton``: fused Triton kernels (see crossvit_kernels.backends for the contract).

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1), which
is how the kernels are tested on machines without a GPU. Importing this package imports Triton,
so nothing imports it until an op asks for the ``triton`` backend.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

_IMPORT_ERROR: Optional[str] = None
try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install
    _IMPORT_ERROR = f"cannot import triton: {type(exc).__name__}: {exc}"

_OPS = {}
if _IMPORT_ERROR is None:
    if importlib.util.find_spec(__name__ + ".cross_attention") is not None:
        from .cross_attention import cross_attention_core_backward, cross_attention_core_forward  # noqa: F401
        _OPS["cross_attention"] = True
    if importlib.util.find_spec(__name__ + ".patch_embed") is not None:
        from .patch_embed import patch_embed_backward, patch_embed_forward  # noqa: F401
        _OPS["patch_embed"] = True

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not _OPS:
        return "no Triton kernels are installed"
    if not torch.cuda.is_available() and not _interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if op not in _OPS:
        return f"no Triton kernel for {op}"
    if device.type == "cpu" and not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)"
    if device.type not in ("cuda", "cpu"):
        return f"unsupported device {device.type}"
    if dtype not in _DTYPES:
        return f"unsupported dtype {dtype}"
    return None
