"""Linear patch embedding with the CLS row and the position embedding, as one op.

The op's one home: its public entry and argument checks, its ``torch.library`` registration
(``crossvit_kernels::patch_embed`` and ``crossvit_kernels::patch_embed_backward``) with fake
implementations and the autograd formula, and the eager fast path.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import backends as _backends
from ..backends.reference import ReferenceBackend
from ._common import (autocast_device, check_backend_arg, check_same, check_tensor, plain_eager, promote_floats,
                      traced_as_aten)

Tensor = torch.Tensor

__all__ = ["patch_embed"]


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pos_embed: Tensor,
    cls_token: Tensor,
    backend: Optional[str] = None,
) -> Tensor:
    """Patch embedding of a ViT branch, CLS row first, position embedding added.

    Args:
        images: (B, Cin, H, W) (B >= 0); the patch size (ph, pw) must divide H and W.
        weight: (C, Cin, ph, pw), the weight of the stride-(ph, pw) convolution (timm's
            ``patch_embed.proj.weight``); the patch size is read from it.
        bias: (C,) or None.
        pos_embed: (1, 1 + P, C) or (1 + P, C), P = (H / ph) * (W / pw) (timm's ``pos_embed_i``).
        cls_token: (1, 1, C) or (C,) (timm's ``cls_token_i``).
        backend: None (the current default, normally ``"auto"``) or a backend name.

    Returns:
        (B, 1 + P, C) in the images' dtype: row 0 is ``cls_token + pos_embed[0]``, row 1 + p is
        patch p (row-major over the patch grid) embedded, plus ``bias + pos_embed[1 + p]``.

    Equivalent PyTorch (the ``"reference"`` backend, as timm computes it)::

        x = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)
        x = torch.cat([cls_token.reshape(1, 1, C).expand(B, -1, -1), x], dim=1)
        out = x + pos_embed.reshape(1, 1 + P, C)

    Under ``torch.autocast`` the inputs are promoted to their widest floating dtype and the fused
    backends compute in it (autocast's lower precision is not applied); ``"reference"`` runs
    timm's ops under autocast, as timm does.
    """
    ac = autocast_device(images)
    if ac is not None:
        images, weight, bias, pos_embed, cls_token = promote_floats(images, weight, bias, pos_embed, cls_token)
        if (backend if backend is not None else _backends.get_default_backend()) != "reference":
            with torch.autocast(ac, enabled=False):
                return patch_embed(images, weight, bias, pos_embed, cls_token, backend)
    _validate(images, weight, bias, pos_embed, cls_token, backend)
    C = weight.shape[0]
    pos_embed = pos_embed.reshape(-1, C)
    cls_token = cls_token.reshape(C)
    name = _backends.check_name(backend if backend is not None else _backends.get_default_backend())
    if name == "reference" or images.shape[0] == 0 or traced_as_aten():
        # an empty batch has nothing to fuse; ONNX and torch.func take the convolution as it is
        return ReferenceBackend.patch_embed(images, weight, bias, pos_embed, cls_token)
    args = (images, weight, bias, pos_embed, cls_token)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    B, Cin, IH, IW = images.shape
    _, _, PH, PW = weight.shape
    name = _backends.resolve_backend("patch_embed", name, images.device, images.dtype,
                                     {"B": B, "Cin": Cin, "IH": IH, "IW": IW, "C": C, "PH": PH, "PW": PW},
                                     backward=grad)
    if not plain_eager(args):
        return torch.ops.crossvit_kernels.patch_embed(*args, name)
    if grad:
        return PatchEmbedFunction.apply(*args, name)
    with torch.no_grad():
        return _backends.get_backend(name).patch_embed_forward(*args)


def _validate(images, weight, bias, pos_embed, cls_token, backend) -> None:
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    B, Cin, H, W = images.shape
    C, wc, ph, pw = weight.shape
    if wc != Cin:
        raise ValueError(f"weight expects {wc} input channels but images have {Cin} (weight is (C, Cin, ph, pw))")
    if C == 0 or ph == 0 or pw == 0:
        raise ValueError(f"empty weight {tuple(weight.shape)}: need C >= 1 output channels and a patch of 1x1 or more")
    if H % ph or W % pw or H == 0 or W == 0:
        raise ValueError(f"the patch size {ph}x{pw} must divide the image size {H}x{W}: resize or crop the images")
    P = (H // ph) * (W // pw)
    check_tensor("bias", bias, shape=(C,), optional=True)
    check_tensor("pos_embed", pos_embed)
    if tuple(pos_embed.shape) not in ((1, 1 + P, C), (1 + P, C)):
        raise ValueError(f"pos_embed must have shape (1, {1 + P}, {C}) or ({1 + P}, {C}) for {P} patches of width {C}, "
                         f"got {tuple(pos_embed.shape)}")
    check_tensor("cls_token", cls_token)
    if cls_token.numel() != C or cls_token.dim() not in (1, 3):
        raise ValueError(f"cls_token must have shape (1, 1, {C}) or ({C},), got {tuple(cls_token.shape)}")
    check_same(dict(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token))
    check_backend_arg(backend)


# ---------------------------------------------------------------------------------------------
# torch.library registration: the op, its backward, their fake implementations, the autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("crossvit_kernels::patch_embed", mutates_args=())
def _patch_embed_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor, cls_token: Tensor,
                    backend: str) -> Tensor:
    return _backends.get_backend(backend).patch_embed_forward(images, weight, bias, pos_embed, cls_token)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token, backend):
    return images.new_empty((images.shape[0], pos_embed.shape[0], weight.shape[0]))


@torch.library.custom_op("crossvit_kernels::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                             needs_images_grad: bool, backend: str) -> List[Tensor]:
    """(d_images, d_weight, d_bias, d_pos_embed, d_cls_token); empty tensors stand for "not needed"."""
    d_images, d_weight, d_bias, d_pos, d_cls = _backends.get_backend(backend).patch_embed_backward(
        grad_out, images, weight, has_bias, needs_images_grad)
    if d_images is None:
        d_images = images.new_empty((0,))
    if d_bias is None:
        d_bias = weight.new_empty((0,))
    return [d_images, d_weight, d_bias, d_pos, d_cls]


@_patch_embed_backward_op.register_fake
def _(grad_out, images, weight, has_bias, needs_images_grad, backend):
    C = weight.shape[0]
    d_images = torch.empty_like(images, memory_format=torch.contiguous_format) if needs_images_grad \
        else images.new_empty((0,))
    d_bias = weight.new_empty((C,)) if has_bias else weight.new_empty((0,))
    return [d_images, torch.empty_like(weight, memory_format=torch.contiguous_format), d_bias,
            weight.new_empty((grad_out.shape[1], C)), weight.new_empty((C,))]


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token, backend = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _grads(ctx, grad_out, backward) -> tuple:
    """The gradients of (images, weight, bias, pos_embed, cls_token, backend), given the backend's
    backward (through the registered op, or called directly on the eager fast path)."""
    images, weight = ctx.saved_tensors
    needs_images = bool(ctx.needs_input_grad[0])
    d_images, d_weight, d_bias, d_pos, d_cls = backward(grad_out.contiguous(), images, weight, ctx.has_bias,
                                                        needs_images)
    return (d_images if needs_images else None, d_weight, d_bias if ctx.has_bias else None,
            d_pos, d_cls, None)


def _backward(ctx, grad_out):
    return _grads(ctx, grad_out, lambda *a: torch.ops.crossvit_kernels.patch_embed_backward(*a, ctx.backend))


torch.library.register_autograd("crossvit_kernels::patch_embed", _backward, setup_context=_setup_context)


class PatchEmbedFunction(torch.autograd.Function):
    """The registered op's autograd on the eager fast path (same setup, same backward formula)."""

    @staticmethod
    def forward(images, weight, bias, pos_embed, cls_token, backend):
        return _backends.get_backend(backend).patch_embed_forward(images, weight, bias, pos_embed, cls_token)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _backends.get_backend(ctx.backend).patch_embed_backward)
