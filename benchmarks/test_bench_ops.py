"""pytest-benchmark: the cross-attention block, the patch embedding and the cross-attention fusion
stage (timm's against every variant of ours) at CrossViT-S's shapes, and the fusion stage of one
multi-scale block of CrossViT-Ti under each of the paper's schemes.

    python -m pytest benchmarks/ --benchmark-only [--benchmark-group-by=group]
"""
import pytest
import torch

import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = 64 if DEVICE.type == "cuda" else 8
MODEL = "crossvit_small_240"
STAGE_MODEL, STAGE_KWARGS = "crossvit_tiny_240", {"depth": ((1, 1, 0),)}

CA_SHAPE = harness.variant_geometry(MODEL)["fusion_shapes"][0]          # N=197, C=384, H=6
PE_SHAPES = {f"{s['img']}px_p{s['patch']}_C{s['C']}": s for s in harness.patch_embed_shapes([MODEL])}
STAGE_GEOMETRY = harness.stage_geometries([MODEL])[0]                     # 401x192 + 197x384, 6 heads
MODES = ("fwd", "fwd+bwd")


def _impls(op):
    return harness.default_impls(op, DEVICE, DTYPE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", _impls("cross_attention"))
def test_cross_attention(benchmark, impl, mode):
    if impl == "triton-unfused" and mode != "fwd":
        pytest.skip("with a gradient the op never takes the fused projections")
    N, C, H = CA_SHAPE["N"], CA_SHAPE["C"], CA_SHAPE["H"]
    benchmark.group = f"cross_attention {mode} {DEVICE.type} B={BATCH} N={N} C={C} H={H}"
    t = harness.cross_attention_inputs(BATCH, N, C, DEVICE, DTYPE)
    benchmark(harness.cross_attention_fn(t, H, impl, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", _impls("patch_embed"))
@pytest.mark.parametrize("shape", list(PE_SHAPES))
def test_patch_embed(benchmark, shape, impl, mode):
    s = PE_SHAPES[shape]
    benchmark.group = f"patch_embed {mode} {DEVICE.type} B={BATCH} {shape}"
    t = harness.patch_embed_inputs(BATCH, s["img"], s["patch"], s["C"], DEVICE, DTYPE)
    benchmark(harness.patch_embed_fn(t, impl, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", _impls("fusion_stage"))
def test_fusion_stage_op(benchmark, impl, mode):
    if mode not in harness.stage_modes(impl):
        pytest.skip(f"{impl} changes nothing in {mode}")
    g = STAGE_GEOMETRY
    benchmark.group = (f"fusion_stage {mode} {DEVICE.type} B={BATCH} {g['N0']}x{g['C0']} + {g['N1']}x{g['C1']} "
                       f"H{g['H0']},{g['H1']}")
    benchmark(harness.stage_fn(harness.stage_inputs(g, BATCH, DEVICE, DTYPE), impl, mode))


STAGE_BACKEND = next(b for b in harness.FUSED_BACKENDS + ("reference",)
                     if harness.impl_status("cross_attention", b, DEVICE, DTYPE) is None)
STAGE_CASES = [("cross_attention", "reference"), ("cross_attention", STAGE_BACKEND)] + [
    (f, STAGE_BACKEND) for f in ("all_attention", "class_token", "pairwise")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fusion,backend", list(dict.fromkeys(STAGE_CASES)))
def test_fusion_stage(benchmark, fusion, backend, mode):
    benchmark.group = f"fusion stage {mode} {DEVICE.type} {STAGE_MODEL} B={BATCH}"
    benchmark(harness.fusion_stage_fn(STAGE_MODEL, fusion, backend, BATCH, mode, DEVICE, DTYPE, STAGE_KWARGS))
