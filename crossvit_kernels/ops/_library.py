"""torch.library registration of the package's ops.

Each op is a ``torch.library.custom_op`` whose implementation dispatches, at run time, to the
backend module chosen by :func:`crossvit_kernels.backends.resolve_backend`. Because the dispatch
happens inside the op, ``torch.compile(fullgraph=True)`` sees one opaque node per op (described by
its fake implementation) and never traces into Triton, the extension or the backend registry.
The autograd formula of each op is registered with ``torch.library.register_autograd`` and calls
the matching backward op, so compiled training graphs contain the fused backward too.

Ops (namespace ``crossvit_kernels``):

- ``cross_attention_core(x_cls, x_tokens, w, eps, backend) -> (z, lse, mean, rstd)``
- ``cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz, backend)
  -> (dx_cls, dx_tokens, dw)``
- ``patch_embed(images, weight, bias, pos_embed, cls_token, backend) -> out``
- ``patch_embed_backward(grad_out, images, weight, has_bias, needs_images_grad, backend)
  -> (d_images, d_weight, d_bias, d_pos_embed, d_cls_token)`` (empty tensors stand for "not needed")

The shapes and the math are documented in ``crossvit_kernels.impl.torch_impl``.
"""

from typing import List, Optional, Tuple

import torch

from .. import backends as _backends

Tensor = torch.Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _module(op: str, backend: str, ref: Tensor):
    name = _backends.resolve_backend(op, backend, ref.device, ref.dtype)
    if name == "reference":  # never reached through the public entries; keep the op total anyway
        name = "torch"
    return _backends.backend_module(name)


# ---------------------------------------------------------------------------------------------
# cross-attention core
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("crossvit_kernels::cross_attention_core", mutates_args=())
def cross_attention_core(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    mod = _module("cross_attention", backend, x_cls)
    with torch.no_grad():
        return tuple(mod.cross_attention_core_forward(x_cls, x_tokens, w, eps))


@cross_attention_core.register_fake
def _(x_cls, x_tokens, w, eps, backend):
    B, M, C = x_tokens.shape
    H = w.shape[1]
    acc = _acc(x_cls.dtype)
    z = x_cls.new_empty((B, H, C), dtype=acc)
    lse = x_cls.new_empty((B, H), dtype=acc)
    mean = x_cls.new_empty((B, M + 1), dtype=acc)
    rstd = x_cls.new_empty((B, M + 1), dtype=acc)
    return z, lse, mean, rstd


@torch.library.custom_op("crossvit_kernels::cross_attention_core_backward", mutates_args=())
def cross_attention_core_backward(x_cls: Tensor, x_tokens: Tensor, w: Tensor, z: Tensor, lse: Tensor,
                                  mean: Tensor, rstd: Tensor, dz: Tensor,
                                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    mod = _module("cross_attention", backend, x_cls)
    with torch.no_grad():
        return tuple(mod.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz))


@cross_attention_core_backward.register_fake
def _(x_cls, x_tokens, w, z, lse, mean, rstd, dz, backend):
    B, M, C = x_tokens.shape
    return (torch.empty_like(x_cls, memory_format=torch.contiguous_format),
            x_tokens.new_empty((B, M, C)), torch.empty(tuple(w.shape), dtype=_acc(x_cls.dtype), device=w.device))


def _xattn_setup_context(ctx, inputs, output):
    x_cls, x_tokens, w, eps, backend = inputs
    z, lse, mean, rstd = output
    ctx.save_for_backward(x_cls, x_tokens, w, z, lse, mean, rstd)
    ctx.mark_non_differentiable(lse, mean, rstd)  # saved statistics, not outputs to train through
    ctx.backend = backend


def _xattn_grads(ctx, dz, core_backward):
    """The gradients of (x_cls, x_tokens, w, eps, backend), given the backend's core backward
    (through the registered op, or called directly on the eager fast path below)."""
    x_cls, x_tokens, w, z, lse, mean, rstd = ctx.saved_tensors
    if dz is None:
        dz = torch.zeros_like(z)
    dx_cls, dx_tokens, dw = core_backward(x_cls, x_tokens, w, z, lse, mean, rstd, dz.contiguous())
    return dx_cls, dx_tokens, dw.to(w.dtype), None, None


def _xattn_backward(ctx, dz, dlse, dmean, drstd):
    return _xattn_grads(ctx, dz, lambda *a: torch.ops.crossvit_kernels.cross_attention_core_backward(*a, ctx.backend))


torch.library.register_autograd("crossvit_kernels::cross_attention_core", _xattn_backward,
                                setup_context=_xattn_setup_context)


# ---------------------------------------------------------------------------------------------
# eager fast path
# ---------------------------------------------------------------------------------------------
# The custom op's eager call goes through the dispatcher into torch.library's Python wrappers
# (an autograd.Function built per op, redispatch below autograd, output alias checks, default
# filling) and back: about 10 us per call without grad and 70 us per forward + backward on a
# desktop CPU, several times the kernels at CrossViT's sizes. In plain eager mode nothing needs
# that machinery, so the call below goes to the backend directly (through one autograd.Function
# with the same formula when a gradient is needed). Whenever something may be watching or tracing
# the call (torch.compile / export, make_fx and other dispatch modes, torch function modes,
# torch.func transforms, the TorchScript tracer, tensor subclasses such as FakeTensor) it uses
# the registered op, so compiled graphs still contain one opaque node per op.

def _plain_eager(*tensors: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state()):
        return False
    for t in tensors:
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True


class _CrossAttentionCoreFunction(torch.autograd.Function):
    """Eager-only twin of the registered op's autograd (same setup and backward formula)."""

    @staticmethod
    def forward(ctx, x_cls, x_tokens, w, eps, backend):
        out = tuple(_module("cross_attention", backend, x_cls).cross_attention_core_forward(x_cls, x_tokens, w, eps))
        _xattn_setup_context(ctx, (x_cls, x_tokens, w, eps, backend), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: its backward op has no autograd
    def backward(ctx, dz, dlse, dmean, drstd):
        return _xattn_grads(ctx, dz, _module("cross_attention", ctx.backend, ctx.saved_tensors[0])
                            .cross_attention_core_backward)


def run_cross_attention_core(x_cls: Tensor, x_tokens: Tensor, w: Tensor, eps: float,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.crossvit_kernels.cross_attention_core``, without the dispatcher round trip
    in plain eager mode (see above); the public op calls this."""
    if not _plain_eager(x_cls, x_tokens, w):
        return torch.ops.crossvit_kernels.cross_attention_core(x_cls, x_tokens, w, eps, backend)
    if torch.is_grad_enabled() and (x_cls.requires_grad or x_tokens.requires_grad or w.requires_grad):
        return _CrossAttentionCoreFunction.apply(x_cls, x_tokens, w, eps, backend)
    with torch.no_grad():  # as the op's implementation: the torch backend must not record a graph
        return tuple(_module("cross_attention", backend, x_cls).cross_attention_core_forward(x_cls, x_tokens, w, eps))


# ---------------------------------------------------------------------------------------------
# patch embedding
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("crossvit_kernels::patch_embed", mutates_args=())
def patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                cls_token: Tensor, backend: str) -> Tensor:
    mod = _module("patch_embed", backend, images)
    with torch.no_grad():
        return mod.patch_embed_forward(images, weight, bias, pos_embed, cls_token)


@patch_embed.register_fake
def _(images, weight, bias, pos_embed, cls_token, backend):
    return images.new_empty((images.shape[0], pos_embed.shape[0], weight.shape[0]))


@torch.library.custom_op("crossvit_kernels::patch_embed_backward", mutates_args=())
def patch_embed_backward(grad_out: Tensor, images: Tensor, weight: Tensor, has_bias: bool,
                         needs_images_grad: bool, backend: str) -> List[Tensor]:
    mod = _module("patch_embed", backend, images)
    with torch.no_grad():
        d_images, d_weight, d_bias, d_pos, d_cls = mod.patch_embed_backward(
            grad_out, images, weight, has_bias, needs_images_grad)
    if d_images is None:
        d_images = images.new_empty((0,))
    if d_bias is None:
        d_bias = weight.new_empty((0,))
    return [d_images, d_weight, d_bias, d_pos, d_cls]


@patch_embed_backward.register_fake
def _(grad_out, images, weight, has_bias, needs_images_grad, backend):
    C = weight.shape[0]
    d_images = torch.empty_like(images, memory_format=torch.contiguous_format) if needs_images_grad \
        else images.new_empty((0,))
    d_bias = weight.new_empty((C,)) if has_bias else weight.new_empty((0,))
    return [d_images, torch.empty_like(weight, memory_format=torch.contiguous_format), d_bias,
            weight.new_empty((grad_out.shape[1], C)), weight.new_empty((C,))]


def _pe_setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token, backend = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _pe_grads(ctx, grad_out, backward):
    """The gradients of (images, weight, bias, pos_embed, cls_token, backend), given the backend's
    backward (through the registered op, or called directly on the eager fast path below)."""
    images, weight = ctx.saved_tensors
    needs_images = bool(ctx.needs_input_grad[0])
    d_images, d_weight, d_bias, d_pos, d_cls = backward(grad_out.contiguous(), images, weight, ctx.has_bias,
                                                        needs_images)
    return (d_images if needs_images else None, d_weight, d_bias if ctx.has_bias else None,
            d_pos, d_cls, None)


def _pe_backward(ctx, grad_out):
    return _pe_grads(ctx, grad_out, lambda *a: torch.ops.crossvit_kernels.patch_embed_backward(*a, ctx.backend))


torch.library.register_autograd("crossvit_kernels::patch_embed", _pe_backward, setup_context=_pe_setup_context)


class _PatchEmbedFunction(torch.autograd.Function):
    """Eager-only twin of the registered ``patch_embed`` op's autograd (see the fast path above)."""

    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, cls_token, backend):
        out = _module("patch_embed", backend, images).patch_embed_forward(images, weight, bias, pos_embed, cls_token)
        _pe_setup_context(ctx, (images, weight, bias, pos_embed, cls_token, backend), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _pe_grads(ctx, grad_out, _module("patch_embed", ctx.backend, ctx.saved_tensors[0]).patch_embed_backward)


def run_patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                    cls_token: Tensor, backend: str) -> Tensor:
    """``torch.ops.crossvit_kernels.patch_embed``, without the dispatcher round trip in plain
    eager mode (see the fast path above); the public op calls this."""
    if not _plain_eager(images, weight, pos_embed, cls_token) or (bias is not None and not _plain_eager(bias)):
        return torch.ops.crossvit_kernels.patch_embed(images, weight, bias, pos_embed, cls_token, backend)
    if torch.is_grad_enabled() and (images.requires_grad or weight.requires_grad or pos_embed.requires_grad
                                    or cls_token.requires_grad or (bias is not None and bias.requires_grad)):
        return _PatchEmbedFunction.apply(images, weight, bias, pos_embed, cls_token, backend)
    with torch.no_grad():
        return _module("patch_embed", backend, images).patch_embed_forward(images, weight, bias, pos_embed, cls_token)
