"""The triton backend's forward with fused projections (crossvit_kernels/backends/triton/projections.py).

``ops.cross_attention(..., backend="triton")`` runs the query projection, the core, the value
projection and the output projection + residual as four or five kernels, with or without
gradients. These tests check that path against the float64 oracle with the flash-attention
criterion (tests/helpers.py), that it is taken exactly when it should be, that every output
element is written, and (compile-only) that its kernels build for sm_90.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (FACTOR, HAS_GPU, assert_close, assert_within_ref_error, compile_env, cross_attention_inputs,
                     nvidia_compiler_reason, poison_, requires_triton, run_cross_attention, triton_installs, upcast)

pytestmark = requires_triton

DEVICE = "cuda" if HAS_GPU else "cpu"


def _projections():
    from crossvit_kernels.backends.triton import projections as P
    return P


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the fused forward and NaN-fills every buffer the launchers allocate."""
    P = _projections()
    from crossvit_kernels.backends.triton import cross_attention as K
    calls = []
    real_fused, real_empty = P.cross_attention_forward_fused, K._empty

    def fused(*args, **kwargs):
        calls.append(args[0].shape)
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(P, "cross_attention_forward_fused", fused)
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: poison_(real_empty(shape, dtype, device)))
    monkeypatch.delenv(P.FUSED_ENV, raising=False)
    return calls


def check_inference(B, M, C, H, dtype, strided=True, bias=True, affine=True, seed=0):
    inputs = cross_attention_inputs(B, M, C, H, dtype=dtype, device=DEVICE, strided=strided, bias=bias, seed=seed,
                                    requires_grad=False)
    if not affine:
        inputs["norm_weight"] = inputs["norm_bias"] = None
    with torch.no_grad():
        out, _ = run_cross_attention(inputs, "triton")
        ref, _ = run_cross_attention(inputs, "reference")
        ora, _ = run_cross_attention(upcast(inputs, torch.float64), "reference")
    assert out.dtype == dtype and out.shape == (B, C) and out.is_contiguous()
    assert_within_ref_error(out, ref, ora, dtype, name="out", factor=FACTOR)
    return inputs, out


SHAPES = [
    pytest.param(2, 1, 45, 3, True, id="M1-C45-H3"),
    pytest.param(2, 0, 45, 5, True, id="M0-C45-H5"),
    pytest.param(1, 24, 32, 1, False, id="B1-one-head-contiguous"),
    pytest.param(17, 30, 96, 3, True, id="B17-two-row-tiles"),
    pytest.param(2, 20, 80, 5, True, id="head-dim-16-C-not-multiple-of-64"),
]


@pytest.mark.parametrize("B,M,C,H,strided", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_inference_matches_oracle(spy, B, M, C, H, strided, dtype):
    check_inference(B, M, C, H, dtype, strided=strided)
    assert spy == [(B, C)], "the fused projections did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_inference_real_shape(spy, dtype):
    check_inference(2, 400, 224, 7, dtype)      # CrossViT-18's small-branch fusion
    assert len(spy) == 1


@pytest.mark.parametrize("bias,affine", [(False, True), (True, False), (False, False)],
                         ids=["no-biases", "no-norm-affine", "neither"])
def test_fused_inference_optional_parameters(spy, bias, affine):
    check_inference(3, 10, 48, 3, torch.float32, bias=bias, affine=affine)
    assert len(spy) == 1


def test_fused_inference_strided_cls_and_no_residual(spy):
    """x_cls as the CLS row of a branch (a strided view), and the op without its residual (what the
    module calls when drop-path is active) against the delta of the PyTorch projections."""
    from crossvit_kernels.ops.cross_attention import _cross_attention
    inputs = cross_attention_inputs(3, 20, 48, 4, device=DEVICE, requires_grad=False)
    branch = inputs["branch"]
    names = ("norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")
    params = [inputs[n] for n in names]
    x_cls = branch[:, 0]
    assert not x_cls.is_contiguous()
    with torch.no_grad():
        out = _cross_attention(x_cls, branch[:, 1:], *params, 4, 1e-6, "triton", residual=True)
        delta = _cross_attention(x_cls, branch[:, 1:], *params, 4, 1e-6, "triton", residual=False)
    assert len(spy) == 2
    with torch.no_grad(), _fused_projections_off():   # the inherited PyTorch projections
        general = _cross_attention(x_cls, branch[:, 1:], *params, 4, 1e-6, "triton", residual=False)
    assert len(spy) == 2
    assert_close(delta, general.detach(), atol=2e-6, rtol=1e-5, name="delta")
    assert_close(out, x_cls + delta, atol=2e-6, rtol=1e-6, name="out")


class _fused_projections_off:
    def __enter__(self):
        os.environ[_projections().FUSED_ENV] = "0"

    def __exit__(self, *exc):
        del os.environ[_projections().FUSED_ENV]


def test_fused_forward_with_and_without_gradients(spy):
    """Training and inference run the same fused forward (it also writes what the backward needs),
    and its gradients equal those of the inherited PyTorch projections; the environment switch
    turns it off."""
    inputs = cross_attention_inputs(2, 12, 32, 2, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 32, dtype=torch.float64, device=DEVICE)
    out_grad, grads = run_cross_attention(inputs, "triton", g)
    assert len(spy) == 1
    with torch.no_grad():
        out_fused, _ = run_cross_attention(inputs, "triton")
    assert len(spy) == 2
    with _fused_projections_off():
        out_off, grads_off = run_cross_attention(inputs, "triton", g)
    assert len(spy) == 2
    assert torch.equal(out_fused, out_grad.detach())
    assert_close(out_fused, out_off.detach(), atol=2e-6, rtol=1e-5, name="fused vs PyTorch projections")
    for name, gr in grads_off.items():
        assert_close(grads[name], gr, atol=2e-6 * max(1.0, float(gr.abs().max())), rtol=1e-5, name=f"d {name}")


def test_other_backends_and_float64_never_fused(spy):
    inputs = cross_attention_inputs(2, 12, 32, 2, device=DEVICE, requires_grad=False)
    with torch.no_grad():
        run_cross_attention(inputs, "torch")
        run_cross_attention(upcast(inputs, torch.float64), "triton")
    assert spy == []


# ---------------------------------------------------------------------------------------------
# compile-only: the kernels build for sm_90 with every Triton install (no GPU needed)
# ---------------------------------------------------------------------------------------------

COMPILE_SPECS = [(which, dtype, C, H)
                 for which in ("query", "value", "output")
                 for dtype, C, H in (("bfloat16", 224, 7), ("bfloat16", 768, 12), ("float32", 448, 7),
                                     ("float16", 96, 3))]


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
@pytest.mark.parametrize("install", triton_installs(), ids=lambda t: t[0])
def test_projection_kernels_compile_for_sm90(install):
    code = ("import json, sys\n"
            "sys.path.insert(0, sys.argv[2])\n"
            "from helpers import check_triton_version\n"
            "version = check_triton_version()\n"
            "from sm90 import compile_projection_kernel as f\n"
            "print('RESULT' + json.dumps([dict(f(*spec), triton=version) for spec in json.loads(sys.argv[1])]))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(COMPILE_SPECS), os.path.dirname(__file__)],
                          env=compile_env(install[1]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compiling for sm_90 ({install[0]}) failed:\n{proc.stderr[-4000:]}"
    results = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert len(results) == len(COMPILE_SPECS)
    for r in results:
        assert r["cubin_bytes"] > 0, r
        assert r["shared"] <= 48 * 1024, f"more shared memory than the default per-block limit: {r}"


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,N,C,H", [(256, 401, 224, 7), (256, 197, 448, 7), (1, 577, 768, 12)])
def test_gpu_fused_inference(spy, B, N, C, H, dtype):
    check_inference(B, N - 1, C, H, dtype)
    assert len(spy) == 1


def test_model_inference_on_the_triton_backend(monkeypatch):
    """A whole model at inference on the triton backend (the interpreter here): every multi-scale
    block's fusion runs as the fusion-stage op (both directions, three launches; it supersedes the
    per-direction fused projections there), and the logits are timm's within float32 rounding."""
    import timm
    import crossvit_kernels as ck
    from crossvit_kernels.backends.triton import fusion as FS
    calls = []
    real = FS.fusion_stage_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(FS, "fusion_stage_forward", spy)
    torch.manual_seed(0)
    ref = timm.create_model("crossvit_tiny_240").eval()
    model = ck.create_model("crossvit_tiny_240").eval()
    model.load_state_dict(ref.state_dict())
    images = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        expected = ref(images)
        with ck.use_backend("triton"):
            got = model(images)
    assert len(calls) == len(model.blocks) > 0, (len(calls), len(model.blocks))
    assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4, name="logits")
