"""The compiled extension: backends "cpp" (CPU) and "cuda", and its loader
(crossvit_kernels.backends.extension).

* Both ops, forward and every gradient, through the public entries with backend="cpp", against
  the float64 textbook oracle under the flash-attention criterion of helpers.py.
* The cores and the patch embedding against the "torch" backend directly (any token strides,
  dtypes).
* Results independent of the thread count (1 and 2 threads bitwise identical).
* Both vector widths of the cross-attention kernels (8 floats, and 16 where the CPU has AVX-512)
  held to the same checks.
* Every operator of the extension, called directly with inputs that break its contract, raises a
  Python exception that names the broken condition, never a signal (checked in a child process).
* The loader: a broken or stale extension degrades to "torch" with one warning; reasons are reported.
* The CUDA backend (GPU only; skipped here) and the CUDA module's loadability (where it is built).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch

import crossvit_kernels
from crossvit_kernels import backends
from crossvit_kernels.backends import extension
from crossvit_kernels.ops import cross_attention, patch_embed
from helpers import (GRAD_FACTOR, HAS_GPU, assert_within_ref_error, cross_attention_inputs, max_err,
                     requires_gpu, run_cross_attention, upcast)

_CPU = extension.status("cpu")
if _CPU.broken:  # built but not loadable: that is a failure to report, not a reason to skip
    raise ImportError(_CPU.reason)
requires_cpp = pytest.mark.skipif(_CPU.ops is None, reason=f"C++ extension not built: {_CPU.reason}")
CUDA_BUILT = importlib.util.find_spec(extension.MODULES["cuda"]) is not None


def _cpu_ops():
    """torch.ops.crossvit_kernels_cpu: the CPU module's operators."""
    return _CPU.ops


def _torch():
    return backends.get_backend("torch")


def _vector_widths():
    """8, and 16 where this CPU runs the kernels on 16-float (AVX-512) vectors."""
    if _CPU.ops is None:
        return [8]
    widest = _CPU.ops.set_vector_width(0)
    return sorted({8, widest})


@pytest.fixture(params=_vector_widths(), ids=lambda w: f"w{w}")
def vector_width(request):
    """Runs the test with the cross-attention kernels on vectors of ``request.param`` floats."""
    ops = _cpu_ops()
    assert ops.set_vector_width(request.param) == request.param
    try:
        yield request.param
    finally:
        ops.set_vector_width(0)


# ---------------------------------------------------------------------------------------------
# cross-attention through the public entry
# ---------------------------------------------------------------------------------------------

XATTN_SHAPES = [  # (B, M, C, H)
    (2, 5, 12, 3),
    (3, 0, 20, 4),      # M = 0: the CLS attends to itself only
    (2, 1, 36, 3),      # M = 1
    (1, 17, 40, 5),     # B = 1, odd sizes, C not a multiple of 8
    (2, 400, 224, 7),   # CrossViT-18 fusion, branch 0 queried by branch 1's CLS: N = 401
    (2, 196, 448, 7),   # CrossViT-18 fusion, N = 197
]


def _check_cross_attention(B, M, C, H, dtype, strided, seed=0):
    inputs = cross_attention_inputs(B, M, C, H, dtype=dtype, strided=strided, seed=seed)
    grad_out = torch.randn(B, C, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out, grads = run_cross_attention(inputs, "cpp", grad_out)
    ref_out, ref_grads = run_cross_attention(upcast(inputs, dtype), "reference", grad_out)
    oracle_out, oracle_grads = run_cross_attention(upcast(inputs, torch.float64), "reference", grad_out)
    assert out.dtype == dtype and out.shape == (B, C)
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    assert set(grads) == set(oracle_grads)
    for name, g in grads.items():
        assert g is not None, f"no gradient for {name}"
        assert_within_ref_error(g, ref_grads[name], oracle_grads[name], dtype, name=f"d{name}", factor=GRAD_FACTOR)
    return max(max_err(out, oracle_out), *(max_err(g, oracle_grads[n]) for n, g in grads.items()))


@requires_cpp
@pytest.mark.parametrize("strided", [True, False], ids=["strided", "contiguous"])
@pytest.mark.parametrize("B,M,C,H", XATTN_SHAPES)
def test_cross_attention_cpp_float32(B, M, C, H, strided, vector_width):
    _check_cross_attention(B, M, C, H, torch.float32, strided)


@requires_cpp
@pytest.mark.parametrize("B,M,C,H", [(2, 5, 12, 3), (1, 17, 40, 5), (2, 400, 224, 7), (2, 196, 448, 7)])
def test_cross_attention_cpp_bfloat16(B, M, C, H, vector_width):
    _check_cross_attention(B, M, C, H, torch.bfloat16, strided=True)


@requires_cpp
def test_cross_attention_cpp_float16():
    _check_cross_attention(2, 33, 24, 4, torch.float16, strided=True)


@requires_cpp
def test_auto_picks_cpp_on_cpu_and_torch_for_float64():
    assert backends.resolve_backend("cross_attention", "auto", torch.device("cpu"), torch.float32) == "cpp"
    assert backends.resolve_backend("patch_embed", "auto", torch.device("cpu"), torch.float32) == "cpp"
    assert "auto -> cpp" in crossvit_kernels.explain_dispatch("cross_attention", "cpu", torch.float32)
    # no float64 cross-attention kernel: supports() says so and auto falls back to "torch"
    assert "float64" in crossvit_kernels.explain_dispatch("cross_attention", "cpu", torch.float64)
    assert "auto -> torch" in crossvit_kernels.explain_dispatch("cross_attention", "cpu", torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        inputs = cross_attention_inputs(1, 3, 8, 2, dtype=torch.float64, requires_grad=False)
        run_cross_attention(inputs, "cpp")
    assert "auto -> cpp" in crossvit_kernels.explain_dispatch("patch_embed", "cpu", torch.float64)


# ---------------------------------------------------------------------------------------------
# the core operators against the "torch" backend
# ---------------------------------------------------------------------------------------------

def _core_inputs(B, M, C, H, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_cls = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    if layout == "strided":        # the model's view branch[:, 1:]
        x_tokens = torch.randn(B, M + 1, C, generator=g, dtype=torch.float64).to(dtype)[:, 1:]
    elif layout == "transposed":   # channel stride != 1
        x_tokens = torch.randn(B, C, M, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        x_cls = torch.randn(C, B, generator=g, dtype=torch.float64).to(dtype).t()
    else:
        x_tokens = torch.randn(B, M, C, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(B, H, C, generator=g, dtype=torch.float64) * 0.4).float()
    dz = torch.randn(B, H, C, generator=g, dtype=torch.float64).float()
    return x_cls, x_tokens, w, dz


@requires_cpp
@pytest.mark.parametrize("layout", ["strided", "contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,M,C,H", [(2, 9, 12, 3), (1, 400, 224, 7), (3, 0, 16, 2), (2, 1, 7, 1), (4, 130, 44, 4)])
def test_core_matches_the_torch_backend(B, M, C, H, dtype, layout, vector_width):
    ops = _cpu_ops()
    x_cls, x_tokens, w, dz = _core_inputs(B, M, C, H, dtype, layout)
    fwd = ops.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
    ref = _torch().cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
    assert len(fwd) == 2
    for name, a, r in zip(("z", "lse"), fwd, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    bwd = ops.cross_attention_core_backward(x_cls, x_tokens, w, *fwd, dz, 1e-6)
    ref_b = _torch().cross_attention_core_backward(x_cls, x_tokens, w, *ref, dz, 1e-6)
    for name, a, r in zip(("dx_cls", "dx_tokens", "dw"), bwd, ref_b):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert a.is_contiguous(), f"{name} must be contiguous"
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        scale = float(r.float().abs().max()) if r.numel() else 1.0
        torch.testing.assert_close(a.float(), r.float(), atol=tol * max(1.0, scale), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


@requires_cpp
def test_vector_width_follows_the_cpu():
    """16-float kernels exactly where the x86-64-v4 (AVX-512) clones run; 8 can always be chosen,
    a width the CPU lacks never."""
    ops = _cpu_ops()
    widest = ops.set_vector_width(0)
    assert widest == (16 if ops.cpu_capability() == "x86-64-v4" else 8)
    try:
        assert ops.set_vector_width(8) == 8
        if widest == 8:
            with pytest.raises(RuntimeError, match="width == widest_vector"):
                ops.set_vector_width(16)
    finally:
        assert ops.set_vector_width(0) == widest


@requires_cpp
def test_core_does_not_modify_inputs():
    ops = _cpu_ops()
    x_cls, x_tokens, w, dz = _core_inputs(2, 20, 24, 3, torch.float32, "strided")
    before = [t.clone() for t in (x_cls, x_tokens, w, dz)]
    fwd = ops.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
    ops.cross_attention_core_backward(x_cls, x_tokens, w, *fwd, dz, 1e-6)
    for a, b in zip((x_cls, x_tokens, w, dz), before):
        assert torch.equal(a, b)


@requires_cpp
@pytest.mark.parametrize("B,M,C,H", [(1, 400, 224, 7), (3, 196, 448, 7), (64, 40, 20, 4), (2, 77, 13, 1)])
def test_thread_count_does_not_change_results(B, M, C, H, vector_width):
    """The token splits depend on the shapes only and are combined in a fixed order."""
    ops = _cpu_ops()
    x_cls, x_tokens, w, dz = _core_inputs(B, M, C, H, torch.float32, "strided", seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fwd = ops.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
            bwd = ops.cross_attention_core_backward(x_cls, x_tokens, w, *fwd, dz, 1e-6)
            results.append(tuple(fwd) + tuple(bwd))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b), "results differ between 1 and 2 threads"


def _mkl_threads():
    info = torch.__config__.parallel_info()
    return info.split("mkl_get_max_threads() :")[1].split()[0] if "mkl_get_max_threads() :" in info else None


@requires_cpp
def test_serial_sections_leave_the_thread_counts_and_results_alone():
    """The cpp backend runs each op in a serial section of the calling thread (one parallel region per
    kernel): the caller's ATen and MKL thread counts are restored afterwards, also when a kernel
    raises inside the section, and the results of the whole ops, forward and backward, are bitwise
    the same with 1 and 2 threads."""
    from crossvit_kernels.backends import get_backend
    torch.manual_seed(0)
    B, N, C, H = 5, 40, 24, 3
    x = torch.randn(B, N, C, requires_grad=True)
    ps = [torch.randn(C) for _ in range(2)] + [torch.randn(C, C) * 0.2 if i % 2 == 0 else torch.randn(C)
                                               for i in range(8)]
    images = torch.randn(9, 3, 24, 24, requires_grad=True)   # 9 images: several weight-gradient chunks
    pe = (torch.randn(C, 3, 12, 12, requires_grad=True), torch.randn(C), torch.randn(5, C), torch.randn(C))
    previous = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = crossvit_kernels.ops.cross_attention(x[:, 0], x[:, 1:], *ps, num_heads=H, backend="cpp")
            tok = crossvit_kernels.ops.patch_embed(images, *pe, backend="cpp")
            g = torch.autograd.grad(out.square().sum() + tok.square().sum(), (x, images, pe[0]))
            results.append((out, tok) + g)
            assert torch.get_num_threads() == n
        torch.set_num_threads(2)
        mkl = _mkl_threads()
        with pytest.raises(RuntimeError, match="Hi % ph == 0"):   # raised by the kernel, inside the section
            get_backend("cpp").patch_embed_forward(torch.randn(1, 3, 10, 10), torch.randn(4, 3, 3, 3), None,
                                                   torch.randn(10, 4), torch.randn(4))
        assert torch.get_num_threads() == 2 and _mkl_threads() == mkl
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b), "results differ between 1 and 2 threads"


# ---------------------------------------------------------------------------------------------
# patch embedding through the public entry
# ---------------------------------------------------------------------------------------------

PATCH_SHAPES = [  # (B, Cin, H, W, C, ph, pw)
    (2, 3, 24, 36, 10, 12, 12),
    (1, 2, 10, 15, 7, 5, 3),       # odd, non-square patches, B = 1
    (2, 3, 240, 240, 224, 12, 12),  # CrossViT-18 branch 0
    (1, 3, 224, 224, 448, 16, 16),  # CrossViT-18 branch 1
]


def _patch_inputs(B, Cin, H, W, C, ph, pw, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = (H // ph) * (W // pw)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)

    return dict(images=r(B, Cin, H, W), weight=r(C, Cin, ph, pw, scale=(Cin * ph * pw) ** -0.5),
                bias=r(C, scale=0.1) if bias else None, pos_embed=r(1, 1 + P, C, scale=0.02),
                cls_token=r(1, 1, C, scale=0.02))


def _run_patch(inputs, backend, grad_out):
    out = patch_embed(inputs["images"], inputs["weight"], inputs["bias"], inputs["pos_embed"], inputs["cls_token"],
                      backend=backend)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out.to(out.dtype))
    return out, dict(zip(names, grads))


def _recast(inputs, dtype):
    return {k: None if v is None else v.detach().to(dtype).requires_grad_(True) for k, v in inputs.items()}


PATCH_CASES = (  # every shape with and without bias in float32; bfloat16 and float64 with bias
    [(shape, torch.float32, bias) for shape in PATCH_SHAPES for bias in (True, False)]
    + [(shape, dtype, True) for shape in PATCH_SHAPES for dtype in (torch.bfloat16, torch.float64)]
    + [(PATCH_SHAPES[1], dtype, False) for dtype in (torch.bfloat16, torch.float64)]
)


@requires_cpp
@pytest.mark.parametrize("shape,dtype,bias", PATCH_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", ""))
def test_patch_embed_cpp(shape, dtype, bias):
    B, Cin, H, W, C, ph, pw = shape
    inputs = _patch_inputs(*shape, dtype=dtype, bias=bias)
    P = (H // ph) * (W // pw)
    grad_out = torch.randn(B, 1 + P, C, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, grads = _run_patch(inputs, "cpp", grad_out)
    ref_out, ref_grads = _run_patch(_recast(inputs, dtype), "reference", grad_out)
    oracle_out, oracle_grads = _run_patch(_recast(inputs, torch.float64), "reference", grad_out)
    assert out.dtype == dtype and out.shape == (B, 1 + P, C)
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[name].shape, name
        assert_within_ref_error(g, ref_grads[name], oracle_grads[name], dtype, name=f"d{name}", factor=GRAD_FACTOR)


@requires_cpp
def test_patch_embed_without_image_grad_and_strided_images():
    ops = _cpu_ops()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 24, 36, 3, generator=g).permute(0, 3, 1, 2)  # channels-last strides
    weight = torch.randn(10, 3, 12, 12, generator=g) * 0.05
    pos, cls = torch.randn(1 + 6, 10, generator=g), torch.randn(10, generator=g)
    out = ops.patch_embed_forward(images, weight, None, pos, cls)
    ref = _torch().patch_embed_forward(images, weight, None, pos, cls)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    d = ops.patch_embed_backward(grad, images, weight, False, False)
    r = _torch().patch_embed_backward(grad, images, weight, False, False)
    assert d[0] is None and d[2] is None
    for a, b in zip(d[1:], r[1:]):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


PATCH_SPLIT_SHAPES = [  # (B, Cin, H, W, C, ph, pw): 5 x 7 patches of 2 x 3 px, non-square images
    (3, 3, 10, 21, 16, 2, 3),    # 105 patches: the batch is one part, its GEMMs on the threads
    (23, 3, 10, 21, 16, 2, 3),   # 805 patches: 2 parts of 57 and 58 grid rows, the first ending inside an image
    (181, 2, 10, 21, 8, 2, 3),   # 6335 patches: 16 forward parts; 8 weight-gradient partials of 23-24 runs
]


def _strided_images(images):
    """The same values in channels-last storage with every other column skipped (no stride is 1)."""
    B, Cin, H, W = images.shape
    out = torch.empty(B, H, 2 * W, Cin, dtype=images.dtype)[:, :, ::2].permute(0, 3, 1, 2)
    return out.copy_(images.detach()).requires_grad_(images.requires_grad)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", PATCH_SPLIT_SHAPES, ids=lambda s: f"B{s[0]}")
def test_patch_embed_split_into_parts(shape, dtype):
    """The kernels' work split (parts of the batch's patch-grid rows, which may start and end inside
    an image): forward and every gradient, the images' included, on strided images against the
    float64 oracle, and bitwise the same with 1 and 2 threads."""
    B, Cin, H, W, C, ph, pw = shape
    inputs = _patch_inputs(*shape, dtype=dtype, bias=True, seed=4)
    inputs["images"] = _strided_images(inputs["images"])
    assert inputs["images"].stride(3) != 1
    grad_out = torch.randn(B, 1 + (H // ph) * (W // pw), C, generator=torch.Generator().manual_seed(9),
                           dtype=torch.float64)
    previous = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, grads = _run_patch(inputs, "cpp", grad_out)
            results.append([out] + list(grads.values()))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b), "results differ between 1 and 2 threads"
    ref_out, ref_grads = _run_patch(_recast(inputs, dtype), "reference", grad_out)
    oracle_out, oracle_grads = _run_patch(_recast(inputs, torch.float64), "reference", grad_out)
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    assert set(grads) == {"images", "weight", "bias", "pos_embed", "cls_token"}
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[name].shape, name
        assert_within_ref_error(g, ref_grads[name], oracle_grads[name], dtype, name=f"d{name}", factor=GRAD_FACTOR)


@requires_cpp
@pytest.mark.parametrize("B", [1, 4])  # one image (GEMM threads) and a batch (images across threads)
def test_ops_under_inference_mode(B):
    """Worker threads do not inherit InferenceMode: writing into an inference tensor from one must
    still work (a regression test)."""
    g = torch.Generator().manual_seed(11)
    images, weight = torch.randn(B, 3, 24, 24, generator=g), torch.randn(8, 3, 12, 12, generator=g)
    bias, pos, cls = torch.randn(8, generator=g), torch.randn(1, 5, 8, generator=g), torch.randn(1, 1, 8, generator=g)
    expected = patch_embed(images, weight, bias, pos, cls, backend="reference")
    with torch.inference_mode():
        out = patch_embed(images, weight, bias, pos, cls, backend="cpp")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    inp = cross_attention_inputs(B, 9, 16, 2, torch.float32, requires_grad=False)
    args = [inp[k] for k in ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv",
                             "wo", "bo")]
    ref = cross_attention(*args, num_heads=2, backend="reference")
    with torch.inference_mode():
        got = cross_attention(*args, num_heads=2, backend="cpp")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# direct calls that break an operator's contract
# ---------------------------------------------------------------------------------------------

def _operators(namespace):
    """Every operator registered in a torch.ops namespace (what the extension module defines)."""
    prefix = namespace + "::"
    return sorted({s.name[len(prefix):] for s in torch._C._jit_get_all_schemas() if s.name.startswith(prefix)})


# One call per operator that breaks its contract, as code run in a child process where `ops` is the
# module's torch.ops namespace and `dev` the device of the tensors; with the condition it breaks.
BAD_CALLS = {
    "cross_attention_core_forward": (
        "ops.cross_attention_core_forward(torch.randn(2, device=dev), torch.randn(2, 5, 8, device=dev), "
        "torch.randn(2, 2, 8, device=dev), 1e-6)", "x_cls.dim() == 2"),
    "cross_attention_core_backward": (
        "x, t, w = torch.randn(2, 8, device=dev), torch.randn(2, 5, 8, device=dev), torch.randn(2, 2, 8, device=dev)\n"
        "ops.cross_attention_core_backward(x, t, w, torch.randn(2, 2, 8, device=dev), torch.randn(2, 2, device=dev), "
        "torch.randn(1, 2, 8, device=dev), 1e-6)", "dz.sizes().equals({B, H, C})"),
    "patch_embed_forward": (
        "ops.patch_embed_forward(torch.randn(1, 3, 10, 10, device=dev), torch.randn(4, 3, 3, 3, device=dev), None, "
        "torch.randn(10, 4, device=dev), torch.randn(4, device=dev))", "Hi % ph == 0"),
    "patch_embed_backward": (
        "ops.patch_embed_backward(torch.randn(1, 4, 4, device=dev), torch.randn(1, 3, 6, 6, device=dev), "
        "torch.randn(4, 3, 3, 3, device=dev), True, True)", "grad_out.sizes().equals({B, 1 + P, C})"),
    "cpu_capability": ("ops.cpu_capability(torch.randn(2))", None),  # no argument expected
    "serial_section": ("ops.serial_section(False)", "tl_serial_depth > 0"),  # leaving a section never entered
    "set_vector_width": ("ops.set_vector_width(4)", "width == 0 || width == 8 || width == widest_vector()"),
}

_CHILD = """
import sys, torch
from crossvit_kernels.backends import extension
st = extension.status({kind!r})
assert st.ops is not None, st.reason
ops, dev = st.ops, {dev!r}
try:
{call}
except Exception as exc:
    print("RAISED", type(exc).__name__, str(exc).replace("\\n", " "))
    sys.exit(0)
print("RETURNED")
"""


def _bad_call_cases():
    cases = [("cpu", "cpu", op) for op in sorted(BAD_CALLS)]
    if CUDA_BUILT:  # without a GPU the dispatcher refuses CPU tensors before any kernel runs
        cases += [("cuda", "cuda" if HAS_GPU else "cpu", op) for op in extension.OPS]
    return cases


@requires_cpp
def test_every_operator_has_a_bad_call():
    assert set(extension.OPS) <= set(_operators("crossvit_kernels_cpu"))
    assert set(_operators("crossvit_kernels_cpu")) == set(BAD_CALLS), "a new operator needs a case in BAD_CALLS"
    if CUDA_BUILT and extension.status("cuda").ops is not None:
        assert set(_operators("crossvit_kernels_cuda")) == set(extension.OPS)


@requires_cpp
@pytest.mark.parametrize("kind,dev,op", _bad_call_cases())
def test_a_bad_direct_call_raises_and_never_kills_the_process(kind, dev, op):
    """Each operator, called with inputs that break its contract, raises a Python exception (naming
    the broken condition where a kernel sees the call): the process never dies of a signal."""
    call, needle = BAD_CALLS[op]
    code = _CHILD.format(kind=kind, dev=dev, call="\n".join("    " + line for line in call.split("\n")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode >= 0, \
        f"{kind}::{op} killed the process with signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("RAISED"), f"{kind}::{op} accepted bad input: {proc.stdout}"
    if needle is not None and dev == kind:
        assert "RuntimeError" in proc.stdout and needle in proc.stdout and "crossvit_kernels.ops" in proc.stdout, \
            proc.stdout


@requires_cpp
def test_bad_inputs_raise_naming_the_broken_condition():
    ops = _cpu_ops()
    x_cls, x_tokens, w, dz = _core_inputs(2, 5, 8, 2, torch.float32, "contiguous")
    z, lse = ops.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
    img, wt, pos, cls = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(5, 4), torch.randn(4)
    cases = [
        (lambda: ops.cross_attention_core_forward(x_cls[0], x_tokens, w, 1e-6), "x_cls.dim() == 2"),
        (lambda: ops.cross_attention_core_forward(x_cls, x_tokens[0], w, 1e-6), "x_tokens.dim() == 3"),
        (lambda: ops.cross_attention_core_forward(x_cls, x_tokens[:1], w, 1e-6), "x_tokens.size(0) == B"),
        (lambda: ops.cross_attention_core_forward(x_cls, x_tokens, w.double(), 1e-6), "w.scalar_type() == at::kFloat"),
        (lambda: ops.cross_attention_core_forward(x_cls, x_tokens, w[:, :, :4], 1e-6), "w.size(2) == C"),
        (lambda: ops.cross_attention_core_forward(x_cls.double(), x_tokens.double(), w, 1e-6), "is_half_or_single"),
        (lambda: ops.cross_attention_core_forward(x_cls, x_tokens.bfloat16(), w, 1e-6),
         "x_tokens.scalar_type() == x_cls.scalar_type()"),
        (lambda: ops.cross_attention_core_backward(x_cls, x_tokens, w, z, lse[:, :1], dz, 1e-6),
         "lse.sizes().equals({B, H})"),
        (lambda: ops.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz.half(), 1e-6),
         "dz.scalar_type() == at::kFloat"),
        (lambda: ops.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz[:1], 1e-6),
         "dz.sizes().equals({B, H, C})"),
        (lambda: ops.patch_embed_forward(torch.randn(1, 3, 10, 10), wt, None, torch.randn(10, 4), cls),
         "Hi % ph == 0"),
        (lambda: ops.patch_embed_forward(torch.randn(1, 2, 6, 6), wt, None, pos, cls), "weight.size(1) == Cin"),
        (lambda: ops.patch_embed_forward(img, wt, torch.randn(5), pos, cls), "bias.sizes().equals({C})"),
        (lambda: ops.patch_embed_forward(img, wt, None, torch.randn(4, 4), cls), "pos_embed.sizes().equals"),
        (lambda: ops.patch_embed_forward(img, wt.double(), None, pos, cls), "weight.scalar_type() == st"),
        (lambda: ops.patch_embed_forward(img.int(), wt.int(), None, pos, cls), "st == at::kDouble"),
        (lambda: ops.patch_embed_backward(torch.randn(1, 4, 4), img, wt, True, True),
         "grad_out.sizes().equals({B, 1 + P, C})"),
    ]
    for fn, needle in cases:
        with pytest.raises(RuntimeError) as info:
            fn()
        assert needle in str(info.value), f"expected {needle!r} in the message, got: {info.value}"
        assert "crossvit_kernels.ops" in str(info.value)
    # the dispatcher sends meta tensors to no kernel of this module: refused before any kernel runs
    with pytest.raises(NotImplementedError):
        ops.cross_attention_core_forward(x_cls.to("meta"), x_tokens.to("meta"), w.to("meta"), 1e-6)


# ---------------------------------------------------------------------------------------------
# the loader: reasons, a broken extension, lazy import
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_registry(monkeypatch):
    """Fresh (and afterwards restored) load caches of the loader and the backend registry."""
    monkeypatch.setattr(extension, "_status", {})
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.setattr(backends, "_warned", set())
    yield monkeypatch


def test_available_backends_reports_the_extension():
    avail = crossvit_kernels.available_backends()
    if _CPU.ops is not None:
        assert avail["cpp"] is True
    else:
        assert "not built" in avail["cpp"]
    if not HAS_GPU:
        assert isinstance(avail["cuda"], str) and ("GPU" in avail["cuda"] or "CPU-only" in avail["cuda"]), avail


def test_broken_extension_degrades_to_torch_with_one_warning(fresh_registry):
    real_import = extension._import

    def broken(name):
        if name == extension.MODULES["cpu"]:
            raise OSError(f"{name}.so: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")
        return real_import(name)

    fresh_registry.setattr(extension, "_import", broken)
    reason = crossvit_kernels.available_backends()["cpp"]
    assert isinstance(reason, str) and reason.startswith("failed to import") and "undefined symbol" in reason
    assert "rebuild" in reason
    inputs = cross_attention_inputs(2, 6, 16, 2, requires_grad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_cross_attention(inputs, "auto")[0]
        run_cross_attention(inputs, "auto")
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "crossvit_kernels" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "falls back to backend 'torch'" in str(ours[0].message) and "undefined symbol" in str(ours[0].message)
    expected = run_cross_attention(inputs, "torch")[0]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        run_cross_attention(inputs, "cpp")


def test_missing_extension_is_unavailable_without_warning(fresh_registry):
    def missing(name):
        err = ModuleNotFoundError(f"No module named {name!r}")
        err.name = name
        raise err

    fresh_registry.setattr(extension, "_import", missing)
    reason = crossvit_kernels.available_backends()["cpp"]
    assert "not built" in reason and not reason.startswith("failed to import")
    inputs = cross_attention_inputs(1, 3, 8, 2, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an absent extension is normal: no warning
        run_cross_attention(inputs, "auto")


@requires_cpp
def test_stale_extension_without_the_operators_is_broken(fresh_registry):
    """A module that imports but registers none of the operators (a build of an older source, which
    Python may pick before the current one) is reported as broken, with what to do."""
    fresh_registry.setitem(extension.NAMESPACES, "cpu", "crossvit_kernels_no_such_namespace")
    reason = crossvit_kernels.available_backends()["cpp"]
    assert reason.startswith("failed to import") and "cross_attention_core_forward" in reason and "rebuild" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_cross_attention(cross_attention_inputs(1, 3, 8, 2, requires_grad=False), "auto")[0]
    assert out.shape == (1, 8)


def test_extension_is_imported_lazily():
    code = ("import sys, crossvit_kernels; "
            "assert not [m for m in sys.modules if m.startswith('crossvit_kernels._C')], 'eager import'; "
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cuda_extension_loads_where_built():
    """The CUDA module must at least import (no undefined symbols) and register its operators where
    it was built, GPU or not."""
    if not CUDA_BUILT:
        pytest.skip("the CUDA part of the extension is not built here (no nvcc, a CPU-only torch, or "
                    "CROSSVIT_KERNELS_NO_CUDA=1)")
    st = extension._try_load("cuda")
    assert st.ops is not None, st.reason
    for op in extension.OPS:
        assert hasattr(st.ops, op)


# ---------------------------------------------------------------------------------------------
# CUDA backend (GPU only)
# ---------------------------------------------------------------------------------------------

def _cuda_ready():
    reason = crossvit_kernels.available_backends()["cuda"]
    if reason is not True:
        pytest.skip(f"cuda backend unavailable: {reason}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,M,C,H", [(2, 5, 12, 3), (3, 0, 20, 4), (1, 17, 40, 5), (4, 400, 224, 7),
                                     (4, 196, 448, 7), (1, 3000, 64, 2)])
def test_cross_attention_cuda(B, M, C, H, dtype):
    _cuda_ready()
    inputs = cross_attention_inputs(B, M, C, H, dtype=dtype, device="cuda", strided=True)
    grad_out = torch.randn(B, C, dtype=torch.float64, device="cuda")
    out, grads = run_cross_attention(inputs, "cuda", grad_out)
    ref_out, ref_grads = run_cross_attention(upcast(inputs, dtype), "reference", grad_out)
    oracle_out, oracle_grads = run_cross_attention(upcast(inputs, torch.float64), "reference", grad_out)
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    for name, g in grads.items():
        assert_within_ref_error(g, ref_grads[name], oracle_grads[name], dtype, name=f"d{name}", factor=GRAD_FACTOR)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", PATCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_patch_embed_cuda(shape, dtype):
    _cuda_ready()
    B, Cin, H, W, C, ph, pw = shape
    inputs = {k: None if v is None else v.detach().cuda().requires_grad_(True)
              for k, v in _patch_inputs(*shape, dtype=dtype, bias=True).items()}
    P = (H // ph) * (W // pw)
    grad_out = torch.randn(B, 1 + P, C, dtype=torch.float64, device="cuda")
    out, grads = _run_patch(inputs, "cuda", grad_out)
    ref_out, ref_grads = _run_patch(_recast(inputs, dtype), "reference", grad_out)
    oracle_out, oracle_grads = _run_patch(_recast(inputs, torch.float64), "reference", grad_out)
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    for name, g in grads.items():
        assert_within_ref_error(g, ref_grads[name], oracle_grads[name], dtype, name=f"d{name}", factor=GRAD_FACTOR)
