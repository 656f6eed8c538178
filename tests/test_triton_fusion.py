"""Backend ``triton``: the whole cross-attention fusion stage of a multi-scale block as one op
(crossvit_kernels/ops/fusion.py, crossvit_kernels/backends/triton/fusion.py).

Criteria (tests/helpers.py): the op's outputs and every gradient against the float64 textbook
oracle with the flash-attention criterion (at most FACTOR / GRAD_FACTOR times the same-dtype
textbook reference's error); bitwise determinism; agreement across split counts; every buffer
written (NaN-poisoned allocations); eager, torch.compile and torch.export run the same op. Without
a GPU the kernels run under the interpreter (small shapes). The budgets (launches, bytes, registers,
the split planner, saved tensors) are in test_triton_budgets.py.
"""
from __future__ import annotations

import pytest
import torch

from helpers import FACTOR, GRAD_FACTOR, HAS_GPU, assert_close, assert_within_ref_error, poison_, requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _fusion_kernels():
    from crossvit_kernels.backends.triton import fusion as FS
    return FS


def _core():
    from crossvit_kernels.backends.triton import cross_attention as K
    return K


def _ops():
    from crossvit_kernels.ops import fusion as OF
    return OF


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts NaN-filled: an element no kernel writes fails."""
    K = _core()
    real = K._empty

    def empty(shape, dtype, device):
        t = real(shape, dtype, device)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(K, "_empty", empty)
    return K


def stage_inputs(B, N0, C0, N1, C1, H0, H1, dtype=torch.float32, bias=True, seed=0, device=DEVICE,
                 requires_grad=True):
    """Fresh random inputs of the stage: branches x0 (B, 1 + N0, C0), x1 (B, 1 + N1, C1) with
    per-token offsets and scales (as activations have), both directions' parameters. Direction 0
    attends over branch 1 with H0 heads (H0 divides C1), direction 1 over branch 0 with H1."""
    from crossvit_kernels.backends.base import FUSION_PARAMS
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def branch(n, c):
        return r(B, 1 + n, c) * (0.5 + r(B, 1 + n, 1).abs()) + r(B, 1 + n, 1)

    x0, x1 = branch(N0, C0), branch(N1, C1)
    params = []
    for Ci, Cj in ((C0, C1), (C1, C0)):
        p = dict(f_ln_w=1 + r(Ci, scale=0.2), f_ln_b=r(Ci, scale=0.2), f_w=r(Cj, Ci, scale=Ci ** -0.5),
                 f_b=r(Cj, scale=0.1), n_w=1 + r(Cj, scale=0.2), n_b=r(Cj, scale=0.2),
                 wq=r(Cj, Cj, scale=Cj ** -0.5), bq=r(Cj, scale=0.1), wk=r(Cj, Cj, scale=Cj ** -0.5),
                 bk=r(Cj, scale=0.1), wv=r(Cj, Cj, scale=Cj ** -0.5), bv=r(Cj, scale=0.1),
                 wo=r(Cj, Cj, scale=Cj ** -0.5), bo=r(Cj, scale=0.1), g_ln_w=1 + r(Cj, scale=0.2),
                 g_ln_b=r(Cj, scale=0.2), g_w=r(Ci, Cj, scale=Cj ** -0.5), g_b=r(Ci, scale=0.1))
        if not bias:
            p.update(bq=None, bk=None, bv=None)
        params += [p[n] for n in FUSION_PARAMS]

    def leaf(t):
        if t is None:
            return None
        return t.to(dtype).to(device).requires_grad_(requires_grad)

    return dict(x0=leaf(x0), x1=leaf(x1), params=[leaf(p) for p in params], heads=[H0, H1], eps=[1e-6] * 6)


def upcast(inp, dtype=torch.float64):
    def up(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
    return dict(inp, x0=up(inp["x0"]), x1=up(inp["x1"]), params=[up(p) for p in inp["params"]])


def grad_out_like(inp, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(inp[k].shape, generator=g, dtype=torch.float64).to(inp[k].device) for k in ("x0", "x1")]


def run(inp, backend, douts=None):
    """(outputs, {name: grad}) of the stage: the op on ``backend``, or the textbook reference."""
    OF = _ops()
    args = (inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"])
    outs = OF.fusion_stage(*args, backend=backend) if backend != "textbook" else OF.fusion_stage_reference(*args)
    grads = {}
    if douts is not None:
        names = ["x0", "x1"] + [f"p{k}" for k in range(len(inp["params"]))]
        leaves = [inp["x0"], inp["x1"]] + list(inp["params"])
        live = [(n, t) for n, t in zip(names, leaves) if t is not None and t.requires_grad]
        gs = torch.autograd.grad(outs, [t for _, t in live], [d.to(o.dtype) for d, o in zip(douts, outs)],
                                 allow_unused=True)
        grads = {n: g for (n, _), g in zip(live, gs)}
    return outs, grads


def check_stage(inp, dtype):
    """The triton op against the float64 oracle, with the same-dtype textbook reference's error
    as the yardstick; every gradient."""
    douts = grad_out_like(inp)
    outs, grads = run(inp, "triton", douts)
    ref_outs, ref_grads = run(inp, "textbook", douts)
    ora_outs, ora_grads = run(upcast(inp), "textbook", douts)
    for k in range(2):
        assert outs[k].dtype == dtype and outs[k].shape == inp[f"x{k}"].shape
        assert_within_ref_error(outs[k], ref_outs[k], ora_outs[k], dtype, name=f"out{k}", factor=FACTOR)
        # the patch tokens pass through unchanged, bit for bit
        assert torch.equal(outs[k][:, 1:], inp[f"x{k}"][:, 1:].detach())
    assert set(grads) == set(ora_grads)
    for name, o in ora_grads.items():
        got, ref = grads[name], ref_grads[name]
        assert got is not None, name
        if ref is None:                       # b_k: the textbook graph leaves it unused in low precision
            ref = torch.zeros_like(got)
        assert_within_ref_error(got, ref, o, dtype, name=f"d{name}", factor=GRAD_FACTOR)
    return outs, grads


# ---------------------------------------------------------------------------------------------
# agreement with the float64 oracle
# ---------------------------------------------------------------------------------------------

SHAPES = [
    # (B, N0, C0, N1, C1, H0, H1, qkv bias, forced splits)
    pytest.param(3, 20, 24, 9, 48, 4, 3, True, None, id="small"),
    pytest.param(17, 6, 20, 4, 36, 3, 5, False, None, id="B17-odd-C-no-qkv-bias"),
    pytest.param(2, 0, 16, 5, 32, 2, 1, True, None, id="no-patch-tokens-one-head"),
    pytest.param(2, 70, 24, 40, 40, 5, 3, True, "3", id="3-splits"),
]


@pytest.mark.parametrize("B,N0,C0,N1,C1,H0,H1,bias,splits", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stage_matches_oracle(poisoned, monkeypatch, B, N0, C0, N1, C1, H0, H1, bias, splits, dtype):
    if splits is not None:
        monkeypatch.setenv(_core().SPLITS_ENV, splits)
    check_stage(stage_inputs(B, N0, C0, N1, C1, H0, H1, dtype, bias=bias), dtype)


def test_stage_key_bias_gradient_is_exactly_zero():
    inp = stage_inputs(2, 8, 16, 5, 32, 2, 2, torch.float32)
    _, grads = run(inp, "triton", grad_out_like(inp))
    for k in (9, 18 + 9):                                    # bk of each direction
        assert torch.count_nonzero(grads[f"p{k}"]) == 0


# ---------------------------------------------------------------------------------------------
# determinism, splits, inputs left alone
# ---------------------------------------------------------------------------------------------

def _bits(t):
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stage_bitwise_deterministic(monkeypatch, dtype):
    """Same inputs, same bits, forward and every gradient: the splits are merged and the batch
    reduced in a fixed order, and no float atomics are used (launch C's counters are integers)."""
    monkeypatch.setenv(_core().SPLITS_ENV, "3")
    inp = stage_inputs(3, 70, 24, 40, 40, 5, 3, dtype)
    douts = grad_out_like(inp)
    first = run(inp, "triton", douts)
    second = run(inp, "triton", douts)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(_bits(a), _bits(b))
    for name in first[1]:
        assert torch.equal(_bits(first[1][name]), _bits(second[1][name])), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stage_agrees_across_split_counts(monkeypatch, dtype):
    """One split and four give results that agree within the dtype's criterion (each against the
    oracle), and in float32 to float32 rounding."""
    inp = stage_inputs(2, 70, 24, 40, 40, 5, 3, dtype)
    douts = grad_out_like(inp)
    results = {}
    for s in ("1", "4"):
        monkeypatch.setenv(_core().SPLITS_ENV, s)
        results[s] = run(inp, "triton", douts)
    ref = run(inp, "textbook", douts)
    ora = run(upcast(inp), "textbook", douts)
    for s, (outs, grads) in results.items():
        for k in range(2):
            assert_within_ref_error(outs[k], ref[0][k], ora[0][k], dtype, name=f"out{k} ({s} splits)")
        for name in grads:
            r = ref[1][name] if ref[1][name] is not None else torch.zeros_like(grads[name])
            assert_within_ref_error(grads[name], r, ora[1][name], dtype, name=f"d{name} ({s} splits)",
                                    factor=GRAD_FACTOR)
    if dtype == torch.float32:
        for name in results["1"][1]:
            a, b = results["1"][1][name], results["4"][1][name]
            assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=1e-5, name=name)


def test_stage_never_writes_its_inputs():
    inp = stage_inputs(2, 10, 16, 6, 32, 2, 2, torch.bfloat16)
    before = [t.detach().clone() for t in [inp["x0"], inp["x1"]] + inp["params"] if t is not None]
    run(inp, "triton", grad_out_like(inp))
    after = [t.detach() for t in [inp["x0"], inp["x1"]] + inp["params"] if t is not None]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# an empty batch: the textbook composition, never a backend (they take B >= 1)
# ---------------------------------------------------------------------------------------------

def _check_empty_stage(inp, outs, grads):
    """Empty outputs of the inputs' shapes and dtype; every gradient of its leaf's shape, zero."""
    for k in range(2):
        assert outs[k].shape == inp[f"x{k}"].shape and outs[k].dtype == inp[f"x{k}"].dtype
    leaves = dict(x0=inp["x0"], x1=inp["x1"], **{f"p{k}": p for k, p in enumerate(inp["params"])})
    assert set(grads) == {n for n, t in leaves.items() if t is not None}
    for name, g in grads.items():
        assert g is not None and g.shape == leaves[name].shape, name
        assert torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
def test_stage_empty_batch_launches_no_kernel(bias):
    """B = 0 on the triton backend runs the textbook composition: no kernel is launched, the
    outputs are empty with the inputs' shapes, the backward gives zero gradients of every shape."""
    from budget_tools import TritonLaunches
    inp = stage_inputs(0, 5, 16, 4, 32, 2, 2, torch.float32, bias=bias)
    with TritonLaunches() as launches:
        outs, grads = run(inp, "triton", grad_out_like(inp))
    assert launches.names == []
    _check_empty_stage(inp, outs, grads)


def test_stage_empty_batch_never_reaches_a_backend(monkeypatch):
    """Whichever backend declares the stage, named or picked by auto, B = 0 never calls it (a
    stand-in for "torch" that declares the stage and fails when called; B = 1 does call it)."""
    from crossvit_kernels import backends
    from crossvit_kernels.backends.pytorch import TorchBackend

    class StageBackend(TorchBackend):
        dtypes = dict(TorchBackend.dtypes, fusion_stage=(torch.float32,))

        def fusion_stage_forward(self, *args):
            raise AssertionError(f"the {self.name} backend's fusion stage was called")

        fusion_stage_backward = fusion_stage_forward

    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded, torch=StageBackend()))
    for backend in ("torch", "auto"):
        inp = stage_inputs(0, 5, 16, 4, 32, 2, 2, torch.float32, device="cpu")
        _check_empty_stage(inp, *run(inp, backend, grad_out_like(inp)))
        with pytest.raises(AssertionError, match="fusion stage was called"):
            run(stage_inputs(1, 5, 16, 4, 32, 2, 2, torch.float32, device="cpu"), backend)


def test_model_fusion_empty_batch_launches_no_kernel():
    """A multi-scale block's fusion of an empty batch under use_backend("triton"): no kernel,
    the per-piece path's empty outputs and zero gradients."""
    from budget_tools import TritonLaunches

    import crossvit_kernels as ck
    from crossvit_kernels.models.fusion import fuse_cross_attention
    m = _multiscale_block(torch.float32)
    xs = [torch.randn(0, 21, 24, device=DEVICE, requires_grad=True),
          torch.randn(0, 10, 48, device=DEVICE, requires_grad=True)]
    with ck.use_backend("triton"), TritonLaunches() as launches:
        outs = fuse_cross_attention(m.projs, m.fusion, m.revert_projs, xs)
    assert launches.names == []
    assert [o.shape for o in outs] == [x.shape for x in xs]
    grads = torch.autograd.grad(outs, xs + list(m.parameters()), [torch.ones_like(o) for o in outs])
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# the model's fusion takes the op; eager, torch.compile and torch.export agree
# ---------------------------------------------------------------------------------------------

def _multiscale_block(dtype, qkv_bias=True):
    from crossvit_kernels.models.crossvit import MultiScaleBlock
    torch.manual_seed(0)
    m = MultiScaleBlock(dim=(24, 48), patches=(20, 9), depth=(0, 0, 0), num_heads=(4, 3), mlp_ratio=(2, 2, 1),
                        qkv_bias=qkv_bias, drop_path=[0.0])
    with torch.no_grad():
        for p in m.parameters():                             # non-trivial LayerNorm affines
            p.add_(torch.randn_like(p) * 0.1)
    return m.to(DEVICE, dtype)


def test_model_fusion_runs_the_stage_op():
    """A multi-scale block's fusion under use_backend("triton") runs the stage (three launches,
    each both directions) and matches the per-piece path (backend "torch", which does not declare
    the stage) on outputs and every gradient."""
    from budget_tools import TritonLaunches

    import crossvit_kernels as ck
    from crossvit_kernels.models.fusion import fuse_cross_attention
    m = _multiscale_block(torch.float32)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 21, 24, generator=g).to(DEVICE).requires_grad_(),
          torch.randn(2, 10, 48, generator=g).to(DEVICE).requires_grad_()]
    douts = [torch.randn(x.shape, generator=g).to(DEVICE) for x in xs]
    leaves = xs + list(m.parameters())
    results = {}
    for name in ("triton", "torch"):
        with ck.use_backend(name), TritonLaunches() as launches:
            outs = fuse_cross_attention(m.projs, m.fusion, m.revert_projs, xs)
        results[name] = (outs, torch.autograd.grad(outs, leaves, douts, allow_unused=True), launches.names)
    assert results["triton"][2] == ["_fs_prologue_kernel", "_stream_fwd_kernel", "_fs_epilogue_kernel"]
    for a, b in zip(results["triton"][0], results["torch"][0]):
        assert_close(a, b, atol=2e-5, rtol=2e-5, name="out")
    for a, b in zip(results["triton"][1], results["torch"][1]):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close(a, b, atol=2e-5 * max(1.0, float(b.abs().max())), rtol=2e-5, name="grad")


def test_model_fusion_keeps_the_per_piece_path_where_the_stage_does_not_apply():
    """Attention dropout in training, or the reference backend: no stage op (and the same math)."""
    from budget_tools import TritonLaunches

    import crossvit_kernels as ck
    from crossvit_kernels.models.fusion import fuse_cross_attention
    m = _multiscale_block(torch.float32)
    xs = [torch.randn(2, 21, 24, device=DEVICE), torch.randn(2, 10, 48, device=DEVICE)]
    with ck.use_backend("reference"), TritonLaunches() as launches:
        fuse_cross_attention(m.projs, m.fusion, m.revert_projs, xs)
    assert launches.names == []
    m.train()
    m.fusion[0].attn.attn_drop.p = 0.1
    with ck.use_backend("triton"), TritonLaunches() as launches:
        fuse_cross_attention(m.projs, m.fusion, m.revert_projs, xs)
    assert "_fs_prologue_kernel" not in launches.names


def _compile_and_compare(backend):
    OF = _ops()
    inp = stage_inputs(2, 12, 24, 7, 32, 4, 3, torch.float32)
    douts = grad_out_like(inp)
    leaves = [inp["x0"], inp["x1"]] + inp["params"]

    def fn(x0, x1, *params):
        outs = OF.fusion_stage(x0, x1, list(params), inp["heads"], inp["eps"], backend="triton")
        return sum((o * d.to(o.dtype)).sum() for o, d in zip(outs, douts))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = fn(*leaves)
    eager = torch.autograd.grad(eager_loss, leaves)
    assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5, name="loss")
    for a, e in zip(grads, eager):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name="grad")


def test_stage_torch_compile_fullgraph_aot_eager():
    _compile_and_compare("aot_eager")


def test_stage_torch_compile_fullgraph_inductor():
    _compile_and_compare("inductor")


def test_stage_torch_export_holds_the_op():
    OF = _ops()
    inp = stage_inputs(2, 12, 24, 7, 32, 4, 3, torch.float32, requires_grad=False)

    class Stage(torch.nn.Module):
        def forward(self, x0, x1):
            return OF.fusion_stage(x0, x1, inp["params"], inp["heads"], inp["eps"], backend="triton")

    ep = torch.export.export(Stage(), (inp["x0"], inp["x1"]))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("fusion_stage" in t for t in targets), targets
    got = ep.module()(inp["x0"], inp["x1"])
    exp = Stage()(inp["x0"], inp["x1"])
    for a, b in zip(got, exp):
        assert torch.equal(a, b)


def test_launch_c_protocol_matches_two_launches(monkeypatch):
    """Launch C's ticket protocol (rows then tiles in one launch) gives the bits of its two-launch
    fallback (SEQUENTIAL_C_ENV), and leaves its counters at zero for the next launch."""
    FS = _fusion_kernels()
    inp = stage_inputs(17, 20, 24, 9, 48, 4, 3, torch.bfloat16)
    douts = grad_out_like(inp)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(FS.SEQUENTIAL_C_ENV, flag)
        results[flag] = run(inp, "triton", douts)[1]
    for name in results["0"]:
        assert torch.equal(_bits(results["0"][name]), _bits(results["1"][name])), name
    for counters in FS._COUNTERS.values():
        assert int(counters.abs().sum()) == 0


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_stage_crossvit18(B):
    """On a GPU: CrossViT-18's stage (branches (401, 224) and (197, 448), 7 heads), bfloat16, the
    planner's splits, against the float64 oracle; twice, with the same bits."""
    inp = stage_inputs(B, 400, 224, 196, 448, 7, 7, torch.bfloat16)
    outs, grads = check_stage(inp, torch.bfloat16)
    again = run(inp, "triton", grad_out_like(inp))
    for a, b in zip(outs, again[0]):
        assert torch.equal(_bits(a), _bits(b))
    for name in grads:
        assert torch.equal(_bits(grads[name]), _bits(again[1][name])), name
