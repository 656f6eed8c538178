"""Backend ``torch``: the cores of the absorbed one-pass math in plain PyTorch ops.

This module is also the executable specification of the core contract
(:mod:`crossvit_kernels.backends.base`): the Triton, C++ and CUDA kernels compute exactly these
functions, and their tests compare against this file as well as against the float64 textbook
oracle. The whole op around the core is the inherited absorbed formulation.

Cross-attention core. Per batch row b, tokens x_0 = x_cls[b] and x_i = x_tokens[b, i-1] (i = 1..M),
all of width C; H heads; w (B, H, C) is the absorbed, gamma-folded query (w_h = s * gamma * Wk_h^T q_h):

    mean_i, rstd_i = mean and 1/sqrt(var + eps) of x_i (biased variance)
    xh_i    = (x_i - mean_i) * rstd_i
    score_hi = w_h . xh_i
    lse_h   = log sum_i exp(score_hi)                                         (B, H)
    a_hi    = exp(score_hi - lse_h)
    z_h     = sum_i a_hi xh_i                                                 (B, H, C)

Backward, given dz = dL/dz (B, H, C), the statistics recomputed from the tokens:

    ds_hi  = a_hi * (dz_h . xh_i - dz_h . z_h)
    dxh_i  = sum_h a_hi dz_h + sum_h ds_hi w_h
    dx_i   = rstd_i * (dxh_i - mean_c(dxh_i) - xh_i * mean_c(dxh_i * xh_i))   (LayerNorm backward)
    dw_h   = sum_i ds_hi xh_i

All arithmetic is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .base import ANY_DEVICE, FLOAT_DTYPES, Backend, acc_dtype

Tensor = torch.Tensor


def _stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(xh, rstd) of the rows of x: the normalised rows and 1/std."""
    if x.numel() == 0:  # no patch tokens: nothing to normalise
        return x.clone(), x.new_empty(x.shape[:-1])
    var, mean = torch.var_mean(x, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1), rstd


def _layer_norm_backward(dxh: Tensor, xh: Tensor, rstd: Tensor) -> Tensor:
    return rstd.unsqueeze(-1) * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))


def _patches(images: Tensor, ph: int, pw: int) -> Tensor:
    B, Cin, H, W = images.shape
    x = images.reshape(B, Cin, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // ph) * (W // pw), Cin * ph * pw)


class TorchBackend(Backend):
    name = "torch"
    devices = ANY_DEVICE
    dtypes = {"cross_attention": FLOAT_DTYPES, "patch_embed": FLOAT_DTYPES}

    # Contractions written as matmul over (B, ...) batches rather than einsum: the same products,
    # but einsum's Python parsing and permute/view bookkeeping dominate at CrossViT's sizes.
    def cross_attention_core_forward(self, x_cls, x_tokens, w, eps):
        acc = acc_dtype(x_cls.dtype)
        w = w.to(acc)
        xh0, _ = _stats(x_cls.to(acc), eps)                                   # (B, C)
        xht, _ = _stats(x_tokens.to(acc), eps)                                # (B, M, C)
        s0 = (w @ xh0.unsqueeze(-1)).squeeze(-1)                              # (B, H)
        st = w @ xht.transpose(1, 2)                                          # (B, H, M)
        lse = torch.logsumexp(torch.cat([s0.unsqueeze(-1), st], dim=-1), dim=-1)   # (B, H)
        a0 = torch.exp(s0 - lse)
        at = torch.exp(st - lse.unsqueeze(-1))
        z = torch.baddbmm(a0.unsqueeze(-1) * xh0.unsqueeze(1), at, xht)      # (B, H, C)
        return z, lse

    def cross_attention_core_backward(self, x_cls, x_tokens, w, z, lse, dz, eps):
        acc = acc_dtype(x_cls.dtype)
        w, z, lse, dz = w.to(acc), z.to(acc), lse.to(acc), dz.to(acc)
        xh0, rstd0 = _stats(x_cls.to(acc), eps)
        xht, rstdt = _stats(x_tokens.to(acc), eps)
        xht_t = xht.transpose(1, 2)                                          # (B, C, M)
        a0 = torch.exp((w @ xh0.unsqueeze(-1)).squeeze(-1) - lse)            # (B, H)
        at = torch.exp(w @ xht_t - lse.unsqueeze(-1))                        # (B, H, M)
        dzz = (dz * z).sum(-1)                                               # (B, H)
        ds0 = a0 * ((dz @ xh0.unsqueeze(-1)).squeeze(-1) - dzz)
        if x_tokens.shape[1] == 0:  # the CLS alone: p = 1 whatever the scores, a zero softmax gradient
            ds0 = torch.zeros_like(ds0)
        dst = at * (dz @ xht_t - dzz.unsqueeze(-1))
        dxh0 = (a0.unsqueeze(1) @ dz + ds0.unsqueeze(1) @ w).squeeze(1)      # (B, C)
        dxht = at.transpose(1, 2) @ dz + dst.transpose(1, 2) @ w             # (B, M, C)
        dx_cls = _layer_norm_backward(dxh0, xh0, rstd0)
        dx_tokens = _layer_norm_backward(dxht, xht, rstdt)
        dw = torch.baddbmm(ds0.unsqueeze(-1) * xh0.unsqueeze(1), dst, xht)  # (B, H, C)
        return dx_cls.to(x_cls.dtype), dx_tokens.to(x_tokens.dtype).contiguous(), dw

    # -- patch embedding: out[b, 0] = cls + pos[0];  out[b, 1 + p] = W . patch(b, p) + bias + pos[1 + p]
    # images (B, Cin, H, W); weight (C, Cin, ph, pw); bias (C,) or None; pos_embed (1+P, C);
    # cls_token (C,). Patches in row-major order of the (H/ph, W/pw) grid, as conv2d + flatten.
    def patch_embed_forward(self, images, weight, bias, pos_embed, cls_token):
        C, Cin, ph, pw = weight.shape
        B = images.shape[0]
        acc = acc_dtype(images.dtype)
        tokens = F.linear(_patches(images, ph, pw).to(acc), weight.reshape(C, -1).to(acc),
                          None if bias is None else bias.to(acc))
        out = torch.empty(B, pos_embed.shape[0], C, device=images.device, dtype=images.dtype)
        out[:, 1:] = tokens + pos_embed[1:].to(acc)
        out[:, 0] = (cls_token.to(acc) + pos_embed[0].to(acc)).to(images.dtype)
        return out

    def patch_embed_backward(self, grad_out, images, weight, has_bias, needs_images_grad):
        C, Cin, ph, pw = weight.shape
        B, _, H, W = images.shape
        acc = acc_dtype(images.dtype)
        g = grad_out.to(acc)
        g_tok = g[:, 1:]                                                     # (B, P, C)
        d_pos = g.sum(0)                                                     # (1+P, C)
        d_cls = d_pos[0].clone()
        d_bias = g_tok.sum((0, 1)) if has_bias else None
        patches = _patches(images, ph, pw).to(acc)                           # (B, P, K)
        d_weight = torch.einsum("bpc,bpk->ck", g_tok, patches).reshape(C, Cin, ph, pw)
        d_images = None
        if needs_images_grad:
            d_patches = g_tok @ weight.reshape(C, -1).to(acc)                # (B, P, K)
            d_images = (d_patches.reshape(B, H // ph, W // pw, Cin, ph, pw).permute(0, 3, 1, 4, 2, 5)
                        .reshape(B, Cin, H, W).to(images.dtype))
        return (d_images, d_weight.to(weight.dtype).contiguous(),
                None if d_bias is None else d_bias.to(weight.dtype), d_pos.to(weight.dtype), d_cls.to(weight.dtype))
