"""Inputs of the pytest-benchmark suites: small CrossViT shapes on the best device here."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

import _common as bc

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = 64 if DEVICE.type == "cuda" else 8


def backends(op: str):
    return ["reference"] + [b for b, why in bc.fused_backends(op, DEVICE, DTYPE).items() if why is None]


def synced(fn):
    """pytest-benchmark reads a wall clock: wait for the GPU inside the timed call."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def fwd_bwd(fn, grads, leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, grads)
    return run


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def cross_attention_case(N: int = 197, C: int = 384, H: int = 6, B: int = BATCH):
    """timm's block and the op's arguments with the same weights; tokens a strided view."""
    from timm.models.crossvit import CrossAttentionBlock
    torch.manual_seed(0)
    blk = CrossAttentionBlock(C, H, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).to(DEVICE, DTYPE)
    branch = torch.randn(B, N, C, device=DEVICE).to(DTYPE).requires_grad_()
    q = torch.randn(B, C, device=DEVICE).to(DTYPE).requires_grad_()
    a, n = blk.attn, blk.norm1
    weights = (n.weight, n.bias, a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias, a.wv.weight, a.wv.bias,
               a.proj.weight, a.proj.bias)
    g = torch.randn(B, C, device=DEVICE).to(DTYPE)
    return blk, q, branch, weights, H, g
