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

from ._ext_backend import ExtBackend

ExtBackend("cpp", "cpu", "cpu").export(globals())
