"""Triton kernels of the cross-attention op's O(C^2) projections: the triton backend's forward.

The fused op (docs/design.md, section 2) is the one-pass core (``cross_attention.py``) between small
projections that have B rows each: before it the absorbed query w = scale * gamma * (Wk_h^T q_h)
with q = Wq LN(x_cls) + bq; after it the value and output projections and the residual. Written
as PyTorch ops those are about twenty kernels (a cast per parameter for half inputs, LayerNorm,
linear, bmm, scalings, baddbmm, linear, cast, add): at CrossViT's sizes each is a few
microseconds of launch and latency, together several times the core's own time (H100 profile
in benchmarks/results). Here they are three kernels, so a forward is four or five:

    _xattn_query_kernel   LN(x_cls) -> q_h -> w_h = (q_h Wk_h) * scale * gamma   grid (B tiles, H)
    core forward          (+ its split combine)                                  cross_attention.py
    _xattn_value_kernel   o_h = Wv_h (gamma * z_h + beta) + bv_h                 grid (B tiles, H)
    _xattn_output_kernel  out = x_cls + Wo o + bo, in x_cls's dtype             grid (B tiles, C tiles)

Parameters are read in their own dtype and every product and sum runs in float32 with IEEE
products, as the PyTorch form computes them after its casts; the residual is added in float32
and rounded once. The kernels also write what the backward needs (q, w, z, lse, o: the whole-op
contract of crossvit_kernels.backends.base), so training and inference run the same forward.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import cross_attention as _core

Tensor = torch.Tensor

__all__ = ["cross_attention_forward_fused", "fused_projections_enabled", "FUSED_ENV"]

#: Environment knob: "0" turns the fused projections off (the op then runs its PyTorch
#: projections around the core), for A/B measurements.
FUSED_ENV = "CROSSVIT_KERNELS_TRITON_FUSED_PROJECTIONS"

BLOCK_B = 16      # rows per program (tl.dot needs >= 16)
BLOCK_K = 64      # columns of C per step


def fused_projections_enabled() -> bool:
    return os.environ.get(FUSED_ENV, "1").strip() != "0"


@triton.jit
def _ln_stats(x_cls_ptr, rows, rmask, C, eps, stride_b, stride_c, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std of BLOCK_B rows of x_cls (biased variance, two passes as torch's layer_norm)."""
    total = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_cls_ptr + rows[:, None] * stride_b + offs_k[None, :] * stride_c,
                    mask=rmask[:, None] & (offs_k < C)[None, :], other=0.0).to(tl.float32)
        total += tl.sum(x, 1)
    mean = total / C
    sq = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = rmask[:, None] & (offs_k < C)[None, :]
        x = tl.load(x_cls_ptr + rows[:, None] * stride_b + offs_k[None, :] * stride_c,
                    mask=kmask, other=0.0).to(tl.float32)
        xc = tl.where(kmask, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, 1)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    return mean, rstd


@triton.jit
def _affine_times_head_rows(t, tmask, offs_k, kmask, gamma_ptr, beta_ptr, w_ptr, h, D, offs_d, dmask, C,
                            HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """(gamma * t + beta) [BLOCK_B, BLOCK_K] times rows h*D .. h*D+D of a (C, C) weight, transposed
    ([BLOCK_K, D_PAD]): one K-step of a head's projection, zero outside tmask."""
    if HAS_GAMMA:
        t = t * tl.load(gamma_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        t = t + tl.load(beta_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)[None, :]
    t = tl.where(tmask, t, 0.0)
    w_t = tl.load(w_ptr + (h * D + offs_d)[None, :] * C + offs_k[:, None],
                  mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return tl.dot(t, w_t, input_precision="ieee")


@triton.jit
def _xattn_query_kernel(
    x_cls_ptr,            # (B, C), any strides
    gamma_ptr,            # (C,) LayerNorm weight (x_cls when HAS_GAMMA is false: never read)
    beta_ptr,             # (C,) LayerNorm bias (likewise)
    wq_ptr,               # (C, C) contiguous
    bq_ptr,               # (C,) (likewise when HAS_BQ is false)
    wk_ptr,               # (C, C) contiguous
    q_ptr,                # (B, C) contiguous float32: the query
    w_ptr,                # (B, H, C) contiguous float32: the absorbed query
    B, C, D, H, eps, scale,
    stride_cls_b, stride_cls_c,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BQ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = tl.program_id(1).to(tl.int64)
    rmask = rows < B
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    mean, rstd = _ln_stats(x_cls_ptr, rows, rmask, C, eps, stride_cls_b, stride_cls_c, BLOCK_B, BLOCK_K)

    # q_h = LN(x_cls) Wq_h^T + bq_h: a [BLOCK_B, C] x [C, D] product over C in steps of BLOCK_K
    q = tl.zeros([BLOCK_B, D_PAD], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < C
        xmask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_cls_ptr + rows[:, None] * stride_cls_b + offs_k[None, :] * stride_cls_c,
                    mask=xmask, other=0.0).to(tl.float32)
        q += _affine_times_head_rows((x - mean[:, None]) * rstd[:, None], xmask, offs_k, kmask, gamma_ptr,
                                     beta_ptr, wq_ptr, h, D, offs_d, dmask, C, HAS_GAMMA, HAS_BETA)
    if HAS_BQ:
        q += tl.load(bq_ptr + h * D + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(q_ptr + rows[:, None] * C + (h * D + offs_d)[None, :], q, mask=rmask[:, None] & dmask[None, :])

    # w_h = (q_h Wk_h) * scale * gamma: a [BLOCK_B, D] x [D, C] product, C in steps of BLOCK_K
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        cmask = offs_c < C
        wk = tl.load(wk_ptr + (h * D + offs_d)[:, None] * C + offs_c[None, :],
                     mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)        # [D_PAD, BLOCK_K]
        u = tl.dot(q, wk, input_precision="ieee")
        if HAS_GAMMA:
            u = u * (tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32) * scale)[None, :]
        else:
            u = u * scale
        tl.store(w_ptr + (rows[:, None] * H + h) * C + offs_c[None, :], u, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _xattn_value_kernel(
    z_ptr,                # (B, H, C) contiguous float32: the core's weighted sums of the normalised tokens
    gamma_ptr, beta_ptr,  # (C,) LayerNorm affine (z_ptr when absent: never read)
    wv_ptr,               # (C, C) contiguous
    bv_ptr,               # (C,) (likewise when HAS_BV is false)
    o_ptr,                # (B, C) contiguous float32: the attention output before Wo
    B, C, D, H,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BV: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = tl.program_id(1).to(tl.int64)
    rmask = rows < B
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    # the probabilities sum to 1, so the LayerNorm affine applies to z as to each token
    o = tl.zeros([BLOCK_B, D_PAD], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < C
        zmask = rmask[:, None] & kmask[None, :]
        z = tl.load(z_ptr + (rows[:, None] * H + h) * C + offs_k[None, :], mask=zmask, other=0.0)
        o += _affine_times_head_rows(z, zmask, offs_k, kmask, gamma_ptr, beta_ptr, wv_ptr, h, D, offs_d, dmask, C,
                                     HAS_GAMMA, HAS_BETA)
    if HAS_BV:
        o += tl.load(bv_ptr + h * D + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rows[:, None] * C + (h * D + offs_d)[None, :], o, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _xattn_output_kernel(
    o_ptr,                # (B, C) contiguous float32
    wo_ptr,               # (C, C) contiguous
    bo_ptr,               # (C,) (o_ptr when HAS_BO is false: never read)
    x_cls_ptr,            # (B, C), any strides: the residual (never read when RESIDUAL is false)
    out_ptr,              # (B, C) contiguous, x_cls's dtype
    B, C,
    stride_cls_b, stride_cls_c,
    HAS_BO: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < C
        o = tl.load(o_ptr + rows[:, None] * C + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wo_t = tl.load(wo_ptr + offs_c[None, :] * C + offs_k[:, None],
                       mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)      # [BLOCK_K, BLOCK_C]
        acc += tl.dot(o, wo_t, input_precision="ieee")
    if HAS_BO:
        acc += tl.load(bo_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if RESIDUAL:
        acc += tl.load(x_cls_ptr + rows[:, None] * stride_cls_b + offs_c[None, :] * stride_cls_c,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def projection_shared_bytes(C: int, H: int) -> int:
    """An upper bound of the shared memory, in bytes, of the three kernels (the largest) at the
    launcher's block sizes for H heads of width C. The query and value kernels' float32 tensor-core
    operands grow with the head width: the weight tiles [BLOCK_K, D_PAD] and [D_PAD, BLOCK_K] and
    the query [BLOCK_B, D_PAD], plus 12 KiB for the [BLOCK_B, BLOCK_K] tiles and the compiler's
    staging. The output kernel's do not: two pipeline stages of its float32 [BLOCK_B, BLOCK_K] and
    [BLOCK_K, 64] tiles. The compiler's figures for sm_90 stay within it
    (tests/test_triton_limits.py compares them)."""
    d_pad = max(16, triton.next_power_of_2(C // H))
    return max(4 * (2 * BLOCK_K + BLOCK_B) * d_pad + 12 * 1024, 2 * 4 * (BLOCK_B + 64) * BLOCK_K)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def cross_attention_forward_fused(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                                  norm_bias: Optional[Tensor], wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                                  wv: Tensor, bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
                                  num_heads: int, eps: float, residual: bool):
    """The cross-attention op's forward on the triton backend in four or five kernels, for
    float16, bfloat16 and float32 inputs: (out, q, w, z, lse, o) as the whole-op contract of
    crossvit_kernels.backends.base states them. ``out`` is ``x_cls + block(x_cls, x_tokens)``
    with ``residual``, else the block's delta, in x_cls's dtype.

    Inputs as :func:`crossvit_kernels.ops.cross_attention` (validated there, all of one dtype and
    device; the key bias is not an input: softmax ignores it).
    """
    B, C = x_cls.shape
    H = num_heads
    D = C // H
    device = x_cls.device
    d_pad = max(16, triton.next_power_of_2(D))
    wq, wk, wv, wo = wq.contiguous(), wk.contiguous(), wv.contiguous(), wo.contiguous()
    gamma, beta, bq, bv, bo = (_contig(t) for t in (norm_weight, norm_bias, bq, bv, bo))
    dummy = x_cls                                                   # stands in for absent vectors
    row_tiles = triton.cdiv(B, BLOCK_B)
    with _core._device_guard(x_cls):
        q = _core._empty((B, C), torch.float32, device)
        w = _core._empty((B, H, C), torch.float32, device)
        _xattn_query_kernel[(row_tiles, H)](
            x_cls, gamma if gamma is not None else dummy, beta if beta is not None else dummy,
            wq, bq if bq is not None else dummy, wk, q, w,
            B, C, D, H, float(eps), float(D ** -0.5), x_cls.stride(0), x_cls.stride(1),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, HAS_BQ=bq is not None,
            BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, D_PAD=d_pad)
        z, lse = _core.cross_attention_core_forward(x_cls, x_tokens, w, eps)
        o = _core._empty((B, C), torch.float32, device)
        _xattn_value_kernel[(row_tiles, H)](
            z, gamma if gamma is not None else z, beta if beta is not None else z,
            wv, bv if bv is not None else z, o, B, C, D, H,
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, HAS_BV=bv is not None,
            BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, D_PAD=d_pad)
        out = _core._empty((B, C), x_cls.dtype, device)
        block_c = 64
        _xattn_output_kernel[(row_tiles, triton.cdiv(C, block_c))](
            o, wo, bo if bo is not None else o, x_cls, out, B, C, x_cls.stride(0), x_cls.stride(1),
            HAS_BO=bo is not None, RESIDUAL=bool(residual),
            BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_C=block_c)
    return out, q, w, z, lse, o
