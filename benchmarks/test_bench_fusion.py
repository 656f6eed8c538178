"""pytest-benchmark: the fusion stage of one multi-scale block of CrossViT-Ti (crossvit_tiny_240)
under each of the paper's fusion schemes, textbook and fused cross-attention.

    python -m pytest benchmarks/test_bench_fusion.py --benchmark-only
"""
import pytest
import torch

from _bench_cases import BATCH, DEVICE, DTYPE, backends, fwd_bwd, no_grad, synced

MODEL = "crossvit_tiny_240"
CASES = [("cross_attention", b) for b in backends("cross_attention")] + [
    (f, backends("cross_attention")[-1]) for f in ("all_attention", "class_token", "pairwise")]


def _stage(fusion):
    from crossvit_kernels.models import create_model
    from crossvit_kernels.models.fusion import Fusion
    torch.manual_seed(0)
    m = create_model(MODEL, fusion=fusion, depth=((1, 1, 0),)).to(DEVICE, DTYPE)
    blk = m.blocks[0]
    shapes = [(BATCH, 1 + pe.num_patches, c) for pe, c in zip(m.patch_embed, m.embed_dim)]
    xs = [torch.randn(*s, device=DEVICE).to(DTYPE).requires_grad_() for s in shapes]
    gs = [torch.randn(*s, device=DEVICE).to(DTYPE) for s in shapes]
    return (lambda: Fusion.forward(blk, xs)), gs, xs + list(blk.parameters())


@pytest.mark.benchmark(group=f"fusion stage fwd {DEVICE.type} {MODEL} B={BATCH}")
@pytest.mark.parametrize("fusion,backend", CASES)
def test_fusion_stage_fwd(benchmark, fusion, backend):
    import crossvit_kernels as ck
    fn, _, _ = _stage(fusion)
    with ck.use_backend(backend):
        benchmark(synced(no_grad(fn)))


@pytest.mark.benchmark(group=f"fusion stage fwd+bwd {DEVICE.type} {MODEL} B={BATCH}")
@pytest.mark.parametrize("fusion,backend", CASES)
def test_fusion_stage_fwd_bwd(benchmark, fusion, backend):
    import crossvit_kernels as ck
    fn, gs, leaves = _stage(fusion)
    with ck.use_backend(backend):
        benchmark(synced(fwd_bwd(fn, gs, leaves)))
