"""What the two op modules share: argument checks (the package's one validation layer; every
message says what to fix), autocast promotion, and the test for plain eager mode."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backends.base import FLOAT_DTYPES

Tensor = torch.Tensor


def check_tensor(name: str, t, ndim: Optional[int] = None, shape: Optional[Sequence[int]] = None,
                 optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same(named: dict) -> None:
    """All given (non-None) tensors share one dtype and one device."""
    items = [(k, v) for k, v in named.items() if v is not None]
    ref_name, ref = items[0]
    for k, v in items[1:]:
        if v.dtype != ref.dtype:
            raise TypeError(f"dtype mismatch: {ref_name} is {ref.dtype} but {k} is {v.dtype}; "
                            f"cast all inputs to one dtype")
        if v.device != ref.device:
            raise ValueError(f"device mismatch: {ref_name} is on {ref.device} but {k} is on {v.device}; "
                             f"move all inputs to one device")


def check_backend_arg(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be None or a string, got {type(backend).__name__}")


def autocast_device(t) -> Optional[str]:
    """The device type of ``t`` when torch.autocast is active for it, else None."""
    if not isinstance(t, torch.Tensor):
        return None
    dev = t.device.type
    try:
        return dev if torch.is_autocast_enabled(dev) else None
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None


def promote_floats(*tensors):
    """Under torch.autocast a CrossViT block receives mixed dtypes (bfloat16 from autocast's
    linears, the float32 residual stream, float32 parameters): cast every floating-point tensor
    to the widest floating dtype among them, as torch.cat and elementwise ops do. Non-float
    tensors and None are returned unchanged (validation reports them)."""
    dtype = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)


def plain_eager(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether nothing watches or traces this call, so that an op may call its backend directly
    instead of going through its registered ``torch.library`` op.

    The registered op's eager call goes through the dispatcher into torch.library's Python
    wrappers (an autograd.Function built per op, redispatch below autograd, output alias checks,
    default filling) and back: about 10 us per call without grad and 70 us per forward + backward
    on a desktop CPU, several times the kernels at CrossViT's sizes. Whenever something may be
    watching or tracing the call (torch.compile / export, make_fx and other dispatch modes, torch
    function modes, torch.func transforms, the TorchScript tracer, tensor subclasses such as
    FakeTensor) the op uses the registered op, so graphs contain one node per op; the two routes
    run the same backend methods.
    """
    if torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state()):
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True


def traced_as_aten() -> bool:
    """Whether the ops must run as standard PyTorch operators, not as custom ops: under ONNX export
    (the exported graph must hold only standard ONNX operators) and under torch.func transforms
    (grad, vmap, jacrev: they differentiate and batch standard operators themselves). Not while
    torch.compile traces: Dynamo keeps a functorch interpreter on the stack of its own, and the
    compiled graph takes the registered op."""
    if torch.onnx.is_in_onnx_export():
        return True
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
