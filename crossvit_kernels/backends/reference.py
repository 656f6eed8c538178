"""Backend ``reference``: the textbook math, op for op as timm computes it (the tests' oracle).

It forms the concatenation [CLS; tokens], the keys and values of every token, and the attention
probabilities, exactly as timm's ``CrossAttentionBlock`` and ``PatchEmbed`` + cat + add do, and
records its own autograd graph (it is not a custom op). It follows ``torch.autocast`` op for op,
as timm's modules do, and it is the only form that can apply attention dropout (which needs the
probabilities of every token). ``auto`` never picks it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import ANY_DEVICE, FLOAT_DTYPES, Backend

Tensor = torch.Tensor


def textbook_cross_attention(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                             norm_bias: Optional[Tensor], wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                             bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
                             num_heads: int, eps: float, residual: bool = True, attn_drop: float = 0.0) -> Tensor:
    """timm's block on [x_cls; x_tokens] (attention dropout with probability ``attn_drop``), (B, C)
    in and out. TorchScript-compatible: scripted models run this form (see ``crossvit_kernels.modules``)."""
    B, C = x_cls.shape[0], x_cls.shape[1]
    H = num_heads
    x = torch.cat([x_cls.unsqueeze(1), x_tokens], dim=1)
    N = x.shape[1]
    x = F.layer_norm(x, [C], norm_weight, norm_bias, eps)
    q = F.linear(x[:, 0:1], wq, bq).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)
    k = F.linear(x, wk, bk).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    v = F.linear(x, wv, bv).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    attn = attn.softmax(dim=-1)
    if attn_drop > 0:
        attn = F.dropout(attn, attn_drop, training=True)
    o = (attn @ v).transpose(1, 2).reshape(B, 1, C)
    delta = F.linear(o, wo, bo).reshape(B, C)
    return x_cls + delta if residual else delta


def textbook_patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                         cls_token: Tensor) -> Tensor:
    """timm's PatchEmbed (a stride-p convolution), the CLS row concatenated, pos_embed added;
    ``pos_embed`` (1 + P, C) or (1, 1 + P, C), ``cls_token`` (C,) or (1, 1, C). TorchScript-compatible."""
    B = images.shape[0]
    C, ph, pw = weight.shape[0], weight.shape[2], weight.shape[3]
    x = F.conv2d(images, weight, bias, stride=[ph, pw]).flatten(2).transpose(1, 2)
    x = torch.cat([cls_token.reshape(1, 1, C).expand(B, -1, -1), x], dim=1)
    return x + pos_embed.reshape(1, -1, C)


class ReferenceBackend(Backend):
    name = "reference"
    devices = ANY_DEVICE
    dtypes = {"cross_attention": FLOAT_DTYPES, "patch_embed": FLOAT_DTYPES}

    @staticmethod
    def cross_attention(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                        wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], wv: Tensor,
                        bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], num_heads: int, eps: float,
                        residual: bool = True, attn_drop: float = 0.0) -> Tensor:
        """timm's block on [x_cls; x_tokens] (attention dropout with probability ``attn_drop``)."""
        return textbook_cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                        num_heads, eps, residual, attn_drop)

    @staticmethod
    def patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                    cls_token: Tensor) -> Tensor:
        """timm's PatchEmbed (a stride-p convolution), the CLS row concatenated, pos_embed added."""
        return textbook_patch_embed(images, weight, bias, pos_embed, cls_token)
