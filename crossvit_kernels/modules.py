"""nn.Modules with timm's parameter names, running on the package's ops.

Every module here has the state_dict keys and defaults of its timm counterpart
(``timm.models.crossvit`` / ``timm.models.vision_transformer``), so timm checkpoints load unchanged.

The fused forwards are written once, as functions of a module with timm's attribute names
(:func:`fused_cross_attention_block`, :func:`fused_encoder_block`, :func:`embed_tokens`): these
modules call them, and so do the timm modules that :func:`crossvit_kernels.patch_timm` converts.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends as _backends
from .ops.cross_attention import _cross_attention
from .ops.patch_embed import patch_embed as _patch_embed_op

Tensor = torch.Tensor

__all__ = ["CrossAttention", "CrossAttentionBlock", "Attention", "Mlp", "Block", "DropPath", "PatchEmbed"]


def _pair(x) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm's ``drop_path`` with scale_by_keep=True)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class CrossAttention(nn.Module):
    """The parameters of CrossViT's single-query cross-attention (timm's ``CrossAttention``):
    ``wq``, ``wk``, ``wv`` and ``proj``. Its forward is timm's: (B, N, C) -> (B, 1, C) without the
    LayerNorm and the residual (those belong to :class:`CrossAttentionBlock`)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H = self.num_heads
        q = self.wq(x[:, 0:1]).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x))


class CrossAttentionBlock(nn.Module):
    """CrossViT's fusion block: LayerNorm, single-query cross-attention, residual on the CLS.

    Same parameter names and defaults as timm's ``CrossAttentionBlock`` (``norm1``, ``attn.wq``,
    ``attn.wk``, ``attn.wv``, ``attn.proj``). ``forward(x)`` maps (B, N, C) to (B, 1, C) exactly
    like timm's (token 0 is the query); ``forward(x_cls, x_tokens)`` takes the query (B, C) or
    (B, 1, C) and the tokens (B, M, C) separately (the tokens may be a strided view, never copied)
    and returns (B, 1, C). ``mlp_ratio`` and ``act_layer`` are accepted for signature compatibility;
    like timm's block, this one has no MLP.

    The computation is :func:`crossvit_kernels.ops.cross_attention` with ``backend=self.backend``
    (None: the current default, normally ``auto``). Attention dropout in training needs the
    textbook form and uses it.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        if not isinstance(self.norm1, nn.LayerNorm):
            raise TypeError(f"norm_layer must build an nn.LayerNorm (the fused op folds it), got {type(self.norm1)}")
        self.attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.backend = backend

    def forward(self, x: Tensor, x_tokens: Optional[Tensor] = None) -> Tensor:
        if x_tokens is None:
            if x.dim() != 3:
                raise ValueError(f"expected x of shape (B, N, C), got {tuple(x.shape)}")
            x_cls, x_tokens = x[:, 0], x[:, 1:]
        else:
            x_cls = x[:, 0] if x.dim() == 3 and x.shape[1] == 1 else x
        return self.forward_cls(x_cls, x_tokens).unsqueeze(1)

    def forward_cls(self, x_cls: Tensor, x_tokens: Tensor) -> Tensor:
        """(B, C) query, (B, M, C) tokens -> (B, C) new CLS."""
        return fused_cross_attention_block(self, x_cls, x_tokens, self.backend)


def fused_cross_attention_block(blk: nn.Module, x_cls: Tensor, x_tokens: Tensor, backend: Optional[str]) -> Tensor:
    """A cross-attention block with timm's names (``norm1``, ``attn.wq/wk/wv/proj``,
    ``attn.attn_drop``, ``attn.proj_drop``, ``drop_path``) on the fused op: (B, C) query and
    (B, M, C) tokens -> (B, C) new CLS, timm's block on [x_cls; x_tokens]."""
    a, n = blk.attn, blk.norm1
    drop_active = blk.training and (a.proj_drop.p > 0 or not isinstance(blk.drop_path, nn.Identity))
    delta = _cross_attention(
        x_cls, x_tokens, n.weight, n.bias, a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias,
        a.wv.weight, a.wv.bias, a.proj.weight, a.proj.bias, a.num_heads, n.eps, backend,
        residual=not drop_active, attn_drop=a.attn_drop.p, training=blk.training)
    if not drop_active:
        return delta
    return x_cls + blk.drop_path(a.proj_drop(delta))


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``), on SDPA."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """timm's ``Mlp``: ``fc1``, activation, dropout, ``fc2``, dropout."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


_LINEAR_POINTWISE = None


def _has_linear_pointwise() -> bool:
    """oneDNN's fused linear is a private op of torch's CPU build: use it only where it exists."""
    global _LINEAR_POINTWISE
    if _LINEAR_POINTWISE is None:
        try:
            _LINEAR_POINTWISE = bool(torch.backends.mkldnn.is_available()) and \
                hasattr(torch.ops.mkldnn, "_linear_pointwise")
        except Exception:  # an unusual build: fall back to F.linear
            _LINEAR_POINTWISE = False
    return _LINEAR_POINTWISE


def onednn_linear_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`onednn_linear` may replace ``F.linear`` here: CPU float32/bfloat16 inference
    (no gradient recorded), eager mode (the compiler fuses linears its own way), not under
    ``use_backend("reference")`` and not under CPU autocast."""
    if torch.compiler.is_compiling():   # first: the compiler cannot trace the mkldnn queries below
        return False
    if _backends.get_default_backend() == "reference":   # the oracle is timm's computation, op for op
        return False
    if torch.is_autocast_enabled("cpu"):   # F.linear then runs in autocast's dtype, as in timm
        return False
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and _has_linear_pointwise() and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def onednn_linear(x: Tensor, lin: nn.Linear, gelu: bool = False) -> Tensor:
    """``F.linear(x, lin.weight, lin.bias)`` (then exact GELU when ``gelu``) as one oneDNN CPU kernel:
    bias and activation are applied while the output tile is in cache, with no bias broadcast copy
    and no separate activation pass (measured 5-15% faster than MKL's addmm + GELU at CrossViT's
    shapes on the CPU). Inference only: the op has no autograd formula."""
    return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


def conv_tokens(t: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
    """A convolutional patch embedding's output (B, C, gh, gw) as the branch's token buffer
    (B, 1 + P, C) = [cls + pos[0]; t + pos[1:]] (the dagger models' epilogue). At inference one
    pass writes the convolution's output plus the position embedding straight into the buffer (no
    torch.cat copy, no separate add); with autograd, under the compiler (which fuses the plain form
    itself) or with mixed dtypes, the plain cat + add."""
    B, C = t.shape[:2]
    t = t.flatten(2).transpose(1, 2)                                       # (B, P, C), a view
    if (torch.compiler.is_compiling() or t.dtype != pos_embed.dtype or cls_token.dtype != pos_embed.dtype
            or (torch.is_grad_enabled() and (t.requires_grad or cls_token.requires_grad or pos_embed.requires_grad))):
        return torch.cat([cls_token.expand(B, -1, -1), t], dim=1) + pos_embed
    out = t.new_empty((B, 1 + t.shape[1], C))
    torch.add(t, pos_embed[:, 1:], out=out[:, 1:])
    out[:, 0] = cls_token[:, 0] + pos_embed[:, 0]
    return out


class Block(nn.Module):
    """Pre-norm transformer encoder block with timm's parameter names
    (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and onednn_linear_usable(x, self.attn.qkv.weight):
            return fused_encoder_block(self, x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def fused_encoder_block(blk: nn.Module, x: Tensor) -> Tensor:
    """An encoder block with timm's names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.act``, ``mlp.fc2``) at CPU inference, where :func:`onednn_linear_usable`:
    the same math with its four linears on oneDNN's fused linear + bias (+ exact GELU)."""
    a, m = blk.attn, blk.mlp
    B, N, _ = x.shape
    qkv = onednn_linear(blk.norm1(x), a.qkv).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)
    x = x + onednn_linear(o, a.proj)
    gelu = type(m.act) is nn.GELU and m.act.approximate == "none"
    h = onednn_linear(blk.norm2(x), m.fc1, gelu=gelu)
    return x + onednn_linear(h if gelu else m.act(h), m.fc2)


class PatchEmbed(nn.Module):
    """CrossViT's patch embedding with timm's parameter names (``proj`` is a Conv2d, or for the
    dagger models an nn.Sequential of three convolutions with ReLU between).

    ``forward(x)`` returns the patch tokens (B, P, C) like timm's; :meth:`forward_tokens` returns
    the branch's whole token buffer (B, 1 + P, C) with the CLS row and position embedding, through
    :func:`crossvit_kernels.ops.patch_embed` for the linear embedding.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, multi_conv: bool = False, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size, patch_size = _pair(img_size), _pair(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.multi_conv = multi_conv
        self.backend = backend
        if multi_conv:
            if patch_size[0] == 12:
                convs = [(embed_dim // 4, 7, 4, 3), (embed_dim // 2, 3, 3, 0), (embed_dim, 3, 1, 1)]
            elif patch_size[0] == 16:
                convs = [(embed_dim // 4, 7, 4, 3), (embed_dim // 2, 3, 2, 1), (embed_dim, 3, 2, 1)]
            else:
                raise ValueError(f"multi_conv (dagger) patch embedding supports patch sizes 12 and 16, "
                                 f"got {patch_size[0]}")
            layers, cin = [], in_chans
            for i, (cout, k, s, p) in enumerate(convs):
                layers.append(nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p, **dd))
                if i < 2:
                    layers.append(nn.ReLU(inplace=True))
                cin = cout
            self.proj = nn.Sequential(*layers)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)

    def forward(self, x: Tensor) -> Tensor:
        _check_image_size(self, x)
        return self.proj(x).flatten(2).transpose(1, 2)

    def forward_tokens(self, x: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, 1 + P, C): [cls + pos[0]; patches + pos[1:]]."""
        return embed_tokens(self, x, cls_token, pos_embed, self.backend, linear=not self.multi_conv)


def _check_image_size(pe: nn.Module, x: Tensor) -> None:
    H, W = x.shape[-2:]
    if H != pe.img_size[0] or W != pe.img_size[1]:
        raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({pe.img_size[0]}*{pe.img_size[1]}).")


def embed_tokens(pe: nn.Module, x: Tensor, cls_token: Tensor, pos_embed: Tensor, backend: Optional[str],
                 linear: bool) -> Tensor:
    """A branch's token buffer (B, 1 + P, C) = [cls + pos[0]; patches + pos[1:]] from a patch
    embedding with timm's names (``img_size``, ``patch_size``, ``proj``). ``linear``: ``proj`` is
    one stride-p convolution, which runs as the fused patch_embed op; else the convolutions run
    and :func:`conv_tokens` writes the epilogue."""
    _check_image_size(pe, x)
    if linear and x.shape[-2] % pe.patch_size[0] == 0 and x.shape[-1] % pe.patch_size[1] == 0:
        return _patch_embed_op(x, pe.proj.weight, pe.proj.bias, pos_embed, cls_token, backend=backend)
    # the dagger convolutions, or a linear embedding whose patches do not tile the image (the
    # convolution drops the remainder, as in timm)
    return conv_tokens(pe.proj(x), cls_token, pos_embed)
