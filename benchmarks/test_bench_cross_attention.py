"""pytest-benchmark: the cross-attention block at CrossViT-S's fusion[0] shape (N=197, C=384, H=6).

    python -m pytest benchmarks/test_bench_cross_attention.py --benchmark-only
"""
import pytest
import torch

from _bench_cases import BATCH, DEVICE, backends, cross_attention_case, fwd_bwd, no_grad, synced

IMPLS = ["timm"] + backends("cross_attention")


def _fn(impl):
    from crossvit_kernels.ops import cross_attention
    blk, q, branch, weights, H, g = cross_attention_case()
    tokens = branch[:, 1:]
    if impl == "timm":
        fn = lambda: blk(torch.cat([q.unsqueeze(1), tokens], dim=1)).squeeze(1)  # noqa: E731
    else:
        fn = lambda: cross_attention(q, tokens, *weights, H, eps=1e-6, backend=impl)  # noqa: E731
    return fn, g, [q, branch, *weights]


@pytest.mark.benchmark(group=f"cross_attention fwd {DEVICE.type} B={BATCH} N=197 C=384")
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_fwd(benchmark, impl):
    fn, _, _ = _fn(impl)
    benchmark(synced(no_grad(fn)))


@pytest.mark.benchmark(group=f"cross_attention fwd+bwd {DEVICE.type} B={BATCH} N=197 C=384")
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_fwd_bwd(benchmark, impl):
    fn, g, leaves = _fn(impl)
    benchmark(synced(fwd_bwd(fn, [g], leaves)))
