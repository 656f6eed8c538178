"""Where a whole CrossViT step spends its time, by kind of work, for timm and for this package.

    python tools/profile_e2e.py --model crossvit_18_dagger_240 --bench train --batch-size 16
        [--variants timm,patched,ours] [--steps 2] [--threads 2] [--device cpu]

Profiles ``--steps`` steps of each variant (after two warm-up steps each), one step of each
variant per round, with ``torch.profiler``, and sums the self time of its ops into a few groups:
the linear layers' GEMMs, self-attention (SDPA), convolutions, the fused ops of this package, and
everything else (element-wise, LayerNorm, copies, reductions). It shows what the package can still
win on a device: only the groups it changes. Times under the profiler run a little slower than
unprofiled; compare the variants within one run. CPU ops by default; with ``--device cuda`` the
CUDA kernels are grouped instead (that path has not run on a GPU yet).
"""
from __future__ import annotations

import argparse
import sys
import time

# Checked in order: the package's own ops first (their names contain "attention").
GROUPS = (
    ("fused ops (this package)", ("crossattentioncore", "crossvit_kernels", "patchembed", "_xattn", "_cross_attention",
                                  "_patch_embed")),
    ("GEMM (linear layers)", ("addmm", "aten::mm", "aten::bmm", "baddbmm", "linear_pointwise", "gemm", "cutlass",
                              "sm90_xmma", "cublas")),
    ("self-attention (SDPA)", ("scaled_dot_product", "flash", "fmha", "attention")),
    ("convolution", ("convolution", "conv2d", "conv_")),
)


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other (element-wise, norms, copies, reductions)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="crossvit_18_dagger_240")
    p.add_argument("--bench", choices=("inference", "train"), default="train")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--variants", default="timm,ours")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=0, help="also list the N costliest ops of each variant")
    args = p.parse_args(argv)

    import timm
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import crossvit_kernels as ck

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = timm.create_model(args.model)
    size = base.img_size if isinstance(base.img_size, int) else base.img_size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    steps = {}
    for variant in [v for v in args.variants.split(",") if v]:
        if variant in ("timm", "patched"):
            model = timm.create_model(args.model)
            model.load_state_dict(base.state_dict())
            if variant == "patched":
                ck.patch_timm(model)
        elif variant == "ours":
            model = ck.create_model(args.model)
            model.load_state_dict(base.state_dict())
        else:
            p.error(f"unknown variant {variant!r}: timm, patched or ours")
        model.to(device).train(args.bench == "train")
        opt = torch.optim.SGD(model.parameters(), lr=1e-4) if args.bench == "train" else None

        def step(model=model, opt=opt):
            if opt is None:
                with torch.no_grad():
                    model(images)
            else:
                opt.zero_grad(set_to_none=True)
                model(images).float().mean().backward()
                opt.step()
            if cuda:
                torch.cuda.synchronize(device)
        steps[variant] = step

    # Interleaved, one profiled step of each variant per round: on a shared machine the rate of
    # memory-bound ops drifts over a run (and was seen to depend on which model ran first).
    for _ in range(2):
        for step in steps.values():
            step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results = {v: {} for v in steps}
    wall = {v: 0.0 for v in steps}
    per_op = {v: {} for v in steps}
    for r in range(args.steps):
        for variant, step in steps.items():
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                step()
                wall[variant] += (time.perf_counter() - t0) * 1e3 / args.steps
            for evt in prof.key_averages():
                if cuda and getattr(evt, "device_type", None) != DeviceType.CUDA:
                    continue    # on a GPU: the kernels only (an op's device time is its kernels')
                t = (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / 1e3 / args.steps
                if t > 0:
                    results[variant][_group(evt.key)] = results[variant].get(_group(evt.key), 0.0) + t
                    per_op[variant][evt.key] = per_op[variant].get(evt.key, 0.0) + t
        print(f"round {r + 1}/{args.steps} profiled", file=sys.stderr, flush=True)
    tops = {v: sorted(((t, k) for k, t in ops.items()), reverse=True)[:args.top] for v, ops in per_op.items()}

    groups = [g for g, _ in GROUPS] + ["other (element-wise, norms, copies, reductions)"]
    variants = list(results)
    unit = "device ms" if cuda else "ms of self time on the calling thread"
    print(f"# {args.model} {args.bench}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"per step, {unit}")
    print("| group | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for g in groups + ["total"]:
        vals = [sum(results[v].values()) if g == "total" else results[v].get(g, 0.0) for v in variants]
        print(f"| {g} | " + " | ".join(f"{x:.0f}" for x in vals) + " |")
    if not cuda:
        # what no ATen op accounts for: Python, and the extension's kernels where the fused ops
        # call them directly (inference: no autograd node, no profiler event)
        print("| not in any op (Python; extension kernels called directly) | "
              + " | ".join(f"{wall[v] - sum(results[v].values()):.0f}" for v in variants) + " |")
        print("| wall time of the profiled step | " + " | ".join(f"{wall[v]:.0f}" for v in variants) + " |")
    for variant in variants if args.top else ():
        print(f"\n# {variant}: the {args.top} costliest ops (ms per step, group)")
        for t, key in tops[variant]:
            print(f"{t:9.1f}  {key[:70]:70s}  {_group(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
