"""Triton kernels of the cross-attention core (docs/design.md, section 2).

Per batch row b the tokens are x_0 = x_cls[b] and x_i = x_tokens[b, i - 1] (i = 1..M), N = 1 + M of
them, each of width C. The math is ``crossvit_kernels.backends.pytorch`` (the executable spec):

forward   one pass over the tokens. A program loads a [BLOCK_N, C] tile, computes the LayerNorm
          statistics in registers, the scores of all heads (computed as the
          [H, C] x [C, BLOCK_N] product, the transposed [BLOCK_N, C] x [C, H]), updates an online
          softmax per head and accumulates z (a [H, BLOCK_N] x [BLOCK_N, C] product). Each token
          is read exactly once.
backward  one pass over the tokens: xh with its statistics recomputed, the probabilities from the
          saved log-sum-exp; dx written once per token; dw accumulated per program.

When the batch alone cannot fill the GPU the token axis is split across programs (flash-decoding
style): grid (B, S); each split writes its running max, its sum and its unnormalised partial z,
and a small combine kernel merges the S splits in a fixed order. In the backward each split writes
a partial dw and a second small kernel sums them in a fixed order. No atomics anywhere: the same
inputs give the same bits.

H is padded to a power of two >= 16 and C to a power of two >= 16 (masked), so every tl.dot has
legal operand shapes on a real GPU. Products use IEEE float32 (float64 for float64 inputs); for
float16/bfloat16 inputs they use TF32 tensor cores (10-bit mantissa, finer than the inputs').

Shared memory: the compiler stages every tl.dot operand in shared memory, and at the widest
CrossViT widths (C = 768, padded to 1024) the backward's operands would not fit. There (and
wherever the planner's estimate exceeds the device's limit) the kernels run with HEAD_LOOP: the
products with a K dimension of H (scores, dz.xh and the rank-H update of dxh) go one head at a
time on the CUDA cores, and only the z / dw products stay on tl.dot. The compile-only tests
(tests/sm90.py) compile the kernels for an H100 without a GPU and check the estimate.

eps reaches the kernels as a float32 scalar (Triton's type for Python floats), also for float64
inputs: its rounding moves rstd by about 1e-14 relative.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["cross_attention_core_forward", "cross_attention_core_backward"]

#: Environment knob: force the number of token splits (an int >= 1) for every launch.
SPLITS_ENV = "CROSSVIT_KERNELS_TRITON_SPLITS"
#: A split gets at least this many tokens (each program also reads w, z, dz: H*C values).
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
#: Split boundaries are multiples of this (>= the largest BLOCK_N), so tiles stay aligned.
SPLIT_ALIGN = 64


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_patch_tokens(x_tok_ptr, b, offs_n, offs_c, n_end, C, stride_tok_b, stride_tok_m, stride_tok_c):
    """Tokens offs_n of row b that are patch tokens (1 <= i < n_end) as a [BLOCK_N, C_PAD] tile in
    the input dtype, zero elsewhere (token 0, the CLS row, included)."""
    cmask = offs_c < C
    tok_mask = (offs_n > 0) & (offs_n < n_end)
    return tl.load(x_tok_ptr + b * stride_tok_b + (offs_n - 1)[:, None] * stride_tok_m
                   + offs_c[None, :] * stride_tok_c,
                   mask=tok_mask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _add_cls_row(x, x_cls_ptr, b, offs_n, offs_c, C, stride_cls_b, stride_cls_c, FIRST_TILE):
    """x plus the CLS row in row 0 when the tile starts at token 0 (x holds zero there)."""
    if FIRST_TILE:
        # only the first tile of the first split holds token 0 (the CLS row)
        cls_mask = (offs_n == 0)[:, None] & (offs_c < C)[None, :]
        x_cls = tl.load(x_cls_ptr + b * stride_cls_b + offs_c[None, :] * stride_cls_c + offs_n[:, None] * 0,
                        mask=cls_mask, other=0.0).to(x.dtype)
        x = x + x_cls
    return x


@triton.jit
def _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                     stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                     FIRST_TILE, ACC_TY: tl.constexpr):
    """Tokens offs_n (0 = x_cls) of row b as an ACC_TY [BLOCK_N, C_PAD] tile, zero outside."""
    x = _load_patch_tokens(x_tok_ptr, b, offs_n, offs_c, n_end, C, stride_tok_b, stride_tok_m,
                           stride_tok_c).to(ACC_TY)
    return _add_cls_row(x, x_cls_ptr, b, offs_n, offs_c, C, stride_cls_b, stride_cls_c, FIRST_TILE)


@triton.jit
def _normalize(x, cmask, C, eps):
    """(xh, rstd) of a token tile: LayerNorm without affine (biased variance, two passes over the
    registers); zero in the padded columns."""
    mean = tl.sum(x, 1) / C
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _scores_by_head(w_row_ptr, xh, offs_c, offs_h, C, H, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr):
    """[H_PAD, BLOCK_N] scores w_h . xh_i one head at a time on the CUDA cores (rows of w re-read
    from L1): used where the [H_PAD, C_PAD] tensor-core operands would not fit in shared memory."""
    scores = tl.zeros([H_PAD, BLOCK_N], xh.dtype)
    for h in range(0, H):
        w_h = tl.load(w_row_ptr + h * C + offs_c, mask=offs_c < C, other=0.0)
        s_h = tl.sum(xh * w_h[None, :], 1)
        scores = tl.where(offs_h[:, None] == h, s_h[None, :], scores)
    return scores


@triton.jit
def _cross_attention_fwd_kernel(
    x_cls_ptr,            # (B, C), any strides
    x_tok_ptr,            # (B, M, C), any strides (x_cls when M == 0: never read)
    w_ptr,                # (B, H, C) contiguous, accumulation dtype
    z_ptr,                # (B, H, C) z; with SPLIT: (B, S, H, C) unnormalised partial z
    lse_ptr,              # (B, H) lse; with SPLIT: (B, S, H) running max per split
    part_l_ptr,           # with SPLIT: (B, S, H) softmax denominators per split (else unused)
    M, C, H, S, tokens_per_split, eps,
    stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HEAD_LOOP: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    acc_ty = w_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    N = M + 1
    n_start = s * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)

    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, H_PAD)
    cmask = offs_c < C
    hmask = offs_h < H
    if not HEAD_LOOP:
        # w as [H_PAD, C_PAD]: zero in the padding, so padded heads score 0 and padded columns add 0
        w = tl.load(w_ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :],
                    mask=hmask[:, None] & cmask[None, :], other=0.0)

    m_i = tl.full([H_PAD], float("-inf"), acc_ty)
    l_i = tl.zeros([H_PAD], acc_ty)
    acc = tl.zeros([H_PAD, C_PAD], acc_ty)
    if PREFETCH:
        # the split's first tile; each iteration then loads the next one (below)
        x_next = _load_patch_tokens(x_tok_ptr, b, n_start + tl.arange(0, BLOCK_N), offs_c, n_end, C,
                                    stride_tok_b, stride_tok_m, stride_tok_c)
    for t in range(0, num_tiles):
        n0 = n_start + t * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        if PREFETCH:
            # the tile loaded during the previous iteration: the same conversion and CLS row as
            # the plain load below, so the same bits
            x = _add_cls_row(x_next.to(acc_ty), x_cls_ptr, b, offs_n, offs_c, C, stride_cls_b, stride_cls_c,
                             n0 == 0)
        else:
            x = _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                                 stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                                 n0 == 0, acc_ty)
        xh, _ = _normalize(x, cmask, C, eps)
        if PREFETCH:
            # Software pipelining in registers: tile t + 1 (masked off past the split) loads while
            # tile t's scores, softmax and products run, so one load is in flight per program.
            # Issued only once x is normalised, so two float32 tiles are never live together
            # (issued at the top of the loop, ptxas spilled 8-warp programs at C_PAD 256); it waits
            # in the input dtype, half the registers of a float32 tile for float16/bfloat16.
            x_next = _load_patch_tokens(x_tok_ptr, b, offs_n + BLOCK_N, offs_c, n_end, C,
                                        stride_tok_b, stride_tok_m, stride_tok_c)
        # Without this barrier ptxas (sm_90, Triton 3.6 and 3.8) interleaves the normalisation with
        # the staging of the dot operands and spills at C_PAD 512 (255 registers, about 300 bytes
        # for bfloat16 tokens); with it the same program takes 178-202 registers and spills nothing.
        tl.debug_barrier()
        # scores of all heads, online softmax per head
        if HEAD_LOOP:
            scores = _scores_by_head(w_ptr + b * H * C, xh, offs_c, offs_h, C, H, BLOCK_N, H_PAD)
        else:
            scores = tl.dot(w, tl.trans(xh), input_precision=INPUT_PRECISION)  # [H_PAD, BLOCK_N]
        scores = tl.where(nmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, xh, input_precision=INPUT_PRECISION)
        m_i = m_new

    hc_mask = hmask[:, None] & cmask[None, :]
    if SPLIT:
        row = (b * S + s) * H
        tl.store(z_ptr + (row + offs_h[:, None]) * C + offs_c[None, :], acc, mask=hc_mask)
        tl.store(lse_ptr + row + offs_h, m_i, mask=hmask)
        tl.store(part_l_ptr + row + offs_h, l_i, mask=hmask)
    else:
        tl.store(z_ptr + (b * H + offs_h[:, None]) * C + offs_c[None, :], acc / l_i[:, None], mask=hc_mask)
        tl.store(lse_ptr + b * H + offs_h, m_i + tl.log(l_i), mask=hmask)


@triton.jit
def _cross_attention_fwd_combine_kernel(
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
def _cross_attention_bwd_kernel(
    x_cls_ptr,            # (B, C), any strides
    x_tok_ptr,            # (B, M, C), any strides (x_cls when M == 0: never read)
    w_ptr,                # (B, H, C) contiguous, accumulation dtype
    z_ptr,                # (B, H, C) contiguous
    lse_ptr,              # (B, H) contiguous
    dz_ptr,               # (B, H, C) contiguous
    dx_cls_ptr,           # (B, C) contiguous, x_cls dtype
    dx_tok_ptr,           # (B, M, C) contiguous, x_tokens dtype (dx_cls when M == 0: never written)
    dw_ptr,               # (B, H, C) dw; with SPLIT: (B, S, H, C) partial dw per split
    M, C, H, S, tokens_per_split, eps,
    stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HEAD_LOOP: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    acc_ty = w_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    N = M + 1
    n_start = s * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)

    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, H_PAD)
    cmask = offs_c < C
    hmask = offs_h < H
    hc_mask = hmask[:, None] & cmask[None, :]
    hc_offs = (b * H + offs_h[:, None]) * C + offs_c[None, :]                   # [H_PAD, C_PAD]
    dz = tl.load(dz_ptr + hc_offs, mask=hc_mask, other=0.0)
    z = tl.load(z_ptr + hc_offs, mask=hc_mask, other=0.0)
    dzz = tl.sum(dz * z, 1)                                                     # [H_PAD]
    lse = tl.load(lse_ptr + b * H + offs_h, mask=hmask, other=0.0)
    if not HEAD_LOOP:
        w = tl.load(w_ptr + hc_offs, mask=hc_mask, other=0.0)

    dw = tl.zeros([H_PAD, C_PAD], acc_ty)
    if PREFETCH:
        # the split's first tile; each iteration then loads the next one (below)
        x_next = _load_patch_tokens(x_tok_ptr, b, n_start + tl.arange(0, BLOCK_N), offs_c, n_end, C,
                                    stride_tok_b, stride_tok_m, stride_tok_c)
    for t in range(0, num_tiles):
        n0 = n_start + t * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        if PREFETCH:
            x = _add_cls_row(x_next.to(acc_ty), x_cls_ptr, b, offs_n, offs_c, C, stride_cls_b, stride_cls_c,
                             n0 == 0)
        else:
            x = _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                                 stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                                 n0 == 0, acc_ty)
        # the LayerNorm statistics, recomputed as in the forward (nothing of size B * N is saved)
        xh, rstd = _normalize(x, cmask, C, eps)
        if PREFETCH:
            # as in the forward (x is dead now): tile t + 1 loads while tile t computes
            x_next = _load_patch_tokens(x_tok_ptr, b, offs_n + BLOCK_N, offs_c, n_end, C,
                                        stride_tok_b, stride_tok_m, stride_tok_c)
        if HEAD_LOOP:
            # one head at a time on the CUDA cores: a_h, ds_h and their rank-1 updates of dxh
            ds = tl.zeros([H_PAD, BLOCK_N], acc_ty)
            dxh = tl.zeros([BLOCK_N, C_PAD], acc_ty)
            for h in range(0, H):
                w_h = tl.load(w_ptr + (b * H + h) * C + offs_c, mask=cmask, other=0.0)
                dz_h = tl.load(dz_ptr + (b * H + h) * C + offs_c, mask=cmask, other=0.0)
                sel = offs_h == h
                lse_h = tl.sum(tl.where(sel, lse, 0.0), 0)
                dzz_h = tl.sum(tl.where(sel, dzz, 0.0), 0)
                a_h = tl.exp(tl.sum(xh * w_h[None, :], 1) - lse_h)
                a_h = tl.where(nmask, a_h, 0.0)
                ds_h = a_h * (tl.sum(xh * dz_h[None, :], 1) - dzz_h)
                ds_h = tl.where(M > 0, ds_h, 0.0)             # one token: see the tensor-core path
                dxh += a_h[:, None] * dz_h[None, :] + ds_h[:, None] * w_h[None, :]
                ds = tl.where(sel[:, None], ds_h[None, :], ds)
        else:
            xh_t = tl.trans(xh)
            # probabilities recomputed from the saved log-sum-exp; zero on padded tokens and heads
            scores = tl.dot(w, xh_t, input_precision=INPUT_PRECISION)          # [H_PAD, BLOCK_N]
            a = tl.exp(scores - lse[:, None])
            a = tl.where(hmask[:, None] & nmask[None, :], a, 0.0)
            g = tl.dot(dz, xh_t, input_precision=INPUT_PRECISION)              # dz_h . xh_i
            ds = a * (g - dzz[:, None])                                         # [H_PAD, BLOCK_N]
            # With the CLS as the only token the softmax is constant (p = 1) and its gradient is
            # exactly zero; g and dzz, rounded differently (TF32 for half inputs), would leave a
            # residue in dw (4e-3 in float16 on an H100).
            ds = tl.where(M > 0, ds, 0.0)
            dxh = (tl.dot(tl.trans(a), dz, input_precision=INPUT_PRECISION)
                   + tl.dot(tl.trans(ds), w, input_precision=INPUT_PRECISION))  # [BLOCK_N, C_PAD]
        # LayerNorm backward (padded columns of dxh and xh are zero)
        mean_dxh = tl.sum(dxh, 1) / C
        mean_dxh_xh = tl.sum(dxh * xh, 1) / C
        dx = rstd[:, None] * (dxh - mean_dxh[:, None] - xh * mean_dxh_xh[:, None])
        tok_mask = (offs_n > 0) & nmask
        tl.store(dx_tok_ptr + (b * M + (offs_n - 1)[:, None]) * C + offs_c[None, :],
                 dx.to(dx_tok_ptr.dtype.element_ty), mask=tok_mask[:, None] & cmask[None, :])
        if n0 == 0:
            tl.store(dx_cls_ptr + b * C + offs_c[None, :] + offs_n[:, None] * 0,
                     dx.to(dx_cls_ptr.dtype.element_ty), mask=(offs_n == 0)[:, None] & cmask[None, :])
        dw += tl.dot(ds, xh, input_precision=INPUT_PRECISION)

    if SPLIT:
        tl.store(dw_ptr + ((b * S + s) * H + offs_h[:, None]) * C + offs_c[None, :], dw, mask=hc_mask)
    else:
        tl.store(dw_ptr + hc_offs, dw, mask=hc_mask)


@triton.jit
def _cross_attention_dw_combine_kernel(
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
# block sizes, splits, autotuning
# ---------------------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _input_precision(dtype: torch.dtype) -> str:
    # float32/float64 inputs: IEEE products. float16/bfloat16 inputs: TF32 tensor cores, which round
    # the operands (xh, w, probabilities) to 10 mantissa bits: as fine as float16, finer than bfloat16.
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def _smem_bytes(which: str, block_n: int, c_pad: int, h_pad: int, elem: int, head_loop: bool) -> int:
    """Shared memory the compiled kernel stages its tl.dot operands in, an upper bound fitted to
    sm_90 builds with Triton 3.6 and 3.8 (the forward stages the token tile twice and w once; the
    backward the tile three times and w / dz as four [H_PAD, C_PAD] operands). The compile-only
    tests check the bound against the compiler."""
    scratch = 1024      # reductions and layout conversions
    if head_loop:
        # the token tile (B operand of z / dw) and the small [H_PAD, BLOCK_N] one; Triton 3.6 stages
        # up to half a tile more in the backward (fp32: 82944 bytes where 3.8 takes 66688)
        return (3 * block_n * c_pad // 2 + 2 * h_pad * block_n) * elem + scratch
    rows = 2 * block_n + h_pad if which == "fwd" else 3 * block_n + 4 * h_pad
    return rows * c_pad * elem + scratch


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: Optional[int]) -> int:
    if device_index is None:  # the interpreter: plan as for an H100 so the same code paths run
        return 227 * 1024
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def _tile_limit(elem: int) -> int:
    # register budget for the [BLOCK_N, C_PAD] tile: 8K fp32 values spill nothing at 8 warps (sm_90)
    return 8192 if elem == 4 else 4096


def _bwd_operands_fit(c_pad: int, h_pad: int, elem: int) -> bool:
    """Whether the backward's tensor-core path fits its registers: it keeps w, dz and dw as
    [H_PAD, C_PAD] float32 operands, and past 4K values each (C_PAD 256 at H_PAD 16) ptxas spills
    even at BLOCK_N 16 (sm_90, Triton 3.6 and 3.8); the head loop keeps only dw. float64 spills on
    both paths from C_PAD 128 on, about equally, so it keeps the tensor cores."""
    return elem != 4 or h_pad * c_pad <= 4096


def _prefetch_fits(which: str, block_n: int, c_pad: int, h_pad: int, elem: int, in_elem: int,
                   head_loop: bool, num_warps: int) -> bool:
    """Register budget of a PREFETCH config. Per thread, tile t lives in float32 while tile t + 1
    waits in the input dtype; the forward holds about one such tile and the backward two (xh and
    dxh), hence 384 bytes per thread in the forward and 192 in the backward (64 and 32 tile values
    for 16-bit tokens). Fitted to ptxas on sm_90 (Triton 3.6 and 3.8) at the CrossViT widths: what
    it admits spills nothing, and the configs just past it spill or sit at the 255-register
    ceiling, as their plain twins do. The compile-only tests check the admitted configs."""
    per_thread = block_n * c_pad // (32 * num_warps)
    if which == "fwd":
        return (elem + in_elem) * per_thread <= 384
    return (elem + in_elem) * per_thread <= 192 and (head_loop or _bwd_operands_fit(c_pad, h_pad, elem))


def _heuristic_config(which: str, c_pad: int, h_pad: int, elem: int, smem_limit: int,
                      block_n: Optional[int], head_loop: Optional[bool], prefetch: Optional[bool] = None,
                      input_precision: str = "ieee") -> dict:
    """BLOCK_N, HEAD_LOOP, PREFETCH and num_warps when not autotuning: the largest tile in the
    register budget whose tensor-core operands fit in shared memory (and, in the backward, in
    registers), else the head loop. PREFETCH only when asked for: whether hiding the load pays is
    the autotuner's call, measured."""
    candidates = (block_n,) if block_n is not None else (64, 32, 16)
    # With TF32 products the forward's registers hold about one tile (its dot operands are staged
    # in shared memory): it gets the autotuner's doubled budget. With the single budget, C_PAD 512
    # gives an 8-warp program at 128 registers, which ptxas (Triton 3.6) spills to fit two per SM.
    tile_limit = _tile_limit(elem) * (2 if which == "fwd" and input_precision == "tf32" else 1)
    choice = None
    for bn in candidates:
        if block_n is None and bn > 16 and bn * c_pad > tile_limit:
            continue
        for hl in ((head_loop,) if head_loop is not None else (False, True)):
            if head_loop is not None or (
                    _smem_bytes(which, bn, c_pad, h_pad, elem, hl) <= smem_limit
                    and (hl or which == "fwd" or _bwd_operands_fit(c_pad, h_pad, elem))):
                choice = (bn, hl)
                break
        if choice is not None:
            break
    if choice is None:
        choice = (candidates[-1], True)
    bn, hl = choice
    return dict(BLOCK_N=bn, HEAD_LOOP=hl, PREFETCH=bool(prefetch), num_warps=4 if bn * c_pad <= 4096 else 8)


def _autotune_configs():
    """Every (BLOCK_N, HEAD_LOOP, num_warps) plain and with PREFETCH; the pruning keeps a few.

    All at num_stages=1. Triton accepts num_stages=2 for these loops, but for float16/bfloat16
    tokens its pipeliner leaves the token load alone (the tile is converted and normalised before
    any tl.dot sees it): the forward compiles to the same PTX and the backward only stages the two
    small statistic loads, so the configs would compile twice for nothing. (For float32 tokens it
    does stage the tile in shared memory, which ``_smem_bytes`` does not model.)"""
    return [triton.Config({"BLOCK_N": bn, "HEAD_LOOP": hl, "PREFETCH": pf}, num_warps=nw, num_stages=1)
            for pf in (False, True) for hl in (False, True) for bn in (16, 32, 64) for nw in (4, 8)]


def _kept_configs(which: str, configs, c_pad: int, h_pad: int, elem: int, in_elem: int, input_precision: str,
                  smem_limit: int) -> list:
    """The autotune configs worth compiling for one shape (every kept config is compiled and timed
    on the first call, so the list stays short: at most 16 at the CrossViT widths)."""
    # IEEE float32 products run on the CUDA cores: large tiles there spill and take minutes to compile
    tile_limit = _tile_limit(elem) * (1 if input_precision == "ieee" else 2)
    plain = [c for c in configs if not c.kwargs["PREFETCH"]]
    fits = [c for c in plain
            if c.kwargs["BLOCK_N"] * c_pad <= tile_limit
            and _smem_bytes(which, c.kwargs["BLOCK_N"], c_pad, h_pad, elem, c.kwargs["HEAD_LOOP"]) <= smem_limit]
    # The head-loop configs with the smallest tile always stay in: should a tensor-core config
    # need more shared memory than estimated (another Triton version), the autotuner drops it
    # (OutOfResources) and one of these still runs.
    safe = [c for c in plain if c.kwargs["BLOCK_N"] == 16 and c.kwargs["HEAD_LOOP"]]
    dot = [c for c in fits if not c.kwargs["HEAD_LOOP"]]
    kept = (dot + safe) if dot else (fits or safe)
    # A PREFETCH config joins only as the twin of a kept plain config (same tile, path and warps:
    # its shared memory is the same) and only inside the register budget of ``_prefetch_fits``.
    # The prefetched tile costs registers, and a config that spills is not worth timing: the
    # budget drops the large tiles at 4 warps (BLOCK_N 64 at C_PAD 256, 32 at 512, 16 at 1024)
    # and the backward's tensor-core path past C_PAD 256, where even the plain twin spills.
    # None for float32 tokens: their IEEE products on the CUDA cores already fill the registers
    # (plain configs spill), and the waiting tile would be a whole float32 tile.
    if input_precision == "ieee":
        return kept
    twins = {(c.kwargs["BLOCK_N"], c.kwargs["HEAD_LOOP"], c.num_warps) for c in kept}
    prefetch = [c for c in configs
                if c.kwargs["PREFETCH"] and (c.kwargs["BLOCK_N"], c.kwargs["HEAD_LOOP"], c.num_warps) in twins
                and _prefetch_fits(which, c.kwargs["BLOCK_N"], c_pad, h_pad, elem, in_elem, c.kwargs["HEAD_LOOP"],
                                   c.num_warps)]
    return kept + prefetch


def _prune(which: str):
    def prune(configs, named_args, **kwargs):
        w = named_args["w_ptr"]
        return _kept_configs(which, configs, kwargs["C_PAD"], kwargs["H_PAD"], w.element_size(),
                             named_args["x_tok_ptr"].element_size(), kwargs["INPUT_PRECISION"],
                             _smem_limit(w.device.index))
    return prune


@functools.lru_cache(maxsize=None)
def _autotuned(which: str):
    kernel = {"fwd": _cross_attention_fwd_kernel, "bwd": _cross_attention_bwd_kernel}[which]
    # cache_results: the choice is kept in Triton's cache (per kernel source, GPU architecture,
    # shape key and config list), so only the first process on a machine pays the tuning (every
    # kept config compiled and timed) and later processes run the same config, with the same bits.
    return triton.autotune(configs=_autotune_configs(), key=["M", "C", "H", "S", "C_PAD", "H_PAD"],
                           prune_configs_by={"early_config_prune": _prune(which)}, cache_results=True)(kernel)


def _launch(which: str, grid, args, meta: dict, x: Tensor, elem: int, block_n: Optional[int],
            head_loop: Optional[bool], prefetch: Optional[bool] = None) -> None:
    """Autotuned on a GPU (float16/bfloat16/float32), else the heuristic (or forced) config."""
    if x.is_cuda and block_n is None and head_loop is None and prefetch is None and elem == 4:
        _autotuned(which)[grid](*args, **meta)
        return
    limit = _smem_limit(x.device.index if x.is_cuda else None)
    cfg = _heuristic_config(which, meta["C_PAD"], meta["H_PAD"], elem, limit, block_n, head_loop, prefetch,
                            meta["INPUT_PRECISION"])
    kernel = {"fwd": _cross_attention_fwd_kernel, "bwd": _cross_attention_bwd_kernel}[which]
    kernel[grid](*args, **meta, **cfg, num_stages=1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_splits(B: int, N: int, device: torch.device, num_splits: Optional[int]) -> Tuple[int, int]:
    """(S, tokens_per_split): every split non-empty, boundaries on multiples of SPLIT_ALIGN (or 16
    when a test forces many splits of a short sequence)."""
    if num_splits is None:
        env = os.environ.get(SPLITS_ENV, "").strip()
        if env:
            try:
                num_splits = int(env)
            except ValueError:
                raise ValueError(f"{SPLITS_ENV}={env!r} must be a positive integer") from None
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        want, align = num_splits, 16
    elif device.type == "cuda":
        # flash-decoding: about two programs per SM, never splits shorter than MIN_TOKENS_PER_SPLIT
        index = device.index if device.index is not None else torch.cuda.current_device()
        want = min(triton.cdiv(2 * _sm_count(index), B), N // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
        align = SPLIT_ALIGN
    else:  # the CPU interpreter: one program per row
        want, align = 1, SPLIT_ALIGN
    want = max(1, want)
    tokens_per_split = triton.cdiv(triton.cdiv(N, want), align) * align
    return triton.cdiv(N, tokens_per_split), tokens_per_split


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate comes from here (tests poison them through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_args(x_cls: Tensor, x_tokens: Tensor):
    """The tokens' pointer and strides; x_cls stands in (never read) when there are no tokens."""
    if x_tokens.shape[1] == 0:
        return x_cls, (0, 0, 0)
    return x_tokens, tuple(x_tokens.stride())


# ---------------------------------------------------------------------------------------------
# launchers (the core contract of crossvit_kernels.backends.base; inputs validated by the op)
# ---------------------------------------------------------------------------------------------

def cross_attention_core_forward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float, *,
                                 num_splits: Optional[int] = None, block_n: Optional[int] = None,
                                 head_loop: Optional[bool] = None, prefetch: Optional[bool] = None):
    """-> (z (B, H, C), lse (B, H)) in the accumulation dtype.

    ``num_splits`` forces the number of token splits (default: chosen from B, M and the GPU);
    ``block_n`` forces the token tile, ``head_loop`` the per-head CUDA-core scores and
    ``prefetch`` the register-prefetched token loop (default: autotuned on a GPU for
    float16/bfloat16/float32, a heuristic otherwise). ``prefetch`` never changes the bits.
    """
    B, C = x_cls.shape
    M, H = x_tokens.shape[1], w.shape[1]
    dtype, device = x_cls.dtype, x_cls.device
    acc = _acc_dtype(dtype)
    w = w.to(acc).contiguous()
    N = M + 1
    S, tokens_per_split = _choose_splits(B, N, device, num_splits)
    z = _empty((B, H, C), acc, device)
    lse = _empty((B, H), acc, device)
    if S > 1:
        part_z, part_m, part_l = _empty((B, S, H, C), acc, device), _empty((B, S, H), acc, device), \
            _empty((B, S, H), acc, device)
    else:
        part_z, part_m, part_l = z, lse, lse                  # the kernel writes z and lse directly
    tok, tok_strides = _token_args(x_cls, x_tokens)
    args = (x_cls, tok, w, part_z, part_m, part_l, M, C, H, S, tokens_per_split, float(eps),
            x_cls.stride(0), x_cls.stride(1), *tok_strides)
    meta = dict(C_PAD=_pad(C), H_PAD=_pad(H), SPLIT=S > 1, INPUT_PRECISION=_input_precision(dtype))
    with _device_guard(x_cls):
        _launch("fwd", (B, S), args, meta, x_cls, w.element_size(), block_n, head_loop, prefetch)
        if S > 1:
            _cross_attention_fwd_combine_kernel[(B, H)](
                part_z, part_m, part_l, z, lse, C, H, S,
                S_PAD=triton.next_power_of_2(S), BLOCK_C=min(128, triton.next_power_of_2(C)))
    return z, lse


def cross_attention_core_backward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                  dz: Tensor, eps: float, *, num_splits: Optional[int] = None,
                                  block_n: Optional[int] = None, head_loop: Optional[bool] = None,
                                  prefetch: Optional[bool] = None):
    """-> (dx_cls (B, C) in x_cls's dtype, dx_tokens (B, M, C) contiguous in x_tokens's dtype,
    dw (B, H, C) in the accumulation dtype). Keyword arguments as in the forward."""
    B, C = x_cls.shape
    M, H = x_tokens.shape[1], w.shape[1]
    dtype, device = x_cls.dtype, x_cls.device
    acc = _acc_dtype(dtype)
    w, z, lse, dz = (t.to(acc).contiguous() for t in (w, z, lse, dz))
    S, tokens_per_split = _choose_splits(B, M + 1, device, num_splits)
    dx_cls = _empty((B, C), dtype, device)
    dx_tokens = _empty((B, M, C), x_tokens.dtype, device)
    dw = _empty((B, H, C), acc, device)
    part_dw = _empty((B, S, H, C), acc, device) if S > 1 else dw
    tok, tok_strides = _token_args(x_cls, x_tokens)
    args = (x_cls, tok, w, z, lse, dz, dx_cls, dx_tokens if M > 0 else dx_cls, part_dw, M, C, H, S, tokens_per_split,
            float(eps), x_cls.stride(0), x_cls.stride(1), *tok_strides)
    meta = dict(C_PAD=_pad(C), H_PAD=_pad(H), SPLIT=S > 1, INPUT_PRECISION=_input_precision(dtype))
    with _device_guard(x_cls):
        _launch("bwd", (B, S), args, meta, x_cls, w.element_size(), block_n, head_loop, prefetch)
        if S > 1:
            block = 1024
            _cross_attention_dw_combine_kernel[(B, triton.cdiv(H * C, block))](part_dw, dw, H * C, S, BLOCK=block)
    return dx_cls, dx_tokens, dw
