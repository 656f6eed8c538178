"""The model: timm parity for every variant, checkpoint loading, timm's API, the fusion schemes."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import crossvit_kernels as ck
from crossvit_kernels.models.fusion import resample_tokens
from helpers import assert_close, max_err

timm = pytest.importorskip("timm")

ALL_MODELS = ck.list_models()


def test_list_models_matches_timm():
    assert ALL_MODELS == timm.list_models("crossvit*")
    assert len(ALL_MODELS) == 11
    assert ck.list_models("*dagger_408") == ["crossvit_15_dagger_408", "crossvit_18_dagger_408"]


def _pair(name, **kwargs):
    torch.manual_seed(0)
    tm = timm.create_model(name, **kwargs).eval()
    m = ck.create_model(name, **kwargs).eval()
    m.load_state_dict(tm.state_dict(), strict=True)
    return tm, m


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parity_with_timm(name):
    tm, m = _pair(name)
    sd_t, sd_m = tm.state_dict(), m.state_dict()
    assert list(sd_t) == list(sd_m), "state_dict keys (and their order) must be timm's"
    for k in sd_t:
        assert sd_t[k].shape == sd_m[k].shape, k
    px = m.img_size[0]
    x = torch.randn(1, 3, px, px)
    with torch.no_grad():
        timm32 = tm(x)
        with ck.use_backend("reference"):
            ref32 = m(x)
        ours32 = m(x)
        timm64 = copy.deepcopy(tm).double()(x.double())
    # The reference path is timm's computation, op for op: bit-for-bit identical.
    assert torch.equal(ref32, timm32)
    # The fused path computes the same function in another order: its float32 error against timm in
    # float64 is at most twice timm's own float32 error (plus a floor for near-zero errors).
    e_ours, e_timm = max_err(ours32, timm64), max_err(timm32, timm64)
    assert e_ours <= 2 * e_timm + 2e-6, f"{name}: fused error {e_ours:.3g} vs timm's own float32 error {e_timm:.3g}"
    assert m.pretrained_cfg == tm.pretrained_cfg
    assert m.no_weight_decay() == tm.no_weight_decay()


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_training_gradients_match_timm(name):
    tm, m = _pair(name, num_classes=10)
    tm.train()
    m.train()
    x = torch.randn(2, 3, 240, 240)
    target = torch.tensor([1, 7])
    tm64 = copy.deepcopy(tm).double()
    grads = {}
    for tag, model, inp in (("timm", tm, x), ("ours", m, x), ("timm64", tm64, x.double())):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inp), target).backward()
        grads[tag] = {n: p.grad for n, p in model.named_parameters()}
    for n, g64 in grads["timm64"].items():
        g_ours, g_timm = grads["ours"][n], grads["timm"][n]
        assert g_ours is not None, f"no gradient for {n}"
        e_ours, e_timm = max_err(g_ours, g64), max_err(g_timm, g64)
        scale = float(g64.abs().max())
        assert e_ours <= 3 * e_timm + 1e-6 * max(scale, 1e-3), f"d {n}: {e_ours:.3g} vs timm's {e_timm:.3g}"


def test_timm_api_behaves_like_timm():
    tm, m = _pair("crossvit_tiny_240", global_pool="avg", num_classes=7)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad(), ck.use_backend("reference"):
        fa, fb = tm.forward_features(x), m.forward_features(x)
        assert len(fa) == len(fb) == 2
        for a, b in zip(fa, fb):
            assert torch.equal(a, b)
        assert torch.equal(tm.forward_head(fa, pre_logits=True), m.forward_head(fb, pre_logits=True))
        assert m.forward_head(fb, pre_logits=True).shape == (2, m.num_features)
        assert torch.equal(tm(x), m(x))
    assert m.get_classifier()[0].out_features == 7
    tm.reset_classifier(0)
    m.reset_classifier(0)
    assert isinstance(m.get_classifier()[0], torch.nn.Identity)
    with torch.no_grad(), ck.use_backend("reference"):
        assert torch.equal(tm(x), m(x))
    m.reset_classifier(5, global_pool="token")
    assert m.global_pool == "token" and m(x).shape == (2, 5)
    assert m.group_matcher() == tm.group_matcher()
    assert m.feature_info == tm.feature_info
    m.set_grad_checkpointing(True)   # timm asserts; ours checkpoints each encoder block (tests/test_dropin.py)
    assert all(blk.grad_checkpointing for blk in m.blocks)


@pytest.mark.skipif(not hasattr(timm.models.crossvit.CrossVit, "forward_intermediates"),
                    reason="this timm has no CrossVit.forward_intermediates to compare with")
@pytest.mark.parametrize("kw", [
    dict(),
    dict(indices=2, norm=True),
    dict(indices=[0, -1], output_fmt="NLC"),
    dict(indices=[1], stop_early=True, intermediates_only=True),
], ids=["all", "last2_norm", "list_nlc", "stop_early_only"])
def test_forward_intermediates_and_pruning_like_timm(kw):
    """Same features as timm's (bit for bit under the reference backend, where the whole forward is
    timm's computation), same pruning; bad arguments raise."""
    tm, m = _pair("crossvit_tiny_240", num_classes=7)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad(), ck.use_backend("reference"):
        a, b = tm.forward_intermediates(x, **kw), m.forward_intermediates(x, **kw)
    if not kw.get("intermediates_only"):
        (fa, a), (fb, b) = a, b
        assert all(torch.equal(u, v) for u, v in zip(fa, fb))
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    if "indices" in kw:
        t2, m2 = copy.deepcopy(tm), copy.deepcopy(m)
        assert t2.prune_intermediate_layers(kw["indices"]) == m2.prune_intermediate_layers(kw["indices"])
        assert len(t2.blocks) == len(m2.blocks) and m2.num_classes == t2.num_classes == 0
    with pytest.raises(ValueError):
        m.forward_intermediates(x, indices=[99])
    with pytest.raises(ValueError):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_constructor_arguments_like_timm():
    kwargs = dict(in_chans=1, num_classes=3, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1,
                  attn_drop_rate=0.1, drop_path_rate=0.2, crop_scale=True)
    tm, m = _pair("crossvit_tiny_240", **kwargs)
    x = torch.randn(2, 1, 256, 256)  # crop_scale: centre crops instead of resizing
    with torch.no_grad():
        e = max_err(m(x), tm(x))
    assert e < 1e-5
    # dropout paths run (training mode) and give gradients to every parameter
    m.train()
    m(x).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def _save(tmp_path, state, name):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_pretrained_from_local_timm_and_ibm_files(tmp_path):
    torch.manual_seed(1)
    tm = timm.create_model("crossvit_9_240").eval()
    sd = tm.state_dict()
    ibm = {("pos_embed." + k[-1] if k.startswith("pos_embed_") else
            "cls_token." + k[-1] if k.startswith("cls_token_") else k): v for k, v in sd.items()}
    assert "pos_embed.0" in ibm and "pos_embed_0" not in ibm
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        expected = tm(x)
        for path in (_save(tmp_path, sd, "timm.pth"), _save(tmp_path, {"model": ibm}, "ibm.pth")):
            m = ck.create_model("crossvit_9_240", pretrained=path).eval()
            with ck.use_backend("reference"):
                assert torch.equal(m(x), expected)
    try:
        from safetensors.torch import save_file
    except ImportError:
        return
    st = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    m = ck.create_model("crossvit_9_240", pretrained=st).eval()
    with torch.no_grad(), ck.use_backend("reference"):
        assert torch.equal(m(x), expected)


def test_pretrained_with_other_fusion_loads_the_rest(tmp_path):
    tm = timm.create_model("crossvit_tiny_240")
    path = _save(tmp_path, tm.state_dict(), "w.pth")
    with pytest.warns(UserWarning, match="fusion='class_token'"):
        m = ck.create_model("crossvit_tiny_240", pretrained=path, fusion="class_token")
    assert torch.equal(m.pos_embed_0, tm.pos_embed_0)


# ------------------------------------------------------------------------------------------------
# fusion schemes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ck.FUSIONS)
def test_every_fusion_builds_and_trains(fusion):
    torch.manual_seed(0)
    m = ck.create_model("crossvit_tiny_240", fusion=fusion, num_classes=4)
    base = {n for n, _ in ck.create_model("crossvit_tiny_240", fusion="none", num_classes=4).named_parameters()}
    added = [n for n, _ in m.named_parameters() if n not in base]
    if fusion != "none":
        assert added, "a fusion scheme must add parameters"
    x = torch.randn(2, 3, 240, 240)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 3]))
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if n.endswith("attn.wk.bias"):  # the key bias of a single-query attention: exactly zero
            assert not p.grad.any(), n
        elif n in added:
            assert p.grad.abs().sum() > 0, f"{fusion}: no gradient reaches {n}"
    opt.step()
    changed = [n for n in added if not torch.equal(before[n], m.get_parameter(n).detach())]
    assert len(changed) >= len([n for n in added if not n.endswith("wk.bias")])


def _macs(fusion):
    m = ck.create_model("crossvit_small_240", fusion=fusion).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), ck.use_backend("reference"), counter:
        m(torch.randn(1, 3, 240, 240))
    return counter.get_total_flops() / 2


def test_fusion_costs_follow_the_papers_ablation():
    """CrossViT-S, textbook multiply-adds (the paper counts the textbook form): all-attention is by
    far the most expensive, class-token the cheapest fusion, cross-attention a few percent over none."""
    macs = {f: _macs(f) for f in ck.FUSIONS}
    fusions = [f for f in ck.FUSIONS if f != "none"]
    assert max(fusions, key=macs.get) == "all_attention"
    assert min(fusions, key=macs.get) == "class_token"
    assert macs["all_attention"] > 1.3 * macs["none"]
    assert 1.0 < macs["cross_attention"] / macs["none"] < 1.08
    assert macs["class_token"] / macs["none"] < 1.001


def test_resample_tokens():
    p = torch.randn(2, 4 * 6, 3)
    assert resample_tokens(p, (4, 6), (4, 6)) is p
    const = torch.ones(1, 20 * 20, 5) * 3.0
    out = resample_tokens(const, (20, 20), (14, 14))
    assert out.shape == (1, 196, 5)
    assert_close(out, torch.full_like(out, 3.0), atol=1e-6, rtol=0, name="constant grid")
    # token (r, c) of the target grid reads the source image at the same relative position
    ramp = torch.arange(20.0).repeat_interleave(20).reshape(1, 400, 1)  # value = source row
    out = resample_tokens(ramp, (20, 20), (10, 10)).reshape(10, 10)
    assert_close(out[:, 0], torch.arange(10.0) * 2 + 0.5, atol=1e-5, rtol=0, name="row ramp")


def test_dagger_epilogue_writes_the_token_buffer_like_cat_add():
    """The dagger embedding's epilogue (conv output + position embedding written straight into the
    token buffer at inference) gives timm's cat + add bit for bit, with and without autograd."""
    from crossvit_kernels.modules import PatchEmbed
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=48, patch_size=12, in_chans=3, embed_dim=24, multi_conv=True)
    x = torch.randn(2, 3, 48, 48)
    cls, pos = torch.randn(1, 1, 24), torch.randn(1, 17, 24)
    with torch.no_grad():
        t = pe.proj(x).flatten(2).transpose(1, 2)
        expected = torch.cat([cls.expand(2, -1, -1), t], dim=1) + pos
        assert torch.equal(pe.forward_tokens(x, cls, pos), expected)
    cls.requires_grad_(True)
    out = pe.forward_tokens(x, cls, pos)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert torch.equal(cls.grad, torch.full_like(cls, 2.0))
