"""Where one call of a fused op spends its time: every kernel (GPU) or ATen or extension op (CPU) it
runs, with counts and times per call, from ``torch.profiler``.

    python tools/profile_op.py --op cross_attention --model crossvit_18_240 --fusion 0 --batch 256
    python tools/profile_op.py --op patch_embed --model crossvit_18_240 --branch 0 --mode fwd+bwd
    python tools/profile_op.py --device cpu --batch 4        # CPU smoke run (ATen ops, CPU time)
    python tools/profile_op.py --device cpu --batch 64 --iters 40 --load busy2   # under load

Shapes are a variant's (``--model``, any of MODEL_CONFIGS): its fusion ``--fusion`` i (the CLS of
branch i attends over the other branch's tokens) or the patch embedding of branch ``--branch``;
the inputs and the call are the benchmark harness's (benchmarks/harness.py), ``--impl`` any of its
variants (a backend, ``timm``, ``triton-unfused``, ``<backend>-core`` ...). On a GPU the table lists
the device kernels by total device time; ``--json`` writes the rows. The numbers are profiler
times (each kernel alone, no overlap): use benchmarks/run.py for timings. The header also gives the
median wall time and the median CPU time of the whole process (all its threads, spinning ones
included) per unprofiled call, each call timed alone (on a GPU, synchronised): on the CPU their
ratio says how many cores the call kept busy, and under ``--load`` (benchmarks/load.py's kinds) how
much of the machine the scheduler gave it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import load  # noqa: E402  (benchmarks/load.py: standard library only)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("cross_attention", "patch_embed"), default="cross_attention")
    p.add_argument("--impl", default=None, help="default: triton on a GPU, cpp on the CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="crossvit_18_240", help="the variant whose shapes to use")
    p.add_argument("--fusion", type=int, choices=(0, 1), default=0, help="cross_attention: which fusion")
    p.add_argument("--branch", type=int, choices=(0, 1), default=0, help="patch_embed: which branch")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--load", default="none", help="background load while profiling and timing: " + load.KINDS_HELP)
    args = p.parse_args(argv)
    try:
        load.parse_kind(args.load)
    except ValueError as exc:
        p.error(str(exc))

    import torch
    from torch.profiler import ProfilerActivity, profile

    import harness
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible")
    gpu = args.device.startswith("cuda")
    try:
        dtype = harness.parse_dtype(args.dtype or ("bf16" if gpu else "fp32"))
        geo = harness.variant_geometry(args.model)
    except ValueError as exc:
        p.error(str(exc))
    args.impl = args.impl or ("triton" if gpu else "cpp")
    device = torch.device(args.device)
    why = harness.impl_status(args.op, args.impl, device, dtype)
    if why is not None:
        p.error(f"{args.impl} cannot run {args.op} here: {why}")
    if args.op == "cross_attention":
        s = geo["fusion_shapes"][args.fusion]
        t = harness.cross_attention_inputs(args.batch, s["N"], s["C"], device, dtype)
        step = harness.cross_attention_fn(t, s["H"], args.impl, args.mode)
        what = f"cross_attention {args.model} fusion {args.fusion} (N={s['N']}, C={s['C']}, H={s['H']})"
    else:
        img, patch, C = (geo[k][args.branch] for k in ("branch_sizes", "patch_sizes", "embed_dim"))
        t = harness.patch_embed_inputs(args.batch, img, patch, C, device, dtype)
        step = harness.patch_embed_fn(t, args.impl, args.mode)
        what = f"patch_embed {args.model} branch {args.branch} ({img} px, {patch} px patches, C={C})"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    for _ in range(5):  # warm-up: autotuning, lazy initialisation
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with load.generate(args.load):
        if args.load != "none":
            time.sleep(1.0)  # the workers start
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                step()
            sync()
        walls, cpus = [], []
        for _ in range(args.iters):
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    wall_us, cpu_us = statistics.median(walls) * 1e6, statistics.median(cpus) * 1e6

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
            if not t or not e.key.startswith(("aten::", "crossvit_kernels")):  # the extension's ops too
                continue
        rows.append(dict(name=e.key, calls_per_op=e.count / args.iters, us_per_op=t / args.iters))
    rows.sort(key=lambda r: -r["us_per_op"])
    total = sum(r["us_per_op"] for r in rows)
    launches = sum(r["calls_per_op"] for r in rows)
    kind = "device kernels" if gpu else "ATen and extension ops (self CPU time)"
    print(f"# {what}, {args.impl}, {harness.dtype_name(dtype)}, batch {args.batch}, {args.mode}, {args.device}: "
          f"{launches:.0f} {kind} per call, {total:.1f} us summed; per unprofiled call (median) "
          f"{wall_us:.1f} us wall time, {cpu_us:.1f} us the process's CPU time "
          f"(CPU / wall {sum(cpus) / sum(walls):.2f})"
          + ("" if args.load == "none" else f"; load {args.load}"))
    print(f"{'us/call':>9} {'share':>6} {'calls':>6}  name")
    for r in rows[:args.rows]:
        print(f"{r['us_per_op']:9.1f} {100 * r['us_per_op'] / max(total, 1e-9):5.1f}% {r['calls_per_op']:6.1f}  "
              f"{r['name'][:110]}")
    if len(rows) > args.rows:
        print(f"... {len(rows) - args.rows} more")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), what=what, total_us=total, wall_us=wall_us, cpu_us=cpu_us,
                           launches=launches, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
