"""Property-based tests (hypothesis) of both ops on every available backend.

Shapes, strides, dtypes, optional parameters and backends are drawn at random and checked against
the float64 oracle with the criterion of tests/helpers.py (forward and every gradient). Then junk
arguments (wrong types, None, integer or complex tensors, wrong shapes, meta tensors, another
device) are drawn: the only allowed outcomes are a correct result or ValueError, TypeError or
NotImplementedError with a message.

CI runs a bounded, derandomized number of examples (the "ci" profile below);
``HYPOTHESIS_PROFILE=dev`` draws more, at random.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossvit_kernels as ck
from crossvit_kernels.ops import cross_attention, patch_embed
from helpers import (FACTOR, GRAD_FACTOR, TOL, TRITON_INTERPRET, XATTN_ARGS, assert_close, assert_within_ref_error,
                     run_cross_attention, upcast)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
AVAILABLE = [name for name in ("torch", "cpp", "triton") if ck.available_backends()[name] is True
             and (name != "triton" or TRITON_INTERPRET or torch.cuda.is_available())]
#: the interpreter runs Triton kernels about 1000x slower than a GPU: fewer and smaller examples
SLOW = {"triton"} if TRITON_INTERPRET else set()
ALLOWED = (ValueError, TypeError, NotImplementedError)


def _supported(backend: str, op: str):
    return [d for d in FLOATS if ck.backends.supports(backend, op, "cpu", d) is None]


# ---------------------------------------------------------------------------------------------
# cross-attention: random valid inputs against the float64 oracle
# ---------------------------------------------------------------------------------------------

@st.composite
def xattn_cases(draw, backend):
    small = backend in SLOW
    H = draw(st.integers(1, 3 if small else 6))
    d = draw(st.integers(1, 6 if small else 10))
    return dict(
        B=draw(st.integers(1, 2 if small else 4)), M=draw(st.integers(0, 12 if small else 30)), C=H * d, H=H,
        dtype=draw(st.sampled_from(_supported(backend, "cross_attention"))),
        tokens=draw(st.sampled_from(["strided", "contiguous", "transposed"])),
        cls=draw(st.sampled_from(["contiguous", "strided"])),
        bias=draw(st.booleans()), affine=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _xattn_inputs(B, M, C, H, dtype, tokens, cls, bias, affine, seed):
    """Fresh random leaves (float64 draws rounded to ``dtype``); tokens as the view branch[:, 1:],
    a contiguous tensor or a transposed view (channel stride != 1); the CLS as a contiguous tensor
    or a strided column of a wider one."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)

    inp = dict(norm_weight=(1.0 + r(C, scale=0.2)).detach().requires_grad_(True) if affine else None,
               norm_bias=r(C, scale=0.2) if affine else None)
    for n in "qkvo":
        inp[f"w{n}"] = r(C, C, scale=C ** -0.5)
        inp[f"b{n}"] = r(C, scale=0.1) if bias else None
    if cls == "strided":
        inp["x_cls_base"] = r(B, 2 * C)
        inp["x_cls"] = inp["x_cls_base"][:, ::2]
    else:
        inp["x_cls"] = r(B, C)
    inp["branch"] = r(B, 1 + M, C)
    inp["strided"] = tokens == "strided"
    if tokens == "strided":
        inp["x_tokens"] = inp["branch"][:, 1:]
    elif tokens == "contiguous":
        inp["x_tokens"] = r(B, M, C)
    else:
        inp["x_tokens"] = r(B, C, M).transpose(1, 2)
    inp["num_heads"] = H
    return inp


def _check_xattn(backend, case):
    inp = _xattn_inputs(**{k: case[k] for k in ("B", "M", "C", "H", "dtype", "tokens", "cls", "bias", "affine",
                                                "seed")})
    dtype = case["dtype"]
    g = torch.randn(case["B"], case["C"], dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"]))
    out, grads = run_cross_attention(inp, backend, g)
    oracle = upcast(inp, torch.float64)
    if case["cls"] == "strided":   # upcast copies x_cls into a contiguous leaf: same values
        oracle["x_cls"] = inp["x_cls"].detach().double().requires_grad_(True)
    ora_out, ora_grads = run_cross_attention(oracle, "reference", g)
    assert out.dtype == dtype and out.shape == (case["B"], case["C"])
    assert set(grads) == set(ora_grads), (sorted(grads), sorted(ora_grads))
    if dtype == torch.float64:
        assert_close(out, ora_out, name="out", **TOL[torch.float64])
        for name, ref in ora_grads.items():
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            assert_close(grads[name], ref, name=f"d {name}", atol=1e-9 * scale, rtol=1e-8)
        return
    ref_out, ref_grads = run_cross_attention(inp, "reference", g)
    assert_within_ref_error(out, ref_out, ora_out, dtype, "out", factor=FACTOR)
    for name in ora_grads:
        if name == "bk":   # the fused form's key-bias gradient is exactly zero
            assert not bool(grads[name].any()), "d bk must be exactly zero"
            continue
        assert_within_ref_error(grads[name], ref_grads[name], ora_grads[name], dtype, f"d {name}",
                                factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_cross_attention_random_inputs_match_oracle(backend):
    @settings(max_examples=6) if backend in SLOW else (lambda f: f)
    @given(case=xattn_cases(backend))
    def check(case):
        _check_xattn(backend, case)

    check()


# ---------------------------------------------------------------------------------------------
# patch embedding: random valid inputs against the float64 oracle
# ---------------------------------------------------------------------------------------------

@st.composite
def patch_cases(draw, backend):
    small = backend in SLOW
    return dict(B=draw(st.integers(1, 3)), Cin=draw(st.integers(1, 4)), ph=draw(st.integers(1, 6)),
                pw=draw(st.integers(1, 6)), gh=draw(st.integers(1, 3 if small else 5)),
                gw=draw(st.integers(1, 3 if small else 5)), C=draw(st.integers(1, 12 if small else 40)),
                dtype=draw(st.sampled_from(_supported(backend, "patch_embed"))),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                bias=draw(st.booleans()), flat=draw(st.booleans()), image_grad=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _patch_inputs(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    B, Cin, C = case["B"], case["Cin"], case["C"]
    H, W = case["gh"] * case["ph"], case["gw"] * case["pw"]
    P = case["gh"] * case["gw"]

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    images = r(B, Cin, H, W)
    if case["layout"] == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "strided":
        images = torch.cat([images, images], dim=-1)[..., :W]
    leaves = dict(images=images, weight=r(C, Cin, case["ph"], case["pw"], scale=0.2),
                  bias=r(C, scale=0.1) if case["bias"] else None,
                  pos_embed=r(1 + P, C, scale=0.1) if case["flat"] else r(1, 1 + P, C, scale=0.1),
                  cls_token=r(C) if case["flat"] else r(1, 1, C))
    out = {}
    for k, v in leaves.items():
        if v is not None:
            v = v.to(dtype)
            v.requires_grad_(k != "images" or case["image_grad"])
        out[k] = v
    return out


def _run_patch(inp, backend, g):
    names = [k for k in ("images", "weight", "bias", "pos_embed", "cls_token")
             if inp[k] is not None and inp[k].requires_grad]
    out = patch_embed(inp["images"], inp["weight"], inp["bias"], inp["pos_embed"], inp["cls_token"], backend=backend)
    return out, dict(zip(names, torch.autograd.grad(out, [inp[k] for k in names], g.to(out.dtype))))


def _check_patch(backend, case):
    dtype = case["dtype"]
    inp, oracle = _patch_inputs(case, dtype), _patch_inputs(case, torch.float64)
    P = case["gh"] * case["gw"]
    g = torch.randn(case["B"], 1 + P, case["C"], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(case["seed"] + 1))
    out, grads = _run_patch(inp, backend, g)
    ora_out, ora_grads = _run_patch(oracle, "reference", g)
    assert out.dtype == dtype and out.shape == ora_out.shape
    assert set(grads) == set(ora_grads)
    if dtype == torch.float64:
        assert_close(out, ora_out, name="out", atol=1e-10, rtol=1e-10)
        for name, ref in ora_grads.items():
            assert_close(grads[name], ref, name=f"d {name}", atol=1e-9 * max(1.0, float(ref.abs().max())), rtol=1e-9)
        return
    ref_out, ref_grads = _run_patch(inp, "reference", g)
    assert_within_ref_error(out, ref_out, ora_out, dtype, "out", factor=FACTOR)
    for name in ora_grads:
        assert_within_ref_error(grads[name], ref_grads[name], ora_grads[name], dtype, f"d {name}",
                                factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_patch_embed_random_inputs_match_oracle(backend):
    @settings(max_examples=6) if backend in SLOW else (lambda f: f)
    @given(case=patch_cases(backend))
    def check(case):
        _check_patch(backend, case)

    check()


# ---------------------------------------------------------------------------------------------
# junk arguments: a correct result or ValueError / TypeError / NotImplementedError, nothing else
# ---------------------------------------------------------------------------------------------

def _junk(like):
    """Strategies of things to put where ``like`` (a tensor, None or a number) belongs."""
    tensor = like if isinstance(like, torch.Tensor) else torch.randn(3)
    return st.sampled_from([
        None, 0, 1.5, "x", [1.0, 2.0], (), object(),
        tensor.to(torch.int64), tensor.to(torch.bool), tensor.to(torch.complex64),
        tensor.reshape(-1), tensor.unsqueeze(0), tensor[..., :1], torch.empty(0), torch.tensor(1.0),
        torch.empty(tensor.shape, device="meta"), tensor.double(), tensor.half(),
        tensor.detach().requires_grad_(True) if tensor.is_floating_point() else tensor,
    ])


def _outcome(fn):
    """("ok", result) or ("raised", exception) for an allowed exception; anything else fails."""
    try:
        return "ok", fn()
    except ALLOWED as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return "raised", exc


def _xattn_args():
    inp = _xattn_inputs(2, 5, 12, 3, torch.float32, "strided", "contiguous", True, True, seed=1)
    args = {k: inp[k].detach() for k in XATTN_ARGS}
    return dict(args, num_heads=3, eps=1e-6)


@pytest.mark.parametrize("backend", ["auto"] + AVAILABLE + ["reference"])
@given(data=st.data())
def test_cross_attention_junk_arguments(backend, data):
    args = _xattn_args()
    names = data.draw(st.lists(st.sampled_from(sorted(args)), min_size=1, max_size=3, unique=True))
    for name in names:
        args[name] = data.draw(_junk(args[name]), label=name)
    call = dict(args)
    status, result = _outcome(lambda: cross_attention(*(call[k] for k in XATTN_ARGS), num_heads=call["num_heads"],
                                                      eps=call["eps"], backend=backend))
    if status == "ok":
        assert isinstance(result, torch.Tensor)
        expected = cross_attention(*(call[k] for k in XATTN_ARGS), num_heads=call["num_heads"], eps=call["eps"],
                                   backend="reference")
        assert result.shape == expected.shape and result.dtype == expected.dtype
        if result.device.type != "meta":
            assert_close(result.double(), expected.double(), name="out", atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["auto"] + AVAILABLE + ["reference"])
@given(data=st.data())
def test_patch_embed_junk_arguments(backend, data):
    args = dict(images=torch.randn(2, 3, 12, 8), weight=torch.randn(5, 3, 4, 4), bias=torch.randn(5),
                pos_embed=torch.randn(1, 7, 5), cls_token=torch.randn(1, 1, 5))
    names = data.draw(st.lists(st.sampled_from(sorted(args)), min_size=1, max_size=2, unique=True))
    for name in names:
        args[name] = data.draw(_junk(args[name]), label=name)
    status, result = _outcome(lambda: patch_embed(*args.values(), backend=backend))
    if status == "ok":
        expected = patch_embed(*args.values(), backend="reference")
        assert result.shape == expected.shape and result.dtype == expected.dtype
        if result.device.type != "meta":
            assert_close(result.double(), expected.double(), name="out", atol=1e-3, rtol=1e-3)
