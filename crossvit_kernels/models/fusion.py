"""The paper's fusion schemes (Chen, Fan, Panda, ICCV 2021, section 3.3, Figure 3, Table 6).

Notation: two branches i in {0, 1} (0 = small patches, width C0; 1 = large patches, width C1),
j = 1 - i the other branch. x^i = [cls^i; p^i] is branch i's token sequence after its encoders.
f^i = ``projs[i]`` (LayerNorm, GELU, Linear C_i -> C_j) aligns branch i to the other branch's width;
g^i = ``revert_projs[i]`` (LayerNorm, GELU, Linear C_j -> C_i) projects back. Fusion for branch i
happens in width C_j, where the other branch's tokens need no projection (f^j is the identity
there), as in the paper's cross-attention formulation and timm's implementation.

``cross_attention`` (the paper's choice, default; timm's parameter names ``projs``, ``fusion``,
``revert_projs``):
    cls^i <- g^i( CrossAttn_i( f^i(cls^i) ; p^j ) )        p^i unchanged
  where CrossAttn_i is the CrossAttentionBlock over [f^i(cls^i); p^j] with f^i(cls^i) the single
  query and a residual on it. Linear in the number of tokens.

``class_token``:
    cls^i <- g^i( f^i(cls^i) + cls^j )                      p^i unchanged
  Only the CLS tokens meet: the cheapest fusion.

``pairwise``:
    cls^i <- g^i( f^i(cls^i) + cls^j )
    p^i   <- g^i( f^i(p^i) + R_{j->i}(p^j) )
  Patch tokens are fused with the other branch's token at the same spatial position. The grids
  differ (20x20 vs 14x14 at 240 px), so R_{j->i} resamples branch j's patch tokens, laid out as a
  (C_j, H_j, W_j) image, onto branch i's (H_i, W_i) grid by bilinear interpolation
  (``F.interpolate(mode="bilinear", align_corners=False)``: token centres map to token centres).

``all_attention``:
    y   = [ f^0(x^0) ; x^1 ]                     all tokens of both branches in width C1
    o   = Block(y)                                one full transformer layer (self-attention + MLP,
                                                  pre-norm, residuals) over all 2 + P0 + P1 tokens
    x^0 <- g^0(o[:, :1 + P0]);  x^1 <- o[:, 1 + P0:]
  with ``fusion`` a transformer ``Block`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``;
  branch 1's heads and MLP ratio). Quadratic in the total number of tokens: by far the most expensive.

``none``: no fusion; the branches only meet at the head (their logits are averaged).
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import Block, CrossAttentionBlock
from ..ops.fusion import fuse_modules

Tensor = torch.Tensor

FUSIONS = ("cross_attention", "all_attention", "class_token", "pairwise", "none")


def check_fusion(fusion: str) -> str:
    if not isinstance(fusion, str) or fusion.replace("-", "_").lower() not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")
    return fusion.replace("-", "_").lower()


def projection(dim_in: int, dim_out: int, norm_layer, act_layer, dd) -> nn.Sequential:
    """LayerNorm, activation, Linear: timm's ``projs`` / ``revert_projs`` entries."""
    return nn.Sequential(norm_layer(dim_in, **dd), act_layer(), nn.Linear(dim_in, dim_out, **dd))



def resample_tokens(p: Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]) -> Tensor:
    """(B, Hs*Ws, C) patch tokens on src_grid -> (B, Hd*Wd, C) on dst_grid, bilinear."""
    if tuple(src_grid) == tuple(dst_grid):
        return p
    B, _, C = p.shape
    img = p.transpose(1, 2).reshape(B, C, src_grid[0], src_grid[1])
    img = F.interpolate(img, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return img.flatten(2).transpose(1, 2)


class Fusion(nn.Module):
    """The fusion stage of one multi-scale block; see the module docstring for the definitions.

    Holds timm's parameter names for the cross-attention scheme (``projs``, ``fusion``,
    ``revert_projs``) so that timm checkpoints load into ``MultiScaleBlock`` unchanged.
    """

    def _build_fusion(self, fusion, dim, num_heads, grids, fusion_depth, mlp_ratio, qkv_bias, proj_drop, attn_drop,
                      drop_path, act_layer, norm_layer, dd):
        self.kind = check_fusion(fusion)
        self.num_branches = nb = len(dim)
        self.grids = [tuple(g) for g in grids]
        self.fusion_depth = fusion_depth
        if self.kind == "none":
            return
        if nb != 2:
            raise ValueError(f"fusion {self.kind!r} is defined for two branches, got {nb}")
        if self.kind == "all_attention":
            self.projs = nn.ModuleList([projection(dim[0], dim[1], norm_layer, act_layer, dd)])
            self.fusion = Block(dim[1], num_heads[1], mlp_ratio=mlp_ratio[1], qkv_bias=qkv_bias,
                                            proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path,
                                            act_layer=act_layer, norm_layer=norm_layer, **dd)
            self.revert_projs = nn.ModuleList([projection(dim[1], dim[0], norm_layer, act_layer, dd)])
            return
        self.projs = nn.ModuleList([projection(dim[d], dim[(d + 1) % nb], norm_layer, act_layer, dd)
                                    for d in range(nb)])
        if self.kind == "cross_attention":
            fusion_modules = []
            for d in range(nb):
                d_ = (d + 1) % nb
                blocks = [CrossAttentionBlock(dim[d_], num_heads[d_], mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias,
                                              proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path,
                                              norm_layer=norm_layer, **dd)
                          for _ in range(max(1, fusion_depth))]
                # timm: a single block when the fusion depth is 0 (every published model), else a
                # Sequential of `fusion_depth` blocks (kept for checkpoint compatibility).
                fusion_modules.append(blocks[0] if fusion_depth == 0 else nn.Sequential(*blocks))
            self.fusion = nn.ModuleList(fusion_modules)
        self.revert_projs = nn.ModuleList([projection(dim[(d + 1) % nb], dim[d], norm_layer, act_layer, dd)
                                           for d in range(nb)])

    def forward_fusion(self, xs: List[Tensor]) -> List[Tensor]:
        """Fuse the branches' token sequences ``xs`` (each (B, 1 + N_i, C_i)); returns new ones
        (``xs`` is never written to)."""
        if self.kind == "none":
            return list(xs)
        if self.kind == "cross_attention":
            return fuse_cross_attention(self.projs, self.fusion, self.revert_projs, xs)
        if self.kind == "all_attention":
            n0 = xs[0].shape[1]
            y = torch.cat([self.projs[0](xs[0]), xs[1]], dim=1)
            o = self.fusion(y)
            return [self.revert_projs[0](o[:, :n0]), o[:, n0:]]
        nb = self.num_branches
        cls = [x[:, 0] for x in xs]
        outs = []
        for i in range(nb):
            j = (i + 1) % nb
            new_cls = self.revert_projs[i](self.projs[i](cls[i]) + cls[j])
            if self.kind == "pairwise":
                patches = self.projs[i](xs[i][:, 1:]) + resample_tokens(xs[j][:, 1:], self.grids[j], self.grids[i])
                patches = self.revert_projs[i](patches)
            else:
                patches = xs[i][:, 1:]
            outs.append(torch.cat([new_cls.unsqueeze(1), patches], dim=1))
        return outs


# ---------------------------------------------------------------------------------------------
# The cross-attention fusion on the fused single-query op
# ---------------------------------------------------------------------------------------------

def cross_attend(blocks: nn.Module, q: Tensor, tokens: Tensor) -> Tensor:
    """The fusion module of one branch on the projected CLS ``q`` (B, 1, C) and the other branch's
    patch tokens ``tokens`` (B, M, C, a strided view, never copied); returns the new (B, 1, C) CLS.

    ``blocks`` is one cross-attention block called as ``blocks(q, tokens)`` (such as
    :class:`crossvit_kernels.modules.CrossAttentionBlock`, or a patched timm block: called as a
    module, so its hooks fire, with the output timm's block gives) or timm's Sequential of them
    (fusion depth > 0): the first block maps [q; tokens] to the new query alone, so each later
    block attends only to the query itself (zero patch tokens).
    """
    if not isinstance(blocks, nn.Sequential):
        return blocks(q, tokens)
    for k, blk in enumerate(blocks):
        q = blk(q, tokens if k == 0 else tokens[:, :0])
    return q


def fuse_cross_attention(projs: Sequence[nn.Module], fusion: Sequence[nn.Module], revert_projs: Sequence[nn.Module],
                         xs: List[Tensor]) -> List[Tensor]:
    """The paper's cross-attention fusion of two or more branches (timm's ``MultiScaleBlock``
    fusion, same parameters, same module calls and shapes) on the fused single-query op:

        cls_i  = xs[i][:, 0:1]                                (B, 1, C_i)   a view
        q_i    = projs[i](cls_i)                              (B, 1, C_j)   LN, GELU, Linear on B rows
        c_i    = fusion[i](q_i, xs[j][:, 1:])                 (B, 1, C_j)   tokens read in place
        out_i  = [revert_projs[i](c_i) ; xs[i][:, 1:]]        (B, 1 + N_i, C_i)

    with j = (i + 1) mod (number of branches). The patch tokens of the output are those of the
    input, copied into a new tensor: ``xs`` (the encoders' outputs, which hooks and feature
    extractors may hold) is never written to. With two branches and a backend that declares the
    whole stage (``crossvit_kernels.ops.fusion``), both directions run as that one op.
    """
    fused = fuse_modules(projs, fusion, revert_projs, xs)     # both directions in one op, when a backend has it
    if fused is not None:
        return fused
    nb = len(xs)
    qs = [projs[i](xs[i][:, 0:1]) for i in range(nb)]    # timm's order of module calls (hooks see it)
    outs = []
    for i in range(nb):
        c = revert_projs[i](cross_attend(fusion[i], qs[i], xs[(i + 1) % nb][:, 1:]))
        outs.append(torch.cat([c, xs[i][:, 1:]], dim=1))
    return outs
