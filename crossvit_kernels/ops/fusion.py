"""The cross-attention fusion stage of a CrossViT multi-scale block, both directions, as one op.

The op's one home: its public entry and argument checks, its ``torch.library`` registration
(``crossvit_kernels::fusion_stage`` and ``crossvit_kernels::fusion_stage_backward``) with fake
implementations and the autograd formula, the eager fast path, and :func:`fuse_modules`, which
the model's fusion (``crossvit_kernels.models.fusion.fuse_cross_attention``) calls to run a stage
of modules with timm's names on it when a backend declares the stage (``dtypes["fusion_stage"]``,
the contract in :mod:`crossvit_kernels.backends.base`), and otherwise leaves it to the per-piece
path. The same backend methods run in eager mode, under ``torch.compile`` and under ``torch.export``.

Direction d (i = d, j = 1 - d), with the FUSION_PARAMS of the contract::

    qx    = f_w GELU(LN(x_i[:, 0]; f_ln_w, f_ln_b)) + f_b                       (B, C_j)
    c     = CrossAttentionBlock([qx; x_j[:, 1:]])[:, 0]  (LayerNorm n_w, n_b; wq .. bo; H_d heads)
    out_i = [g_w GELU(LN(c; g_ln_w, g_ln_b)) + g_b ; x_i[:, 1:]]
"""
from __future__ import annotations

import collections.abc
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends as _backends
from ..backends.base import FUSION_OPTIONAL, FUSION_PARAMS, FUSION_SAVED, acc_dtype
from ._common import autocast_device, check_backend_arg, check_same, check_tensor, plain_eager, traced_as_aten

Tensor = torch.Tensor

__all__ = ["fusion_stage", "fuse_modules", "fusion_stage_reference"]

_NP = len(FUSION_PARAMS)


def fusion_stage(x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]], heads: Sequence[int],
                 eps: Sequence[float], backend: Optional[str] = None) -> List[Tensor]:
    """Both directions of a multi-scale block's cross-attention fusion: returns [out0, out1].

    Args:
        x0, x1: (B, 1 + N0, C0), (B, 1 + N1, C1) the branches' tokens, CLS first (never written);
            B >= 0 (an empty batch runs :func:`fusion_stage_reference`).
        params: 36 tensors, direction 0's FUSION_PARAMS then direction 1's (bq, bk, bv may be None).
        heads: (H0, H1), the heads of each direction's attention (H_d divides C_j).
        eps: 6 LayerNorm epsilons, (eps_f, eps_n, eps_g) per direction.
        backend: None (the current default), "auto" or a name. A backend that does not declare the
            stage, or whose size limits the inputs exceed, runs :func:`fusion_stage_reference` (the
            textbook composition).
    """
    params = _validate(x0, x1, params, heads, eps, backend)
    heads, eps = [int(h) for h in heads], [float(e) for e in eps]
    present = [p for p in params if p is not None]
    grad = _needs_grad([x0, x1] + present)
    name = _stage_backend(backend, x0, x1, heads, grad)
    if name is None or x0.shape[0] == 0 or traced_as_aten():
        # an empty batch has nothing to fuse (the backends take B >= 1): the textbook form gives the
        # empty outputs and their graph
        return fusion_stage_reference(x0, x1, params, heads, eps)
    layout = heads + [int(p is not None) for p in params]
    if not plain_eager([x0, x1] + present):
        return list(torch.ops.crossvit_kernels.fusion_stage(x0, x1, present, layout, eps, name)[:2])
    if grad:
        return list(FusionStageFunction.apply(x0, x1, layout, eps, name, *present)[:2])
    with torch.no_grad():
        return _backends.get_backend(name).fusion_stage_forward(x0, x1, params, heads, eps)[:2]


def _needs_grad(tensors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _stage_backend(backend: Optional[str], x0: Tensor, x1: Tensor, heads: Sequence[int],
                   backward: bool) -> Optional[str]:
    """The backend that runs the stage for the branches' device, dtype and sizes (and its backward
    when ``backward``), or None (no backend declares it for them, within its limits)."""
    name = _backends.check_name(backend if backend is not None else _backends.get_default_backend())
    if name == "reference":
        return None
    sizes = {"B": x0.shape[0], "N0": x0.shape[1] - 1, "C0": x0.shape[2], "N1": x1.shape[1] - 1, "C1": x1.shape[2],
             "H0": heads[0], "H1": heads[1]}
    if name != "auto":
        return name if _backends.supports(name, "fusion_stage", x0.device, x0.dtype, sizes, backward) is None else None
    try:
        return _backends.resolve_backend("fusion_stage", "auto", x0.device, x0.dtype, sizes, backward)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------
# the textbook composition (the definition; the fallback where no backend declares the stage)
# ---------------------------------------------------------------------------------------------

def fusion_stage_reference(x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]], heads: Sequence[int],
                           eps: Sequence[float]) -> List[Tensor]:
    """The stage as timm computes it (projection, concatenation, textbook single-query attention
    over [qx; x_j[:, 1:]], projection back, concatenation), in differentiable standard ops."""
    outs = []
    for d, (xi, xj) in enumerate(((x0, x1), (x1, x0))):
        p = dict(zip(FUSION_PARAMS, params[d * _NP:(d + 1) * _NP]))
        H = heads[d]
        B, _, Ci = xi.shape
        Nj, Cj = xj.shape[1], xj.shape[2]
        D = Cj // H
        qx = F.linear(F.gelu(F.layer_norm(xi[:, 0], (Ci,), p["f_ln_w"], p["f_ln_b"], eps[3 * d])), p["f_w"], p["f_b"])
        y = F.layer_norm(torch.cat([qx[:, None], xj[:, 1:]], 1), (Cj,), p["n_w"], p["n_b"], eps[3 * d + 1])
        q = F.linear(y[:, :1], p["wq"], p["bq"]).reshape(B, 1, H, D).transpose(1, 2)
        k = F.linear(y, p["wk"], p["bk"]).reshape(B, Nj, H, D).transpose(1, 2)
        v = F.linear(y, p["wv"], p["bv"]).reshape(B, Nj, H, D).transpose(1, 2)
        a = ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1)
        c = qx + F.linear((a @ v).transpose(1, 2).reshape(B, Cj), p["wo"], p["bo"])
        new = F.linear(F.gelu(F.layer_norm(c, (Cj,), p["g_ln_w"], p["g_ln_b"], eps[3 * d + 2])), p["g_w"], p["g_b"])
        outs.append(torch.cat([new[:, None], xi[:, 1:]], 1))
    return outs


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _sequence(name: str, value, what: str) -> list:
    """``value`` as a list, or a TypeError saying what ``name`` must be (a tensor, a string or a
    mapping is not a sequence of arguments here, though Python can iterate over it)."""
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, collections.abc.Sequence):
        raise TypeError(f"{name} must be a list or tuple of {what}, got {type(value).__name__}")
    return list(value)


def _validate(x0, x1, params, heads, eps, backend) -> List[Optional[Tensor]]:
    """Checks every argument of :func:`fusion_stage`; returns ``params`` as a list."""
    check_tensor("x0", x0, ndim=3)
    check_tensor("x1", x1, ndim=3)
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"batch sizes disagree: x0 has {x0.shape[0]} rows, x1 {x1.shape[0]}")
    if x0.shape[1] < 1 or x1.shape[1] < 1:
        raise ValueError(f"each branch needs its CLS token: got x0 {tuple(x0.shape)}, x1 {tuple(x1.shape)}")
    if x0.shape[2] == 0 or x1.shape[2] == 0:
        raise ValueError(f"empty width: got x0 {tuple(x0.shape)}, x1 {tuple(x1.shape)}; need C0, C1 >= 1")
    params = _sequence("params", params, f"{2 * _NP} tensors (FUSION_PARAMS per direction, None for an absent "
                                         f"{', '.join(FUSION_OPTIONAL)})")
    if len(params) != 2 * _NP:
        raise ValueError(f"params must hold {2 * _NP} entries (FUSION_PARAMS per direction), got {len(params)}")
    heads = _sequence("heads", heads, "two head counts (H0, H1)")
    eps = _sequence("eps", eps, "six LayerNorm epsilons (eps_f, eps_n, eps_g per direction)")
    if len(heads) != 2:
        raise ValueError(f"heads must be (H0, H1), one head count per direction, got {len(heads)}: {heads!r}")
    if len(eps) != 6:
        raise ValueError(f"eps must hold six LayerNorm epsilons (eps_f, eps_n, eps_g per direction), got "
                         f"{len(eps)}: {eps!r}")
    named = {"x0": x0, "x1": x1}
    for d, (Ci, Cj) in enumerate(((x0.shape[2], x1.shape[2]), (x1.shape[2], x0.shape[2]))):
        shapes = dict(f_ln_w=(Ci,), f_ln_b=(Ci,), f_w=(Cj, Ci), f_b=(Cj,), n_w=(Cj,), n_b=(Cj,), wq=(Cj, Cj),
                      bq=(Cj,), wk=(Cj, Cj), bk=(Cj,), wv=(Cj, Cj), bv=(Cj,), wo=(Cj, Cj), bo=(Cj,), g_ln_w=(Cj,),
                      g_ln_b=(Cj,), g_w=(Ci, Cj), g_b=(Ci,))
        for k, name in enumerate(FUSION_PARAMS):
            t = params[d * _NP + k]
            try:
                check_tensor(f"{name}{d}", t, shape=shapes[name], optional=name in FUSION_OPTIONAL)
            except ValueError as exc:
                raise ValueError(f"{exc} (params[{d * _NP + k}]: direction {d} projects x{d}'s width "
                                 f"C{d}={Ci} to x{1 - d}'s C{1 - d}={Cj} and back)") from None
            named[f"{name}{d}"] = t
        h = heads[d]
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0 or Cj % h:
            raise ValueError(f"heads[{d}]={h!r} must be a positive int dividing C{1 - d}={Cj} (direction {d} "
                             f"attends over x{1 - d}'s tokens)")
    check_same(named)
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0:
            raise ValueError(f"every eps must be a positive number, got {eps!r}")
    check_backend_arg(backend)
    return params


# ---------------------------------------------------------------------------------------------
# torch.library registration: the op, its backward, their fake implementations, the autograd
# ---------------------------------------------------------------------------------------------

def _unpack(present: Sequence[Tensor], layout: Sequence[int]) -> Tuple[List[Optional[Tensor]], List[int]]:
    """(the 36 params with None where absent, heads) from the op's packed form."""
    it = iter(present)
    params = [next(it) if flag else None for flag in layout[2:]]
    return params, list(layout[:2])


@torch.library.custom_op("crossvit_kernels::fusion_stage", mutates_args=())
def _fusion_stage_op(x0: Tensor, x1: Tensor, params: List[Tensor], layout: List[int], eps: List[float],
                     backend: str) -> List[Tensor]:
    """-> [out0, out1] + FUSION_SAVED per direction (the contract of crossvit_kernels.backends.base).
    ``params`` holds the present parameters, ``layout`` (H0, H1) then one presence flag per slot."""
    full, heads = _unpack(params, layout)
    return list(_backends.get_backend(backend).fusion_stage_forward(x0, x1, full, heads, eps))


def _saved_like(x0: Tensor, x1: Tensor, heads: Sequence[int]) -> List[Tensor]:
    B = x0.shape[0]
    acc = acc_dtype(x0.dtype)
    out = []
    for d, xj in enumerate((x1, x0)):
        Cj, H = xj.shape[2], heads[d]
        shapes = dict(qx=(B, Cj), q=(B, Cj), w=(B, H, Cj), z=(B, H, Cj), lse=(B, H), o=(B, Cj), c=(B, Cj))
        out += [x0.new_empty(shapes[k], dtype=acc) for k in FUSION_SAVED]
    return out


@_fusion_stage_op.register_fake
def _(x0, x1, params, layout, eps, backend):
    return [torch.empty_like(x0, memory_format=torch.contiguous_format),
            torch.empty_like(x1, memory_format=torch.contiguous_format)] + _saved_like(x0, x1, layout[:2])


@torch.library.custom_op("crossvit_kernels::fusion_stage_backward", mutates_args=())
def _fusion_stage_backward_op(dout0: Tensor, dout1: Tensor, x0: Tensor, x1: Tensor, params: List[Tensor],
                              saved: List[Tensor], layout: List[int], eps: List[float], backend: str) -> List[Tensor]:
    """[dx0, dx1] + the gradients of the present parameters (in ``params``' order)."""
    full, heads = _unpack(params, layout)
    grads = _backends.get_backend(backend).fusion_stage_backward(dout0, dout1, x0, x1, full, saved, heads, eps)
    return list(grads[:2]) + [g for g, p in zip(grads[2:], full) if p is not None]


@_fusion_stage_backward_op.register_fake
def _(dout0, dout1, x0, x1, params, saved, layout, eps, backend):
    return [torch.empty_like(x0, memory_format=torch.contiguous_format),
            torch.empty_like(x1, memory_format=torch.contiguous_format)] + \
        [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _setup_context(ctx, inputs, output):
    x0, x1, params, layout, eps, backend = inputs
    saved = list(output[2:])
    ctx.mark_non_differentiable(*saved)     # what the backward needs, not outputs to train through
    ctx.set_materialize_grads(False)        # no zero gradients materialised for them
    ctx.save_for_backward(x0, x1, *params, *saved)
    ctx.n_params = len(params)
    ctx.layout, ctx.eps, ctx.backend = list(layout), list(eps), backend


def _grads(ctx, douts, backward) -> Tuple[Optional[Tensor], Optional[Tensor], List[Optional[Tensor]]]:
    tensors = ctx.saved_tensors
    x0, x1 = tensors[:2]
    params = list(tensors[2:2 + ctx.n_params])
    saved = list(tensors[2 + ctx.n_params:])
    if douts[0] is None and douts[1] is None:
        return None, None, [None] * len(params)
    # an output nobody used gets a zero gradient (the stage's outputs are used together in a model)
    d0 = douts[0] if douts[0] is not None else torch.zeros_like(x0)
    d1 = douts[1] if douts[1] is not None else torch.zeros_like(x1)
    grads = backward(d0.contiguous(), d1.contiguous(), x0, x1, params, saved, ctx.layout, ctx.eps)
    return grads[0], grads[1], list(grads[2:])


def _backward(ctx, douts):
    dx0, dx1, gp = _grads(ctx, douts, lambda *a: torch.ops.crossvit_kernels.fusion_stage_backward(*a, ctx.backend))
    return dx0, dx1, gp, None, None, None


torch.library.register_autograd("crossvit_kernels::fusion_stage", _backward, setup_context=_setup_context)


def _eager_backward(backend: str):
    impl = _backends.get_backend(backend)

    def run(d0, d1, x0, x1, params, saved, layout, eps):
        full, heads = _unpack(params, layout)
        grads = impl.fusion_stage_backward(d0, d1, x0, x1, full, saved, heads, eps)
        return list(grads[:2]) + [g for g, p in zip(grads[2:], full) if p is not None]
    return run


class FusionStageFunction(torch.autograd.Function):
    """The registered op's autograd on the eager fast path (same setup, same backward formula),
    without the dispatcher round trip (see :func:`crossvit_kernels.ops._common.plain_eager`)."""

    @staticmethod
    def forward(x0, x1, layout, eps, backend, *params):
        full, heads = _unpack(params, layout)
        return tuple(_backends.get_backend(backend).fusion_stage_forward(x0, x1, full, heads, eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, x1, layout, eps, backend = inputs[:5]
        _setup_context(ctx, (x0, x1, list(inputs[5:]), layout, eps, backend), output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *douts):
        dx0, dx1, gp = _grads(ctx, douts[:2], _eager_backward(ctx.backend))
        return (dx0, dx1, None, None, None, *gp)


# ---------------------------------------------------------------------------------------------
# modules -> the op: the fusion of a multi-scale block with timm's names
# ---------------------------------------------------------------------------------------------

_BACKEND_ATTR = "_crossvit_kernels_backend"     # timm modules converted by patch_timm keep it here
_FUSED_ATTR = "_crossvit_kernels_fused"


def _projection(seq) -> Optional[Tuple[nn.LayerNorm, nn.Linear]]:
    """(LayerNorm, Linear) of a projection built as timm's (LayerNorm, exact GELU, Linear), else None."""
    if not isinstance(seq, nn.Sequential) or len(seq) != 3:
        return None
    ln, act, lin = seq
    if (type(ln) is not nn.LayerNorm or len(ln.normalized_shape) != 1 or ln.weight is None or ln.bias is None
            or type(act) is not nn.GELU or act.approximate != "none" or type(lin) is not nn.Linear
            or lin.bias is None):
        return None
    return ln, lin


def _block(blk) -> Optional[tuple]:
    """(norm1, attn) of a cross-attention block the stage covers (ours or a patched timm one, one
    block per direction, no dropout or drop path active, the default scale), else None."""
    a, n = getattr(blk, "attn", None), getattr(blk, "norm1", None)
    if a is None or type(n) is not nn.LayerNorm or len(n.normalized_shape) != 1 or n.weight is None or n.bias is None:
        return None
    if _FUSED_ATTR in blk.__dict__ and not blk.__dict__[_FUSED_ATTR]:
        return None
    lins = [getattr(a, k, None) for k in ("wq", "wk", "wv", "proj")]
    if any(type(t) is not nn.Linear for t in lins) or lins[3].bias is None:
        return None
    C = lins[0].in_features
    if any(t.weight.shape != (C, C) for t in lins) or C % a.num_heads:
        return None
    if float(a.scale) != float((C // a.num_heads) ** -0.5):
        return None
    if blk.training and (a.attn_drop.p > 0 or a.proj_drop.p > 0
                         or not isinstance(getattr(blk, "drop_path", nn.Identity()), nn.Identity)):
        return None
    return n, a


def _block_backend(blk) -> Optional[str]:
    if _BACKEND_ATTR in blk.__dict__:
        return blk.__dict__[_BACKEND_ATTR]
    return getattr(blk, "backend", None)


def fuse_modules(projs: Sequence[nn.Module], fusion: Sequence[nn.Module], revert_projs: Sequence[nn.Module],
                 xs: Sequence[Tensor]) -> Optional[List[Tensor]]:
    """The fusion of a multi-scale block (timm's ``projs``, ``fusion``, ``revert_projs`` on the
    branches ``xs``) on the stage op, or None when the stage does not apply: not two branches, a
    configuration it does not cover (fusion depth > 0, dropout or drop path active, a hand-set
    scale, other norms or activations), mixed dtypes or devices, autocast, ONNX export or
    torch.func transforms, or no backend that declares the stage for the inputs."""
    if len(xs) != 2 or len(projs) != 2 or len(fusion) != 2 or len(revert_projs) != 2 or traced_as_aten():
        return None
    x0, x1 = xs
    if not (isinstance(x0, Tensor) and isinstance(x1, Tensor) and x0.dim() == 3 and x1.dim() == 3
            and x0.dtype == x1.dtype and x0.device == x1.device and x0.shape[0] == x1.shape[0]):
        return None
    if autocast_device(x0) is not None:
        return None
    blocks = [_block(b) for b in fusion]
    fs = [_projection(p) for p in projs]
    gs = [_projection(p) for p in revert_projs]
    if any(t is None for t in blocks + fs + gs):
        return None
    backend = _block_backend(fusion[0])
    if _block_backend(fusion[1]) != backend:
        return None
    params, heads, eps = [], [], []
    for d in range(2):
        (fln, flin), (n, a), (gln, glin) = fs[d], blocks[d], gs[d]
        params += [fln.weight, fln.bias, flin.weight, flin.bias, n.weight, n.bias, a.wq.weight, a.wq.bias,
                   a.wk.weight, a.wk.bias, a.wv.weight, a.wv.bias, a.proj.weight, a.proj.bias, gln.weight, gln.bias,
                   glin.weight, glin.bias]
        heads.append(int(a.num_heads))
        eps += [float(fln.eps), float(n.eps), float(gln.eps)]
    try:
        _validate(x0, x1, params, heads, eps, backend)
        name = _stage_backend(backend, x0, x1, heads, _needs_grad([x0, x1] + [p for p in params if p is not None]))
    except (TypeError, ValueError):
        return None
    if name is None:
        return None
    return fusion_stage(x0, x1, params, heads, eps, backend=name)
