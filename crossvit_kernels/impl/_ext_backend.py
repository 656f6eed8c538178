"""The shared body of the two extension backends (``cpp`` and ``cuda``): availability, dtype and
device checks, and the calls into the compiled module that ``crossvit_kernels._ext`` loads."""
from typing import Callable, Optional

import torch

from .. import _ext

XATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ExtBackend:
    """One backend over one compiled module (``kind`` "cpu" or "cuda") for ``device_type`` tensors."""

    def __init__(self, name: str, kind: str, device_type: str,
                 precheck: Optional[Callable[[], Optional[str]]] = None):
        self.name, self.kind, self.device_type, self.precheck = name, kind, device_type, precheck

    def unavailable_reason(self) -> Optional[str]:
        if self.precheck is not None:
            reason = self.precheck()
            if reason is not None:
                return reason
        st = _ext.status(self.kind)
        if st.broken:  # built but not loadable: the registry reports "failed to import" and warns once
            raise ImportError(st.reason)
        return st.reason

    def supports(self, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        device_type = torch.device(device).type
        if device_type != self.device_type:
            return f"the {self.name} backend runs {self.device_type.upper()} tensors only, got {device_type} tensors"
        allowed = XATTN_DTYPES if op == "cross_attention" else PATCH_DTYPES
        if dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            return f"the {self.name} {op} kernel supports {names}, not {dtype}"
        return None

    def cross_attention_core_forward(self, x_cls, x_tokens, w, eps):
        return _ext.get(self.kind).cross_attention_core_forward(x_cls, x_tokens, w, float(eps))

    def cross_attention_core_backward(self, x_cls, x_tokens, w, z, lse, mean, rstd, dz):
        return _ext.get(self.kind).cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz)

    def patch_embed_forward(self, images, weight, bias, pos_embed, cls_token):
        return _ext.get(self.kind).patch_embed_forward(images, weight, bias, pos_embed, cls_token)

    def patch_embed_backward(self, grad_out, images, weight, has_bias, needs_images_grad):
        return _ext.get(self.kind).patch_embed_backward(grad_out, images, weight, bool(has_bias),
                                                        bool(needs_images_grad))

    def export(self, namespace: dict) -> None:
        """Define the backend contract's module-level functions in ``namespace``."""
        for fn in ("unavailable_reason", "supports", "cross_attention_core_forward", "cross_attention_core_backward",
                   "patch_embed_forward", "patch_embed_backward"):
            namespace[fn] = getattr(self, fn)
