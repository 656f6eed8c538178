"""Single-query cross-attention: CrossViT's whole CrossAttentionBlock as one op.

The op's one home: its public entry and argument checks, its ``torch.library`` registration
(``crossvit_kernels::cross_attention`` and ``crossvit_kernels::cross_attention_backward``) with
fake implementations and the autograd formula, and the eager fast path. The backend resolved at
the entry runs the whole op through the contract of :mod:`crossvit_kernels.backends.base`, by the
same methods in eager mode, under ``torch.compile`` and under ``torch.export``.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends as _backends
from ..backends.base import FLOAT_DTYPES, absorbed_cross_attention, acc_dtype
from ..backends.reference import ReferenceBackend
from ._common import (autocast_device, check_backend_arg, check_same, check_tensor, plain_eager, promote_floats,
                      traced_as_aten)

Tensor = torch.Tensor

__all__ = ["cross_attention"]

_PARAMS = ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


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
        x_cls: (B, C) the query CLS token (B >= 0).
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
    the query and the value projection applied after the weighted sum (docs/design.md, section
    2), so the key bias cannot change the output; it still receives its (exactly zero) gradient.
    Under ONNX export and torch.func transforms the op runs as that absorbed formulation in
    standard operators (see :func:`crossvit_kernels.ops._common.traced_as_aten`).
    """
    return _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                            num_heads, eps, backend, residual=True)


def _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps,
                     backend, residual: bool, attn_drop: float = 0.0, training: bool = False) -> Tensor:
    """The op, optionally without the residual (the module's form when drop-path is active) and
    with attention dropout (which only the textbook form can apply)."""
    dropout = attn_drop > 0.0 and training
    ac = autocast_device(x_cls)
    if ac is not None:
        # torch.autocast hands a CrossViT fusion mixed dtypes (a bfloat16 CLS from autocast's
        # projection, the float32 residual stream, float32 parameters): promote them to the widest.
        # The fused math then runs in that dtype with autocast off (its float32 projections are
        # part of its accuracy); "reference" and attention dropout keep autocast, as timm's block.
        (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo) = promote_floats(
            x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo)
        name = backend if backend is not None else _backends.get_default_backend()
        if name != "reference" and not dropout:
            with torch.autocast(ac, enabled=False):
                return _cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo,
                                        num_heads, eps, backend, residual, attn_drop, training)
    _validate(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend)
    name = _backends.check_name(backend if backend is not None else _backends.get_default_backend())
    eps = float(eps)
    if name == "reference" or dropout or x_cls.shape[0] == 0:
        # an empty batch has nothing to fuse: the textbook form gives the empty result and its graph
        return ReferenceBackend.cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo,
                                                bo, num_heads, eps, residual, attn_drop if training else 0.0)
    if traced_as_aten():
        # the absorbed formulation in standard, differentiable operators: no custom op in the graph
        return absorbed_cross_attention(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo, num_heads,
                                        eps, residual)
    args = (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    name = _backends.resolve_backend("cross_attention", name, x_cls.device, x_cls.dtype,
                                     {"B": x_tokens.shape[0], "M": x_tokens.shape[1], "C": x_tokens.shape[2],
                                      "H": num_heads}, backward=grad)
    if not plain_eager(args):
        return torch.ops.crossvit_kernels.cross_attention(*args, num_heads, eps, residual, name)[0]
    if grad:
        return CrossAttentionFunction.apply(*args, num_heads, eps, residual, name)[0]
    with torch.no_grad():  # the torch backend must not record a graph
        return _backends.get_backend(name).cross_attention_forward(
            x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo, num_heads, eps, residual)[0]


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _validate(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, backend):
    if not _valid_fast(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps,
                       backend):
        _validate_full(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps,
                       backend)


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
    if C == 0 or x_tokens.shape[0] != B or x_tokens.shape[2] != C:
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
    if C == 0:
        raise ValueError(f"empty width: x_cls has shape {tuple(x_cls.shape)}; need C >= 1")
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


# ---------------------------------------------------------------------------------------------
# torch.library registration: the op, its backward, their fake implementations, the autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("crossvit_kernels::cross_attention", mutates_args=())
def _cross_attention_op(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                        wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], wv: Tensor,
                        bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], num_heads: int, eps: float,
                        residual: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out, q, w, z, lse, o): the whole-op forward of crossvit_kernels.backends.base."""
    return tuple(_backends.get_backend(backend).cross_attention_forward(
        x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo, num_heads, eps, residual))


@_cross_attention_op.register_fake
def _(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, residual, backend):
    B, C = x_cls.shape
    acc = acc_dtype(x_cls.dtype)
    out = x_cls.new_empty((B, C))
    q, o = x_cls.new_empty((B, C), dtype=acc), x_cls.new_empty((B, C), dtype=acc)
    w, z = x_cls.new_empty((B, num_heads, C), dtype=acc), x_cls.new_empty((B, num_heads, C), dtype=acc)
    return out, q, w, z, x_cls.new_empty((B, num_heads), dtype=acc), o


@torch.library.custom_op("crossvit_kernels::cross_attention_backward", mutates_args=())
def _cross_attention_backward_op(grad_out: Tensor, x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                                 norm_bias: Optional[Tensor], wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor,
                                 q: Tensor, w: Tensor, z: Tensor, lse: Tensor, o: Tensor, num_heads: int, eps: float,
                                 residual: bool, needs: Sequence[bool], backend: str) -> List[Tensor]:
    """The twelve gradients of the op's inputs; an empty tensor where ``needs`` is False."""
    grads = _backends.get_backend(backend).cross_attention_backward(
        grad_out, x_cls, x_tokens, norm_weight, norm_bias, wq, wk, wv, wo, q, w, z, lse, o, num_heads, eps,
        residual, needs)
    return [g if g is not None else x_cls.new_empty((0,)) for g in grads]


@_cross_attention_backward_op.register_fake
def _(grad_out, x_cls, x_tokens, norm_weight, norm_bias, wq, wk, wv, wo, q, w, z, lse, o, num_heads, eps, residual,
      needs, backend):
    like = (x_cls, x_tokens, norm_weight, norm_bias, wq, wq[0], wk, wk[0], wv, wv[0], wo, wo[0])
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if n else x_cls.new_empty((0,))
            for t, n in zip(like, needs)]


def _setup_context(ctx, inputs, output):
    (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, residual,
     backend) = inputs
    _, q, w, z, lse, o = output
    ctx.save_for_backward(x_cls, x_tokens, norm_weight, norm_bias, wq, wk, wv, wo, q, w, z, lse, o)
    ctx.mark_non_differentiable(q, w, z, lse, o)  # what the backward needs, not outputs to train through
    ctx.set_materialize_grads(False)
    ctx.present = tuple(t is not None for t in inputs[:12])
    ctx.num_heads, ctx.eps, ctx.residual, ctx.backend = num_heads, eps, residual, backend


def _grads(ctx, grad_out, backward) -> tuple:
    """The gradients of the op's sixteen inputs, given the backend's whole-op backward (through
    the registered op, or called directly on the eager fast path)."""
    needs = [bool(n) and p for n, p in zip(ctx.needs_input_grad[:12], ctx.present)]
    if grad_out is None or not any(needs):
        return (None,) * 16
    ac = autocast_device(grad_out)
    # a backward run inside autocast (the loss computed there) computes as the forward did: with
    # autocast off, in the inputs' dtype
    with torch.autocast(ac, enabled=False) if ac is not None else contextlib.nullcontext():
        grads = backward(grad_out, *ctx.saved_tensors, ctx.num_heads, ctx.eps, ctx.residual, needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 4


def _backward(ctx, grad_out, *unused):
    return _grads(ctx, grad_out, lambda *a: torch.ops.crossvit_kernels.cross_attention_backward(*a, ctx.backend))


torch.library.register_autograd("crossvit_kernels::cross_attention", _backward, setup_context=_setup_context)


class CrossAttentionFunction(torch.autograd.Function):
    """The registered op's autograd on the eager fast path (same setup, same backward formula),
    without the dispatcher round trip (see :func:`crossvit_kernels.ops._common.plain_eager`)."""

    @staticmethod
    def forward(x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, residual,
                backend):
        return _backends.get_backend(backend).cross_attention_forward(
            x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, wv, bv, wo, bo, num_heads, eps, residual)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: its backward op has no autograd
    def backward(ctx, grad_out, *unused):
        return _grads(ctx, grad_out, _backends.get_backend(ctx.backend).cross_attention_backward)
