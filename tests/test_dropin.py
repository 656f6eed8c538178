"""Drop-in routes: everything that works on timm's CrossVit works on ours and on patched models,
with timm's numbers.

Routes: forward hooks (outputs never modified afterwards; hooks fire as in timm), activation
checkpointing (reentrant, non-reentrant, FSDP's wrapper, our ``set_grad_checkpointing``),
torch.jit.trace / torch.jit.script (and save / load), torch.fx (symbolic_trace, timm's and
torchvision's feature extractors, FX then TorchScript as timm's tests do), torch.func (grad, vmap:
per-sample gradients), a batch of 0 (all 11 variants), ``use_backend`` per thread and per asyncio
task, ``create_model(features_only=True, ...)`` as timm's, ``patch_timm`` on a feature wrapper,
``create_model(pretrained=True)`` through timm's loader from an offline Hugging Face cache.

"timm's numbers" is the criterion of tests/test_models.py and tests/test_timm_patch.py: the
error against a float64 timm model is at most 2x timm's own float32 error for logits (3x for
gradients), plus a small floor.
"""
import asyncio
import copy
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import crossvit_kernels as ck
import crossvit_kernels.modules as ckm
from crossvit_kernels.timm_patch import is_patched

from helpers import TINY_ARGS as _ARGS
from helpers import assert_timm_logits as _assert_logits
from helpers import max_err
from helpers import tiny_images as _x
from helpers import tiny_timm as _timm
from helpers import tiny_pair as _pair

timm = pytest.importorskip("timm")
tc = pytest.importorskip("timm.models.crossvit")

WHICH = ["patched", "ours"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is fastest, and on a busy machine it avoids
    waiting at every op for a second, descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
def _grads(model, x, loss=lambda y: (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum()):
    model.zero_grad(set_to_none=True)
    loss(model(x.to(next(model.parameters()).dtype))).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_grads(g, ref, x, train=True):
    """Parameter gradients ``g`` against timm's float32 and float64 ones on ``x``."""
    r32, r64 = copy.deepcopy(ref).train(train), copy.deepcopy(ref).double().train(train)
    g32, g64 = _grads(r32, x), _grads(r64, x)
    assert g.keys() == g64.keys()
    bad = []
    for n in g64:
        e, e_ref = max_err(g[n], g64[n]), max_err(g32[n], g64[n])
        if e > 3 * e_ref + 1e-6 * max(1e-3, float(g64[n].abs().max())):
            bad.append(f"{n}: {e:.3g} vs timm's {e_ref:.3g}")
    assert not bad, f"{len(bad)} of {len(g64)} gradients off: " + "; ".join(bad[:5])


# ---------------------------------------------------------------------------------------------
# 1. forward hooks
# ---------------------------------------------------------------------------------------------

def _hook_all(model, only=None):
    """Forward hooks on every module (or those ``only`` accepts) recording (name, output, copy)."""
    seen, handles = [], []
    for name, mod in model.named_modules():
        if only is not None and not only(name, mod):
            continue

        def hook(mod, inp, out, name=name):
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    seen.append((name, t, t.detach().clone()))
        handles.append(mod.register_forward_hook(hook))
    return seen, handles


def _run_path(model, path):
    x = _x(requires_grad=path != "eval_nograd")
    model.train(path == "train")
    torch.manual_seed(3)
    with torch.set_grad_enabled(path != "eval_nograd"):
        y = model(x)
        if path != "eval_nograd":
            y.square().sum().backward()
    return y


def _modified(seen):
    return sorted({name for name, t, c in seen if not torch.equal(t.detach(), c)})


@pytest.mark.parametrize("path", ["eval_nograd", "eval_grad", "train"])
@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
@pytest.mark.parametrize("which", WHICH)
def test_hooks_outputs_never_modified_and_fire_as_in_timm(which, multi_conv, path):
    """With a hook on every module, the same modules' hooks fire as in timm (those both models
    have), with timm's values, and no output is modified after its module returned it, except
    where timm's own layout does it (the dagger convolutions feed ReLU(inplace=True))."""
    ref, model = _pair(which, multi_conv=multi_conv)
    seen_ref, _ = _hook_all(ref)
    seen, _ = _hook_all(model)
    _run_path(ref, path)
    _run_path(model, path)
    assert _modified(seen) == _modified(seen_ref)
    assert all(n.endswith(("proj.0", "proj.2")) for n in _modified(seen_ref))   # the convs before the ReLUs
    common = {n for n, _ in model.named_modules()} & {n for n, _ in ref.named_modules()}
    fired_ref = [(n, c) for n, _, c in seen_ref if n in common]
    fired = [(n, c) for n, _, c in seen if n in common]
    assert [n for n, _ in fired] == [n for n, _ in fired_ref], "hooks fire on other modules or in another order"
    for (n, c), (_, c_ref) in zip(fired, fired_ref):
        assert c.shape == c_ref.shape, n
        torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("path", ["eval_nograd", "eval_grad", "train"])
@pytest.mark.parametrize("which", WHICH)
def test_hooks_on_fused_path_outputs_never_modified(which, path, monkeypatch):
    """Hooks on the modules the fused path calls (model, blocks, encoder and fusion blocks,
    projections, norms, head) keep it fused, and nothing they captured changes afterwards."""
    calls = {"xattn": 0, "onednn": 0}
    xattn, onednn = ckm._cross_attention, ckm.onednn_linear
    monkeypatch.setattr(ckm, "_cross_attention", lambda *a, **k: calls.__setitem__("xattn", calls["xattn"] + 1)
                        or xattn(*a, **k))
    monkeypatch.setattr(ckm, "onednn_linear", lambda *a, **k: calls.__setitem__("onednn", calls["onednn"] + 1)
                        or onednn(*a, **k))
    ref, model = _pair(which)
    # modules a fused path folds: inside encoder and fusion blocks, and the (linear) patch embeddings
    folding = (ckm.Block, ckm.CrossAttentionBlock, ckm.PatchEmbed, tc.CrossAttentionBlock, tc.PatchEmbed,
               timm.models.vision_transformer.Block)
    folded = [n for n, m in model.named_modules() if isinstance(m, folding)]

    def only(name, mod):
        inside = any(name.startswith(f + ".") for f in folded)
        return not inside and not isinstance(mod, (ckm.PatchEmbed, tc.PatchEmbed))
    seen, _ = _hook_all(model, only)
    y = _run_path(model, path)
    assert calls["xattn"] > 0, "the fusion did not take the fused op"
    assert (calls["onednn"] > 0) == (path == "eval_nograd"), calls
    assert _modified(seen) == []
    if path != "train":
        _assert_logits(y.detach(), ref.eval(), _x())


# ---------------------------------------------------------------------------------------------
# 3. activation checkpointing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("which", WHICH)
def test_checkpoint_whole_model(which, reentrant):
    from torch.utils.checkpoint import checkpoint
    ref, model = _pair(which, drop_path_rate=0.1)
    x = _x(requires_grad=True)
    model.train()
    torch.manual_seed(5)
    g_plain = _grads(model, x)
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    y = checkpoint(model, x, use_reentrant=reentrant)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_plain[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("which", WHICH)
def test_checkpoint_wrapper_per_block_as_fsdp(which):
    """FSDP / Lightning's per-block activation checkpointing (non-reentrant checkpoint_wrapper on
    every encoder and fusion block): gradients within timm's criterion."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from timm.models.vision_transformer import Block as TimmBlock
    ref, model = _pair(which, depth=((1, 1, 1),))
    kinds = (TimmBlock, tc.CrossAttentionBlock, ckm.Block, ckm.CrossAttentionBlock)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kinds))
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 4, wrapped
    x = _x()
    g = {n.replace("._checkpoint_wrapped_module", ""): v for n, v in _grads(model.train(), x).items()}
    _assert_grads(g, ref, x)


def _saved_bytes(model, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.square().sum().backward()
    return total[0], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_set_grad_checkpointing_checkpoints_each_encoder_block():
    _, model = _pair("ours", depth=((1, 2, 0), (1, 2, 0)))
    model.train()
    x = _x()
    plain, g_plain = _saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    assert all(b.grad_checkpointing for b in model.blocks)
    ckpt, g_ckpt = _saved_bytes(model, x)
    assert ckpt < 0.5 * plain, f"saved {ckpt} bytes with checkpointing vs {plain} without"
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    # timm's test: forward_intermediates gives the same features with checkpointing on
    out, _ = model.forward_intermediates(x)
    model.set_grad_checkpointing(False)
    out2, _ = model.forward_intermediates(x)
    for a, b in zip(out, out2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. TorchScript: trace and script
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("which", WHICH)
def test_jit_trace(which, grad):
    ref, model = _pair(which, multi_conv=grad)
    model.eval()
    x = _x()
    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        _assert_logits(traced(_x(2)), ref.eval(), _x(2))
    if grad:
        model.zero_grad(set_to_none=True)
        (traced(x) * torch.linspace(-1, 1, 5)).sum().backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        _assert_grads(g, ref, x, train=False)


@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
@pytest.mark.parametrize("which", WHICH)
def test_jit_script_save_load(which, multi_conv, tmp_path):
    """torch.jit.script runs timm's math (the fused ops' Python dispatch is not scriptable), so the
    scripted model gives timm's logits; it saves, loads and keeps the eager model as it was."""
    ref, model = _pair(which, multi_conv=multi_conv)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    assert which != "patched" or is_patched(model)
    torch.jit.save(scripted, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = _x()
    with torch.no_grad():
        y_ref = ref.eval()(x)
        torch.testing.assert_close(scripted(x), y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x), y_ref, rtol=1e-5, atol=1e-6)
        _assert_logits(model(x), ref, x)
    with pytest.raises((RuntimeError, torch.jit.Error), match="expected images of shape" if which == "ours" else ""):
        scripted(torch.randn(1, 4, 48, 48))


def test_jit_script_other_fusions_say_so():
    m = ck.CrossViT(**_ARGS, fusion="class_token")
    with pytest.raises(RuntimeError, match="supports the fusions"):
        torch.jit.script(m)
    torch.jit.script(ck.CrossViT(**_ARGS, fusion="none"))


# ---------------------------------------------------------------------------------------------
# 6. torch.fx: symbolic_trace, feature extraction, FX + TorchScript
# ---------------------------------------------------------------------------------------------

def _leaf_targets(gm):
    return {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
@pytest.mark.parametrize("which", WHICH)
def test_fx_symbolic_trace_keeps_fused_ops_as_leaves(which, multi_conv):
    ref, model = _pair(which, multi_conv=multi_conv)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    leaves = _leaf_targets(gm)
    assert "cross_attention_block_op" in leaves
    assert ("conv_tokens" if multi_conv else "patch_embed_op") in leaves
    x = _x()
    with torch.no_grad():
        _assert_logits(gm(x), ref.eval(), x)
    model.train()
    gm = torch.fx.symbolic_trace(model)
    g = _grads(gm, x)
    g = {n: g[n] for n, _ in model.named_parameters()}
    _assert_grads(g, ref, x)


def _timm_fx_model(model, train=False):
    """timm's tests/test_models.py::_create_fx_model: torchvision's create_feature_extractor with
    timm's tracer arguments, returning the graph's last node."""
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names
    from timm.models import get_notrace_functions, get_notrace_modules
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kw).trace(model)
        nodes = list(reversed(graph.nodes))
        outs = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(o)] for o in outs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kw)


@pytest.mark.parametrize("which", WHICH)
def test_fx_timm_tests_routes(which):
    """timm's test_model_forward_fx, test_model_backward_fx and test_model_forward_fx_torchscript."""
    pytest.importorskip("torchvision")
    ref, model = _pair(which)
    x = _x(1)
    with torch.inference_mode():
        fx = _timm_fx_model(model.eval())
        _assert_logits(tuple(fx(x).values())[0].clone(), ref.eval(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_timm_fx_model(model))
    with torch.inference_mode():
        torch.testing.assert_close(tuple(scripted(x).values())[0], ref(x), rtol=1e-5, atol=1e-6)
    fx = _timm_fx_model(model.train(), train=True)
    out = torch.cat(tuple(fx(_x(2)).values()))
    out.mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


@pytest.mark.parametrize("which", WHICH)
def test_fx_feature_extraction_by_timm_node_names(which):
    """timm's create_feature_extractor with node names taken from timm's own graph."""
    from timm.models._features_fx import create_feature_extractor
    ref, model = _pair(which)
    nodes = {"blocks.0.revert_projs.1.2": "cls1", "norm.0": "norm0", "blocks.0.blocks.1.0.mlp.fc2": "fc2"}
    x = _x()
    with torch.no_grad():
        want = create_feature_extractor(ref.eval(), nodes)(x)
        got = create_feature_extractor(model.eval(), nodes)(x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# 5. torch.func: grad and vmap (per-sample gradients)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", WHICH)
def test_torch_func_per_sample_grads(which):
    from torch.func import functional_call, grad, vmap
    ref, model = _pair(which, multi_conv=which == "ours")
    model.eval()
    x, target = _x(3), torch.tensor([1, 4, 0])

    def loss(params, xi, ti, m):
        return nn.functional.cross_entropy(functional_call(m, params, (xi.unsqueeze(0),)), ti.unsqueeze(0))
    params = {n: p.detach() for n, p in model.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, None))(params, x, target, model)
    ref32, ref64 = ref.eval(), copy.deepcopy(ref).double().eval()
    for i in range(3):
        g32, g64 = ({n: g for n, g in _grads(m, x[i:i + 1], lambda y: nn.functional.cross_entropy(
            y, target[i:i + 1])).items()} for m in (ref32, ref64))
        for n in g64:
            e, e_ref = max_err(per_sample[n][i], g64[n]), max_err(g32[n], g64[n])
            assert e <= 3 * e_ref + 1e-6 * max(1e-3, float(g64[n].abs().max())), f"sample {i} d {n}: {e:.3g}"
    # vmap without grad (batched inference) and jacrev of the logits w.r.t. the input
    with torch.no_grad():
        y = vmap(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0))(x)
    _assert_logits(y, ref, x)
    jac = torch.func.jacrev(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x[0])
    assert jac.shape == (5, 3, 48, 48) and torch.isfinite(jac).all()


# ---------------------------------------------------------------------------------------------
# 7. a batch of 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ck.list_models())
def test_empty_batch_every_variant(name):
    """timm gives a (0, 1000) output for every variant, at inference and in training mode: so do
    ours and the patched model. (Built on the meta device and allocated uninitialised: with an
    empty batch no weight value matters, and nothing needs initialising.)"""
    px = ck.models.MODEL_CONFIGS[name]["img_size"]
    x = torch.zeros(0, 3, px, px)
    patched = ck.patch_timm(timm.create_model(name, device="meta").to_empty(device="cpu"))
    ours = ck.create_model(name, device="meta").to_empty(device="cpu")
    for model in (patched, ours):
        with torch.no_grad():
            assert model.eval()(x).shape == (0, 1000)
        assert model.train()(x).shape == (0, 1000)


@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
@pytest.mark.parametrize("which", WHICH)
def test_empty_batch_backward(which, multi_conv):
    """The backward of an empty batch works as timm's: zero gradients for every parameter."""
    ref, model = _pair(which, multi_conv=multi_conv)
    x = torch.zeros(0, 3, 48, 48, requires_grad=True)
    for m in (ref, model):
        y = m.train()(x)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert x.grad.shape == x.shape and not x.grad.any()
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        x.grad = None


# ---------------------------------------------------------------------------------------------
# 8. use_backend per thread and per asyncio task
# ---------------------------------------------------------------------------------------------

def test_use_backend_per_thread():
    """Two threads inside overlapping ``with use_backend`` blocks each see their own backend: the
    one under "reference" computes timm's logits bit for bit, the other the fused ones."""
    ref, model = _pair("ours")
    model.eval()
    x = _x()
    with torch.no_grad():
        expect = ref.eval()(x)
    inside = threading.Barrier(2)
    results, errors = {}, []

    def work(name):
        try:
            with ck.use_backend(name):
                inside.wait(timeout=30)          # both threads are inside their blocks now
                with torch.no_grad():
                    results[name] = (ck.backends.get_default_backend(), model(x))
                inside.wait(timeout=30)          # neither has left its block yet
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(n,)) for n in ("reference", "torch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["reference"][0] == "reference" and results["torch"][0] == "torch"
    assert torch.equal(results["reference"][1], expect)
    _assert_logits(results["torch"][1], ref, x)
    assert ck.backends.get_default_backend() == "auto"


def test_use_backend_per_asyncio_task():
    seen = {}

    async def task(name, entered, other_entered):
        with ck.use_backend(name):
            entered.set()
            await other_entered.wait()           # the other task's block is open too
            await asyncio.sleep(0)
            seen[name] = ck.backends.get_default_backend()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        outside = asyncio.create_task(asyncio.sleep(0, result="x"))
        with ck.use_backend("reference"):
            inner = asyncio.create_task(_current())   # created inside: inherits the block's backend
        await asyncio.gather(task("reference", a, b), task("torch", b, a), outside)
        seen["inner"] = await inner
        seen["main"] = ck.backends.get_default_backend()

    async def _current():
        await asyncio.sleep(0)
        return ck.backends.get_default_backend()
    asyncio.run(main())
    assert seen == {"reference": "reference", "torch": "torch", "inner": "reference", "main": "auto"}


# ---------------------------------------------------------------------------------------------
# features_only, patch_timm on wrappers, pretrained=True
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(out_indices=(0, 1)), dict(feature_cls="getter", out_indices=(-1,)),
                                dict(feature_cls="fx")], ids=["default", "all", "last", "fx"])
def test_features_only_like_timm(kw):
    arch = dict(depth=((1, 1, 0),), img_size=48, img_scale=(1.0, 1.0), embed_dim=(24, 48), num_heads=(2, 4))
    torch.manual_seed(0)
    tf = timm.create_model("crossvit_tiny_240", features_only=True, **arch, **kw).eval()
    of = ck.create_model("crossvit_tiny_240", features_only=True, **arch, **kw).eval()
    # a traced feature graph (feature_cls="fx") holds no CrossVit to patch: timm's graph as it is
    pf = copy.deepcopy(tf) if kw.get("feature_cls") == "fx" else ck.patch_timm(copy.deepcopy(tf))
    assert type(of) is type(tf) and (kw.get("feature_cls") == "fx" or is_patched(pf.model))
    of.load_state_dict(tf.state_dict())
    assert of.feature_info.channels() == tf.feature_info.channels()
    assert of.feature_info.reduction() == tf.feature_info.reduction()
    assert of.pretrained_cfg == tf.pretrained_cfg
    x = _x()
    with torch.no_grad():
        want, got, got_p = tf(x), of(x), pf(x)
    if isinstance(want, dict):
        want, got, got_p = list(want.values()), list(got.values()), list(got_p.values())
    assert len(got) == len(want) == len(got_p)
    for a, b, c in zip(got, want, got_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5)
    if kw.get("feature_cls") != "fx":
        ck.unpatch_timm(pf)
        assert not any(is_patched(m) for m in pf.modules())


def test_patch_timm_any_container():
    a, b = _timm(), _timm(multi_conv=True)
    box = nn.ModuleDict(dict(a=a, b=nn.Sequential(b)))
    assert ck.patch_timm(box) is box and is_patched(a) and is_patched(b)
    with pytest.raises(TypeError, match="or a module containing one"):
        ck.patch_timm(nn.Sequential(nn.Linear(2, 2)))


_PRETRAINED_CHILD = r"""
import sys, torch, timm, crossvit_kernels as ck
torch.set_num_threads(1)
from safetensors.torch import load_file
kw = dict(depth=((1, 1, 0),), embed_dim=(24, 48), num_heads=(2, 4))
sd = load_file(sys.argv[1])
x = torch.randn(1, 3, 240, 240)
t = timm.create_model("crossvit_tiny_240", pretrained=True, **kw).eval()
for m in (ck.create_model("crossvit_tiny_240", pretrained=True, **kw), ck.create_model("crossvit_tiny_240.in1k",
          pretrained=True, **kw), ck.patch_timm(timm.create_model("crossvit_tiny_240", pretrained=True, **kw))):
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items()), "weights differ from the cache's"
    assert m.pretrained_cfg == t.pretrained_cfg
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), t(x), rtol=1e-4, atol=1e-5)
f = ck.create_model("crossvit_tiny_240", pretrained=True, features_only=True, **kw)
assert torch.equal(f.model.pos_embed_1, sd["pos_embed_1"])
c = ck.create_model("crossvit_tiny_240", pretrained=True, num_classes=3, **kw)
assert c.head[0].out_features == 3 and torch.equal(c.pos_embed_0, sd["pos_embed_0"])
try:
    ck.create_model("crossvit_9_240", pretrained=True)
except Exception as exc:   # not in the offline cache: the hub's error, as timm's
    print("missing:", type(exc).__name__)
else:
    raise AssertionError("crossvit_9_240 is not in the cache")
print("ok")
"""


def test_pretrained_true_from_offline_hf_cache(tmp_path):
    """create_model(name, pretrained=True) finds and loads timm's published weights the way
    timm.create_model does: here from a Hugging Face cache the test fills itself (a small
    checkpoint under timm's tag for crossvit_tiny_240), offline."""
    pytest.importorskip("huggingface_hub")
    st = pytest.importorskip("safetensors.torch")
    kw = dict(depth=((1, 1, 0),), embed_dim=(24, 48), num_heads=(2, 4))
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model("crossvit_tiny_240", **kw).state_dict().items()}
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}     # not an initialisation
    hub = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--timm--crossvit_tiny_240.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    st.save_file(sd, str(repo / "snapshots" / commit / "model.safetensors"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(ck.__file__)),
                                                       os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _PRETRAINED_CHILD, str(repo / "snapshots" / commit /
                                                                       "model.safetensors")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]


_COMPILE_FIRST_CHILD = r"""
import sys, torch, crossvit_kernels as ck
sys.path.insert(0, sys.argv[1])
from helpers import tiny_images, tiny_pair
ref, model = tiny_pair(sys.argv[2])
x = tiny_images(2)
compiled = torch.compile(model.eval(), fullgraph=True, backend="aot_eager")   # the process's first call
with torch.no_grad():
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("which", WHICH)
def test_compile_fullgraph_as_first_call(which):
    """torch.compile(fullgraph=True) traces the first call of a fresh process, where the backends
    are not loaded yet (their loading takes a lock and an import, which Dynamo cannot trace): no
    graph break, and the result is eager's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(ck.__file__)),
                                                                   os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST_CHILD, os.path.dirname(__file__), which],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# still working: torch.export with a dynamic batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", WHICH)
def test_export_dynamic_batch(which):
    ref, model = _pair(which)
    model.eval()
    ep = torch.export.export(model, (_x(2),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    with torch.no_grad():
        _assert_logits(ep.module()(_x(5)), ref.eval(), _x(5))
