"""Triton streaming kernels of the single-query cross-attention (docs/design.md, section 2).

Per batch row b the tokens are x_0 (the query row: ``x_cls`` of the core contract, the projected
CLS of the fusion stage) and x_i = x_tokens[b, i - 1] (i = 1..M, the patch tokens), each of width C.
The math is ``crossvit_kernels.backends.pytorch`` (the executable spec).

How the token pass is computed (one program per (row, split) of a *problem table*; a launch carries
one problem, the core contract, or two, both directions of a fusion stage):

* token tiles are loaded in their storage dtype and fed to the tensor cores as they are (bfloat16 /
  float16 MMA with float32 accumulation; float32 and float64 tokens take IEEE products): nothing
  converts a tile to float32 for a product, and nothing rounds token data to TF32;
* LayerNorm is applied as per-token rank-one corrections of the raw products. With s_w = sum_c w_c:

      score_hi = w_h . xh_i      = r_i * (w_h . x_i - mu_i * s_w_h)
      z_h      = sum_i a_hi xh_i = sum_i (a_hi r_i) x_i - sum_i (a_hi r_i) mu_i          (forward)
      g_hi     = dz_h . xh_i     = r_i * (dz_h . x_i - mu_i * s_dz_h)
      dx_i     = [sum_h (a r)_hi dz_h + (ds r)_hi w_h] - k1_i - k2_i r_i (x_i - mu_i)     (backward)
      dw_h     = sum_i (ds_hi r_i) x_i - sum_i (ds_hi r_i) mu_i

  where k1_i, k2_i (LayerNorm backward's two row means) come from per-head numbers already in
  registers: k1 = (1/C) sum_h (ar s_dz + dsr s_w), k2 = (1/C) sum_h (ar g + dsr score). The
  statistics mu_i, r_i come from one pass over the tile in registers, in float32, with sums
  shifted by the token's first element (``_token_stats``);
* w, dz and the softmax coefficients are float32 values; for 16-bit tokens they enter the tensor
  cores as (hi, lo) pairs of the token dtype (HILO, about 16 mantissa bits), stacked so that one
  product serves every head and both parts: w as a [2 H_PAD, C] operand (rows head, part), the
  coefficients as [BLOCK_N, 2 H_PAD] (columns head, part), the accumulators' hi and lo rows added
  at the end. The backward's rank-H update (a r, ds r) rounds its coefficients once: that error is
  projected by the LayerNorm backward like dx's own rounding. Every correction term uses the values
  the tensor cores carry, so the LayerNorm identities hold exactly for them;
* the query row x_0 (token 0) is handled by the first split of each row in float32 on the CUDA
  cores (it is a B-row quantity): its score initialises the online softmax, its gradient goes to
  ``dq0``;
* with several splits per row each split writes its (max, sum, unnormalised z) or partial dw and a
  combine merges them in a fixed order: no atomics, the same bits for the same inputs.

The fusion stage (``fusion.py``) launches the same bodies with COPY (the forward writes each token
tile it reads into the stage's output branch) and ADD_DOUT (the backward adds the output branch's
patch-token gradient before writing the input branch's), so the tokens are read once per pass.

eps reaches the kernels as a float32 scalar (Triton's type for Python floats), also for float64
inputs: its rounding moves rstd by about 1e-14 relative.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["cross_attention_core_forward", "cross_attention_core_backward", "plan_splits", "stream_config"]

#: Environment knob: force the number of token splits (an int >= 1) for every launch.
SPLITS_ENV = "CROSSVIT_KERNELS_TRITON_SPLITS"
#: The planner never cuts a row into more splits than this.
MAX_SPLITS = 64


# ---------------------------------------------------------------------------------------------
# kernel bodies (one problem; the kernels below dispatch a program to its problem)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _query_row(q0_ptr, b, s_q0b, s_q0c, offs_c, cmask, C, eps, ACC: tl.constexpr):
    """Token 0 of row b normalised (xh0, rstd0) in ACC, zero in the padding."""
    x0 = tl.load(q0_ptr + b * s_q0b + offs_c * s_q0c, mask=cmask, other=0.0).to(ACC)
    mean0 = tl.sum(x0, 0) / C
    xc0 = tl.where(cmask, x0 - mean0, 0.0)
    rstd0 = 1.0 / tl.sqrt(tl.sum(xc0 * xc0, 0) / C + eps)
    return xc0 * rstd0, rstd0


@triton.jit
def _load_heads(ptr, b, H, C, offs_h, offs_c, hc_mask, MMA: tl.constexpr, ACC: tl.constexpr,
                HILO: tl.constexpr):
    """Row b of a (B, H, C) operand as [H_PAD, C_PAD] in ACC, as the tensor cores carry it: the
    value rounded to the MMA dtype, or with HILO the sum of its hi and lo parts. Zero padding."""
    v = tl.load(ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :], mask=hc_mask, other=0.0).to(ACC)
    hi = v.to(MMA)
    if HILO:
        return hi.to(ACC) + (v - hi.to(ACC)).to(MMA).to(ACC)
    else:
        return hi.to(ACC)


@triton.jit
def _hi_or_lo(v, part, MMA: tl.constexpr, ACC: tl.constexpr, HILO: tl.constexpr):
    """Row r of the float operand v as its part[r]: 0, v rounded to MMA (hi); 1, the rounding's
    remainder (lo) with HILO, else zero."""
    hi = v.to(MMA)
    if HILO:
        lo = (v - hi.to(ACC)).to(MMA)
    else:
        lo = tl.zeros_like(hi)
    return tl.where((part == 0)[:, None], hi, lo)


@triton.jit
def _load_operand(ptr0, ptr1, b, H, C, offs_c, cmask, H_PAD: tl.constexpr, WHICH: tl.constexpr,
                  MMA: tl.constexpr, ACC: tl.constexpr, HILO: tl.constexpr):
    """The (B, H, C) operands ptr0 (and ptr1, when WHICH == 2) of row b stacked as one
    [H_PAD * 2 * WHICH, C_PAD] tensor-core operand: row (h * 2 + part) * WHICH + k holds part
    (0: hi, 1: lo; with HILO, else the rounded value and zero) of operand k's head h. One product
    with this operand yields every (head, part, operand) column; _fold adds the parts."""
    R: tl.constexpr = H_PAD * 2 * WHICH
    offs_r = tl.arange(0, R)
    k = offs_r % WHICH
    part = (offs_r // WHICH) % 2
    head = offs_r // (2 * WHICH)
    mask = (head < H)[:, None] & cmask[None, :]
    offs = (b * H + head[:, None]) * C + offs_c[None, :]
    if WHICH == 2:
        v = tl.load(tl.where((k == 0)[:, None], ptr0 + offs, ptr1 + offs), mask=mask, other=0.0).to(ACC)
    else:
        v = tl.load(ptr0 + offs, mask=mask, other=0.0).to(ACC)
    return _hi_or_lo(v, part, MMA, ACC, HILO)


@triton.jit
def _fold(t, AXIS_LEN: tl.constexpr):
    """[N, H_PAD * 2] -> [N, H_PAD]: the hi and lo columns of each head (adjacent) added."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], AXIS_LEN, 2]))
    return a + b


@triton.jit
def _fold_rows(t, H_PAD: tl.constexpr):
    """[H_PAD * 2, N] -> [H_PAD, N]: rows 2h and 2h + 1 (head h's hi and lo parts) added."""
    return tl.trans(_fold(tl.trans(t), H_PAD))


@triton.jit
def _stack_cols(v, MMA: tl.constexpr, ACC: tl.constexpr, HILO: tl.constexpr):
    """[N, H_PAD] in ACC -> ([N, H_PAD * 2] tensor-core operand: columns 2h, 2h + 1 = hi, lo of
    head h (lo zero without HILO), [N, H_PAD] the value they carry in ACC)."""
    hi = v.to(MMA)
    if HILO:
        lo = (v - hi.to(ACC)).to(MMA)
    else:
        lo = tl.zeros_like(hi)
    st = tl.reshape(tl.join(hi, lo), [v.shape[0], v.shape[1] * 2])
    return st, hi.to(ACC) + lo.to(ACC)


@triton.jit
def _split_range(pid, S, tps, M):
    b = (pid // S).to(tl.int64)
    s = pid % S
    n_start = s * tps
    n_end = tl.minimum(n_start + tps, M)
    return b, s, n_start, n_end


@triton.jit
def _token_stats(x, shift, cmask, C, eps, ACC: tl.constexpr):
    """(mean, rstd) of each token row of x (storage dtype), biased variance, in one pass over the
    registers (each element widened and consumed: no float32 copy of the tile stays live), with
    sums of x - shift: ``shift`` is the row's first element, so the single-pass variance
    sum((x - k)^2) / C - (sum(x - k) / C)^2 cancels only as much as (mean - k)^2 / var, about 1
    (a plain sum of squares would cancel (mean / std)^2)."""
    xs = tl.where(cmask[None, :], x.to(ACC) - shift[:, None], 0.0)
    d = tl.sum(xs, 1) / C
    var = tl.maximum(tl.sum(xs * xs, 1) / C - d * d, 0.0)
    return shift + d, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _stream_fwd_body(
    pid, eps,
    tok_ptr, s_tb, s_tm, s_tc,     # patch tokens (B, M, C), any strides, storage dtype
    M, C, H, S, tps,
    q0_ptr, s_q0b, s_q0c,          # token 0 (B, C), any strides and float dtype
    w_ptr,                         # (B, H, C) contiguous, any float dtype (rounded to MMA here)
    cp_ptr, s_cb, s_cm, s_cc,      # COPY: where each token tile is also written (B, M, C)
    z_ptr, lse_ptr, l_ptr,         # one split: z (B, H, C), lse (B, H); else partial z (B, S, H, C), max, sum
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, COPY: tl.constexpr, MMA: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
):
    ACC: tl.constexpr = z_ptr.dtype.element_ty
    W_HILO: tl.constexpr = (HILO & 1) != 0
    P_HILO: tl.constexpr = (HILO & 2) != 0
    b, s, n_start, n_end = _split_range(pid, S, tps, M)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)
    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, H_PAD)
    cmask = offs_c < C
    hmask = offs_h < H
    hc_mask = hmask[:, None] & cmask[None, :]
    wf = _load_heads(w_ptr, b, H, C, offs_h, offs_c, hc_mask, MMA, ACC, W_HILO)   # [H_PAD, C_PAD]
    # [C_PAD, 2 H_PAD]: columns (head, part)
    w_op_t = tl.trans(_load_operand(w_ptr, w_ptr, b, H, C, offs_c, cmask, H_PAD, 1, MMA, ACC, W_HILO))
    sw = tl.sum(wf, 1)                                                           # [H_PAD]

    # token 0 (first split only): the online softmax starts from its score with weight 1
    xh0, _ = _query_row(q0_ptr, b, s_q0b, s_q0c, offs_c, cmask, C, eps, ACC)
    s0 = tl.sum(wf * xh0[None, :], 1)
    first = s == 0
    m_i = tl.where(first, s0, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([H_PAD], ACC)
    # z accumulates as [2 H_PAD, C_PAD] (rows: head, part of the coefficients; token 0 in the hi
    # row), the tile the product's B operand (K = the tile's tokens)
    offs_r = tl.arange(0, 2 * H_PAD)
    acc = tl.zeros([2 * H_PAD, C_PAD], ACC) + tl.where(first & (offs_r % 2 == 0), 1.0, 0.0)[:, None] * xh0[None, :]
    csum = tl.zeros([H_PAD], ACC)                                                # sum_i (p r)_i mu_i

    for t in range(0, num_tiles):
        offs_n = n_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        xmask = nmask[:, None] & cmask[None, :]
        x = tl.load(tok_ptr + b * s_tb + offs_n[:, None] * s_tm + offs_c[None, :] * s_tc, mask=xmask, other=0.0)
        if COPY:
            tl.store(cp_ptr + b * s_cb + offs_n[:, None] * s_cm + offs_c[None, :] * s_cc, x, mask=xmask)
        shift = tl.load(tok_ptr + b * s_tb + offs_n * s_tm, mask=nmask, other=0.0).to(ACC)
        mean, rstd = _token_stats(x, shift, cmask, C, eps, ACC)
        sraw = _fold(tl.dot(x, w_op_t, out_dtype=ACC, input_precision=PREC), H_PAD)   # [BLOCK_N, H_PAD]
        scores = rstd[:, None] * (sraw - mean[:, None] * sw[None, :])
        scores = tl.where(nmask[:, None], tl.where(hmask[None, :], scores, 0.0), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        pr, prf = _stack_cols(p * rstd[:, None], MMA, ACC, P_HILO)               # [BLOCK_N, 2 H_PAD]
        alpha2 = tl.reshape(tl.join(alpha, alpha), [2 * H_PAD])
        acc = tl.dot(tl.trans(pr), x, acc=acc * alpha2[:, None], out_dtype=ACC, input_precision=PREC)
        csum = csum * alpha + tl.sum(prf * mean[:, None], 0)
        m_i = m_new

    z = _fold_rows(acc, H_PAD) - csum[:, None]
    if SPLIT:
        row = (b * S + s) * H
        tl.store(z_ptr + (row + offs_h[:, None]) * C + offs_c[None, :], z, mask=hc_mask)
        tl.store(lse_ptr + row + offs_h, m_i, mask=hmask)
        tl.store(l_ptr + row + offs_h, l_i, mask=hmask)
    else:
        tl.store(z_ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :], z / l_i[:, None], mask=hc_mask)
        tl.store(lse_ptr + b * H + offs_h, m_i + tl.log(l_i), mask=hmask)


@triton.jit
def _stream_bwd_body(
    pid, eps,
    tok_ptr, s_tb, s_tm, s_tc,     # patch tokens (B, M, C), any strides, storage dtype
    M, C, H, S, tps,
    q0_ptr, s_q0b, s_q0c,          # token 0 (B, C)
    w_ptr, dz_ptr,                 # (B, H, C) contiguous, any float dtype (rounded to MMA here)
    z_ptr, lse_ptr,                # (B, H, C), (B, H) contiguous, ACC
    do_ptr, s_ob, s_om, s_oc,      # ADD_DOUT: a gradient added to every token's (B, M, C)
    dx_ptr, s_xb, s_xm, s_xc,      # token gradients (B, M, C), storage dtype
    dq0_ptr, s_dqb,                # token 0's gradient (B, C), unit column stride
    dw_ptr,                        # one split: dw (B, H, C); else partial dw (B, S, H, C), ACC
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, ADD_DOUT: tl.constexpr, MMA: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
    C_CHUNK: tl.constexpr,
):
    ACC: tl.constexpr = z_ptr.dtype.element_ty
    W_HILO: tl.constexpr = (HILO & 1) != 0
    P_HILO: tl.constexpr = (HILO & 2) != 0
    b, s, n_start, n_end = _split_range(pid, S, tps, M)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)
    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, H_PAD)
    cmask = offs_c < C
    hmask = offs_h < H
    hc_mask = hmask[:, None] & cmask[None, :]
    wf = _load_heads(w_ptr, b, H, C, offs_h, offs_c, hc_mask, MMA, ACC, W_HILO)
    dzf = _load_heads(dz_ptr, b, H, C, offs_h, offs_c, hc_mask, MMA, ACC, W_HILO)
    # [C_PAD, H_PAD * 4]: columns (h, part, k) with k = 0 for w, 1 for dz: the products x . w and
    # x . dz of every head in one
    wdz_t = tl.trans(_load_operand(w_ptr, dz_ptr, b, H, C, offs_c, cmask, H_PAD, 2, MMA, ACC, W_HILO))
    z = tl.load(z_ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :], mask=hc_mask, other=0.0)
    sw = tl.sum(wf, 1)
    sdz = tl.sum(dzf, 1)
    dzz = tl.sum(dzf * z, 1)              # dz . z with the dz the products carry: sum_i ds_hi = 0
    lse = tl.load(lse_ptr + b * H + offs_h, mask=hmask, other=0.0)

    # token 0 (first split only), in ACC on the CUDA cores
    first = s == 0
    xh0, rstd0 = _query_row(q0_ptr, b, s_q0b, s_q0c, offs_c, cmask, C, eps, ACC)
    a0 = tl.where(hmask, tl.exp(tl.sum(wf * xh0[None, :], 1) - lse), 0.0)
    ds0 = a0 * (tl.sum(dzf * xh0[None, :], 1) - dzz)
    # with no patch tokens the softmax is constant (a0 = 1): its gradient is exactly zero
    ds0 = tl.where(M > 0, ds0, 0.0)
    dxh0 = tl.sum(a0[:, None] * dzf + ds0[:, None] * wf, 0)                      # [C_PAD]
    dx0 = rstd0 * (dxh0 - tl.sum(dxh0, 0) / C - xh0 * (tl.sum(dxh0 * xh0, 0) / C))
    tl.store(dq0_ptr + b * s_dqb + offs_c, dx0.to(dq0_ptr.dtype.element_ty), mask=cmask & first)
    # dw accumulates as [H_PAD * 2, C_PAD] (rows: head, part of ds r); token 0 in the hi rows
    ds0_2 = tl.reshape(tl.join(ds0, tl.zeros_like(ds0)), [2 * H_PAD])
    dwacc = tl.where(first, ds0_2, 0.0)[:, None] * xh0[None, :] + tl.zeros([2 * H_PAD, C_PAD], ACC)
    dwc = tl.zeros([H_PAD], ACC)
    offs_k = tl.arange(0, C_CHUNK)
    offs_j = tl.arange(0, 4 * H_PAD)
    jhead = offs_j // 4
    jk = offs_j % 2

    for t in range(0, num_tiles):
        offs_n = n_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        xmask = nmask[:, None] & cmask[None, :]
        x = tl.load(tok_ptr + b * s_tb + offs_n[:, None] * s_tm + offs_c[None, :] * s_tc, mask=xmask, other=0.0)
        shift = tl.load(tok_ptr + b * s_tb + offs_n * s_tm, mask=nmask, other=0.0).to(ACC)
        mean, rstd = _token_stats(x, shift, cmask, C, eps, ACC)
        # [BLOCK_N, H_PAD, 2 (part), 2 (k)]: the parts added, x . w and x . dz per head
        both = tl.reshape(tl.dot(x, wdz_t, out_dtype=ACC, input_precision=PREC), [BLOCK_N, H_PAD, 2, 2])
        sraw2, graw2 = tl.split(both)                                            # [BLOCK_N, H_PAD, 2]
        score = rstd[:, None] * (tl.sum(sraw2, 2) - mean[:, None] * sw[None, :])
        g = rstd[:, None] * (tl.sum(graw2, 2) - mean[:, None] * sdz[None, :])
        valid = nmask[:, None] & hmask[None, :]
        a = tl.where(valid, tl.exp(tl.where(valid, score, 0.0) - lse[None, :]), 0.0)
        ds = a * (g - dzz[None, :])
        # dw_h += sum_i (ds r)_hi x_i - (ds r)_hi mu_i
        dsp, dspf = _stack_cols(ds * rstd[:, None], MMA, ACC, P_HILO)            # [BLOCK_N, 2 H_PAD]
        dwacc = tl.dot(tl.trans(dsp), x, acc=dwacc, out_dtype=ACC, input_precision=PREC)
        dwc += tl.sum(dspf * mean[:, None], 0)
        # dx = r * dxh - k1 - k2 r (x - mu), dxh = sum_h a dz_h + ds w_h: the coefficients rounded
        # once (their error is projected like dx's own rounding), the rank-H update on the tensor
        # cores, C_CHUNK columns at a time (the tile's chunk re-read from the cache)
        ar = (a * rstd[:, None]).to(MMA)
        dsr = (ds * rstd[:, None]).to(MMA)
        arf = ar.to(ACC)
        dsrf = dsr.to(ACC)
        k1 = tl.sum(arf * sdz[None, :] + dsrf * sw[None, :], 1) / C
        k2r = tl.sum(arf * g + dsrf * score, 1) / C * rstd
        k0 = k2r * mean - k1
        # K operand [BLOCK_N, H_PAD * 4], columns (h, part, k): dsr for w (k = 0), ar for dz
        coef = tl.reshape(tl.join(tl.join(dsr, dsr), tl.join(ar, ar)), [BLOCK_N, 4 * H_PAD])
        for c0 in range(0, C, C_CHUNK):
            offs_cc = c0 + offs_k
            ccmask = offs_cc < C
            chunk_mask = nmask[:, None] & ccmask[None, :]
            wdz_c = _load_operand_cols(w_ptr, dz_ptr, b, H, C, offs_cc, ccmask, jhead, jk, offs_j, MMA, ACC,
                                       W_HILO)                                   # [4 H_PAD, C_CHUNK]
            xc = tl.load(tok_ptr + b * s_tb + offs_n[:, None] * s_tm + offs_cc[None, :] * s_tc, mask=chunk_mask,
                         other=0.0)
            dx = tl.dot(coef, wdz_c, out_dtype=ACC, input_precision=PREC)
            dx = dx - k2r[:, None] * xc.to(ACC) + k0[:, None]
            if ADD_DOUT:
                dx += tl.load(do_ptr + b * s_ob + offs_n[:, None] * s_om + offs_cc[None, :] * s_oc,
                              mask=chunk_mask, other=0.0).to(ACC)
            tl.store(dx_ptr + b * s_xb + offs_n[:, None] * s_xm + offs_cc[None, :] * s_xc,
                     dx.to(dx_ptr.dtype.element_ty), mask=chunk_mask)

    dw = _fold_rows(dwacc, H_PAD) - dwc[:, None]
    if SPLIT:
        tl.store(dw_ptr + ((b * S + s) * H + offs_h[:, None]) * C + offs_c[None, :], dw, mask=hc_mask)
    else:
        tl.store(dw_ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :], dw, mask=hc_mask)


@triton.jit
def _load_operand_cols(w_ptr, dz_ptr, b, H, C, offs_cc, ccmask, jhead, jk, offs_j, MMA: tl.constexpr,
                       ACC: tl.constexpr, HILO: tl.constexpr):
    """Columns offs_cc of the [H_PAD * 4, C] operand of _load_operand(w, dz, WHICH=2)."""
    jpart = (offs_j // 2) % 2
    mask = (jhead < H)[:, None] & ccmask[None, :]
    offs = (b * H + jhead[:, None]) * C + offs_cc[None, :]
    v = tl.load(tl.where((jk == 0)[:, None], w_ptr + offs, dz_ptr + offs), mask=mask, other=0.0).to(ACC)
    return _hi_or_lo(v, jpart, MMA, ACC, HILO)


# ---------------------------------------------------------------------------------------------
# kernels: a 1-D grid over the programs of one problem, or of two (G0 programs of problem 0 first)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _stream_fwd_kernel(
    G0,
    tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, eps0, q00, s_q0b0, s_q0c0, w0, cp0, s_cb0, s_cm0, s_cc0,
    z0, lse0, l0,
    tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, eps1, q01, s_q0b1, s_q0c1, w1, cp1, s_cb1, s_cm1, s_cc1,
    z1, lse1, l1,
    BLOCK_N0: tl.constexpr, C_PAD0: tl.constexpr, H_PAD0: tl.constexpr, SPLIT0: tl.constexpr,
    BLOCK_N1: tl.constexpr, C_PAD1: tl.constexpr, H_PAD1: tl.constexpr, SPLIT1: tl.constexpr,
    TWO: tl.constexpr, COPY: tl.constexpr, MMA: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _stream_fwd_body(pid, eps0, tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, q00, s_q0b0, s_q0c0, w0,
                         cp0, s_cb0, s_cm0, s_cc0, z0, lse0, l0,
                         BLOCK_N0, C_PAD0, H_PAD0, SPLIT0, COPY, MMA, PREC, HILO)
    elif TWO:
        _stream_fwd_body(pid - G0, eps1, tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, q01, s_q0b1, s_q0c1, w1,
                         cp1, s_cb1, s_cm1, s_cc1, z1, lse1, l1,
                         BLOCK_N1, C_PAD1, H_PAD1, SPLIT1, COPY, MMA, PREC, HILO)


@triton.jit
def _stream_bwd_kernel(
    G0,
    tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, eps0, q00, s_q0b0, s_q0c0, w0, dz0, z0, lse0,
    do0, s_ob0, s_om0, s_oc0, dx0, s_xb0, s_xm0, s_xc0, dq00, s_dqb0, dw0,
    tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, eps1, q01, s_q0b1, s_q0c1, w1, dz1, z1, lse1,
    do1, s_ob1, s_om1, s_oc1, dx1, s_xb1, s_xm1, s_xc1, dq01, s_dqb1, dw1,
    BLOCK_N0: tl.constexpr, C_PAD0: tl.constexpr, H_PAD0: tl.constexpr, SPLIT0: tl.constexpr,
    BLOCK_N1: tl.constexpr, C_PAD1: tl.constexpr, H_PAD1: tl.constexpr, SPLIT1: tl.constexpr,
    TWO: tl.constexpr, ADD_DOUT: tl.constexpr, MMA: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
    C_CHUNK0: tl.constexpr, C_CHUNK1: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < G0:
        _stream_bwd_body(pid, eps0, tok0, s_tb0, s_tm0, s_tc0, M0, C0, H0, S0, tps0, q00, s_q0b0, s_q0c0, w0, dz0,
                         z0, lse0, do0, s_ob0, s_om0, s_oc0, dx0, s_xb0, s_xm0, s_xc0, dq00, s_dqb0, dw0,
                         BLOCK_N0, C_PAD0, H_PAD0, SPLIT0, ADD_DOUT, MMA, PREC, HILO,
                         C_CHUNK0)
    elif TWO:
        _stream_bwd_body(pid - G0, eps1, tok1, s_tb1, s_tm1, s_tc1, M1, C1, H1, S1, tps1, q01, s_q0b1, s_q0c1, w1,
                         dz1, z1, lse1, do1, s_ob1, s_om1, s_oc1, dx1, s_xb1, s_xm1, s_xc1, dq01, s_dqb1, dw1,
                         BLOCK_N1, C_PAD1, H_PAD1, SPLIT1, ADD_DOUT, MMA, PREC, HILO,
                         C_CHUNK1)


@triton.jit
def _fwd_combine_kernel(
    part_z_ptr,           # (B, S, H, C) unnormalised partial z
    part_m_ptr,           # (B, S, H) running max per split
    part_l_ptr,           # (B, S, H) softmax denominator per split
    z_ptr,                # (B, H, C)
    lse_ptr,              # (B, H)
    C, H, S,
    S_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    smask = offs_s < S
    m = tl.load(part_m_ptr + (b * S + offs_s) * H + h, mask=smask, other=float("-inf"))
    den = tl.load(part_l_ptr + (b * S + offs_s) * H + h, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    scale = tl.exp(m - m_max)                                                   # 0 on padded splits
    denom = tl.sum(den * scale, 0)
    tl.store(lse_ptr + b * H + h, m_max + tl.log(denom))
    coef = scale / denom
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        part = tl.load(part_z_ptr + ((b * S + offs_s[:, None]) * H + h) * C + offs_c[None, :],
                       mask=smask[:, None] & cmask[None, :], other=0.0)
        tl.store(z_ptr + (b * H + h) * C + offs_c, tl.sum(part * coef[:, None], 0), mask=cmask)


@triton.jit
def _dw_combine_kernel(
    part_dw_ptr,          # (B, S, H * C) partial dw per split
    dw_ptr,               # (B, H * C)
    HC, S,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HC
    total = tl.load(part_dw_ptr + b * S * HC + offs, mask=mask, other=0.0)
    for s in range(1, S):                                                       # fixed order
        total += tl.load(part_dw_ptr + (b * S + s) * HC + offs, mask=mask, other=0.0)
    tl.store(dw_ptr + b * HC + offs, total, mask=mask)


# ---------------------------------------------------------------------------------------------
# configurations, occupancy and the split planner
# ---------------------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _pad_heads(h: int) -> int:
    """H_PAD: every stacked operand has 2 * H_PAD >= 16 rows (the tensor cores' smallest tile)."""
    return max(8, triton.next_power_of_2(h))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def mma_dtype(dtype: torch.dtype) -> torch.dtype:
    """The tensor cores' operand dtype for tokens of ``dtype``: the tokens' own for 16-bit
    tokens, the accumulation dtype otherwise (float32 and float64 take IEEE products)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else _acc_dtype(dtype)


class StreamConfig(NamedTuple):
    block_n: int
    c_chunk: int
    num_warps: int
    num_stages: int


#: BLOCK_N by (pass, C_PAD) for 16-bit tokens at four warps, read off ptxas for sm_90 with Triton
#: 3.6 and 3.8 (tests/test_triton_budgets.py checks them): no spills and two or more programs
#: resident per SM. The score product (K = C) is an mma.sync whose A operand, the tile, spans all
#: of K in each warp's registers: that, not the tile's size, caps BLOCK_N at wide C (a 32-token
#: tile spills at C_PAD 512 and the backward at C_PAD 256).
_HALF_BLOCK_N = {"fwd": {16: 64, 32: 64, 64: 64, 128: 64, 256: 64, 512: 16, 1024: 16},
                 "bwd": {16: 32, 32: 32, 64: 32, 128: 32, 256: 32, 512: 16, 1024: 16}}


#: The widest tokens (C_PAD) the 16-bit tiles are chosen for: wider 16-bit tokens are beyond the
#: backend's limits (backends/triton/limits.py).
HALF_MAX_WIDTH = min(max(table) for table in _HALF_BLOCK_N.values())


def stream_config(which: str, C: int, dtype: torch.dtype, block_n: Optional[int] = None) -> StreamConfig:
    """The streaming kernels' token tile, the backward's column chunk for dx, warps and stages,
    for tokens of width C and ``dtype`` (``which``: "fwd" or "bwd")."""
    c_pad = _pad(C)
    if dtype in (torch.float16, torch.bfloat16):
        bn = _HALF_BLOCK_N[which][c_pad]
    else:
        # IEEE products on the CUDA cores: the float32 / float64 tile stays in registers
        elem = 8 if dtype == torch.float64 else 4
        bn = max(16, min(64, (4096 if which == "fwd" else 2048) // (c_pad * elem // 4)))
    if block_n is not None:
        bn = block_n
    return StreamConfig(bn, min(64, c_pad), 4, 1)


def stream_shared_bytes(which: str, C: int, H: int, dtype: torch.dtype) -> int:
    """An upper bound of the shared memory, in bytes, one program of the streaming kernel ``which``
    ("fwd" or "bwd") takes for H heads over tokens of width C in ``dtype``, at the launcher's
    config: every operand of its products staged at once, in the operand dtype, plus 2 KiB. The
    operands: the token tile (twice for 16-bit tokens, as the tensor cores' A operand of the
    scores and B operand of the weighted sums; once for the IEEE products of float32 and float64),
    the stacked absorbed query [C_PAD, 2 H_PAD] (with dz, [C_PAD, 4 H_PAD], backward), the softmax
    coefficients [2 H_PAD, BLOCK_N], and the backward's dx operands [BLOCK_N, 4 H_PAD] and
    [4 H_PAD, C_CHUNK]. A launch of two problems takes the larger of theirs. The compiler's
    figures for sm_90 stay within it (tests/test_triton_limits.py compares them); the backend's
    limits compare it with the GPU's shared memory per block."""
    cfg = stream_config(which, C, dtype)
    c_pad, bn, h2 = _pad(C), cfg.block_n, 2 * _pad_heads(H)
    tiles = 2 if dtype in (torch.float16, torch.bfloat16) else 1
    if which == "fwd":
        elements = tiles * bn * c_pad + h2 * c_pad + h2 * bn
    else:
        elements = tiles * bn * c_pad + 2 * h2 * c_pad + h2 * bn + 2 * h2 * bn + 2 * h2 * cfg.c_chunk
    return elements * mma_dtype(dtype).itemsize + 2048


def ctas_per_sm(which: str, C: int, dtype: torch.dtype) -> int:
    """Programs resident per SM the planner assumes (the configs are sized for two)."""
    return 2


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class Problem(NamedTuple):
    """One row of the problem table: B rows of M patch tokens of width C (elem bytes each),
    tiled by block_n, H heads."""
    B: int
    M: int
    C: int
    block_n: int
    elem: int = 2
    H: int = 8


class Plan(NamedTuple):
    splits: Tuple[int, ...]              # S per problem
    tokens_per_split: Tuple[int, ...]    # a multiple of the problem's block_n
    programs: int                        # total programs of the launch


def _program_overhead(p: Problem, split: bool) -> int:
    """Bytes a program moves besides its tokens: its row's absorbed query w (and dz) read and its
    float32 z (dw) written, H * C * 4 each, plus with splits the partial read back by the combine."""
    return (3 if split else 2) * p.H * p.C * 4


def _split(p: Problem, S: int) -> Tuple[int, int]:
    """(S, tokens per split) for about S splits of p: tile-aligned, every split non-empty."""
    if p.M == 0:
        return 1, p.block_n
    S = max(1, min(S, triton.cdiv(p.M, p.block_n)))
    tps = triton.cdiv(triton.cdiv(p.M, S), p.block_n) * p.block_n
    return triton.cdiv(p.M, tps), tps


@functools.lru_cache(maxsize=4096)
def _split_options(p: Problem) -> Tuple[Tuple[int, int], ...]:
    """Every distinct (S, tokens per split) of p up to MAX_SPLITS splits."""
    seen = {}
    for S in range(1, MAX_SPLITS + 1):
        S_, tps = _split(p, S)
        seen[tps] = (S_, tps)
    return tuple(sorted(seen.values()))


@functools.lru_cache(maxsize=4096)
def _plan(problems: Tuple[Problem, ...], sm_count: int, ctas: int) -> Plan:
    slots = max(1, sm_count * ctas)
    best = None
    options = [_split_options(p) for p in problems]
    for combo in itertools.product(*options):
        programs = sum(p.B * S for p, (S, _) in zip(problems, combo))
        work = [min(tps, max(p.M, 1)) * p.C * p.elem for p, (_, tps) in zip(problems, combo)]
        biggest = max(w + _program_overhead(p, S > 1) for w, p, (S, _) in zip(work, problems, combo))
        # waves of the largest program; then the most even programs; then the fewest
        key = (triton.cdiv(programs, slots) * biggest, max(work) / min(work), programs)
        if best is None or key < best[0]:
            best = (key, combo, programs)
    _, combo, programs = best
    return Plan(tuple(S for S, _ in combo), tuple(t for _, t in combo), programs)


def plan_splits(problems: Sequence[Problem], sm_count: int, ctas: int = 2,
                num_splits: Optional[int] = None) -> Plan:
    """Token splits for a launch of one or two problems.

    Every split is non-empty and tile-aligned. Among every combination of split counts (up to
    MAX_SPLITS per problem) the planner takes the one with the smallest modelled time, ceil(programs
    / slots) waves of the largest program's bytes (plus a fixed per-program overhead), slots =
    sm_count * ctas resident programs, each program's bytes counting its row's O(H * C) operands and
    partials (``_program_overhead``); ties go to the most even programs across the problems, then
    to the fewest programs. A forced ``num_splits`` applies to every
    problem (clipped so that no split is empty).
    """
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        parts = [_split(p, num_splits) for p in problems]
        return Plan(tuple(S for S, _ in parts), tuple(t for _, t in parts),
                    sum(p.B * S for p, (S, _) in zip(problems, parts)))
    return _plan(tuple(problems), sm_count, ctas)


def _forced_splits(num_splits: Optional[int]) -> Optional[int]:
    if num_splits is not None:
        return num_splits
    env = os.environ.get(SPLITS_ENV, "").strip()
    if not env:
        return None
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"{SPLITS_ENV}={env!r} must be a positive integer") from None


def launch_plan(problems: Sequence[Problem], device: torch.device, num_splits: Optional[int] = None) -> Plan:
    """The plan of a launch on ``device``: the planner for a GPU's SM count; on the CPU (the
    interpreter) one program per row unless splits are forced."""
    forced = _forced_splits(num_splits)
    if forced is not None or device.type != "cuda":
        return plan_splits(problems, 1, 1, forced if forced is not None else 1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return plan_splits(problems, _sm_count(index), 2)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate comes from here (tests poison them through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_args(x_tokens: Tensor, stand_in: Tensor):
    """The tokens' pointer and strides; ``stand_in`` (never read) when there are no tokens."""
    if x_tokens.shape[1] == 0:
        return stand_in, (0, 0, 0)
    return x_tokens, tuple(x_tokens.stride())


def _precision(dtype: torch.dtype) -> str:
    return "ieee"


#: Environment knob: "0" rounds the absorbed query, dz and the softmax coefficients to the 16-bit
#: operand dtype once instead of carrying them as hi + lo pairs (fewer products, less accurate).
HILO_ENV = "CROSSVIT_KERNELS_TRITON_HILO"


def hilo(dtype: torch.dtype) -> int:
    """Which float32 operands of the token products are carried as bfloat16/float16 hi + lo pairs
    for 16-bit tokens (the token tile itself is exact): bit 0 the absorbed query w and dz, bit 1
    the softmax coefficients. 0 for float32 / float64 tokens (their products are IEEE)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0
    env = os.environ.get(HILO_ENV, "").strip()
    return int(env) if env else 3


class FwdProblem(NamedTuple):
    """Arguments of one forward problem (see _stream_fwd_body)."""
    tokens: Tensor       # (B, M, C) view
    q0: Tensor           # (B, C)
    w: Tensor            # (B, H, C) contiguous
    copy: Optional[Tensor]   # (B, M, C) destination of COPY, or None
    eps: float
    block_n: int


def _fwd_problem_args(p: FwdProblem, S: int, tps: int, acc: torch.dtype):
    """(runtime args, outputs) of one problem: outputs z, lse (and the partials when split)."""
    B, M, C = p.tokens.shape
    H = p.w.shape[1]
    device = p.q0.device
    z = _empty((B, H, C), acc, device)
    lse = _empty((B, H), acc, device)
    if S > 1:
        part = (_empty((B, S, H, C), acc, device), _empty((B, S, H), acc, device), _empty((B, S, H), acc, device))
    else:
        part = (z, lse, lse)
    tok, ts = _token_args(p.tokens, p.q0)
    cp, cs = (p.copy, tuple(p.copy.stride())) if p.copy is not None and M > 0 else (tok, ts)
    args = [tok, *ts, M, C, H, S, tps, float(p.eps), p.q0, p.q0.stride(0), p.q0.stride(1), p.w, cp, *cs, *part]
    return args, (z, lse, part)


def stream_forward_launch(problems: Sequence[FwdProblem], num_splits: Optional[int] = None,
                          copy: bool = False):
    """One launch of the streaming forward over one or two problems: (plan, [(z, lse, partials)]
    per problem). With one split z and lse are final; with several the partials (partial z,
    running max, sum) wait for a combine (the core contract's combine kernel, or the fusion
    stage's epilogue), and z, lse are allocated for it."""
    dtype = problems[0].tokens.dtype
    acc = _acc_dtype(dtype)
    device = problems[0].q0.device
    plan = launch_plan([Problem(p.tokens.shape[0], p.tokens.shape[1], p.tokens.shape[2], p.block_n,
                                p.tokens.element_size(), p.w.shape[1]) for p in problems], device, num_splits)
    argsets, outs = [], []
    for p, S, tps in zip(problems, plan.splits, plan.tokens_per_split):
        a, o = _fwd_problem_args(p, S, tps, acc)
        argsets.append(a)
        outs.append(o)
    two = len(problems) == 2
    G0 = problems[0].tokens.shape[0] * plan.splits[0]
    meta = {}
    for i in range(2):
        p = problems[min(i, len(problems) - 1)]
        meta[f"BLOCK_N{i}"] = p.block_n
        meta[f"C_PAD{i}"] = _pad(p.tokens.shape[2])
        meta[f"H_PAD{i}"] = _pad_heads(p.w.shape[1])
        meta[f"SPLIT{i}"] = plan.splits[min(i, len(problems) - 1)] > 1
    cfg = stream_config("fwd", max(p.tokens.shape[2] for p in problems), dtype)
    with _device_guard(problems[0].q0):
        _stream_fwd_kernel[(plan.programs,)](
            G0, *argsets[0], *argsets[-1], **meta, TWO=two, COPY=copy, MMA=_TL_TYPES[mma_dtype(dtype)],
            PREC=_precision(dtype), HILO=hilo(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return plan, outs


def stream_forward(problems: Sequence[FwdProblem], num_splits: Optional[int] = None,
                   copy: bool = False) -> List[Tuple[Tensor, Tensor]]:
    """The streaming forward with its combine launches: [(z, lse)] per problem."""
    plan, outs = stream_forward_launch(problems, num_splits, copy)
    results = []
    with _device_guard(problems[0].q0):
        for p, S, (z, lse, part) in zip(problems, plan.splits, outs):
            if S > 1:
                B, M, C = p.tokens.shape
                H = p.w.shape[1]
                _fwd_combine_kernel[(B, H)](part[0], part[1], part[2], z, lse, C, H, S,
                                            S_PAD=triton.next_power_of_2(S), BLOCK_C=min(128, _pad(C)))
            results.append((z, lse))
    return results


# ---------------------------------------------------------------------------------------------
# launchers of the core contract (crossvit_kernels.backends.base; inputs validated by the op)
# ---------------------------------------------------------------------------------------------

def cross_attention_core_forward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float, *,
                                 num_splits: Optional[int] = None, block_n: Optional[int] = None):
    """-> (z (B, H, C), lse (B, H)) in the accumulation dtype: one launch (and a combine launch
    when the token axis is split). ``num_splits`` forces the number of token splits (default: the
    planner for the GPU, one on the CPU), ``block_n`` the token tile."""
    dtype = x_tokens.dtype
    cfg = stream_config("fwd", x_cls.shape[1], dtype, block_n)
    (z, lse), = stream_forward([FwdProblem(x_tokens, x_cls, w.contiguous(), None, eps, cfg.block_n)],
                               num_splits)
    return z, lse


class BwdProblem(NamedTuple):
    """Arguments of one backward problem (see _stream_bwd_body)."""
    tokens: Tensor       # (B, M, C) view
    q0: Tensor           # (B, C)
    w: Tensor            # (B, H, C) contiguous
    dz: Tensor           # (B, H, C) contiguous
    z: Tensor            # (B, H, C) contiguous, ACC
    lse: Tensor          # (B, H) contiguous, ACC
    dout: Optional[Tensor]   # (B, M, C) added to the token gradients (ADD_DOUT), or None
    dx: Tensor           # (B, M, C) the token gradients' destination (any strides)
    dq0: Tensor          # (B, C) token 0's gradient, unit column stride
    eps: float
    block_n: int


def bwd_problem_args(p: BwdProblem, S: int, tps: int) -> Tuple[list, Tensor, Tensor]:
    """(runtime args of _stream_bwd_body after (pid, eps) -- with eps at the kernel's place --,
    dw (B, H, C), the buffer the kernel writes dw or its partials (B, S, H, C) to)."""
    B, M, C = p.tokens.shape
    H = p.w.shape[1]
    acc = p.z.dtype
    dw = _empty((B, H, C), acc, p.q0.device)
    part = _empty((B, S, H, C), acc, p.q0.device) if S > 1 else dw
    tok, ts = _token_args(p.tokens, p.q0)
    do, dos = (p.dout, tuple(p.dout.stride())) if p.dout is not None and M > 0 else (tok, ts)
    dx, dxs = (p.dx, tuple(p.dx.stride())) if M > 0 else (p.dq0, (0, 0, 0))
    args = [tok, *ts, M, C, H, S, tps, float(p.eps), p.q0, p.q0.stride(0), p.q0.stride(1), p.w, p.dz, p.z, p.lse,
            do, *dos, dx, *dxs, p.dq0, p.dq0.stride(0), part]
    return args, dw, part


def cross_attention_core_backward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                  dz: Tensor, eps: float, *, num_splits: Optional[int] = None,
                                  block_n: Optional[int] = None):
    """-> (dx_cls (B, C) in x_cls's dtype, dx_tokens (B, M, C) contiguous in x_tokens's dtype,
    dw (B, H, C) in the accumulation dtype). Keyword arguments as in the forward."""
    B, C = x_cls.shape
    M, H = x_tokens.shape[1], w.shape[1]
    dtype, device = x_tokens.dtype, x_cls.device
    acc = _acc_dtype(dtype)
    cfg = stream_config("bwd", C, dtype, block_n)
    plan = launch_plan([Problem(B, M, C, cfg.block_n, x_tokens.element_size(), H)], device, num_splits)
    S, tps = plan.splits[0], plan.tokens_per_split[0]
    dx_cls = _empty((B, C), x_cls.dtype, device)
    dx_tokens = _empty((B, M, C), dtype, device)
    prob = BwdProblem(x_tokens, x_cls, w.contiguous(), dz.contiguous(), z.to(acc).contiguous(),
                      lse.to(acc).contiguous(), None, dx_tokens, dx_cls, eps, cfg.block_n)
    args, dw, part_dw = bwd_problem_args(prob, S, tps)
    meta = dict(BLOCK_N0=cfg.block_n, C_PAD0=_pad(C), H_PAD0=_pad_heads(H), SPLIT0=S > 1, C_CHUNK0=cfg.c_chunk,
                BLOCK_N1=cfg.block_n, C_PAD1=_pad(C), H_PAD1=_pad_heads(H), SPLIT1=S > 1, C_CHUNK1=cfg.c_chunk)
    with _device_guard(x_cls):
        _stream_bwd_kernel[(plan.programs,)](
            B * S, *args, *args, **meta, TWO=False, ADD_DOUT=False, MMA=_TL_TYPES[mma_dtype(dtype)],
            PREC=_precision(dtype), HILO=hilo(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if S > 1:
            block = 1024
            _dw_combine_kernel[(B, triton.cdiv(H * C, block))](part_dw, dw, H * C, S, BLOCK=block)
    return dx_cls, dx_tokens, dw
