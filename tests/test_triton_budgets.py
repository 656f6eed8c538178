"""The fusion stage's budgets, stated as tests that fail when broken (issue: fused kernels for the
whole fusion stage).

1. Launches per path: at most three Triton launches forward and three backward (parameter-gradient
   reductions included), and no other device kernel (no cast, zero-fill, clone, cat or
   slice_backward), in eager mode (the fast path and the registered op) and compiled (the AOT
   graphs hold the op and nothing else that computes; the compiled call launches the same six).
2. HBM bytes: the byte model (crossvit_kernels.backends.triton.fusion.stage_bytes) equals the
   unique addresses the kernels load and store under the interpreter, launch by launch; at the
   CrossViT-18 sizes (bf16, B = 256, the planner's splits on 132 and 78 SMs) it is within 1.15x the
   bytes-once floor forward and 1.3x forward + backward.
3. sm_90 (H100 / H200) compilation with the bundled Triton and the GPU machine's release: no register
   spills, at least two programs resident per SM (ptxas registers x threads, shared memory),
   bf16 / f16 MMA in the streaming kernels, no TF32 conversion anywhere.
4. The split planner for B = 1..1024 on 132 and 78 SMs: every split non-empty and tile-aligned, every
   SM busy when the work can be cut that fine, full waves, no program much larger than the mean.
5. Saved for backward: the inputs themselves and O(B * C) / O(B * H * C) float32 tensors, nothing
   of size O(B * N).
"""
from __future__ import annotations

import json
import operator
import os
import subprocess
import sys

import pytest
import torch

from budget_tools import AddressRecorder, TritonLaunches, kernel_ops
from helpers import HAS_GPU, TRITON_INTERPRET, compile_env, nvidia_compiler_reason, requires_triton, triton_installs
from test_triton_fusion import grad_out_like, stage_inputs

pytestmark = requires_triton

FWD = ["_fs_prologue_kernel", "_stream_fwd_kernel", "_fs_epilogue_kernel"]
BWD = ["_fs_bwd_a_kernel", "_fs_bwd_b_kernel", "_fs_bwd_c_kernel"]
SHAPE = (2, 12, 24, 7, 32, 4, 3)            # B, N0, C0, N1, C1, H0, H1 (interpreter-sized)


def _stage(inp, backend="triton"):
    from crossvit_kernels.ops.fusion import fusion_stage
    return fusion_stage(inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"], backend=backend)


def _leaves(inp):
    return [inp["x0"], inp["x1"]] + [p for p in inp["params"] if p is not None]


# ---------------------------------------------------------------------------------------------
# 1. launches per path
# ---------------------------------------------------------------------------------------------

class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active the op takes its registered route."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _count_fwd_bwd(inp, mode):
    douts = grad_out_like(inp)
    ctx = _Passthrough() if mode == "registered" else None

    def fwd():
        if ctx is None:
            return _stage(inp)
        with _Passthrough():
            return _stage(inp)

    outs, f_launches, f_ops = kernel_ops(fwd)
    leaves = _leaves(inp)
    douts = [d.to(o.dtype) for d, o in zip(douts, outs)]

    def bwd():
        return torch.autograd.grad(outs, leaves, douts)

    _, b_launches, b_ops = kernel_ops(bwd)
    return f_launches, f_ops, b_launches, b_ops


@pytest.mark.parametrize("mode", ["eager", "registered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_launches_eager(mode, dtype):
    """Eager fast path and registered op: 3 Triton launches forward, 3 backward, no other kernel."""
    inp = stage_inputs(*SHAPE, dtype)
    _count_fwd_bwd(inp, mode)                               # warm-up (the counters' one-time zeros)
    f_launches, f_ops, b_launches, b_ops = _count_fwd_bwd(inp, mode)
    assert f_launches == FWD and f_ops == [], (f_launches, f_ops)
    assert b_launches == BWD and b_ops == [], (b_launches, b_ops)


def test_launches_model_fusion():
    """The model's fusion (fuse_cross_attention on a multi-scale block's modules): the same six,
    and nothing else (no cat of the output branches, no slice_backward of the token gradients)."""
    import crossvit_kernels as ck
    from crossvit_kernels.models.fusion import fuse_cross_attention
    from test_triton_fusion import _multiscale_block
    m = _multiscale_block(torch.bfloat16)
    xs = [torch.randn(2, 21, 24, dtype=torch.bfloat16).requires_grad_(),
          torch.randn(2, 10, 48, dtype=torch.bfloat16).requires_grad_()]
    leaves = xs + list(m.parameters())
    def step():
        with ck.use_backend("triton"):
            outs, f_launches, f_ops = kernel_ops(lambda: fuse_cross_attention(m.projs, m.fusion, m.revert_projs, xs))
        douts = [torch.randn_like(o) for o in outs]
        _, b_launches, b_ops = kernel_ops(lambda: torch.autograd.grad(outs, leaves, douts))
        return f_launches, f_ops, b_launches, b_ops

    step()                                                  # the first call warms up
    f_launches, f_ops, b_launches, b_ops = step()
    assert f_launches == FWD and f_ops == [], (f_launches, f_ops)
    assert b_launches == BWD and b_ops == [], (b_launches, b_ops)


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
             "permute", "expand", "alias", "as_strided", "detach", "_reshape_alias"}


def _compute_nodes(gm):
    """call_function nodes of an FX graph that compute: not getitem, not views."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if name in _VIEW_OPS:
            continue
        out.append(str(n.target))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_launches_compiled(dtype):
    """torch.compile(fullgraph=True): the AOT forward graph computes with the stage op alone and
    the backward graph with its backward op alone; the compiled call launches the same six."""
    from torch._dynamo.backends.common import aot_autograd
    inp = stage_inputs(*SHAPE, dtype)
    leaves = _leaves(inp)
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm.forward
        return compiler

    def fn(x0, x1, *present):
        it = iter(present)
        params = [next(it) if p is not None else None for p in inp["params"]]
        return _stage(dict(inp, x0=x0, x1=x1, params=params))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    outs = compiled(*leaves)
    douts = [d.to(o.dtype) for d, o in zip(grad_out_like(inp), outs)]
    torch.autograd.grad(outs, leaves, douts)                # compiles the backward graph
    assert _compute_nodes(graphs["fw"]) == ["crossvit_kernels.fusion_stage.default"], graphs["fw"].graph
    assert _compute_nodes(graphs["bw"]) == ["crossvit_kernels.fusion_stage_backward.default"], graphs["bw"].graph
    with TritonLaunches() as f:
        outs = compiled(*leaves)
    with TritonLaunches() as b:
        torch.autograd.grad(outs, leaves, douts)
    assert f.names == FWD and b.names == BWD, (f.names, b.names)


# ---------------------------------------------------------------------------------------------
# 2. HBM bytes
# ---------------------------------------------------------------------------------------------

def _plans(B, N, C, dtype, sm_count=None, num_splits=None, H=7):
    from crossvit_kernels.backends.triton import cross_attention as K
    out = []
    for which in ("fwd", "bwd"):
        probs = [K.Problem(B, N[1 - d] - 1, C[1 - d], K.stream_config(which, C[1 - d], dtype).block_n,
                           torch.empty((), dtype=dtype).element_size(), H) for d in range(2)]
        if sm_count is None:
            out.append(K.launch_plan(probs, torch.device("cpu"), num_splits).splits)
        else:
            out.append(K.plan_splits(probs, sm_count, 2).splits)
    return out


@pytest.mark.skipif(not TRITON_INTERPRET, reason="records addresses under the Triton interpreter")
@pytest.mark.parametrize("bias,splits", [(True, None), (False, 2)], ids=["qkv-bias", "no-qkv-bias-2-splits"])
def test_byte_model_matches_the_kernels_traffic(bias, splits):
    """Launch by launch, the byte model's reads and writes equal the unique addresses the kernels
    load (less those they stored first) and store."""
    from crossvit_kernels.backends.triton import fusion as FS
    B, N0, C0, N1, C1, H0, H1 = 3, 70, 24, 40, 48, 3, 4
    inp = stage_inputs(B, N0, C0, N1, C1, H0, H1, torch.bfloat16, bias=bias, requires_grad=False)
    x0, x1, params, heads, eps = inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"]
    dout = [torch.randn_like(x0), torch.randn_like(x1)]
    with AddressRecorder() as rec:
        res = FS.fusion_stage_forward(x0, x1, params, heads, eps, num_splits=splits)
        FS.fusion_stage_backward(dout[0], dout[1], x0, x1, params, res[2:], heads, eps, num_splits=splits)
    pf, pb = _plans(B, (1 + N0, 1 + N1), (C0, C1), torch.bfloat16, num_splits=splits)
    if splits:
        assert max(pf) > 1 and max(pb) > 1                  # the split paths are exercised
    model = FS.stage_bytes(B, (1 + N0, 1 + N1), (C0, C1), heads, 2, pf, pb, qkv_bias=bias)
    keys = ["prologue", "stream", "epilogue", "rows_a", "stream_tiles", "rows_tiles"]
    got = rec.totals()
    assert [n for n, _, _ in got] == FWD[:1] + ["_stream_fwd_kernel"] + FWD[2:] + BWD
    for (name, r, w), k in zip(got, keys):
        assert (r, w) == model[k], f"{name}: read {r}, wrote {w}; the model says {model[k]}"


@pytest.mark.parametrize("sm_count", [132, 78])
@pytest.mark.parametrize("B", [256, 1024])
def test_bytes_within_the_floor_budget(sm_count, B):
    """CrossViT-18 (branches (401, 224) and (197, 448), 7 heads), bfloat16: the modelled bytes are
    at most 1.15x the floor forward and 1.3x forward + backward (the floors: tokens, parameters
    and their gradients once; the float32 CLS-side intermediates are the overhead). At these
    batches the planner takes one split per row; at small batches it splits the token axis to fill
    the GPU and the partials cost more bytes (up to 1.46x at B = 8), a trade for time."""
    from crossvit_kernels.backends.triton import fusion as FS
    N, C = (401, 197), (224, 448)
    pf, pb = _plans(B, N, C, torch.bfloat16, sm_count=sm_count)
    m = FS.stage_bytes(B, N, C, (7, 7), 2, pf, pb)
    fwd = sum(sum(m[k]) for k in ("prologue", "stream", "epilogue"))
    bwd = sum(sum(m[k]) for k in ("rows_a", "stream_tiles", "rows_tiles"))
    floor_f, floor_b = sum(m["floor_fwd"]), sum(m["floor_bwd"])
    assert fwd <= 1.15 * floor_f, (fwd / floor_f, pf, m)
    assert fwd + bwd <= 1.3 * (floor_f + floor_b), ((fwd + bwd) / (floor_f + floor_b), pb, m)


# ---------------------------------------------------------------------------------------------
# 3. sm_90 compilation: spills, programs per SM, tensor-core instructions
# ---------------------------------------------------------------------------------------------

#: (dtype, forced splits): the launches compiled, at the CrossViT-18 widths
COMPILE_CASES = [("bfloat16", None), ("bfloat16", 2), ("float16", None)]

_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from helpers import check_triton_version
version = check_triton_version()
import torch
import sm90
from test_triton_fusion import stage_inputs
from crossvit_kernels.backends.triton import fusion as FS
out = []
for dtype, splits in json.loads(sys.argv[1]):
    inp = stage_inputs(4, 400, 224, 196, 448, 7, 7, getattr(torch, dtype), requires_grad=False, device="cpu")
    args = (inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"])
    res, fwd = sm90.capture_launches(FS.fusion_stage_forward, *args, num_splits=splits)
    saved = [torch.zeros(t.shape, dtype=t.dtype) for t in res[2:]]
    douts = [torch.zeros_like(inp["x0"]), torch.zeros_like(inp["x1"])]
    _, bwd = sm90.capture_launches(FS.fusion_stage_backward, *douts, inp["x0"], inp["x1"], inp["params"], saved,
                                   inp["heads"], inp["eps"], num_splits=splits)
    for launch in fwd + bwd:
        r = sm90.compile_launch(launch)
        out.append(dict(r, dtype=dtype, splits=splits, triton=version))
print('RESULT' + json.dumps(out))
"""


@pytest.fixture(scope="module")
def stage_compiled():
    """{install: (returncode, stderr, [report])}: every launch of the stage's forward and backward
    captured from the launchers at the CrossViT-18 sizes and compiled for sm_90, one child process
    per Triton install (the interpreter off), side by side."""
    argv = [sys.executable, "-c", _CHILD, json.dumps(COMPILE_CASES), os.path.dirname(__file__)]
    procs = {name: subprocess.Popen(argv, env=compile_env(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, path in triton_installs()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=3000)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        out[name] = (proc.returncode, stderr, json.loads(lines[-1][len("RESULT"):]) if lines else [])
    return out


def _describe(r):
    return (f"{r['kernel']} {r['dtype']} splits={r['splits']} (Triton {r['triton']}): {r['registers']} registers, "
            f"{r['num_warps']} warps, spills {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared']} B, "
            f"{r['ctas_per_sm']} programs/SM, {r['ptx_mma']}")


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
@pytest.mark.parametrize("install", [name for name, _ in triton_installs()])
def test_stage_compiles_for_sm90_within_budget(stage_compiled, install):
    returncode, stderr, results = stage_compiled[install]
    assert returncode == 0 and results, f"compiling for sm_90 ({install}) failed:\n{stderr[-4000:]}"
    kernels = {r["kernel"] for r in results}
    assert kernels == set(FWD + BWD) | {"_stream_fwd_kernel"}, kernels
    print()
    for r in results:
        print("   ", _describe(r))
    bad = []
    for r in results:
        if r["spill_stores"] or r["spill_loads"]:
            bad.append("spills: " + _describe(r))
        if r["ctas_per_sm"] < 2:
            bad.append("fewer than two programs per SM: " + _describe(r))
        if r["ptx_tf32_cvt"]:
            bad.append("TF32 conversion: " + _describe(r))
        if r["kernel"] in ("_stream_fwd_kernel", "_fs_bwd_b_kernel"):
            kind = {"bfloat16": "bf16", "float16": "f16"}[r["dtype"]]
            if not r["ptx_mma"] or not all(f".{kind}.{kind}" in m for m in r["ptx_mma"]):
                bad.append(f"token tiles not on {kind} tensor cores: " + _describe(r))
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# 4. the split planner
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("sm_count", [132, 78])
def test_split_planner_properties(which, sm_count):
    """B = 1..1024, CrossViT-18's two problems (196 tokens of 448, 400 of 224), bfloat16 tiles."""
    from crossvit_kernels.backends.triton import cross_attention as K
    slots = 2 * sm_count
    for B in range(1, 1025):
        probs = [K.Problem(B, M, C, K.stream_config(which, C, torch.bfloat16).block_n, 2, 7)
                 for M, C in ((196, 448), (400, 224))]
        plan = K.plan_splits(probs, sm_count, 2)
        assert plan.programs == sum(p.B * S for p, S in zip(probs, plan.splits))
        for p, S, tps in zip(probs, plan.splits, plan.tokens_per_split):
            assert 1 <= S <= K.MAX_SPLITS and tps % p.block_n == 0, (B, plan)
            assert (S - 1) * tps < p.M <= S * tps, (B, plan)          # every split non-empty
        most = sum(B * -(-p.M // p.block_n) for p in probs)           # programs at one tile each
        assert plan.programs >= min(sm_count, most), (B, plan)        # every SM busy when possible
        if plan.programs > slots:                                      # full waves
            waves = -(-plan.programs // slots)
            assert plan.programs / (waves * slots) >= 0.6, (B, plan)
        # balanced: no program moves much more than the mean (its tokens and its row's operands);
        # the rest is the waves' quantisation (measured at most 1.32)
        sizes = []
        for p, S, t in zip(probs, plan.splits, plan.tokens_per_split):
            sizes += [(min(t, p.M - s * t) * p.C * p.elem + K._program_overhead(p, S > 1)) for s in range(S)] * p.B
        assert max(sizes) <= 1.4 * sum(sizes) / len(sizes), (B, plan)


# ---------------------------------------------------------------------------------------------
# 5. saved for backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eager", "registered"])
def test_saved_tensors(mode):
    """What autograd keeps: the inputs themselves (not copies) and FUSION_SAVED, O(B * C) or
    O(B * H * C) float32 per direction; nothing with a token axis."""
    B, N0, C0, N1, C1, H0, H1 = 3, 30, 24, 20, 32, 4, 3
    inp = stage_inputs(B, N0, C0, N1, C1, H0, H1, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "registered":
            with _Passthrough():
                _stage(inp)
        else:
            _stage(inp)
    inputs = {t.data_ptr() for t in _leaves(inp)}
    others = [t for t in saved if t.data_ptr() not in inputs]
    assert {inp["x0"].data_ptr(), inp["x1"].data_ptr()} <= {t.data_ptr() for t in saved}
    budget = B * sum(2 * H * Cj + 4 * Cj + H for H, Cj in ((H0, C1), (H1, C0)))
    assert sum(t.numel() for t in others) <= budget, [tuple(t.shape) for t in others]
    for t in others:
        assert t.dtype == torch.float32 and 1 + N0 not in t.shape and 1 + N1 not in t.shape, tuple(t.shape)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_launches_at_crossvit18():
    """On a GPU: CrossViT-18 at B = 256, bfloat16: the same six launches and no other kernel."""
    inp = stage_inputs(256, 400, 224, 196, 448, 7, 7, torch.bfloat16, device="cuda")
    _count_fwd_bwd(inp, "eager")
    f_launches, f_ops, b_launches, b_ops = _count_fwd_bwd(inp, "eager")
    assert f_launches == FWD and f_ops == [] and b_launches == BWD and b_ops == []


# ---------------------------------------------------------------------------------------------
# the patch embedding: one launch forward, at most two backward; its image loads are wide
# ---------------------------------------------------------------------------------------------

def _patch_inputs(dtype, B=2, Cin=3, H=24, W=36, C=24, ph=12, bias=True):
    g = torch.Generator().manual_seed(5)
    P = (H // ph) * (W // ph)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return [r(B, Cin, H, W), r(C, Cin, ph, ph, scale=(Cin * ph * ph) ** -0.5), r(C, scale=0.1) if bias else None,
            r(1 + P, C, scale=0.5), r(C, scale=0.5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("images_grad", [True, False], ids=["d-images", "no-d-images"])
def test_patch_embed_launches(dtype, images_grad):
    """Forward: one launch. Backward: the job-table launch and the partial sums (two at most),
    and no other kernel (no clone of d_cls, no casts)."""
    from crossvit_kernels.ops.patch_embed import patch_embed
    args = _patch_inputs(dtype)
    args[0].requires_grad_(images_grad)
    leaves = [a for a in args if a is not None and a.requires_grad]
    out, f_launches, f_ops = kernel_ops(lambda: patch_embed(*args, backend="triton"))
    dout = torch.randn_like(out)
    _, b_launches, b_ops = kernel_ops(lambda: torch.autograd.grad(out, leaves, dout))
    assert f_launches == ["_patch_embed_fwd_kernel"] and f_ops == [], (f_launches, f_ops)
    assert 1 <= len(b_launches) <= 2 and b_launches[0] == "_patch_embed_bwd_kernel" and b_ops == [], (b_launches, b_ops)


_PATCH_CHILD = """
import json, re, sys
sys.path.insert(0, sys.argv[1])
from helpers import check_triton_version
version = check_triton_version()
import torch
import sm90
from crossvit_kernels.backends.triton import patch_embed as tpe
tpe._large_tiles = lambda t: False            # the GPU block sizes
out = []
for B, H, C, ph, dtype in ((4, 240, 224, 12, "bfloat16"), (4, 224, 448, 16, "bfloat16")):
    dt = getattr(torch, dtype)
    z = lambda *s: torch.zeros(*s, dtype=dt)
    P = (H // ph) ** 2
    _, fwd = sm90.capture_launches(tpe.patch_embed_forward, z(B, 3, H, H), z(C, 3, ph, ph), z(C), z(1 + P, C), z(C))
    _, bwd = sm90.capture_launches(tpe.patch_embed_backward, z(B, 1 + P, C), z(B, 3, H, H), z(C, 3, ph, ph), True,
                                   True)
    for launch in fwd + bwd:
        r = sm90.compile_launch(launch)
        out.append(dict(r, patch=ph, dtype=dtype, triton=version))
print('RESULT' + json.dumps(out))
"""


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
@pytest.mark.parametrize("install", [name for name, _ in triton_installs()])
def test_patch_embed_compiles_for_sm90_within_budget(install):
    """The 12- and 16-pixel patch embeddings (bf16, CrossViT-18 widths) on sm_90: no spills, at
    least two programs per SM, bf16 MMA, and the forward's image tile loaded with asynchronous
    copies into shared memory (the padded patch rows keep the pixels contiguous to the compiler:
    the former gather issued one 2-byte load per pixel)."""
    path = dict(triton_installs())[install]
    proc = subprocess.run([sys.executable, "-c", _PATCH_CHILD, os.path.dirname(__file__)], env=compile_env(path),
                          capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    bad = []
    for r in json.loads(lines[-1][len("RESULT"):]):
        print("   ", r["kernel"], r["patch"], r["registers"], "registers", r["ctas_per_sm"], "programs/SM")
        if r["spill_stores"] or r["spill_loads"] or r["ctas_per_sm"] < 2 or r["ptx_tf32_cvt"]:
            bad.append(r)
        if r["kernel"] != "_patch_embed_bwd_finish_kernel" and not any(".bf16.bf16" in m for m in r["ptx_mma"]):
            bad.append(r)
        if r["kernel"] == "_patch_embed_fwd_kernel" and (r["ptx_scalar_16bit_loads"] or not r["ptx_async_copies"]):
            bad.append(r)
    assert not bad, bad
