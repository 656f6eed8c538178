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
                     cross_attention_inputs, max_err, poison_, requires_gpu, requires_triton, run_cross_attention,
                     triton_installs, upcast)

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
    pytest.param(2, 40, 45, 3, True, dict(num_splits=3, head_loop=True), id="3splits-headloop"),
    pytest.param(1, 1, 16, 1, True, {}, id="M1-one-head"),
    pytest.param(2, 0, 32, 2, True, {}, id="M0"),
    pytest.param(2, 0, 32, 2, True, dict(num_splits=4), id="M0-forced-splits"),
    pytest.param(3, 70, 64, 4, False, dict(num_splits=4, block_n=16), id="contiguous-4splits-bn16"),
    pytest.param(1, 70, 64, 4, True, dict(num_splits=2, block_n=64), id="split-narrower-than-tile"),
    pytest.param(2, 33, 24, 6, True, dict(head_loop=True), id="headloop"),
    pytest.param(1, 196, 448, 7, True, {}, id="crossvit18-L"),
    pytest.param(1, 196, 768, 12, True, dict(num_splits=2), id="crossvit-B-L-headloop-plan"),
    pytest.param(2, 40, 45, 3, True, dict(num_splits=3, block_n=16, prefetch=True), id="3splits-prefetch"),
    pytest.param(2, 33, 24, 6, False, dict(head_loop=True, block_n=16, prefetch=True), id="headloop-prefetch"),
]


@pytest.mark.parametrize("B,M,C,H,strided,kw", CORE_CASES)
def test_core_matches_torch_backend_fp32(poisoned, B, M, C, H, strided, kw):
    inputs = core_inputs(B, M, C, H, torch.float32, strided=strided)
    check_core(inputs, atol=1e-5, rtol=1e-4, **kw)


@pytest.mark.parametrize("kw", [{}, dict(num_splits=3, head_loop=True)], ids=["one-split", "3splits-headloop"])
def test_core_float64(poisoned, kw):
    inputs = core_inputs(2, 50, 40, 5, torch.float64)
    check_core(inputs, **TOL[torch.float64], **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_core_half_inputs(poisoned, dtype):
    """Half inputs: float32 z and lse, gradients of the tokens in the input dtype. Compared with
    the torch backend on the same half inputs (both accumulate in float32); the tolerance is the
    rounding of the half outputs."""
    inputs = core_inputs(2, 37, 48, 3, dtype)
    K, T = _kernels(), _torch_impl()
    (z, lse), (dx_cls, dx_tokens, dw) = run_core(inputs, num_splits=2)
    ez, e_lse = T.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS)
    tol = TOL[dtype]["atol"]
    # The interpreter runs every product in float32: z and lse agree with the torch backend to
    # float32 rounding. A GPU runs the products of half inputs on TF32 tensor cores (the kernels'
    # design: operands rounded to 10 mantissa bits, unit roundoff 2^-11): the scores and z then
    # carry about 1e-3 relative error (seen on an H100: 2.3e-3 at |z| = 1.5), so they get a TF32
    # bound there.
    tf32 = HAS_GPU and not os.environ.get("TRITON_INTERPRET") == "1"
    for name, got, exp in (("z", z, ez), ("lse", lse, e_lse)):
        assert got.dtype == torch.float32
        t = 1e-2 if tf32 else 1e-4
        assert_close(got, exp, atol=t, rtol=t, name=name)
    grads = K.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                            inputs["dz"], EPS, num_splits=2)
    expected = T.cross_attention_core_backward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], ez, e_lse,
                                               inputs["dz"], EPS)
    for name, got, exp in zip(("dx_cls", "dx_tokens", "dw"), grads, expected):
        assert got.dtype == exp.dtype, (name, got.dtype, exp.dtype)
        scale = float(exp.abs().max())
        assert_close(got, exp, atol=2 * tol * scale, rtol=2 * tol, name=name)


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
@pytest.mark.parametrize("head_loop", [False, True], ids=["dot", "headloop"])
def test_core_single_token_softmax_gradient_is_zero(dtype, head_loop):
    """With no patch tokens the CLS attends to itself alone: p = 1 whatever the scores, so the
    gradient of the absorbed query is exactly zero (as the textbook softmax gives it)."""
    inputs = core_inputs(3, 0, 45, 5, dtype)
    _, (dx_cls, _, dw) = run_core(inputs, head_loop=head_loop)
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
# the register-prefetched token loop (PREFETCH) gives the plain loop's bits
# ---------------------------------------------------------------------------------------------

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def assert_same_bits(got, exp, name):
    assert got.dtype == exp.dtype and got.shape == exp.shape, (name, got.dtype, got.shape, exp.dtype, exp.shape)
    g, e = got.contiguous().view(_INT_VIEW[got.dtype]), exp.contiguous().view(_INT_VIEW[exp.dtype])
    differ = g != e
    if bool(differ.any()):
        idx = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(f"{name}: {int(differ.sum())} of {differ.numel()} elements differ in their bits; "
                             f"first at {idx}: {got[idx].item()!r} with prefetch, {exp[idx].item()!r} without")


PREFETCH_CASES = [
    # (B, M, C, H, dtype, strided, launcher keywords); tiles per split in the comments
    pytest.param(2, 0, 32, 2, torch.float32, True, {}, id="M0"),                               # the CLS row only
    pytest.param(2, 1, 24, 3, torch.bfloat16, True, {}, id="M1-bf16"),                         # CLS + one token
    pytest.param(2, 40, 45, 3, torch.float32, True, dict(block_n=16), id="3-tiles"),           # 41 tokens: 3
    pytest.param(1, 80, 40, 3, torch.float16, True, dict(block_n=32), id="3-tiles-fp16"),      # 81 tokens: 3
    pytest.param(3, 100, 40, 5, torch.bfloat16, False, dict(block_n=16, num_splits=3),
                 id="contiguous-3splits-bf16"),                                                # 48, 48, 5: 3, 3, 1
    pytest.param(2, 90, 24, 6, torch.float32, True, dict(block_n=16, num_splits=3, head_loop=True),
                 id="headloop-3splits"),                                                      # 32, 32, 27: 2, 2, 2
    pytest.param(1, 70, 64, 4, torch.float32, True, dict(block_n=64, num_splits=2),
                 id="split-narrower-than-tile"),                                              # 48, 23: 1, 1
    pytest.param(2, 50, 40, 5, torch.float64, True, dict(block_n=16, num_splits=2), id="fp64-2splits"),
]


@pytest.mark.parametrize("B,M,C,H,dtype,strided,kw", PREFETCH_CASES)
def test_prefetch_same_bits(poisoned, B, M, C, H, dtype, strided, kw):
    """PREFETCH on and off: same arithmetic in the same order, so every output has the same bits
    (the forward's two outputs, and the backward's three from the same saved z and lse)."""
    K = _kernels()
    inputs = core_inputs(B, M, C, H, dtype, strided=strided)
    args = (inputs["x_cls"], inputs["x_tokens"], inputs["w"])
    plain = K.cross_attention_core_forward(*args, EPS, prefetch=False, **kw)
    fetched = K.cross_attention_core_forward(*args, EPS, prefetch=True, **kw)
    for name, got, exp in zip(("z", "lse"), fetched, plain):
        assert_same_bits(got, exp, name)
    plain_b = K.cross_attention_core_backward(*args, *plain, inputs["dz"], EPS, prefetch=False, **kw)
    fetched_b = K.cross_attention_core_backward(*args, *plain, inputs["dz"], EPS, prefetch=True, **kw)
    for name, got, exp in zip(("dx_cls", "dx_tokens", "dw"), fetched_b, plain_b):
        assert_same_bits(got, exp, name)


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_autotune_space(which):
    """At the CrossViT widths (C_PAD 128 to 1024, H_PAD 16) the autotuner compiles at most 16
    configs per kernel and shape, none twice, each within an H100's shared memory (the smallest
    head-loop tiles always stay in as the fallback); a PREFETCH config only as the twin of a kept
    plain one, and only for 16-bit tokens. PREFETCH variants reach the autotuner at the CrossViT-18
    widths; the planner never picks PREFETCH unless asked."""
    K = _kernels()
    configs = K._autotune_configs()
    for c_pad in (128, 256, 512, 1024):
        for in_dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "ieee")):
            in_elem = torch.empty((), dtype=in_dtype).element_size()
            kept = K._kept_configs(which, configs, c_pad, 16, 4, in_elem, precision, H100_SMEM)
            # the autotuner's own call goes through the prune hook with the launch's tensors
            hook = K._prune(which)(configs, {"w_ptr": torch.empty(1), "x_tok_ptr": torch.empty(1, dtype=in_dtype)},
                                   C_PAD=c_pad, H_PAD=16, INPUT_PRECISION=precision)
            assert hook == kept
            keys = [(c.kwargs["BLOCK_N"], c.kwargs["HEAD_LOOP"], c.num_warps, c.kwargs["PREFETCH"]) for c in kept]
            where = f"{which} C_PAD={c_pad} {in_dtype}: {keys}"
            assert 0 < len(kept) <= 16 and len(set(keys)) == len(keys), where
            plain = {k[:3] for k in keys if not k[3]}
            assert (16, True, 4) in plain and (16, True, 8) in plain, where
            for bn, hl, nw, pf in keys:
                assert not pf or (bn, hl, nw) in plain, where
                assert K._smem_bytes(which, bn, c_pad, 16, 4, hl) <= H100_SMEM or (bn == 16 and hl), where
            if c_pad in (256, 512) and in_dtype == torch.bfloat16:
                assert any(k[3] for k in keys), where
            if precision == "ieee":  # float32 tokens: no register room for a waiting float32 tile
                assert not any(k[3] for k in keys), where
        for elem in (4, 8):
            assert K._heuristic_config(which, c_pad, 16, elem, H100_SMEM, None, None)["PREFETCH"] is False
            assert K._heuristic_config(which, c_pad, 16, elem, H100_SMEM, None, None, True)["PREFETCH"] is True


def test_split_choice():
    K = _kernels()
    cpu = torch.device("cpu")
    assert K._choose_splits(4, 401, cpu, None) == (1, 448)
    S, tps = K._choose_splits(4, 401, cpu, 5)
    assert S * tps >= 401 and (S - 1) * tps < 401 and tps % 16 == 0
    assert K._choose_splits(1, 1, cpu, 8) == (1, 16)   # every split non-empty


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

def _nvidia_backend_reason():
    try:
        import triton
        from triton.backends import backends
        if "nvidia" not in backends:
            return "this Triton install has no NVIDIA backend"
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
            return "Triton's bundled ptxas is missing"
    except Exception as exc:  # depends on the install
        return f"cannot use Triton's compiler: {exc}"
    return None


H100_SMEM = 227 * 1024
COMPILE_SPECS = [
    ("fwd", "bfloat16", 224, 7, False),      # CrossViT-18 S branch
    ("bwd", "bfloat16", 224, 7, True),
    ("fwd", "bfloat16", 448, 7, True),       # CrossViT-18 L branch: tensor-core path
    ("bwd", "bfloat16", 448, 7, False),      # past C_PAD 256 the backward plans the head loop (registers)
    ("fwd", "bfloat16", 768, 12, False),     # CrossViT-B L branch: the planner picks the head loop
    ("bwd", "bfloat16", 768, 12, True),
    ("fwd", "float32", 448, 7, False),       # IEEE float32 products (CUDA cores)
    ("bwd", "float32", 448, 7, True),
    ("fwd", "float64", 64, 4, True),         # float64 products
    ("bwd", "float64", 64, 4, False),
    ("bwd", "float64", 768, 12, True),       # float64 at CrossViT-B width: head loop, fits on an H100
    ("fwd_combine", "float32", 0, 0, False),
    ("dw_combine", "float32", 0, 0, False),
]
#: Planned configs that must compile without register spills (bfloat16 at the CrossViT-18 widths).
NO_SPILL_WIDTHS = (224, 448)
#: Shapes whose autotuned PREFETCH configs are compiled (bfloat16, one split: the large-batch case).
PREFETCH_SHAPES = [("fwd", 224, 7), ("bwd", 224, 7), ("fwd", 448, 7), ("bwd", 448, 7)]


def _autotuned_prefetch_configs(which, C, H):
    """The PREFETCH configs the autotuner keeps for bfloat16 tokens at width C on an H100."""
    K = _kernels()
    kept = K._kept_configs(which, K._autotune_configs(), K._pad(C), K._pad(H), 4, 2, "tf32", H100_SMEM)
    return [{k: v for k, v in c.all_kwargs().items() if k in ("BLOCK_N", "HEAD_LOOP", "PREFETCH", "num_warps",
                                                               "num_stages")}
            for c in kept if c.kwargs["PREFETCH"]]


_COMPILE_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from helpers import check_triton_version
version = check_triton_version()
from sm90 import compile_core_kernel as f
print('RESULT' + json.dumps([dict(f(*args, **kw), triton=version) for args, kw in json.loads(sys.argv[1])]))
"""


@pytest.fixture(scope="module")
def gpu_compile_results():
    """Compile every spec, and the autotuned PREFETCH configs of PREFETCH_SHAPES, for sm_90 in one
    child process per Triton install with the interpreter off (under TRITON_INTERPRET=1 the
    kernels are Python functions and cannot be compiled): the bundled Triton and each release
    under .triton-compat/ (the GPU machine's), the children running side by side.
    -> {install id: (returncode, stderr, {"specs": [result], "prefetch": {shape: [result]}})}"""
    calls = [[list(spec), {}] for spec in COMPILE_SPECS]
    shapes = []
    for which, C, H in PREFETCH_SHAPES:
        for cfg in _autotuned_prefetch_configs(which, C, H):
            calls.append([[which, "bfloat16", C, H, False], dict(config=cfg)])
            shapes.append((which, C, H))
    argv = [sys.executable, "-c", _COMPILE_CHILD, json.dumps(calls), os.path.dirname(__file__)]
    procs = {name: subprocess.Popen(argv, env=compile_env(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, path in triton_installs()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        results = json.loads(lines[-1][len("RESULT"):]) if proc.returncode == 0 and lines else []
        grouped = {"specs": results[:len(COMPILE_SPECS)], "prefetch": {}}
        for shape, r in zip(shapes, results[len(COMPILE_SPECS):]):
            grouped["prefetch"].setdefault(shape, []).append(r)
        out[name] = (proc.returncode, stderr, grouped)
    return out


def _results(gpu_compile_results, install):
    returncode, stderr, grouped = gpu_compile_results[install]
    assert returncode == 0 and grouped["specs"], f"compiling for sm_90 ({install}) failed:\n{stderr[-4000:]}"
    return grouped


def _no_spill(r):
    return r["spill_stores"] == 0 and r["spill_loads"] == 0


def _describe(r):
    return (f"{r['which']} {r['dtype']} C={r['C']} {r['config']} (Triton {r['triton']}): {r['registers']} registers, "
            f"spills {r['spill_stores']}/{r['spill_loads']} bytes, shared {r['shared']} (estimate {r['estimate']})")


INSTALL_IDS = [name for name, _ in triton_installs()]


@pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason()))
@pytest.mark.parametrize("install", INSTALL_IDS)
@pytest.mark.parametrize("index", range(len(COMPILE_SPECS)), ids=["-".join(map(str, s)) for s in COMPILE_SPECS])
def test_kernels_compile_for_sm90(gpu_compile_results, install, index):
    """Each kernel compiles to a cubin for sm_90 with the planner's config, the shared memory it
    uses is within the planner's estimate and an H100's per-block limit, and at the CrossViT-18
    widths in bfloat16 it spills no registers."""
    r = _results(gpu_compile_results, install)["specs"][index]
    assert r["cubin_bytes"] > 0
    assert r["shared"] <= H100_SMEM, r
    if r["estimate"] is not None:
        assert r["shared"] <= r["estimate"], r
    if r["dtype"] in ("bfloat16", "float64") and r["which"] in ("fwd", "bwd"):
        assert r["mma"], f"expected tensor-core (mma) instructions: {r}"
    assert r["registers"] > 0
    if r["dtype"] == "bfloat16" and r["C"] in NO_SPILL_WIDTHS:
        assert _no_spill(r), f"register spills: {_describe(r)}"


@pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason()))
@pytest.mark.parametrize("install", INSTALL_IDS)
@pytest.mark.parametrize("shape", PREFETCH_SHAPES, ids=["-".join(map(str, s)) for s in PREFETCH_SHAPES])
def test_autotuned_prefetch_configs_compile_for_sm90(gpu_compile_results, install, shape):
    """Every PREFETCH config the autotuner keeps at the CrossViT-18 widths (bfloat16) compiles for
    sm_90, stays within the shared-memory estimate, and spills no registers (a config that spills
    is pruned from the autotune space, not excused here)."""
    which, C, H = shape
    expected = _autotuned_prefetch_configs(which, C, H)
    assert expected, f"the autotuner keeps no PREFETCH config for {shape}"
    got = _results(gpu_compile_results, install)["prefetch"].get(shape, [])
    assert [r["config"] for r in got] == [dict(c, num_stages=c.get("num_stages", 1)) for c in expected]
    bad = [_describe(r) for r in got
           if not (r["cubin_bytes"] > 0 and r["mma"] and r["shared"] <= r["estimate"] <= H100_SMEM and _no_spill(r))]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# GPU only: real launches, autotuning, automatic splits, large batches
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N,C,H", [(401, 128, 4), (197, 448, 7), (577, 768, 12), (1157, 224, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B", [1, 256])
def test_gpu_core_autotuned(B, N, C, H, dtype):
    """Autotuned launches with the automatic split choice (many splits at B=1, one at B=256)."""
    inputs = core_inputs(B, N - 1, C, H, dtype)
    if dtype == torch.float32:
        check_core(inputs, atol=1e-5, rtol=1e-4)
    else:
        T = _torch_impl()
        (z, lse), (dx_cls, dx_tokens, dw) = run_core(inputs)
        ez, e_lse = T.cross_attention_core_forward(inputs["x_cls"], inputs["x_tokens"], inputs["w"], EPS)
        # bfloat16 inputs take TF32 products (8 more mantissa bits than the inputs carry): compare
        # with float32 math on the same inputs at bfloat16's resolution
        tol = 2.0 ** -7
        assert_close(z, ez, atol=tol * float(ez.abs().max()), rtol=tol, name="z")
        assert_close(lse, e_lse, atol=tol * float(e_lse.abs().max()), rtol=tol, name="lse")
        assert torch.isfinite(dx_tokens.float()).all() and torch.isfinite(dw).all()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_op_large_batch(dtype):
    check_op(256, 196, 448, 7, dtype)
