"""The public ops on the always-available backends (``reference`` and ``torch``) against the
float64 textbook oracle: forward and every gradient, odd shapes, strided tokens, all dtypes."""
import pytest
import torch
import torch.nn.functional as F

from crossvit_kernels.backends import get_backend
from crossvit_kernels.ops import cross_attention, patch_embed
from helpers import (FACTOR, GRAD_FACTOR, TOL, XATTN_ARGS as XATTN_NAMES, assert_close, assert_within_ref_error,
                     cross_attention_inputs, run_cross_attention, upcast)

# (B, M, C, H): one patch token, no patch token, odd and prime widths, one head, B = 1, and the
# real CrossViT-18 fusion shapes (N = 1 + M = 401 at C = 224, 197 at C = 448, 7 heads).
XATTN_SHAPES = [
    (1, 1, 8, 2),
    (2, 0, 12, 3),
    (3, 7, 45, 5),
    (2, 13, 31, 1),
    (1, 5, 64, 4),
    (2, 400, 224, 7),
    (1, 196, 448, 7),
]


@pytest.mark.parametrize("B,M,C,H", XATTN_SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_cross_attention_torch_backend_float64_matches_oracle(B, M, C, H, strided):
    inp = cross_attention_inputs(B, M, C, H, torch.float64, strided=strided, seed=B * 1000 + M)
    g = torch.randn(B, C, dtype=torch.float64)
    out_ref, grads_ref = run_cross_attention(inp, "reference", g)
    out, grads = run_cross_attention(inp, "torch", g)
    assert_close(out, out_ref, name="out", **TOL[torch.float64])
    assert set(grads) == set(grads_ref)
    for name, gr in grads_ref.items():
        assert grads[name] is not None, f"no gradient for {name}"
        if name == "bk":
            # the key bias cannot change the output: its gradient is exactly zero on the fused path
            assert torch.equal(grads[name], torch.zeros_like(grads[name]))
            assert_close(gr, torch.zeros_like(gr), name="reference d bk", atol=1e-9, rtol=0)
            continue
        scale = max(1.0, float(gr.abs().max())) if gr.numel() else 1.0
        assert_close(grads[name], gr, name=f"d {name}", atol=1e-10 * scale, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,M,C,H", [(2, 9, 24, 3), (2, 400, 224, 7), (2, 196, 448, 7)])
def test_cross_attention_torch_backend_low_precision(dtype, B, M, C, H):
    inp = cross_attention_inputs(B, M, C, H, dtype, seed=7)
    g = torch.randn(B, C, dtype=torch.float64)
    out64, grads64 = run_cross_attention(upcast(inp), "reference", g)
    out_ref, grads_ref = run_cross_attention(inp, "reference", g)
    out, grads = run_cross_attention(inp, "torch", g)
    assert out.dtype == dtype
    assert_within_ref_error(out, out_ref, out64, dtype, "out", factor=FACTOR)
    for name in grads64:
        assert grads[name].dtype == dtype, f"d {name} has dtype {grads[name].dtype}"
        assert_within_ref_error(grads[name], grads_ref[name], grads64[name], dtype, f"d {name}", factor=GRAD_FACTOR)


def test_cross_attention_without_biases_and_affine():
    inp = cross_attention_inputs(2, 6, 16, 4, torch.float64, bias=False)
    inp["norm_weight"] = None
    inp["norm_bias"] = None
    g = torch.randn(2, 16, dtype=torch.float64)
    out_ref, grads_ref = run_cross_attention(inp, "reference", g)
    out, grads = run_cross_attention(inp, "torch", g)
    assert_close(out, out_ref, name="out", **TOL[torch.float64])
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], name=f"d {name}", atol=1e-9, rtol=1e-9)


def test_cross_attention_reference_is_the_textbook_formula():
    """The oracle itself, checked against an independent per-head loop in float64."""
    B, M, C, H = 2, 5, 12, 3
    inp = cross_attention_inputs(B, M, C, H, torch.float64, requires_grad=False)
    out = run_cross_attention(inp, "reference")[0]
    x = torch.cat([inp["x_cls"][:, None], inp["x_tokens"]], 1)
    xn = F.layer_norm(x, (C,), inp["norm_weight"], inp["norm_bias"], 1e-6)
    d = C // H
    expected = []
    for b in range(B):
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            q = xn[b, 0] @ inp["wq"][sl].T + inp["bq"][sl]
            k = xn[b] @ inp["wk"][sl].T + inp["bk"][sl]
            v = xn[b] @ inp["wv"][sl].T + inp["bv"][sl]
            a = torch.softmax(k @ q / d ** 0.5, 0)
            heads.append(a @ v)
        expected.append(inp["x_cls"][b] + torch.cat(heads) @ inp["wo"].T + inp["bo"])
    assert_close(out, torch.stack(expected), name="reference", atol=1e-12, rtol=1e-12)


def test_torch_core_backward_matches_autograd_of_core_forward():
    """The hand-written core backward (the kernels' spec) equals autograd through the core forward."""
    B, M, C, H = 2, 11, 20, 4
    gen = torch.Generator().manual_seed(3)
    x_cls = torch.randn(B, C, dtype=torch.float64, generator=gen, requires_grad=True)
    branch = torch.randn(B, M + 1, C, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(B, H, C, dtype=torch.float64, generator=gen, requires_grad=True)
    dz = torch.randn(B, H, C, dtype=torch.float64, generator=gen)
    torch_backend = get_backend("torch")
    z, lse = torch_backend.cross_attention_core_forward(x_cls, branch[:, 1:], w, 1e-6)
    auto = torch.autograd.grad(z, [x_cls, branch, w], dz)
    with torch.no_grad():
        dx_cls, dx_tokens, dw = torch_backend.cross_attention_core_backward(x_cls, branch[:, 1:], w, z, lse, dz, 1e-6)
    assert_close(dx_cls, auto[0], name="dx_cls", atol=1e-12, rtol=1e-10)
    assert_close(dx_tokens, auto[1][:, 1:], name="dx_tokens", atol=1e-12, rtol=1e-10)
    assert_close(dw, auto[2], name="dw", atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if __import__("crossvit_kernels").available_backends()
                                                 .get("cpp") is True else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_core_backward_single_token_gives_exactly_zero_dw(backend, dtype):
    """No patch tokens: the CLS attends to itself alone, p = 1 whatever the scores, so the absorbed
    query's gradient is exactly zero, as the textbook softmax gives it (not a rounding residue)."""
    mod = get_backend(backend)
    gen = torch.Generator().manual_seed(5)
    x_cls = torch.randn(3, 45, generator=gen).to(dtype)
    x_tokens = torch.randn(3, 0, 45, generator=gen).to(dtype)
    w = torch.randn(3, 5, 45, generator=gen) * 0.2
    dz = torch.randn(3, 5, 45, generator=gen)
    z, lse = mod.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)
    dx_cls, _, dw = mod.cross_attention_core_backward(x_cls, x_tokens, w, z, lse, dz, 1e-6)
    assert torch.count_nonzero(dw) == 0, f"max |dw| = {float(dw.abs().max()):.3g}"
    assert torch.isfinite(dx_cls.float()).all()


def test_cross_attention_does_not_copy_or_modify_inputs():
    inp = cross_attention_inputs(2, 8, 16, 2, torch.float32)
    before = {k: v.detach().clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    g = torch.randn(2, 16)
    run_cross_attention(inp, "torch", g)
    for k, v in before.items():
        assert torch.equal(inp[k].detach(), v), f"{k} was modified"


def test_cross_attention_torch_compile_fullgraph():
    inp = cross_attention_inputs(2, 9, 24, 3, torch.float32)
    args = [inp[k] for k in ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv",
                             "wo", "bo")]

    def f(*a):
        return cross_attention(*a, num_heads=3, backend="torch").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, [inp["x_cls"], inp["branch"], inp["wq"], inp["norm_weight"]])
    loss_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, [inp["x_cls"], inp["branch"], inp["wq"], inp["norm_weight"]])
    assert_close(loss_c, loss_e, name="loss", atol=1e-5, rtol=1e-5)
    for a, b, n in zip(grads_c, grads_e, ["x_cls", "branch", "wq", "norm_weight"]):
        assert_close(a, b, name=f"d {n}", atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_torch_library_opcheck():
    inp = cross_attention_inputs(2, 5, 12, 3, torch.float32)
    torch.library.opcheck(torch.ops.crossvit_kernels.cross_attention.default,
                          tuple(inp[k] for k in XATTN_NAMES) + (3, 1e-6, True, "torch"))
    images = torch.randn(2, 3, 8, 12)
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.crossvit_kernels.patch_embed.default,
                          (images, weight, torch.randn(5), torch.randn(7, 5), torch.randn(5), "torch"))


# ------------------------------------------------------------------------------------------------
# patch embedding
# ------------------------------------------------------------------------------------------------

def patch_inputs(B, Cin, H, W, C, ph, pw, dtype, seed=0, bias=True, image_grad=True):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64, generator=gen) * scale).to(dtype).requires_grad_(True)

    P = (H // ph) * (W // pw)
    return dict(images=r(B, Cin, H, W).requires_grad_(image_grad), weight=r(C, Cin, ph, pw, scale=0.1),
                bias=r(C, scale=0.1) if bias else None, pos_embed=r(1, 1 + P, C, scale=0.1), cls_token=r(1, 1, C))


PE_NAMES = ("images", "weight", "bias", "pos_embed", "cls_token")


def run_patch_embed(inp, backend, g=None):
    out = patch_embed(*(inp[k] for k in PE_NAMES), backend=backend)
    if g is None:
        return out, {}
    names = [k for k in PE_NAMES if inp[k] is not None and inp[k].requires_grad]
    return out, dict(zip(names, torch.autograd.grad(out, [inp[k] for k in names], g.to(out.dtype))))


PE_SHAPES = [  # B, Cin, H, W, C, ph, pw
    (2, 3, 24, 36, 5, 12, 12),
    (1, 1, 15, 25, 7, 5, 5),
    (2, 4, 16, 16, 9, 8, 4),
    (2, 3, 240, 240, 224, 12, 12),
    (1, 3, 224, 224, 448, 16, 16),
]


@pytest.mark.parametrize("shape", PE_SHAPES)
def test_patch_embed_torch_backend_float64(shape):
    B, Cin, H, W, C, ph, pw = shape
    inp = patch_inputs(*shape, torch.float64)
    P = (H // ph) * (W // pw)
    g = torch.randn(B, 1 + P, C, dtype=torch.float64)
    out_ref, grads_ref = run_patch_embed(inp, "reference", g)
    out, grads = run_patch_embed(inp, "torch", g)
    assert_close(out, out_ref, name="out", atol=1e-10, rtol=1e-10)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], name=f"d {k}", atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patch_embed_torch_backend_low_precision(dtype):
    shape = (2, 3, 48, 48, 32, 12, 12)
    inp = patch_inputs(*shape, dtype, seed=5)
    g = torch.randn(2, 17, 32, dtype=torch.float64)
    out64, g64 = run_patch_embed({k: None if v is None else v.detach().double().requires_grad_(True)
                                  for k, v in inp.items()}, "reference", g)
    out_ref, gref = run_patch_embed(inp, "reference", g)
    out, grads = run_patch_embed(inp, "torch", g)
    assert out.dtype == dtype
    assert_within_ref_error(out, out_ref, out64, dtype, "out")
    for k in g64:
        assert_within_ref_error(grads[k], gref[k], g64[k], dtype, f"d {k}", factor=GRAD_FACTOR)


def test_patch_embed_no_image_grad_and_no_bias():
    inp = patch_inputs(2, 3, 24, 24, 8, 12, 12, torch.float64, bias=False, image_grad=False)
    g = torch.randn(2, 5, 8, dtype=torch.float64)
    out_ref, gref = run_patch_embed(inp, "reference", g)
    out, grads = run_patch_embed(inp, "torch", g)
    assert "images" not in grads
    assert_close(out, out_ref, name="out", atol=1e-10, rtol=1e-10)
    for k in gref:
        assert_close(grads[k], gref[k], name=f"d {k}", atol=1e-9, rtol=1e-9)


def test_patch_embed_accepts_flat_pos_and_cls():
    inp = patch_inputs(1, 3, 24, 24, 8, 12, 12, torch.float64)
    a = patch_embed(inp["images"], inp["weight"], inp["bias"], inp["pos_embed"], inp["cls_token"], backend="torch")
    b = patch_embed(inp["images"], inp["weight"], inp["bias"], inp["pos_embed"][0], inp["cls_token"].reshape(8),
                    backend="torch")
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.autocast: mixed dtypes are promoted, the fused math runs with autocast off
# ---------------------------------------------------------------------------------------------

AUTOCAST_BACKENDS = ["torch", "reference"] + (["cpp"] if __import__("crossvit_kernels").available_backends()
                                               .get("cpp") is True else [])


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_cross_attention_under_autocast_promotes_mixed_inputs(backend):
    """Under autocast a fusion block gets a bfloat16 CLS (autocast's projection) with float32
    tokens and parameters. The fused backends compute exactly as on the promoted float32 inputs;
    "reference" runs timm's block under autocast, op for op. Without autocast a mixed call still
    raises."""
    from timm.models.crossvit import CrossAttentionBlock
    inp = cross_attention_inputs(2, 9, 24, 3, requires_grad=False)
    args = [inp[k] for k in XATTN_NAMES]
    x_cls16 = args[0].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_attention(x_cls16, *args[1:], num_heads=3, backend=backend)
    assert got.dtype == torch.float32
    if backend == "reference":
        blk = CrossAttentionBlock(24, 3, qkv_bias=True)
        blk.norm1.eps = 1e-6
        with torch.no_grad():
            blk.norm1.weight.copy_(inp["norm_weight"]), blk.norm1.bias.copy_(inp["norm_bias"])
            for n in "qkv":
                getattr(blk.attn, "w" + n).weight.copy_(inp["w" + n])
                getattr(blk.attn, "w" + n).bias.copy_(inp["b" + n])
            blk.attn.proj.weight.copy_(inp["wo"]), blk.attn.proj.bias.copy_(inp["bo"])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = blk(torch.cat([x_cls16[:, None], args[1]], dim=1))[:, 0]
        assert expected.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        expected = cross_attention(x_cls16.float(), *args[1:], num_heads=3, backend=backend)
        assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="dtype mismatch"):
        cross_attention(x_cls16, *args[1:], num_heads=3, backend=backend)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_cross_attention_backward_under_autocast(backend, affine):
    """A training step whose backward runs inside the autocast context (the loss computed there):
    the gradients keep their inputs' dtypes and stay within bfloat16's reach of the float32 call's,
    with and without the LayerNorm affine; the fused backends, whose forward and backward both run
    with autocast off, give the float32 call's gradients exactly."""
    inp = cross_attention_inputs(2, 9, 24, 3, requires_grad=True)
    if not affine:
        inp["norm_weight"] = inp["norm_bias"] = None
    args = [inp[k] for k in XATTN_NAMES]
    names = [k for k in XATTN_NAMES if inp[k] is not None]
    leaves = [inp[k] for k in names]
    g = torch.randn(2, 24, generator=torch.Generator().manual_seed(5))
    expected = torch.autograd.grad((cross_attention(*args, num_heads=3, backend=backend) * g).sum(), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad((cross_attention(*args, num_heads=3, backend=backend).float() * g).sum(), leaves)
    for name, a, e, t in zip(names, got, expected, leaves):
        assert a.dtype == t.dtype and torch.isfinite(a).all(), name
        if name == "bk":  # exactly zero in exact arithmetic; timm's block under autocast leaves a residue
            continue
        torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-2 * float(e.abs().max()), msg=lambda m: f"d{name}: {m}")
        if backend != "reference":
            assert torch.equal(a, e), f"d{name} differs from the float32 call's"


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_patch_embed_under_autocast_promotes_mixed_inputs(backend):
    inp = patch_inputs(2, 3, 24, 36, 5, 12, 12, torch.float32, image_grad=False)
    images16 = inp["images"].detach().bfloat16()
    rest = [inp[k] for k in PE_NAMES[1:]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = patch_embed(images16, *rest, backend=backend)
    if backend == "reference":   # timm's conv + cat + add under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = F.conv2d(images16.float(), rest[0], rest[1], stride=12).flatten(2).transpose(1, 2)
            expected = torch.cat([rest[3].expand(2, -1, -1), x], dim=1) + rest[2]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        assert got.dtype == torch.float32
        assert torch.equal(got, patch_embed(images16.float(), *rest, backend=backend))
