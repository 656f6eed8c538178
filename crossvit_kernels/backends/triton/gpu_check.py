"""GPU check of the Triton fusion stage and patch embedding: accuracy, device time, the floors.

    python -m crossvit_kernels.backends.triton.gpu_check [--batches 1,64,256] [--out DIR]

For each CrossViT-18 fusion stage size (branches (401, 224) and (197, 448), 7 heads; bfloat16) and
batch: the stage op on the triton backend against its textbook composition in PyTorch (the math
of timm's modules: LayerNorm, GELU, Linear, concatenation, the textbook single-query attention),
forward and forward + backward, each captured in a CUDA graph and timed by its replays
(triton.testing.do_bench, L2 flushed between replays, median); the byte model's floor
(crossvit_kernels.backends.triton.fusion.stage_bytes) at the measured copy bandwidth; the error
against a float64 oracle at a small batch. Then the patch embedding (240 px / 12 and 224 px / 16)
likewise against conv2d + flatten + cat + add. Variants (--variants) rerun the stage with the
environment knobs: hilo0 (CROSSVIT_KERNELS_TRITON_HILO=0), seqc (launch C as two launches).
Prints a table; writes DIR/gpu_check.json with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _bandwidth(torch, triton) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB."""
    n = 1 << 29
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


SMOKE = False          # --smoke: a CPU run under the interpreter (tiny sizes, wall-clock time)
DEVICE = "cuda"


def _graph_time(torch, triton, fn) -> float:
    """Median device time (ms) of fn's CUDA-graph replay, L2 flushed between replays."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def _stage_case(torch, triton, B, dtype, bw, variant):
    from crossvit_kernels.backends.triton import fusion as FS
    from crossvit_kernels.ops.fusion import fusion_stage, fusion_stage_reference
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))
    from test_triton_fusion import grad_out_like, stage_inputs
    shape = (B, 400, 224, 196, 448, 7, 7) if not SMOKE else (B, 20, 24, 9, 48, 3, 4)
    inp = stage_inputs(*shape, dtype, device=DEVICE)
    leaves = [inp["x0"], inp["x1"]] + [p for p in inp["params"] if p is not None]
    douts = [d.to(dtype) for d in grad_out_like(inp)]
    args = (inp["x0"], inp["x1"], inp["params"], inp["heads"], inp["eps"])
    out = {}
    for name, f in (("triton", lambda: fusion_stage(*args, backend="triton")),
                    ("textbook", lambda: fusion_stage_reference(*args))):
        with torch.no_grad():
            out[f"{name}_fwd_ms"] = _graph_time(torch, triton, f)

        def fb(f=f):
            o = f()
            torch.autograd.grad(o, leaves, douts)
        out[f"{name}_fwdbwd_ms"] = _graph_time(torch, triton, fb)
    m = FS.stage_bytes(B, (401, 197), (224, 448), (7, 7), 2)
    floor_f = sum(m["floor_fwd"]) / bw * 1e3
    floor_fb = floor_f + sum(m["floor_bwd"]) / bw * 1e3
    out.update(B=B, variant=variant, floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb,
               fwd_of_floor=floor_f / out["triton_fwd_ms"], fwdbwd_of_floor=floor_fb / out["triton_fwdbwd_ms"],
               fwd_speedup=out["textbook_fwd_ms"] / out["triton_fwd_ms"],
               fwdbwd_speedup=out["textbook_fwdbwd_ms"] / out["triton_fwdbwd_ms"])
    return out


def _stage_accuracy(torch, dtype):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))
    from test_triton_fusion import grad_out_like, run, stage_inputs, upcast
    shape = (4, 400, 224, 196, 448, 7, 7) if not SMOKE else (2, 20, 24, 9, 48, 3, 4)
    inp = stage_inputs(*shape, dtype, device=DEVICE)
    douts = grad_out_like(inp)
    res = {}
    fast, ref, ora = run(inp, "triton", douts), run(inp, "textbook", douts), run(upcast(inp), "textbook", douts)

    def err(a, o):                     # largest error relative to the largest oracle value
        return float((a.detach().double() - o.detach()).abs().max() / o.detach().abs().max())

    bk = {f"p{9 + 18 * d}" for d in range(2)}      # the key biases: zero gradient (rounding noise in the oracle)
    live = [n for n in ora[1] if n not in bk and ref[1][n] is not None]
    res["out_err"] = max(err(a, o) for a, o in zip(fast[0], ora[0]))
    res["out_err_textbook"] = max(err(a, o) for a, o in zip(ref[0], ora[0]))
    res["grad_err"] = max(err(fast[1][n], ora[1][n]) for n in live)
    res["grad_err_textbook"] = max(err(ref[1][n], ora[1][n]) for n in live)
    return res


def _patch_case(torch, triton, B, px, patch, C, bw):
    import torch.nn.functional as F

    from crossvit_kernels.ops.patch_embed import patch_embed
    P = (px // patch) ** 2
    dt = torch.bfloat16
    dev = DEVICE
    images = torch.randn(B, 3, px, px, device=dev, dtype=dt, requires_grad=True)
    weight = (torch.randn(C, 3, patch, patch, device=dev) * (3 * patch * patch) ** -0.5).to(dt).requires_grad_()
    bias = (torch.randn(C, device=dev) * 0.1).to(dt).requires_grad_()
    pos = (torch.randn(1 + P, C, device=dev) * 0.5).to(dt).requires_grad_()
    cls = (torch.randn(C, device=dev) * 0.5).to(dt).requires_grad_()
    leaves = [images, weight, bias, pos, cls]
    dout = torch.randn(B, 1 + P, C, device=dev, dtype=dt)

    def ours():
        return patch_embed(images, weight, bias, pos, cls, backend="triton")

    def timm_path():
        x = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
        return torch.cat([cls.reshape(1, 1, C).expand(B, -1, -1), x], 1) + pos

    out = dict(B=B, px=px, patch=patch, C=C)
    for name, f in (("triton", ours), ("timm", timm_path)):
        with torch.no_grad():
            out[f"{name}_fwd_ms"] = _graph_time(torch, triton, f)
        out[f"{name}_fwdbwd_ms"] = _graph_time(torch, triton, lambda f=f: torch.autograd.grad(f(), leaves, dout))
    elem = 2
    fwd_bytes = (B * 3 * px * px + C * 3 * patch * patch + 2 * (1 + P) * C + B * (1 + P) * C) * elem
    bwd_bytes = (B * (1 + P) * C + 2 * B * 3 * px * px + 2 * C * 3 * patch * patch + 2 * (1 + P) * C) * elem
    out.update(floor_fwd_ms=fwd_bytes / bw * 1e3, floor_fwdbwd_ms=(fwd_bytes + bwd_bytes) / bw * 1e3)
    out.update(fwd_of_floor=out["floor_fwd_ms"] / out["triton_fwd_ms"],
               fwdbwd_of_floor=out["floor_fwdbwd_ms"] / out["triton_fwdbwd_ms"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--variants", default="default,hilo0,seqc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a CPU run under TRITON_INTERPRET=1 (checks the script)")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE
    SMOKE, DEVICE = args.smoke, "cpu" if args.smoke else "cuda"
    import torch
    import triton
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    bw = _bandwidth(torch, triton) if not SMOKE else 3e12
    report = dict(device=torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", triton=triton.__version__,
                  torch=torch.__version__,
                  copy_bandwidth_GBps=bw / 1e9, stage=[], patch_embed=[])
    report["stage_accuracy_bf16"] = _stage_accuracy(torch, torch.bfloat16)
    knobs = {"default": {}, "hilo0": {"CROSSVIT_KERNELS_TRITON_HILO": "0"},
             "seqc": {"CROSSVIT_KERNELS_FUSION_SEQUENTIAL_C": "1"}}
    for variant in args.variants.split(","):
        saved = {k: os.environ.get(k) for k in knobs[variant]}
        os.environ.update(knobs[variant])
        try:
            for B in (int(b) for b in args.batches.split(",")):
                if variant != "default" and B != 256:
                    continue
                report["stage"].append(_stage_case(torch, triton, B, torch.bfloat16, bw, variant))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    for px, patch, C in ((240, 12, 224), (224, 16, 448)) if not SMOKE else ((24, 12, 16), (32, 16, 16)):
        report["patch_embed"].append(_patch_case(torch, triton, 256 if not SMOKE else 2, px, patch, C, bw))
    report["seconds"] = time.time() - t0
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; accuracy (bf16, B=4): {report['stage_accuracy_bf16']}")
    print("fusion stage, CrossViT-18, bf16 (graph device time, ms)")
    print(" variant   B   fwd   textbook  floor  %floor  x  | fwd+bwd textbook floor %floor  x")
    for r in report["stage"]:
        print(f" {r['variant']:8s} {r['B']:4d} {r['triton_fwd_ms']:.3f} {r['textbook_fwd_ms']:.3f} "
              f"{r['floor_fwd_ms']:.3f} {100 * r['fwd_of_floor']:5.1f} {r['fwd_speedup']:5.1f} | "
              f"{r['triton_fwdbwd_ms']:.3f} {r['textbook_fwdbwd_ms']:.3f} {r['floor_fwdbwd_ms']:.3f} "
              f"{100 * r['fwdbwd_of_floor']:5.1f} {r['fwdbwd_speedup']:5.1f}")
    print("patch embedding, bf16, B=256 (ms): px/patch  fwd timm floor %floor | fwd+bwd timm floor %floor")
    for r in report["patch_embed"]:
        print(f" {r['px']}/{r['patch']} {r['triton_fwd_ms']:.3f} {r['timm_fwd_ms']:.3f} {r['floor_fwd_ms']:.3f} "
              f"{100 * r['fwd_of_floor']:5.1f} | {r['triton_fwdbwd_ms']:.3f} {r['timm_fwdbwd_ms']:.3f} "
              f"{r['floor_fwdbwd_ms']:.3f} {100 * r['fwdbwd_of_floor']:5.1f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
