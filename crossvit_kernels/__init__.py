"""crossvit-kernels: fused kernels and a timm-exact CrossViT.

Importing the package is cheap: it never imports Triton kernels or the compiled extension and
never touches CUDA; those load the first time an op needs them.
"""
from ._version import __version__
from .backends import BACKENDS, available_backends, explain_dispatch, use_backend
from . import ops

__all__ = [
    "__version__",
    "BACKENDS",
    "available_backends",
    "explain_dispatch",
    "use_backend",
    "ops",
    "modules",
    "CrossViT",
    "create_model",
    "list_models",
    "FUSIONS",
    "patch_timm",
    "unpatch_timm",
]

_LAZY = {
    "CrossViT": ("crossvit_kernels.models", "CrossViT"),
    "create_model": ("crossvit_kernels.models", "create_model"),
    "list_models": ("crossvit_kernels.models", "list_models"),
    "FUSIONS": ("crossvit_kernels.models", "FUSIONS"),
    "patch_timm": ("crossvit_kernels.timm_patch", "patch_timm"),
    "unpatch_timm": ("crossvit_kernels.timm_patch", "unpatch_timm"),
}


def __getattr__(name):
    if name == "modules":
        import importlib
        return importlib.import_module("crossvit_kernels.modules")
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'crossvit_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["modules"])
