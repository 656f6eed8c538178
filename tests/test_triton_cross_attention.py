"""Backend ``triton`` of the cross-attention core (crossvit_kernels/backends/triton/cross_attention.py).

Without a GPU the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1):
the same tests then check the kernels' arithmetic, masks and indexing on the CPU. What the
interpreter cannot check (that the kernels compile for a real NVIDIA target and fit its shared
memory) is covered by the compile-only tests below, which need Triton's bundled ptxas, not a GPU.

Criteria (tests/helpers.py): the core functions against the torch backend (the executable spec) at a
tight float32 tolerance; the public op against the float64 textbook oracle with the
flash-attention criterion (at most FACTOR / GRAD_FACTOR times the same-dtype reference's error).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (FACTOR, GRAD_FACTOR, HAS_GPU, TOL, assert_close, assert_within_ref_error, compile_env,
                     cross_attention_inputs, max_err, nvidia_compiler_reason, poison_, requires_gpu, requires_triton,
                     run_cross_attention, triton_installs, upcast)

pytestmark = requires_triton

DEVICE = "cuda" if HAS_GPU else "cpu"
EPS = 1e-6


def _kernels():
    from crossvit_kernels.backends.triton import cross_attention as K
    return K


def _torch_impl():
    from crossvit_kernels.backends import get_backend
    return get_backend("torch")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts NaN-filled: an element no kernel writes fails."""
    K = _kernels()
    real = K._empty

    def empty(shape, dtype, device):
        return poison_(real(shape, dtype, device))

    monkeypatch.setattr(K, "_empty", empty)
    return K


def core_inputs(B, M, C, H, dtype=torch.float32, strided=True, seed=0, device=DEVICE):
    """x_cls (B, C), x_tokens (B, M, C) (the view branch[:, 1:] when strided), w (B, H, C) in the
    accumulation dtype, dz (B, H, C)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    # tokens with a per-token offset and scale, as real activations have
    branch = (r(B, 1 + M, C, dt=torch.float64) * (0.5 + r(B, 1 + M, 1, dt=torch.float64).abs())
              + r(B, 1 + M, 1, dt=torch.float64)).to(dtype)
    x_tokens = branch[:, 1:] if strided else branch[:, 1:].contiguous()
    return dict(x_cls=r(B, C) + 0.3, x_tokens=x_tokens, w=r(B, H, C, scale=1.5 * C ** -0.5, dt=acc),
                dz=r(B, H, C, dt=acc))


def run_core(inputs, **kw):
    K = _kernels()
    z, lse = K.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS, **kw)
    grads = K.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], z, lse, inputs["dz"],
                                            EPS, **kw)
    return (z, lse), grads


def check_core(inputs, atol, rtol, **kw):
    """Forward and backward of the triton core against the torch backend (the backward from the
    same saved z and lse, so each half is checked on its own)."""
    T = _torch_impl()
    (z, lse), (dx_cls, dx_tokens, dw) = run_core(inputs, **kw)
    ez, e_lse = T.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS)
    for name, got, exp in (("z", z, ez), ("lse", lse, e_lse)):
        assert got.dtype == exp.dtype and got.shape == exp.shape, (name, got.dtype, got.shape, exp.shape)
        assert_close(got, exp, atol=atol * max(1.0, float(exp.abs().max())), rtol=rtol, name=name)
    K = _kernels()
    grads = K.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                            inputs["dz"], EPS, **kw)
    expected = T.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                               inputs["dz"], EPS)
    for name, got, exp in zip(("dx_cls", "dx_tokens", "dw"), grads, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, (name, got.dtype, got.shape, exp.shape)
        scale = float(exp.abs().max()) if exp.numel() else 1.0
        assert_close(got, exp, atol=atol * max(1.0, scale), rtol=rtol, name=name)
    assert dx_tokens.is_contiguous()
    return (z, lse), (dx_cls, dx_tokens, dw)


# ---------------------------------------------------------------------------------------------
# the core functions against the torch backend
# ---------------------------------------------------------------------------------------------

CORE_CASES = [
    # (B, M, C, H, strided, launcher keywords)
    pytest.param(2, 40, 45, 3, True, {}, id="odd-C45-H3"),
    pytest.param(2, 40, 45, 5, True, dict(num_splits=3), id="odd-C45-H5-3splits"),
    pytest.param(2, 40, 45, 3, True, dict(num_splits=3, block_n=16), id="3splits-bn16"),
    pytest.param(1, 1, 16, 1, True, {}, id="M1-one-head"),
    pytest.param(2, 0, 32, 2, True, {}, id="M0"),
    pytest.param(2, 0, 32, 2, True, dict(num_splits=4), id="M0-forced-splits"),
    pytest.param(3, 70, 64, 4, False, dict(num_splits=4, block_n=16), id="contiguous-4splits-bn16"),
    pytest.param(1, 70, 64, 4, True, dict(num_splits=2, block_n=64), id="split-narrower-than-tile"),
    pytest.param(2, 33, 24, 12, True, dict(block_n=16), id="H12-hpad16"),
    pytest.param(1, 196, 448, 7, True, {}, id="crossvit18-L"),
    pytest.param(1, 196, 768, 12, True, dict(num_splits=2), id="crossvit-B-L"),
]


@pytest.mark.parametrize("B,M,C,H,strided,kw", CORE_CASES)
def test_core_matches_torch_backend_fp32(poisoned, B, M, C, H, strided, kw):
    inputs = core_inputs(B, M, C, H, torch.float32, strided=strided)
    check_core(inputs, atol=1e-5, rtol=1e-4, **kw)


@pytest.mark.parametrize("kw", [{}, dict(num_splits=3, block_n=16)], ids=["one-split", "3splits-bn16"])
def test_core_float64(poisoned, kw):
    inputs = core_inputs(2, 50, 40, 5, torch.float64)
    check_core(inputs, **TOL[torch.float64], **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hilo", ["3", "0"], ids=["hilo", "rounded-once"])
def test_core_half_inputs(poisoned, monkeypatch, dtype, hilo):
    """Half inputs: the tiles go to the tensor cores in their own dtype; w, dz and the softmax
    coefficients are float32 values carried as 16-bit (hi, lo) pairs (HILO, the default: about
    16 mantissa bits) or rounded once. Compared with the torch backend (float32 math on the same
    half inputs): z, lse and dw to the carried precision; the token gradients (stored in the half
    dtype) to their own rounding."""
    monkeypatch.setenv(_kernels().HILO_ENV, hilo)
    inputs = core_inputs(2, 37, 48, 3, dtype)
    K, T = _kernels(), _torch_impl()
    (z, lse), _ = run_core(inputs, num_splits=2)
    ez, e_lse = T.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS)
    carried = 2.0 ** -14 if hilo == "3" else 2.0 ** -7          # relative, of the largest value
    for name, got, exp in (("z", z, ez), ("lse", lse, e_lse)):
        assert got.dtype == torch.float32
        assert_close(got, exp, atol=carried * max(1.0, float(exp.abs().max())), rtol=0, name=name)
    grads = K.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                            inputs["dz"], EPS, num_splits=2)
    expected = T.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                               inputs["dz"], EPS)
    tol = TOL[dtype]["atol"]
    for name, got, exp in zip(("dx_cls", "dx_tokens", "dw"), grads, expected):
        assert got.dtype == exp.dtype, (name, got.dtype, exp.dtype)
        scale = float(exp.abs().max())
        bound = (carried if name == "dw" else 2 * tol) * scale
        assert_close(got, exp, atol=bound, rtol=0 if name == "dw" else 2 * tol, name=name)


def test_core_never_writes_inputs():
    inputs = core_inputs(2, 20, 32, 3, torch.float32)
    before = {k: v.clone() for k, v in inputs.items()}
    fwd, _ = run_core(inputs, num_splits=2)
    saved = [t.clone() for t in fwd]
    _kernels().cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], *fwd, inputs["dz"],
                                             EPS, num_splits=2)
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), f"{k} was modified"
    for a, b in zip(fwd, saved):
        assert torch.equal(a, b), "a saved output was modified by the backward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_core_single_token_softmax_gradient_is_zero(dtype):
    """With no patch tokens the CLS attends to itself alone: p = 1 whatever the scores, so the
    gradient of the absorbed query is exactly zero (as the textbook softmax gives it)."""
    inputs = core_inputs(3, 0, 45, 5, dtype)
    _, (dx_cls, _, dw) = run_core(inputs)
    assert torch.count_nonzero(dw) == 0, f"dw should be exactly 0, max |dw| = {float(dw.abs().max()):.3g}"
    assert torch.isfinite(dx_cls.float()).all()


def test_core_deterministic():
    """Same inputs, same bits: splits are merged in a fixed order and dw is reduced without atomics."""
    inputs = core_inputs(2, 90, 40, 3, torch.float32)
    first = run_core(inputs, num_splits=3)
    second = run_core(inputs, num_splits=3)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_core_rejects_a_bad_split_count():
    K = _kernels()
    inputs = core_inputs(2, 5, 16, 2)
    with pytest.raises(ValueError, match="num_splits"):
        K.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS, num_splits=0)


# ---------------------------------------------------------------------------------------------
# the split planner
# ---------------------------------------------------------------------------------------------

def test_split_choice_forced_and_cpu():
    K = _kernels()
    cpu = torch.device("cpu")
    p = K.Problem(4, 400, 224, 64)
    assert K.launch_plan([p], cpu) == K.Plan((1,), (448,), 4)             # the CPU: one program per row
    plan = K.launch_plan([p], cpu, 5)
    S, tps = plan.splits[0], plan.tokens_per_split[0]
    assert S * tps >= 400 and (S - 1) * tps < 400 and tps % 64 == 0
    assert K.launch_plan([K.Problem(1, 1, 16, 16)], cpu, 8).splits == (1,)   # every split non-empty
    assert K.launch_plan([K.Problem(3, 0, 16, 16)], cpu, 8) == K.Plan((1,), (16,), 3)


# ---------------------------------------------------------------------------------------------
# the public op against the float64 oracle (every gradient)
# ---------------------------------------------------------------------------------------------

def check_op(B, M, C, H, dtype, strided=True, seed=0):
    inputs = cross_attention_inputs(B, M, C, H, dtype=dtype, device=DEVICE, strided=strided, seed=seed)
    oracle_in = upcast(inputs, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(B, C, generator=g, dtype=torch.float64).to(DEVICE)
    out, grads = run_cross_attention(inputs, "triton", grad_out)
    ref_out, ref_grads = run_cross_attention(inputs, "reference", grad_out)
    ora_out, ora_grads = run_cross_attention(oracle_in, "reference", grad_out)
    assert out.dtype == dtype and out.shape == (B, C)
    assert_within_ref_error(out, ref_out, ora_out, dtype, name="out", factor=FACTOR)
    assert set(grads) == set(ora_grads), (sorted(grads), sorted(ora_grads))
    errors = {"out": max_err(out, ora_out)}
    for name in ora_grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == inputs[name if name != "x_tokens" else "branch"].dtype
        assert_within_ref_error(grads[name], ref_grads[name], ora_grads[name], dtype, name=f"d{name}",
                                factor=GRAD_FACTOR)
        errors[name] = max_err(grads[name], ora_grads[name])
    return errors


OP_SHAPES = [
    pytest.param(2, 1, 45, 3, True, id="M1-C45-H3"),
    pytest.param(2, 0, 45, 5, True, id="M0-C45-H5"),
    pytest.param(1, 24, 32, 1, False, id="B1-one-head-contiguous"),
    pytest.param(3, 30, 64, 4, True, id="strided"),
]


@pytest.mark.parametrize("B,M,C,H,strided", OP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_op_matches_oracle(B, M, C, H, strided, dtype):
    check_op(B, M, C, H, dtype, strided=strided)


@pytest.mark.parametrize("N,C,H", [(401, 224, 7), (197, 448, 7)], ids=["crossvit18-S", "crossvit18-L"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_real_shapes(N, C, H, dtype):
    check_op(2, N - 1, C, H, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_multi_split(monkeypatch, dtype):
    """Several token splits forced through the environment knob, through the public op."""
    monkeypatch.setenv(_kernels().SPLITS_ENV, "3")
    check_op(2, 100, 48, 3, dtype)


def _compile_and_compare(backend):
    """torch.compile(fullgraph=True) over a function calling the op: forward and backward agree
    with eager."""
    from crossvit_kernels.ops import cross_attention
    inputs = cross_attention_inputs(2, 20, 32, 2, device=DEVICE)
    names = ("x_cls", "branch", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")

    def fn(x_cls, branch, nw, nb, wq, bq, wk, bk, wv, bv, wo, bo):
        out = cross_attention(x_cls, branch[:, 1:], nw, nb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads=2,
                              backend="triton")
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    args = [inputs[n] for n in names]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    eager_loss = fn(*args)
    eager = torch.autograd.grad(eager_loss, args)
    assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5, name="loss")
    for n, a, e in zip(names, grads, eager):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=f"d{n}")


def test_op_torch_compile_fullgraph_aot_eager():
    """No graph break, fake implementations consistent with the kernels' outputs (AOT autograd)."""
    _compile_and_compare("aot_eager")


def test_op_torch_compile_fullgraph_inductor():
    _compile_and_compare("inductor")


# ---------------------------------------------------------------------------------------------
# compile-only: the kernels compile for a real NVIDIA target (no GPU needed) and fit its memory
# ---------------------------------------------------------------------------------------------

H100_SMEM = 227 * 1024
#: (which, dtype, C, H): the core-contract launches compiled for sm_90 (the budgets of the fusion
#: stage's launches, registers and programs per SM, are in test_triton_budgets.py)
COMPILE_SPECS = [
    ("fwd", "bfloat16", 224, 7),        # CrossViT-18 S branch
    ("bwd", "bfloat16", 224, 7),
    ("fwd", "bfloat16", 448, 7),        # CrossViT-18 L branch
    ("bwd", "bfloat16", 448, 7),
    ("fwd", "float16", 384, 12),        # CrossViT-B S branch
    ("bwd", "float16", 384, 12),
    ("fwd", "bfloat16", 768, 12),       # CrossViT-B L branch
    ("bwd", "bfloat16", 768, 12),
    ("fwd", "float32", 448, 7),         # IEEE float32 products (CUDA cores)
    ("bwd", "float32", 448, 7),
    ("fwd", "float64", 64, 4),          # float64 products
    ("bwd", "float64", 64, 4),
]
#: Planned configs that must compile without register spills (16-bit tokens at the CrossViT-18 widths).
NO_SPILL_WIDTHS = (224, 448)

_COMPILE_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from helpers import check_triton_version
version = check_triton_version()
from sm90 import compile_stream_kernel as f
out = []
for args in json.loads(sys.argv[1]):
    r = f(*args)
    r.pop("ptx_mma_list", None)
    out.append(dict(r, triton=version))
print('RESULT' + json.dumps(out))
"""


@pytest.fixture(scope="module")
def gpu_compile_results():
    """Compile every spec for sm_90 in one child process per Triton install with the interpreter
    off (under TRITON_INTERPRET=1 the kernels are Python functions and cannot be compiled): the
    bundled Triton and each release under .triton-compat/ (the GPU machine's), side by side.
    -> {install id: (returncode, stderr, [result])}"""
    argv = [sys.executable, "-c", _COMPILE_CHILD, json.dumps([list(s) for s in COMPILE_SPECS]),
            os.path.dirname(__file__)]
    procs = {name: subprocess.Popen(argv, env=compile_env(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, path in triton_installs()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        results = json.loads(lines[-1][len("RESULT"):]) if proc.returncode == 0 and lines else []
        out[name] = (proc.returncode, stderr, results)
    return out


def _no_spill(r):
    return r["spill_stores"] == 0 and r["spill_loads"] == 0


INSTALL_IDS = [name for name, _ in triton_installs()]


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
@pytest.mark.parametrize("install", INSTALL_IDS)
@pytest.mark.parametrize("index", range(len(COMPILE_SPECS)), ids=["-".join(map(str, s)) for s in COMPILE_SPECS])
def test_kernels_compile_for_sm90(gpu_compile_results, install, index):
    """Each core launch compiles to a cubin for sm_90 with the planner's config within an H100's
    shared memory; 16-bit tokens multiply on the tensor cores in their own dtype (bf16 / f16 MMA,
    no TF32 conversion anywhere), and at the CrossViT-18 widths nothing spills."""
    returncode, stderr, results = gpu_compile_results[install]
    assert returncode == 0 and results, f"compiling for sm_90 ({install}) failed:\n{stderr[-4000:]}"
    r = results[index]
    assert r["cubin_bytes"] > 0 and r["registers"] > 0
    assert r["shared"] <= H100_SMEM, r
    assert not r["ptx_tf32_cvt"], f"TF32 conversion in the PTX: {r}"
    if r["dtype"] in ("bfloat16", "float16"):
        kind = "bf16" if r["dtype"] == "bfloat16" else "f16"
        assert r["ptx_mma"] and all(f".{kind}.{kind}" in m for m in r["ptx_mma"]), r["ptx_mma"]
        if r["C"][0] in NO_SPILL_WIDTHS:
            assert _no_spill(r), f"register spills: {r}"
            assert r["ctas_per_sm"] >= 2, r


# ---------------------------------------------------------------------------------------------
# GPU only: real launches, the planner's splits, large batches
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,C,H", [(401, 128, 4), (197, 448, 7), (577, 768, 12), (1157, 224, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B", [1, 256])
def test_gpu_core_planned_splits(B, N, C, H, dtype):
    """The core's launches at the CrossViT shapes with the fixed token tiles and the split
    planner's choice for this GPU (many splits at B=1, one at B=256): float32 against the PyTorch
    core, bfloat16 against float32 math on the same inputs. A shape beyond the backend's limits
    on this GPU (CrossViT-B's width 768 in float32 needs more shared memory per program than an
    H100 has, compiled for sm_90) is refused by the dispatch, naming the limit, instead."""
    from crossvit_kernels import backends
    device, sizes = torch.device("cuda", torch.cuda.current_device()), dict(B=B, M=N - 1, C=C, H=H)
    if backends.get_backend("triton").limits("cross_attention", device, dtype, sizes) is not None:
        with pytest.raises(NotImplementedError, match="backend 'triton' cannot run cross_attention.*shared memory"):
            backends.resolve_backend("cross_attention", "triton", device, dtype, sizes)
        return
    inputs = core_inputs(B, N - 1, C, H, dtype)
    if dtype == torch.float32:
        check_core(inputs, atol=1e-5, rtol=1e-4)
    else:
        T = _torch_impl()
        (z, lse), (dx_cls, dx_tokens, dw) = run_core(inputs)
        ez, e_lse = T.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS)
        # bfloat16 tiles on the tensor cores, w and the coefficients carried as hi + lo pairs:
        # float32 math on the same inputs to about 2^-14 (bound at bfloat16's resolution)
        tol = 2.0 ** -7
        assert_close(z, ez, atol=tol * float(ez.abs().max()), rtol=tol, name="z")
        assert_close(lse, e_lse, atol=tol * float(e_lse.abs().max()), rtol=tol, name="lse")
        assert torch.isfinite(dx_tokens.float()).all() and torch.isfinite(dw).all()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_op_large_batch(dtype):
    check_op(256, 196, 448, 7, dtype)
