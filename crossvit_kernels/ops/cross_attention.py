"""Single-query cross-attention: CrossViT's whole CrossAttentionBlock as one op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends as _backends
from . import _library  # registers the torch.library ops
from ._checks import FLOAT_DTYPES, autocast_device, check_backend_arg, check_same, check_tensor, promote_floats

Tensor = torch.Tensor

__all__ = ["cross_attention"]


def cross_attention(
    x_cls: Tensor,
    x_tokens: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
    num_heads: int,
    eps: float = 1e-6,
    backend: Optional[str] = None,
) -> Tensor:
    """CrossViT's cross-attention block: the CLS token attends, as the single query, to itself and
    the other branch's patch tokens; returns the new CLS token.

    Args:
        x_cls: (B, C) the query CLS token.
        x_tokens: (B, M, C) the patch tokens it attends to (M >= 0); may be a strided view such as
            ``branch[:, 1:]`` (it is never copied or concatenated on the fused backends).
        norm_weight, norm_bias: (C,) LayerNorm affine parameters (``norm1``), or None.
        wq, wk, wv, wo: (C, C) query, key, value and output projection weights.
        bq, bk, bv, bo: (C,) their biases, or None.
        num_heads: H, which must divide C.
        eps: LayerNorm epsilon (CrossViT uses 1e-6).
        backend: None (the current default, normally ``"auto"``), ``"auto"``, ``"triton"``,
            ``"cuda"``, ``"cpp"``, ``"torch"`` or ``"reference"``.

    Returns:
        (B, C) in the dtype of ``x_cls``. Under ``torch.autocast`` the inputs are first promoted to
        their widest floating dtype (timm's block promotes the same way in its ``torch.cat``) and
        the fused backends compute in it, autocast off; ``"reference"`` keeps autocast, as timm.

    Equivalent PyTorch (the ``"reference"`` backend, as timm computes it)::

        x = torch.cat([x_cls[:, None], x_tokens], dim=1)                       # (B, N, C)
        x = F.layer_norm(x, (C,), norm_weight, norm_bias, eps)
        q = F.linear(x[:, :1], wq, bq).reshape(B, 1, H, C // H).transpose(1, 2)
        k = F.linear(x, wk, bk).reshape(B, N, H, C // H).transpose(1, 2)
        v = F.linear(x, wv, bv).reshape(B, N, H, C // H).transpose(1, 2)
        a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
        out = x_cls + F.linear((a @ v).transpose(1, 2).reshape(B, C), wo, bo)

    The fused backends never form K, V or the concatenation: the key projection is absorbed into
    the query and the value projection applied after the weighted sum (DESIGN.md section 2), so
    the key bias cannot change the output; it still receives its (exactly zero) gradient.
    """
    return _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                            num_heads, eps, backend, residual=True)


def _validate(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend):
    if _valid_fast(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend):
        return
    _validate_full(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend)


def _valid_fast(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend):
    """True when every check of :func:`_validate_full` passes, decided with a few attribute reads.

    The op is host-bound at CrossViT's sizes, and the full checks (twelve ``check_tensor`` calls,
    a dict, a device comparison per tensor) cost as much as several kernel launches. This is the
    same set of conditions, tested in one pass against ``x_cls``; any failure (or anything
    unusual) falls through to the full checks, which raise the precise message.
    """
    if not (isinstance(x_cls, Tensor) and isinstance(x_tokens, Tensor) and x_cls.dim() == 2
            and x_tokens.dim() == 3 and x_cls.dtype in FLOAT_DTYPES):
        return False
    B, C = x_cls.shape
    if B == 0 or C == 0 or x_tokens.shape[0] != B or x_tokens.shape[2] != C:
        return False
    if type(num_heads) is not int or num_heads <= 0 or C % num_heads:
        return False
    if type(eps) not in (float, int) or not eps > 0:
        return False
    if backend is not None and not isinstance(backend, str):
        return False
    dtype, device = x_cls.dtype, x_cls.device
    if x_tokens.dtype != dtype or x_tokens.device != device:
        return False
    for t in (wq, wk, wv, wo):
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device or t.shape != (C, C):
            return False
    for t in (norm_weight, norm_bias, bq, bk, bv, bo):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != dtype or t.device != device
                              or t.shape != (C,)):
            return False
    return True


def _validate_full(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend):
    check_tensor("x_cls", x_cls, ndim=2)
    check_tensor("x_tokens", x_tokens, ndim=3)
    B, C = x_cls.shape
    if x_tokens.shape[0] != B:
        raise ValueError(f"batch sizes disagree: x_cls has {B} rows but x_tokens has {x_tokens.shape[0]}")
    if x_tokens.shape[2] != C:
        raise ValueError(f"widths disagree: x_cls has C={C} but x_tokens has C={x_tokens.shape[2]}")
    if C == 0 or B == 0:
        raise ValueError(f"empty input: x_cls has shape {tuple(x_cls.shape)}; need B >= 1 and C >= 1")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("bq", bq), ("bk", bk),
                    ("bv", bv), ("bo", bo)):
        check_tensor(name, t, shape=(C,), optional=True)
    for name, t in (("wq", wq), ("wk", wk), ("wv", wv), ("wo", wo)):
        check_tensor(name, t, shape=(C, C))
    check_same(dict(x_cls=x_cls, x_tokens=x_tokens, norm_weight=norm_weight, norm_bias=norm_bias, wq=wq, bq=bq,
                    wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo))
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if C % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width C={C}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    check_backend_arg(backend)


def _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps,
                     backend, residual: bool, attn_drop: float = 0.0, training: bool = False) -> Tensor:
    """The op, optionally without the residual (used by the module when drop-path is active)."""
    ac = autocast_device(x_cls)
    if ac is not None:
        # torch.autocast hands a CrossViT fusion mixed dtypes (a bfloat16 CLS from autocast's
        # projection, the float32 residual stream, float32 parameters): promote them to the widest.
        # The fused math then runs in that dtype with autocast off (its float32 projections are
        # part of its accuracy); "reference" and attention dropout keep autocast, as timm's block.
        (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo) = promote_floats(
            x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo)
        name = backend if backend is not None else _backends.get_default_backend()
        if name != "reference" and not (attn_drop > 0.0 and training):
            with torch.autocast(ac, enabled=False):
                return _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                        num_heads, eps, backend, residual, attn_drop, training)
    _validate(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend)
    name = backend if backend is not None else _backends.get_default_backend()
    name = _backends._check_name(name)
    if name != "reference" and not (attn_drop > 0.0 and training):
        out = _fused_triton_inference(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                      num_heads, float(eps), name, residual)
        if out is not None:
            return out
    if name == "reference" or (attn_drop > 0.0 and training):
        # attention dropout needs the probabilities of every token: only the textbook form has them
        delta = _reference_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                 num_heads, float(eps), attn_drop if training else 0.0)
    else:
        delta = _absorbed_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                num_heads, float(eps), name)
    return x_cls + delta if residual else delta


def _fused_triton_inference(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, H, eps,
                            name, residual) -> Optional[Tensor]:
    """The triton backend's forward in four or five kernels (its projections fused, see
    crossvit_kernels/triton/projections.py) when no input needs a gradient, in plain eager mode;
    None where the general path must run (autograd, a tracer or compiler watching, float64,
    another backend)."""
    if not (x_cls.is_cuda or name == "triton"):  # "auto" picks triton for CUDA tensors only
        return None
    tensors = [t for t in (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if x_cls.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not _library._plain_eager(*tensors):
        return None
    if _backends.resolve_backend("cross_attention", name, x_cls.device, x_cls.dtype) != "triton":
        return None
    from ..triton import projections  # importable: the triton backend resolved
    if not projections.fused_projections_enabled():
        return None
    return projections.cross_attention_forward_fused(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv,
                                                     wo, bo, H, eps, residual=residual)


def _reference_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, H, eps, attn_drop):
    B, C = x_cls.shape
    x = torch.cat([x_cls.unsqueeze(1), x_tokens], dim=1)
    N = x.shape[1]
    x = F.layer_norm(x, (C,), norm_weight, norm_bias, eps)
    q = F.linear(x[:, 0:1], wq, bq).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)
    k = F.linear(x, wk, bk).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    v = F.linear(x, wv, bv).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    attn = attn.softmax(dim=-1)
    if attn_drop > 0:
        attn = F.dropout(attn, attn_drop, training=True)
    o = (attn @ v).transpose(1, 2).reshape(B, 1, C)
    return F.linear(o, wo, bo).reshape(B, C)


def _absorbed_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, H, eps, backend):
    # Host-bound at CrossViT's sizes (every GEMM here has B rows): each line is the fewest eager
    # ops, and so the fewest autograd nodes, that compute it. Per-head products are bmm over views
    # (torch.einsum costs several times a bmm in Python and adds permute/view nodes), bias adds and
    # scales are folded into baddbmm / addcmul / one (C,) vector, and nothing is cast when the
    # dtype is already the accumulation dtype.
    B, C = x_cls.shape
    d = C // H
    dtype = x_cls.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x0 = x_cls
    if dtype != acc:  # the O(C^2) projections run in float32 around the core (a few GEMMs of B rows)
        x0, norm_weight, norm_bias, wq, bq, wk, bv, wv, wo, bo = (
            None if t is None else t.to(acc)
            for t in (x_cls, norm_weight, norm_bias, wq, bq, wk, bv, wv, wo, bo))
    gamma, beta = norm_weight, norm_bias
    y0 = F.layer_norm(x0, (C,), gamma, beta, eps)                                        # (B, C)
    q = F.linear(y0, wq, bq)                                                             # (B, C)
    # key absorbed, per head: (H, B, d) @ (H, d, C) -> (H, B, C), seen as (B, H, C)
    u = torch.bmm(q.view(B, H, d).transpose(0, 1), wk.reshape(H, d, C)).transpose(0, 1)
    scale = gamma * d ** -0.5 if gamma is not None else None                             # gamma folded
    if bk is not None and bk.requires_grad and torch.is_grad_enabled():
        # The key bias shifts every score of a head by the same amount: softmax ignores it. Tie it
        # to the graph with an exact zero so that it gets the zero gradient timm gives it (an
        # optimizer with weight decay treats "no gradient" and "zero gradient" differently).
        if scale is None:
            scale = torch.full((C,), d ** -0.5, dtype=acc, device=x_cls.device)
        scale = torch.add(scale, bk, alpha=0)
    w = u * scale if scale is not None else u * d ** -0.5                                # (B, H, C)
    z, _, _, _ = _library.run_cross_attention_core(x_cls, x_tokens, w, eps, backend)
    if gamma is not None and beta is not None:
        z = torch.addcmul(beta, z, gamma)
    elif gamma is not None:
        z = z * gamma
    elif beta is not None:
        z = z + beta
    # value applied after, per head: (H, B, C) @ (H, C, d) -> (H, B, d), plus the value bias
    zt, wvt = z.transpose(0, 1), wv.reshape(H, d, C).transpose(1, 2)
    o = torch.baddbmm(bv.reshape(H, 1, d), zt, wvt) if bv is not None else torch.bmm(zt, wvt)
    out = F.linear(o.transpose(0, 1).reshape(B, C), wo, bo)
    return out if dtype == acc else out.to(dtype)
