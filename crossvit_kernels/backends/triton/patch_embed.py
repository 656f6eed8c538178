"""Triton kernels of the linear patch embedding (docs/design.md, section 3).

Forward: one kernel. Each program computes a (BLOCK_M token rows) x (BLOCK_N channels) tile of

    out[b, 1 + p, :] = W . patch(b, p) + bias + pos_embed[1 + p]

as a GEMM over K = Cin * ph * pw whose left operand is gathered straight from the NCHW image
(row m = b * P + p; column k = (ci, ky, kx)), with fp32 accumulation (fp64 for float64), and
writes it behind the CLS row of the token buffer. The programs whose tile holds the first patch
of a batch row also write that row's ``cls_token + pos_embed[0]``: no cat, no separate add.

Backward (given g = dL/d out):

    d_weight[c, k] = sum_{b, p} g[b, 1 + p, c] * patch(b, p)[k]   a GEMM over the B * P rows; the
                     rows are cut into a shape-determined number of splits, each written to its own
                     partial buffer, and the partials are summed in a fixed order (no atomics)
    d_pos[t, c]    = sum_b g[b, t, c];   d_cls = d_pos[0];   d_bias = sum_{t >= 1} d_pos[t]
    d_images       = (g[:, 1:] @ W) scattered back to NCHW (patches do not overlap: every image
                     element is written exactly once), only when the images need a gradient

Block sizes come from a heuristic that depends only on the shapes and dtype (no autotuning, whose
timing-dependent choice would change the summation order): same inputs, same bits.

float32 products follow ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's default)
computes them exactly (``input_precision="ieee"``), "high" / "medium" allow TF32 tensor cores.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["patch_embed_forward", "patch_embed_backward"]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _patch_rows(rows, P, GW, s_b, s_h, s_w, PH: tl.constexpr, PW: tl.constexpr):
    """Token rows m = b * P + p (int64) -> (b, p, offset of the patch's top-left pixel)."""
    b = rows // P
    p = rows - b * P
    gy = p // GW
    gx = p - gy * GW
    return b, p, b * s_b + gy * (PH * s_h) + gx * (PW * s_w)


@triton.jit
def _patch_cols(ks, s_c, s_h, s_w, PH: tl.constexpr, PW: tl.constexpr):
    """Patch columns k = (ci * PH + ky) * PW + kx -> offset inside the patch (int64)."""
    ci = ks // (PH * PW)
    r = ks - ci * (PH * PW)
    ky = r // PW
    kx = r - ky * PW
    return ci.to(tl.int64) * s_c + ky.to(tl.int64) * s_h + kx.to(tl.int64) * s_w


@triton.jit
def _patch_embed_fwd_kernel(
    images_ptr,                 # (B, Cin, H, W), strides s_ib, s_ic, s_ih, s_iw
    weight_ptr,                 # (C, K) contiguous, K = Cin * PH * PW
    bias_ptr,                   # (C,) contiguous (unused without HAS_BIAS)
    pos_ptr,                    # (1 + P, C), strides s_pt, s_pc
    cls_ptr,                    # (C,), stride s_cls
    out_ptr,                    # (B, 1 + P, C) contiguous
    M, P, GW, C, K,             # M = B * P rows, GW = patches per grid row
    s_ib, s_ic, s_ih, s_iw,
    s_pt, s_pc, s_cls,
    HAS_BIAS: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(C, BLOCK_N)
    pid_m = pid // num_n                 # channel tiles of one row tile are neighbours: the
    pid_n = pid - pid_m * num_n          # gathered patches are re-read from L2, not from DRAM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < C
    b, p, a_row = _patch_rows(rows, P, GW, s_ib, s_ih, s_iw, PH, PW)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_col = _patch_cols(ks, s_ic, s_ih, s_iw, PH, PW)
        a = tl.load(images_ptr + (a_row[:, None] + a_col[None, :]),
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)                  # (BM, BK)
        w = tl.load(weight_ptr + (cols[None, :] * K + ks[:, None]),
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)                  # (BK, BN)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    acc += tl.load(pos_ptr + ((1 + p)[:, None] * s_pt + cols[None, :] * s_pc), mask=mask, other=0.0).to(ACC_DTYPE)
    row0 = b * (P + 1)                                                   # the CLS row of batch row b
    tl.store(out_ptr + ((row0 + 1 + p)[:, None] * C + cols[None, :]), acc.to(out_ptr.dtype.element_ty), mask=mask)

    # Row 0 of batch row b = cls + pos[0], written by the tile that holds patch 0 of that row.
    cls = tl.load(cls_ptr + cols * s_cls, mask=col_ok, other=0.0).to(ACC_DTYPE) \
        + tl.load(pos_ptr + cols * s_pc, mask=col_ok, other=0.0).to(ACC_DTYPE)
    cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE) + cls[None, :]
    tl.store(out_ptr + (row0[:, None] * C + cols[None, :]), cls_tile.to(out_ptr.dtype.element_ty),
             mask=mask & (p == 0)[:, None])


@triton.jit
def _patch_embed_bwd_dw_kernel(
    grad_ptr,                   # (B, 1 + P, C), strides s_gb, s_gt, s_gc
    images_ptr,                 # (B, Cin, H, W), strides s_ib, s_ic, s_ih, s_iw
    dw_ptr,                     # (SPLITS, C, K) contiguous: one partial d_weight per split
    M, P, GW, C, K, ROWS_PER_SPLIT,
    s_gb, s_gt, s_gc,
    s_ib, s_ic, s_ih, s_iw,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid - pid_n * num_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < C
    k_ok = ks < K
    a_col = _patch_cols(ks, s_ic, s_ih, s_iw, PH, PW)

    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < m_end
        b, p, a_row = _patch_rows(rows, P, GW, s_ib, s_ih, s_iw, PH, PW)
        g_t = tl.load(grad_ptr + (cols[:, None] * s_gc + (b * s_gb + (1 + p) * s_gt)[None, :]),
                      mask=col_ok[:, None] & row_ok[None, :], other=0.0)              # (BN, BM)
        a = tl.load(images_ptr + (a_row[:, None] + a_col[None, :]),
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)                  # (BM, BK)
        g_t = g_t.to(a.dtype)
        if DOT_FP32:
            g_t = g_t.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(g_t, a, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    out = dw_ptr + split * C * K + (cols[:, None] * K + ks[None, :])
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_bwd_dx_kernel(
    grad_ptr,                   # (B, 1 + P, C), strides s_gb, s_gt, s_gc
    weight_ptr,                 # (C, K) contiguous
    dimages_ptr,                # (B, Cin, H, W), strides s_db, s_dc, s_dh, s_dw
    M, P, GW, C, K,
    s_gb, s_gt, s_gc,
    s_db, s_dc, s_dh, s_dw,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid - pid_m * num_k
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    b, p, d_row = _patch_rows(rows, P, GW, s_db, s_dh, s_dw, PH, PW)
    g_row = b * s_gb + (1 + p) * s_gt

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, C, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        g = tl.load(grad_ptr + (g_row[:, None] + cols[None, :].to(tl.int64) * s_gc),
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)                # (BM, BN)
        w = tl.load(weight_ptr + (cols[:, None].to(tl.int64) * K + ks[None, :]),
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)                  # (BN, BK)
        g = g.to(w.dtype)
        if DOT_FP32:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    d_col = _patch_cols(ks, s_dc, s_dh, s_dw, PH, PW)
    tl.store(dimages_ptr + (d_row[:, None] + d_col[None, :]), acc.to(dimages_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_bwd_pos_kernel(
    grad_ptr,                   # (B, T, C), T = 1 + P, strides s_gb, s_gt, s_gc
    dpos_ptr,                   # (T, C) contiguous
    bias_part_ptr,              # (cdiv(T, BLOCK_T), C) contiguous: per-tile sums of rows t >= 1
    B, T, C,
    s_gb, s_gt, s_gc,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(C, BLOCK_N)
    pid_t = pid // num_n
    pid_n = pid - pid_t * num_n
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (toks < T)[:, None] & (cols < C)[None, :]
    ptrs = grad_ptr + (toks[:, None] * s_gt + cols[None, :] * s_gc)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    for _ in range(0, B):                                    # batch rows in order: deterministic
        acc += tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        ptrs += s_gb
    tl.store(dpos_ptr + (toks[:, None] * C + cols[None, :]), acc.to(dpos_ptr.dtype.element_ty), mask=mask)
    part = tl.sum(tl.where(mask & (toks >= 1)[:, None], acc, 0.0), axis=0)
    tl.store(bias_part_ptr + (pid_t * C + cols), part.to(bias_part_ptr.dtype.element_ty), mask=cols < C)


@triton.jit
def _sum_partials_kernel(
    part_ptr,                   # (S, N) contiguous
    out_ptr,                    # (N,) contiguous
    S, N,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < N
    ptrs = part_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for _ in range(0, S):                                    # partials in order: deterministic
        acc += tl.load(ptrs, mask=ok, other=0.0).to(ACC_DTYPE)
        ptrs += N
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

def _acc_dtypes(dtype: torch.dtype):
    """(torch accumulation dtype, Triton accumulation dtype)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        try:
            if torch.get_float32_matmul_precision() != "highest":
                return "tf32"
        except Exception:  # pragma: no cover - an exotic torch without the query
            pass
    return "ieee"


def _dot_fp32(images: Tensor) -> bool:
    """bfloat16 under the interpreter (CPU tensors), which mishandles two bfloat16 operations:
    its tl.dot multiplies bfloat16's raw uint16 storage, and its float32 -> bfloat16 cast
    truncates instead of rounding to nearest even. There the kernels upcast the dot operands to
    float32 (bfloat16 products are exact in float32: the same math) and write float32 results
    that the launcher rounds to bfloat16 with PyTorch, as a GPU's cast would. Never on a GPU."""
    return images.device.type == "cpu" and images.dtype == torch.bfloat16


def _store_dtype(images: Tensor, dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels write an output of ``dtype`` in (see _dot_fp32)."""
    return torch.float32 if _dot_fp32(images) and dtype == torch.bfloat16 else dtype


def _finish(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _pow2_at_least_16(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _channel_block(C: int, cap: int = 128) -> int:
    """Channel tile: the widths of CrossViT are multiples of 64 (of 128 where it can be)."""
    if C >= 128 and C % 128 == 0 and cap >= 128:
        return 128
    if C >= 64:
        return 64
    return _pow2_at_least_16(C, 64)


#: Under the interpreter (CPU tensors) every Triton op costs Python overhead per program, so the
#: launchers use a few large tiles there; the GPU tiles are compiled for a real target by the tests
#: and can be run by the interpreter too by setting this to False.
INTERPRETER_LARGE_TILES = True
_INTERPRETER_TILE = 256


def _large_tiles(t: Tensor) -> bool:
    return t.device.type == "cpu" and INTERPRETER_LARGE_TILES


def _gemm_config(M: int, N: int, K: int, dtype: torch.dtype, large: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of an M x N x K GEMM, from shapes only."""
    if large:
        cap = _INTERPRETER_TILE
        return _pow2_at_least_16(M, cap), _pow2_at_least_16(N, cap), _pow2_at_least_16(K, cap), 4, 1
    wide = dtype == torch.float64
    BLOCK_M = _pow2_at_least_16(M, 64 if wide else (128 if M >= 8192 else 64))
    BLOCK_N = _channel_block(N, 64 if wide else 128)
    BLOCK_K = _pow2_at_least_16(K, {torch.float64: 16, torch.float32: 32}.get(dtype, 64))
    num_warps = 8 if BLOCK_M * BLOCK_N >= 128 * 128 else 4
    num_stages = 2 if wide else 3
    return BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages


def _pos_config(T: int, C: int, large: bool = False) -> Tuple[int, int]:
    """(BLOCK_T, BLOCK_N) of the batch reduction behind d_pos."""
    if large:
        return _pow2_at_least_16(T, _INTERPRETER_TILE), _pow2_at_least_16(C, _INTERPRETER_TILE)
    return _pow2_at_least_16(T, 32), _channel_block(C)


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dims(images: Tensor, weight: Tensor) -> Tuple[int, ...]:
    B, Cin, H, W = images.shape
    C, _, ph, pw = weight.shape
    return B, Cin, H, W, C, ph, pw


# ---------------------------------------------------------------------------------------------
# launchers (the backend contract of crossvit_kernels.backends.base; inputs validated by the op)
# ---------------------------------------------------------------------------------------------

def patch_embed_forward(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                        cls_token: Tensor) -> Tensor:
    """(B, 1 + P, C) in the images' dtype; see ``crossvit_kernels.backends.pytorch``."""
    B, Cin, H, W, C, ph, pw = _dims(images, weight)
    GH, GW = H // ph, W // pw
    P, K, M = GH * GW, Cin * ph * pw, B * GH * GW
    w2 = weight.reshape(C, K).contiguous()
    b1 = bias.contiguous() if bias is not None else w2  # any valid pointer when there is no bias
    out = torch.empty((B, 1 + P, C), device=images.device, dtype=_store_dtype(images, images.dtype))
    _, acc_tl = _acc_dtypes(images.dtype)
    BM, BN, BK, warps, stages = _gemm_config(M, C, K, images.dtype, _large_tiles(images))
    grid = (triton.cdiv(M, BM) * triton.cdiv(C, BN),)
    with _device_ctx(images):
        _patch_embed_fwd_kernel[grid](
            images, w2, b1, pos_embed, cls_token, out,
            M, P, GW, C, K,
            *images.stride(), *pos_embed.stride(), cls_token.stride(0),
            HAS_BIAS=bias is not None, PH=ph, PW=pw, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=_input_precision(images.dtype), DOT_FP32=_dot_fp32(images),
            num_warps=warps, num_stages=stages)
    return _finish(out, images.dtype)


#: Rows of the d_weight reduction handled by one program at least (fewer partial buffers).
_MIN_ROWS_PER_SPLIT = 512
#: Programs the d_weight GEMM aims for (a few waves of a large GPU); shapes alone decide.
_TARGET_PROGRAMS = 512


def _dw_splits(M: int, tiles: int, BLOCK_M: int) -> Tuple[int, int]:
    """(rows per split, number of splits): a function of the shapes only, so bits are reproducible."""
    want = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(M, _MIN_ROWS_PER_SPLIT)))
    rows = triton.cdiv(triton.cdiv(M, want), BLOCK_M) * BLOCK_M
    return rows, triton.cdiv(M, rows)


def _sum_partials(part: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Sum (S, N) partials over S in a fixed order into (N,) of ``out_dtype``."""
    S, N = part.shape
    out = torch.empty((N,), device=part.device, dtype=out_dtype)
    BLOCK = 1024
    _, acc_tl = _acc_dtypes(part.dtype)
    with _device_ctx(part):
        _sum_partials_kernel[(triton.cdiv(N, BLOCK),)](part, out, S, N, BLOCK=BLOCK, ACC_DTYPE=acc_tl, num_warps=4)
    return out


def patch_embed_backward(grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                         needs_images_grad: bool):
    """(d_images | None, d_weight, d_bias | None, d_pos_embed, d_cls_token); see backends.pytorch."""
    B, Cin, H, W, C, ph, pw = _dims(images, weight)
    GH, GW = H // ph, W // pw
    P, K, M = GH * GW, Cin * ph * pw, B * GH * GW
    T = 1 + P
    acc_torch, acc_tl = _acc_dtypes(images.dtype)
    precision = _input_precision(images.dtype)
    dot_fp32 = _dot_fp32(images)
    large = _large_tiles(images)
    dev = images.device
    sg = grad_out.stride()

    with _device_ctx(images):
        # d_pos (and d_cls, d_bias from it): sums over the batch, in batch order.
        BT, BN = _pos_config(T, C, large)
        t_tiles = triton.cdiv(T, BT)
        store = _store_dtype(images, weight.dtype)
        d_pos = torch.empty((T, C), device=dev, dtype=store)
        bias_part = torch.empty((t_tiles, C), device=dev, dtype=acc_torch)
        _patch_embed_bwd_pos_kernel[(t_tiles * triton.cdiv(C, BN),)](
            grad_out, d_pos, bias_part, B, T, C, *sg,
            BLOCK_T=BT, BLOCK_N=BN, ACC_DTYPE=acc_tl, num_warps=4)
        d_pos = _finish(d_pos, weight.dtype)
        d_cls = d_pos[0].clone()
        d_bias = _finish(_sum_partials(bias_part, store), weight.dtype) if has_bias else None

        # d_weight: (C, K) = g^T (C x M) @ patches (M x K), split over M into fixed partials.
        BM, BN, BK, warps, stages = _gemm_config(M, C, K, images.dtype, large)
        tiles = triton.cdiv(C, BN) * triton.cdiv(K, BK)
        rows_per_split, splits = _dw_splits(M, tiles, BM)
        part = torch.empty((splits, C, K), device=dev, dtype=store if splits == 1 else acc_torch)
        _patch_embed_bwd_dw_kernel[(tiles, splits)](
            grad_out, images, part, M, P, GW, C, K, rows_per_split,
            *sg, *images.stride(),
            PH=ph, PW=pw, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=warps, num_stages=stages)
        if splits == 1:
            d_weight = _finish(part.reshape(C, Cin, ph, pw), weight.dtype)
        else:
            d_weight = _finish(_sum_partials(part.reshape(splits, C * K), store), weight.dtype).reshape(C, Cin, ph, pw)

        d_images = None
        if needs_images_grad:
            w2 = weight.reshape(C, K).contiguous()
            d_images = torch.empty((B, Cin, H, W), device=dev, dtype=_store_dtype(images, images.dtype))
            BM, BN, BK, warps, stages = _gemm_config(M, K, C, images.dtype, large)
            _patch_embed_bwd_dx_kernel[(triton.cdiv(M, BM) * triton.cdiv(K, BN),)](
                grad_out, w2, d_images, M, P, GW, C, K,
                *sg, *d_images.stride(),
                PH=ph, PW=pw, BLOCK_M=BM, BLOCK_N=BK, BLOCK_K=BN,
                ACC_DTYPE=acc_tl, INPUT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=warps, num_stages=stages)
            d_images = _finish(d_images, images.dtype)
    return d_images, d_weight, d_bias, d_pos, d_cls
