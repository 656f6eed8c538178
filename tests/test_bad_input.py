"""Bad input raises ValueError or TypeError with a message that says what to fix."""
import pytest
import torch

import crossvit_kernels as ck
from crossvit_kernels.modules import CrossAttentionBlock
from crossvit_kernels.ops import cross_attention, patch_embed
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
