"""Triton kernels of the cross-attention core (DESIGN.md section 2).

Per batch row b the tokens are x_0 = x_cls[b] and x_i = x_tokens[b, i - 1] (i = 1..M), N = 1 + M of
them, each of width C. The math is ``crossvit_kernels.impl.torch_impl`` (the executable spec):

forward   one pass over the tokens. A program loads a [BLOCK_N, C] tile, computes the LayerNorm
          statistics in registers (and stores them), the scores of all heads (computed as the
          [H, C] x [C, BLOCK_N] product, the transposed [BLOCK_N, C] x [C, H]), updates an online
          softmax per head and accumulates z (a [H, BLOCK_N] x [BLOCK_N, C] product). Each token
          is read exactly once.
backward  one pass over the tokens: xh from the saved mean/rstd, the probabilities from the saved
          log-sum-exp; dx written once per token; dw accumulated per program.

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
time on the CUDA cores, and only the z / dw products stay on tl.dot. ``compile_for_gpu_target``
compiles a kernel for an NVIDIA target without a GPU; the tests use it to check the estimate.

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
def _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                     stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                     FIRST_TILE, ACC_TY: tl.constexpr):
    """Tokens offs_n (0 = x_cls) of row b as an ACC_TY [BLOCK_N, C_PAD] tile, zero outside."""
    cmask = offs_c < C
    tok_mask = (offs_n > 0) & (offs_n < n_end)
    x = tl.load(x_tok_ptr + b * stride_tok_b + (offs_n - 1)[:, None] * stride_tok_m
                + offs_c[None, :] * stride_tok_c,
                mask=tok_mask[:, None] & cmask[None, :], other=0.0).to(ACC_TY)
    if FIRST_TILE:
        # only the first tile of the first split holds token 0 (the CLS row)
        cls_mask = (offs_n == 0)[:, None] & cmask[None, :]
        x_cls = tl.load(x_cls_ptr + b * stride_cls_b + offs_c[None, :] * stride_cls_c + offs_n[:, None] * 0,
                        mask=cls_mask, other=0.0).to(ACC_TY)
        x = x + x_cls
    return x


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
    mean_ptr,             # (B, 1 + M) contiguous
    rstd_ptr,             # (B, 1 + M) contiguous
    M, C, H, S, tokens_per_split, eps,
    stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HEAD_LOOP: tl.constexpr,
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
    for t in range(0, num_tiles):
        n0 = n_start + t * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        x = _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                             stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                             n0 == 0, acc_ty)
        # LayerNorm statistics (biased variance, two passes over the registers)
        mean = tl.sum(x, 1) / C
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        xh = xc * rstd[:, None]
        tl.store(mean_ptr + b * N + offs_n, mean, mask=nmask)
        tl.store(rstd_ptr + b * N + offs_n, rstd, mask=nmask)
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
    l = tl.load(part_l_ptr + (b * S + offs_s) * H + h, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    scale = tl.exp(m - m_max)                                                   # 0 on padded splits
    denom = tl.sum(l * scale, 0)
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
    mean_ptr,             # (B, 1 + M) contiguous
    rstd_ptr,             # (B, 1 + M) contiguous
    dz_ptr,               # (B, H, C) contiguous
    dx_cls_ptr,           # (B, C) contiguous, x_cls dtype
    dx_tok_ptr,           # (B, M, C) contiguous, x_tokens dtype (dx_cls when M == 0: never written)
    dw_ptr,               # (B, H, C) dw; with SPLIT: (B, S, H, C) partial dw per split
    M, C, H, S, tokens_per_split,
    stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
    BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, H_PAD: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HEAD_LOOP: tl.constexpr,
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
    for t in range(0, num_tiles):
        n0 = n_start + t * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        x = _load_token_tile(x_cls_ptr, x_tok_ptr, b, offs_n, offs_c, n_end, C,
                             stride_cls_b, stride_cls_c, stride_tok_b, stride_tok_m, stride_tok_c,
                             n0 == 0, acc_ty)
        mean = tl.load(mean_ptr + b * N + offs_n, mask=nmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * N + offs_n, mask=nmask, other=0.0)
        xh = tl.where(cmask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
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


def _heuristic_config(which: str, c_pad: int, h_pad: int, elem: int, smem_limit: int,
                      block_n: Optional[int], head_loop: Optional[bool]) -> dict:
    """BLOCK_N, HEAD_LOOP and num_warps when not autotuning: the largest tile in the register
    budget whose tensor-core operands fit in shared memory, else the head loop."""
    candidates = (block_n,) if block_n is not None else (64, 32, 16)
    choice = None
    for bn in candidates:
        if block_n is None and bn > 16 and bn * c_pad > _tile_limit(elem):
            continue
        for hl in ((head_loop,) if head_loop is not None else (False, True)):
            if head_loop is not None or _smem_bytes(which, bn, c_pad, h_pad, elem, hl) <= smem_limit:
                choice = (bn, hl)
                break
        if choice is not None:
            break
    if choice is None:
        choice = (candidates[-1], True)
    bn, hl = choice
    return dict(BLOCK_N=bn, HEAD_LOOP=hl, num_warps=4 if bn * c_pad <= 4096 else 8)


def _autotune_configs():
    return [triton.Config({"BLOCK_N": bn, "HEAD_LOOP": hl}, num_warps=nw, num_stages=1)
            for hl in (False, True) for bn in (16, 32, 64) for nw in (4, 8)]


def _prune(which: str):
    def prune(configs, named_args, **kwargs):
        c_pad, h_pad = kwargs["C_PAD"], kwargs["H_PAD"]
        elem = named_args["w_ptr"].element_size()
        limit = _smem_limit(named_args["w_ptr"].device.index)
        # IEEE float32 products run on the CUDA cores: large tiles there spill and take minutes to compile
        tile_limit = _tile_limit(elem) * (1 if kwargs["INPUT_PRECISION"] == "ieee" else 2)
        fits = [c for c in configs
                if c.kwargs["BLOCK_N"] * c_pad <= tile_limit
                and _smem_bytes(which, c.kwargs["BLOCK_N"], c_pad, h_pad, elem, c.kwargs["HEAD_LOOP"]) <= limit]
        # The head-loop configs with the smallest tile always stay in: should a tensor-core config
        # need more shared memory than estimated (another Triton version), the autotuner drops it
        # (OutOfResources) and one of these still runs.
        safe = [c for c in configs if c.kwargs["BLOCK_N"] == 16 and c.kwargs["HEAD_LOOP"]]
        dot = [c for c in fits if not c.kwargs["HEAD_LOOP"]]
        return (dot + safe) if dot else (fits or safe)
    return prune


@functools.lru_cache(maxsize=None)
def _autotuned(which: str):
    kernel = {"fwd": _cross_attention_fwd_kernel, "bwd": _cross_attention_bwd_kernel}[which]
    return triton.autotune(configs=_autotune_configs(), key=["M", "C", "H", "S", "C_PAD", "H_PAD"],
                           prune_configs_by={"early_config_prune": _prune(which)})(kernel)


def _launch(which: str, grid, args, meta: dict, x: Tensor, elem: int, block_n: Optional[int],
            head_loop: Optional[bool]) -> None:
    """Autotuned on a GPU (float16/bfloat16/float32), else the heuristic (or forced) config."""
    if x.is_cuda and block_n is None and head_loop is None and elem == 4:
        _autotuned(which)[grid](*args, **meta)
        return
    limit = _smem_limit(x.device.index if x.is_cuda else None)
    cfg = _heuristic_config(which, meta["C_PAD"], meta["H_PAD"], elem, limit, block_n, head_loop)
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


def _check_core_inputs(x_cls: Tensor, x_tokens: Tensor, w: Tensor) -> Tuple[int, int, int, int]:
    for name, t, ndim in (("x_cls", x_cls, 2), ("x_tokens", x_tokens, 3), ("w", w, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != x_cls.device:
            raise ValueError(f"{name} is on {t.device} but x_cls is on {x_cls.device}")
    B, C = x_cls.shape
    _, M, _ = x_tokens.shape
    H = w.shape[1]
    if x_tokens.shape[0] != B or x_tokens.shape[2] != C:
        raise ValueError(f"x_tokens must have shape ({B}, M, {C}), got {tuple(x_tokens.shape)}")
    if w.shape[0] != B or w.shape[2] != C or H < 1:
        raise ValueError(f"w must have shape ({B}, H >= 1, {C}), got {tuple(w.shape)}")
    if x_tokens.dtype != x_cls.dtype:
        raise TypeError(f"x_tokens ({x_tokens.dtype}) and x_cls ({x_cls.dtype}) must share one dtype")
    if B < 1 or C < 1:
        raise ValueError(f"empty input: x_cls has shape {tuple(x_cls.shape)}")
    return B, M, C, H


def _token_args(x_cls: Tensor, x_tokens: Tensor):
    """The tokens' pointer and strides; x_cls stands in (never read) when there are no tokens."""
    if x_tokens.shape[1] == 0:
        return x_cls, (0, 0, 0)
    return x_tokens, tuple(x_tokens.stride())


# ---------------------------------------------------------------------------------------------
# launchers (the backend contract)
# ---------------------------------------------------------------------------------------------

def cross_attention_core_forward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float, *,
                                 num_splits: Optional[int] = None, block_n: Optional[int] = None,
                                 head_loop: Optional[bool] = None):
    """-> (z (B, H, C), lse (B, H), mean (B, 1+M), rstd (B, 1+M)), all in the accumulation dtype.

    ``num_splits`` forces the number of token splits (default: chosen from B, M and the GPU);
    ``block_n`` forces the token tile and ``head_loop`` the per-head CUDA-core scores (default:
    autotuned on a GPU for float16/bfloat16/float32, a heuristic otherwise).
    """
    B, M, C, H = _check_core_inputs(x_cls, x_tokens, w)
    dtype, device = x_cls.dtype, x_cls.device
    acc = _acc_dtype(dtype)
    w = w.to(acc).contiguous()
    N = M + 1
    S, tokens_per_split = _choose_splits(B, N, device, num_splits)
    c_pad, h_pad = _pad(C), _pad(H)
    z = _empty((B, H, C), acc, device)
    lse = _empty((B, H), acc, device)
    mean = _empty((B, N), acc, device)
    rstd = _empty((B, N), acc, device)
    if S > 1:
        part_z, part_m, part_l = _empty((B, S, H, C), acc, device), _empty((B, S, H), acc, device), \
            _empty((B, S, H), acc, device)
    else:
        part_z, part_m, part_l = z, lse, lse                  # the kernel writes z and lse directly
    tok, tok_strides = _token_args(x_cls, x_tokens)
    args = (x_cls, tok, w, part_z, part_m, part_l, mean, rstd, M, C, H, S, tokens_per_split, float(eps),
            x_cls.stride(0), x_cls.stride(1), *tok_strides)
    meta = dict(C_PAD=c_pad, H_PAD=h_pad, SPLIT=S > 1, INPUT_PRECISION=_input_precision(dtype))
    with _device_guard(x_cls):
        _launch("fwd", (B, S), args, meta, x_cls, w.element_size(), block_n, head_loop)
        if S > 1:
            _cross_attention_fwd_combine_kernel[(B, H)](
                part_z, part_m, part_l, z, lse, C, H, S,
                S_PAD=triton.next_power_of_2(S), BLOCK_C=min(128, triton.next_power_of_2(C)))
    return z, lse, mean, rstd


def cross_attention_core_backward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                  mean: Tensor, rstd: Tensor, dz: Tensor, *,
                                  num_splits: Optional[int] = None, block_n: Optional[int] = None,
                                 head_loop: Optional[bool] = None):
    """-> (dx_cls (B, C) in x_cls's dtype, dx_tokens (B, M, C) contiguous in x_tokens's dtype,
    dw (B, H, C) in the accumulation dtype). Keyword arguments as in the forward."""
    B, M, C, H = _check_core_inputs(x_cls, x_tokens, w)
    dtype, device = x_cls.dtype, x_cls.device
    acc = _acc_dtype(dtype)
    N = M + 1
    expected = {"z": (B, H, C), "lse": (B, H), "mean": (B, N), "rstd": (B, N), "dz": (B, H, C)}
    small = {}
    for name, t in (("z", z), ("lse", lse), ("mean", mean), ("rstd", rstd), ("dz", dz)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x_cls is on {device}")
        small[name] = t.to(acc).contiguous()
    w = w.to(acc).contiguous()
    S, tokens_per_split = _choose_splits(B, N, device, num_splits)
    c_pad, h_pad = _pad(C), _pad(H)
    dx_cls = _empty((B, C), dtype, device)
    dx_tokens = _empty((B, M, C), x_tokens.dtype, device)
    dw = _empty((B, H, C), acc, device)
    part_dw = _empty((B, S, H, C), acc, device) if S > 1 else dw
    tok, tok_strides = _token_args(x_cls, x_tokens)
    args = (x_cls, tok, w, small["z"], small["lse"], small["mean"], small["rstd"], small["dz"],
            dx_cls, dx_tokens if M > 0 else dx_cls, part_dw, M, C, H, S, tokens_per_split,
            x_cls.stride(0), x_cls.stride(1), *tok_strides)
    meta = dict(C_PAD=c_pad, H_PAD=h_pad, SPLIT=S > 1, INPUT_PRECISION=_input_precision(dtype))
    with _device_guard(x_cls):
        _launch("bwd", (B, S), args, meta, x_cls, w.element_size(), block_n, head_loop)
        if S > 1:
            block = 1024
            _cross_attention_dw_combine_kernel[(B, triton.cdiv(H * C, block))](part_dw, dw, H * C, S, BLOCK=block)
    return dx_cls, dx_tokens, dw


# ---------------------------------------------------------------------------------------------
# compile-only check for a real GPU target (used by the tests on machines without a GPU)
# ---------------------------------------------------------------------------------------------

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def compile_for_gpu_target(which: str, dtype: str, C: int, H: int, split: bool = False, arch: int = 90,
                           smem_limit: int = 227 * 1024) -> dict:
    """Compile one kernel for NVIDIA sm_``arch`` (no GPU needed: Triton ships ptxas) with the config
    the heuristic planner picks for a GPU with ``smem_limit`` bytes of shared memory per block.

    ``which`` is "fwd", "bwd", "fwd_combine" or "dw_combine"; ``dtype`` the input dtype's name.
    Returns the config, the shared memory the compiled kernel uses, the planner's estimate, the
    cubin size and whether the PTX uses tensor-core (mma) instructions. Must run with
    TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions).
    """
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    tname = _TRITON_TYPES[dtype]
    acc = "fp64" if tname == "fp64" else "fp32"
    elem = 8 if acc == "fp64" else 4
    if which in ("fwd", "bwd"):
        kernel = _cross_attention_fwd_kernel if which == "fwd" else _cross_attention_bwd_kernel
        c_pad, h_pad = _pad(C), _pad(H)
        cfg = _heuristic_config(which, c_pad, h_pad, elem, smem_limit, None, None)
        consts = dict(BLOCK_N=cfg["BLOCK_N"], HEAD_LOOP=cfg["HEAD_LOOP"], C_PAD=c_pad, H_PAD=h_pad, SPLIT=split,
                      INPUT_PRECISION=_input_precision(getattr(torch, dtype)))
        types = {n: "*" + tname for n in ("x_cls_ptr", "x_tok_ptr", "dx_cls_ptr", "dx_tok_ptr")}
        types.update({n: "*" + acc for n in ("w_ptr", "z_ptr", "lse_ptr", "part_l_ptr", "mean_ptr", "rstd_ptr",
                                             "dz_ptr", "dw_ptr")})
        types.update(eps="fp32", stride_tok_b="i64")
        num_warps = cfg["num_warps"]
        estimate = _smem_bytes(which, cfg["BLOCK_N"], c_pad, h_pad, elem, cfg["HEAD_LOOP"])
    else:
        kernel = _cross_attention_fwd_combine_kernel if which == "fwd_combine" else _cross_attention_dw_combine_kernel
        cfg, estimate, num_warps = {}, None, 4
        consts = dict(S_PAD=8, BLOCK_C=128) if which == "fwd_combine" else dict(BLOCK=1024)
        types = {n: "*" + acc for n in kernel.arg_names if n.endswith("_ptr")}
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=target, options=dict(num_warps=num_warps, num_stages=1))
    return dict(which=which, dtype=dtype, C=C, H=H, split=split, config={k: v for k, v in cfg.items()},
                shared=int(compiled.metadata.shared), estimate=estimate, cubin_bytes=len(compiled.asm["cubin"]),
                mma="mma" in compiled.asm["ptx"])
