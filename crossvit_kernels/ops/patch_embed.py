"""Linear patch embedding with the CLS row and the position embedding, as one op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends as _backends
from . import _library  # registers the torch.library ops
from ._checks import autocast_device, check_backend_arg, check_same, check_tensor, promote_floats

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
        images: (B, Cin, H, W); the patch size (ph, pw) must divide H and W.
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
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    B, Cin, H, W = images.shape
    C, wc, ph, pw = weight.shape
    if wc != Cin:
        raise ValueError(f"weight expects {wc} input channels but images have {Cin} (weight is (C, Cin, ph, pw))")
    if B == 0 or C == 0:
        raise ValueError(f"empty input: images {tuple(images.shape)}, weight {tuple(weight.shape)}")
    if H % ph or W % pw or H == 0 or W == 0:
        raise ValueError(f"the patch size {ph}x{pw} must divide the image size {H}x{W}: resize or crop the images")
    P = (H // ph) * (W // pw)
    check_tensor("bias", bias, shape=(C,), optional=True)
    check_tensor("pos_embed", pos_embed)
    if pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]
    if tuple(pos_embed.shape) != (1 + P, C):
        raise ValueError(f"pos_embed must have shape (1, {1 + P}, {C}) or ({1 + P}, {C}) for {P} patches of width {C}, "
                         f"got {tuple(pos_embed.shape)}")
    check_tensor("cls_token", cls_token)
    if cls_token.numel() != C or cls_token.dim() not in (1, 3):
        raise ValueError(f"cls_token must have shape (1, 1, {C}) or ({C},), got {tuple(cls_token.shape)}")
    cls_token = cls_token.reshape(C)
    check_same(dict(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token))
    check_backend_arg(backend)
    name = _backends._check_name(backend if backend is not None else _backends.get_default_backend())
    if name == "reference":
        x = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)
        x = torch.cat([cls_token.reshape(1, 1, C).expand(B, -1, -1), x], dim=1)
        return x + pos_embed.unsqueeze(0)
    return _library.run_patch_embed(images, weight, bias, pos_embed, cls_token, name)
