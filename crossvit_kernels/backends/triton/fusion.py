"""Triton kernels of the whole cross-attention fusion stage of a multi-scale block (both directions).

Direction d (i = d the query branch, j = 1 - d the token branch; docs/design.md, sections 1-2):

    a    = LN_f(x_i[:, 0]),   qx = W_f GELU(a) + b_f                      (B, C_j)   projection f
    y0   = LN_1(qx),          q  = W_q y0 + b_q,   w_h = s gamma_1 W_k,h^T q_h        absorbed query
    z, lse = the token pass over [qx; x_j[:, 1:]] (cross_attention.py)                 core
    o_h  = W_v,h (gamma_1 z_h + beta_1) + b_v,h,   c = qx + W_o o + b_o                 value, output, residual
    out_i[:, 0] = W_g GELU(LN_g(c)) + b_g,         out_i[:, 1:] = x_i[:, 1:]            projection g

Forward, three launches, each carrying both directions (a problem table: programs [0, G0) do
direction 0, the rest direction 1):

    1. prologue   one program per 16 rows: LN_f, GELU, W_f, LN_1, W_q, W_k -> qx, q, w
    2. stream     the token pass of cross_attention.py, COPY: every token tile it reads is also
                  written into the other branch's output (out_j[:, 1:] = x_j[:, 1:]: no cat)
    3. epilogue   one program per 16 rows: the split combine (fixed order), W_v, W_o, residual,
                  LN_g, GELU, W_g -> out_i[:, 0]

Backward, three launches, parameter-gradient reductions included:

    A. rows       W_g, GELU and LN_g backward, the residual, W_o, W_v backward -> dc, do, dz, ...
    B. stream     the token pass backward (ADD_DOUT: dx_j[:, 1:] = its gradient + dout_j[:, 1:],
                  written once, no full-branch copy), and in the same launch the tile programs of
                  dW_g, db_g, dW_o, db_o, dW_v, db_v and the LayerNorm parameters' first terms:
                  each reduces over the batch in a fixed order (no atomics)
    C. rows, then tiles: the split combine of dw, W_k, W_q, LN_1, W_f, GELU and LN_f backward ->
                  dx_i[:, 0]; then dW_k, dW_q, db_q, dW_f, db_f and the LayerNorm parameters. The tile
                  programs reduce what the row programs of the same launch wrote: every program
                  takes a ticket from an integer counter when it starts (row jobs first), a tile
                  program waits until every row program has finished (integer counters only;
                  the waited-on programs started before it, so they are resident), and the last
                  program to finish resets the counters. The reductions themselves run in a fixed
                  order: the same inputs give the same bits.

The B-row products (the "tiny CLS-side GEMMs", B x C x C) run on the tensor cores in the weights'
dtype: float32 activations enter as (hi, lo) pairs of that dtype, the weights as they are (exact),
float32 accumulation; float32 models take IEEE products. Parameter gradients reduce over the batch
with both operands as (hi, lo) pairs. Every intermediate kept between the launches is O(B * C) or
O(B * H * C) in float32; nothing of size O(B * N) is stored besides the outputs.
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..base import FUSION_OPTIONAL, FUSION_PARAMS, FUSION_SAVED
from . import cross_attention as K
from .cross_attention import _stream_bwd_body

Tensor = torch.Tensor

__all__ = ["fusion_stage_forward", "fusion_stage_backward", "PARAMS_PER_DIRECTION", "OPTIONAL_PARAMS"]

#: the parameters of one direction, in the op's order; the ones that may be absent; the tensors
#: saved for the backward, per direction (all O(B * C) or O(B * H * C), float32)
PARAMS_PER_DIRECTION, OPTIONAL_PARAMS, SAVED_PER_DIRECTION = FUSION_PARAMS, FUSION_OPTIONAL, FUSION_SAVED

ROWS = 16             # rows per row program (the tensor cores' smallest M)
#: warps of the row kernels, by kernel: ptxas (sm_90, Triton 3.6 and 3.8) keeps the epilogue at 72-80
#: registers and spills at four warps, and the prologue at 64 and spills at eight; these spill nothing
ROW_WARPS = dict(prologue=4, epilogue=8, rows_a=8, rows_c=8)
TILE_SIZE = 64        # parameter-gradient tiles (TILE x TILE outputs per tile program)
# the same as the kernels' (global) constants
BLOCK_B = tl.constexpr(ROWS)
BLOCK_K = tl.constexpr(64)          # K step of the row products
BLOCK_C = tl.constexpr(64)          # output columns per step of the row products
TILE = tl.constexpr(TILE_SIZE)

# transforms applied to a row product's A operand as it is loaded
PLAIN, LN, LN_GELU, SCALE, AFFINE = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _mm(a, b, acc, MMA: tl.constexpr, HALF: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr):
    """acc + a @ b. With HALF on the tensor cores in MMA (bfloat16 or float16): a float32 operand
    enters as a (hi, lo) pair when split (A_SPLIT / B_SPLIT; an operand already in MMA is exact),
    float32 accumulation. Without HALF, IEEE float32 products."""
    if HALF:
        a_hi = a.to(MMA)
        b_hi = b.to(MMA)
        acc = tl.dot(a_hi, b_hi, acc=acc, out_dtype=tl.float32)
        if A_SPLIT:
            acc = tl.dot((a.to(tl.float32) - a_hi.to(tl.float32)).to(MMA), b_hi, acc=acc, out_dtype=tl.float32)
        if B_SPLIT:
            acc = tl.dot(a_hi, (b.to(tl.float32) - b_hi.to(tl.float32)).to(MMA), acc=acc, out_dtype=tl.float32)
        return acc
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _rows_stats(ptr, s_b, s_k, rows, rmask, K, eps, BB: tl.constexpr, BK: tl.constexpr):
    """(mean, rstd) of rows of a (B, K) matrix (any strides, any float dtype), in float32 (two
    passes, biased variance): LayerNorm's statistics."""
    total = tl.zeros([BB], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (offs_k < K)[None, :]
        total += tl.sum(tl.load(ptr + rows[:, None] * s_b + offs_k[None, :] * s_k, mask=m, other=0.0).to(tl.float32), 1)
    mean = total / K
    sq = tl.zeros([BB], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (offs_k < K)[None, :]
        x = tl.load(ptr + rows[:, None] * s_b + offs_k[None, :] * s_k, mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, 1)
    return mean, 1.0 / tl.sqrt(sq / K + eps)


@triton.jit
def _a_chunk(ptr, s_b, s_k, rows, rmask, offs_k, kmask, MODE: tl.constexpr, mean, rstd, g_ptr, b_ptr, scale):
    """Columns offs_k of rows of a (B, K) matrix in float32, transformed: PLAIN; LN (LayerNorm
    with the rows' mean / rstd and affine g, b); LN_GELU (then exact GELU); SCALE (x * g * scale);
    AFFINE (x * g + b). Zero outside the mask."""
    m = rmask[:, None] & kmask[None, :]
    a = tl.load(ptr + rows[:, None] * s_b + offs_k[None, :] * s_k, mask=m, other=0.0).to(tl.float32)
    if MODE == 1 or MODE == 2:
        g = tl.load(g_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        a = (a - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :]
        if MODE == 2:
            a = _gelu(a)
    if MODE == 3:
        a = a * (tl.load(g_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32) * scale)[None, :]
    if MODE == 4:
        g = tl.load(g_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        a = a * g[None, :] + bb[None, :]
    return tl.where(m, a, 0.0)


@triton.jit
def _row_mm(a_ptr, s_ab, s_ak, rows, rmask, K, MODE: tl.constexpr, mean, rstd, g_ptr, b_ptr, scale,
            w_ptr, s_wn, s_wk, offs_n, nmask, BB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
            MMA: tl.constexpr, HALF: tl.constexpr):
    """[BB, BN] = transform(A)[rows, :K] @ W^T[:K, offs_n], W's element (n, k) at
    w_ptr + n * s_wn + k * s_wk (any layout: W, W^T, a head's rows); float32 accumulation."""
    acc = tl.zeros([BB, BN], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        a = _a_chunk(a_ptr, s_ab, s_ak, rows, rmask, offs_k, kmask, MODE, mean, rstd, g_ptr, b_ptr, scale)
        wt = tl.load(w_ptr + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk, mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        acc = _mm(a, wt, acc, MMA, HALF, True, False)
    return acc


@triton.jit
def _vec(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# forward: prologue and epilogue row programs
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prologue_body(pid, B, Ci, Cj, H, D, scale, eps_f, eps_n,
                   x_ptr, s_xb, s_xc,                      # the query branch's CLS rows x_i[:, 0]
                   fg_ptr, fb_ptr, fw_ptr, fbias_ptr,      # LN_f (Ci), W_f (Cj, Ci), b_f (Cj)
                   ng_ptr, nb_ptr, wq_ptr, bq_ptr, wk_ptr,  # LN_1 (Cj), W_q, b_q, W_k (Cj, Cj)
                   qx_ptr, q_ptr, w_ptr,                   # out (float32): qx, q (B, Cj), w (B, H, Cj)
                   HAS_BQ: tl.constexpr, D_PAD: tl.constexpr, MMA: tl.constexpr, HALF: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = rows.to(tl.int64)
    mean_a, rstd_a = _rows_stats(x_ptr, s_xb, s_xc, rows, rmask, Ci, eps_f, BLOCK_B, BLOCK_K)
    for n0 in range(0, Cj, BLOCK_C):                                       # qx = W_f GELU(LN_f(x)) + b_f
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        acc = _row_mm(x_ptr, s_xb, s_xc, rows, rmask, Ci, 2, mean_a, rstd_a, fg_ptr, fb_ptr, 1.0,
                      fw_ptr, Ci, 1, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        acc += _vec(fbias_ptr, offs_n, nmask)[None, :]
        tl.store(qx_ptr + rows[:, None] * Cj + offs_n[None, :], acc, mask=rmask[:, None] & nmask[None, :])
    tl.debug_barrier()
    mean_q, rstd_q = _rows_stats(qx_ptr, Cj, 1, rows, rmask, Cj, eps_n, BLOCK_B, BLOCK_K)
    for n0 in range(0, Cj, BLOCK_C):                                       # q = W_q LN_1(qx) + b_q
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        acc = _row_mm(qx_ptr, Cj, 1, rows, rmask, Cj, 1, mean_q, rstd_q, ng_ptr, nb_ptr, 1.0,
                      wq_ptr, Cj, 1, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        if HAS_BQ:
            acc += _vec(bq_ptr, offs_n, nmask)[None, :]
        tl.store(q_ptr + rows[:, None] * Cj + offs_n[None, :], acc, mask=rmask[:, None] & nmask[None, :])
    tl.debug_barrier()
    for h in range(0, H):                                                  # w_h = s gamma_1 W_k,h^T q_h
        for c0 in range(0, Cj, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < Cj
            acc = _row_mm(q_ptr + h * D, Cj, 1, rows, rmask, D, 0, mean_q, rstd_q, ng_ptr, nb_ptr, 1.0,
                          wk_ptr + h * D * Cj, 1, Cj, offs_c, cmask, BLOCK_B, D_PAD, BLOCK_C, MMA, HALF)
            acc *= (_vec(ng_ptr, offs_c, cmask) * scale)[None, :]
            tl.store(w_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _fs_prologue_kernel(
    G0, B,
    Ci0, Cj0, H0, D0, scale0, epsf0, epsn0, x0, s_xb0, s_xc0, fg0, fb0, fw0, fbias0, ng0, nb0, wq0, bq0, wk0,
    qx0, q0, w0,
    Ci1, Cj1, H1, D1, scale1, epsf1, epsn1, x1, s_xb1, s_xc1, fg1, fb1, fw1, fbias1, ng1, nb1, wq1, bq1, wk1,
    qx1, q1, w1,
    HAS_BQ0: tl.constexpr, D_PAD0: tl.constexpr, HAS_BQ1: tl.constexpr, D_PAD1: tl.constexpr,
    MMA: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _prologue_body(pid, B, Ci0, Cj0, H0, D0, scale0, epsf0, epsn0, x0, s_xb0, s_xc0, fg0, fb0, fw0, fbias0,
                       ng0, nb0, wq0, bq0, wk0, qx0, q0, w0, HAS_BQ0, D_PAD0, MMA, HALF)
    else:
        _prologue_body(pid - G0, B, Ci1, Cj1, H1, D1, scale1, epsf1, epsn1, x1, s_xb1, s_xc1, fg1, fb1, fw1,
                       fbias1, ng1, nb1, wq1, bq1, wk1, qx1, q1, w1, HAS_BQ1, D_PAD1, MMA, HALF)


@triton.jit
def _epilogue_body(pid, B, Ci, Cj, H, D, S, eps_g,
                   pz_ptr, pm_ptr, pl_ptr,                 # S > 1: the stream's partials (B, S, H, Cj), (B, S, H) x 2
                   z_ptr, lse_ptr,                         # z (B, H, Cj), lse (B, H): read (S == 1) or written
                   ng_ptr, nb_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr, qx_ptr,
                   gg_ptr, gb_ptr, gw_ptr, gbias_ptr,      # LN_g (Cj), W_g (Ci, Cj), b_g (Ci)
                   o_ptr, c_ptr,                           # out (float32): o, c (B, Cj)
                   out_ptr, s_ob, s_oc,                    # the query branch's output CLS rows out_i[:, 0]
                   HAS_BV: tl.constexpr, SPLIT: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr,
                   MMA: tl.constexpr, HALF: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = rows.to(tl.int64)
    if SPLIT:
        # merge the token splits in a fixed order: z = sum_s exp(m_s - m) z_s / sum_s exp(m_s - m) l_s
        offs_s = tl.arange(0, S_PAD)
        smask = rmask[:, None] & (offs_s < S)[None, :]
        for h in range(0, H):
            m = tl.load(pm_ptr + (rows[:, None] * S + offs_s[None, :]) * H + h, mask=smask, other=float("-inf"))
            den = tl.load(pl_ptr + (rows[:, None] * S + offs_s[None, :]) * H + h, mask=smask, other=0.0)
            m_max = tl.max(m, 1)
            m_max = tl.where(rmask, m_max, 0.0)
            wgt = tl.where(smask, tl.exp(m - m_max[:, None]), 0.0)
            denom = tl.sum(den * wgt, 1)
            denom = tl.where(rmask, denom, 1.0)
            tl.store(lse_ptr + rows * H + h, m_max + tl.log(denom), mask=rmask)
            coef = wgt / denom[:, None]
            for c0 in range(0, Cj, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cm = rmask[:, None] & (offs_c < Cj)[None, :]
                acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
                for s in range(0, S):
                    c_s = tl.sum(tl.where(offs_s[None, :] == s, coef, 0.0), 1)
                    acc += c_s[:, None] * tl.load(pz_ptr + ((rows[:, None] * S + s) * H + h) * Cj + offs_c[None, :],
                                                  mask=cm, other=0.0)
                tl.store(z_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], acc, mask=cm)
        tl.debug_barrier()
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    for h in range(0, H):                                                  # o_h = W_v,h (g z_h + b) + b_v,h
        acc = _row_mm(z_ptr + h * Cj, H * Cj, 1, rows, rmask, Cj, 4, rows, rows, ng_ptr, nb_ptr, 1.0,
                      wv_ptr + h * D * Cj, Cj, 1, offs_d, dmask, BLOCK_B, BLOCK_K, D_PAD, MMA, HALF)
        if HAS_BV:
            acc += _vec(bv_ptr + h * D, offs_d, dmask)[None, :]
        tl.store(o_ptr + rows[:, None] * Cj + h * D + offs_d[None, :], acc, mask=rmask[:, None] & dmask[None, :])
    tl.debug_barrier()
    for n0 in range(0, Cj, BLOCK_C):                                       # c = qx + W_o o + b_o
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        m2 = rmask[:, None] & nmask[None, :]
        acc = _row_mm(o_ptr, Cj, 1, rows, rmask, Cj, 0, rows, rows, ng_ptr, nb_ptr, 1.0,
                      wo_ptr, Cj, 1, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        acc += _vec(bo_ptr, offs_n, nmask)[None, :]
        acc += tl.load(qx_ptr + rows[:, None] * Cj + offs_n[None, :], mask=m2, other=0.0)
        tl.store(c_ptr + rows[:, None] * Cj + offs_n[None, :], acc, mask=m2)
    tl.debug_barrier()
    mean_c, rstd_c = _rows_stats(c_ptr, Cj, 1, rows, rmask, Cj, eps_g, BLOCK_B, BLOCK_K)
    for n0 in range(0, Ci, BLOCK_C):                                       # out_i[:, 0] = W_g GELU(LN_g(c)) + b_g
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Ci
        acc = _row_mm(c_ptr, Cj, 1, rows, rmask, Cj, 2, mean_c, rstd_c, gg_ptr, gb_ptr, 1.0,
                      gw_ptr, Cj, 1, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        acc += _vec(gbias_ptr, offs_n, nmask)[None, :]
        tl.store(out_ptr + rows[:, None] * s_ob + offs_n[None, :] * s_oc, acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _fs_epilogue_kernel(
    G0, B,
    Ci0, Cj0, H0, D0, S0, epsg0, pz0, pm0, pl0, z0, lse0, ng0, nb0, wv0, bv0, wo0, bo0, qx0, gg0, gb0, gw0, gbias0,
    o0, c0, out0, s_ob0, s_oc0,
    Ci1, Cj1, H1, D1, S1, epsg1, pz1, pm1, pl1, z1, lse1, ng1, nb1, wv1, bv1, wo1, bo1, qx1, gg1, gb1, gw1, gbias1,
    o1, c1, out1, s_ob1, s_oc1,
    HAS_BV0: tl.constexpr, SPLIT0: tl.constexpr, S_PAD0: tl.constexpr, D_PAD0: tl.constexpr,
    HAS_BV1: tl.constexpr, SPLIT1: tl.constexpr, S_PAD1: tl.constexpr, D_PAD1: tl.constexpr,
    MMA: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _epilogue_body(pid, B, Ci0, Cj0, H0, D0, S0, epsg0, pz0, pm0, pl0, z0, lse0, ng0, nb0, wv0, bv0, wo0, bo0,
                       qx0, gg0, gb0, gw0, gbias0, o0, c0, out0, s_ob0, s_oc0,
                       HAS_BV0, SPLIT0, S_PAD0, D_PAD0, MMA, HALF)
    else:
        _epilogue_body(pid - G0, B, Ci1, Cj1, H1, D1, S1, epsg1, pz1, pm1, pl1, z1, lse1, ng1, nb1, wv1, bv1, wo1,
                       bo1, qx1, gg1, gb1, gw1, gbias1, o1, c1, out1, s_ob1, s_oc1,
                       HAS_BV1, SPLIT1, S_PAD1, D_PAD1, MMA, HALF)


# ---------------------------------------------------------------------------------------------
# backward A: row programs (W_g, GELU, LN_g, residual, W_o, W_v backward)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_a_body(pid, B, Ci, Cj, H, D, eps_g,
                dout_ptr, s_db, s_dc,                   # the output CLS rows' gradient dout_i[:, 0]
                c_ptr, gg_ptr, gb_ptr, gw_ptr, wo_ptr, wv_ptr, ng_ptr, z_ptr,
                stc_ptr, de_ptr, dc_ptr, do_ptr, dz_ptr, r1_ptr, r2_ptr,   # out (float32)
                D_PAD: tl.constexpr, MMA: tl.constexpr, HALF: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = rows.to(tl.int64)
    mean, rstd = _rows_stats(c_ptr, Cj, 1, rows, rmask, Cj, eps_g, BLOCK_B, BLOCK_K)
    tl.store(stc_ptr + rows * 2, mean, mask=rmask)
    tl.store(stc_ptr + rows * 2 + 1, rstd, mask=rmask)
    s1 = tl.zeros([BLOCK_B], tl.float32)
    s2 = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, Cj, BLOCK_C):            # dt = dnew W_g; de = dt GELU'(e); dhat = g_g de (-> dc_ptr)
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        m2 = rmask[:, None] & nmask[None, :]
        dt = _row_mm(dout_ptr, s_db, s_dc, rows, rmask, Ci, 0, mean, rstd, gg_ptr, gb_ptr, 1.0,
                     gw_ptr, 1, Cj, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        chat = (tl.load(c_ptr + rows[:, None] * Cj + offs_n[None, :], mask=m2, other=0.0) - mean[:, None]) \
            * rstd[:, None]
        g = _vec(gg_ptr, offs_n, nmask)
        de = tl.where(m2, dt * _gelu_grad(chat * g[None, :] + _vec(gb_ptr, offs_n, nmask)[None, :]), 0.0)
        dhat = de * g[None, :]
        tl.store(de_ptr + rows[:, None] * Cj + offs_n[None, :], de, mask=m2)
        tl.store(dc_ptr + rows[:, None] * Cj + offs_n[None, :], dhat, mask=m2)
        s1 += tl.sum(dhat, 1)
        s2 += tl.sum(dhat * chat, 1)
    tl.debug_barrier()
    for n0 in range(0, Cj, BLOCK_C):            # dc = rstd (dhat - mean(dhat) - chat mean(dhat chat)) (LN_g backward)
        offs_n = n0 + tl.arange(0, BLOCK_C)
        m2 = rmask[:, None] & (offs_n < Cj)[None, :]
        dhat = tl.load(dc_ptr + rows[:, None] * Cj + offs_n[None, :], mask=m2, other=0.0)
        chat = (tl.load(c_ptr + rows[:, None] * Cj + offs_n[None, :], mask=m2, other=0.0) - mean[:, None]) \
            * rstd[:, None]
        dc = rstd[:, None] * (dhat - (s1 / Cj)[:, None] - chat * (s2 / Cj)[:, None])
        tl.store(dc_ptr + rows[:, None] * Cj + offs_n[None, :], dc, mask=m2)
    tl.debug_barrier()
    for n0 in range(0, Cj, BLOCK_C):            # do = dc W_o
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        acc = _row_mm(dc_ptr, Cj, 1, rows, rmask, Cj, 0, mean, rstd, gg_ptr, gb_ptr, 1.0,
                      wo_ptr, 1, Cj, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        tl.store(do_ptr + rows[:, None] * Cj + offs_n[None, :], acc, mask=rmask[:, None] & nmask[None, :])
    tl.debug_barrier()
    for c0 in range(0, Cj, BLOCK_C):            # dy_h = W_v,h^T do_h; dz = g_1 dy; r1 = sum_h dy z, r2 = sum_h dy
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < Cj
        m2 = rmask[:, None] & cmask[None, :]
        g1 = _vec(ng_ptr, offs_c, cmask)
        r1 = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        r2 = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        for h in range(0, H):
            dy = _row_mm(do_ptr + h * D, Cj, 1, rows, rmask, D, 0, mean, rstd, gg_ptr, gb_ptr, 1.0,
                         wv_ptr + h * D * Cj, 1, Cj, offs_c, cmask, BLOCK_B, D_PAD, BLOCK_C, MMA, HALF)
            tl.store(dz_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], dy * g1[None, :], mask=m2)
            r1 += dy * tl.load(z_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], mask=m2, other=0.0)
            r2 += dy
        tl.store(r1_ptr + rows[:, None] * Cj + offs_c[None, :], r1, mask=m2)
        tl.store(r2_ptr + rows[:, None] * Cj + offs_c[None, :], r2, mask=m2)


@triton.jit
def _fs_bwd_a_kernel(
    G0, B,
    Ci0, Cj0, H0, D0, epsg0, dout0, s_db0, s_dc0, c0, gg0, gb0, gw0, wo0, wv0, ng0, z0, stc0, de0, dc0, do0, dz0,
    r10, r20,
    Ci1, Cj1, H1, D1, epsg1, dout1, s_db1, s_dc1, c1, gg1, gb1, gw1, wo1, wv1, ng1, z1, stc1, de1, dc1, do1, dz1,
    r11, r21,
    D_PAD0: tl.constexpr, D_PAD1: tl.constexpr, MMA: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _bwd_a_body(pid, B, Ci0, Cj0, H0, D0, epsg0, dout0, s_db0, s_dc0, c0, gg0, gb0, gw0, wo0, wv0, ng0, z0,
                    stc0, de0, dc0, do0, dz0, r10, r20, D_PAD0, MMA, HALF)
    else:
        _bwd_a_body(pid - G0, B, Ci1, Cj1, H1, D1, epsg1, dout1, s_db1, s_dc1, c1, gg1, gb1, gw1, wo1, wv1, ng1,
                    z1, stc1, de1, dc1, do1, dz1, r11, r21, D_PAD1, MMA, HALF)


# ---------------------------------------------------------------------------------------------
# parameter-gradient tiles: reductions over the batch in a fixed order
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_gemm(t_n, t_k, B, N, K,
               g_ptr, s_gb, s_gn,                       # G (B, N), any dtype
               a_ptr, s_ab, s_ak, A_MODE: tl.constexpr, st_ptr, ag_ptr, ab_ptr, a_scale,   # A (B, K), transformed
               out_ptr, s_on,                           # dW (N, K), unit column stride
               bias_ptr, HAS_BIAS: tl.constexpr,        # db (N,), written by the t_k == 0 tiles
               TN: tl.constexpr, TK: tl.constexpr, MMA: tl.constexpr, HALF: tl.constexpr):
    """dW[n, k] = sum_b G[b, n] A'[b, k] over one [TN, TK] tile, b in a fixed order (A' = A
    transformed as _a_chunk, LayerNorm statistics from st (B, 2)); db[n] = sum_b G[b, n]."""
    offs_n = t_n * TN + tl.arange(0, TN)
    offs_k = t_k * TK + tl.arange(0, TK)
    nmask = offs_n < N
    kmask = offs_k < K
    acc = tl.zeros([TN, TK], tl.float32)
    bsum = tl.zeros([TN], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows = rows.to(tl.int64)
        g = tl.load(g_ptr + rows[:, None] * s_gb + offs_n[None, :] * s_gn, mask=rmask[:, None] & nmask[None, :],
                    other=0.0).to(tl.float32)
        mean = tl.load(st_ptr + rows * 2, mask=rmask, other=0.0)
        rstd = tl.load(st_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        a = _a_chunk(a_ptr, s_ab, s_ak, rows, rmask, offs_k, kmask, A_MODE, mean, rstd, ag_ptr, ab_ptr, a_scale)
        acc = _mm(tl.trans(g), a, acc, MMA, HALF, True, True)
        bsum += tl.sum(g, 0)
    tl.store(out_ptr + offs_n[:, None] * s_on + offs_k[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        tl.store(bias_ptr + offs_n, bsum.to(bias_ptr.dtype.element_ty), mask=nmask & (t_k == 0))


@triton.jit
def _ln_grad_tile(t, B, K, p_ptr, x_ptr, s_xb, s_xc, st_ptr, dg_ptr, db_ptr,
                  ex1_ptr, base_g_ptr, base_b_ptr, HAS_BASE: tl.constexpr, EXTRA: tl.constexpr,
                  zero_ptr, ZERO: tl.constexpr, TK: tl.constexpr):
    """A LayerNorm's parameter gradients over columns [t * TK, (t + 1) * TK), rows in a fixed
    order: dg[k] = sum_b P[b, k] xhat[b, k] (+ sum_b ex1[b, k]) (+ base_g[k]), db[k] = sum_b P[b, k]
    (+ base_b[k]); xhat from x (B, K) and its statistics st (B, 2). With ZERO the same columns of
    zero_ptr (a bias that cannot change the output) are written with 0."""
    offs_k = t * TK + tl.arange(0, TK)
    kmask = offs_k < K
    sg = tl.zeros([TK], tl.float32)
    sb = tl.zeros([TK], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows = rows.to(tl.int64)
        m2 = rmask[:, None] & kmask[None, :]
        pv = tl.load(p_ptr + rows[:, None] * K + offs_k[None, :], mask=m2, other=0.0)
        mean = tl.load(st_ptr + rows * 2, mask=rmask, other=0.0)
        rstd = tl.load(st_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        xhat = (tl.load(x_ptr + rows[:, None] * s_xb + offs_k[None, :] * s_xc, mask=m2, other=0.0).to(tl.float32)
                - mean[:, None]) * rstd[:, None]
        sg += tl.sum(tl.where(m2, pv * xhat, 0.0), 0)
        sb += tl.sum(pv, 0)
        if EXTRA:
            sg += tl.sum(tl.load(ex1_ptr + rows[:, None] * K + offs_k[None, :], mask=m2, other=0.0), 0)
    if HAS_BASE:
        sg += tl.load(base_g_ptr + offs_k, mask=kmask, other=0.0)
        sb += tl.load(base_b_ptr + offs_k, mask=kmask, other=0.0)
    tl.store(dg_ptr + offs_k, sg.to(dg_ptr.dtype.element_ty), mask=kmask)
    tl.store(db_ptr + offs_k, sb.to(db_ptr.dtype.element_ty), mask=kmask)
    if ZERO:
        tl.store(zero_ptr + offs_k, tl.zeros([TK], tl.float32).to(zero_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _colsums_tile(t, B, K, p1_ptr, p2_ptr, out1_ptr, out2_ptr, TK: tl.constexpr):
    """Column sums over the batch (fixed order) of two (B, K) float32 matrices, columns of tile t."""
    offs_k = t * TK + tl.arange(0, TK)
    kmask = offs_k < K
    s1 = tl.zeros([TK], tl.float32)
    s2 = tl.zeros([TK], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        m2 = (rows < B)[:, None] & kmask[None, :]
        s1 += tl.sum(tl.load(p1_ptr + rows[:, None] * K + offs_k[None, :], mask=m2, other=0.0), 0)
        s2 += tl.sum(tl.load(p2_ptr + rows[:, None] * K + offs_k[None, :], mask=m2, other=0.0), 0)
    tl.store(out1_ptr + offs_k, s1, mask=kmask)
    tl.store(out2_ptr + offs_k, s2, mask=kmask)


@triton.jit
def _bwd_b_tiles(t, B, Ci, Cj, H, D, TG, TO, TV,
                 dout_ptr, s_db, s_dc, c_ptr, stc_ptr, gg_ptr, gb_ptr, dc_ptr, o_ptr, do_ptr, z_ptr, ng_ptr, nb_ptr,
                 de_ptr, r1_ptr, r2_ptr,
                 dgw_ptr, dgbias_ptr, dwo_ptr, dbo_ptr, dwv_ptr, dbv_ptr, dgg_ptr, dgb_ptr, n1a_ptr,
                 HAS_BV: tl.constexpr, D_PAD: tl.constexpr, MMA: tl.constexpr, HALF: tl.constexpr):
    """Tile job t of one direction in launch B: [0, TG) dW_g, db_g; [TG, TG + TO) dW_o, db_o;
    then TV tiles of dW_v, db_v (one head per tile row); then the LayerNorm tiles of g_g, b_g
    and the first terms of dg_1, db_1 (float32 scratch n1a (2, Cj), finished in launch C)."""
    nk = tl.cdiv(Cj, TILE)
    if t < TG:                                   # dW_g (Ci, Cj) = sum_b dnew^T GELU(LN_g(c))
        _tile_gemm(t // nk, t % nk, B, Ci, Cj, dout_ptr, s_db, s_dc, c_ptr, Cj, 1, 2, stc_ptr, gg_ptr, gb_ptr, 1.0,
                   dgw_ptr, Cj, dgbias_ptr, True, TILE, TILE, MMA, HALF)
    elif t < TG + TO:                            # dW_o (Cj, Cj) = sum_b dc^T o
        u = t - TG
        _tile_gemm(u // nk, u % nk, B, Cj, Cj, dc_ptr, Cj, 1, o_ptr, Cj, 1, 0, stc_ptr, gg_ptr, gb_ptr, 1.0,
                   dwo_ptr, Cj, dbo_ptr, True, TILE, TILE, MMA, HALF)
    elif t < TG + TO + TV:                       # dW_v,h (D, Cj) = sum_b do_h^T (g_1 z_h + b_1)
        u = t - TG - TO
        h = u // nk
        _tile_gemm(0, u % nk, B, D, Cj, do_ptr + h * D, Cj, 1, z_ptr + h * Cj, H * Cj, 1, 4, stc_ptr, ng_ptr,
                   nb_ptr, 1.0, dwv_ptr + h * D * Cj, Cj, dbv_ptr + h * D, HAS_BV, D_PAD, TILE, MMA, HALF)
    else:                                        # g_g, b_g; the z terms of g_1, b_1
        u = t - TG - TO - TV
        _ln_grad_tile(u, B, Cj, de_ptr, c_ptr, Cj, 1, stc_ptr, dgg_ptr, dgb_ptr, r1_ptr, r1_ptr, r2_ptr,
                      False, False, dgg_ptr, False, TILE)
        _colsums_tile(u, B, Cj, r1_ptr, r2_ptr, n1a_ptr, n1a_ptr + Cj, TILE)


# ---------------------------------------------------------------------------------------------
# backward B: the token pass backward and the first parameter-gradient tiles, one launch
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fs_bwd_b_kernel(
    G0, GS, T0,
    tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, eps0, q00, s_q0b0, s_q0c0, w0, dz0, z0, lse0,
    do0, s_ob0, s_om0, s_oc0, dx0, s_xb0, s_xm0, s_xc0, dq00, s_dqb0, dw0,
    tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, eps1, q01, s_q0b1, s_q0c1, w1, dz1, z1, lse1,
    do1, s_ob1, s_om1, s_oc1, dx1, s_xb1, s_xm1, s_xc1, dq01, s_dqb1, dw1,
    B,
    aCi0, aCj0, aH0, aD0, TG0, TO0, TV0, dout0, s_db0, s_dc0, c0, stc0, gg0, gb0, dc0, o0, do_0, zz0, ng0, nb0, de0,
    r10, r20, dgw0, dgbias0, dwo0, dbo0, dwv0, dbv0, dgg0, dgb0, n1a0,
    aCi1, aCj1, aH1, aD1, TG1, TO1, TV1, dout1, s_db1, s_dc1, c1, stc1, gg1, gb1, dc1, o1, do_1, zz1, ng1, nb1, de1,
    r11, r21, dgw1, dgbias1, dwo1, dbo1, dwv1, dbv1, dgg1, dgb1, n1a1,
    BLOCK_N0: tl.constexpr, C_PAD0: tl.constexpr, H_PAD0: tl.constexpr, SPLIT0: tl.constexpr, C_CHUNK0: tl.constexpr,
    BLOCK_N1: tl.constexpr, C_PAD1: tl.constexpr, H_PAD1: tl.constexpr, SPLIT1: tl.constexpr, C_CHUNK1: tl.constexpr,
    SMMA: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
    HAS_BV0: tl.constexpr, D_PAD0: tl.constexpr, HAS_BV1: tl.constexpr, D_PAD1: tl.constexpr,
    MMA: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _stream_bwd_body(pid, eps0, tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, q00, s_q0b0, s_q0c0, w0, dz0,
                         z0, lse0, do0, s_ob0, s_om0, s_oc0, dx0, s_xb0, s_xm0, s_xc0, dq00, s_dqb0, dw0,
                         BLOCK_N0, C_PAD0, H_PAD0, SPLIT0, True, SMMA, PREC, HILO, C_CHUNK0)
    elif pid < GS:
        _stream_bwd_body(pid - G0, eps1, tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, q01, s_q0b1, s_q0c1, w1,
                         dz1, z1, lse1, do1, s_ob1, s_om1, s_oc1, dx1, s_xb1, s_xm1, s_xc1, dq01, s_dqb1, dw1,
                         BLOCK_N1, C_PAD1, H_PAD1, SPLIT1, True, SMMA, PREC, HILO, C_CHUNK1)
    elif pid < GS + T0:
        _bwd_b_tiles(pid - GS, B, aCi0, aCj0, aH0, aD0, TG0, TO0, TV0, dout0, s_db0, s_dc0, c0, stc0, gg0, gb0, dc0,
                     o0, do_0, zz0, ng0, nb0, de0, r10, r20, dgw0, dgbias0, dwo0, dbo0, dwv0, dbv0, dgg0, dgb0, n1a0,
                     HAS_BV0, D_PAD0, MMA, HALF)
    else:
        _bwd_b_tiles(pid - GS - T0, B, aCi1, aCj1, aH1, aD1, TG1, TO1, TV1, dout1, s_db1, s_dc1, c1, stc1, gg1, gb1,
                     dc1, o1, do_1, zz1, ng1, nb1, de1, r11, r21, dgw1, dgbias1, dwo1, dbo1, dwv1, dbv1, dgg1, dgb1,
                     n1a1, HAS_BV1, D_PAD1, MMA, HALF)


# ---------------------------------------------------------------------------------------------
# backward C: the query path's row programs, then the tiles that reduce what they wrote
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_c_rows(pid, B, Ci, Cj, H, D, S, scale, eps_n, eps_f,
                pdw_ptr, dw_ptr,                        # the stream's dw (partials when SPLIT), the combined dw
                q_ptr, wk_ptr, ng_ptr, nb_ptr, qx_ptr, wq_ptr, dc_ptr, dq0_ptr,
                x_ptr, s_xb, s_xc, fg_ptr, fb_ptr, fw_ptr,
                dx_ptr, s_gb, s_gc,                     # dx_i[:, 0]
                r3_ptr, dq_ptr, dy0_ptr, dqx_ptr, da_ptr, stq_ptr, sta_ptr,   # out (float32)
                SPLIT: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr, MMA: tl.constexpr,
                HALF: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = rows.to(tl.int64)
    if SPLIT:                                    # dw = sum of the splits' partials, in a fixed order
        for h in range(0, H):
            for c0 in range(0, Cj, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                m2 = rmask[:, None] & (offs_c < Cj)[None, :]
                acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
                for s in range(0, S):
                    acc += tl.load(pdw_ptr + ((rows[:, None] * S + s) * H + h) * Cj + offs_c[None, :], mask=m2,
                                   other=0.0)
                tl.store(dw_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], acc, mask=m2)
        tl.debug_barrier()
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    for c0 in range(0, Cj, BLOCK_C):             # r3 = s sum_h dw_h u_h, u_h = W_k,h^T q_h (g_1's gradient via w)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < Cj
        m2 = rmask[:, None] & cmask[None, :]
        r3 = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        for h in range(0, H):
            u = _row_mm(q_ptr + h * D, Cj, 1, rows, rmask, D, 0, rows, rows, ng_ptr, nb_ptr, 1.0,
                        wk_ptr + h * D * Cj, 1, Cj, offs_c, cmask, BLOCK_B, D_PAD, BLOCK_C, MMA, HALF)
            r3 += u * tl.load(dw_ptr + (rows[:, None] * H + h) * Cj + offs_c[None, :], mask=m2, other=0.0)
        tl.store(r3_ptr + rows[:, None] * Cj + offs_c[None, :], r3 * scale, mask=m2)
    for h in range(0, H):                        # dq_h = W_k,h (s g_1 dw_h)
        acc = _row_mm(dw_ptr + h * Cj, H * Cj, 1, rows, rmask, Cj, 3, rows, rows, ng_ptr, nb_ptr, scale,
                      wk_ptr + h * D * Cj, Cj, 1, offs_d, dmask, BLOCK_B, BLOCK_K, D_PAD, MMA, HALF)
        tl.store(dq_ptr + rows[:, None] * Cj + h * D + offs_d[None, :], acc, mask=rmask[:, None] & dmask[None, :])
    tl.debug_barrier()
    mean_q, rstd_q = _rows_stats(qx_ptr, Cj, 1, rows, rmask, Cj, eps_n, BLOCK_B, BLOCK_K)
    tl.store(stq_ptr + rows * 2, mean_q, mask=rmask)
    tl.store(stq_ptr + rows * 2 + 1, rstd_q, mask=rmask)
    s1 = tl.zeros([BLOCK_B], tl.float32)
    s2 = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, Cj, BLOCK_C):             # dy0 = dq W_q, then LN_1 backward's row sums
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        m2 = rmask[:, None] & nmask[None, :]
        dy0 = _row_mm(dq_ptr, Cj, 1, rows, rmask, Cj, 0, rows, rows, ng_ptr, nb_ptr, 1.0,
                      wq_ptr, 1, Cj, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        tl.store(dy0_ptr + rows[:, None] * Cj + offs_n[None, :], dy0, mask=m2)
        yhat = (tl.load(qx_ptr + rows[:, None] * Cj + offs_n[None, :], mask=m2, other=0.0) - mean_q[:, None]) \
            * rstd_q[:, None]
        dyh = tl.where(m2, dy0 * _vec(ng_ptr, offs_n, nmask)[None, :], 0.0)
        s1 += tl.sum(dyh, 1)
        s2 += tl.sum(dyh * yhat, 1)
    tl.debug_barrier()
    for n0 in range(0, Cj, BLOCK_C):             # dqx = LN_1 backward + the residual's dc + the token pass's dq0
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Cj
        m2 = rmask[:, None] & nmask[None, :]
        offs = rows[:, None] * Cj + offs_n[None, :]
        dyh = tl.load(dy0_ptr + offs, mask=m2, other=0.0) * _vec(ng_ptr, offs_n, nmask)[None, :]
        yhat = (tl.load(qx_ptr + offs, mask=m2, other=0.0) - mean_q[:, None]) * rstd_q[:, None]
        dqx = rstd_q[:, None] * (dyh - (s1 / Cj)[:, None] - yhat * (s2 / Cj)[:, None])
        dqx += tl.load(dc_ptr + offs, mask=m2, other=0.0) + tl.load(dq0_ptr + offs, mask=m2, other=0.0)
        tl.store(dqx_ptr + offs, dqx, mask=m2)
    tl.debug_barrier()
    mean_a, rstd_a = _rows_stats(x_ptr, s_xb, s_xc, rows, rmask, Ci, eps_f, BLOCK_B, BLOCK_K)
    tl.store(sta_ptr + rows * 2, mean_a, mask=rmask)
    tl.store(sta_ptr + rows * 2 + 1, rstd_a, mask=rmask)
    s1 = tl.zeros([BLOCK_B], tl.float32)
    s2 = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, Ci, BLOCK_C):             # dh = dqx W_f; da = dh GELU'(a); LN_f backward's row sums
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Ci
        m2 = rmask[:, None] & nmask[None, :]
        dh = _row_mm(dqx_ptr, Cj, 1, rows, rmask, Cj, 0, rows, rows, ng_ptr, nb_ptr, 1.0,
                     fw_ptr, 1, Ci, offs_n, nmask, BLOCK_B, BLOCK_K, BLOCK_C, MMA, HALF)
        ahat = (tl.load(x_ptr + rows[:, None] * s_xb + offs_n[None, :] * s_xc, mask=m2, other=0.0).to(tl.float32)
                - mean_a[:, None]) * rstd_a[:, None]
        g = _vec(fg_ptr, offs_n, nmask)
        da = tl.where(m2, dh * _gelu_grad(ahat * g[None, :] + _vec(fb_ptr, offs_n, nmask)[None, :]), 0.0)
        tl.store(da_ptr + rows[:, None] * Ci + offs_n[None, :], da, mask=m2)
        dah = da * g[None, :]
        s1 += tl.sum(dah, 1)
        s2 += tl.sum(dah * ahat, 1)
    tl.debug_barrier()
    for n0 in range(0, Ci, BLOCK_C):             # dx_i[:, 0] = LN_f backward
        offs_n = n0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < Ci
        m2 = rmask[:, None] & nmask[None, :]
        dah = tl.load(da_ptr + rows[:, None] * Ci + offs_n[None, :], mask=m2, other=0.0) \
            * _vec(fg_ptr, offs_n, nmask)[None, :]
        ahat = (tl.load(x_ptr + rows[:, None] * s_xb + offs_n[None, :] * s_xc, mask=m2, other=0.0).to(tl.float32)
                - mean_a[:, None]) * rstd_a[:, None]
        dx = rstd_a[:, None] * (dah - (s1 / Ci)[:, None] - ahat * (s2 / Ci)[:, None])
        tl.store(dx_ptr + rows[:, None] * s_gb + offs_n[None, :] * s_gc, dx.to(dx_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_c_tiles(t, B, Ci, Cj, H, D, scale, TK_, TQ, TF, TLF,
                 q_ptr, dw_ptr, ng_ptr, nb_ptr, dq_ptr, qx_ptr, stq_ptr, dqx_ptr, x_ptr, s_xb, s_xc, sta_ptr,
                 fg_ptr, fb_ptr, da_ptr, dy0_ptr, r3_ptr, n1a_ptr,
                 dwk_ptr, dwq_ptr, dbq_ptr, dfw_ptr, dfb_ptr, dfg_ptr, dfbeta_ptr, dng_ptr, dnb_ptr, dbk_ptr,
                 HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, D_PAD: tl.constexpr, MMA: tl.constexpr,
                 HALF: tl.constexpr):
    """Tile job t of one direction in launch C: dW_k (one head per tile row), dW_q and db_q, dW_f
    and db_f, LN_f's parameters, then LN_1's (completing launch B's first terms) and db_k = 0."""
    nk = tl.cdiv(Cj, TILE)
    nf = tl.cdiv(Ci, TILE)
    if t < TK_:                                  # dW_k,h (D, Cj) = sum_b q_h^T (s g_1 dw_h)
        h = t // nk
        _tile_gemm(0, t % nk, B, D, Cj, q_ptr + h * D, Cj, 1, dw_ptr + h * Cj, H * Cj, 1, 3, stq_ptr, ng_ptr, nb_ptr,
                   scale, dwk_ptr + h * D * Cj, Cj, dbq_ptr, False, D_PAD, TILE, MMA, HALF)
    elif t < TK_ + TQ:                           # dW_q (Cj, Cj) = sum_b dq^T LN_1(qx)
        u = t - TK_
        _tile_gemm(u // nk, u % nk, B, Cj, Cj, dq_ptr, Cj, 1, qx_ptr, Cj, 1, 1, stq_ptr, ng_ptr, nb_ptr, 1.0,
                   dwq_ptr, Cj, dbq_ptr, HAS_BQ, TILE, TILE, MMA, HALF)
    elif t < TK_ + TQ + TF:                      # dW_f (Cj, Ci) = sum_b dqx^T GELU(LN_f(x_i[:, 0]))
        u = t - TK_ - TQ
        _tile_gemm(u // nf, u % nf, B, Cj, Ci, dqx_ptr, Cj, 1, x_ptr, s_xb, s_xc, 2, sta_ptr, fg_ptr, fb_ptr, 1.0,
                   dfw_ptr, Ci, dfb_ptr, True, TILE, TILE, MMA, HALF)
    elif t < TK_ + TQ + TF + TLF:                # LN_f: g_f, b_f
        u = t - TK_ - TQ - TF
        _ln_grad_tile(u, B, Ci, da_ptr, x_ptr, s_xb, s_xc, sta_ptr, dfg_ptr, dfbeta_ptr, da_ptr, n1a_ptr, n1a_ptr,
                      False, False, dbk_ptr, False, TILE)
    else:                                        # LN_1: g_1, b_1 (+ launch B's terms), and db_k = 0
        u = t - TK_ - TQ - TF - TLF
        _ln_grad_tile(u, B, Cj, dy0_ptr, qx_ptr, Cj, 1, stq_ptr, dng_ptr, dnb_ptr, r3_ptr, n1a_ptr, n1a_ptr + Cj,
                      True, True, dbk_ptr, HAS_BK, TILE)


@triton.jit
def _fs_bwd_c_kernel(
    cnt_ptr, R0, R, T0, TOTAL, B,
    Ci0, Cj0, H0, D0, S0, scale0, epsn0, epsf0, pdw0, dw0, q0, wk0, ng0, nb0, qx0, wq0, dc0, dq00, x0, s_xb0, s_xc0,
    fg0, fb0, fw0, dx0, s_gb0, s_gc0, r30, dq0, dy00, dqx0, da0, stq0, sta0,
    TK0, TQ0, TF0, TLF0, n1a0, dwk0, dwq0, dbq0, dfw0, dfb0, dfg0, dfbeta0, dng0, dnb0, dbk0,
    Ci1, Cj1, H1, D1, S1, scale1, epsn1, epsf1, pdw1, dw1, q1, wk1, ng1, nb1, qx1, wq1, dc1, dq01, x1, s_xb1, s_xc1,
    fg1, fb1, fw1, dx1, s_gb1, s_gc1, r31, dq1, dy01, dqx1, da1, stq1, sta1,
    TK1, TQ1, TF1, TLF1, n1a1, dwk1, dwq1, dbq1, dfw1, dfb1, dfg1, dfbeta1, dng1, dnb1, dbk1,
    SPLIT0: tl.constexpr, S_PAD0: tl.constexpr, D_PAD0: tl.constexpr, HAS_BQ0: tl.constexpr, HAS_BK0: tl.constexpr,
    SPLIT1: tl.constexpr, S_PAD1: tl.constexpr, D_PAD1: tl.constexpr, HAS_BQ1: tl.constexpr, HAS_BK1: tl.constexpr,
    MMA: tl.constexpr, HALF: tl.constexpr, PHASE: tl.constexpr,
):
    # PHASE 0 (the default): one launch. A ticket from an integer counter orders the programs by
    # start: tickets [0, R) run the row jobs, the rest the tile jobs, which wait until every row
    # program has finished. A waiting program only waits on programs that started before it (so
    # they are resident and finish); under the interpreter the programs run one after the other,
    # in ticket order. PHASE 1 / 2 (SEQUENTIAL_C_ENV): the row jobs, then the tile jobs, as two
    # launches without counters (a fallback, and a check of the protocol on a GPU).
    if PHASE == 1:
        if tl.program_id(0) < R0:
            _bwd_c_rows(tl.program_id(0), B, Ci0, Cj0, H0, D0, S0, scale0, epsn0, epsf0, pdw0, dw0, q0, wk0, ng0, nb0,
                        qx0, wq0, dc0, dq00, x0, s_xb0, s_xc0, fg0, fb0, fw0, dx0, s_gb0, s_gc0, r30, dq0, dy00, dqx0,
                        da0, stq0, sta0, SPLIT0, S_PAD0, D_PAD0, MMA, HALF)
        else:
            _bwd_c_rows(tl.program_id(0) - R0, B, Ci1, Cj1, H1, D1, S1, scale1, epsn1, epsf1, pdw1, dw1, q1, wk1, ng1,
                        nb1, qx1, wq1, dc1, dq01, x1, s_xb1, s_xc1, fg1, fb1, fw1, dx1, s_gb1, s_gc1, r31, dq1, dy01,
                        dqx1, da1, stq1, sta1, SPLIT1, S_PAD1, D_PAD1, MMA, HALF)
        return
    if PHASE == 2:
        t = tl.program_id(0)
        if t < T0:
            _bwd_c_tiles(t, B, Ci0, Cj0, H0, D0, scale0, TK0, TQ0, TF0, TLF0, q0, dw0, ng0, nb0, dq0, qx0, stq0, dqx0,
                         x0, s_xb0, s_xc0, sta0, fg0, fb0, da0, dy00, r30, n1a0, dwk0, dwq0, dbq0, dfw0, dfb0, dfg0,
                         dfbeta0, dng0, dnb0, dbk0, HAS_BQ0, HAS_BK0, D_PAD0, MMA, HALF)
        else:
            _bwd_c_tiles(t - T0, B, Ci1, Cj1, H1, D1, scale1, TK1, TQ1, TF1, TLF1, q1, dw1, ng1, nb1, dq1, qx1, stq1,
                         dqx1, x1, s_xb1, s_xc1, sta1, fg1, fb1, da1, dy01, r31, n1a1, dwk1, dwq1, dbq1, dfw1, dfb1,
                         dfg1, dfbeta1, dng1, dnb1, dbk1, HAS_BQ1, HAS_BK1, D_PAD1, MMA, HALF)
        return
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if ticket < R:
        if ticket < R0:
            _bwd_c_rows(ticket, B, Ci0, Cj0, H0, D0, S0, scale0, epsn0, epsf0, pdw0, dw0, q0, wk0, ng0, nb0, qx0, wq0,
                        dc0, dq00, x0, s_xb0, s_xc0, fg0, fb0, fw0, dx0, s_gb0, s_gc0, r30, dq0, dy00, dqx0, da0,
                        stq0, sta0, SPLIT0, S_PAD0, D_PAD0, MMA, HALF)
        else:
            _bwd_c_rows(ticket - R0, B, Ci1, Cj1, H1, D1, S1, scale1, epsn1, epsf1, pdw1, dw1, q1, wk1, ng1, nb1, qx1,
                        wq1, dc1, dq01, x1, s_xb1, s_xc1, fg1, fb1, fw1, dx1, s_gb1, s_gc1, r31, dq1, dy01, dqx1, da1,
                        stq1, sta1, SPLIT1, S_PAD1, D_PAD1, MMA, HALF)
        tl.debug_barrier()                       # every thread's stores precede the release below
        tl.atomic_add(cnt_ptr + 1, 1, sem="release")
    else:
        done = tl.atomic_add(cnt_ptr + 1, 0, sem="acquire")
        while done < R:
            done = tl.atomic_add(cnt_ptr + 1, 0, sem="acquire")
        t = ticket - R
        if t < T0:
            _bwd_c_tiles(t, B, Ci0, Cj0, H0, D0, scale0, TK0, TQ0, TF0, TLF0, q0, dw0, ng0, nb0, dq0, qx0, stq0, dqx0,
                         x0, s_xb0, s_xc0, sta0, fg0, fb0, da0, dy00, r30, n1a0, dwk0, dwq0, dbq0, dfw0, dfb0, dfg0,
                         dfbeta0, dng0, dnb0, dbk0, HAS_BQ0, HAS_BK0, D_PAD0, MMA, HALF)
        else:
            _bwd_c_tiles(t - T0, B, Ci1, Cj1, H1, D1, scale1, TK1, TQ1, TF1, TLF1, q1, dw1, ng1, nb1, dq1, qx1, stq1,
                         dqx1, x1, s_xb1, s_xc1, sta1, fg1, fb1, da1, dy01, r31, n1a1, dwk1, dwq1, dbq1, dfw1, dfb1,
                         dfg1, dfbeta1, dng1, dnb1, dbk1, HAS_BQ1, HAS_BK1, D_PAD1, MMA, HALF)
    tl.debug_barrier()
    finished = tl.atomic_add(cnt_ptr + 2, 1, sem="acq_rel")
    if finished == TOTAL - 1:                    # the last program: every other one is past its counters
        tl.atomic_xchg(cnt_ptr, 0)
        tl.atomic_xchg(cnt_ptr + 1, 0)
        tl.atomic_xchg(cnt_ptr + 2, 0)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

class Direction(NamedTuple):
    """One direction's view of the stage: the query branch x_i, the token branch x_j, its
    parameters by name, its heads and LayerNorm epsilons."""
    xi: Tensor
    xj: Tensor
    p: dict
    H: int
    eps_f: float
    eps_n: float
    eps_g: float


def _directions(x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]], heads: Sequence[int],
                eps: Sequence[float]) -> List[Direction]:
    n = len(PARAMS_PER_DIRECTION)
    out = []
    for d, (xi, xj) in enumerate(((x0, x1), (x1, x0))):
        p = dict(zip(PARAMS_PER_DIRECTION, params[d * n:(d + 1) * n]))
        out.append(Direction(xi, xj, p, int(heads[d]), float(eps[3 * d]), float(eps[3 * d + 1]),
                             float(eps[3 * d + 2])))
    return out


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _mma_meta(dtype: torch.dtype) -> dict:
    half = _half(dtype)
    return dict(MMA=K._TL_TYPES[dtype if half else torch.float32], HALF=half)


def _pad16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def stage_shared_bytes(which: str, C0: int, C1: int, H0: int, H1: int, dtype: torch.dtype) -> int:
    """An upper bound of the shared memory, in bytes, of the stage's largest launch ``which``
    ("fwd": prologue, token pass, epilogue; "bwd": launches A, B and C) for branches of widths C0,
    C1 and heads (H0, H1) in ``dtype``: the streaming kernel's (each direction's token problem,
    cross_attention.stream_shared_bytes: direction 0 over C1 with H0 heads, direction 1 over C0
    with H1), or the row kernels' and tile programs', whose operands grow with the head width:
    [BLOCK_B, D_PAD] and [D_PAD, BLOCK_C] tiles in the operand dtype, D_PAD at least the 64 of the
    BLOCK_K x BLOCK_C tiles, plus 2 KiB. The compiler's figures for sm_90 stay within it
    (tests/test_triton_limits.py compares them)."""
    stream = max(K.stream_shared_bytes(which, Cj, H, dtype) for Cj, H in ((C1, H0), (C0, H1)))
    d_pad = max(64, _pad16(C1 // H0), _pad16(C0 // H1))
    rows = (ROWS + 64) * d_pad * (2 if _half(dtype) else 4) + 2048
    return max(stream, rows)


def stage_max_programs(B: int, C0: int, C1: int, H0: int, H1: int) -> int:
    """The most programs one launch of the stage can hold: backward launch B's (both directions'
    token programs, at most MAX_SPLITS per row, and its tile programs) or launch C's (row programs
    and tile programs); the forward's are fewer."""
    nt = lambda c: triton.cdiv(c, TILE_SIZE)                                          # noqa: E731
    tiles = sum(nt(Ci) * nt(Cj) + nt(Cj) * nt(Cj) + H * nt(Cj) + nt(Cj) for Ci, Cj, H in ((C0, C1, H0), (C1, C0, H1)))
    return max(2 * B * K.MAX_SPLITS + tiles, 2 * triton.cdiv(B, ROWS) + tiles + nt(C0) + nt(C1))


def _or(t: Optional[Tensor], stand_in: Tensor) -> Tensor:
    return stand_in if t is None else t


def fusion_stage_forward(x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]], heads: Sequence[int],
                         eps: Sequence[float], num_splits: Optional[int] = None) -> List[Tensor]:
    """The stage's forward in three launches: [out0, out1] and the saved tensors (per direction,
    SAVED_PER_DIRECTION). ``params``: both directions' PARAMS_PER_DIRECTION (None where absent),
    ``heads`` (H0, H1), ``eps`` (eps_f, eps_n, eps_g) per direction. Inputs validated by the op:
    one float16 / bfloat16 / float32 dtype, one device, contiguous parameters."""
    dirs = _directions(x0, x1, params, heads, eps)
    B = x0.shape[0]
    dtype, device = x0.dtype, x0.device
    mma = _mma_meta(dtype)
    out = [K._empty(x0.shape, dtype, device), K._empty(x1.shape, dtype, device)]
    saved = []
    pro_args = []
    for dr in dirs:
        Ci, Cj = dr.xi.shape[2], dr.xj.shape[2]
        qx = K._empty((B, Cj), torch.float32, device)
        q = K._empty((B, Cj), torch.float32, device)
        w = K._empty((B, dr.H, Cj), torch.float32, device)
        saved.append(dict(qx=qx, q=q, w=w))
        p = dr.p
        pro_args += [Ci, Cj, dr.H, Cj // dr.H, float((Cj // dr.H) ** -0.5), dr.eps_f, dr.eps_n,
                     dr.xi, dr.xi.stride(0), dr.xi.stride(2), p["f_ln_w"], p["f_ln_b"], p["f_w"], p["f_b"],
                     p["n_w"], p["n_b"], p["wq"], _or(p["bq"], p["n_b"]), p["wk"], qx, q, w]
    rb = triton.cdiv(B, ROWS)
    pro_meta = dict(HAS_BQ0=dirs[0].p["bq"] is not None, D_PAD0=_pad16(dirs[0].xj.shape[2] // dirs[0].H),
                    HAS_BQ1=dirs[1].p["bq"] is not None, D_PAD1=_pad16(dirs[1].xj.shape[2] // dirs[1].H), **mma)
    problems = []
    for d, dr in enumerate(dirs):
        Cj = dr.xj.shape[2]
        cfg = K.stream_config("fwd", Cj, dtype)
        # direction d attends over the token branch's patch tokens and writes them into its output
        problems.append(K.FwdProblem(dr.xj[:, 1:], saved[d]["qx"], saved[d]["w"], out[1 - d][:, 1:], dr.eps_n,
                                     cfg.block_n))
    with K._device_guard(x0):
        _fs_prologue_kernel[(2 * rb,)](rb, B, *pro_args, **pro_meta, num_warps=ROW_WARPS["prologue"], num_stages=1)
        plan, parts = K.stream_forward_launch(problems, num_splits, copy=True)
        epi_args = []
        epi_meta = dict(mma)
        for d, dr in enumerate(dirs):
            Ci, Cj = dr.xi.shape[2], dr.xj.shape[2]
            z, lse, part = parts[d]
            S = plan.splits[d]
            o = K._empty((B, Cj), torch.float32, device)
            c = K._empty((B, Cj), torch.float32, device)
            saved[d].update(z=z, lse=lse, o=o, c=c)
            p = dr.p
            epi_args += [Ci, Cj, dr.H, Cj // dr.H, S, dr.eps_g, part[0], part[1], part[2], z, lse,
                         p["n_w"], p["n_b"], p["wv"], _or(p["bv"], p["n_b"]), p["wo"], p["bo"], saved[d]["qx"],
                         p["g_ln_w"], p["g_ln_b"], p["g_w"], p["g_b"], o, c, out[d], out[d].stride(0), out[d].stride(2)]
            epi_meta.update({f"HAS_BV{d}": p["bv"] is not None, f"SPLIT{d}": S > 1,
                             f"S_PAD{d}": triton.next_power_of_2(S), f"D_PAD{d}": _pad16(Cj // dr.H)})
        _fs_epilogue_kernel[(2 * rb,)](rb, B, *epi_args, **epi_meta, num_warps=ROW_WARPS["epilogue"], num_stages=1)
    return out + [saved[d][k] for d in range(2) for k in SAVED_PER_DIRECTION]


#: Environment knob: "1" runs launch C as two launches (its row jobs, then its tile jobs) instead of
#: one with the ticket protocol: four backward launches, the same bits.
SEQUENTIAL_C_ENV = "CROSSVIT_KERNELS_FUSION_SEQUENTIAL_C"


def sequential_c() -> bool:
    return os.environ.get(SEQUENTIAL_C_ENV, "0").strip() == "1"


_COUNTERS = {}


def _counters(device: torch.device) -> Tensor:
    """The integer counters of launch C's ticket protocol, one set per device and stream, zero
    between launches (the last program of each launch resets them). Allocated, zero-filled, once."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    t = _COUNTERS.get(key)
    if t is None:
        t = _COUNTERS[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return t


def fusion_stage_backward(dout0: Tensor, dout1: Tensor, x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]],
                          saved: Sequence[Tensor], heads: Sequence[int], eps: Sequence[float],
                          num_splits: Optional[int] = None) -> List[Optional[Tensor]]:
    """The stage's backward in three launches: [dx0, dx1] + the gradient of every parameter (None
    where the parameter is absent), each in its input's dtype; dx0, dx1 contiguous."""
    dirs = _directions(x0, x1, params, heads, eps)
    n = len(SAVED_PER_DIRECTION)
    sv = [dict(zip(SAVED_PER_DIRECTION, saved[d * n:(d + 1) * n])) for d in range(2)]
    dout = [dout0, dout1]
    B = x0.shape[0]
    dtype, device = x0.dtype, x0.device
    f32 = torch.float32
    mma = _mma_meta(dtype)
    dx = [K._empty(x0.shape, dtype, device), K._empty(x1.shape, dtype, device)]
    grads = [[None if t is None else K._empty(t.shape, t.dtype, device) for t in dr.p.values()] for dr in dirs]
    g = [dict(zip(PARAMS_PER_DIRECTION, gr)) for gr in grads]
    rb = triton.cdiv(B, ROWS)
    nt = lambda c: triton.cdiv(c, TILE_SIZE)                                          # noqa: E731
    dims = [(dr.xi.shape[2], dr.xj.shape[2], dr.H, dr.xj.shape[2] // dr.H) for dr in dirs]
    scratch = []
    a_args, a_meta = [], dict(mma)
    for d, dr in enumerate(dirs):
        Ci, Cj, H, D = dims[d]
        sc = dict(stc=K._empty((B, 2), f32, device), de=K._empty((B, Cj), f32, device),
                  dc=K._empty((B, Cj), f32, device), do=K._empty((B, Cj), f32, device),
                  dz=K._empty((B, H, Cj), f32, device), r1=K._empty((B, Cj), f32, device),
                  r2=K._empty((B, Cj), f32, device), n1a=K._empty((2, Cj), f32, device))
        scratch.append(sc)
        p = dr.p
        a_args += [Ci, Cj, H, D, dr.eps_g, dout[d], dout[d].stride(0), dout[d].stride(2), sv[d]["c"], p["g_ln_w"],
                   p["g_ln_b"], p["g_w"], p["wo"], p["wv"], p["n_w"], sv[d]["z"], sc["stc"], sc["de"], sc["dc"],
                   sc["do"], sc["dz"], sc["r1"], sc["r2"]]
        a_meta[f"D_PAD{d}"] = _pad16(D)
    # launch B: the token pass (direction d: branch j's tokens, its gradient into dx_j[:, 1:]) + tiles
    probs, cfgs = [], []
    for d, dr in enumerate(dirs):
        Cj = dims[d][1]
        cfg = K.stream_config("bwd", Cj, dtype)
        cfgs.append(cfg)
        sc = scratch[d]
        sc["dq0"] = K._empty((B, Cj), f32, device)
        probs.append(K.BwdProblem(dr.xj[:, 1:], sv[d]["qx"], sv[d]["w"], sc["dz"], sv[d]["z"], sv[d]["lse"],
                                  dout[1 - d][:, 1:], dx[1 - d][:, 1:], sc["dq0"], dr.eps_n, cfg.block_n))
    plan = K.launch_plan([K.Problem(B, p.tokens.shape[1], p.tokens.shape[2], p.block_n, p.tokens.element_size(),
                                    p.w.shape[1]) for p in probs], device, num_splits)
    s_args, s_meta = [], {}
    for d, (p, S, tps) in enumerate(zip(probs, plan.splits, plan.tokens_per_split)):
        args, dw, part = K.bwd_problem_args(p, S, tps)
        scratch[d].update(dw=dw, pdw=part)
        s_args += args
        Cj, H = dims[d][1], dims[d][2]
        s_meta.update({f"BLOCK_N{d}": p.block_n, f"C_PAD{d}": K._pad(Cj), f"H_PAD{d}": K._pad_heads(H),
                       f"SPLIT{d}": S > 1, f"C_CHUNK{d}": cfgs[d].c_chunk})
    b_args, b_meta, tiles_b = [], dict(mma), []
    for d, dr in enumerate(dirs):
        Ci, Cj, H, D = dims[d]
        sc, p = scratch[d], dr.p
        TG, TO, TV, TL = nt(Ci) * nt(Cj), nt(Cj) * nt(Cj), H * nt(Cj), nt(Cj)
        tiles_b.append(TG + TO + TV + TL)
        b_args += [Ci, Cj, H, D, TG, TO, TV, dout[d], dout[d].stride(0), dout[d].stride(2), sv[d]["c"], sc["stc"],
                   p["g_ln_w"], p["g_ln_b"], sc["dc"], sv[d]["o"], sc["do"], sv[d]["z"], p["n_w"], p["n_b"], sc["de"],
                   sc["r1"], sc["r2"], g[d]["g_w"], g[d]["g_b"], g[d]["wo"], g[d]["bo"], g[d]["wv"],
                   _or(g[d]["bv"], sc["n1a"]), g[d]["g_ln_w"], g[d]["g_ln_b"], sc["n1a"]]
        b_meta.update({f"HAS_BV{d}": p["bv"] is not None, f"D_PAD{d}": _pad16(D)})
    G0 = B * plan.splits[0]
    GS = plan.programs
    # launch C: rows, then tiles
    c_args, c_meta, tiles_c = [], dict(mma), []
    for d, dr in enumerate(dirs):
        Ci, Cj, H, D = dims[d]
        sc, p = scratch[d], dr.p
        S = plan.splits[d]
        for k, shape in (("r3", (B, Cj)), ("dq", (B, Cj)), ("dy0", (B, Cj)), ("dqx", (B, Cj)), ("da", (B, Ci)),
                         ("stq", (B, 2)), ("sta", (B, 2))):
            sc[k] = K._empty(shape, f32, device)
        TK_, TQ, TF, TLF, TL1 = H * nt(Cj), nt(Cj) * nt(Cj), nt(Cj) * nt(Ci), nt(Ci), nt(Cj)
        tiles_c.append(TK_ + TQ + TF + TLF + TL1)
        c_args += [Ci, Cj, H, D, S, float(D ** -0.5), dr.eps_n, dr.eps_f, sc["pdw"], sc["dw"], sv[d]["q"], p["wk"],
                   p["n_w"], p["n_b"], sv[d]["qx"], p["wq"], sc["dc"], sc["dq0"], dr.xi, dr.xi.stride(0),
                   dr.xi.stride(2), p["f_ln_w"], p["f_ln_b"], p["f_w"], dx[d], dx[d].stride(0), dx[d].stride(2),
                   sc["r3"], sc["dq"], sc["dy0"], sc["dqx"], sc["da"], sc["stq"], sc["sta"],
                   TK_, TQ, TF, TLF, sc["n1a"], g[d]["wk"], g[d]["wq"], _or(g[d]["bq"], sc["n1a"]), g[d]["f_w"],
                   g[d]["f_b"], g[d]["f_ln_w"], g[d]["f_ln_b"], g[d]["n_w"], g[d]["n_b"], _or(g[d]["bk"], sc["n1a"])]
        c_meta.update({f"SPLIT{d}": S > 1, f"S_PAD{d}": triton.next_power_of_2(S), f"D_PAD{d}": _pad16(D),
                       f"HAS_BQ{d}": p["bq"] is not None, f"HAS_BK{d}": p["bk"] is not None})
    total_c = 2 * rb + sum(tiles_c)
    with K._device_guard(x0):
        _fs_bwd_a_kernel[(2 * rb,)](rb, B, *a_args, **a_meta, num_warps=ROW_WARPS["rows_a"], num_stages=1)
        scfg = K.stream_config("bwd", max(dims[0][1], dims[1][1]), dtype)
        _fs_bwd_b_kernel[(GS + sum(tiles_b),)](
            G0, GS, tiles_b[0], *s_args, B, *b_args, **s_meta, SMMA=K._TL_TYPES[K.mma_dtype(dtype)],
            PREC=K._precision(dtype), HILO=K.hilo(dtype), **b_meta, num_warps=scfg.num_warps, num_stages=1)
        if sequential_c():
            for phase, grid in ((1, 2 * rb), (2, sum(tiles_c))):
                _fs_bwd_c_kernel[(grid,)](_counters(device), rb, 2 * rb, tiles_c[0], total_c, B, *c_args, **c_meta,
                                          PHASE=phase, num_warps=ROW_WARPS["rows_c"], num_stages=1)
        else:
            _fs_bwd_c_kernel[(total_c,)](_counters(device), rb, 2 * rb, tiles_c[0], total_c, B, *c_args, **c_meta,
                                         PHASE=0, num_warps=ROW_WARPS["rows_c"], num_stages=1)
    return dx + grads[0] + grads[1]


# ---------------------------------------------------------------------------------------------
# the byte model: HBM bytes each launch moves, written from the kernels' loads and stores
# ---------------------------------------------------------------------------------------------

def stage_bytes(B: int, N: Sequence[int], C: Sequence[int], H: Sequence[int], elem: int,
                splits_fwd: Sequence[int] = (1, 1), splits_bwd: Sequence[int] = (1, 1),
                qkv_bias: bool = True) -> dict:
    """{launch: (bytes read, bytes written)} of the stage's six launches ("prologue", "stream",
    "epilogue" forward; "rows_a", "stream_tiles", "rows_tiles" backward), and the floors
    "floor_fwd" / "floor_bwd" (every input read once, every output written once: tokens,
    parameters, parameter gradients). Branch b has N[b] tokens (CLS included) of width C[b];
    direction d attends with H[d] heads over branch 1 - d; ``elem`` is the tokens' (and the
    parameters') element size; float32 intermediates are 4 bytes.

    Read bytes are each launch's unique addresses read that the launch did not write first (a
    value a program wrote and reads back comes from L2, not HBM); written bytes its unique
    addresses written. Tests check this against the addresses the kernels touch under the
    interpreter, and against the floors at the CrossViT-18 sizes."""
    f4 = 4
    out = {k: [0, 0] for k in ("prologue", "stream", "epilogue", "rows_a", "stream_tiles", "rows_tiles")}
    params_total = 0
    for d in range(2):
        i, j = d, 1 - d
        Ci, Cj, Hd, Mj = C[i], C[j], H[d], N[j] - 1
        bq = Cj if qkv_bias else 0
        p_f = (2 * Ci + Cj * Ci + Cj) * elem                    # LN_f, W_f, b_f
        p_n = 2 * Cj * elem                                     # LN_1
        p_qk = (2 * Cj * Cj + bq) * elem                        # W_q, b_q, W_k
        p_vo = (2 * Cj * Cj + (Cj if qkv_bias else 0) + Cj) * elem   # W_v, b_v, W_o, b_o
        p_g = (2 * Cj + Ci * Cj + Ci) * elem                    # LN_g, W_g, b_g
        params_total += p_f + p_n + p_qk + p_vo + p_g + (bq * elem)   # (+ b_k, read by nobody)
        rowC, rowHC, rowH = B * Cj * f4, B * Hd * Cj * f4, B * Hd * f4
        tokens = B * Mj * Cj * elem
        cls_i = B * Ci * elem
        S, Sb = splits_fwd[d], splits_bwd[d]
        # forward
        out["prologue"][0] += cls_i + p_f + p_n + p_qk
        out["prologue"][1] += 2 * rowC + rowHC                          # qx, q, w
        out["stream"][0] += tokens + rowC + rowHC                       # tokens, qx (token 0), w
        out["stream"][1] += tokens + (rowHC + rowH if S == 1 else S * (rowHC + 2 * rowH))   # copy, z & lse / partials
        out["epilogue"][0] += (rowHC if S == 1 else S * (rowHC + 2 * rowH)) + rowC + p_n + p_vo + p_g   # z, qx
        # (z, lse), o, c, out CLS
        out["epilogue"][1] += (0 if S == 1 else rowHC + rowH) + 2 * rowC + cls_i
        # backward A
        # dout CLS, c, z, params
        out["rows_a"][0] += cls_i + rowC + rowHC + (2 * Cj + Ci * Cj + 2 * Cj * Cj + Cj) * elem
        out["rows_a"][1] += B * 2 * f4 + 4 * rowC + rowHC + rowC                 # stats, de, dc, do, r1; dz; r2
        # backward B: the token pass and the first tiles (z read once for both)
        out["stream_tiles"][0] += 2 * tokens + rowC + 3 * rowHC + rowH          # x, dout; qx; w, dz, z; lse
        # dout CLS, stats; c, dc, o, do, de, r1, r2
        out["stream_tiles"][0] += cls_i + B * 2 * f4 + 7 * rowC
        out["stream_tiles"][0] += (2 * Cj + 2 * Cj) * elem                       # LN_g, LN_1 parameters
        out["stream_tiles"][1] += tokens + rowC + Sb * rowHC                     # dx, dq0, dw (partials)
        # dW_g, db_g, dW_o, dW_v, db_v, db_o, LN_g; n1a
        out["stream_tiles"][1] += (Ci * Cj + Ci + 2 * Cj * Cj + (Cj if qkv_bias else 0) + Cj + 2 * Cj) * elem \
            + 2 * Cj * f4
        # backward C: rows (the tiles re-read what the rows wrote)
        out["rows_tiles"][0] += Sb * rowHC + 2 * rowC + 2 * rowC + cls_i         # dw, q, qx, dc, dq0, x CLS
        # W_k, W_q, LN_1, LN_f, W_f; n1a
        out["rows_tiles"][0] += (2 * Cj * Cj + 2 * Cj + 2 * Ci + Cj * Ci) * elem + 2 * Cj * f4
        out["rows_tiles"][1] += (rowHC if Sb > 1 else 0) + 4 * rowC + B * Ci * f4 + 2 * B * 2 * f4 + cls_i
        out["rows_tiles"][1] += (2 * Cj * Cj + bq + Cj * Ci + Cj + 2 * Ci + 2 * Cj + (Cj if qkv_bias else 0)) * elem
    x_all = sum(B * N[b] * C[b] for b in range(2)) * elem
    res = {k: tuple(v) for k, v in out.items()}
    res["floor_fwd"] = (x_all + params_total, x_all)
    res["floor_bwd"] = (2 * x_all + params_total, x_all + params_total)
    return res
