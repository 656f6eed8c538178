"""CrossViT (Chen, Fan, Panda, ICCV 2021) on the package's fused ops, checkpoint-compatible with timm.

The constructor takes timm's ``CrossVit`` arguments (plus ``fusion=``) and builds a module whose
state_dict keys and shapes are exactly timm's, so ``load_state_dict(timm_model.state_dict())``
works with ``strict=True``. With the default ``fusion="cross_attention"`` the logits agree with
timm's to float32 rounding (the fused cross-attention computes the same function in another order).
"""

import functools
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..modules import Block, PatchEmbed, check_images
from .fusion import Fusion, check_fusion

Tensor = torch.Tensor

__all__ = ["CrossViT", "MultiScaleBlock", "scale_image"]


_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)   # CrossViT's norm layer (timm's default)


def _pair(x):
    return (x, x) if isinstance(x, (int, float)) else tuple(x)


def scale_image(x: Tensor, size: Tuple[int, int], crop_scale: bool = False) -> Tensor:
    """Bring the images to a branch's input size: centre crop when ``crop_scale`` and the image is
    large enough, else bicubic resize (timm's ``scale_image``). No copy when the size matches.
    A torch.fx leaf, as timm's (its branches depend on the input's size)."""
    H, W = x.shape[-2], x.shape[-1]
    if H == size[0] and W == size[1]:
        return x
    if crop_scale and size[0] <= H and size[1] <= W:
        top, left = int(round((H - size[0]) / 2.0)), int(round((W - size[1]) / 2.0))
        return x[:, :, top:top + size[0], left:left + size[1]]
    if torch.jit.is_scripting():
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    if torch.onnx.is_in_onnx_export():
        # ONNX's cubic Resize is the same function, but runtimes compute it pixel by pixel (about
        # 20x slower than these two matmuls in onnxruntime 1.32 on a CPU, a third of a CrossViT-9's
        # time): resize each axis with its constant (out, in) interpolation matrix
        rows = torch.tensor(bicubic_weights(int(H), size[0]), dtype=x.dtype, device=x.device)
        cols = torch.tensor(bicubic_weights(int(W), size[1]), dtype=x.dtype, device=x.device)
        return torch.matmul(rows, torch.matmul(x, cols.t()))
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


@functools.lru_cache(maxsize=None)
def bicubic_weights(n_in: int, n_out: int) -> Tuple[Tuple[float, ...], ...]:
    """The (n_out, n_in) matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along
    one axis, in float64: output j samples the input at (n_in / n_out) (j + 1/2) - 1/2 with the
    cubic convolution kernel (a = -0.75) over its four nearest inputs, indices clamped to the
    border (a clamped tap adds its weight to the border input)."""
    a = -0.75

    def near(t):   # the kernel for |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):    # the kernel for 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    rows = []
    for j in range(n_out):
        src = n_in / n_out * (j + 0.5) - 0.5
        i = math.floor(src)
        t = src - i
        row = [0.0] * n_in
        for k, w in zip(range(i - 1, i + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            row[min(max(k, 0), n_in - 1)] += w
        rows.append(tuple(row))
    return tuple(rows)


# torch.fx leaves (see crossvit_kernels.modules)
torch.fx.wrap("scale_image")
torch.fx.wrap("check_images")


class MultiScaleBlock(Fusion):
    """One multi-scale block: each branch's transformer encoders, then the fusion stage.

    Parameter names are timm's (``blocks``, ``projs``, ``fusion``, ``revert_projs``); ``fusion``
    selects the scheme (see :mod:`crossvit_kernels.models.fusion`).
    """

    def __init__(self, dim: Sequence[int], patches: Sequence[int], depth: Sequence[int], num_heads: Sequence[int],
                 mlp_ratio: Sequence[float], qkv_bias: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Union[List[float], float] = 0.0, act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, fusion: str = "cross_attention",
                 grids: Optional[Sequence[Tuple[int, int]]] = None, device=None, dtype=None):
        nn.Module.__init__(self)
        dd = {"device": device, "dtype": dtype}
        nb = len(dim)
        if isinstance(drop_path, (int, float)):
            drop_path = [float(drop_path)] * (max(depth[:-1]) + depth[-1])
        self.num_branches = nb
        self.blocks = nn.ModuleList()
        for d in range(nb):
            layers = [Block(dim[d], num_heads[d], mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias, proj_drop=proj_drop,
                            attn_drop=attn_drop, drop_path=drop_path[i], act_layer=act_layer, norm_layer=norm_layer,
                            **dd) for i in range(depth[d])]
            if layers:
                self.blocks.append(nn.Sequential(*layers))
        if grids is None:
            grids = [(int(round(p ** 0.5)),) * 2 for p in patches]
        self._build_fusion(fusion, dim, num_heads, grids, depth[-1], mlp_ratio, qkv_bias, proj_drop, attn_drop,
                           drop_path[-1], act_layer, norm_layer, dd)

        self.grad_checkpointing = False

    grad_checkpointing = False   # class default: models pickled before the attribute existed

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if torch.jit.is_scripting():
            return self._forward_script(x)
        if not len(self.blocks):
            outs = list(x)
        elif self.grad_checkpointing and torch.is_grad_enabled() and not isinstance(x[0], torch.fx.Proxy):
            # each encoder block is one checkpoint: only its input is kept, its activations are
            # recomputed in the backward (non-reentrant: works with the fused ops, hooks, DDP)
            outs = []
            for i, seq in enumerate(self.blocks):
                y = x[i]
                for blk in seq:
                    y = checkpoint(blk, y, use_reentrant=False)
                outs.append(y)
        else:
            outs = [blk(x[i]) for i, blk in enumerate(self.blocks)]
        return self.forward_fusion(outs)

    def _forward_script(self, x: List[Tensor]) -> List[Tensor]:
        """TorchScript's forward: timm's MultiScaleBlock.forward (cross-attention fusion) or the
        branches alone (no fusion); see :meth:`__prepare_scriptable__`."""
        outs_b: List[Tensor] = []
        for i, block in enumerate(self.blocks):
            outs_b.append(block(x[i]))
        if len(outs_b) == 0:
            outs_b = x
        if not hasattr(self, "projs"):
            return outs_b
        proj_cls_token: List[Tensor] = []
        for i, proj in enumerate(self.projs):
            proj_cls_token.append(proj(outs_b[i][:, 0:1]))
        outs: List[Tensor] = []
        for i, (fusion, revert_proj) in enumerate(zip(self.fusion, self.revert_projs)):
            tmp = torch.cat((proj_cls_token[i], outs_b[(i + 1) % self.num_branches][:, 1:]), dim=1)
            tmp = fusion(tmp)
            outs.append(torch.cat((revert_proj(tmp[:, 0:1]), outs_b[i][:, 1:]), dim=1))
        return outs

    def __prepare_scriptable__(self):
        if self.kind not in ("cross_attention", "none"):
            raise RuntimeError(f"torch.jit.script supports the fusions 'cross_attention' (timm's) and 'none', not "
                               f"{self.kind!r}: use torch.compile or torch.export for this model")
        return self


class CrossViT(nn.Module):
    """CrossViT with timm's constructor arguments and state_dict, plus ``fusion=``.

    Args (timm's ``CrossVit``): img_size, img_scale, patch_size, in_chans, num_classes, embed_dim,
    depth, num_heads, mlp_ratio, multi_conv, crop_scale, qkv_bias, drop_rate, pos_drop_rate,
    proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer, global_pool, device, dtype.
    fusion: one of :data:`FUSIONS` ("cross_attention", the paper's and timm's, is the default).
    backend: the backend of the fused ops (None: the current default, normally ``auto``).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        img_scale: Tuple[float, ...] = (1.0, 1.0),
        patch_size: Tuple[int, ...] = (8, 16),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Tuple[int, ...] = (192, 384),
        depth: Tuple[Tuple[int, ...], ...] = ((1, 3, 1), (1, 3, 1), (1, 3, 1)),
        num_heads: Tuple[int, ...] = (6, 12),
        mlp_ratio: Tuple[float, ...] = (2.0, 2.0, 4.0),
        multi_conv: bool = False,
        crop_scale: bool = False,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Type[nn.Module] = _LAYER_NORM,
        global_pool: str = "token",
        fusion: str = "cross_attention",
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.fusion = check_fusion(fusion)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = _pair(img_size)
        img_scale = _pair(img_scale)
        self.img_size_scaled = [tuple(int(sj * si) for sj in self.img_size) for si in img_scale]
        self.crop_scale = crop_scale
        self.num_branches = len(patch_size)
        if not (len(embed_dim) == len(num_heads) == self.num_branches):
            raise ValueError(f"patch_size, embed_dim and num_heads need one entry per branch, got "
                             f"{len(patch_size)}, {len(embed_dim)}, {len(num_heads)}")
        for im, p in zip(self.img_size_scaled, patch_size):
            if im[0] % p or im[1] % p:
                raise ValueError(f"patch size {p} must divide the branch input size {im}")
        grids = [(im[0] // p, im[1] // p) for im, p in zip(self.img_size_scaled, patch_size)]
        num_patches = [g[0] * g[1] for g in grids]
        self.embed_dim = tuple(embed_dim)
        self.num_features = self.head_hidden_size = sum(embed_dim)
        self.backend = backend

        for i in range(self.num_branches):
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + num_patches[i], embed_dim[i], **dd)))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, embed_dim[i], **dd)))
        self.patch_embed = nn.ModuleList([
            PatchEmbed(img_size=im, patch_size=p, in_chans=in_chans, embed_dim=d, multi_conv=multi_conv,
                       backend=backend, **dd)
            for im, p, d in zip(self.img_size_scaled, patch_size, embed_dim)])
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        total_depth = sum(sum(x[-2:]) for x in depth)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, total_depth, device="cpu")]
        ptr = 0
        self.blocks = nn.ModuleList()
        for block_cfg in depth:
            cur = max(block_cfg[:-1]) + block_cfg[-1]
            self.blocks.append(MultiScaleBlock(
                embed_dim, num_patches, block_cfg, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[ptr:ptr + cur],
                norm_layer=norm_layer, fusion=self.fusion, grids=grids, **dd))
            ptr += cur
        self.num_feature_blocks = len(depth)
        self.feature_info = [
            dict(num_chs=embed_dim[b], reduction=round(patch_size[b] / img_scale[b]), module=f"blocks.{i}")
            for b in range(self.num_branches) for i in range(self.num_feature_blocks)]
        self.norm = nn.ModuleList([norm_layer(embed_dim[i], **dd) for i in range(self.num_branches)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.ModuleList([nn.Linear(embed_dim[i], num_classes, **dd) if num_classes > 0 else nn.Identity()
                                   for i in range(self.num_branches)])
        self.pretrained_cfg: dict = {}
        self.reset_parameters()

    # -- initialisation (timm's: truncated normal std 0.02, zero biases, unit LayerNorm) --------
    def reset_parameters(self) -> None:
        for i in range(self.num_branches):
            nn.init.trunc_normal_(getattr(self, f"pos_embed_{i}"), std=0.02, a=-2.0, b=2.0)
            nn.init.trunc_normal_(getattr(self, f"cls_token_{i}"), std=0.02, a=-2.0, b=2.0)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # -- timm's model API ---------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        out = set()
        for i in range(self.num_branches):
            out.add(f"cls_token_{i}")
            pe = getattr(self, f"pos_embed_{i}", None)
            if pe is not None and pe.requires_grad:
                out.add(f"pos_embed_{i}")
        return out

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing of every encoder block (``torch.utils.checkpoint``,
        ``use_reentrant=False``): in training with autograd, each encoder block keeps only its input
        and recomputes its activations in the backward; the gradients are the same. timm's CrossVit
        does not support this (its ``set_grad_checkpointing(True)`` asserts); this model does,
        including under ``forward_intermediates`` and torch.compile. Not applied under
        torch.jit.script or torch.fx tracing (which see the plain forward)."""
        self.grad_checkpointing = bool(enable)
        for blk in self.blocks:
            blk.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def default_cfg(self) -> dict:
        """timm's alias of ``pretrained_cfg``."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    __jit_unused_properties__ = ["default_cfg"]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        p = next(self.parameters())
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.ModuleList([
            nn.Linear(self.embed_dim[i], num_classes, device=p.device, dtype=p.dtype) if num_classes > 0
            else nn.Identity() for i in range(self.num_branches)])
        self.head.train(self.training)

    def _embed(self, x: Tensor) -> List[Tensor]:
        xs: List[Tensor] = []
        if torch.jit.is_scripting():   # two branches, as timm's (TorchScript has no getattr by name)
            for i, pe in enumerate(self.patch_embed):
                x_ = scale_image(x, self.img_size_scaled[i], self.crop_scale)
                cls_token = self.cls_token_0 if i == 0 else self.cls_token_1
                pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
                xs.append(self.pos_drop(pe.forward_tokens(x_, cls_token, pos_embed)))
            return xs
        for i, pe in enumerate(self.patch_embed):
            x_ = scale_image(x, self.img_size_scaled[i], self.crop_scale)
            tokens = pe.forward_tokens(x_, getattr(self, f"cls_token_{i}"), getattr(self, f"pos_embed_{i}"))
            xs.append(self.pos_drop(tokens))
        return xs

    def forward_features(self, x: Tensor) -> List[Tensor]:
        x = check_images(x, self.in_chans)
        xs = self._embed(x)
        for blk in self.blocks:
            xs = blk(xs)
        return [norm(xs[i]) for i, norm in enumerate(self.norm)]

    def _take_indices(self, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
        """Feature indices (branch-major: branch b's output of block i is b * D + i, D blocks): all
        for None, the last n for an int n, else the given ones (negative counting from the end)."""
        n = self.num_branches * self.num_feature_blocks
        if indices is None:
            return list(range(n))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: take between 1 and {n} features")
            return list(range(n - indices, n))
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= j < n:
                raise ValueError(f"feature index {i!r} is out of range for {n} features "
                                 f"({self.num_branches} branches x {self.num_feature_blocks} blocks)")
            out.append(j)
        return out

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the patch tokens (CLS removed) of each branch at the
        output of each multi-scale block, branch-major (indices 0..D-1 are branch 0's blocks, D..2D-1
        branch 1's); ``norm`` applies the branch's final norm to them; ``output_fmt`` "NCHW" gives
        (B, C, H, W) maps, "NLC" (B, L, C) tokens. Returns (final normed tokens per branch,
        intermediates), or the intermediates alone."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        x = check_images(x, self.in_chans)
        take = self._take_indices(indices)
        D = self.num_feature_blocks
        last_block = max(i % D for i in take)
        blocks = self.blocks[:last_block + 1] if stop_early else self.blocks
        per_branch: List[List[Tensor]] = [[] for _ in range(self.num_branches)]
        xs = self._embed(x)
        for i, blk in enumerate(blocks):
            xs = blk(xs)
            for b in range(self.num_branches):
                if b * D + i in take:
                    per_branch[b].append((self.norm[b](xs[b]) if norm else xs[b])[:, 1:])
        intermediates: List[Tensor] = []
        for pe, feats in zip(self.patch_embed, per_branch):
            if output_fmt == "NCHW":
                gh, gw = pe.grid_size
                feats = [t.reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for t in feats]
            intermediates.extend(feats)
        if intermediates_only:
            return intermediates
        return [n(xs[i]) for i, n in enumerate(self.norm)], intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's: drop the blocks after the last one ``indices`` needs (and optionally the final
        norms and the head); returns the feature indices kept."""
        take = self._take_indices(indices)
        self.blocks = self.blocks[:max(i % self.num_feature_blocks for i in take) + 1]
        if prune_norm:
            self.norm = nn.ModuleList([nn.Identity() for _ in range(self.num_branches)])
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, xs: List[Tensor], pre_logits: bool = False) -> Tensor:
        xs = [x[:, 1:].mean(dim=1) for x in xs] if self.global_pool == "avg" else [x[:, 0] for x in xs]
        xs = [self.head_drop(x) for x in xs]
        if pre_logits or isinstance(self.head[0], nn.Identity):
            return torch.cat([x for x in xs], dim=1)
        return torch.mean(torch.stack([head(xs[i]) for i, head in enumerate(self.head)], dim=0), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
