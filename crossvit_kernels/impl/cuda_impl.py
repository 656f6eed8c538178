"""Backend ``cuda``: the compiled extension's CUDA kernels (csrc/crossvit_cuda.cu).

The fallback for CUDA tensors where Triton is missing; same contract and semantics as
``crossvit_kernels.impl.torch_impl``. Unavailable, with the reason, when torch is a CPU-only
build, when there is no GPU, or when the CUDA part of the extension was not built; a broken build
raises ImportError from :func:`unavailable_reason` (the registry warns once and falls back).
Dtypes: float32, bfloat16, float16 (float32 accumulation); float64 for patch_embed only.
"""
from typing import Optional

import torch

from ._ext_backend import ExtBackend


def _precheck() -> Optional[str]:
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    return None


ExtBackend("cuda", "cuda", "cuda", _precheck).export(globals())
