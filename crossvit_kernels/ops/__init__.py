"""Public functional ops. Each takes ``backend=None`` (see :mod:`crossvit_kernels.backends`)."""
from .cross_attention import cross_attention
from .patch_embed import patch_embed

__all__ = ["cross_attention", "patch_embed"]
