"""The backend contract, and the generic absorbed formulation a backend inherits.

A backend is a :class:`Backend` subclass. It declares what it supports as data (``devices``,
``dtypes`` per op, ``why_not`` per op: the reason for the dtypes it leaves out, and
``size_limits`` per op: the limits of its kernels on the op's sizes, each with its reason) and
implements the ops, at one of two depths:

* **the core only** (``cross_attention_core_forward`` / ``_backward``): the one pass over the
  tokens. It then inherits :meth:`Backend.cross_attention_forward` / ``_backward``, the whole op
  (LayerNorm, projections, core, output projection, residual) written around the core in plain
  PyTorch: the absorbed formulation of docs/design.md, section 2;
* **the whole op**: a backend that fuses more (Triton's projection kernels) overrides
  ``cross_attention_forward`` / ``_backward`` themselves, for the inputs it covers, and calls the
  inherited ones for the rest.

Every method runs under ``torch.no_grad()`` on inputs the op layer (``crossvit_kernels.ops``) has
validated: all floating point, one dtype and one device, shapes consistent, B >= 1, C >= 1,
within the backend's ``size_limits`` for the op (the registry skips, or refuses with the reason,
a backend whose limits the sizes exceed). The methods may therefore assume them; they never need
to raise for bad user input.

Whole-op contract of the cross-attention (shapes per batch row b; H heads of width d = C / H;
``acc`` is float64 for float64 inputs, float32 otherwise):

    cross_attention_forward(x_cls (B, C), x_tokens (B, M, C), norm_weight, norm_bias (C,) | None,
                            wq (C, C), bq | None, wk, wv, bv | None, wo, bo | None,
                            num_heads, eps, residual)
        -> out (B, C) in x_cls's dtype, and what the backward needs, all in ``acc``:
           q (B, C) the query, w (B, H, C) the absorbed query, z (B, H, C) the weighted sums of
           the normalised tokens, lse (B, H) the softmax log-sum-exp, o (B, C) the attention
           output before the output projection.
    cross_attention_backward(grad_out (B, C), x_cls, x_tokens, norm_weight, norm_bias, wq, wk, wv,
                             wo, q, w, z, lse, o, num_heads, eps, residual, needs)
        -> the gradients of (x_cls, x_tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wo,
           bo), None where ``needs`` (twelve booleans in that order) is False. Each in its input's
           dtype; x_tokens's gradient contiguous. The key bias's is exactly zero: softmax ignores
           a constant shift of a head's scores.

Nothing of size O(B * N) is saved between the two: the backward recomputes the token
statistics from the tokens, which it reads anyway.

Core contract (``w`` as above, contiguous in ``acc``):

    cross_attention_core_forward(x_cls, x_tokens, w, eps) -> (z (B, H, C), lse (B, H)) in acc
    cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, eps)
        -> (dx_cls (B, C) in x_cls's dtype, dx_tokens (B, M, C) contiguous in x_tokens's dtype,
            dw (B, H, C) in acc)

Fusion-stage contract (the whole cross-attention fusion of a multi-scale block, both directions;
``crossvit_kernels.ops.fusion``). Direction d has query branch i = d and token branch j = 1 - d;
its parameters, in FUSION_PARAMS order, are the projection f (LayerNorm C_i, Linear C_i -> C_j),
the cross-attention block (LayerNorm C_j, wq/bq, wk/bk, wv/bv, wo/bo) and the projection g
(LayerNorm C_j, Linear C_j -> C_i); bq, bk, bv may be None:

    fusion_stage_forward(x0 (B, 1 + N0, C0), x1 (B, 1 + N1, C1), params (2 * 18, direction 0 first),
                         heads (H0, H1), eps (eps_f, eps_n, eps_g) per direction)
        -> [out0, out1] (the inputs' shapes and dtype, contiguous) + what the backward needs:
           FUSION_SAVED per direction (qx, q (B, C_j); w, z (B, H, C_j); lse (B, H); o, c (B, C_j)),
           float32, nothing of size O(B * N).
    fusion_stage_backward(dout0, dout1, x0, x1, params, saved, heads, eps)
        -> [dx0, dx1] + one gradient per parameter (None where the parameter is None), each in its
           input's dtype, dx0 / dx1 contiguous; bk's is exactly zero.

A backend declares the stage as data (``dtypes["fusion_stage"]``); where none does, the model's
fusion runs per piece (the projections as modules, the cross-attention op per direction).

Patch embedding contract (shapes in ``crossvit_kernels.ops.patch_embed``):

    patch_embed_forward(images, weight, bias | None, pos_embed (1 + P, C), cls_token (C,)) -> out
    patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad)
        -> (d_images | None, d_weight, d_bias | None, d_pos_embed, d_cls_token)

``crossvit_kernels.backends.pytorch`` is the executable specification of both cores.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Every floating dtype an op accepts (the one declaration; backends narrow it per op).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The dtypes of the compiled kernels (float32 accumulation).
HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)
OPS = ("cross_attention", "patch_embed", "fusion_stage")
#: one direction's parameters of the fusion stage, in the contract's order
FUSION_PARAMS = ("f_ln_w", "f_ln_b", "f_w", "f_b", "n_w", "n_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
                 "g_ln_w", "g_ln_b", "g_w", "g_b")
#: the ones that may be None (a block built with qkv_bias=False)
FUSION_OPTIONAL = ("bq", "bk", "bv")
#: what the fusion stage's forward keeps for its backward, per direction
FUSION_SAVED = ("qx", "q", "w", "z", "lse", "o", "c")
#: ``Backend.devices`` of a backend that runs on any device type
ANY_DEVICE = ("any",)
#: The sizes of each op's inputs that the op layer hands the registry (``sizes=`` of
#: ``supports`` / ``resolve_backend`` / ``explain_dispatch``) and the registry hands
#: :meth:`Backend.limits`, by name: cross_attention's x_cls (B, C), x_tokens (B, M, C) and H heads;
#: the fusion stage's x0 (B, 1 + N0, C0), x1 (B, 1 + N1, C1) and heads (H0, H1); patch_embed's
#: images (B, Cin, IH, IW) and weight (C, Cin, PH, PW).
OP_SIZES = {"cross_attention": ("B", "M", "C", "H"),
            "fusion_stage": ("B", "N0", "C0", "N1", "C1", "H0", "H1"),
            "patch_embed": ("B", "Cin", "IH", "IW", "C", "PH", "PW")}


class SizeLimit(NamedTuple):
    """A limit of a backend's kernels on an op's sizes, declared as data in
    ``Backend.size_limits[op]``: ``size(sizes)`` may be at most ``most``, where ``sizes`` maps the
    names of ``OP_SIZES[op]`` to ints. Read by :meth:`Backend.limits` only: a size function uses
    plain int arithmetic (under torch.compile a size may be symbolic, and the comparison becomes a
    guard of the graph)."""
    #: the limited quantity, in words ("the batch size B")
    what: str
    #: its value for the op's sizes
    size: Callable[[Mapping[str, int]], int]
    #: its largest allowed value, or a function of the device that gives it (a GPU's shared memory)
    most: Union[int, Callable[[torch.device], int]]
    #: where the limit comes from, and what runs larger inputs
    why: str
    #: the input dtypes it applies to (None: every dtype)
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    #: the device types it applies to (None: every device type)
    devices: Optional[Tuple[str, ...]] = None
    #: True for a limit of the backward's kernels alone, which inputs that need no gradient skip
    backward: bool = False


def constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result(fn)`` does (Dynamo calls ``fn`` while it traces
    and keeps the result as a constant of the graph), without importing ``torch._dynamo``, and with
    it Triton, when the package is imported. tests/test_dropin.py::test_compile_fullgraph_as_first_call
    checks that Dynamo honours it."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def shared_memory_per_block(device: torch.device) -> int:
    """The shared memory one block may use on the CUDA ``device``, in bytes (the opt-in maximum):
    the ``most`` of a shared-memory ``SizeLimit``. A constant under torch.compile. Without a CUDA
    device (a dispatch question asked on a machine that has none) there is no such limit."""
    if device.index is None:
        if not torch.cuda.is_available():
            return 2 ** 63 - 1
        device = torch.device("cuda", torch.cuda.current_device())
    return _shared_memory_per_block(device.index)


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


class Backend:
    """Base class of every backend; see the module docstring for the contract."""

    #: the backend's name, as ``backend=`` spells it
    name: str = ""
    #: device types it runs on (ANY_DEVICE: all)
    devices: Tuple[str, ...] = ()
    #: op -> the input dtypes it supports (an op missing here is not implemented)
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = {}
    #: op -> why the dtypes outside ``dtypes[op]`` are not supported
    why_not: Dict[str, str] = {}
    #: op -> the limits of its kernels on the op's sizes (an op missing here has none)
    size_limits: Dict[str, Tuple[SizeLimit, ...]] = {}

    # -- availability and support (read by the registry's supports / explain_dispatch) ------------
    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this machine, else why not (checked once, on load)."""
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        """None when it can run tensors on ``device`` (of a type in ``devices``), else why not."""
        return None

    def supports(self, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend runs ``op`` on ``device`` tensors of ``dtype``, else the reason."""
        if op not in self.dtypes:
            return f"the {self.name} backend has no {op} implementation"
        if device.type not in self.devices and self.devices != ANY_DEVICE:
            return (f"the {self.name} backend runs {' and '.join(d.upper() for d in self.devices)} tensors, "
                    f"not {device.type}")
        reason = self.device_reason(device)
        if reason is not None:
            return reason
        if dtype not in self.dtypes[op]:
            why = self.why_not.get(op)
            return (f"the {self.name} {op} supports {dtype_names(self.dtypes[op])}, not "
                    f"{str(dtype).replace('torch.', '')}" + (f" ({why})" if why else ""))
        return None

    def limits(self, op: str, device: torch.device, dtype: torch.dtype, sizes: Mapping[str, int],
               backward: bool = True) -> Optional[str]:
        """None when this backend's kernels run ``op`` on inputs of ``sizes`` (``OP_SIZES[op]`` ->
        int) on ``device`` in ``dtype``, forward and, with ``backward``, backward; else the first of
        its ``size_limits`` they exceed, with the reason. Asked only where :meth:`supports` is None."""
        for lim in self.size_limits.get(op, ()):
            if lim.backward and not backward:
                continue
            if lim.dtypes is not None and dtype not in lim.dtypes:
                continue
            if lim.devices is not None and device.type not in lim.devices:
                continue
            value = lim.size(sizes)
            most = lim.most if isinstance(lim.most, int) else lim.most(device)
            if value > most:
                return f"{lim.what} is {value}, more than the {self.name} backend's limit of {most}: {lim.why}"
        return None

    # -- the cores: what every backend implements ------------------------------------------------
    def cross_attention_core_forward(self, x_cls: Tensor, x_tokens: Tensor, w: Tensor,
                                     eps: float) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def cross_attention_core_backward(self, x_cls: Tensor, x_tokens: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                      dz: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def patch_embed_forward(self, images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                            cls_token: Tensor) -> Tensor:
        raise NotImplementedError

    def fusion_stage_forward(self, x0: Tensor, x1: Tensor, params: Sequence[Optional[Tensor]],
                             heads: Sequence[int], eps: Sequence[float]) -> List[Tensor]:
        raise NotImplementedError

    def fusion_stage_backward(self, dout0: Tensor, dout1: Tensor, x0: Tensor, x1: Tensor,
                              params: Sequence[Optional[Tensor]], saved: Sequence[Tensor], heads: Sequence[int],
                              eps: Sequence[float]) -> List[Optional[Tensor]]:
        raise NotImplementedError

    def patch_embed_backward(self, grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                             needs_images_grad: bool):
        raise NotImplementedError

    # -- the whole cross-attention op: the absorbed formulation around the core --------------------
    # Host-bound at CrossViT's sizes (every GEMM here has B rows): each line is the fewest eager ops
    # that compute it. Per-head products are bmm over views (an einsum costs several bmm in Python),
    # bias adds and scales are folded into addmm / baddbmm / addcmul, and nothing is cast when the
    # dtype already is the accumulation dtype.

    def cross_attention_forward(self, x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                                norm_bias: Optional[Tensor], wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                                wv: Tensor, bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
                                num_heads: int, eps: float, residual: bool):
        B, C = x_cls.shape
        H = num_heads
        d = C // H
        acc = acc_dtype(x_cls.dtype)
        x0, gamma, beta, wq, bq, wk, wv, bv, wo, bo = _cast(acc, x_cls, norm_weight, norm_bias, wq, bq, wk, wv, bv,
                                                            wo, bo)
        q = F.linear(F.layer_norm(x0, (C,), gamma, beta, eps), wq, bq)                     # (B, C)
        w = _absorbed_query(q, wk, gamma, H)                                               # (B, H, C)
        z, lse = self.cross_attention_core_forward(x_cls, x_tokens, w, eps)
        # the probabilities sum to 1: the LayerNorm affine applies to z as to each token, and the
        # value projection after the weighted sum, per head
        zz = _affine(z, gamma, beta)                                                       # (B, H, C)
        wv_t = wv.view(H, d, C).transpose(1, 2)                                           # (H, C, d)
        o = (torch.baddbmm(bv.view(H, 1, d), zz.transpose(0, 1), wv_t) if bv is not None
             else torch.bmm(zz.transpose(0, 1), wv_t)).transpose(0, 1).reshape(B, C)      # (B, C)
        out = F.linear(o, wo, bo)
        if residual:
            out += x0
        return out.to(x_cls.dtype), q, w, z, lse, o

    def cross_attention_backward(self, grad_out: Tensor, x_cls: Tensor, x_tokens: Tensor,
                                 norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], wq: Tensor,
                                 wk: Tensor, wv: Tensor, wo: Tensor, q: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                 o: Tensor, num_heads: int, eps: float, residual: bool,
                                 needs: Sequence[bool]) -> List[Optional[Tensor]]:
        (n_xcls, n_xtok, n_gamma, n_beta, n_wq, n_bq, n_wk, n_bk, n_wv, n_bv, n_wo, n_bo) = needs
        B, C = x_cls.shape
        H = num_heads
        d = C // H
        acc = acc_dtype(x_cls.dtype)
        g, x0, gamma, beta, wq_, wk_, wv_, wo_ = _cast(acc, grad_out, x_cls, norm_weight, norm_bias, wq, wk, wv, wo)
        need_gamma, need_beta = n_gamma and gamma is not None, n_beta and beta is not None
        d_gamma = d_beta = None
        # out = x0 + Wo o + bo
        d_wo = g.t().mm(o) if n_wo else None
        d_bo = g.sum(0) if n_bo else None
        do = g.mm(wo_).view(B, H, d).transpose(0, 1)                                       # (H, B, d)
        # o_h = Wv_h zz_h + bv_h, zz = gamma * z + beta
        d_wv = torch.bmm(do.transpose(1, 2), _affine(z, gamma, beta).transpose(0, 1)).view(C, C) if n_wv else None
        d_bv = do.transpose(0, 1).reshape(B, C).sum(0) if n_bv else None
        dy = torch.bmm(do, wv_.view(H, d, C)).transpose(0, 1)                              # (B, H, C)
        if need_gamma:
            d_gamma = (dy * z).sum((0, 1))
        if need_beta:
            d_beta = dy.sum((0, 1))
        # the core takes dz contiguous in acc: written so at once, not multiplied and then copied
        dz = (torch.mul(dy, gamma, out=dy.new_empty((B, H, C), dtype=acc)) if gamma is not None
              else dy.to(acc, memory_format=torch.contiguous_format))
        need_query = n_xcls or need_gamma or need_beta or n_wq or n_bq or n_wk
        dx_cls = dx_tokens = d_wq = d_bq = d_wk = None
        if n_xcls or n_xtok or need_query:
            dx_cls, dx_tokens, dw = self.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, eps)
            if not n_xtok:
                dx_tokens = None
            dx_cls = dx_cls.to(acc) if n_xcls else None
        if need_query:
            # w = s * gamma * u, u_h = Wk_h^T q_h
            qh = q.view(B, H, d).transpose(0, 1)                                           # (H, B, d)
            dw = dw.transpose(0, 1)                                                        # (H, B, C)
            if need_gamma:
                d_gamma += (dw * torch.bmm(qh, wk_.view(H, d, C))).sum((0, 1)) * d ** -0.5
            du = dw * (gamma * d ** -0.5 if gamma is not None else d ** -0.5)              # (H, B, C)
            d_wk = torch.bmm(qh.transpose(1, 2), du).view(C, C) if n_wk else None
            dq = torch.bmm(du, wk_.view(H, d, C).transpose(1, 2)).transpose(0, 1).reshape(B, C)
            # q = Wq y0 + bq, y0 = gamma * xh0 + beta
            var, mean = torch.var_mean(x0, dim=1, correction=0)
            rstd = torch.rsqrt(var + eps)
            xh0 = (x0 - mean[:, None]) * rstd[:, None]
            d_wq = dq.t().mm(_affine(xh0, gamma, beta)) if n_wq else None
            d_bq = dq.sum(0) if n_bq else None
            dy0 = dq.mm(wq_)
            if need_gamma:
                d_gamma += (dy0 * xh0).sum(0)
            if need_beta:
                d_beta += dy0.sum(0)
            if n_xcls:
                dxh0 = dy0 * gamma if gamma is not None else dy0
                dx_cls += rstd[:, None] * (dxh0 - dxh0.mean(1, keepdim=True)
                                           - xh0 * (dxh0 * xh0).mean(1, keepdim=True))
        if n_xcls and residual:
            dx_cls += g
        d_bk = torch.zeros_like(wk[0]) if n_bk else None
        grads = [dx_cls, dx_tokens, d_gamma, d_beta, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo]
        like = [x_cls, x_tokens, norm_weight, norm_bias, wq, wq[0], wk, wk[0], wv, wv[0], wo, wo[0]]
        return [None if t is None else t.to(r.dtype) for t, r in zip(grads, like)]


# ---------------------------------------------------------------------------------------------
# helpers of the absorbed formulation (shared with the Triton backend's fused forward)
# ---------------------------------------------------------------------------------------------

def _cast(dtype: torch.dtype, *tensors: Optional[Tensor]):
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _absorbed_query(q: Tensor, wk: Tensor, gamma: Optional[Tensor], H: int) -> Tensor:
    """w_h = s * gamma * (Wk_h^T q_h) for every head, (B, H, C) contiguous: the key projection
    absorbed into the query and LayerNorm's gamma folded in (s = d^-1/2)."""
    B, C = q.shape
    d = C // H
    u = torch.bmm(q.view(B, H, d).transpose(0, 1), wk.view(H, d, C))                     # (H, B, C)
    # scaled straight into the (B, H, C) layout: a product and then a transposing copy would
    # write one more fresh (B, H, C) tensor
    return torch.mul(u.transpose(0, 1), gamma * d ** -0.5 if gamma is not None else d ** -0.5,
                     out=u.new_empty((B, H, C)))


def _affine(t: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tensor:
    if gamma is not None and beta is not None:
        return torch.addcmul(beta, t, gamma)
    if gamma is not None:
        return t * gamma
    if beta is not None:
        return t + beta
    return t


# ---------------------------------------------------------------------------------------------
# the absorbed formulation as one graph of standard operators
# ---------------------------------------------------------------------------------------------

def absorbed_cross_attention(x_cls: Tensor, x_tokens: Tensor, norm_weight: Optional[Tensor],
                             norm_bias: Optional[Tensor], wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                             wv: Tensor, bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], num_heads: int,
                             eps: float, residual: bool) -> Tensor:
    """The whole cross-attention op (docs/design.md, section 2) as differentiable standard
    operators, for the graphs that cannot hold the custom op: ONNX export and torch.func
    transforms. Returns ``out`` alone.

    Written for exported graphs: the tokens are normalised by one LayerNorm without affine (a
    fused kernel in ONNX runtimes), the scores and the weighted sum are two batched matmuls over
    them (the CLS row joins as one extra score, never concatenated with the tokens), and the key
    scale and LayerNorm's gamma multiply the key weight, a constant a runtime folds. The width
    comes from a weight (a parameter's shape is a constant under the TorchScript-based ONNX
    exporter, an input's is traced) and the batch size is left to reshape's -1, so the graph
    keeps a dynamic batch."""
    acc = acc_dtype(x_cls.dtype)
    x0, xt, gamma, beta, wq, bq, wk, wv, bv, wo, bo = _cast(acc, x_cls, x_tokens, norm_weight, norm_bias, wq, bq,
                                                            wk, wv, bv, wo, bo)
    C = wq.shape[1]
    H = num_heads
    d = C // H
    xh0 = F.layer_norm(x0, (C,), None, None, eps)                                        # (B, C)
    xht = F.layer_norm(xt, (C,), None, None, eps)                                        # (B, M, C)
    q = F.linear(_affine(xh0, gamma, beta), wq, bq)                                      # (B, C)
    wk_s = (wk * (gamma * d ** -0.5 if gamma is not None else d ** -0.5)).reshape(H, d, C)
    w = torch.matmul(q.reshape(-1, H, 1, d), wk_s).reshape(-1, H, C)                     # (B, H, C)
    s0 = (w * xh0.unsqueeze(1)).sum(-1, keepdim=True)                                    # (B, H, 1)
    a = torch.softmax(torch.cat([s0, torch.matmul(w, xht.transpose(1, 2))], dim=-1), dim=-1)   # (B, H, 1 + M)
    z = torch.matmul(a[..., 1:], xht) + a[..., :1] * xh0.unsqueeze(1)                   # (B, H, C)
    # the value projection per head after the weighted sum: o_h = Wv_h (gamma * z_h + beta) + bv_h
    o = torch.matmul(_affine(z, gamma, beta).unsqueeze(2), wv.reshape(H, d, C).transpose(1, 2)).reshape(-1, C)
    out = F.linear(o if bv is None else o + bv, wo, bo)
    return (out + x0 if residual else out).to(x_cls.dtype)
