"""Benchmark: backend "triton" of patch_embed vs timm's path and the "torch" backend, on a GPU.

For each image configuration (CrossViT branch 0: 240 px cut into 12-px patches, 400 tokens;
branch 1: 224 px into 16-px patches, 196 tokens; the 384-px models: 408 px into 12-px patches,
1156 tokens, and 384 px into 16-px patches, 576 tokens), width C, batch and dtype, times

* ``reference``: timm's path (conv2d + flatten + transpose + cat CLS + add pos),
* ``torch``: the package's plain-PyTorch backend,
* ``triton``: the fused kernels,

for the forward ("fwd", under no_grad) and the forward plus backward ("fwd+bwd"; the images do not
need a gradient, as in training, unless --images-grad), with ``triton.testing.do_bench`` (median
and 20/80 % quantiles). Each row also carries the roofline that binds the op on this device:

* matrix rate: a same-run ``torch.mm`` of the same (M = B * P, N = C, K = Cin * ph * pw) GEMM in
  the same dtype, FLOPs = 2 M N K per GEMM (1 forward, 1 or 2 backward);
* bandwidth: a same-run device-to-device copy of 256 MiB; bytes = every tensor the op reads or
  writes, each counted once;

``roofline_ms = max(flops / matrix_rate, bytes / bandwidth)``, ``fraction = roofline_ms / median``
(1.0 = at the roofline), ``bound`` = which of the two binds.

Usage (GPU):  python benchmarks/bench_triton_patch_embed.py --out benchmarks/results/patch_embed.json
              [--dtypes bf16,fp32] [--batches 1,8,32,64,128,256] [--channels 128,...] [--configs ...]
CPU only:     python benchmarks/bench_triton_patch_embed.py --quick   (a tiny smoke of the torch and
              reference backends; Triton needs a GPU to be timed)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

CONFIGS = {
    # name: (image px, patch px): tokens = (px / patch) ** 2
    "240p12": (240, 12),   # CrossViT branch 0, 400 tokens
    "224p16": (224, 16),   # CrossViT branch 1, 196 tokens
    "408p12": (408, 12),   # CrossViT-*-384 branch 0, 1156 tokens
    "384p16": (384, 16),   # CrossViT-*-384 branch 1, 576 tokens
}
CHANNELS = (128, 192, 224, 384, 448, 768)
BATCHES = (1, 8, 32, 64, 128, 256)
BACKENDS = ("reference", "torch", "triton")
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _cpu_model():
    from crossvit_kernels.info import cpu_model
    return cpu_model()


def _versions():
    import torch
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    for name in ("triton", "timm", "crossvit_kernels"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def _inputs(B, px, patch, C, dtype, device, cin=3):
    import torch
    P = (px // patch) ** 2
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    return dict(images=r(B, cin, px, px), weight=r(C, cin, patch, patch, scale=(cin * patch * patch) ** -0.5),
                bias=r(C, scale=0.1), pos_embed=r(1, 1 + P, C, scale=0.02), cls_token=r(1, 1, C, scale=0.02),
                grad_out=r(B, 1 + P, C))


def _bytes(B, px, patch, C, es, mode, images_grad, cin=3):
    P = (px // patch) ** 2
    K = cin * patch * patch
    fwd = es * (B * cin * px * px + C * K + C + (1 + P) * C + C + B * (1 + P) * C)
    if mode == "fwd":
        return fwd
    bwd = es * (B * (1 + P) * C + C * K + C + (1 + P) * C + C)      # grad_out in; d_weight, d_bias, d_pos, d_cls out
    if images_grad:
        bwd += es * B * cin * px * px
    return fwd + bwd


def _flops(B, px, patch, C, mode, images_grad, cin=3):
    M, K = B * (px // patch) ** 2, cin * patch * patch
    gemms = 1 if mode == "fwd" else (3 if images_grad else 2)
    return 2.0 * M * C * K * gemms


def _bench(fn, grad_to_none=None):
    from triton.testing import do_bench
    q = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def _mm_rate(M, N, K, dtype, device):
    """FLOP/s of a same-run torch.mm (M x K) @ (K x N) in ``dtype``."""
    import torch
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    t = _bench(lambda: torch.mm(a, b))["median_ms"]
    return 2.0 * M * N * K / (t * 1e-3)


def _run_one(backend, t, mode, images_grad):
    """Eager and CUDA-graph timings (``_gpu_timing``) of one backend: the forward under no_grad,
    or the forward and the gradients of every input that needs one."""
    import torch
    from _gpu_timing import time_both
    from crossvit_kernels.ops.patch_embed import patch_embed
    args = [t[k] for k in ("images", "weight", "bias", "pos_embed", "cls_token")]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return patch_embed(*args, backend=backend)
        return time_both(fn)
    leaves = [a.detach().requires_grad_(True) for a in args]
    if not images_grad:
        leaves[0].requires_grad_(False)
    g = t["grad_out"]
    wrt = [x for x in leaves if x.requires_grad]

    def fn():
        return torch.autograd.grad(patch_embed(*leaves, backend=backend), wrt, g)
    return time_both(fn)


def gpu_main(args):
    import torch
    device = torch.device("cuda", torch.cuda.current_device())
    dev_name = torch.cuda.get_device_name(device)
    versions = _versions()
    from _gpu_timing import copy_bandwidth
    bw = copy_bandwidth(device)
    print(f"# {dev_name}; copy bandwidth {bw / 1e9:.0f} GB/s; {versions}", flush=True)
    rows = []
    mm_cache = {}
    for dname in args.dtypes:
        dtype = getattr(torch, DTYPES[dname])
        es = torch.empty((), dtype=dtype).element_size()
        for cname in args.configs:
            px, patch = CONFIGS[cname]
            P, K = (px // patch) ** 2, 3 * patch * patch
            for C in args.channels:
                for B in args.batches:
                    M = B * P
                    key = (M, C, K, dtype)
                    if key not in mm_cache:
                        mm_cache[key] = _mm_rate(M, C, K, dtype, device)
                    rate = mm_cache[key]
                    try:
                        t = _inputs(B, px, patch, C, dtype, device)
                    except torch.OutOfMemoryError:
                        print(f"skip {cname} C={C} B={B} {dname}: out of memory", flush=True)
                        continue
                    for mode in args.modes:
                        flops = _flops(B, px, patch, C, mode, args.images_grad)
                        nbytes = _bytes(B, px, patch, C, es, mode, args.images_grad)
                        t_mm, t_bw = flops / rate * 1e3, nbytes / bw * 1e3
                        roof = max(t_mm, t_bw)
                        ref_ms = None
                        for backend in args.backends:
                            try:
                                m = _run_one(backend, t, mode, args.images_grad)
                            except torch.OutOfMemoryError:
                                print(f"skip {backend} {cname} C={C} B={B} {dname} {mode}: out of memory", flush=True)
                                torch.cuda.empty_cache()
                                continue
                            row = dict(device=dev_name, dtype=dname, config=cname, image_px=px, patch=patch,
                                       in_chans=3, tokens=P, channels=C, batch=B, M=M, N=C, K=K, mode=mode,
                                       images_grad=bool(args.images_grad and mode != "fwd"), backend=backend,
                                       **m, flops=flops, bytes=nbytes, mm_rate_tflops=rate / 1e12,
                                       copy_bw_gbs=bw / 1e9, roofline_ms=roof,
                                       bound="matrix" if t_mm >= t_bw else "memory",
                                       fraction=roof / m["median_ms"], versions=versions)
                            rows.append(row)
                            if backend == "reference":
                                ref_ms = m["median_ms"]
                            if ref_ms is not None:
                                row["speedup_vs_timm"] = ref_ms / m["median_ms"]
                            graph = (f"graph {m['graph_median_ms']:8.4f} ms" if "graph_median_ms" in m
                                     else f"graph failed: {m.get('graph_error', '')[:60]}")
                            print(f"{dname} {cname} C={C:4d} B={B:4d} {mode:7s} {backend:9s} "
                                  f"eager {m['eager_median_ms']:8.4f} ms  {graph}  "
                                  f"{row['fraction'] * 100:5.1f}% of {row['bound']} roofline"
                                  + (f"  {row['speedup_vs_timm']:5.2f}x timm" if "speedup_vs_timm" in row else ""),
                                  flush=True)
                    del t
    return rows


def quick_cpu(args):
    """CPU smoke: the torch and reference backends on a tiny shape (no Triton timing on a CPU)."""
    import torch
    from crossvit_kernels.ops.patch_embed import patch_embed
    versions = _versions()
    rows = []
    for cname in ("240p12", "224p16"):
        px, patch = CONFIGS[cname]
        t = _inputs(2, px, patch, 64, torch.float32, torch.device("cpu"))
        args_ = [t[k] for k in ("images", "weight", "bias", "pos_embed", "cls_token")]
        for backend in ("reference", "torch"):
            with torch.no_grad():
                patch_embed(*args_, backend=backend)
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    patch_embed(*args_, backend=backend)
                    times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            row = dict(device=_cpu_model(), dtype="fp32", config=cname, image_px=px,
                       patch=patch, in_chans=3, tokens=(px // patch) ** 2, channels=64, batch=2, mode="fwd",
                       backend=backend, median_ms=times[len(times) // 2], min_ms=times[0], max_ms=times[-1],
                       threads=torch.get_num_threads(), versions=versions)
            rows.append(row)
            print(f"cpu quick {cname} C=64 B=2 fwd {backend:9s} {row['median_ms']:.3f} ms", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--channels", default=",".join(map(str, CHANNELS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--images-grad", action="store_true", help="fwd+bwd also computes the images' gradient")
    p.add_argument("--quick", action="store_true", help="CPU-only smoke of the torch backend")
    args = p.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    args.configs = args.configs.split(",")
    args.channels = [int(c) for c in args.channels.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    args.backends = args.backends.split(",")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}: choose from {', '.join(DTYPES)}")
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}: choose from {', '.join(CONFIGS)}")

    import torch
    if torch.cuda.is_available():
        rows = gpu_main(args)
    elif args.quick:
        rows = quick_cpu(args)
    else:
        print("bench_triton_patch_embed: no CUDA GPU here; the Triton kernels can only be timed on a GPU. "
              "Run with --quick for a CPU smoke of the torch backend.", file=sys.stderr)
        return 2
    if args.out:
        from _common import save_rows
        save_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
