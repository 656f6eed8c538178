"""Triton kernels of the linear patch embedding (docs/design.md, section 3).

Forward: one kernel. Each program computes a (BLOCK_M token rows) x (BLOCK_N channels) tile of

    out[b, 1 + p, :] = W . patch(b, p) + bias + pos_embed[1 + p]

as a GEMM over K = Cin * ph * pw whose left operand is gathered straight from the NCHW image
(row m = b * P + p; column k = (ci, ky, kx)), with fp32 accumulation (fp64 for float64), and
writes it behind the CLS row of the token buffer. The programs whose tile holds the first patch
of a batch row also write that row's ``cls_token + pos_embed[0]``: no cat, no separate add.

The K axis (ci, ky, kx) is walked with each patch row padded to PWP = the next power of two of
PW: kx = k % PWP keeps a patch row's PW pixels contiguous to the compiler, so the image tile is
fetched with wide asynchronous copies into shared memory (pipelined) instead of one 2-byte load
per pixel (the 12-pixel rows of CrossViT's small branch are 24 bytes); the padded columns are
masked and the weight is read with the same padded index.

Backward (given g = dL/d out), in at most two launches:

    1. a job table: the d_weight tiles, d_weight[c, k] = sum_{b, p} g[b, 1 + p, c] patch(b, p)[k]
       over the rows of one split each (a shape-determined number of splits, partials when more
       than one); the d_images tiles, (g[:, 1:] @ W) scattered back to NCHW (patches do not overlap:
       every pixel is written once), only when the images need a gradient; the d_pos tiles,
       d_pos[t, c] = sum_b g[b, t, c] in batch order, whose row 0 is d_cls and whose rows t >= 1
       give d_bias' partial per token tile;
    2. only when something was split: the fixed-order sums of the d_weight and d_bias partials.

No atomics anywhere.

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
def _patch_cols(ks, KP, s_c, s_h, s_w, PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr):
    """Padded patch columns k = (ci * PH + ky) * PWP + kx (PWP: PW rounded up to a power of two)
    -> (offset inside the patch, column of the (C, Cin * PH * PW) weight, valid). The padding makes
    kx = k % PWP a power-of-two split: runs of PW contiguous pixels stay contiguous to the compiler,
    so a patch row is loaded with vector accesses (a 12-pixel row is 24 bytes of a 2-byte image)."""
    kx = ks % PWP
    r = ks // PWP
    ci = r // PH
    ky = r - ci * PH
    ok = (kx < PW) & (ks < KP)
    return ci.to(tl.int64) * s_c + ky.to(tl.int64) * s_h + kx.to(tl.int64) * s_w, r * PW + kx, ok


@triton.jit
def _patch_embed_fwd_kernel(
    images_ptr,                 # (B, Cin, H, W), strides s_ib, s_ic, s_ih, s_iw
    weight_ptr,                 # (C, K) contiguous, K = Cin * PH * PW
    bias_ptr,                   # (C,) contiguous (unused without HAS_BIAS)
    pos_ptr,                    # (1 + P, C), strides s_pt, s_pc
    cls_ptr,                    # (C,), stride s_cls
    out_ptr,                    # (B, 1 + P, C) contiguous
    M, P, GW, C, K, KP,         # M = B * P rows, GW = patches per grid row, KP = Cin * PH * PWP
    s_ib, s_ic, s_ih, s_iw,
    s_pt, s_pc, s_cls,
    HAS_BIAS: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    for k0 in range(0, KP, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_col, w_col, k_ok = _patch_cols(ks, KP, s_ic, s_ih, s_iw, PH, PW, PWP)
        a = tl.load(images_ptr + (a_row[:, None] + a_col[None, :]),
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)                  # (BM, BK)
        w = tl.load(weight_ptr + (cols[None, :] * K + w_col[:, None]),
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)                  # (BK, BN)
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
def _bwd_dw_tile(pid, split, grad_ptr, images_ptr, dw_ptr, M, P, GW, C, K, KP, ROWS_PER_SPLIT,
                 s_gb, s_gt, s_gc, s_ib, s_ic, s_ih, s_iw,
                 PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """d_weight's (BLOCK_N, BLOCK_K) tile over the rows of one split (a partial when split)."""
    num_k = tl.cdiv(KP, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid - pid_n * num_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < C
    a_col, w_col, k_ok = _patch_cols(ks, KP, s_ic, s_ih, s_iw, PH, PW, PWP)
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
        acc = tl.dot(g_t.to(a.dtype), a, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    out = dw_ptr + split * C * K + (cols[:, None] * K + w_col[None, :])
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _bwd_dx_tile(pid, grad_ptr, weight_ptr, dimages_ptr, M, P, GW, C, K, KP,
                 s_gb, s_gt, s_gc, s_db, s_dc, s_dh, s_dw,
                 PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """d_images' (BLOCK_M patches, BLOCK_K padded columns) tile: g[:, 1:] @ W, scattered back
    (patches do not overlap: every pixel is written once)."""
    num_k = tl.cdiv(KP, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid - pid_m * num_k
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    b, p, d_row = _patch_rows(rows, P, GW, s_db, s_dh, s_dw, PH, PW)
    d_col, w_col, k_ok = _patch_cols(ks, KP, s_dc, s_dh, s_dw, PH, PW, PWP)
    g_row = b * s_gb + (1 + p) * s_gt
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, C, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        g = tl.load(grad_ptr + (g_row[:, None] + cols[None, :].to(tl.int64) * s_gc),
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)                # (BM, BN)
        w = tl.load(weight_ptr + (cols[:, None].to(tl.int64) * K + w_col[None, :]),
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)                  # (BN, BK)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    tl.store(dimages_ptr + (d_row[:, None] + d_col[None, :]), acc.to(dimages_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _bwd_pos_tile(pid, grad_ptr, dpos_ptr, dcls_ptr, bias_part_ptr, B, T, C, s_gb, s_gt, s_gc,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """d_pos's (BLOCK_T, BLOCK_N) tile (the batch summed in order), d_cls from its row 0, and
    this tile's sum over its rows t >= 1 (d_bias' partial)."""
    num_n = tl.cdiv(C, BLOCK_N)
    pid_t = pid // num_n
    pid_n = pid - pid_t * num_n
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < C
    mask = (toks < T)[:, None] & col_ok[None, :]
    ptrs = grad_ptr + (toks[:, None] * s_gt + cols[None, :] * s_gc)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC_DTYPE)
    for _ in range(0, B):                                    # batch rows in order: deterministic
        acc += tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        ptrs += s_gb
    tl.store(dpos_ptr + (toks[:, None] * C + cols[None, :]), acc.to(dpos_ptr.dtype.element_ty), mask=mask)
    row0 = tl.sum(tl.where((toks == 0)[:, None], acc, 0.0), axis=0)
    tl.store(dcls_ptr + cols, row0.to(dcls_ptr.dtype.element_ty), mask=col_ok & (pid_t == 0))
    part = tl.sum(tl.where(mask & (toks >= 1)[:, None], acc, 0.0), axis=0)
    tl.store(bias_part_ptr + (pid_t * C + cols), part.to(bias_part_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _patch_embed_bwd_kernel(
    grad_ptr,                   # (B, 1 + P, C), strides s_gb, s_gt, s_gc
    images_ptr,                 # (B, Cin, H, W), strides s_ib, s_ic, s_ih, s_iw
    weight_ptr,                 # (C, K) contiguous
    dw_ptr,                     # (SPLITS, C, K): d_weight, or its partials
    dimages_ptr,                # (B, Cin, H, W) (unused without DX), strides s_db, s_dc, s_dh, s_dw
    dpos_ptr, dcls_ptr,         # (T, C), (C,)
    bias_part_ptr,              # (T_TILES, C): d_bias, or its partials
    B, T, M, P, GW, C, K, KP, ROWS_PER_SPLIT, N_DW, N_DX,
    s_gb, s_gt, s_gc,
    s_ib, s_ic, s_ih, s_iw,
    s_db, s_dc, s_dh, s_dw,
    PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr,
    WM: tl.constexpr, WN: tl.constexpr, WK: tl.constexpr,
    XM: tl.constexpr, XN: tl.constexpr, XK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_PN: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The backward's first launch, a job table: [0, N_DW) d_weight tiles x splits, then N_DX
    d_images tiles (zero without DX), then the d_pos / d_cls / d_bias-partial tiles."""
    pid = tl.program_id(0)
    if pid < N_DW:
        tiles = tl.cdiv(C, WN) * tl.cdiv(KP, WK)
        _bwd_dw_tile((pid % tiles).to(tl.int64), (pid // tiles).to(tl.int64), grad_ptr, images_ptr, dw_ptr, M, P,
                     GW, C, K, KP, ROWS_PER_SPLIT, s_gb, s_gt, s_gc, s_ib, s_ic, s_ih, s_iw, PH, PW, PWP, WM, WN, WK,
                     ACC_DTYPE, INPUT_PRECISION)
    elif pid < N_DW + N_DX:
        _bwd_dx_tile((pid - N_DW).to(tl.int64), grad_ptr, weight_ptr, dimages_ptr, M, P, GW, C, K, KP,
                     s_gb, s_gt, s_gc, s_db, s_dc, s_dh, s_dw, PH, PW, PWP, XM, XN, XK, ACC_DTYPE, INPUT_PRECISION)
    else:
        _bwd_pos_tile((pid - N_DW - N_DX).to(tl.int64), grad_ptr, dpos_ptr, dcls_ptr, bias_part_ptr, B, T, C,
                      s_gb, s_gt, s_gc, BLOCK_T, BLOCK_PN, ACC_DTYPE)


@triton.jit
def _patch_embed_bwd_finish_kernel(
    dw_part_ptr,                # (S, C * K) partials (S > 1)
    dw_ptr,                     # (C * K,)
    bias_part_ptr,              # (T_TILES, C) partials
    dbias_ptr,                  # (C,)
    S, CK, T_TILES, C, N_W,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The backward's second launch (only when something is split): [0, N_W) blocks of d_weight
    summed over its S partials, then the blocks of d_bias summed over its T_TILES; in order."""
    pid = tl.program_id(0)
    if pid < N_W:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < CK
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        for s in range(0, S):
            acc += tl.load(dw_part_ptr + s * CK + offs, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)
    else:
        offs = (pid - N_W).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < C
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        for t in range(0, T_TILES):
            acc += tl.load(bias_part_ptr + t * C + offs, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(dbias_ptr + offs, acc.to(dbias_ptr.dtype.element_ty), mask=ok)


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

def _padded(pw: int) -> int:
    """PW rounded up to a power of two (the padded patch-row width of _patch_cols)."""
    return triton.next_power_of_2(pw)


def patch_embed_forward(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                        cls_token: Tensor) -> Tensor:
    """(B, 1 + P, C) in the images' dtype, one launch; see ``crossvit_kernels.backends.pytorch``."""
    B, Cin, H, W, C, ph, pw = _dims(images, weight)
    GH, GW = H // ph, W // pw
    pwp = _padded(pw)
    P, K, KP, M = GH * GW, Cin * ph * pw, Cin * ph * pwp, B * GH * GW
    w2 = weight.reshape(C, K)
    if not w2.is_contiguous():
        w2 = w2.contiguous()
    b1 = bias if bias is not None else w2  # any valid pointer when there is no bias
    out = _empty((B, 1 + P, C), images.dtype, images.device)
    _, acc_tl = _acc_dtypes(images.dtype)
    BM, BN, BK, warps, stages = _gemm_config(M, C, KP, images.dtype, _large_tiles(images))
    BK = max(BK, pwp)
    grid = (triton.cdiv(M, BM) * triton.cdiv(C, BN),)
    with _device_ctx(images):
        _patch_embed_fwd_kernel[grid](
            images, w2, b1, pos_embed, cls_token, out,
            M, P, GW, C, K, KP,
            *images.stride(), *pos_embed.stride(), cls_token.stride(0),
            HAS_BIAS=bias is not None, PH=ph, PW=pw, PWP=pwp, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=_input_precision(images.dtype), num_warps=warps, num_stages=stages)
    return out


#: Rows of the d_weight reduction handled by one program at least (fewer partial buffers).
_MIN_ROWS_PER_SPLIT = 512
#: Programs the d_weight GEMM aims for (a few waves of a large GPU); shapes alone decide.
_TARGET_PROGRAMS = 512


def _dw_splits(M: int, tiles: int, BLOCK_M: int) -> Tuple[int, int]:
    """(rows per split, number of splits): a function of the shapes only, so bits are reproducible."""
    want = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(M, _MIN_ROWS_PER_SPLIT)))
    rows = triton.cdiv(triton.cdiv(M, want), BLOCK_M) * BLOCK_M
    return rows, triton.cdiv(M, rows)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate comes from here (tests poison them through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def patch_embed_backward(grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                         needs_images_grad: bool):
    """(d_images | None, d_weight, d_bias | None, d_pos_embed, d_cls_token), in at most two
    launches: a job table of the d_weight tiles (split over the rows), the d_images tiles and the
    d_pos / d_cls / d_bias-partial tiles; then, when the rows or the tokens were split, the fixed-
    order sums of the partials. See backends.pytorch."""
    B, Cin, H, W, C, ph, pw = _dims(images, weight)
    GH, GW = H // ph, W // pw
    pwp = _padded(pw)
    P, K, KP, M = GH * GW, Cin * ph * pw, Cin * ph * pwp, B * GH * GW
    T = 1 + P
    acc_torch, acc_tl = _acc_dtypes(images.dtype)
    precision = _input_precision(images.dtype)
    large = _large_tiles(images)
    dev = images.device
    sg = grad_out.stride()
    w2 = weight.reshape(C, K)
    if not w2.is_contiguous():
        w2 = w2.contiguous()

    # d_weight: (C, K) = g^T (C x M) @ patches (M x K), split over M into fixed partials
    WM, WN, WK, warps_w, stages_w = _gemm_config(M, C, KP, images.dtype, large)
    WK = max(WK, pwp)
    dw_tiles = triton.cdiv(C, WN) * triton.cdiv(KP, WK)
    rows_per_split, splits = _dw_splits(M, dw_tiles, WM)
    d_weight = _empty((C, Cin, ph, pw), weight.dtype, dev)
    dw_part = d_weight if splits == 1 else _empty((splits, C, K), acc_torch, dev)
    # d_images: (M, K) = g (M x C) @ W (C x K)
    XM, XK, XN, warps_x, stages_x = _gemm_config(M, KP, C, images.dtype, large)
    XK = max(XK, pwp)
    dx_tiles = triton.cdiv(M, XM) * triton.cdiv(KP, XK) if needs_images_grad else 0
    d_images = _empty((B, Cin, H, W), images.dtype, dev) if needs_images_grad else None
    di = d_images if d_images is not None else images
    # d_pos, d_cls, d_bias
    BT, BPN = _pos_config(T, C, large)
    t_tiles = triton.cdiv(T, BT)
    d_pos = _empty((T, C), weight.dtype, dev)
    d_cls = _empty((C,), weight.dtype, dev)
    d_bias = _empty((C,), weight.dtype, dev) if has_bias else None
    bias_part = (d_bias if t_tiles == 1 and has_bias else _empty((t_tiles, C), acc_torch, dev))
    pos_tiles = t_tiles * triton.cdiv(C, BPN)
    warps = max(warps_w, warps_x if needs_images_grad else 4)
    with _device_ctx(images):
        _patch_embed_bwd_kernel[(dw_tiles * splits + dx_tiles + pos_tiles,)](
            grad_out, images, w2, dw_part, di, d_pos, d_cls, bias_part,
            B, T, M, P, GW, C, K, KP, rows_per_split, dw_tiles * splits, dx_tiles,
            *sg, *images.stride(), *di.stride(),
            PH=ph, PW=pw, PWP=pwp, WM=WM, WN=WN, WK=WK, XM=XM, XN=XN, XK=XK, BLOCK_T=BT, BLOCK_PN=BPN,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=precision, num_warps=warps, num_stages=min(stages_w, stages_x))
        finish_w = splits > 1
        finish_b = has_bias and t_tiles > 1
        if finish_w or finish_b:
            BLOCK = 1024
            n_w = triton.cdiv(C * K, BLOCK) if finish_w else 0
            n_b = triton.cdiv(C, BLOCK) if finish_b else 0
            _patch_embed_bwd_finish_kernel[(n_w + n_b,)](
                dw_part, d_weight, bias_part, d_bias if d_bias is not None else d_cls,
                splits, C * K, t_tiles, C, n_w, BLOCK=BLOCK, ACC_DTYPE=acc_tl, num_warps=4)
    return d_images, d_weight, d_bias, d_pos, d_cls
