"""patch_timm / unpatch_timm: in place, this instance only, state_dict unchanged, timm's logits and
gradients to float32 rounding, torch.compile(fullgraph=True), clear errors.

Criterion for parity (docs/design.md, section 7): the patched float32 model's error against a float64 copy of the
unpatched model is at most a few times the unpatched float32 model's own error, plus a small floor.
"""
import copy
import time

import pytest
import torch
import torch.nn as nn

import crossvit_kernels as ck
from crossvit_kernels.models.fusion import fuse_cross_attention
from crossvit_kernels.timm_patch import is_patched

from helpers import max_err, requires_gpu

timm = pytest.importorskip("timm")
tc = pytest.importorskip("timm.models.crossvit")

LOGIT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def _tiny(**kw):
    """A one-block CrossViT small enough to compile in seconds (48 px: 4x4 and 3x3 patch grids)."""
    args = dict(img_size=48, img_scale=(1.0, 1.0), patch_size=(12, 16), embed_dim=(24, 48), depth=((1, 1, 0),),
                num_heads=(2, 4), mlp_ratio=(2.0, 2.0, 1.0), num_classes=5)
    args.update(kw)
    return tc.CrossVit(**args)


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x.to(next(model.parameters()).dtype))
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_parity(patched, ref32, x, train: bool):
    """Logits and every parameter gradient of ``patched`` vs a float64 copy of the unpatched model."""
    ref64 = copy.deepcopy(ref32).double()
    for m in (patched, ref32, ref64):
        m.train(train)
    torch.manual_seed(1)
    y_p, g_p = _fwd_bwd(patched, x)
    torch.manual_seed(1)
    y_r, g_r = _fwd_bwd(ref32, x)
    torch.manual_seed(1)
    y_o, g_o = _fwd_bwd(ref64, x)
    e_p, e_r = max_err(y_p, y_o), max_err(y_r, y_o)
    assert e_p <= LOGIT_FACTOR * e_r + 1e-6 * max(1.0, float(y_o.abs().max())), \
        f"logits: patched error {e_p:.3g} vs unpatched {e_r:.3g}"
    assert g_p.keys() == g_o.keys()
    bad = []
    for n in g_o:
        assert g_p[n] is not None, f"no gradient reaches {n}"
        e_p, e_r = max_err(g_p[n], g_o[n]), max_err(g_r[n], g_o[n])
        bound = GRAD_FACTOR * e_r + 1e-6 * max(1e-3, float(g_o[n].abs().max()))
        if e_p > bound:
            bad.append(f"{n}: {e_p:.3g} > {bound:.3g} (unpatched error {e_r:.3g})")
    assert not bad, f"{len(bad)} of {len(g_o)} gradients off: " + "; ".join(bad[:5])


# ---------------------------------------------------------------------------------------------
# in place, this instance only, undo
# ---------------------------------------------------------------------------------------------

def test_patch_is_in_place_and_only_this_instance():
    m, other = _tiny(), _tiny()
    keys = list(m.state_dict().keys())
    tensors = {k: v.data_ptr() for k, v in m.state_dict().items()}
    n_params, n_buffers = len(list(m.parameters())), len(list(m.buffers()))
    out = ck.patch_timm(m)
    assert out is m and is_patched(m)
    assert list(m.state_dict().keys()) == keys, "state_dict keys changed"
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == tensors, "parameters were replaced"
    assert len(list(m.parameters())) == n_params and len(list(m.buffers())) == n_buffers
    assert isinstance(m, tc.CrossVit) and type(m) is not tc.CrossVit
    assert type(m.blocks[0]) is not tc.MultiScaleBlock and isinstance(m.blocks[0], tc.MultiScaleBlock)
    assert type(m.blocks[0].fusion[0]) is not tc.CrossAttentionBlock
    # timm's classes and the other instance are untouched
    assert type(other) is tc.CrossVit and type(other.blocks[0]) is tc.MultiScaleBlock
    assert type(other.blocks[0].fusion[0]) is tc.CrossAttentionBlock and not is_patched(other)
    assert "forward_cls" not in vars(tc.CrossAttentionBlock)
    # the same weights give the same logits
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), other.eval()(x), rtol=1e-5, atol=1e-5)
    # patching twice is harmless; unpatching restores everything
    ck.patch_timm(m, backend="torch")
    assert ck.unpatch_timm(m) is m and not is_patched(m)
    assert type(m) is tc.CrossVit and type(m.blocks[0]) is tc.MultiScaleBlock
    assert type(m.blocks[0].fusion[0]) is tc.CrossAttentionBlock
    leftovers = [n for n, mod in m.named_modules() if any(k.startswith("_crossvit_kernels") for k in vars(mod))]
    assert not leftovers, f"attributes left on {leftovers}"
    assert list(m.state_dict().keys()) == keys
    ck.unpatch_timm(m)  # a no-op on an unpatched model


def test_patched_model_deepcopies_and_switches_modes():
    m = ck.patch_timm(_tiny())
    c = copy.deepcopy(m)
    assert is_patched(c) and type(c) is type(m)
    c.train()
    assert c.training and all(mod.training for mod in c.modules())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(c.eval()(x), m.eval()(x))


@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
def test_patched_model_pickles_and_saves_whole(multi_conv, tmp_path):
    """torch.save(model) / pickle of a patched model: it loads patched (every submodule's class),
    computes the same logits bit for bit, and can still be unpatched."""
    import pickle
    m = ck.patch_timm(_tiny(multi_conv=multi_conv)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        y = m(x)
    torch.save(m, tmp_path / "model.pt")
    for loaded in (pickle.loads(pickle.dumps(m)), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert [type(a) for a in loaded.modules()] == [type(b) for b in m.modules()]
        assert all(is_patched(a) == is_patched(b) for a, b in zip(loaded.modules(), m.modules()))
        with torch.no_grad():
            assert torch.equal(loaded(x), y)
        ck.unpatch_timm(loaded)
        assert not any(is_patched(a) for a in loaded.modules()) and type(loaded) is tc.CrossVit


# ---------------------------------------------------------------------------------------------
# parity: logits and every gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_published_variant_parity(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=10)
    with torch.no_grad():  # non-trivial LayerNorm affines and biases
        for mod in ref.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
            elif isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.add_(0.02 * torch.randn_like(mod.bias))
    patched = ck.patch_timm(copy.deepcopy(ref))
    x = torch.randn(2, 3, 240, 240)
    _assert_parity(patched, ref, x, train=False)


@pytest.mark.parametrize("kw", [
    dict(),                                           # linear embedding, one fusion block
    dict(multi_conv=True),                            # dagger embedding
    dict(depth=((1, 1, 2),), drop_path_rate=0.2),     # timm's Sequential fusion (depth > 0), drop path in training
    dict(img_size=(48, 96), img_scale=(1.0, 2 / 3)),  # non-square, bicubic-resized second branch
    dict(img_size=(52, 48)),                          # 52 px not a multiple of 12 or 16: the conv drops the rest
], ids=["linear", "dagger", "fusion_depth2_droppath", "nonsquare", "ragged"])
def test_small_configs_parity_train_and_eval(kw):
    torch.manual_seed(0)
    ref = _tiny(**kw)
    patched = ck.patch_timm(copy.deepcopy(ref))
    size = kw.get("img_size", 48)
    size = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, 3, *size)
    _assert_parity(patched, ref, x, train=False)
    _assert_parity(patched, ref, x, train=True)   # same RNG draws as timm: drop path masks agree


def _timm_1_0_29_forward_features(self, x):
    """CrossVit.forward_features as timm 1.0.29 and older write it: the embedding inline, no _embed."""
    B = x.shape[0]
    xs = []
    for i, pe in enumerate(self.patch_embed):
        x_ = pe(tc.scale_image(x, self.img_size_scaled[i], self.crop_scale))
        cls_tokens = (self.cls_token_0 if i == 0 else self.cls_token_1).expand(B, -1, -1)
        x_ = torch.cat((cls_tokens, x_), dim=1) + (self.pos_embed_0 if i == 0 else self.pos_embed_1)
        xs.append(self.pos_drop(x_))
    for blk in self.blocks:
        xs = blk(xs)
    return [norm(xs[i]) for i, norm in enumerate(self.norm)]


@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
def test_timm_without_embed_method(monkeypatch, multi_conv):
    """timm 1.0.29 (the GPU machine's) has no CrossVit._embed: patch_timm then replaces
    forward_features, with the same parity, and unpatch_timm restores timm's."""
    monkeypatch.delattr(tc.CrossVit, "_embed")
    monkeypatch.setattr(tc.CrossVit, "forward_features", _timm_1_0_29_forward_features)
    torch.manual_seed(0)
    ref = _tiny(multi_conv=multi_conv)
    patched = ck.patch_timm(copy.deepcopy(ref))
    assert is_patched(patched) and type(patched).forward_features is not _timm_1_0_29_forward_features
    x = torch.randn(3, 3, 48, 48)
    _assert_parity(patched, ref, x, train=False)
    _assert_parity(patched, ref, x, train=True)
    ck.unpatch_timm(patched)
    assert type(patched) is tc.CrossVit and not is_patched(patched)


@pytest.mark.parametrize("which", ["patched_timm", "ours"])
def test_autocast_bfloat16_inference_and_training(which):
    """Mixed precision, as most training runs: under torch.autocast(bfloat16) the patched model and
    ours run forward and backward, and their logits' error against the float64 model is at most
    2x timm's own error under the same autocast (plus a small floor)."""
    torch.manual_seed(0)
    ref = _tiny(depth=((1, 1, 1),), multi_conv=False)
    if which == "patched_timm":
        model = ck.patch_timm(copy.deepcopy(ref))
    else:
        model = ck.create_model("crossvit_tiny_240", img_size=48, img_scale=(1.0, 1.0), patch_size=(12, 16),
                                embed_dim=(24, 48), depth=((1, 1, 1),), num_heads=(2, 4),
                                mlp_ratio=(2.0, 2.0, 1.0), num_classes=5)
        model.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 48, 48)
    ref64 = copy.deepcopy(ref).double().eval()
    with torch.no_grad():
        truth = ref64(x.double())
        ref.eval(), model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref, y = ref(x), model(x)
    e_ref, e = max_err(y_ref.double(), truth), max_err(y.double(), truth)
    assert e <= 2 * e_ref + 1e-3, f"autocast logits: {which} error {e:.3g} vs timm's {e_ref:.3g}"
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_encoder_fast_path_matches_at_inference_and_is_optional():
    from timm.models.vision_transformer import Block
    torch.manual_seed(0)
    ref = _tiny()
    m = ck.patch_timm(copy.deepcopy(ref)).eval()
    blk = m.blocks[0].blocks[0][0]
    assert is_patched(blk) and type(blk) is not Block
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():   # the path that runs the encoder linears on oneDNN
        y_p, y_r, y_o = m(x), ref.eval()(x), copy.deepcopy(ref).double()(x.double())
    e_p, e_r = max_err(y_p, y_o), max_err(y_r, y_o)
    assert e_p <= LOGIT_FACTOR * e_r + 1e-6, f"patched error {e_p:.3g} vs unpatched {e_r:.3g}"
    ck.patch_timm(m, encoder=False)
    assert type(blk) is Block and not is_patched(blk) and is_patched(m.blocks[0])
    with torch.no_grad():
        torch.testing.assert_close(m(x), y_r, rtol=1e-5, atol=1e-5)


def test_backend_argument_and_reference_backend():
    torch.manual_seed(0)
    ref = _tiny()
    x = torch.randn(2, 3, 48, 48)
    for backend in ("torch", "reference"):
        m = ck.patch_timm(copy.deepcopy(ref), backend=backend).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_unfusable_block_keeps_timm_math():
    torch.manual_seed(0)
    ref = _tiny()
    ref.blocks[0].fusion[0].attn.scale = 0.5       # a hand-set scale: the fused op does not cover it
    m = ck.patch_timm(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_fusion_never_writes_into_its_inputs():
    """The fusion stage returns new tensors and leaves the encoders' outputs as they were (hooks
    and feature extractors may hold them), with and without autograd; every path of every module:
    tests/test_dropin.py."""
    torch.manual_seed(0)
    m = ck.create_model("crossvit_tiny_240").blocks[0]
    xs = [torch.randn(2, 401, 96), torch.randn(2, 197, 192)]
    for grad in (False, True):
        leaves = [x.clone().requires_grad_(grad) for x in xs]
        with torch.set_grad_enabled(grad):
            outs = fuse_cross_attention(m.projs, m.fusion, m.revert_projs, leaves)
        assert all(o.data_ptr() != x.data_ptr() for o, x in zip(outs, leaves))
        for x, x0 in zip(leaves, xs):
            assert torch.equal(x.detach(), x0)
        if grad:
            sum(o.square().sum() for o in outs).backward()


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): inference and training, patched timm and ours
# ---------------------------------------------------------------------------------------------

def _ours_tiny():
    from crossvit_kernels.models import CrossViT
    return CrossViT(img_size=48, img_scale=(1.0, 1.0), patch_size=(12, 16), embed_dim=(24, 48),
                    depth=((1, 1, 0),), num_heads=(2, 4), mlp_ratio=(2.0, 2.0, 1.0), num_classes=5)


@pytest.mark.parametrize("which", ["patched_timm", "ours"])
def test_compile_fullgraph_inference_and_training(which):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ck.patch_timm(_tiny()) if which == "patched_timm" else _ours_tiny()
    x = torch.randn(2, 3, 48, 48)
    t0 = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    y_c = compiled(x)
    y_c.square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    y_e = model(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_c[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    print(f"compile + run ({which}, inference and training): {time.perf_counter() - t0:.1f} s")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("which", ["patched_timm", "ours"])
def test_cuda_graphs_reduce_overhead(which):
    """CUDA-graph capture (mode="reduce-overhead"): replays agree with eager, inference and training."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if which == "patched_timm":
        model = ck.patch_timm(timm.create_model("crossvit_tiny_240", num_classes=10)).to(dev)
    else:
        model = ck.create_model("crossvit_tiny_240", num_classes=10).to(dev)
    x = torch.randn(2, 3, 240, 240, device=dev)
    model.eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expect = model(x)
        for _ in range(3):   # record, then replay
            got = compiled(x)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    model.train()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        y = compiled(x)
        y.square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    y_e = model(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y.detach(), y_e.detach(), rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_c[n], p.grad, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="timm.models.crossvit.CrossVit"):
        ck.patch_timm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="timm.models.crossvit.CrossVit"):
        ck.patch_timm("crossvit_9_240")
    with pytest.raises(TypeError, match="already runs on the fused ops"):
        ck.patch_timm(_ours_tiny())
    with pytest.raises(TypeError, match="timm.models.crossvit.CrossVit"):
        ck.unpatch_timm(nn.Sequential())
    with pytest.raises(TypeError, match="torch.compile"):
        ck.patch_timm(torch.compile(_tiny()))
    with pytest.raises(ValueError, match="unknown backend"):
        ck.patch_timm(_tiny(), backend="fastest")
    m = ck.patch_timm(_tiny()).eval()
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 4, 48, 48))
