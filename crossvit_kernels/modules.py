"""nn.Modules with timm's parameter names, running on the package's ops.

Every module here has the state_dict keys and defaults of its timm counterpart
(``timm.models.crossvit`` / ``timm.models.vision_transformer``), so timm checkpoints load unchanged.

The fused forwards are written once, as functions of a module with timm's attribute names
(:func:`fused_cross_attention_block`, :func:`fused_encoder_block`, :func:`embed_tokens`): these
modules call them, and so do the timm modules that :func:`crossvit_kernels.patch_timm` converts.

Tracing and scripting. The fused work enters through a few functions of tensors and Python
constants (:func:`cross_attention_block_op`, :func:`patch_embed_op`, :func:`conv_tokens`, and the
input checks :func:`check_images` / :func:`check_image_size`), registered as ``torch.fx`` leaves
(``torch.fx.wrap``): symbolic tracing (``torch.fx.symbolic_trace``, timm's and torchvision's
feature extractors) records one call per op and the graph runs the fused op, whatever the
runtime backend, dtype or device. The same functions are TorchScript-compatible: under
``torch.jit.script`` (deprecated in torch 2.14 but still tested by timm) they run the textbook
form, op for op timm's, because the fused ops' Python dispatch (backend choice, validation,
autograd.Function) cannot be scripted. The oneDNN encoder path is chosen per call from runtime
facts (grad mode, dtype, device), which a traced graph cannot re-decide: traced and scripted
encoder blocks are timm's graph of modules.
"""

from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

from . import backends as _backends
from .backends.reference import textbook_cross_attention, textbook_patch_embed
from .ops._common import plain_eager
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
    mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
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
        if torch.jit.is_scripting():
            if x_tokens is not None:
                x = torch.cat([x, x_tokens], dim=1)
            return x[:, 0:1] + self.drop_path(self.attn(self.norm1(x)))
        if x_tokens is None:
            return self.forward_cls(x[:, 0], x[:, 1:]).unsqueeze(1)
        return self.forward_cls(x[:, 0], x_tokens).unsqueeze(1)

    def forward_cls(self, x_cls: Tensor, x_tokens: Tensor) -> Tensor:
        """(B, C) query, (B, M, C) tokens -> (B, C) new CLS."""
        return fused_cross_attention_block(self, x_cls, x_tokens, self.backend)


def hooked(module: nn.Module, itself: bool = False, inside: bool = True) -> bool:
    """Whether a module inside ``module`` (with ``inside``), ``module`` itself (with ``itself``) or
    every module (global hooks) has a forward or forward-pre hook. A fused path skips the modules
    it folds, so where they carry hooks the caller runs them instead: the hooks fire as in timm.
    (Walks the ``_modules`` dicts: attribute access through nn.Module.__getattr__ would cost more
    than the check.)"""
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return True
    if itself and (module._forward_hooks or module._forward_pre_hooks):
        return True
    stack = list(module._modules.values()) if inside else []
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        if m._modules:
            stack.extend(m._modules.values())
    return False


def cross_attention_block_op(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                             norm_bias: Optional[Tensor], wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                             bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
                             num_heads: int, eps: float, backend: Optional[str], residual: bool, attn_drop: float,
                             training: bool) -> Tensor:
    """The cross-attention op as a module uses it (optionally without the residual, with attention
    dropout in training): the fused op in eager mode and under torch.compile / export, one leaf
    call under torch.fx, the textbook form under TorchScript."""
    if torch.jit.is_scripting():
        return textbook_cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                        num_heads, eps, residual, attn_drop if training else 0.0)
    return _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps,
                            backend, residual=residual, attn_drop=attn_drop, training=training)


def fused_cross_attention_block(blk: nn.Module, x_cls: Tensor, x_tokens: Tensor, backend: Optional[str]) -> Tensor:
    """A cross-attention block with timm's names (``norm1``, ``attn.wq/wk/wv/proj``,
    ``attn.attn_drop``, ``attn.proj_drop``, ``drop_path``) on the fused op: (B, C) query and
    (B, M, C) tokens -> (B, C) new CLS, timm's block on [x_cls; x_tokens]. Where the folded
    modules carry hooks, they run (timm's math) so that the hooks fire."""
    a, n = blk.attn, blk.norm1
    if hooked(blk):
        x = torch.cat([x_cls.unsqueeze(1), x_tokens], dim=1)
        return x_cls + blk.drop_path(a(n(x)))[:, 0]
    drop_active = blk.training and (a.proj_drop.p > 0 or not isinstance(blk.drop_path, nn.Identity))
    delta = cross_attention_block_op(
        x_cls, x_tokens, n.weight, n.bias, a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias,
        a.wv.weight, a.wv.bias, a.proj.weight, a.proj.bias, a.num_heads, n.eps, backend,
        not drop_active, a.attn_drop.p, blk.training)
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
    (no gradient recorded), plain eager mode (not under the compiler, which fuses linears its own
    way, nor torch.fx / TorchScript tracing, torch.func transforms or dispatch modes: see
    :func:`crossvit_kernels.ops._common.plain_eager`), not under ``use_backend("reference")`` and
    not under CPU autocast."""
    if not plain_eager((x, weight)):   # first: tracers cannot follow the mkldnn queries below
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
    (B, 1 + P, C) = [cls + pos[0]; t + pos[1:]] (the dagger models' epilogue). At inference in plain
    eager mode one pass writes the convolution's output plus the position embedding straight into
    the buffer (no torch.cat copy, no separate add); with autograd, under a compiler or tracer
    (which see the plain form), or with mixed dtypes, the plain cat + add."""
    if torch.jit.is_scripting():
        return torch.cat([cls_token.expand(t.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], dim=1) + pos_embed
    B, C = t.shape[:2]
    t = t.flatten(2).transpose(1, 2)                                       # (B, P, C), a view
    if (not plain_eager((t, cls_token, pos_embed)) or t.dtype != pos_embed.dtype or cls_token.dtype != pos_embed.dtype
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
        if torch.jit.is_scripting():
            return self.forward_modules(x)
        if not self.training and encoder_fast_path(self, x):
            return fused_encoder_block(self, x)
        return self.forward_modules(x)

    def forward_modules(self, x: Tensor) -> Tensor:
        """timm's forward, module by module."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def encoder_fast_path(blk: nn.Module, x: Tensor) -> bool:
    """Whether an encoder block with timm's names takes :func:`fused_encoder_block` for ``x``:
    :func:`onednn_linear_usable`, and no hooks on the modules it folds."""
    return onednn_linear_usable(x, blk.attn.qkv.weight) and not hooked(blk)


def fused_encoder_block(blk: nn.Module, x: Tensor) -> Tensor:
    """An encoder block with timm's names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.act``, ``mlp.fc2``) at CPU inference, where :func:`encoder_fast_path`:
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
        x = check_image_size(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)

    def forward_tokens(self, x: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, 1 + P, C): [cls + pos[0]; patches + pos[1:]]."""
        if torch.jit.is_scripting():
            return torch.cat([cls_token.expand(x.shape[0], -1, -1), self.forward(x)], dim=1) + pos_embed
        return embed_tokens(self, x, cls_token, pos_embed, self.backend, linear=not self.multi_conv)


def check_images(x: Tensor, in_chans: int) -> Tensor:
    """``x`` itself, after checking it is a (B, in_chans, H, W) floating-point batch (a clear
    ValueError / TypeError otherwise)."""
    if torch.jit.is_scripting():
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(f"expected images of shape (B, {in_chans}, H, W), got {x.shape}")
        if not x.is_floating_point():
            raise TypeError("images must be a floating-point tensor")
        return x
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected images of shape (B, {in_chans}, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]}")
    if not x.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {x.dtype}")
    return x


def check_image_size(x: Tensor, img_size: Tuple[int, int]) -> Tensor:
    """``x`` itself, after checking that its spatial size is ``img_size`` (timm's message)."""
    H, W = x.shape[-2], x.shape[-1]
    if H != img_size[0] or W != img_size[1]:
        raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({img_size[0]}*{img_size[1]}).")
    return x


def patch_embed_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor, cls_token: Tensor,
                   backend: Optional[str]) -> Tensor:
    """:func:`crossvit_kernels.ops.patch_embed` as a module uses it: one leaf call under torch.fx,
    the textbook form under TorchScript."""
    if torch.jit.is_scripting():
        return textbook_patch_embed(images, weight, bias, pos_embed, cls_token)
    return _patch_embed_op(images, weight, bias, pos_embed, cls_token, backend=backend)


def embed_tokens(pe: nn.Module, x: Tensor, cls_token: Tensor, pos_embed: Tensor, backend: Optional[str],
                 linear: bool) -> Tensor:
    """A branch's token buffer (B, 1 + P, C) = [cls + pos[0]; patches + pos[1:]] from a patch
    embedding with timm's names (``img_size``, ``patch_size``, ``proj``). ``linear``: ``proj`` is
    one stride-p convolution, which runs as the fused patch_embed op; else the convolutions run
    and :func:`conv_tokens` writes the epilogue. Where the patch embedding (or its linear ``proj``)
    carries hooks, it is called as a module, as in timm."""
    if hooked(pe, itself=True, inside=linear):   # the dagger convolutions run as modules anyway
        t = pe(x)
        return torch.cat([cls_token.expand(t.shape[0], -1, -1), t], dim=1) + pos_embed
    x = check_image_size(x, pe.img_size)
    # the checked image size is the configured one: decide on Python ints, so tracers go through
    if linear and pe.img_size[0] % pe.patch_size[0] == 0 and pe.img_size[1] % pe.patch_size[1] == 0:
        return patch_embed_op(x, pe.proj.weight, pe.proj.bias, pos_embed, cls_token, backend)
    # the dagger convolutions, or a linear embedding whose patches do not tile the image (the
    # convolution drops the remainder, as in timm)
    return conv_tokens(pe.proj(x), cls_token, pos_embed)


# torch.fx leaves (see the module docstring); crossvit_kernels.models.crossvit and .timm_patch
# register the names they import as well.
for _name in ("check_images", "check_image_size", "cross_attention_block_op", "patch_embed_op", "conv_tokens"):
    torch.fx.wrap(_name)
del _name
