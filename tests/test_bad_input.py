"""Bad input raises ValueError or TypeError with a message that says what to fix."""
import pytest
import torch

import crossvit_kernels as ck
from crossvit_kernels.modules import CrossAttentionBlock
from crossvit_kernels.ops import cross_attention, patch_embed
from crossvit_kernels.ops.fusion import fusion_stage
from helpers import XATTN_ARGS, cross_attention_inputs


def call_xattn(overrides=None, num_heads=3, **kwargs):
    inp = cross_attention_inputs(2, 5, 12, 3, torch.float32, requires_grad=False)
    args = {k: inp[k] for k in XATTN_ARGS}
    args.update(overrides or {})
    return cross_attention(*(args[k] for k in XATTN_ARGS), num_heads=num_heads, **kwargs)


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(x_cls=torch.randn(2, 1, 12)), ValueError, "x_cls must have 2 dimensions"),
    (dict(x_tokens=torch.randn(2, 12)), ValueError, "x_tokens must have 3 dimensions"),
    (dict(x_tokens=torch.randn(3, 5, 12)), ValueError, "batch sizes disagree"),
    (dict(x_tokens=torch.randn(2, 5, 10)), ValueError, "widths disagree"),
    (dict(wq=torch.randn(12, 10)), ValueError, r"wq must have shape \(12, 12\)"),
    (dict(bo=torch.randn(11)), ValueError, r"bo must have shape \(12,\)"),
    (dict(norm_weight=torch.randn(13)), ValueError, "norm_weight must have shape"),
    (dict(x_cls=torch.ones(2, 12, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(x_tokens=torch.randn(2, 5, 12, dtype=torch.float64)), TypeError, "dtype mismatch"),
    (dict(wk=torch.randn(12, 12).half()), TypeError, "dtype mismatch"),
    (dict(x_cls=[[0.0] * 12] * 2), TypeError, "must be a torch.Tensor"),
    (dict(wv=None), TypeError, "wv must be a tensor"),
])
def test_cross_attention_bad_tensors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call_xattn(overrides)


@pytest.mark.parametrize("num_heads,match", [(5, "must divide the width C=12"), (0, "positive int"),
                                             (2.0, "positive int"), (True, "positive int")])
def test_cross_attention_bad_heads(num_heads, match):
    with pytest.raises(ValueError, match=match):
        call_xattn(num_heads=num_heads)


def test_cross_attention_bad_eps_and_backend():
    with pytest.raises(ValueError, match="eps must be a positive number"):
        call_xattn(eps=0.0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call_xattn(backend="fast")
    with pytest.raises(TypeError, match="backend must be"):
        call_xattn(backend=3)


def test_unavailable_backend_says_why():
    # The cuda backend cannot run CPU tensors on any machine: the message names the reason.
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cross_attention"):
        call_xattn(backend="cuda")


def pe_args(**over):
    a = dict(images=torch.randn(2, 3, 24, 24), weight=torch.randn(8, 3, 12, 12), bias=torch.randn(8),
             pos_embed=torch.randn(1, 5, 8), cls_token=torch.randn(1, 1, 8))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,match", [
    (dict(images=torch.randn(2, 3, 25, 24)), ValueError, "patch size 12x12 must divide the image size 25x24"),
    (dict(images=torch.randn(3, 24, 24)), ValueError, "images must have 4 dimensions"),
    (dict(images=torch.randn(2, 4, 24, 24)), ValueError, "weight expects 3 input channels but images have 4"),
    (dict(pos_embed=torch.randn(1, 4, 8)), ValueError, r"pos_embed must have shape \(1, 5, 8\)"),
    (dict(cls_token=torch.randn(1, 1, 7)), ValueError, "cls_token must have shape"),
    (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\)"),
    (dict(images=torch.zeros(2, 3, 24, 24, dtype=torch.uint8)), TypeError, "floating-point"),
    (dict(weight=torch.randn(8, 3, 12, 12, dtype=torch.float64)), TypeError, "dtype mismatch"),
])
def test_patch_embed_bad_input(over, exc, match):
    for backend in ("reference", "torch"):
        with pytest.raises(exc, match=match):
            patch_embed(**pe_args(**over), backend=backend)


def stage_args(**over):
    """Valid arguments of the fusion stage (x0 (2, 6, 12), x1 (2, 5, 24), heads (3, 2)), then ``over``:
    values, or functions of the valid arguments."""
    from crossvit_kernels.backends.base import FUSION_PARAMS
    params = []
    for Ci, Cj in ((12, 24), (24, 12)):
        shapes = dict(f_ln_w=(Ci,), f_ln_b=(Ci,), f_w=(Cj, Ci), g_w=(Ci, Cj), g_b=(Ci,), wq=(Cj, Cj), wk=(Cj, Cj),
                      wv=(Cj, Cj), wo=(Cj, Cj))
        params += [torch.randn(shapes.get(name, (Cj,))) for name in FUSION_PARAMS]
    a = dict(x0=torch.randn(2, 6, 12), x1=torch.randn(2, 5, 24), params=params, heads=(3, 2), eps=(1e-6,) * 6)
    a.update({k: v(a) if callable(v) else v for k, v in over.items()})
    return a


def _replace(k, value):
    """params with entry k replaced (direction 1's entries start at 18)."""
    return lambda a: a["params"][:k] + [value] + a["params"][k + 1:]


def test_fusion_stage_valid_arguments_run():
    outs = fusion_stage(**stage_args())
    assert [o.shape for o in outs] == [(2, 6, 12), (2, 5, 24)]


@pytest.mark.parametrize("over,exc,match", [
    (dict(x0=torch.randn(2, 12)), ValueError, "x0 must have 3 dimensions"),
    (dict(x1=torch.randn(2, 5, 24, 1)), ValueError, "x1 must have 3 dimensions"),
    (dict(x1=torch.randn(3, 5, 24)), ValueError, "batch sizes disagree: x0 has 2 rows, x1 3"),
    (dict(x0=torch.randn(2, 0, 12)), ValueError, "each branch needs its CLS token"),
    (dict(x0=torch.randn(2, 6, 0)), ValueError, "empty width"),
    (dict(x0=torch.randn(2, 6, 10)), ValueError, r"f_ln_w0 must have shape \(10,\), got \(12,\).*C0=10"),
    (dict(params=_replace(2, torch.randn(24, 11))), ValueError, r"f_w0 must have shape \(24, 12\), got \(24, 11\)"),
    (dict(params=_replace(18 + 16, torch.randn(24, 24))), ValueError, r"g_w1 must have shape \(24, 12\)"),
    (dict(params=_replace(18 + 7, torch.randn(24))), ValueError, r"bq1 must have shape \(12,\)"),
    (dict(x0=torch.ones(2, 6, 12, dtype=torch.int64)), TypeError, "x0 must be a floating-point tensor"),
    (dict(x1=lambda a: a["x1"].double()), TypeError, "dtype mismatch: x0 is torch.float32 but x1 is torch.float64"),
    (dict(params=lambda a: _replace(10, a["params"][10].half())(a)), TypeError, "dtype mismatch: .* but wv0 is"),
    (dict(x0=[[[0.0] * 12] * 6] * 2), TypeError, "x0 must be a torch.Tensor, got list"),
    (dict(x1=None), TypeError, "x1 must be a tensor, got None"),
    (dict(params=_replace(6, None)), TypeError, "wq0 must be a tensor, got None"),
    (dict(params=_replace(18 + 16, None)), TypeError, "g_w1 must be a tensor, got None"),
    (dict(params=_replace(0, "weight")), TypeError, "f_ln_w0 must be a torch.Tensor, got str"),
    (dict(params=lambda a: a["params"][:35]), ValueError, "params must hold 36 entries .* got 35"),
    (dict(params=None), TypeError, "params must be a list or tuple of 36 tensors"),
    (dict(params=lambda a: torch.stack([p.reshape(-1)[:12] for p in a["params"]])), TypeError,
     "params must be a list or tuple of 36 tensors.*got Tensor"),
    (dict(heads=(5, 2)), ValueError, r"heads\[0\]=5 must be a positive int dividing C1=24"),
    (dict(heads=(3, 5)), ValueError, r"heads\[1\]=5 must be a positive int dividing C0=12"),
    (dict(heads=(3, 0)), ValueError, r"heads\[1\]=0 must be a positive int"),
    (dict(heads=(3.0, 2)), ValueError, r"heads\[0\]=3.0 must be a positive int"),
    (dict(heads=(3, 2, 1)), ValueError, r"heads must be \(H0, H1\).*got 3"),
    (dict(heads=3), TypeError, "heads must be a list or tuple of two head counts"),
    (dict(heads=None), TypeError, "heads must be a list or tuple of two head counts"),
    (dict(eps=(1e-6,) * 5), ValueError, "eps must hold six LayerNorm epsilons .* got 5"),
    (dict(eps=1e-6), TypeError, "eps must be a list or tuple of six LayerNorm epsilons"),
    (dict(eps=None), TypeError, "eps must be a list or tuple of six LayerNorm epsilons"),
    (dict(eps=(1e-6,) * 5 + (0.0,)), ValueError, "every eps must be a positive number"),
])
def test_fusion_stage_bad_input(over, exc, match):
    for backend in (None, "reference", "torch"):
        with pytest.raises(exc, match=match):
            fusion_stage(**stage_args(**over), backend=backend)


def test_fusion_stage_bad_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fusion_stage(**stage_args(), backend="fast")
    with pytest.raises(TypeError, match="backend must be None or a string"):
        fusion_stage(**stage_args(), backend=3)


def test_model_bad_input():
    with pytest.raises(ValueError, match="unknown model 'crossvit_19_240'.*did you mean"):
        ck.create_model("crossvit_19_240")
    with pytest.raises(ValueError, match="unknown fusion 'mean'"):
        ck.create_model("crossvit_tiny_240", fusion="mean")
    with pytest.raises(TypeError, match="pretrained must be"):
        ck.create_model("crossvit_tiny_240", pretrained=3)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        ck.create_model("crossvit_tiny_240", pretrained="/nonexistent/weights.pth")
    m = ck.create_model("crossvit_tiny_240", num_classes=3)
    with pytest.raises(ValueError, match="expected images of shape"):
        m(torch.randn(3, 240, 240))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        m(torch.randn(1, 1, 240, 240))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(1, 3, 240, 240, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must divide dim"):
        CrossAttentionBlock(10, num_heads=3)
    with pytest.raises(ValueError, match="global_pool"):
        ck.create_model("crossvit_tiny_240", global_pool="max")


def test_timm_only_arguments_without_timm_say_so(monkeypatch):
    """pretrained=True (timm's published weights), features_only and timm's other builder arguments
    go through timm: without timm they raise an ImportError that says so."""
    import sys
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models", None)
    monkeypatch.setitem(sys.modules, "timm.models._builder", None)
    for kw in (dict(pretrained=True), dict(features_only=True), dict(name="crossvit_tiny_240.in1k")):
        with pytest.raises(ImportError, match="pip install timm"):
            ck.create_model(**{"name": "crossvit_tiny_240", **kw})


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with ck.use_backend("cudnn"):
            pass
