"""Backend "triton" of patch_embed (crossvit_kernels/backends/triton/patch_embed.py).

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on
CPU tensors; with one, the same tests run on CUDA tensors. A compile-only check lowers every
kernel, with the block sizes the launchers pick on a GPU, to an NVIDIA sm_90 cubin, because the
interpreter accepts programs a real compile rejects.

Criterion (tests/helpers.py): against a float64 conv2d oracle, the Triton error may be at most
FACTOR (forward) / GRAD_FACTOR (gradients) times the same-dtype reference backend's error, plus a
small floor; float64 agrees with the oracle to 1e-10.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import (GRAD_FACTOR, HAS_GPU, TOL, assert_close, assert_within_ref_error, compile_env,
                     nvidia_compiler_reason, requires_gpu, requires_triton, triton_installs)

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GRADS = ("images", "weight", "bias", "pos_embed", "cls_token")


def _tpe():
    return importlib.import_module("crossvit_kernels.backends.triton.patch_embed")


def _torch_impl():
    from crossvit_kernels.backends import get_backend
    return get_backend("torch")


def make_inputs(B, Cin, H, W, C, ph, pw=None, dtype=torch.float32, device=DEVICE, bias=True,
                layout="contiguous", timm_shapes=False, seed=0, requires_grad=True):
    """Fresh random leaves for ops.patch_embed. ``layout``: "contiguous", "channels_last", or
    "strided" (a view with an offset and a width stride of 2, made a leaf)."""
    pw = ph if pw is None else pw
    P = (H // ph) * (W // pw)
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "strided":
        images = r(B, Cin, H + 3, 2 * W + 1)[:, :, 2:H + 2, 1::2]
    else:
        images = r(B, Cin, H, W)
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
    t = dict(images=images, weight=r(C, Cin, ph, pw, scale=(Cin * ph * pw) ** -0.5),
             bias=r(C, scale=0.1) if bias else None,
             pos_embed=r(1, 1 + P, C, scale=0.5) if timm_shapes else r(1 + P, C, scale=0.5),
             cls_token=r(1, 1, C, scale=0.5) if timm_shapes else r(C, scale=0.5))
    if layout == "strided":
        assert not t["images"].is_contiguous() and t["images"].stride(-1) == 2
    if requires_grad:
        for v in t.values():
            if v is not None:
                v.requires_grad_(True)
    t["grad_out"] = r(B, 1 + P, C)
    return t


def upcast(t, dtype=torch.float64):
    return {k: (None if v is None else v.detach().to(dtype).requires_grad_(v.requires_grad)) for k, v in t.items()}


def run(t, backend):
    """Forward through the public op, then every gradient that is required."""
    from crossvit_kernels.ops.patch_embed import patch_embed
    out = patch_embed(t["images"], t["weight"], t["bias"], t["pos_embed"], t["cls_token"], backend=backend)
    names = [n for n in GRADS if t[n] is not None and t[n].requires_grad]
    grads = torch.autograd.grad(out, [t[n] for n in names], t["grad_out"].to(out.dtype))
    return out, dict(zip(names, grads))


def check_against_oracle(t, dtype):
    """Triton vs the float64 conv2d oracle, bounded by the same-dtype reference's own error."""
    out, grads = run(t, "triton")
    oracle_out, oracle_grads = run(upcast(t), "reference")
    ref_out, ref_grads = run(t, "reference")
    assert out.dtype == dtype and out.shape == oracle_out.shape
    assert_within_ref_error(out, ref_out, oracle_out, dtype, name="out")
    assert set(grads) == set(oracle_grads)
    for n in grads:
        assert grads[n].shape == t[n].shape, (n, grads[n].shape, t[n].shape)
        assert grads[n].dtype == dtype, (n, grads[n].dtype)
        assert_within_ref_error(grads[n], ref_grads[n], oracle_grads[n], dtype, name=f"d_{n}", factor=GRAD_FACTOR)


pytestmark = requires_triton


def triton_cdiv(a, b):
    return -(-a // b)


CASES = {
    # name: (B, Cin, H, W, C, ph, pw, bias, layout, timm_shapes)
    "odd_p5_15x25_C7": (2, 3, 15, 25, 7, 5, 5, True, "contiguous", False),
    "in_chans1_patch16x8_B1": (1, 1, 32, 48, 40, 16, 8, True, "contiguous", True),
    "in_chans4_no_bias": (2, 4, 24, 36, 24, 12, 12, False, "contiguous", False),
    "one_patch_B1": (1, 3, 16, 16, 32, 16, 16, True, "contiguous", True),
    "strided_images": (2, 3, 21, 14, 19, 7, 7, True, "strided", False),
    "channels_last": (2, 3, 24, 24, 48, 12, 12, True, "channels_last", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_against_float64_oracle(case, dtype):
    B, Cin, H, W, C, ph, pw, bias, layout, timm_shapes = CASES[case]
    t = make_inputs(B, Cin, H, W, C, ph, pw, dtype=dtype, bias=bias, layout=layout, timm_shapes=timm_shapes)
    check_against_oracle(t, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("branch", ("branch0_240px_p12_C224_B2", "branch1_224px_p16_C448_B1"))
def test_real_crossvit_shapes(branch, dtype):
    if branch.startswith("branch0"):
        t = make_inputs(2, 3, 240, 240, 224, 12, dtype=dtype, timm_shapes=True, seed=1)
    else:
        t = make_inputs(1, 3, 224, 224, 448, 16, dtype=dtype, timm_shapes=True, seed=2)
    check_against_oracle(t, dtype)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every floating-point torch.empty made while the fixture is active starts as NaN, so an
    element (or partial-sum slot) that a kernel forgets to write cannot pass."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", empty)
    yield


def _direct(tpe, t, has_bias=True, needs_images_grad=True):
    x, w, b, pos, cls = (t[k].detach() if t[k] is not None else None for k in ("images", "weight", "bias",
                                                                               "pos_embed", "cls_token"))
    out = tpe.patch_embed_forward(x, w, b if has_bias else None, pos, cls)
    grads = tpe.patch_embed_backward(t["grad_out"], x, w, has_bias, needs_images_grad)
    return out, grads


def _compare_direct(t, got_out, got_grads, dtype):
    ti = _torch_impl()
    x, w, b, pos, cls = (t[k].detach() if t[k] is not None else None for k in ("images", "weight", "bias",
                                                                               "pos_embed", "cls_token"))
    has_bias, needs = got_grads[2] is not None, got_grads[0] is not None
    exp_out = ti.patch_embed_forward(x, w, b if has_bias else None, pos, cls)
    exp_grads = ti.patch_embed_backward(t["grad_out"], x, w, has_bias, needs)
    tol = TOL[dtype] if dtype in (torch.float16, torch.bfloat16) else dict(atol=1e-12, rtol=1e-12) \
        if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    for name, a, e in zip(("out",) + tuple(f"d_{n}" for n in GRADS), (got_out,) + tuple(got_grads),
                          (exp_out,) + tuple(exp_grads)):
        if e is None:
            assert a is None, f"{name}: expected None"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert a.is_contiguous(), f"{name} is not contiguous"
        scale = max(1.0, float(e.abs().max()))
        assert_close(a, e, atol=tol["atol"] * scale, rtol=tol["rtol"], name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
def test_direct_matches_torch_backend(layout, dtype, poisoned_allocations):
    t = make_inputs(2, 3, 30, 20, 36, 10, dtype=dtype, layout=layout, requires_grad=False, seed=3)
    out, grads = _direct(_tpe(), t)
    _compare_direct(t, out, grads, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_gpu_tiles_under_interpreter(dtype, monkeypatch, poisoned_allocations):
    """The block sizes used on a GPU (several row, channel and K tiles, all masked at the edges),
    run by whichever executor is present."""
    tpe = _tpe()
    monkeypatch.setattr(tpe, "INTERPRETER_LARGE_TILES", False)
    B, Cin, H, W, C, ph = 3, 3, 42, 36, 100, 6
    M, K = B * (H // ph) * (W // ph), Cin * ph * ph
    BM, BN, BK, _, _ = tpe._gemm_config(M, C, K, dtype)
    assert triton_cdiv(M, BM) > 1 and triton_cdiv(C, BN) > 1 and triton_cdiv(K, BK) > 1 and C % BN and K % BK
    t = make_inputs(B, Cin, H, W, C, ph, dtype=dtype, layout="strided", requires_grad=False, seed=4)
    out, grads = _direct(tpe, t)
    _compare_direct(t, out, grads, dtype)


def test_optional_outputs(poisoned_allocations):
    """No bias -> d_bias None; images not needing a gradient -> d_images None (and the op leaves
    images.grad unset while the other gradients stay right)."""
    tpe = _tpe()
    t = make_inputs(2, 3, 24, 36, 24, 12, bias=False, requires_grad=False, seed=5)
    out, grads = _direct(tpe, t, has_bias=False, needs_images_grad=False)
    assert grads[0] is None and grads[2] is None
    _compare_direct(t, out, grads, torch.float32)

    t = make_inputs(2, 3, 24, 36, 24, 12, seed=6)
    t["images"].requires_grad_(False)
    out, grads = run(t, "triton")
    assert "images" not in grads
    oracle_out, oracle_grads = run(upcast(t), "reference")
    ref_out, ref_grads = run(t, "reference")
    for n in grads:
        assert_within_ref_error(grads[n], ref_grads[n], oracle_grads[n], torch.float32, name=f"d_{n}",
                                factor=GRAD_FACTOR)
    from crossvit_kernels.ops.patch_embed import patch_embed
    out = patch_embed(t["images"], t["weight"], t["bias"], t["pos_embed"], t["cls_token"], backend="triton")
    out.backward(t["grad_out"])
    assert t["images"].grad is None and t["weight"].grad is not None


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_deterministic_with_split_reduction(dtype):
    """Same inputs, same bits, including the split d_weight reduction (more than one split)."""
    tpe = _tpe()
    B, Cin, H, W, C, ph = 3, 3, 96, 96, 40, 6
    M, K = B * (H // ph) * (W // ph), Cin * ph * ph
    large = DEVICE == "cpu" and tpe.INTERPRETER_LARGE_TILES
    BM, BN, BK, _, _ = tpe._gemm_config(M, C, K, dtype, large)
    _, splits = tpe._dw_splits(M, triton_cdiv(C, BN) * triton_cdiv(K, BK), BM)
    assert splits > 1, "the shape must exercise the split reduction"
    t = make_inputs(B, Cin, H, W, C, ph, dtype=dtype, requires_grad=False, seed=7)
    first = _direct(tpe, t)
    second = _direct(tpe, t)
    assert torch.equal(first[0], second[0])
    for n, a, b in zip(GRADS, first[1], second[1]):
        assert torch.equal(a, b), f"d_{n} differs between two identical calls"
    _compare_direct(t, *first, dtype)


def test_torch_compile_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) traces a function using the op with no graph break, and the
    compiled forward and backward run the Triton kernels."""
    from crossvit_kernels.backends import get_backend
    from crossvit_kernels.ops.patch_embed import patch_embed
    triton_backend = get_backend("triton")
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = triton_backend.patch_embed_forward, triton_backend.patch_embed_backward

    def counted_fwd(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def counted_bwd(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(triton_backend, "patch_embed_forward", counted_fwd)
    monkeypatch.setattr(triton_backend, "patch_embed_backward", counted_bwd)

    def f(images, weight, bias, pos_embed, cls_token):
        return torch.tanh(patch_embed(images, weight, bias, pos_embed, cls_token, backend="triton")) * 2.0

    torch._dynamo.reset()
    t = make_inputs(2, 3, 15, 25, 7, 5, timm_shapes=True, seed=8)
    args = [t[k] for k in ("images", "weight", "bias", "pos_embed", "cls_token")]
    out = torch.compile(f, fullgraph=True)(*args)
    got = torch.autograd.grad(out, args, t["grad_out"])
    assert calls == {"fwd": 1, "bwd": 1}, calls
    exp_out = f(*args)
    exp = torch.autograd.grad(exp_out, args, t["grad_out"])
    assert_close(out, exp_out, atol=1e-5, rtol=1e-5, name="compiled out")
    for n, a, e in zip(GRADS, got, exp):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=f"compiled d_{n}")


# ---------------------------------------------------------------------------------------------
# compile-only check for a real NVIDIA target (no GPU needed)
# ---------------------------------------------------------------------------------------------

COMPILE_SHAPES = [
    # (B, Cin, H, W, C, ph, pw, dtype): the two CrossViT branches, every dtype, and an odd shape
    (2, 3, 240, 240, 224, 12, 12, torch.bfloat16),
    (2, 3, 224, 224, 448, 16, 16, torch.bfloat16),
    (2, 3, 240, 240, 224, 12, 12, torch.float16),
    (2, 3, 240, 240, 224, 12, 12, torch.float32),
    (2, 3, 240, 240, 224, 12, 12, torch.float64),
    (2, 3, 15, 25, 7, 5, 5, torch.float32),
]


def _compile_check(arch: int = 90) -> None:
    """Capture the launches of the public launchers (with the GPU block sizes), specialise the
    arguments as a CUDA launch would (ints equal to 1 become constants, multiples of 16 and
    16-byte-aligned pointers get divisibility hints), and compile each kernel for sm_<arch>.
    Prints one line per kernel; raises on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tpe = _tpe()
    assert isinstance(tpe._patch_embed_fwd_kernel, triton.runtime.JITFunction), "run without TRITON_INTERPRET"
    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
    log = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, num_stages=3, **constexprs):
                log.append((self.fn, args, constexprs, dict(num_warps=num_warps, num_stages=num_stages)))
            return launch

    for name in ("_patch_embed_fwd_kernel", "_patch_embed_bwd_kernel", "_patch_embed_bwd_finish_kernel"):
        setattr(tpe, name, Recorder(getattr(tpe, name)))
    tpe._large_tiles = lambda t: False            # the GPU block sizes
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for B, Cin, H, W, C, ph, pw, dtype in COMPILE_SHAPES:
        P = (H // ph) * (W // pw)
        z = lambda *s, dtype=dtype: torch.zeros(*s, dtype=dtype)  # noqa: E731
        log.clear()
        tpe.patch_embed_forward(z(B, Cin, H, W), z(C, Cin, ph, pw), z(C), z(1 + P, C), z(C))
        tpe.patch_embed_backward(z(B, 1 + P, C), z(B, Cin, H, W), z(C, Cin, ph, pw), True, True)
        for fn, args, constexprs, options in log:
            signature, constants, attrs = {}, dict(constexprs), {}
            runtime = [n for n in fn.arg_names if n not in constexprs]
            assert len(runtime) == len(args), (fn.__name__, runtime, len(args))
            for n, a in zip(runtime, args):
                idx = (fn.arg_names.index(n),)
                if isinstance(a, torch.Tensor):
                    signature[n] = types[a.dtype]
                    if a.data_ptr() % 16 == 0:
                        attrs[idx] = [["tt.divisibility", 16]]
                elif isinstance(a, int) and not isinstance(a, bool):
                    if a == 1:
                        signature[n], constants[n] = "constexpr", 1
                        continue
                    signature[n] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
                    if a % 16 == 0:
                        attrs[idx] = [["tt.divisibility", 16]]
                else:
                    raise TypeError(f"{fn.__name__}: unexpected runtime argument {n}={a!r}")
            for n in constexprs:
                signature[n] = "constexpr"
            signature = {n: signature[n] for n in fn.arg_names}
            key = (fn.__name__, repr(signature), repr(sorted((k, repr(v)) for k, v in constants.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                                    target=target, options=options)
            ptx = kernel.asm["ptx"]
            mma = len(re.findall(r"\b(wgmma\.mma_async|mma\.sync)", ptx))
            uses_dot = fn.__name__ in ("_patch_embed_fwd_kernel", "_patch_embed_bwd_kernel")
            if uses_dot and dtype in (torch.float16, torch.bfloat16, torch.float64):
                assert mma > 0, f"{fn.__name__} ({dtype}) did not lower tl.dot to tensor-core instructions"
            print(f"sm_{arch} {fn.__name__} {str(dtype)[6:]} C={C} patch={ph}x{pw}: ok "
                  f"(shared {kernel.metadata.shared} B, {mma} mma, warps {options['num_warps']})", flush=True)
    print("COMPILE-CHECK-OK", flush=True)


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
@pytest.mark.skipif(HAS_GPU, reason="on a GPU the other tests compile and run the kernels for the real device")
@pytest.mark.parametrize("install", triton_installs(), ids=lambda t: t[0])
def test_compiles_for_nvidia_sm90(install):
    """With the bundled Triton and each release under .triton-compat/ (the GPU machine's)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-check"], env=compile_env(install[1]),
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and "COMPILE-CHECK-OK" in proc.stdout, \
        f"compile-only check failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ((16, 240, 12, 224), (16, 224, 16, 448), (4, 384, 16, 768)), ids=str)
def test_gpu_batched_shapes(shape, dtype):
    B, px, patch, C = shape
    t = make_inputs(B, 3, px, px, C, patch, dtype=dtype, device="cuda", timm_shapes=True, seed=9)
    check_against_oracle(t, dtype)


@requires_gpu
@pytest.mark.gpu
def test_gpu_fp32_follows_matmul_precision():
    """float32 products are exact under the default precision ("highest") and may use TF32 under
    torch.set_float32_matmul_precision("high"), still close to the oracle."""
    previous = torch.get_float32_matmul_precision()
    t = make_inputs(8, 3, 240, 240, 224, 12, dtype=torch.float32, device="cuda", seed=10)
    oracle, _ = run(upcast(t), "reference")
    try:
        rel = {}
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            out, _ = run(t, "triton")
            rel[precision] = float((out.double() - oracle).abs().max() / oracle.abs().max())
    finally:
        torch.set_float32_matmul_precision(previous)
    assert rel["highest"] < 1e-5 and rel["high"] < 1e-2, rel


if __name__ == "__main__":
    if "--compile-check" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from helpers import check_triton_version
        print(f"Triton {check_triton_version()}", flush=True)
        _compile_check()
