"""Backend ``triton``: the kernels' hard limits on the ops' sizes, declared as its size limits
(crossvit_kernels/backends/triton/limits.py) and read by the registry.

Criteria: each limit sits where the kernels stop working (the 16-bit tile table ends; the GPU's
shared memory per block; the 1-D grid), so that such inputs go to another backend under ``auto``
and raise NotImplementedError naming the limit when triton is asked for, never a KeyError or an
out-of-resources launch; the CrossViT shapes stay on triton on an H100; and the shared-memory
bounds hold for the kernels as compiled for sm_90 (compile-only, no GPU needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (compile_env, cross_attention_inputs, nvidia_compiler_reason, requires_triton,
                     run_cross_attention, triton_installs)
from test_triton_fusion import stage_inputs

pytestmark = requires_triton

H100_SMEM = 227 * 1024          # an H100's / H200's opt-in shared memory per block
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
GPU = torch.device("cuda", 0)


@pytest.fixture
def triton_backend(monkeypatch):
    """The triton backend's object, and a CUDA device that reports an H100's shared memory (the
    limits are read without a GPU)."""
    from crossvit_kernels.backends import base, get_backend
    monkeypatch.setattr(base, "_shared_memory_per_block", lambda index: H100_SMEM)
    return get_backend("triton")


def xattn_sizes(C, H, B=64, M=196):
    return dict(B=B, M=M, C=C, H=H)


def stage_sizes(C0, C1, H0, H1, B=64, N0=400, N1=196):
    return dict(B=B, N0=N0, C0=C0, N1=N1, C1=C1, H0=H0, H1=H1)


#: the cross-attention of every CrossViT width (C, H): both directions' attended widths
CROSSVIT_XATTN = [(96, 3), (192, 3), (192, 6), (384, 6), (128, 4), (256, 4), (224, 7), (448, 7), (384, 12), (768, 12)]
#: the fusion stages (C0, C1, H0, H1) of CrossViT-Ti, S, 9, 15, 18 and B
CROSSVIT_STAGES = [(96, 192, 3, 3), (192, 384, 6, 6), (128, 256, 4, 4), (192, 384, 6, 6), (224, 448, 7, 7),
                   (384, 768, 12, 12)]


def test_crossvit_shapes_stay_on_triton_on_an_h100(triton_backend):
    """Every CrossViT cross-attention and fusion stage in 16-bit, and CrossViT-18's in float32, is
    within the limits on an H100: the limits never move the models' own shapes off triton there."""
    for C, H in CROSSVIT_XATTN:
        for dtype in (BF16, F16):
            assert triton_backend.limits("cross_attention", GPU, dtype, xattn_sizes(C, H, B=1024)) is None, (C, H)
    for C0, C1, H0, H1 in CROSSVIT_STAGES:
        for dtype in (BF16, F16):
            assert triton_backend.limits("fusion_stage", GPU, dtype, stage_sizes(C0, C1, H0, H1, B=1024)) is None
    assert triton_backend.limits("cross_attention", GPU, F32, xattn_sizes(448, 7)) is None
    assert triton_backend.limits("fusion_stage", GPU, F32, stage_sizes(224, 448, 7, 7)) is None


def test_shared_memory_limit_refuses_what_an_h100_cannot_launch(triton_backend):
    """CrossViT-B in float32 needs 327808 bytes per program in the token pass's backward on sm_90
    (the compiler's figure): more than an H100 has, so the limit sends training elsewhere, while
    inference (196736 bytes forward) stays; a head width of 1024 overflows the forward's projection
    kernels. On the CPU (the interpreter) there is no shared-memory limit."""
    for op, sizes in (("cross_attention", xattn_sizes(768, 12)), ("fusion_stage", stage_sizes(384, 768, 12, 12))):
        reason = triton_backend.limits(op, GPU, F32, sizes)
        assert reason is not None and "backward" in reason and f"limit of {H100_SMEM}" in reason
        assert triton_backend.limits(op, GPU, F32, sizes, backward=False) is None
        assert triton_backend.limits(op, torch.device("cpu"), F32, sizes) is None
    reason = triton_backend.limits("cross_attention", GPU, BF16, xattn_sizes(1024, 1), backward=False)
    assert reason.startswith("the shared memory of the forward's largest launch")


def test_grid_limit(triton_backend):
    from crossvit_kernels.backends.triton import cross_attention as K
    most = (2 ** 31 - 1) // K.MAX_SPLITS
    assert triton_backend.limits("cross_attention", GPU, BF16, xattn_sizes(448, 7, B=most)) is None
    reason = triton_backend.limits("cross_attention", GPU, BF16, xattn_sizes(448, 7, B=most + 1))
    assert reason.startswith(f"the program count of the token pass (B x MAX_SPLITS) is {(most + 1) * K.MAX_SPLITS}")
    assert "program count" in triton_backend.limits("fusion_stage", GPU, BF16, stage_sizes(224, 448, 7, 7, B=most))


def test_half_width_limit_is_where_the_tile_table_ends(triton_backend):
    """The 16-bit token tiles exist up to HALF_MAX_WIDTH and not beyond: the limit is exactly there."""
    from crossvit_kernels.backends.triton import cross_attention as K
    top = K.HALF_MAX_WIDTH
    for which in ("fwd", "bwd"):
        K.stream_config(which, top, BF16)
        with pytest.raises(KeyError):
            K.stream_config(which, top + 1, BF16)
    cpu = torch.device("cpu")
    assert triton_backend.limits("cross_attention", cpu, BF16, xattn_sizes(top, 8)) is None
    assert triton_backend.limits("cross_attention", cpu, BF16, xattn_sizes(top + 8, 8)).startswith(
        f"the width C of 16-bit tokens is {top + 8}, more than the triton backend's limit of {top}")
    assert triton_backend.limits("cross_attention", cpu, F32, xattn_sizes(top + 8, 8)) is None
    assert "16-bit" in triton_backend.limits("fusion_stage", cpu, F16, stage_sizes(64, top + 8, 1, 1))


def test_ops_beyond_the_width_limit_say_so_or_fall_back():
    """16-bit tokens wider than the tile table, on the CPU under the interpreter: the op asked for
    triton raises NotImplementedError naming the limit (it raised KeyError from the launcher); the
    fusion stage asked for triton runs its textbook composition, as for a backend that does not
    declare it."""
    from crossvit_kernels.backends.triton import cross_attention as K
    from crossvit_kernels.ops.fusion import fusion_stage, fusion_stage_reference
    C = K.HALF_MAX_WIDTH + 8
    inp = cross_attention_inputs(1, 2, C, 8, BF16, requires_grad=False)
    with pytest.raises(NotImplementedError, match=rf"backend 'triton' cannot run cross_attention .*the width C "
                                                  rf"of 16-bit tokens is {C}"):
        run_cross_attention(inp, "triton")
    s = stage_inputs(1, 2, 16, 2, C, 1, 1, BF16, requires_grad=False, device="cpu")
    args = (s["x0"], s["x1"], s["params"], s["heads"], s["eps"])
    for got, ref in zip(fusion_stage(*args, backend="triton"), fusion_stage_reference(*args)):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------
# compile-only: the shared-memory bounds hold for the kernels as compiled for sm_90
# ---------------------------------------------------------------------------------------------

#: ("x", C, H, dtype) cross-attentions and ("s", C0, C1, H0, H1, dtype) stages, small to compile
#: and spread over the bounds' terms: wide tokens, many heads, wide heads, every dtype
BOUND_CASES = [("x", 448, 7, "bfloat16"), ("x", 256, 64, "bfloat16"), ("x", 128, 1, "float32"),
               ("x", 96, 3, "float16"), ("x", 64, 4, "float64"), ("x", 768, 12, "float32"),
               ("s", 224, 448, 7, 7, "bfloat16"), ("s", 16, 16, 1, 1, "float32")]

_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
import sm90
from helpers import cross_attention_inputs
from test_triton_fusion import stage_inputs
from crossvit_kernels.backends.triton import TritonBackend
from crossvit_kernels.backends.triton import fusion as FS

be = TritonBackend()
out = []
for case in json.loads(sys.argv[1]):
    dtype = getattr(torch, case[-1])
    if case[0] == "x":
        C, H = case[1], case[2]
        inp = cross_attention_inputs(2, 40, C, H, dtype, requires_grad=False)
        a = [inp[k] for k in ("x_cls", "x_tokens", "norm_weight", "norm_bias", "wq", "bq", "wk", "wv", "bv",
                              "wo", "bo")]
        (_, _, w, z, lse, _), fwd = sm90.capture_launches(be.cross_attention_forward, *a, H, 1e-6, True)
        z, lse = torch.randn(z.shape, dtype=z.dtype), torch.randn(lse.shape, dtype=lse.dtype)
        dz = torch.randn(z.shape, dtype=z.dtype)
        _, bwd = sm90.capture_launches(be._core.cross_attention_core_backward, a[0], a[1], w, z, lse, dz, 1e-6)
    else:
        C0, C1, H0, H1 = case[1:5]
        inp = stage_inputs(2, 40, C0, 30, C1, H0, H1, dtype, requires_grad=False, device="cpu")
        args = (inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"])
        res, fwd = sm90.capture_launches(FS.fusion_stage_forward, *args)
        saved = [torch.zeros(t.shape, dtype=t.dtype) for t in res[2:]]
        douts = [torch.zeros_like(inp["x0"]), torch.zeros_like(inp["x1"])]
        _, bwd = sm90.capture_launches(FS.fusion_stage_backward, *douts, *args[:3], saved, *args[3:])
    shared = {"fwd": {}, "bwd": {}}
    for which, launches in (("fwd", fwd), ("bwd", bwd)):
        for launch in launches:
            got = sm90.compile_launch(launch)["shared"]
            shared[which][launch.name] = max(shared[which].get(launch.name, 0), got)
    out.append([case, shared])
print('RESULT' + json.dumps(out))
"""


@pytest.mark.skipif(nvidia_compiler_reason() is not None, reason=str(nvidia_compiler_reason()))
def test_shared_memory_bounds_hold_for_sm90(triton_backend):
    """Every launch of each case, captured from the launchers and compiled for sm_90 with the
    bundled Triton, takes no more shared memory than the bound the backend's limits use for its
    pass (forward, backward)."""
    from crossvit_kernels.backends.triton import fusion as FS
    from crossvit_kernels.backends.triton.limits import _xattn_shared
    install = dict(triton_installs())["bundled"]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(BOUND_CASES), os.path.dirname(__file__)],
                          env=compile_env(install), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-4000:]}"
    results = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert len(results) == len(BOUND_CASES)
    for case, shared in results:
        dtype = getattr(torch, case[-1])
        for which in ("fwd", "bwd"):
            if case[0] == "x":
                bound = _xattn_shared(which, dtype)(xattn_sizes(case[1], case[2]))
            else:
                bound = FS.stage_shared_bytes(which, *case[1:5], dtype)
            assert shared[which] and max(shared[which].values()) <= bound, (case, which, bound, shared[which])
