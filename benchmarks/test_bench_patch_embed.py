"""pytest-benchmark: patch embedding of both CrossViT-S branches (240 px / 12, 224 px / 16) against
timm's PatchEmbed + cat + add.

    python -m pytest benchmarks/test_bench_patch_embed.py --benchmark-only
"""
import pytest
import torch

from _bench_cases import BATCH, DEVICE, DTYPE, backends, fwd_bwd, no_grad, synced

BRANCHES = {"branch0_240px_p12_C192": (240, 12, 192), "branch1_224px_p16_C384": (224, 16, 384)}
IMPLS = ["timm"] + backends("patch_embed")


def _case(branch, impl):
    from timm.models.crossvit import PatchEmbed
    from crossvit_kernels.ops import patch_embed
    S, p, C = BRANCHES[branch]
    P = (S // p) ** 2
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=S, patch_size=p, embed_dim=C).to(DEVICE, DTYPE)
    img = torch.randn(BATCH, 3, S, S, device=DEVICE).to(DTYPE)
    cls = (0.02 * torch.randn(1, 1, C, device=DEVICE)).to(DTYPE).requires_grad_()
    pos = (0.02 * torch.randn(1, 1 + P, C, device=DEVICE)).to(DTYPE).requires_grad_()
    g = torch.randn(BATCH, 1 + P, C, device=DEVICE).to(DTYPE)
    if impl == "timm":
        fn = lambda: torch.cat([cls.expand(BATCH, -1, -1), pe(img)], dim=1) + pos  # noqa: E731
    else:
        fn = lambda: patch_embed(img, pe.proj.weight, pe.proj.bias, pos, cls, backend=impl)  # noqa: E731
    return fn, g, [pe.proj.weight, pe.proj.bias, cls, pos]


@pytest.mark.benchmark(group=f"patch_embed fwd {DEVICE.type} B={BATCH}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_patch_embed_fwd(benchmark, branch, impl):
    fn, _, _ = _case(branch, impl)
    benchmark(synced(no_grad(fn)))


@pytest.mark.benchmark(group=f"patch_embed fwd+bwd {DEVICE.type} B={BATCH}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_patch_embed_fwd_bwd(benchmark, branch, impl):
    fn, g, leaves = _case(branch, impl)
    benchmark(synced(fwd_bwd(fn, [g], leaves)))
