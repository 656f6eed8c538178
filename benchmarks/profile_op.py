"""Where one call of a fused op spends its time: every kernel (GPU) or ATen op (CPU) it runs, with
counts and times per call, from ``torch.profiler``.

    python benchmarks/profile_op.py --op cross_attention --model 18 --batch 256 --dtype bf16
    python benchmarks/profile_op.py --op patch_embed --image 240 --patch 12 --width 224 --mode fwd+bwd
    python benchmarks/profile_op.py --device cpu --batch 4        # CPU smoke run (ATen ops, CPU time)

On a GPU the table lists the device kernels by total device time (the launches around the one-pass
core, the core's own kernels, the combine step); ``--json`` writes the rows. The numbers are
profiler times (each kernel alone, no overlap): use the benchmark scripts for end-to-end timings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build(args, torch):
    """(callable running one op call, forward or forward + backward)."""
    import torch.nn.functional as F
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    grad = args.mode == "fwd+bwd"
    if args.op == "cross_attention":
        from bench_triton_cross_attention import MODELS, make_fn, make_inputs
        N, C, H = MODELS[args.model][args.shape]
        t = make_inputs(torch, args.batch, N, C, dtype, device, grad)
        fn, leaves = make_fn(torch, F, args.backend, t, H)
        what = f"cross_attention CrossViT-{args.model} (N={N}, C={C}, H={H})"
    else:
        from bench_triton_patch_embed import _inputs
        from crossvit_kernels.ops.patch_embed import patch_embed
        t = _inputs(args.batch, args.image, args.patch, args.width, dtype, device)
        leaves = [t[k].requires_grad_(grad) for k in ("weight", "bias", "pos_embed", "cls_token")]
        fn = lambda: patch_embed(t["images"], *leaves, backend=args.backend)  # noqa: E731
        what = f"patch_embed {args.image} px / {args.patch} px patches, C={args.width}"
    if not grad:
        def step():
            with torch.no_grad():
                return fn()
        return step, what
    leaves = [x for x in leaves if x.requires_grad]
    g = torch.randn_like(fn())
    return (lambda: torch.autograd.grad(fn(), leaves, g, allow_unused=True)), what


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("cross_attention", "patch_embed"), default="cross_attention")
    p.add_argument("--backend", default=None, help="default: triton on a GPU, cpp on the CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="18", help="cross_attention: 9, 15, 18, B or 408")
    p.add_argument("--shape", type=int, default=0, help="cross_attention: which fusion of the model (0 or 1)")
    p.add_argument("--image", type=int, default=240)
    p.add_argument("--patch", type=int, default=12)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.backend = args.backend or ("triton" if gpu else "cpp")
    step, what = build(args, torch)
    for _ in range(5):  # warm-up: autotuning, lazy initialisation
        step()
    if gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            step()
        if gpu:
            torch.cuda.synchronize()

    import time
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    if gpu:
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / args.iters * 1e6

    rows = []
    for e in prof.key_averages():
        if gpu:
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if not t or e.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            t = e.self_cpu_time_total
            if not t or not e.key.startswith(("aten::", "crossvit_kernels::")):
                continue
        rows.append(dict(name=e.key, calls_per_op=e.count / args.iters, us_per_op=t / args.iters))
    rows.sort(key=lambda r: -r["us_per_op"])
    total = sum(r["us_per_op"] for r in rows)
    launches = sum(r["calls_per_op"] for r in rows)
    kind = "device kernels" if gpu else "ATen ops (self CPU time)"
    print(f"# {what}, {args.backend}, {args.dtype}, batch {args.batch}, {args.mode}, {args.device}: "
          f"{launches:.0f} {kind} per call, {total:.1f} us summed; {wall_us:.1f} us wall time per call "
          f"(unprofiled{'' if gpu else ', including the extension kernels the ATen list does not show'})")
    print(f"{'us/call':>9} {'share':>6} {'calls':>6}  name")
    for r in rows[:args.rows]:
        print(f"{r['us_per_op']:9.1f} {100 * r['us_per_op'] / max(total, 1e-9):5.1f}% {r['calls_per_op']:6.1f}  "
              f"{r['name'][:110]}")
    if len(rows) > args.rows:
        print(f"... {len(rows) - args.rows} more")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), what=what, total_us=total, wall_us=wall_us, launches=launches, rows=rows),
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
