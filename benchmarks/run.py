"""The microbenchmark suite of crossvit-kernels (``make bench``).

Sections (all measured in one run, side by side):

  roofline         copy and read bandwidth, GEMM rate (torch.mm): the floors everything else is
                   measured against; at the end, per kernel, the fraction of the floor reached
  cross_attention  the CrossAttentionBlock at the fusion shapes of every variant: timm's block,
                   the package's ``reference`` backend and every available fused backend,
                   forward and forward+backward, MACs (textbook and absorbed), bytes, floor
  fusion           the paper's five fusion schemes (CrossViT-S, and every variant's shapes in full
                   mode): parameters, MACs, fusion-stage time, whole-model time
  scaling          time against the token count N = 49 .. 4096 per scheme, with the bytes-once line
  patch_embed      every available patch_embed backend against timm's PatchEmbed + cat + add

Usage:
    python benchmarks/run.py                 # full run, default batch sizes for the device
    python benchmarks/run.py --quick         # tiny shapes, every section, < 60 s (CI smoke)
    python benchmarks/run.py --results       # also copy JSON + PNG to benchmarks/results/<tag>/
    python benchmarks/run.py --device cuda --dtypes bf16,fp32

Output: ``<out>/bench.json`` (every row records device, threads, dtype, shapes, backend and
versions), ``<out>/summary.md`` (the tables printed) and ``<out>/*.png``; ``<out>`` defaults to
``benchmarks/out/<device-tag>/``. Conventions (timing, MAC counting) are in ``_common.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from functools import partial
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import _common as bc  # noqa: E402

SCHEMA_VERSION = 1
SECTIONS = ("roofline", "cross_attention", "fusion", "scaling", "patch_embed")
HEADLINE_MODEL = "crossvit_18_240"
FUSION_MODEL = "crossvit_small_240"


# ------------------------------------------------------------------------------------------------
# configuration per mode and device
# ------------------------------------------------------------------------------------------------


def make_config(quick: bool, device: torch.device, batch: Optional[int]) -> dict:
    gpu = device.type == "cuda"
    if quick:
        cfg = dict(
            # one multi-scale block with one encoder block per branch: the tiny model's shapes at a
            # fraction of its cost
            ca_models=["crossvit_tiny_240"], ca_batch=2, ca_mac_budget=0, ca_min_batch=1,
            fusion_model="crossvit_tiny_240", model_kwargs={"depth": ((1, 1, 0),)}, fusion_batch=1, model_batch=1,
            sweep_variants=False, sweep_batch=1, scaling_N=[49, 197], scaling_batch=1,
            pe_models=["crossvit_tiny_240"], pe_batch=2, pe_mac_budget=0,
            copy_numel=1 << 22, gemm_sizes=[(512, 512, 512)],
            timer=dict(warmup=1, min_reps=2, max_reps=3, budget_s=0.0, rep_ms=20, warmup_ms=5),
            roof_timer=dict(warmup=1, min_reps=5, max_reps=5, budget_s=0.0, rep_ms=20, warmup_ms=5),
            model_timer=dict(warmup=1, min_reps=1, max_reps=1, budget_s=0.0, rep_ms=20, warmup_ms=5),
            sweep_timer=dict(warmup=1, min_reps=1, max_reps=1, budget_s=0.0, rep_ms=20, warmup_ms=5),
        )
    elif gpu:
        cfg = dict(
            ca_models=None, ca_batch=256, ca_mac_budget=0, ca_min_batch=256,
            fusion_model=FUSION_MODEL, model_kwargs={}, fusion_batch=256, model_batch=128, sweep_variants=True,
            sweep_batch=256, scaling_N=[49, 100, 197, 401, 577, 1024, 1157, 2048, 4096], scaling_batch=32,
            pe_models=None, pe_batch=256, pe_mac_budget=0,
            copy_numel=1 << 28, gemm_sizes=[(256 * 401, 224, 224), (256 * 197, 448, 448), (8192, 8192, 8192)],
            timer=dict(warmup_ms=25, rep_ms=100),
            roof_timer=dict(warmup_ms=50, rep_ms=300),
            model_timer=dict(warmup_ms=50, rep_ms=500),
            sweep_timer=dict(warmup_ms=25, rep_ms=100),
        )
    else:
        # A small CPU (the 2-core CI machine): the headline CrossViT-18 rows at batch 64, other
        # shapes at the batch that keeps the textbook forward (or the patch GEMM) under a fixed
        # number of multiply-adds, so that the full run stays under 10 minutes.
        cfg = dict(
            ca_models=None, ca_batch=64, ca_mac_budget=1.3e9, ca_min_batch=4,
            fusion_model=FUSION_MODEL, model_kwargs={}, fusion_batch=8, model_batch=1, sweep_variants=True,
            sweep_batch=2, scaling_N=[49, 100, 197, 401, 577, 1024, 1157, 2048, 4096], scaling_batch=2,
            pe_models=None, pe_batch=64, pe_mac_budget=0.6e9,
            copy_numel=1 << 25, gemm_sizes=[(64 * 401, 224, 224), (64 * 197, 448, 448), (1024, 1024, 1024)],
            timer=dict(warmup=1, min_reps=3, max_reps=30, budget_s=0.3),
            roof_timer=dict(warmup=2, min_reps=7, max_reps=30, budget_s=1.0),
            model_timer=dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.4),
            sweep_timer=dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.1),
        )
    if batch is not None:
        cfg["ca_batch"] = cfg["pe_batch"] = batch
    return cfg


# ------------------------------------------------------------------------------------------------
# run context: device, timers, progress, rows
# ------------------------------------------------------------------------------------------------


class CpuLoad:
    """CPU time used by other processes while we run (from /proc/stat), in cores on average."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self.snapshot()

    def snapshot(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return time.monotonic(), busy / self.hz, t.user + t.system + t.children_user + t.children_system

    def others_cores(self, since=None) -> Optional[float]:
        a, b = since or self.start, self.snapshot()
        if a is None or b is None or b[0] - a[0] <= 0:
            return None
        return round(max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])), 2)


class Ctx:
    def __init__(self, args, device: torch.device, cfg: dict):
        self.args, self.device, self.cfg = args, device, cfg
        self.t0 = time.perf_counter()
        self.env = bc.environment(device)
        # per row, the versions as one short string (the environment block has them in full)
        self.versions = ", ".join(f"{k} {v}" for k, v in self.env["versions"].items()
                                  if k in ("crossvit_kernels", "torch", "triton", "timm") and v)
        self.timer = bc.Timer(device, **cfg["timer"])
        self.model_timer = bc.Timer(device, **cfg["model_timer"])
        self.roof_timer = bc.Timer(device, **cfg["roof_timer"])
        self.sweep_timer = bc.Timer(device, **cfg["sweep_timer"])
        self.sections: Dict[str, dict] = {}
        self.summary: List[str] = []
        self.load = CpuLoad()
        self.dtype = torch.float32
        self.roof: Dict[str, dict] = {}
        self.errors: List[dict] = []

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def base(self, section: str, **fields) -> dict:
        row = {"section": section, "device": self.env["device"], "threads": self.env["threads"],
               "dtype": bc.dtype_name(self.dtype), "versions": self.versions}
        row.update(fields)
        return row

    def emit(self, title: str, text: str) -> None:
        block = f"\n### {title}\n\n{text}\n"
        print(block, flush=True)
        self.summary.append(block)


def _randn(*shape, ctx: Ctx, requires_grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, device=ctx.device, dtype=torch.float32) * scale
    return t.to(ctx.dtype).requires_grad_(requires_grad)


def _fwd(fn, backend: Optional[str] = None):
    """An inference forward (no autograd), optionally under ``use_backend(backend)``."""
    import crossvit_kernels as ck

    def run():
        with torch.no_grad(), (ck.use_backend(backend) if backend else contextlib.nullcontext()):
            fn()
    return run


def _fwd_bwd(fn, grads, backend: Optional[str] = None):
    """A forward with autograd and backward of fixed output gradients."""
    import crossvit_kernels as ck

    def run():
        with ck.use_backend(backend) if backend else contextlib.nullcontext():
            out = fn()
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            torch.autograd.backward(outs, grads)
    return run


def _group(ctx: Ctx, timer, fns: dict, leaves: Optional[dict] = None, graphable: bool = False) -> dict:
    """``timer.group`` over the callables that run: one that raises (a broken backend) is logged
    and recorded in the run's failures, and left out of the timings (its rows are omitted)."""
    ok = {}
    for k, f in fns.items():
        try:
            for t in (leaves or {}).get(k) or []:
                t.grad = None
            f()
            ok[k] = f
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            ctx.errors.append({"dtype": bc.dtype_name(ctx.dtype), "what": k, "error": msg})
            ctx.log(f"   FAILED {k}: {msg}")
    return timer.group(ok, leaves, graphable) if ok else {}


def _floor_fns(x: torch.Tensor) -> dict:
    """The measured floors of a tensor, to time alongside the kernels that read it: one read
    (x.sum()) and one read + one write (a copy)."""
    buf = torch.empty_like(x)
    return {"__read": lambda: x.sum(), "__copy": lambda: buf.copy_(x)}


# ------------------------------------------------------------------------------------------------
# e. roofline (runs first: the other sections use its numbers)
# ------------------------------------------------------------------------------------------------


def section_roofline(ctx: Ctx) -> dict:
    n = ctx.cfg["copy_numel"]
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    x = torch.randn(n, device=ctx.device).to(ctx.dtype)
    y = torch.empty_like(x)
    ctx.log(f"roofline: copy / read bandwidth over {n * elt / 2**20:.0f} MiB")
    t_copy = ctx.roof_timer(lambda: y.copy_(x))
    t_read = ctx.roof_timer(lambda: x.sum())
    copy_gbs = 2 * n * elt / (t_copy["median_ms"] * 1e-3) / 1e9
    read_gbs = n * elt / (t_read["median_ms"] * 1e-3) / 1e9
    del x, y
    gemms = []
    for (M, K, N) in ctx.cfg["gemm_sizes"]:
        ctx.log(f"roofline: torch.mm {M}x{K} @ {K}x{N}")
        a = torch.randn(M, K, device=ctx.device).to(ctx.dtype)
        b = torch.randn(K, N, device=ctx.device).to(ctx.dtype)
        t = ctx.roof_timer(lambda: torch.mm(a, b))
        macs = M * K * N
        gemms.append(ctx.base("roofline", kind="gemm", shape=[M, K, N], timing=t, macs=macs,
                              gmacs_per_s=macs / (t["median_ms"] * 1e-3) / 1e9))
        del a, b
    peak = max(g["gmacs_per_s"] for g in gemms)
    res = {
        "bandwidth": ctx.base("roofline", kind="bandwidth", numel=n, bytes=n * elt, copy_timing=t_copy,
                              read_timing=t_read, copy_gb_per_s=copy_gbs, read_gb_per_s=read_gbs),
        "gemm": gemms, "gemm_peak_gmacs_per_s": peak, "kernels": [],
    }
    ctx.roof = {"read_gbs": read_gbs, "copy_gbs": copy_gbs, "gemm_gmacs": peak}
    rows = [["copy (read+write)", f"{copy_gbs:.1f} GB/s", bc.fmt_ms(t_copy["median_ms"]) + " ms"],
            ["read (x.sum())", f"{read_gbs:.1f} GB/s", bc.fmt_ms(t_read["median_ms"]) + " ms"]]
    rows += [[f"torch.mm {g['shape'][0]}x{g['shape'][1]}x{g['shape'][2]}", f"{g['gmacs_per_s']:.1f} GMAC/s",
              bc.fmt_ms(g["timing"]["median_ms"]) + " ms"] for g in gemms]
    ctx.emit(f"Roofline ({bc.dtype_name(ctx.dtype)}, {ctx.env['device']}, {ctx.env['threads']} threads)",
             bc.table(rows, ["measurement", "rate", "median"]))
    return res


def roofline_ms(ctx: Ctx, bytes_: float, macs: float, rw: bool) -> float:
    """max(bytes / bandwidth, MACs / GEMM rate): the time a kernel cannot beat on this machine."""
    bw = ctx.roof["copy_gbs"] if rw else ctx.roof["read_gbs"]
    return max(bytes_ / (bw * 1e9), macs / (ctx.roof["gemm_gmacs"] * 1e9)) * 1e3


# ------------------------------------------------------------------------------------------------
# a. cross-attention block
# ------------------------------------------------------------------------------------------------


def _unique_fusion_shapes(models: List[str]) -> List[dict]:
    shapes: Dict[tuple, dict] = {}
    for name in models:
        g = bc.variant_geometry(name)
        for fs in g["fusion_shapes"]:
            key = (fs["N"], fs["C"], fs["H"])
            entry = shapes.setdefault(key, {"N": fs["N"], "C": fs["C"], "H": fs["H"], "uses": []})
            entry["uses"].append(f"{name}/fusion.{fs['fusion']}")
    return list(shapes.values())


def _ca_batch(ctx: Ctx, shape: dict) -> int:
    cfg = ctx.cfg
    B = cfg["ca_batch"]
    if any(u.startswith(HEADLINE_MODEL + "/") for u in shape["uses"]) or not cfg["ca_mac_budget"]:
        return B
    per_row = bc.ca_macs_textbook(1, shape["N"], shape["C"])
    return int(max(cfg["ca_min_batch"], min(B, cfg["ca_mac_budget"] // per_row)))


def section_cross_attention(ctx: Ctx) -> dict:
    from timm.models.crossvit import CrossAttentionBlock as TimmBlock
    from crossvit_kernels.ops import cross_attention
    from crossvit_kernels.models import list_models

    models = ctx.cfg["ca_models"] or list_models()
    backends = bc.fused_backends("cross_attention", ctx.device, ctx.dtype, ctx.args.allow_interpreter)
    fused = [b for b, why in backends.items() if why is None]
    shapes = _unique_fusion_shapes(models)
    ctx.log(f"cross_attention: {len(shapes)} shapes; fused backends: {fused or 'none'}; skipped: "
            + ", ".join(f"{b} ({w})" for b, w in backends.items() if w))
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    rows = []
    for si, shp in enumerate(shapes):
        N, C, H = shp["N"], shp["C"], shp["H"]
        M = N - 1
        B = _ca_batch(ctx, shp)
        ctx.log(f"cross_attention [{si + 1}/{len(shapes)}] B={B} N={N} C={C} H={H} ({', '.join(shp['uses'])})")
        torch.manual_seed(si)
        blk = TimmBlock(C, H, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        with torch.no_grad():  # LayerNorm affine away from (1, 0) so no term is trivially skipped
            blk.norm1.weight.add_(0.1 * torch.randn(C))
            blk.norm1.bias.add_(0.1 * torch.randn(C))
        blk = blk.to(ctx.device, ctx.dtype)
        a, n = blk.attn, blk.norm1
        params = [n.weight, n.bias, a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias, a.wv.weight, a.wv.bias,
                  a.proj.weight, a.proj.bias]
        branch = _randn(B, 1 + M, C, ctx=ctx, requires_grad=True)   # the other branch's activations
        q_cls = _randn(B, C, ctx=ctx, requires_grad=True)            # the projected CLS (the query)
        tokens = branch[:, 1:]                                       # strided view, as in the model
        g = _randn(B, C, ctx=ctx)
        leaves = [branch, q_cls] + params

        def timm_fn():
            return blk(torch.cat([q_cls.unsqueeze(1), tokens], dim=1)).squeeze(1)

        def op_fn(backend):
            return lambda: cross_attention(q_cls, tokens, n.weight, n.bias, a.wq.weight, a.wq.bias, a.wk.weight,
                                           a.wk.bias, a.wv.weight, a.wv.bias, a.proj.weight, a.proj.bias, H,
                                           eps=1e-6, backend=backend)

        impls = [("timm", timm_fn, "textbook"), ("reference", op_fn("reference"), "textbook")]
        impls += [(b, op_fn(b), "fused") for b in fused]
        floor_fns = _floor_fns(branch.detach()[:, 1:].contiguous())
        macs_t, macs_a = bc.ca_macs_textbook(B, N, C), bc.ca_macs_absorbed(B, N, C, H)
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                fns = {impl: _fwd(fn) for impl, fn, _ in impls}
                fns.update(floor_fns)
                timings = _group(ctx, ctx.timer, fns, graphable=True)
                floor = {"read_ms": timings["__read"]["median_ms"], "copy_ms": timings["__copy"]["median_ms"]}
            else:
                fns = {impl: _fwd_bwd(fn, [g]) for impl, fn, _ in impls}
                timings = _group(ctx, ctx.timer, fns, {impl: leaves for impl in fns})
            for impl, fn, form in impls:
                if impl not in timings:
                    continue
                t = timings[impl]
                mult = 1 if mode == "fwd" else 3
                macs = (macs_t if form == "textbook" else macs_a) * mult
                nbytes = bc.ca_bytes(B, N, C, elt, "textbook" if form == "textbook" else "fused", mode)
                floor_ms = floor["read_ms"] if mode == "fwd" else floor["read_ms"] + floor["copy_ms"]
                med_s = t["median_ms"] * 1e-3
                roof = roofline_ms(ctx, bc.ca_bytes(B, N, C, elt, "fused", mode), macs_a * mult, rw=mode != "fwd")
                rows.append(ctx.base(
                    "cross_attention", uses=shp["uses"], B=B, N=N, M=M, C=C, H=H,
                    shapes={"x_cls": [B, C], "x_tokens": [B, M, C], "x_tokens_strides": list(tokens.stride())},
                    impl=impl, backend=impl if impl != "timm" else None, form=form, mode=mode, timing=t,
                    macs=macs, macs_textbook=macs_t * mult, macs_absorbed=macs_a * mult, bytes_model=nbytes,
                    floor_bytes_once_ms=floor_ms, frac_floor=floor_ms / t["median_ms"],
                    roofline_ms=roof, frac_roofline=roof / t["median_ms"],
                    gb_per_s=nbytes / med_s / 1e9, gmacs_per_s=macs / med_s / 1e9,
                    frac_gemm_rate=macs / med_s / 1e9 / ctx.roof["gemm_gmacs"]))
                ctx.log(f"   {mode:8s} {impl:10s} {bc.fmt_ms(t['median_ms'])} ms")
        del blk, branch, q_cls, g
    # table
    impls_seen = ["timm", "reference"] + fused
    table_rows = []
    for shp in shapes:
        for mode in ("fwd", "fwd+bwd"):
            sel = {r["impl"]: r for r in rows if (r["N"], r["C"], r["H"]) == (shp["N"], shp["C"], shp["H"])
                   and r["mode"] == mode}
            if "timm" not in sel:
                continue
            timm_ms = sel["timm"]["timing"]["median_ms"]
            best = min((sel[b] for b in fused if b in sel), key=lambda r: r["timing"]["median_ms"], default=None)
            uses = sorted({u.split("/")[0].replace("crossvit_", "") for u in shp["uses"]})
            table_rows.append(
                [f"N={shp['N']} C={shp['C']} H={shp['H']}", ",".join(uses)[:40], str(sel["timm"]["B"]), mode]
                + [bc.fmt_ms(sel[i]["timing"]["median_ms"]) if i in sel else "-" for i in impls_seen]
                + [f"{timm_ms / best['timing']['median_ms']:.1f}x" if best else "-",
                   f"{bc.ca_macs_textbook(1, shp['N'], shp['C']) / bc.ca_macs_absorbed(1, shp['N'], shp['C'], shp['H']):.0f}x",
                   bc.fmt_ms(best["floor_bytes_once_ms"]) if best else "-",
                   f"{100 * best['frac_floor']:.0f}%" if best else "-"])
    ctx.emit(f"Cross-attention block ({bc.dtype_name(ctx.dtype)}; median ms; timm = cat + timm's "
             f"CrossAttentionBlock)",
             bc.table(table_rows, ["shape", "variants", "B", "mode"] + [f"{i} ms" for i in impls_seen]
                      + ["fused vs timm", "MAC ratio", "floor ms", "fused % of floor"]))
    return {"backends": {b: (w or "available") for b, w in backends.items()}, "rows": rows}


# ------------------------------------------------------------------------------------------------
# b. fusion schemes
# ------------------------------------------------------------------------------------------------


def _fusion_params(model) -> int:
    total = 0
    for blk in model.blocks:
        for name in ("projs", "fusion", "revert_projs"):
            mod = getattr(blk, name, None)
            if isinstance(mod, nn.Module):
                total += sum(p.numel() for p in mod.parameters())
    return total


def _count_macs(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    import crossvit_kernels as ck
    counter = FlopCounterMode(display=False)
    with ck.use_backend("reference"), counter:
        fn()
    return counter.get_total_flops() // 2


_STATIC_CACHE: Dict[str, dict] = {}


def _scheme_static(name: str, fusion: str, kwargs: dict, count_model: bool = True) -> dict:
    """Parameters and textbook MACs (batch 1, counted on a meta-device model) of one scheme.

    ``count_model=False`` counts the whole model once per variant (with no fusion) and adds the
    scheme's counted fusion stages: the same number (the encoders, embedding and head do not
    depend on the scheme), several times cheaper to get.
    """
    key = repr((name, fusion, sorted(kwargs.items()), count_model))
    if key not in _STATIC_CACHE:  # independent of the dtype: computed once per run
        _STATIC_CACHE[key] = _scheme_static_uncached(name, fusion, kwargs, count_model)
    return dict(_STATIC_CACHE[key])


def _scheme_static_uncached(name: str, fusion: str, kwargs: dict, count_model: bool) -> dict:
    from crossvit_kernels.models import create_model
    from crossvit_kernels.models.fusion import Fusion
    m = create_model(name, fusion=fusion, device="meta", **kwargs)
    geo = bc.variant_geometry(name)
    x = torch.empty(1, 3, m.img_size[0], m.img_size[1], device="meta")
    xs = [torch.empty(1, 1 + P, C, device="meta") for P, C in zip(geo["num_patches"], geo["embed_dim"])]
    # every multi-scale block's fusion stage has the same shapes: count one, times the blocks
    macs_fusion = _count_macs(lambda: Fusion.forward(m.blocks[0], xs)) * len(m.blocks)
    if count_model:
        macs_model = _count_macs(lambda: m(x))
    else:
        base = _scheme_static(name, "none", kwargs, True) if fusion != "none" else None
        macs_model = (base["macs_textbook"] if base else _count_macs(lambda: m(x))) + macs_fusion
    # The fused op is opaque to the counter: count its form analytically (per block, per branch,
    # the textbook block's MACs replaced by the absorbed form's).
    saved = 0
    if fusion == "cross_attention":
        for fs in geo["fusion_shapes"]:
            saved += bc.ca_macs_textbook(1, fs["N"], fs["C"]) - bc.ca_macs_absorbed(1, fs["N"], fs["C"], fs["H"])
        saved *= len(m.blocks)
    return {"model": name, "model_kwargs": kwargs, "fusion": fusion, "macs_counted_whole_model": count_model,
            "params": sum(p.numel() for p in m.parameters()),
            "params_fusion": _fusion_params(m), "macs_textbook": macs_model, "macs_fused": macs_model - saved,
            "macs_fusion_textbook": macs_fusion, "macs_fusion_fused": macs_fusion - saved, "geometry": geo}


def _fusion_stage_rows(ctx: Ctx, name: str, B: int, modes, timer) -> List[dict]:
    from crossvit_kernels.models import FUSIONS, create_model
    from crossvit_kernels.models.fusion import Fusion
    geo = bc.variant_geometry(name)
    fused = [b for b, w in bc.fused_backends("cross_attention", ctx.device, ctx.dtype,
                                             ctx.args.allow_interpreter).items() if w is None]
    rows = []
    for fusion in FUSIONS:
        torch.manual_seed(0)
        m = create_model(name, fusion=fusion, **ctx.cfg["model_kwargs"]).to(ctx.device, ctx.dtype)
        blk = m.blocks[0]
        xs = [_randn(B, 1 + P, C, ctx=ctx, requires_grad=True) for P, C in zip(geo["num_patches"], geo["embed_dim"])]
        gs = [_randn(B, 1 + P, C, ctx=ctx) for P, C in zip(geo["num_patches"], geo["embed_dim"])]
        leaves = xs + [p for p in blk.parameters()]
        variants = ["reference"] + fused if fusion == "cross_attention" else [fused[0] if fused else "reference"]
        fn = lambda: Fusion.forward(blk, xs)  # noqa: E731
        for mode in modes:
            if mode == "fwd" or fusion == "none":  # "none" returns its inputs: nothing to differentiate
                timings = _group(ctx, timer, {b: _fwd(fn, b) for b in variants})
            else:
                timings = _group(ctx, timer, {b: _fwd_bwd(fn, gs, b) for b in variants}, {b: leaves for b in variants})
            for backend in variants:
                if backend not in timings:
                    continue
                t = timings[backend]
                form = "textbook" if backend == "reference" or fusion != "cross_attention" else "fused"
                rows.append(ctx.base("fusion", kind="timing", scope="fusion_stage", model=name, fusion=fusion,
                                     backend=backend, form=form, mode=mode, B=B, timing=t,
                                     shapes={"x0": [B, 1 + geo["num_patches"][0], geo["embed_dim"][0]],
                                             "x1": [B, 1 + geo["num_patches"][1], geo["embed_dim"][1]]}))
                ctx.log(f"   fusion stage {name} {fusion:15s} {backend:9s} {mode:8s} {bc.fmt_ms(t['median_ms'])} ms")
        del m, xs, gs
    return rows


def _model_rows(ctx: Ctx, name: str, B: int) -> List[dict]:
    import timm
    import crossvit_kernels as ck
    from crossvit_kernels.models import FUSIONS, create_model
    fused = [b for b, w in bc.fused_backends("cross_attention", ctx.device, ctx.dtype,
                                             ctx.args.allow_interpreter).items() if w is None]
    best = fused[0] if fused else "reference"
    rows = []
    size = bc.variant_geometry(name)["img_size"]
    x = _randn(B, 3, size, size, ctx=ctx)
    g = _randn(B, 1000, ctx=ctx)
    plan = [(f, best) for f in FUSIONS]
    # the textbook form of the paper's model and of its no-fusion baseline, and timm's own model
    plan += [("cross_attention", "reference"), ("none", "reference"), ("cross_attention", "timm")]
    models = {}
    for fusion, backend in plan:
        torch.manual_seed(0)
        if backend == "timm":
            m = timm.create_model(name, pretrained=False, **ctx.cfg["model_kwargs"])
        else:
            m = create_model(name, fusion=fusion, **ctx.cfg["model_kwargs"])
        models[(fusion, backend)] = m.to(ctx.device, ctx.dtype)
    key = lambda fb: f"{fb[0]}/{fb[1]}"  # noqa: E731
    for mode in ("fwd", "fwd+bwd"):
        fns, leaves = {}, {}
        for (fusion, backend), m in models.items():
            m.train(mode != "fwd")
            b = None if backend == "timm" else backend
            fns[key((fusion, backend))] = _fwd(partial(m, x), b) if mode == "fwd" else _fwd_bwd(partial(m, x), [g], b)
            leaves[key((fusion, backend))] = list(m.parameters())
        timings = _group(ctx, ctx.model_timer, fns, leaves)
        for (fusion, backend) in plan:
            if key((fusion, backend)) not in timings:
                continue
            t = timings[key((fusion, backend))]
            rows.append(ctx.base("fusion", kind="timing", scope="model", model=name,
                                 model_kwargs=ctx.cfg["model_kwargs"], fusion=fusion, backend=backend,
                                 form="textbook" if backend in ("reference", "timm") else "fused", mode=mode, B=B,
                                 timing=t, shapes={"images": [B, 3, size, size]},
                                 images_per_s=B / (t["median_ms"] * 1e-3)))
            ctx.log(f"   model {name} {fusion:15s} {backend:9s} {mode:8s} {bc.fmt_ms(t['median_ms'])} ms")
    del models
    return rows


def section_fusion(ctx: Ctx) -> dict:
    from crossvit_kernels.models import FUSIONS, list_models
    name = ctx.cfg["fusion_model"]
    ctx.log(f"fusion: parameters and MACs (meta device) of {len(FUSIONS)} schemes")
    static = [_scheme_static(name, f, ctx.cfg["model_kwargs"]) for f in FUSIONS]
    sweep_static = []
    if ctx.cfg["sweep_variants"]:
        for v in list_models():
            if v != name:
                sweep_static += [_scheme_static(v, f, {}, count_model=False) for f in FUSIONS]
    for s in static + sweep_static:
        s.update(ctx.base("fusion", kind="static"))
    ctx.log(f"fusion: {name} fusion stage (B={ctx.cfg['fusion_batch']})")
    rows = _fusion_stage_rows(ctx, name, ctx.cfg["fusion_batch"], ("fwd", "fwd+bwd"), ctx.timer)
    ctx.log(f"fusion: {name} whole model (B={ctx.cfg['model_batch']})")
    rows += _model_rows(ctx, name, ctx.cfg["model_batch"])
    if ctx.cfg["sweep_variants"]:
        # the fusion stage depends only on widths, heads and grids: time each distinct geometry once
        seen = {}
        for v in list_models():
            geo = bc.variant_geometry(v)
            key = (tuple(geo["embed_dim"]), tuple(geo["num_heads"]), tuple(geo["num_patches"]))
            seen.setdefault(key, []).append(v)
        for key, names in seen.items():
            if name in names:
                continue
            ctx.log(f"fusion: sweep {names[0]} geometry (also {', '.join(names[1:]) or '-'}), B={ctx.cfg['sweep_batch']}")
            for r in _fusion_stage_rows(ctx, names[0], ctx.cfg["sweep_batch"], ("fwd",), ctx.sweep_timer):
                r["same_geometry"] = names
                rows.append(r)

    # table: one line per scheme at the main model
    def t(scope, fusion, backend, mode, model=name):
        for r in rows:
            if (r["scope"], r["fusion"], r["backend"], r["mode"], r["model"]) == (scope, fusion, backend, mode, model):
                return r["timing"]["median_ms"]
        return None
    fused = [b for b, w in bc.fused_backends("cross_attention", ctx.device, ctx.dtype,
                                             ctx.args.allow_interpreter).items() if w is None]
    best = fused[0] if fused else "reference"
    none_fwd = {b: t("model", "none", b, "fwd") for b in (best, "reference")}
    none_fwd["timm"] = none_fwd["reference"]
    trows = []
    for s in static:
        f = s["fusion"]
        lines = [(best, "fused" if f == "cross_attention" else "-")]
        if f in ("cross_attention", "none"):
            lines.append(("reference", "textbook"))
        for backend, label in lines:
            fwd = t("model", f, backend, "fwd")
            trows.append([f, label if f == "cross_attention" else ("textbook" if backend == "reference" else "-"),
                          f"{s['params'] / 1e6:.2f}", f"{s['params_fusion'] / 1e6:.2f}",
                          f"{(s['macs_textbook'] if backend == 'reference' else s['macs_fused']) / 1e9:.3f}",
                          f"{(s['macs_fusion_textbook'] if backend == 'reference' else s['macs_fusion_fused']) / 1e6:.1f}",
                          bc.fmt_ms(t("fusion_stage", f, backend, "fwd")),
                          bc.fmt_ms(t("fusion_stage", f, backend, "fwd+bwd")),
                          bc.fmt_ms(fwd), bc.fmt_ms(t("model", f, backend, "fwd+bwd")),
                          f"{100 * (fwd / none_fwd[backend] - 1):+.1f}%" if fwd and none_fwd[backend] else "-"])
    timm_fwd, timm_fb = t("model", "cross_attention", "timm", "fwd"), t("model", "cross_attention", "timm", "fwd+bwd")
    trows.append(["cross_attention", "timm model", f"{static[0]['params'] / 1e6:.2f}", "", "", "", "", "",
                  bc.fmt_ms(timm_fwd), bc.fmt_ms(timm_fb), f"{100 * (timm_fwd / none_fwd['timm'] - 1):+.1f}%"
                  if timm_fwd and none_fwd["timm"] else "-"])
    ctx.emit(f"Fusion schemes at {name} ({bc.dtype_name(ctx.dtype)}; fusion stage = one multi-scale "
             f"block's fusion at B={ctx.cfg['fusion_batch']}; model at B={ctx.cfg['model_batch']}; "
             f"MACs per image; 'vs none' = model fwd against no fusion, same backend; timm model against textbook none)",
             bc.table(trows, ["fusion", "form", "params M", "fusion params M", "model GMACs", "fusion MMACs",
                              "stage fwd ms", "stage fwd+bwd ms", "model fwd ms", "model fwd+bwd ms", "vs none"]))
    if sweep_static:
        srows = []
        for v in list_models():
            per = {s["fusion"]: s for s in static + sweep_static if s["model"] == v}
            srows.append([v] + [f"{per[f]['params'] / 1e6:.1f} / {per[f]['macs_fused'] / 1e9:.2f}" for f in FUSIONS])
        ctx.emit("Every variant: params M / GMACs (fused form) per fusion scheme",
                 bc.table(srows, ["model"] + list(FUSIONS)))
    return {"static": static + sweep_static, "rows": rows}


# ------------------------------------------------------------------------------------------------
# c. scaling with the token count
# ------------------------------------------------------------------------------------------------


def section_scaling(ctx: Ctx) -> dict:
    from crossvit_kernels.models import create_model
    from crossvit_kernels.ops import cross_attention
    name = ctx.cfg["fusion_model"]
    B = ctx.cfg["scaling_batch"]
    fused = [b for b, w in bc.fused_backends("cross_attention", ctx.device, ctx.dtype,
                                             ctx.args.allow_interpreter).items() if w is None]
    torch.manual_seed(0)
    # the all-attention scheme's self-attention layer, and the width and heads it and fusion[0] of
    # the cross-attention scheme run at (branch 1's)
    allatt = create_model(name, fusion="all_attention", **ctx.cfg["model_kwargs"]).blocks[0].fusion
    allatt = allatt.to(ctx.device, ctx.dtype).eval()
    C, H = allatt.attn.qkv.in_features, allatt.attn.num_heads
    w = [_randn(C, C, ctx=ctx, scale=C ** -0.5) for _ in range(4)]
    bvec = [_randn(C, ctx=ctx, scale=0.02) for _ in range(4)]
    gamma, beta = 1 + _randn(C, ctx=ctx, scale=0.1), _randn(C, ctx=ctx, scale=0.1)
    rows = []
    for N in ctx.cfg["scaling_N"]:
        x = _randn(B, N, C, ctx=ctx)
        impls = [("all_attention", lambda: allatt(x))]
        for backend in ["reference"] + fused:
            impls.append((f"cross_attention/{backend}",
                          partial(cross_attention, x[:, 0], x[:, 1:], gamma, beta, w[0], bvec[0], w[1], bvec[1],
                                  w[2], bvec[2], w[3], bvec[3], H, 1e-6, backend)))
        fns = {impl: _fwd(fn) for impl, fn in impls}
        fns.update(_floor_fns(x))
        timings = _group(ctx, ctx.timer, fns, graphable=True)
        floor = {"read_ms": timings["__read"]["median_ms"]}
        for impl, fn in impls:
            if impl not in timings:
                continue
            t = timings[impl]
            rows.append(ctx.base("scaling", impl=impl, B=B, N=N, C=C, H=H, mode="fwd", timing=t,
                                 shapes={"x": [B, N, C]}, floor_bytes_once_ms=floor["read_ms"],
                                 frac_floor=floor["read_ms"] / t["median_ms"]))
            ctx.log(f"   scaling N={N:5d} {impl:28s} {bc.fmt_ms(t['median_ms'])} ms")
        rows.append(ctx.base("scaling", impl="bytes_once", B=B, N=N, C=C, H=H, mode="fwd",
                             timing=timings["__read"], shapes={"x": [B, N, C]}))
        del x
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    trows = []
    for N in ctx.cfg["scaling_N"]:
        sel = {r["impl"]: r["timing"]["median_ms"] for r in rows if r["N"] == N}
        trows.append([str(N)] + [bc.fmt_ms(sel.get(i)) for i in impls])
    ctx.emit(f"Scaling with the token count (forward, {bc.dtype_name(ctx.dtype)}, B={B}, C={C}, H={H}; median ms; "
             f"all_attention = the all-attention scheme's transformer layer of {name} over N tokens; "
             f"bytes_once = x.sum() of the (B, N, C) tokens)",
             bc.table(trows, ["N"] + impls))
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# d. patch embedding
# ------------------------------------------------------------------------------------------------


def _pe_configs(models: List[str]) -> List[dict]:
    out: Dict[tuple, dict] = {}
    for name in models:
        g = bc.variant_geometry(name)
        if g["dagger"]:
            # dagger models embed with convolutions; the linear op runs at their widths and sizes
            pass
        for br in (0, 1):
            key = (g["branch_sizes"][br], g["patch_sizes"][br], g["embed_dim"][br])
            e = out.setdefault(key, {"img": key[0], "patch": key[1], "C": key[2], "branch": br, "model_px": g["img_size"],
                                     "uses": []})
            e["uses"].append(f"{name}/branch{br}")
    return list(out.values())


def section_patch_embed(ctx: Ctx) -> dict:
    from timm.models.crossvit import PatchEmbed as TimmPatchEmbed
    from crossvit_kernels.ops import patch_embed
    from crossvit_kernels.models import list_models
    models = ctx.cfg["pe_models"] or list_models()
    backends = bc.fused_backends("patch_embed", ctx.device, ctx.dtype, ctx.args.allow_interpreter)
    fused = [b for b, w in backends.items() if w is None]
    configs = _pe_configs(models)
    ctx.log(f"patch_embed: {len(configs)} configurations; fused backends: {fused or 'none'}")
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    rows = []
    for ci, c in enumerate(configs):
        S, p, C = c["img"], c["patch"], c["C"]
        P, K = (S // p) ** 2, 3 * p * p
        B = ctx.cfg["pe_batch"]
        if ctx.cfg["pe_mac_budget"] and not any(u.startswith(HEADLINE_MODEL + "/") for u in c["uses"]):
            B = int(max(4, min(B, ctx.cfg["pe_mac_budget"] // (P * K * C))))
        ctx.log(f"patch_embed [{ci + 1}/{len(configs)}] B={B} {S}px p={p} C={C} ({', '.join(c['uses'])})")
        torch.manual_seed(ci)
        pe = TimmPatchEmbed(img_size=S, patch_size=p, embed_dim=C).to(ctx.device, ctx.dtype)
        cls = _randn(1, 1, C, ctx=ctx, requires_grad=True, scale=0.02)
        pos = _randn(1, 1 + P, C, ctx=ctx, requires_grad=True, scale=0.02)
        img = _randn(B, 3, S, S, ctx=ctx)
        g = _randn(B, 1 + P, C, ctx=ctx)
        leaves = [pe.proj.weight, pe.proj.bias, cls, pos]

        def timm_fn():
            x = pe(img)
            return torch.cat([cls.expand(B, -1, -1), x], dim=1) + pos

        impls = [("timm", timm_fn)] + [(b, partial(patch_embed, img, pe.proj.weight, pe.proj.bias, pos, cls, b))
                                       for b in ["reference"] + fused]
        macs = bc.pe_macs(B, P, C, K)
        for mode in ("fwd", "fwd+bwd"):
            mult = 1 if mode == "fwd" else 2  # images need no gradient: backward is the weight GEMM only
            nbytes = bc.pe_bytes(B, 3, S, S, P, C, K, elt, mode)
            roof = roofline_ms(ctx, nbytes, macs * mult, rw=True)
            if mode == "fwd":
                timings = _group(ctx, ctx.timer, {impl: _fwd(fn) for impl, fn in impls}, graphable=True)
            else:
                timings = _group(ctx, ctx.timer, {impl: _fwd_bwd(fn, [g]) for impl, fn in impls},
                                          {impl: leaves for impl, _ in impls})
            for impl, fn in impls:
                if impl not in timings:
                    continue
                t = timings[impl]
                med_s = t["median_ms"] * 1e-3
                rows.append(ctx.base("patch_embed", uses=c["uses"], B=B, img=S, patch=p, C=C, P=P, impl=impl,
                                     backend=None if impl == "timm" else impl, mode=mode, timing=t,
                                     shapes={"images": [B, 3, S, S], "weight": [C, 3, p, p], "out": [B, 1 + P, C]},
                                     macs=macs * mult, bytes_model=nbytes, roofline_ms=roof,
                                     frac_roofline=roof / t["median_ms"], gmacs_per_s=macs * mult / med_s / 1e9,
                                     gb_per_s=nbytes / med_s / 1e9))
                ctx.log(f"   {mode:8s} {impl:10s} {bc.fmt_ms(t['median_ms'])} ms")
        del pe, img, g
    impls = ["timm", "reference"] + fused
    trows = []
    for c in configs:
        for mode in ("fwd", "fwd+bwd"):
            sel = {r["impl"]: r for r in rows if (r["img"], r["patch"], r["C"]) == (c["img"], c["patch"], c["C"])
                   and r["mode"] == mode}
            if "timm" not in sel:
                continue
            best = min((sel[b] for b in fused if b in sel), key=lambda r: r["timing"]["median_ms"], default=None)
            trows.append([f"{c['img']}px p{c['patch']} C={c['C']}", str(sel["timm"]["B"]), mode]
                         + [bc.fmt_ms(sel[i]["timing"]["median_ms"]) if i in sel else "-" for i in impls]
                         + [f"{sel['timm']['timing']['median_ms'] / best['timing']['median_ms']:.2f}x" if best else "-",
                            f"{100 * best['frac_roofline']:.0f}%" if best else "-"])
    ctx.emit(f"Patch embedding ({bc.dtype_name(ctx.dtype)}; median ms; timm = PatchEmbed + cat + add)",
             bc.table(trows, ["input", "B", "mode"] + [f"{i} ms" for i in impls] + ["fused vs timm",
                                                                                 "fused % of roofline"]))
    return {"backends": {b: (w or "available") for b, w in backends.items()}, "rows": rows}


# ------------------------------------------------------------------------------------------------
# per-kernel fraction of the floor (end of the roofline section)
# ------------------------------------------------------------------------------------------------


def kernel_floors(ctx: Ctx, result: dict) -> List[dict]:
    out = []
    for sec, key in (("cross_attention", ("N", "C", "H")), ("patch_embed", ("img", "patch", "C"))):
        for r in result.get(sec, {}).get("rows", []):
            if r["impl"] in ("timm", "reference"):
                continue
            out.append({"kernel": sec, "backend": r["impl"], "mode": r["mode"], "B": r["B"],
                        "shape": {k: r[k] for k in key}, "median_ms": r["timing"]["median_ms"],
                        "roofline_ms": r["roofline_ms"], "frac_roofline": r["frac_roofline"],
                        "frac_floor_measured": r.get("frac_floor"), "gb_per_s": r["gb_per_s"],
                        "gmacs_per_s": r["gmacs_per_s"]})
    if out:
        trows = [[k["kernel"], k["backend"], k["mode"], " ".join(f"{a}={b}" for a, b in k["shape"].items()),
                  str(k["B"]), bc.fmt_ms(k["median_ms"]), bc.fmt_ms(k["roofline_ms"]),
                  f"{100 * k['frac_roofline']:.0f}%", f"{k['gb_per_s']:.1f}", f"{k['gmacs_per_s']:.1f}"]
                 for k in out]
        ctx.emit(f"Fused kernels against the roofline ({bc.dtype_name(ctx.dtype)}; roofline = max(bytes / measured "
                 f"bandwidth, MACs / measured GEMM rate))",
                 bc.table(trows, ["kernel", "backend", "mode", "shape", "B", "ms", "roofline ms", "% of roofline",
                                  "GB/s", "GMAC/s"]))
    return out


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def make_plots(results: dict, out: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plots are optional; the JSON is the result
        print(f"plots skipped: matplotlib unavailable ({exc})")
        return []
    written = []
    dev = results["environment"]["device"]
    for dname, per in results["by_dtype"].items():
        sc = per.get("scaling", {}).get("rows", [])
        if sc:
            fig, ax = plt.subplots(figsize=(7, 5))
            for impl in dict.fromkeys(r["impl"] for r in sc):
                pts = sorted((r["N"], r["timing"]["median_ms"]) for r in sc if r["impl"] == impl)
                style = dict(ls="--", color="k") if impl == "bytes_once" else dict(marker="o")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl.replace("bytes_once", "bytes once (x.sum())"),
                        **style)
            r0 = sc[0]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel("forward time (ms)")
            ax.set_title(f"Fusion cost vs tokens (B={r0['B']}, C={r0['C']}, H={r0['H']}, {dname})\n{dev}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            path = os.path.join(out, f"scaling_{dname}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        ca = per.get("cross_attention", {}).get("rows", [])
        if ca:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
            for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
                shapes = list(dict.fromkeys((r["N"], r["C"], r["H"]) for r in ca))
                impls = list(dict.fromkeys(r["impl"] for r in ca))
                width = 0.8 / len(impls)
                for k, impl in enumerate(impls):
                    ys = []
                    for s in shapes:
                        sel = {r["impl"]: r["timing"]["median_ms"] for r in ca
                               if (r["N"], r["C"], r["H"]) == s and r["mode"] == mode}
                        ys.append(sel["timm"] / sel[impl] if impl in sel else 0)
                    ax.bar([i + k * width for i in range(len(shapes))], ys, width, label=impl)
                ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
                ax.set_xticklabels([f"N{s[0]}\nC{s[1]}" for s in shapes], fontsize=7)
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.8)
                ax.set_title(f"{mode}: speed-up over timm ({dname})", fontsize=9)
                ax.grid(True, axis="y", which="both", alpha=0.3)
            axes[0].legend(fontsize=8)
            fig.suptitle(dev, fontsize=9)
            path = os.path.join(out, f"cross_attention_{dname}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        fu = per.get("fusion", {})
        model_rows = [r for r in fu.get("rows", []) if r["scope"] == "model"]
        if model_rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
            labels, fwd, fb = [], [], []
            for (f, b) in dict.fromkeys((r["fusion"], r["backend"]) for r in model_rows):
                sel = {r["mode"]: r["timing"]["median_ms"] for r in model_rows if (r["fusion"], r["backend"]) == (f, b)}
                labels.append(f"{f}\n({b})")
                fwd.append(sel.get("fwd", 0))
                fb.append(sel.get("fwd+bwd", 0))
            xs = range(len(labels))
            axes[0].bar([x - 0.2 for x in xs], fwd, 0.4, label="fwd")
            axes[0].bar([x + 0.2 for x in xs], fb, 0.4, label="fwd+bwd")
            axes[0].set_xticks(list(xs))
            axes[0].set_xticklabels(labels, fontsize=6, rotation=30)
            axes[0].set_ylabel("ms")
            axes[0].legend(fontsize=8)
            axes[0].set_title(f"whole model {model_rows[0]['model']} B={model_rows[0]['B']} ({dname})", fontsize=9)
            st = fu.get("static", [])
            main = [s for s in st if s["model"] == model_rows[0]["model"]]
            axes[1].bar([s["fusion"] for s in main], [s["macs_fused"] / 1e9 for s in main])
            axes[1].set_ylabel("GMACs per image (fused form)")
            axes[1].tick_params(axis="x", labelsize=7, rotation=20)
            axes[1].set_title("multiply-adds", fontsize=9)
            fig.suptitle(dev, fontsize=9)
            fig.tight_layout()
            path = os.path.join(out, f"fusion_{dname}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        pe = per.get("patch_embed", {}).get("rows", [])
        if pe:
            fig, ax = plt.subplots(figsize=(9, 4.5))
            cfgs = list(dict.fromkeys((r["img"], r["patch"], r["C"]) for r in pe))
            impls = list(dict.fromkeys(r["impl"] for r in pe))
            width = 0.8 / (len(impls) * 2)
            k = 0
            for mode in ("fwd", "fwd+bwd"):
                for impl in impls:
                    ys = []
                    for c in cfgs:
                        sel = {r["impl"]: r["timing"]["median_ms"] for r in pe
                               if (r["img"], r["patch"], r["C"]) == c and r["mode"] == mode}
                        ys.append(sel.get(impl, 0))
                    ax.bar([i + k * width for i in range(len(cfgs))], ys, width, label=f"{impl} {mode}")
                    k += 1
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cfgs))])
            ax.set_xticklabels([f"{c[0]}px p{c[1]}\nC{c[2]}" for c in cfgs], fontsize=7)
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
            ax.set_title(f"patch embedding ({dname})\n{dev}", fontsize=9)
            fig.tight_layout()
            path = os.path.join(out, f"patch_embed_{dname}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and repeats (CI smoke, < 60 s)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/out/<device-tag>/)")
    p.add_argument("--results", action="store_true",
                   help="also copy the JSON, summary and plots into benchmarks/results/<device-tag>/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtypes", default=None, help="comma list: fp32, bf16, fp16 (default fp32 on CPU, bf16,fp32 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--batch", type=int, default=None, help="batch of the cross-attention and patch-embedding rows")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="also time the Triton backend on CPU tensors under TRITON_INTERPRET=1 (very slow)")
    p.add_argument("--note", action="append", default=[], help="free text recorded in the JSON (repeatable)")
    args = p.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dnames = (args.dtypes or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",")
    dtypes = [bc.DTYPES[d.strip().lower()] for d in dnames]
    cfg = make_config(args.quick, device, args.batch)
    ctx = Ctx(args, device, cfg)
    tag = bc.device_tag(device)
    out = args.out or os.path.join(HERE, "out", tag)
    os.makedirs(out, exist_ok=True)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    if "roofline" not in sections:
        sections.insert(0, "roofline")  # every other section reports against it
    ctx.log(f"crossvit-kernels benchmarks on {ctx.env['device']} ({device.type}, {threads} threads), "
            f"dtypes {[bc.dtype_name(d) for d in dtypes]}, {'quick' if args.quick else 'full'} mode -> {out}")
    ctx.log(f"versions: {ctx.env['versions']}; load average at start: {ctx.env['load_average']}")
    if device.type == "cpu" and threads > 1:
        snap = ctx.load.snapshot()
        time.sleep(0.5)
        busy = ctx.load.others_cores(snap)
        if busy is not None and busy > 0.5:
            msg = (f"other processes are using {busy} cores: with {threads} threads the OpenMP regions stall "
                   f"whenever a core is taken; --threads 1 gives steadier numbers on a shared machine")
            ctx.log("WARNING: " + msg)
            args.note.append(msg)

    results = {"schema": SCHEMA_VERSION, "mode": "quick" if args.quick else "full", "environment": ctx.env,
               "config": {k: v for k, v in cfg.items()}, "argv": sys.argv[1:], "notes": list(args.note),
               "conventions": bc.__doc__.split("Conventions (stated once, used everywhere):", 1)[-1].strip(),
               "by_dtype": {}, "section_load": {}, "failed": []}
    status = 0
    for dtype in dtypes:
        ctx.dtype = dtype
        dn = bc.dtype_name(dtype)
        per: Dict[str, dict] = {}
        results["by_dtype"][dn] = per
        for sec in sections:
            snap = ctx.load.snapshot()
            t0 = time.perf_counter()
            ctx.log(f"== section {sec} ({dn}) ==")
            try:
                per[sec] = globals()[f"section_{sec}"](ctx)
            except Exception as exc:  # one broken section must not hide the others
                import traceback
                traceback.print_exc()
                per[sec] = {"error": f"{type(exc).__name__}: {exc}", "rows": []}
                results["failed"].append(f"{dn}/{sec}")
                status = 1
                if sec == "roofline":
                    ctx.roof = {"read_gbs": float("nan"), "copy_gbs": float("nan"), "gemm_gmacs": float("nan")}
            per[sec]["elapsed_s"] = round(time.perf_counter() - t0, 1)
            results["section_load"][f"{dn}/{sec}"] = {"elapsed_s": per[sec]["elapsed_s"],
                                                     "other_processes_cores": ctx.load.others_cores(snap)}
            torch.manual_seed(0)
        if "roofline" in per and "error" not in per["roofline"]:
            per["roofline"]["kernels"] = kernel_floors(ctx, per)
    results["runtime_s"] = round(time.perf_counter() - ctx.t0, 1)
    results["errors"] = ctx.errors
    if ctx.errors:
        results["failed"] += [f"{e['dtype']}/{e['what']}" for e in ctx.errors]
        status = 1
    others = ctx.load.others_cores()
    results["other_processes_cores"] = others
    results["load_average_end"] = bc.load_average()
    if others is not None and others > 0.25:
        results["notes"].append(f"machine busy: other processes used {others} cores on average during the run "
                                f"(of {os.cpu_count()}); timings are pessimistic and noisier than on an idle machine")
    path = os.path.join(out, "bench.json")
    bc.write_json(path, results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# crossvit-kernels benchmarks ({results['mode']})\n\n")
        f.write(f"- device: {ctx.env['device']} ({device.type}), {threads} threads, dtypes {dnames}\n")
        f.write(f"- versions: {ctx.env['versions']}\n- runtime: {results['runtime_s']} s; other processes used "
                f"{others} cores on average; load average {ctx.env['load_average']} -> {results['load_average_end']}\n")
        for n in results["notes"]:
            f.write(f"- note: {n}\n")
        f.write("".join(ctx.summary))
    plots = [] if args.no_plots else make_plots(results, out)
    ctx.log(f"wrote {path}, summary.md and {len(plots)} plots; runtime {results['runtime_s']} s; "
            f"other processes used {others} cores on average")
    if args.results:
        dest = os.path.join(HERE, "results", tag)
        os.makedirs(dest, exist_ok=True)
        for f in ["bench.json", "summary.md"] + [os.path.basename(p) for p in plots]:
            shutil.copy2(os.path.join(out, f), os.path.join(dest, f))
        ctx.log(f"copied results to {dest}")
    if results["failed"]:
        print(f"FAILED sections: {results['failed']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
