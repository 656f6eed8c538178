"""Single-query cross-attention: CrossViT's whole CrossAttentionBlock as one op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends as _backends
from . import _library  # noqa: F401  (registers the torch.library ops)
from ._checks import check_backend_arg, check_same, check_tensor

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
        (B, C) in the dtype of ``x_cls``.

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
    _validate(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend)
    name = backend if backend is not None else _backends.get_default_backend()
    name = _backends._check_name(name)
    if name == "reference" or (attn_drop > 0.0 and training):
        # attention dropout needs the probabilities of every token: only the textbook form has them
        delta = _reference_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                 num_heads, float(eps), attn_drop if training else 0.0)
    else:
        delta = _absorbed_delta(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                num_heads, float(eps), name)
    return x_cls + delta if residual else delta


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
    B, C = x_cls.shape
    d = C // H
    dtype = x_cls.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def up(t):
        return None if t is None else t.to(acc)

    gamma, beta = up(norm_weight), up(norm_bias)
    # The O(C^2) projections run in float32 around the core (a few GEMMs of B rows).
    y0 = F.layer_norm(x_cls.to(acc), (C,), gamma, beta, eps)                          # (B, C)
    q = F.linear(y0, wq.to(acc), up(bq)).reshape(B, H, d)
    u = torch.einsum("bhd,hdc->bhc", q, wk.to(acc).reshape(H, d, C)) * d ** -0.5       # key absorbed
    w = u * gamma if gamma is not None else u                                          # gamma folded
    z, _, _, _ = torch.ops.crossvit_kernels.cross_attention_core(x_cls, x_tokens, w, eps, backend)
    zz = z * gamma if gamma is not None else z
    if beta is not None:
        zz = zz + beta
    o = torch.einsum("bhc,hdc->bhd", zz, wv.to(acc).reshape(H, d, C))                  # value applied after
    if bv is not None:
        o = o + bv.to(acc).reshape(H, d)
    out = F.linear(o.reshape(B, C), wo.to(acc), up(bo))
    if bk is not None and bk.requires_grad:
        # The key bias shifts every score of a head by the same amount: softmax ignores it. Tie it
        # to the graph with an exact zero so that it gets the zero gradient timm gives it (an
        # optimizer with weight decay treats "no gradient" and "zero gradient" differently).
        out = out + (bk.to(acc) * 0).sum()
    return out.to(dtype)
