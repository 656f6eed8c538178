"""Backend ``torch``: the absorbed one-pass math of DESIGN.md in plain PyTorch ops.

This module is also the executable specification of the backend contract (see
``crossvit_kernels.backends``): the Triton, C++ and CUDA kernels compute exactly these functions,
and their tests compare against this file as well as against the float64 textbook oracle.

Cross-attention core. Per batch row b, tokens x_0 = x_cls[b] and x_i = x_tokens[b, i-1] (i = 1..M),
all of width C; H heads; w (B, H, C) is the absorbed, gamma-folded query (w_h = s * gamma * Wk_h^T q_h):

    mean_i, rstd_i = mean and 1/sqrt(var + eps) of x_i (biased variance)      (B, 1+M) float32
    xh_i    = (x_i - mean_i) * rstd_i
    score_hi = w_h . xh_i
    lse_h   = log sum_i exp(score_hi)                                         (B, H)   float32
    a_hi    = exp(score_hi - lse_h)
    z_h     = sum_i a_hi xh_i                                                 (B, H, C) float32

Backward, given dz = dL/dz (B, H, C):

    ds_hi  = a_hi * (dz_h . xh_i - dz_h . z_h)
    dxh_i  = sum_h a_hi dz_h + sum_h ds_hi w_h
    dx_i   = rstd_i * (dxh_i - mean_c(dxh_i) - xh_i * mean_c(dxh_i * xh_i))   (LayerNorm backward)
    dw_h   = sum_i ds_hi xh_i

dx_cls (B, C) comes back in x_cls's dtype, dx_tokens (B, M, C) contiguous in x_tokens's dtype,
dw (B, H, C) in float32. All arithmetic is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def unavailable_reason() -> Optional[str]:
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"unsupported dtype {dtype}"
    return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:  # no patch tokens: nothing to normalise
        empty = x.new_empty(x.shape[:-1])
        return x.clone(), empty, empty.clone()
    var, mean = torch.var_mean(x, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1), mean, rstd


def cross_attention_core_forward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float):
    # Contractions written as matmul over (B, ...) batches rather than einsum: the same products,
    # but einsum's Python parsing and permute/view bookkeeping dominate at CrossViT's sizes.
    acc = _acc(x_cls.dtype)
    w = w.to(acc)
    xh0, mean0, rstd0 = _stats(x_cls.to(acc), eps)                      # (B, C), (B,), (B,)
    xht, meant, rstdt = _stats(x_tokens.to(acc), eps)                    # (B, M, C), (B, M), (B, M)
    s0 = (w @ xh0.unsqueeze(-1)).squeeze(-1)                              # (B, H)
    st = w @ xht.transpose(1, 2)                                          # (B, H, M)
    lse = torch.logsumexp(torch.cat([s0.unsqueeze(-1), st], dim=-1), dim=-1)   # (B, H)
    a0 = torch.exp(s0 - lse)
    at = torch.exp(st - lse.unsqueeze(-1))
    z = torch.baddbmm(a0.unsqueeze(-1) * xh0.unsqueeze(1), at, xht)      # (B, H, C)
    mean = torch.cat([mean0.unsqueeze(1), meant], dim=1)
    rstd = torch.cat([rstd0.unsqueeze(1), rstdt], dim=1)
    return z.contiguous(), lse.contiguous(), mean, rstd


def _layer_norm_backward(dxh: Tensor, xh: Tensor, rstd: Tensor) -> Tensor:
    return rstd.unsqueeze(-1) * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))


def cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz):
    acc = _acc(x_cls.dtype)
    w, z, lse, dz = w.to(acc), z.to(acc), lse.to(acc), dz.to(acc)
    mean, rstd = mean.to(acc), rstd.to(acc)
    xh0 = (x_cls.to(acc) - mean[:, :1]) * rstd[:, :1]
    xht = (x_tokens.to(acc) - mean[:, 1:].unsqueeze(-1)) * rstd[:, 1:].unsqueeze(-1)
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
    dx_cls = _layer_norm_backward(dxh0, xh0, rstd[:, 0])
    dx_tokens = _layer_norm_backward(dxht, xht, rstd[:, 1:])
    dw = torch.baddbmm(ds0.unsqueeze(-1) * xh0.unsqueeze(1), dst, xht)  # (B, H, C)
    return dx_cls.to(x_cls.dtype).contiguous(), dx_tokens.to(x_tokens.dtype).contiguous(), dw.contiguous()


# ----------------------------------------------------------------------------------------------
# Patch embedding: out[b, 0] = cls + pos[0];  out[b, 1 + p] = W . patch(b, p) + bias + pos[1 + p]
# images (B, Cin, H, W); weight (C, Cin, ph, pw); bias (C,) or None; pos_embed (1+P, C);
# cls_token (C,). Patches in row-major order of the (H/ph, W/pw) grid, as conv2d + flatten.
# ----------------------------------------------------------------------------------------------

def _patches(images: Tensor, ph: int, pw: int) -> Tensor:
    B, Cin, H, W = images.shape
    x = images.reshape(B, Cin, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // ph) * (W // pw), Cin * ph * pw)


def patch_embed_forward(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                        cls_token: Tensor) -> Tensor:
    C, Cin, ph, pw = weight.shape
    B = images.shape[0]
    acc = _acc(images.dtype)
    tokens = F.linear(_patches(images, ph, pw).to(acc), weight.reshape(C, -1).to(acc),
                      None if bias is None else bias.to(acc))
    out = torch.empty(B, pos_embed.shape[0], C, device=images.device, dtype=images.dtype)
    out[:, 1:] = tokens + pos_embed[1:].to(acc)
    out[:, 0] = (cls_token.to(acc) + pos_embed[0].to(acc)).to(images.dtype)
    return out


def patch_embed_backward(grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                         needs_images_grad: bool):
    C, Cin, ph, pw = weight.shape
    B, _, H, W = images.shape
    acc = _acc(images.dtype)
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
    return (d_images, d_weight.to(weight.dtype).contiguous(), None if d_bias is None else d_bias.to(weight.dtype),
            d_pos.to(weight.dtype), d_cls.to(weight.dtype))
