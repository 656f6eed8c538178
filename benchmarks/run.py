"""The benchmark suite of crossvit-kernels: ``make bench`` on a CPU, the kernel sweep on a GPU.

Sections (measured in one run, each against the same roofline):

  roofline         copy and read bandwidth, GEMM rate (torch.mm): measured first
  cross_attention  the cross-attention block at the fusion shapes of every variant (or --models):
                   timm's block and the package's variants (harness.CA_EXTRA, backends), forward
                   and forward+backward, with the measured bytes-once floor of each shape
  patch_embed      the patch embedding of both branches of every variant against timm's
                   PatchEmbed + cat + add
  fusion_stage     the cross-attention fusion stage of a multi-scale block (both directions) at
                   each variant's geometry (or --stage-models): timm's MultiScaleBlock fusion
                   against the package's block on every backend (the stage op where the backend
                   declares it, else the per-piece fallback) and the triton knob variants,
                   forward and forward+backward, with the byte model's bytes-once floor; the
                   errors of each variant against a float64 oracle
  fusion           the paper's five fusion schemes at CrossViT-S: parameters, MACs, the fusion
                   stage of one block and the whole model; every variant's parameters and MACs
  scaling          time against the token count N = 49 .. 4096, with the bytes-once line

Usage:
    python benchmarks/run.py                          # full run with the device's defaults
    python benchmarks/run.py --quick                  # tiny shapes, every section, < 60 s (smoke)
    python benchmarks/run.py --results                # also copy the results to benchmarks/results/<tag>/
    python benchmarks/run.py --device cuda --dtypes bf16 --batches 1,64,256 \\
        --sections cross_attention,patch_embed,fusion_stage \\
        --stage-models crossvit_18_240                # the GPU kernel sweep (tools/gpu_run.sh)
    python benchmarks/run.py --load bursty2 ...       # under background load (benchmarks/load.py)

Timing is the package's one timer (crossvit_kernels.timing): the variants of one comparison
interleaved round by round; on a GPU with CUDA events (L2 flushed) and, for the op sections, also
as CUDA-graph replays (the device time the tables show). Output in ``--out`` (default
``benchmarks/out/<tag>/``): ``results.json`` (the compact results: environment, settings,
medians, quartiles, repeats; see harness.py), ``samples.json`` (every per-call time, not for
committing), ``summary.md`` and plots (report.py renders both from results.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

SCHEMA = 2
SECTIONS = ("roofline", "cross_attention", "patch_embed", "fusion_stage", "fusion", "scaling")
#: the model whose shapes are always measured at the full batch on a small CPU
HEADLINE_MODEL = "crossvit_18_240"
#: the model of the fusion and scaling sections (the paper's CrossViT-S)
FUSION_MODEL = "crossvit_small_240"
#: the batch of the fusion_stage section's errors against the float64 oracle
STAGE_ACCURACY_BATCH = 4


def make_config(quick: bool, device_type: str) -> dict:
    """Per-mode settings. Timer settings are Timer's keyword arguments."""
    if quick:
        # one multi-scale block with one encoder block per branch: the tiny model's shapes at a
        # fraction of its cost; the fusion stage at a geometry small enough for the Triton
        # interpreter (the dry run of the GPU sweep runs it there)
        return dict(models=["crossvit_tiny_240"], batches=[2], mac_budget=0, min_batch=1,
                    stage_geometries=[dict(N0=13, C0=24, N1=8, C1=32, H0=4, H1=3, uses=["tiny/fusion_stage"])],
                    fusion_model="crossvit_tiny_240", model_kwargs={"depth": ((1, 1, 0),)}, fusion_batch=1,
                    model_batch=1, sweep_variants=False, sweep_batch=1, scaling_N=[49, 197], scaling_batch=1,
                    copy_numel=1 << 22, gemm_sizes=[(512, 512, 512)],
                    timer=dict(warmup=1, min_reps=2, max_reps=3, budget_s=0.0),
                    roof_timer=dict(warmup=1, min_reps=5, max_reps=5, budget_s=0.0),
                    model_timer=dict(warmup=1, min_reps=1, max_reps=1, budget_s=0.0),
                    sweep_timer=dict(warmup=1, min_reps=1, max_reps=1, budget_s=0.0))
    if device_type == "cuda":
        return dict(models=None, batches=[256], mac_budget=0, min_batch=1, stage_geometries=None,
                    fusion_model=FUSION_MODEL, model_kwargs={}, fusion_batch=256, model_batch=128,
                    sweep_variants=True, sweep_batch=256,
                    scaling_N=[49, 100, 197, 401, 577, 1024, 1157, 2048, 4096], scaling_batch=32,
                    copy_numel=1 << 28, gemm_sizes=[(256 * 401, 224, 224), (256 * 197, 448, 448), (8192, 8192, 8192)],
                    timer=dict(warmup=3, min_reps=10, max_reps=50, budget_s=0.02),
                    roof_timer=dict(warmup=3, min_reps=10, max_reps=30, budget_s=0.2),
                    model_timer=dict(warmup=2, min_reps=5, max_reps=20, budget_s=0.2, flush_l2=False),
                    sweep_timer=dict(warmup=2, min_reps=5, max_reps=20, budget_s=0.02))
    # A small CPU (the 2-core development machine): the headline CrossViT-18 rows at batch 64, other
    # shapes at the batch that keeps the textbook forward (or the patch GEMM) under a fixed number
    # of multiply-adds, so that the full run stays well under 10 minutes.
    return dict(models=None, batches=[64], mac_budget=1.3e9, min_batch=4, stage_geometries=None,
                fusion_model=FUSION_MODEL, model_kwargs={}, fusion_batch=8, model_batch=1, sweep_variants=True,
                sweep_batch=2,
                scaling_N=[49, 100, 197, 401, 577, 1024, 1157, 2048, 4096], scaling_batch=2,
                copy_numel=1 << 25, gemm_sizes=[(64 * 401, 224, 224), (64 * 197, 448, 448), (1024, 1024, 1024)],
                timer=dict(warmup=1, min_reps=3, max_reps=30, budget_s=0.3),
                roof_timer=dict(warmup=2, min_reps=7, max_reps=30, budget_s=1.0),
                model_timer=dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.4),
                sweep_timer=dict(warmup=1, min_reps=2, max_reps=5, budget_s=0.1))


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
    """One run: device, dtype, settings, timers, progress, and what failed."""

    def __init__(self, args, device, cfg: dict):
        from crossvit_kernels.timing import Timer
        self.args, self.device, self.cfg = args, device, cfg
        self.t0 = time.perf_counter()
        self.timer = Timer(device, **cfg["timer"])
        self.roof_timer = Timer(device, **cfg["roof_timer"])
        self.model_timer = Timer(device, **cfg["model_timer"])
        self.sweep_timer = Timer(device, **cfg["sweep_timer"])
        self.dtype = None
        self.roof: dict = {}
        self.errors: List[dict] = []
        self.samples: List[dict] = []
        self.per: Dict[str, dict] = {}   # the current dtype's sections
        self.save = lambda: None         # writes the results so far (set by main)

    def checkpoint(self, section: str, partial: dict) -> None:
        """Record a section's rows so far and write the results file: a run stopped by a time
        limit keeps what it measured."""
        self.per[section] = dict(partial, partial=True)
        self.save()

    @property
    def dname(self) -> str:
        import harness
        return harness.dtype_name(self.dtype)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def time_group(self, timer, fns: dict, key: dict, graph: bool = False) -> Dict[str, dict]:
        """``timer.group`` over ``fns`` (also as CUDA-graph replays where ``graph`` and on a GPU);
        failures are logged and recorded; raw samples kept for samples.json. Returns
        {name: timing} with ``graph_*`` fields added where the replays were timed."""
        res = timer.group(fns, keep_samples=True)
        out = {}
        for name, t in res.items():
            if "error" in t:
                self.fail(key, name, t["error"])
                continue
            self.samples.append({"dtype": self.dname, **key, "impl": name, "samples_ms": t.pop("samples_ms")})
            out[name] = t
        if graph and self.device.type == "cuda" and out:
            for name, t in timer.group({k: fns[k] for k in out}, graph=True, keep_samples=True).items():
                if "error" in t:
                    self.fail(key, name + " (graph)", t["error"])
                    continue
                self.samples.append({"dtype": self.dname, **key, "impl": name, "graph": True,
                                     "samples_ms": t.pop("samples_ms")})
                out[name].update({f"graph_{k}": v for k, v in t.items()})
        return out

    def fail(self, key: dict, name: str, error: str) -> None:
        self.errors.append({"dtype": self.dname, **key, "impl": name, "error": error})
        self.log(f"   FAILED {name} {key}: {error}")


TIMING_COLUMNS = ("median_ms", "q25_ms", "q75_ms", "reps", "graph_median_ms", "graph_q25_ms", "graph_q75_ms")


# ------------------------------------------------------------------------------------------------
# roofline
# ------------------------------------------------------------------------------------------------


def section_roofline(ctx: Ctx) -> dict:
    import harness
    roof = harness.measure_roofline(ctx.roof_timer, ctx.device, ctx.dtype, ctx.cfg["copy_numel"],
                                    ctx.cfg["gemm_sizes"], log=ctx.log)
    ctx.roof = roof
    gemm = [dict(M=g["shape"][0], K=g["shape"][1], N=g["shape"][2], **g) for g in roof["gemm"]]
    keep = ("median_ms", "q25_ms", "q75_ms", "reps")
    return {"copy_gbs": harness.rnd(roof["copy_gbs"]), "read_gbs": harness.rnd(roof["read_gbs"]),
            "gemm_gmacs": harness.rnd(roof["gemm_gmacs"]), "bytes": roof["bytes"],
            "copy": {k: harness.rnd(roof["copy"][k]) for k in keep},
            "read": {k: harness.rnd(roof["read"][k]) for k in keep},
            "gemm": harness.make_table(("M", "K", "N", "gmacs") + keep, gemm)}


# ------------------------------------------------------------------------------------------------
# the two ops
# ------------------------------------------------------------------------------------------------


def _batches(ctx: Ctx, uses: List[str], macs_per_row: int) -> List[int]:
    """The batches of one shape: --batches, capped on a small CPU by the MAC budget except for the
    headline model's shapes."""
    cfg = ctx.cfg
    if not cfg["mac_budget"] or any(u.startswith(HEADLINE_MODEL + "/") for u in uses):
        return list(cfg["batches"])
    cap = int(max(cfg["min_batch"], cfg["mac_budget"] // macs_per_row))
    return sorted({min(B, cap) for B in cfg["batches"]})


def _impls(ctx: Ctx, op: str) -> Dict[str, str]:
    """{impl: "available" or why not}: --impls, or every default variant that runs here."""
    import harness
    allow = ctx.args.allow_interpreter
    wanted = ctx.args.impls.split(",") if ctx.args.impls else harness.default_impls(op, ctx.device, ctx.dtype, allow)
    if op == "cross_attention":
        wanted = [w for w in wanted if w not in ("read", "copy")]
    status = {}
    for name in wanted:
        why = harness.impl_status(op, name, ctx.device, ctx.dtype, allow)
        if why is None or ctx.args.impls:  # an explicitly named variant that cannot run is reported
            status[name] = why or "available"
    return status


def _auto(ctx: Ctx, op: str) -> Optional[str]:
    """The backend ``auto`` dispatches ``op`` to for the run's device and dtype (None: none can)."""
    from crossvit_kernels import backends
    try:
        return backends.resolve_backend(op, "auto", ctx.device, ctx.dtype)
    except NotImplementedError:
        return None


def section_cross_attention(ctx: Ctx) -> dict:
    import harness
    models = harness.models_matching(ctx.args.models.split(",") if ctx.args.models else ctx.cfg["models"])
    status = _impls(ctx, "cross_attention")
    impls = [k for k, v in status.items() if v == "available"]
    shapes = _headline_first(harness.fusion_shapes(models))
    ctx.log(f"cross_attention: {len(shapes)} shapes; variants: {impls}; not run: "
            + (", ".join(f"{k} ({v})" for k, v in status.items() if v != "available") or "-"))
    rows = []
    for si, shp in enumerate(shapes):
        N, C, H = shp["N"], shp["C"], shp["H"]
        for B in _batches(ctx, shp["uses"], harness.ca_macs_textbook(1, N, C)):
            ctx.log(f"cross_attention [{si + 1}/{len(shapes)}] B={B} N={N} C={C} H={H} "
                    f"({harness.short_uses(shp['uses'])})")
            t = harness.cross_attention_inputs(B, N, C, ctx.device, ctx.dtype, seed=si)
            for mode in ctx.args.modes.split(","):
                names = impls + (["read", "copy"] if mode == "fwd" else [])
                if mode != "fwd":
                    names = [n for n in names if n != "triton-unfused"]  # the op never fuses with a gradient
                fns = {}
                for name in names:
                    try:
                        fns[name] = harness.cross_attention_fn(t, H, name, mode)
                    except Exception as exc:
                        ctx.fail(dict(section="cross_attention", N=N, C=C, H=H, B=B, mode=mode), name,
                                  f"{type(exc).__name__}: {exc}"[:300])
                key = dict(section="cross_attention", N=N, C=C, H=H, B=B, mode=mode)
                timings = ctx.time_group(ctx.timer, fns, key, graph=True)
                for name, tm in timings.items():
                    rows.append(dict(N=N, C=C, H=H, B=B, mode=mode, impl=name, **tm))
                ctx.log("   " + mode + ": " + ", ".join(f"{k} {_ms(v)}" for k, v in timings.items()))
                del fns
            del t
            _free(ctx)
            result = {"variants": status, "auto": _auto(ctx, "cross_attention"),
                      "shapes": harness.make_table(("N", "C", "H", "uses"), shapes),
                      "rows": harness.make_table(("N", "C", "H", "B", "mode", "impl") + TIMING_COLUMNS, rows)}
            ctx.checkpoint("cross_attention", result)
    return result


def section_patch_embed(ctx: Ctx) -> dict:
    import harness
    models = harness.models_matching(ctx.args.models.split(",") if ctx.args.models else ctx.cfg["models"])
    status = _impls(ctx, "patch_embed")
    impls = [k for k, v in status.items() if v == "available"]
    shapes = _headline_first(harness.patch_embed_shapes(models))
    ctx.log(f"patch_embed: {len(shapes)} inputs; variants: {impls}")
    rows = []
    for si, shp in enumerate(shapes):
        S, p, C = shp["img"], shp["patch"], shp["C"]
        for B in _batches(ctx, shp["uses"], harness.pe_macs(1, S, p, C) * 2):
            ctx.log(f"patch_embed [{si + 1}/{len(shapes)}] B={B} {S}px p={p} C={C} ({harness.short_uses(shp['uses'])})")
            t = harness.patch_embed_inputs(B, S, p, C, ctx.device, ctx.dtype, seed=si)
            for mode in ctx.args.modes.split(","):
                fns = {name: harness.patch_embed_fn(t, name, mode) for name in impls}
                key = dict(section="patch_embed", img=S, patch=p, C=C, B=B, mode=mode)
                timings = ctx.time_group(ctx.timer, fns, key, graph=True)
                for name, tm in timings.items():
                    rows.append(dict(img=S, patch=p, C=C, B=B, mode=mode, impl=name, **tm))
                ctx.log("   " + mode + ": " + ", ".join(f"{k} {_ms(v)}" for k, v in timings.items()))
            del t
            _free(ctx)
            result = {"variants": status, "auto": _auto(ctx, "patch_embed"),
                      "shapes": harness.make_table(("img", "patch", "C", "uses"), shapes),
                      "rows": harness.make_table(("img", "patch", "C", "B", "mode", "impl") + TIMING_COLUMNS, rows)}
            ctx.checkpoint("patch_embed", result)
    return result


def section_fusion_stage(ctx: Ctx) -> dict:
    """The fusion stage of a multi-scale block, both directions: timm's block against the package's
    block on every backend here (the stage op or the per-piece fallback: harness.stage_path) and
    the triton knob variants (at the largest batch), at each geometry of --stage-models (default
    --models, or the config's); then the errors against the float64 oracle at batch
    STAGE_ACCURACY_BATCH."""
    import harness
    status = _impls(ctx, "fusion_stage")
    impls = [k for k, v in status.items() if v == "available"]
    paths = {i: harness.stage_path(i, ctx.device, ctx.dtype) for i in impls}
    patterns = ctx.args.stage_models or ctx.args.models
    if ctx.cfg["stage_geometries"] and not patterns:
        geoms = ctx.cfg["stage_geometries"]
    else:
        models = harness.models_matching(patterns.split(",") if patterns else ctx.cfg["models"])
        geoms = harness.stage_geometries(models)
    geoms = _headline_first(geoms)
    ctx.log(f"fusion_stage: {len(geoms)} geometries; variants: {paths}; not run: "
            + (", ".join(f"{k} ({v})" for k, v in status.items() if v != "available") or "-"))
    rows, errors = [], []
    for si, s in enumerate(geoms):
        g = {k: s[k] for k in harness.STAGE_KEYS}
        batches = _batches(ctx, s["uses"], harness.stage_macs_textbook(1, s))
        for B in batches:
            ctx.log(f"fusion_stage [{si + 1}/{len(geoms)}] B={B} {g} ({harness.short_uses(s['uses'])})")
            t = harness.stage_inputs(s, B, ctx.device, ctx.dtype, seed=si)
            for mode in ctx.args.modes.split(","):
                key = dict(section="fusion_stage", **g, B=B, mode=mode)
                fns = {}
                for name in impls:
                    if mode not in harness.stage_modes(name) or (name in harness.STAGE_KNOBS and B != max(batches)):
                        continue
                    try:
                        fns[name] = harness.stage_fn(t, name, mode)
                    except Exception as exc:
                        ctx.fail(key, name, f"{type(exc).__name__}: {exc}"[:300])
                timings = ctx.time_group(ctx.timer, fns, key, graph=True)
                for name, tm in timings.items():
                    rows.append(dict(g, B=B, mode=mode, impl=name, **tm))
                ctx.log("   " + mode + ": " + ", ".join(f"{k} {_ms(v)}" for k, v in timings.items()))
                del fns
            del t
            _free(ctx)
            ctx.checkpoint("fusion_stage", _stage_result(status, paths, geoms, rows, errors))
        t = harness.stage_inputs(s, STAGE_ACCURACY_BATCH, ctx.device, ctx.dtype, seed=si)
        try:
            for name, e in harness.stage_errors(t, impls).items():
                errors.append(dict(g, B=STAGE_ACCURACY_BATCH, impl=name, **e))
        except Exception as exc:
            ctx.fail(dict(section="fusion_stage", **g, B=STAGE_ACCURACY_BATCH, mode="accuracy"), "errors",
                     f"{type(exc).__name__}: {exc}"[:300])
        del t
        _free(ctx)
        ctx.checkpoint("fusion_stage", _stage_result(status, paths, geoms, rows, errors))
    return _stage_result(status, paths, geoms, rows, errors)


def _stage_result(status: dict, paths: dict, geoms: List[dict], rows: List[dict], errors: List[dict]) -> dict:
    import harness
    keys = harness.STAGE_KEYS
    return {"variants": status, "paths": paths,
            "geometries": harness.make_table(keys + ("uses",), geoms),
            "rows": harness.make_table(keys + ("B", "mode", "impl") + TIMING_COLUMNS, rows),
            "errors": harness.make_table(keys + ("B", "impl", "out_err", "grad_err"), errors)}


def _headline_first(shapes: List[dict]) -> List[dict]:
    """The headline model's shapes first, then the fusion model's, then the others (a run stopped
    by a time limit has measured the shapes the tables quote)."""
    def rank(s):
        uses = " ".join(s["uses"])
        return 0 if HEADLINE_MODEL + "/" in uses else 1 if FUSION_MODEL + "/" in uses else 2
    return sorted(shapes, key=rank)


def _ms(t: dict) -> str:
    ms = t.get("graph_median_ms", t["median_ms"])
    return f"{ms:.4g} ms" + (" (graph)" if "graph_median_ms" in t else "")


def _free(ctx: Ctx) -> None:
    if ctx.device.type == "cuda":
        import torch
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# fusion schemes
# ------------------------------------------------------------------------------------------------


def _fused_backend(ctx: Ctx) -> str:
    """The first fused backend that runs the cross-attention here (reference when none does)."""
    import harness
    for b in harness.FUSED_BACKENDS:
        if harness.impl_status("cross_attention", b, ctx.device, ctx.dtype, ctx.args.allow_interpreter) is None:
            return b
    return "reference"


def _count_macs(fn) -> int:
    import crossvit_kernels as ck
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with ck.use_backend("reference"), counter:
        fn()
    return counter.get_total_flops() // 2


_STATIC: Dict[str, dict] = {}


def _scheme_static(name: str, fusion: str, kwargs: dict, count_model: bool = True) -> dict:
    """Parameters and textbook MACs per image (counted on a meta-device model) of one scheme.

    ``count_model=False`` counts the whole model once per variant (with no fusion) and adds the
    scheme's counted fusion stages: the same number (the encoders, embedding and head do not
    depend on the scheme), several times cheaper to get. Independent of the dtype: cached.
    """
    import torch
    import torch.nn as nn

    import harness
    from crossvit_kernels.models import create_model
    key = repr((name, fusion, sorted(kwargs.items()), count_model))
    if key in _STATIC:
        return dict(_STATIC[key])
    m = create_model(name, fusion=fusion, device="meta", **kwargs)
    geo = harness.variant_geometry(name)
    x = torch.empty(1, 3, m.img_size[0], m.img_size[1], device="meta")
    xs = [torch.empty(1, 1 + P, C, device="meta") for P, C in zip(geo["num_patches"], geo["embed_dim"])]
    # every multi-scale block's fusion stage has the same shapes: count one, times the blocks
    macs_fusion = _count_macs(lambda: m.blocks[0].forward_fusion(xs)) * len(m.blocks)
    if count_model:
        macs_model = _count_macs(lambda: m(x))
    else:
        base = _scheme_static(name, "none", kwargs, True) if fusion != "none" else None
        macs_model = (base["macs_textbook"] if base else _count_macs(lambda: m(x))) + macs_fusion
    # the fused op is opaque to the counter: count its form analytically (per block and branch, the
    # textbook block's MACs replaced by the absorbed form's)
    saved = 0
    if fusion == "cross_attention":
        for fs in geo["fusion_shapes"]:
            saved += (harness.ca_macs_textbook(1, fs["N"], fs["C"])
                      - harness.ca_macs_absorbed(1, fs["N"], fs["C"], fs["H"]))
        saved *= len(m.blocks)
    params_fusion = sum(p.numel() for blk in m.blocks for n in ("projs", "fusion", "revert_projs")
                        if isinstance(getattr(blk, n, None), nn.Module) for p in getattr(blk, n).parameters())
    _STATIC[key] = {"model": name, "fusion": fusion, "params": sum(p.numel() for p in m.parameters()),
                    "params_fusion": params_fusion, "macs_textbook": macs_model, "macs_fused": macs_model - saved,
                    "macs_fusion_textbook": macs_fusion, "macs_fusion_fused": macs_fusion - saved}
    return dict(_STATIC[key])


def _stage_rows(ctx: Ctx, name: str, B: int, modes, timer) -> List[dict]:
    """The fusion stage of one multi-scale block under each scheme: textbook (reference) and the
    fused backend for the cross-attention scheme, the fused backend for the others."""
    import harness
    from crossvit_kernels.models import FUSIONS
    fused = _fused_backend(ctx)
    rows = []
    for fusion in FUSIONS:
        variants = ["reference", fused] if fusion == "cross_attention" and fused != "reference" else [fused]
        for mode in modes:
            if mode != "fwd" and fusion == "none":
                continue  # "none" returns its inputs: nothing to differentiate
            fns = {b: harness.fusion_stage_fn(name, fusion, b, B, mode, ctx.device, ctx.dtype, ctx.cfg["model_kwargs"])
                   for b in variants}
            key = dict(section="fusion", scope="fusion_stage", model=name, fusion=fusion, B=B, mode=mode)
            for backend, t in ctx.time_group(timer, fns, key).items():
                rows.append(dict(scope="fusion_stage", model=name, fusion=fusion, backend=backend, mode=mode, B=B, **t))
                ctx.log(f"   fusion stage {name} {fusion:15s} {backend:9s} {mode:8s} {t['median_ms']:.4g} ms")
            del fns
    return rows


def _model_rows(ctx: Ctx, name: str, B: int) -> List[dict]:
    """The whole model per scheme on the fused backend, the textbook form of the paper's scheme and
    of no fusion, and timm's own model; fwd and fwd+bwd."""
    import timm
    import torch

    import crossvit_kernels as ck
    import harness
    from crossvit_kernels.models import FUSIONS, create_model
    fused = _fused_backend(ctx)
    size = harness.variant_geometry(name)["img_size"]
    x = harness.randn(B, 3, size, size, device=ctx.device, dtype=ctx.dtype)
    g = harness.randn(B, 1000, device=ctx.device, dtype=ctx.dtype)
    plan = [(f, fused) for f in FUSIONS] + [("cross_attention", "reference"), ("none", "reference"),
                                            ("cross_attention", "timm")]
    plan = list(dict.fromkeys(plan))
    models = {}
    for fusion, backend in plan:
        torch.manual_seed(0)
        m = (timm.create_model(name, pretrained=False, **ctx.cfg["model_kwargs"]) if backend == "timm"
             else create_model(name, fusion=fusion, **ctx.cfg["model_kwargs"]))
        models[f"{fusion}/{backend}"] = (m.to(ctx.device, ctx.dtype), None if backend == "timm" else backend)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fns = {}
        for key, (m, backend) in models.items():
            m.train(mode != "fwd")
            params = list(m.parameters())

            def fn(m=m, backend=backend, params=params, mode=mode):
                with ck.use_backend(backend) if backend else contextlib.nullcontext():
                    if mode == "fwd":
                        with torch.no_grad():
                            return m(x)
                    return torch.autograd.grad(m(x), params, g, allow_unused=True)
            fns[key] = fn
        key = dict(section="fusion", scope="model", model=name, B=B, mode=mode)
        for k, t in ctx.time_group(ctx.model_timer, fns, key).items():
            fusion, backend = k.split("/")
            rows.append(dict(scope="model", model=name, fusion=fusion, backend=backend, mode=mode, B=B, **t))
            ctx.log(f"   model {name} {fusion:15s} {backend:9s} {mode:8s} {t['median_ms']:.4g} ms")
    return rows


def section_fusion(ctx: Ctx) -> dict:
    import harness
    from crossvit_kernels.models import FUSIONS, list_models
    name = ctx.cfg["fusion_model"]
    ctx.log(f"fusion: parameters and MACs (meta device) of {len(FUSIONS)} schemes")
    static = [_scheme_static(name, f, ctx.cfg["model_kwargs"]) for f in FUSIONS]
    if ctx.cfg["sweep_variants"]:
        static += [_scheme_static(v, f, {}, count_model=False) for v in list_models() if v != name for f in FUSIONS]
    ctx.log(f"fusion: {name} fusion stage (B={ctx.cfg['fusion_batch']})")
    rows = _stage_rows(ctx, name, ctx.cfg["fusion_batch"], ("fwd", "fwd+bwd"), ctx.timer)
    ctx.log(f"fusion: {name} whole model (B={ctx.cfg['model_batch']})")
    rows += _model_rows(ctx, name, ctx.cfg["model_batch"])
    if ctx.cfg["sweep_variants"]:
        # the fusion stage depends only on widths, heads and grids: time each distinct geometry once
        seen: Dict[tuple, List[str]] = {}
        for v in list_models():
            geo = harness.variant_geometry(v)
            seen.setdefault((tuple(geo["embed_dim"]), tuple(geo["num_heads"]), tuple(geo["num_patches"])), []).append(v)
        for names in seen.values():
            if name not in names:
                ctx.log(f"fusion: stage of {names[0]}'s geometry (also {', '.join(names[1:]) or '-'}), "
                        f"B={ctx.cfg['sweep_batch']}")
                rows += _stage_rows(ctx, names[0], ctx.cfg["sweep_batch"], ("fwd",), ctx.sweep_timer)
    return {"model": name, "model_kwargs": {k: repr(v) for k, v in ctx.cfg["model_kwargs"].items()},
            "fusion_batch": ctx.cfg["fusion_batch"], "model_batch": ctx.cfg["model_batch"],
            "static": harness.make_table(("model", "fusion", "params", "params_fusion", "macs_textbook", "macs_fused",
                                          "macs_fusion_textbook", "macs_fusion_fused"), static),
            "rows": harness.make_table(("scope", "model", "fusion", "backend", "mode", "B") + TIMING_COLUMNS[:4], rows)}


# ------------------------------------------------------------------------------------------------
# scaling with the token count
# ------------------------------------------------------------------------------------------------


def section_scaling(ctx: Ctx) -> dict:
    import torch

    import harness
    from crossvit_kernels.models import create_model
    from crossvit_kernels.ops import cross_attention
    name, B = ctx.cfg["fusion_model"], ctx.cfg["scaling_batch"]
    fused = [b for b in harness.FUSED_BACKENDS
             if harness.impl_status("cross_attention", b, ctx.device, ctx.dtype, ctx.args.allow_interpreter) is None]
    torch.manual_seed(0)
    # the all-attention scheme's transformer layer, at the width and heads it runs (branch 1's)
    allatt = create_model(name, fusion="all_attention", **ctx.cfg["model_kwargs"]).blocks[0].fusion
    allatt = allatt.to(ctx.device, ctx.dtype).eval()
    C, H = allatt.attn.qkv.in_features, allatt.attn.num_heads
    r = lambda *s, scale=1.0: harness.randn(*s, device=ctx.device, dtype=ctx.dtype, scale=scale)  # noqa: E731
    w = [r(C, C, scale=C ** -0.5) for _ in range(4)]
    b = [r(C, scale=0.02) for _ in range(4)]
    gamma, beta = 1 + r(C, scale=0.1), r(C, scale=0.1)
    rows = []
    for N in ctx.cfg["scaling_N"]:
        x = r(B, N, C)
        fns = {"all_attention": lambda: allatt(x)}
        for backend in ["reference"] + fused:
            fns[f"cross_attention/{backend}"] = (
                lambda backend=backend: cross_attention(x[:, 0], x[:, 1:], gamma, beta, w[0], b[0], w[1], b[1],
                                                        w[2], b[2], w[3], b[3], H, 1e-6, backend))
        fns["read"] = lambda: x.sum()
        fns = {k: harness._forward(f) for k, f in fns.items()}
        timings = ctx.time_group(ctx.timer, fns, dict(section="scaling", N=N, B=B, C=C, H=H), graph=True)
        for impl, t in timings.items():
            rows.append(dict(N=N, impl=impl, **t))
        ctx.log(f"   scaling N={N:5d} " + ", ".join(f"{k} {_ms(v)}" for k, v in timings.items()))
    return {"model": name, "B": B, "C": C, "H": H,
            "rows": harness.make_table(("N", "impl") + TIMING_COLUMNS, rows)}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    import load
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and repeats (smoke run, < 60 s)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/out/<tag>/)")
    p.add_argument("--results", action="store_true",
                   help="also copy results.json, summary.md and the plots into benchmarks/results/<tag>/")
    p.add_argument("--results-dir", default=None,
                   help="with --results: this folder instead of benchmarks/results/<tag>/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default fp32 on the CPU, bf16,fp32 "
                                                  "on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--models", default=None,
                   help="comma list of variant names or patterns for the op sections (default: all 11)")
    p.add_argument("--stage-models", default=None,
                   help="comma list of variant names or patterns whose geometries the fusion_stage section measures "
                        "(default: --models)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes of the op sections (default: the "
                                                   "device's: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--impls", default=None, help="comma list of the op sections' variants (default: timm, reference, "
                                                 "every fused backend here; on a GPU also sdpa, triton-unfused, "
                                                 "triton-core; the fusion stage's triton knobs; see harness.CA_EXTRA "
                                                 "and harness.STAGE_KNOBS)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (op sections)")
    p.add_argument("--load", default="none", help=f"background load during the run: {load.KINDS_HELP}")
    p.add_argument("--min-reps", type=int, default=None,
                   help="at least this many timed rounds per row of the op sections (default: the device's, 3 "
                        "on a CPU; a spread under load needs more)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="on the CPU, also run the Triton variants under TRITON_INTERPRET=1 (very slow; a smoke test "
                        "of the GPU sweep's code paths)")
    p.add_argument("--note", action="append", default=[], help="free text recorded with the results (repeatable)")
    args = p.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    bad = set(args.modes.split(",")) - {"fwd", "fwd+bwd"}
    if bad:
        p.error(f"unknown modes {sorted(bad)}; choose from fwd, fwd+bwd")
    try:
        load.parse_kind(args.load)
    except ValueError as exc:
        p.error(str(exc))
    if args.min_reps is not None and args.min_reps < 1:
        p.error(f"--min-reps must be at least 1, got {args.min_reps}")
    if args.batches:
        try:
            args.batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            p.error(f"--batches takes a comma list of integers, got {args.batches!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.allow_interpreter:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    import torch

    import harness
    import load
    import report
    from crossvit_kernels.info import device_tag, environment

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        dtypes = [harness.parse_dtype(d.strip()) for d in
                  (args.dtypes or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",")]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = make_config(args.quick, device.type)
    if args.batches:
        cfg["batches"] = args.batches
    if args.min_reps:
        cfg["timer"].update(min_reps=args.min_reps, max_reps=max(args.min_reps, cfg["timer"]["max_reps"]))
    ctx = Ctx(args, device, cfg)
    env = environment(device)
    tag = device_tag(device)
    out = args.out or os.path.join(harness.OUT_DIR, tag)
    os.makedirs(out, exist_ok=True)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    if "roofline" not in sections:
        sections.insert(0, "roofline")  # every other section reports against it
    monitor = CpuLoad()
    ctx.log(f"crossvit-kernels benchmarks on {env['device']} ({device.type}, {threads} threads), dtypes "
            f"{[harness.dtype_name(d) for d in dtypes]}, {'quick' if args.quick else 'full'} mode, load {args.load} "
            f"-> {out}")
    ctx.log(f"versions: {env['versions']}; commit {env['commit']}; load average {env['load_average']}")
    notes = list(args.note)
    if device.type == "cpu" and threads > 1 and args.load == "none":
        snap = monitor.snapshot()
        time.sleep(0.5)
        busy = monitor.others_cores(snap)
        if busy is not None and busy > 0.5:
            msg = (f"other processes were using {busy} cores at the start: with {threads} threads the OpenMP "
                   f"regions stall whenever a core is taken; --threads 1 gives steadier numbers on a shared machine")
            ctx.log("WARNING: " + msg)
            notes.append(msg)

    doc = {"schema": SCHEMA, "mode": "quick" if args.quick else "full", "tag": tag, "environment": env,
           "load": args.load, "argv": sys.argv[1:] if argv is None else list(argv), "notes": notes,
           "settings": {k: v for k, v in cfg.items() if k != "model_kwargs"}, "by_dtype": {}, "section_seconds": {},
           "failed": [], "errors": ctx.errors, "partial": True}
    path = os.path.join(out, "results.json")
    dest = (args.results_dir or os.path.join(harness.RESULTS_DIR, tag)) if args.results else None
    if dest and os.path.exists(os.path.join(dest, "results.json")):
        # this run replaces the sections; the end-to-end rows merged there earlier stay
        old = harness.read_results(os.path.join(dest, "results.json"))
        if old.get("e2e"):
            doc["e2e"] = old["e2e"]

    def save():
        harness.write_results(path, doc)
        if dest:
            harness.write_results(os.path.join(dest, "results.json"), doc)
    ctx.save = save
    status = 0
    with load.generate(args.load, log=ctx.log):
        for dtype in dtypes:
            ctx.dtype = dtype
            per: Dict[str, dict] = {}
            doc["by_dtype"][ctx.dname] = ctx.per = per
            for sec in sections:
                snap, t0 = monitor.snapshot(), time.perf_counter()
                ctx.log(f"== section {sec} ({ctx.dname}) ==")
                try:
                    per[sec] = globals()[f"section_{sec}"](ctx)
                except Exception as exc:  # one broken section must not hide the others
                    traceback.print_exc()
                    per[sec] = dict(per.get(sec, {}), error=f"{type(exc).__name__}: {exc}"[:500])
                    doc["failed"].append(f"{ctx.dname}/{sec}")
                    status = 1
                    if sec == "roofline":
                        break  # nothing else can be reported against it
                doc["section_seconds"][f"{ctx.dname}/{sec}"] = {
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                    "other_processes_cores": monitor.others_cores(snap)}
                save()
    doc.pop("partial")
    doc["runtime_s"] = round(time.perf_counter() - ctx.t0, 1)
    if ctx.errors:
        doc["failed"] += sorted({f"{e['dtype']}/{e['section']}/{e['impl']}" for e in ctx.errors})
        status = 1
    others = monitor.others_cores()
    doc["other_processes_cores"] = others
    try:
        doc["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        doc["load_average_end"] = None
    if others is not None and others > 0.25 and args.load == "none":
        doc["notes"].append(f"machine busy: other processes used {others} cores on average during the run (of "
                            f"{os.cpu_count()}); timings are pessimistic and noisier than on an idle machine")
    save()
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump({"tag": tag, "environment": env, "samples": ctx.samples}, f)
    written = report.write(out, doc, plots=not args.no_plots)
    print(report.render(doc), flush=True)
    ctx.log(f"wrote {path}, samples.json, {', '.join(os.path.basename(w) for w in written)}; runtime "
            f"{doc['runtime_s']} s; other processes used {others} cores on average")
    if dest:
        for f in written:
            shutil.copy2(f, os.path.join(dest, os.path.basename(f)))
        ctx.log(f"wrote the results to {dest}")
    if doc["failed"]:
        print(f"FAILED: {doc['failed']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
