"""Benchmark: backend "triton" of the cross-attention op vs "reference", "torch" and SDPA, on a GPU.

For each CrossViT fusion shape (N tokens = 1 CLS + the other branch's patches, width C, H heads),
batch and dtype, times the whole op (CLS LayerNorm, projections, the core, output projection) of

* ``timm``:      timm's CrossAttentionBlock with the same weights, after torch.cat (the baseline),
* ``triton``:    ops.cross_attention(..., backend="triton") (the fused one-pass core),
* ``torch``:     ops.cross_attention(..., backend="torch") (the same absorbed math in PyTorch ops),
* ``reference``: ops.cross_attention(..., backend="reference") (the textbook form, as timm),
* ``triton-unfused``: the same with its projections as PyTorch ops around the core (the fused
                 projection kernels switched off): what fusing them saves; forward only (with a
                 gradient the op always takes that path),
* ``triton-core``: the one-pass core kernels alone (``torch.ops.crossvit_kernels.cross_attention_core``
                 with a given absorbed query), without the O(C^2) projections around them: how far
                 the kernels themselves are from the bytes-once floor,
* ``sdpa``:      the textbook form with materialised K and V and F.scaled_dot_product_attention
                 over a single query (what one would write with PyTorch's fused attention),

for the forward ("fwd", under no_grad) and forward plus backward ("fwd+bwd"), with
``_gpu_timing.time_both``: eager (do_bench on the Python call) and CUDA-graph replay (device time),
medians and 20 / 80 % quantiles in milliseconds; the roofline fraction and the speedup over timm
use the graph time.

Roofline: the op must read the tokens at least once (forward), and once more plus write their
gradient once (backward). ``roofline_ms = bytes / bandwidth`` with bytes = B * N * C * element size
times 1 (fwd) or 3 (fwd+bwd), and bandwidth measured in the same run by a device-to-device copy
(bytes read + bytes written over its time); ``fraction = roofline_ms / median_ms`` (1.0 = at the
floor). Every row records the device, dtype, shapes, backend and versions.

Usage (GPU):  python benchmarks/bench_triton_cross_attention.py --out benchmarks/results/xattn.json
              [--dtypes bf16,fp32] [--batches 1,2,4,8,16,32,64,128,256] [--models 9,15,18,B,408]
              [--backends triton,torch,reference,sdpa] [--modes fwd,fwd+bwd]
CPU only:     python benchmarks/bench_triton_cross_attention.py --quick [--out ...]
              (a tiny smoke of the torch backend: Triton kernels need a GPU to be timed)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# (N, C, H) of the two fusion cross-attentions of each model: the CLS of one branch attends over
# itself and the other branch's patch tokens (N = 1 + that branch's patches), at that branch's width.
MODELS = {
    "9": [(401, 128, 4), (197, 256, 4)],         # crossvit_9_240 (widths 128 / 256)
    "15": [(401, 192, 6), (197, 384, 6)],        # crossvit_15_240
    "18": [(401, 224, 7), (197, 448, 7)],        # crossvit_18_240
    "B": [(401, 384, 12), (197, 768, 12)],       # crossvit_base_240
    "408": [(1157, 224, 7), (577, 448, 7),       # crossvit_18_dagger_408 (34x34 and 24x24 patches)
            (1157, 192, 6), (577, 384, 6)],      # crossvit_15_dagger_408
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BACKENDS = ("timm", "triton", "triton-unfused", "triton-core", "torch", "reference", "sdpa")
PARAMS = ("norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def make_inputs(torch, B, N, C, dtype, device, grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    t = dict(x_cls=r(B, C), branch=r(B, N, C), norm_weight=1.0 + r(C, scale=0.1), norm_bias=r(C, scale=0.1))
    for name in ("q", "k", "v", "o"):
        t["w" + name] = r(C, C, scale=C ** -0.5)
        t["b" + name] = r(C, scale=0.02)
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def sdpa_cross_attention(torch, F, t, H, eps=1e-6):
    """Textbook form with materialised K / V and PyTorch's fused attention over one query."""
    x_cls, x_tok = t["x_cls"], t["branch"][:, 1:]
    B, C = x_cls.shape
    x = torch.cat([x_cls.unsqueeze(1), x_tok], dim=1)
    N = x.shape[1]
    x = F.layer_norm(x, (C,), t["norm_weight"], t["norm_bias"], eps)
    q = F.linear(x[:, :1], t["wq"], t["bq"]).reshape(B, 1, H, C // H).transpose(1, 2)
    k = F.linear(x, t["wk"], t["bk"]).reshape(B, N, H, C // H).transpose(1, 2)
    v = F.linear(x, t["wv"], t["bv"]).reshape(B, N, H, C // H).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)
    return x_cls + F.linear(o, t["wo"], t["bo"])


def timm_block(torch, t, H):
    """timm's CrossAttentionBlock with the same weights (eps 1e-6 as in timm's CrossViT) and the
    torch.cat that timm's fusion stage runs before it."""
    from timm.models.crossvit import CrossAttentionBlock
    C = t["x_cls"].shape[1]
    blk = CrossAttentionBlock(C, H, mlp_ratio=1.0, qkv_bias=True)
    blk.norm1.eps = 1e-6
    blk = blk.to(device=t["x_cls"].device, dtype=t["x_cls"].dtype)
    with torch.no_grad():
        blk.norm1.weight.copy_(t["norm_weight"])
        blk.norm1.bias.copy_(t["norm_bias"])
        for name in ("q", "k", "v"):
            getattr(blk.attn, "w" + name).weight.copy_(t["w" + name])
            getattr(blk.attn, "w" + name).bias.copy_(t["b" + name])
        blk.attn.proj.weight.copy_(t["wo"])
        blk.attn.proj.bias.copy_(t["bo"])
    blk.requires_grad_(t["x_cls"].requires_grad)
    return blk


def make_fn(torch, F, backend, t, H):
    """(callable, its differentiable leaves)."""
    if backend == "sdpa":
        return (lambda: sdpa_cross_attention(torch, F, t, H)), list(t.values())
    if backend == "timm":
        blk = timm_block(torch, t, H)
        x_cls, x_tok = t["x_cls"], t["branch"][:, 1:]
        fn = lambda: blk(torch.cat([x_cls.unsqueeze(1), x_tok], dim=1)).squeeze(1)  # noqa: E731
        return fn, [x_cls, t["branch"]] + list(blk.parameters())
    if backend == "triton-core":
        # the one-pass core alone (DESIGN.md section 2): LayerNorm statistics, scores against the
        # absorbed query w (float32, one per head), online softmax, weighted sums; no projections
        import crossvit_kernels.ops  # noqa: F401  (registers the op)
        x_cls, x_tok = t["x_cls"], t["branch"][:, 1:]
        B, C = x_cls.shape
        g = torch.Generator(device="cpu").manual_seed(1)
        w = (torch.randn(B, H, C, generator=g) * C ** -0.5).to(x_cls.device).requires_grad_(x_cls.requires_grad)
        fn = lambda: torch.ops.crossvit_kernels.cross_attention_core(x_cls, x_tok, w, 1e-6, "triton")[0]  # noqa: E731
        return fn, [x_cls, t["branch"], w]
    from crossvit_kernels.ops import cross_attention
    args = [t[n] for n in PARAMS]
    if backend == "triton-unfused":
        from crossvit_kernels.triton.projections import FUSED_ENV

        def fn():
            os.environ[FUSED_ENV] = "0"
            try:
                return cross_attention(t["x_cls"], t["branch"][:, 1:], *args, num_heads=H, backend="triton")
            finally:
                del os.environ[FUSED_ENV]
        return fn, list(t.values())
    fn = lambda: cross_attention(t["x_cls"], t["branch"][:, 1:], *args, num_heads=H, backend=backend)  # noqa: E731
    return fn, list(t.values())


def environment(torch, device):
    import crossvit_kernels
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # CPU smoke runs without Triton
        triton_version = None
    env = dict(torch=torch.__version__, triton=triton_version, crossvit_kernels=crossvit_kernels.__version__,
               python=platform.python_version(), cuda=torch.version.cuda)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    else:
        env.update(device=platform.processor() or platform.machine(), capability=None, sms=None)
    return env


def bench_gpu(args, device=None):
    """The GPU sweep: every case timed eagerly and as a CUDA-graph replay (``_gpu_timing``)."""
    import torch
    import torch.nn.functional as F
    from _gpu_timing import copy_bandwidth, time_both

    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    env = environment(torch, device)
    bw = copy_bandwidth(device)
    print(f"# {env['device']}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write); torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)
    print("# eager = do_bench on the Python call (host overhead included); graph = CUDA-graph replay "
          "(device time); roofline = tokens read once (fwd) / read twice + gradient written (fwd+bwd)", flush=True)
    rows = []
    shapes = [(m, s) for m in args.models.split(",") for s in MODELS[m]]
    backends = args.backends.split(",")
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, DTYPES[dname])
        elem = torch.empty((), dtype=dtype).element_size()
        for model, (N, C, H) in shapes:
            for B in [int(b) for b in args.batches.split(",")]:
                for mode in args.modes.split(","):
                    grad = mode == "fwd+bwd"
                    t = make_inputs(torch, B, N, C, dtype, device, grad)
                    g_out = torch.randn(B, C, device=device, dtype=dtype)
                    token_bytes = B * N * C * elem * (3 if grad else 1)
                    roofline_ms = token_bytes / bw * 1e3
                    timm_ms = None
                    for backend in backends:
                        if grad and backend == "triton-unfused":
                            continue    # with a gradient the op never takes the fused projections
                        row = dict(env, op="cross_attention", model=model, dtype=dname, B=B, N=N, C=C, H=H,
                                   mode=mode, backend=backend, bandwidth_GBps=bw / 1e9, bytes_once=token_bytes,
                                   roofline_ms=roofline_ms)
                        try:
                            fn, leaves = make_fn(torch, F, backend, t, H)
                            if grad:
                                leaves = [x for x in leaves if x.requires_grad]
                                g = g_out if backend != "triton-core" else torch.randn_like(fn())

                                def step(fn=fn, leaves=leaves, g=g):
                                    return torch.autograd.grad(fn(), leaves, g, allow_unused=True)
                            else:
                                def step(fn=fn):
                                    with torch.no_grad():
                                        return fn()
                            row.update(time_both(step, args.warmup, args.rep))
                            row["fraction"] = roofline_ms / row["median_ms"]
                            if backend == "timm":
                                timm_ms = row["median_ms"]
                            if timm_ms is not None and backend != "triton-core":  # the core is not the whole op
                                row["speedup_vs_timm"] = timm_ms / row["median_ms"]
                            graph = (f"graph {row['graph_median_ms']:8.4f} ms" if "graph_median_ms" in row
                                     else f"graph failed: {row.get('graph_error', '')[:60]}")
                            msg = (f"eager {row['eager_median_ms']:8.4f} ms  {graph}  "
                                   f"{row['fraction'] * 100:5.1f}% of roofline"
                                   + (f"  {row['speedup_vs_timm']:5.2f}x timm" if "speedup_vs_timm" in row else ""))
                        except Exception as exc:  # an out-of-memory textbook run at large B, say
                            row.update(error=f"{type(exc).__name__}: {exc}"[:300])
                            msg = f"failed: {row['error'][:100]}"
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(f"{dname:5s} {model:>4s} N={N:5d} C={C:4d} H={H:2d} B={B:4d} {mode:8s} "
                              f"{backend:10s} {msg}", flush=True)
                    del t
    return rows


def bench_quick(args):
    """CPU smoke: the torch backend at two small shapes, perf_counter timing (no roofline)."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cpu")
    env = environment(torch, device)
    rows = []
    for (N, C, H), B in (((401, 128, 4), 2), ((197, 256, 4), 2)):
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            t = make_inputs(torch, B, N, C, torch.float32, device, grad)
            fn, _ = make_fn(torch, F, "torch", t, H)
            times = []
            for i in range(8):
                for v in t.values():
                    v.grad = None
                start = time.perf_counter()
                if grad:
                    fn().sum().backward()
                else:
                    with torch.no_grad():
                        fn()
                if i >= 3:  # warm-up
                    times.append((time.perf_counter() - start) * 1e3)
            times.sort()
            n = len(times)
            row = dict(env, op="cross_attention", model="smoke", dtype="fp32", B=B, N=N, C=C, H=H, mode=mode,
                       backend="torch", median_ms=times[n // 2], q20_ms=times[round(0.2 * (n - 1))],
                       q80_ms=times[round(0.8 * (n - 1))])
            rows.append(row)
            print(f"fp32 N={N} C={C} H={H} B={B} {mode:8s} torch {row['median_ms']:.3f} ms", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the result rows as JSON to this path")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {sorted(DTYPES)}")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--models", default="9,15,18,B,408", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--quick", action="store_true", help="CPU smoke of the torch backend only")
    args = p.parse_args(argv)

    import torch
    if args.quick:
        rows = bench_quick(args)
    elif not torch.cuda.is_available():
        print("bench_triton_cross_attention: no CUDA GPU here. The Triton kernels are timed on a GPU only; "
              "run with --quick for a CPU smoke of the torch backend.", file=sys.stderr)
        return 2
    else:
        for name in args.dtypes.split(","):
            if name not in DTYPES:
                p.error(f"unknown dtype {name!r}: choose from {sorted(DTYPES)}")
        for name in args.models.split(","):
            if name not in MODELS:
                p.error(f"unknown model {name!r}: choose from {sorted(MODELS)}")
        for name in args.backends.split(","):
            if name not in BACKENDS:
                p.error(f"unknown backend {name!r}: choose from {BACKENDS}")
        rows = bench_gpu(args)
    if args.out:
        from _common import save_rows
        save_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
