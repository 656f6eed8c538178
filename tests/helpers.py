"""Shared test utilities: input factories, the tolerance table and comparison helpers.

The acceptance criterion (flash-attention style), stated once:

* float64: every backend agrees with the float64 textbook oracle to ``TOL[float64]``.
* float32 / float16 / bfloat16: a backend's maximum error against the float64 oracle (computed
  from the same inputs upcast) may be at most ``FACTOR`` times the same-dtype ``reference``
  backend's own maximum error, plus a small absolute floor ``TOL[dtype]["atol"]``;
  gradients use ``GRAD_FACTOR``.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Dict, Optional

import pytest
import torch

FACTOR = 2.0
GRAD_FACTOR = 3.0
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

#: Other Triton releases to compile the kernels with (compile-only checks): ``make test`` installs
#: the GPU machine's release (Makefile: TRITON_COMPAT) under .triton-compat/<version>/.
TRITON_COMPAT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".triton-compat")


def triton_installs():
    """[(id, path)] of the Triton installs the compile-only checks use: the bundled one (path None)
    and each complete install under .triton-compat/ (a directory with its ``.stamp``)."""
    out = [("bundled", None)]
    if os.path.isdir(TRITON_COMPAT_ROOT):
        for name in sorted(os.listdir(TRITON_COMPAT_ROOT)):
            path = os.path.join(TRITON_COMPAT_ROOT, name)
            if os.path.exists(os.path.join(path, ".stamp")) and os.path.isdir(os.path.join(path, "triton")):
                out.append((f"triton-{name}", path))
    return out


def compile_env(path):
    """Environment of a compile-only child process: the interpreter off, and ``path`` (a
    .triton-compat install) ahead of the bundled Triton when given."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path is not None:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
        env["CROSSVIT_KERNELS_EXPECT_TRITON"] = os.path.basename(path)
    return env


def check_triton_version() -> str:
    """In a compile-only child: the Triton version, after checking it is the one the parent asked
    for (a .triton-compat install that did not shadow the bundled Triton would test nothing)."""
    import triton
    want = os.environ.get("CROSSVIT_KERNELS_EXPECT_TRITON")
    if want and triton.__version__ != want:
        raise SystemExit(f"expected Triton {want}, imported {triton.__version__} from {triton.__file__}")
    return triton.__version__
requires_triton = pytest.mark.skipif(not HAS_TRITON or not (HAS_GPU or TRITON_INTERPRET),
                                     reason="needs Triton and a GPU (or TRITON_INTERPRET=1)")


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> Optional[str]:
    """None when |actual - expected| <= atol + rtol * |expected| everywhere, else a message that
    names the worst element, its values, and how many elements mismatched."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    bad_nan = torch.isnan(a) != torch.isnan(e)
    err = (a - e).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    bound = atol + rtol * e.abs()
    bad = (err > bound) | bad_nan
    if not bool(bad.any()):
        return None
    idx = int(torch.argmax(torch.where(bad, err - bound, torch.full_like(err, -float("inf")))))
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    return (f"{int(bad.sum())} of {a.numel()} elements mismatch (atol={atol:g}, rtol={rtol:g}); worst at {pos}: "
            f"got {a.flatten()[idx].item():.8g}, expected {e.flatten()[idx].item():.8g}, "
            f"|diff|={err.flatten()[idx].item():.3g}")


def assert_close(actual, expected, atol: float, rtol: float, name: str = "tensor") -> None:
    msg = describe_mismatch(actual, expected, atol, rtol)
    if msg is not None:
        raise AssertionError(f"{name}: {msg}")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(torch.float64).cpu() - b.detach().to(torch.float64).cpu()).abs().max()) \
        if a.numel() else 0.0


def assert_within_ref_error(fast, ref, oracle, dtype, name="tensor", factor=FACTOR):
    """The flash-attention criterion: err(fast) <= factor * err(ref) + atol(dtype), both measured
    against the float64 oracle."""
    if dtype == torch.float64:
        assert_close(fast, oracle, name=name, **TOL[torch.float64])
        return
    assert fast.dtype == ref.dtype, f"{name}: dtype {fast.dtype} != reference dtype {ref.dtype}"
    assert torch.isfinite(fast.detach().float()).all(), f"{name}: non-finite values in the fast path"
    e_fast, e_ref = max_err(fast, oracle), max_err(ref, oracle)
    scale = float(oracle.detach().abs().max()) if oracle.numel() else 1.0
    bound = factor * e_ref + TOL[dtype]["atol"] * max(1.0, scale)
    if e_fast > bound:
        detail = describe_mismatch(fast, oracle, atol=bound, rtol=0.0)
        raise AssertionError(f"{name}: max error vs float64 oracle {e_fast:.3g} exceeds {factor:g} x the same-dtype "
                             f"reference's {e_ref:.3g} (+ floor): {detail}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """NaN-fill a tensor so an element a kernel forgets to write cannot pass a comparison."""
    return t.fill_(float("nan"))


def cross_attention_inputs(B: int, M: int, C: int, H: int, dtype=torch.float32, device="cpu",
                           strided: bool = True, bias: bool = True, seed: int = 0,
                           requires_grad: bool = True) -> Dict[str, object]:
    """Fresh random inputs for ops.cross_attention. With ``strided`` the tokens are the view
    ``branch[:, 1:]`` of a (B, 1 + M, C) tensor, as in the model."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    branch = r(B, 1 + M, C)
    leaves = dict(
        x_cls=r(B, C), branch=branch,
        norm_weight=1.0 + r(C, scale=0.2), norm_bias=r(C, scale=0.2),
        wq=r(C, C, scale=C ** -0.5), bq=r(C, scale=0.1) if bias else None,
        wk=r(C, C, scale=C ** -0.5), bk=r(C, scale=0.1) if bias else None,
        wv=r(C, C, scale=C ** -0.5), bv=r(C, scale=0.1) if bias else None,
        wo=r(C, C, scale=C ** -0.5), bo=r(C, scale=0.1) if bias else None,
    )
    if requires_grad:
        for t in leaves.values():
            if t is not None:
                t.requires_grad_(True)
    x_tokens = branch[:, 1:] if strided else branch[:, 1:].detach().clone().requires_grad_(requires_grad)
    leaves["x_tokens"] = x_tokens
    leaves["strided"] = strided
    leaves["num_heads"] = H
    return leaves


XATTN_ARGS = ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def upcast(inputs: Dict[str, object], dtype=torch.float64) -> Dict[str, object]:
    """Same values in ``dtype`` as new leaves (the tokens stay a strided view when they were one)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and k != "x_tokens":
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    if inputs["strided"]:
        out["x_tokens"] = out["branch"][:, 1:]
    else:
        t = inputs["x_tokens"]
        out["x_tokens"] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


GRAD_NAMES = ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def run_cross_attention(inputs, backend, grad_out: Optional[torch.Tensor] = None):
    """Forward, and backward when grad_out is given; returns (out, {name: grad}). With strided
    tokens the tokens' gradient is taken through the leaf ``branch`` and reported as
    ``x_tokens`` (rows 1..M of the branch gradient; row 0 must stay zero)."""
    from crossvit_kernels.ops import cross_attention
    out = cross_attention(*(inputs[k] for k in XATTN_ARGS), num_heads=inputs["num_heads"], backend=backend)
    grads = {}
    if grad_out is not None:
        leaf = {n: inputs[n] for n in GRAD_NAMES if isinstance(inputs.get(n), torch.Tensor)}
        if inputs["strided"]:
            leaf["x_tokens"] = inputs["branch"]
        names = [n for n, t in leaf.items() if t.requires_grad]
        gs = torch.autograd.grad(out, [leaf[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
        grads = dict(zip(names, gs))
        if inputs["strided"] and grads.get("x_tokens") is not None:
            full = grads["x_tokens"]
            assert not bool(full[:, 0].any()), "gradient leaked into row 0 of the branch (not an input)"
            grads["x_tokens"] = full[:, 1:]
    return out, grads


def nvidia_compiler_reason() -> Optional[str]:
    """None when Triton can compile for an NVIDIA target here (its NVIDIA backend and ptxas are
    installed; no GPU needed), else why not: the skip reason of the compile-only sm_90 tests."""
    try:
        import triton
        from triton.backends import backends
        if "nvidia" not in backends:
            return "this Triton install has no NVIDIA backend"
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
            return "Triton's bundled ptxas is missing"
    except Exception as exc:  # no Triton, or an install without a compiler
        return f"cannot use Triton's compiler: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# a tiny CrossViT with timm's weights, ours or patched (the drop-in and ONNX tests)
# ---------------------------------------------------------------------------------------------

TINY_ARGS = dict(img_size=48, img_scale=(1.0, 1.0), patch_size=(12, 16), embed_dim=(24, 48), depth=((1, 1, 0),),
                 num_heads=(2, 4), mlp_ratio=(2.0, 2.0, 1.0), num_classes=5)


def tiny_config(kw):
    cfg = dict(TINY_ARGS, **kw)
    if kw.get("multi_conv") and "img_scale" not in kw:
        cfg["img_scale"] = (1.0, 2 / 3)
    return cfg


def tiny_timm(**kw):
    """A one-block timm CrossVit at 48 px (4x4 and 3x3 patch grids) with non-trivial LayerNorm
    affines and biases. The dagger configuration also resizes the second branch's input (to 32 px,
    a 2x2 grid), as the 240 and 408 px variants do."""
    import torch.nn as nn
    from timm.models import crossvit as tc
    torch.manual_seed(0)
    m = tc.CrossVit(**tiny_config(kw))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
            elif isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.add_(0.02 * torch.randn_like(mod.bias))
    return m


def tiny_pair(which, **kw):
    """(timm model, the same weights as ``which``: patched timm or ours)."""
    import crossvit_kernels as ck
    ref = tiny_timm(**kw)
    if which == "patched":
        return ref, ck.patch_timm(copy.deepcopy(ref))
    m = ck.CrossViT(**tiny_config(kw))
    m.load_state_dict(ref.state_dict())
    return ref, m


def tiny_images(b=3, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 48, 48, generator=g).requires_grad_(requires_grad)


def assert_timm_logits(y, ref, x, name="logits"):
    """``y`` (from the model under test) against timm's float32 and float64 logits on ``x``: "timm's
    numbers", an error against the float64 model at most 2x timm's own float32 error (plus a floor)."""
    with torch.no_grad():
        y32 = ref(x)
        y64 = copy.deepcopy(ref).double()(x.double())
    e, e_ref = max_err(y, y64), max_err(y32, y64)
    assert e <= 2 * e_ref + 1e-6 * max(1.0, float(y64.abs().max())), f"{name}: error {e:.3g} vs timm's {e_ref:.3g}"
