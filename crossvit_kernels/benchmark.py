"""End-to-end benchmark: crossvit_kernels against timm, side by side, in one run.

Shaped like timm's ``benchmark.py``::

    python -m crossvit_kernels.benchmark --model crossvit_18_dagger_240 --bench both --batch-size 64
    python -m crossvit_kernels.benchmark --model 'crossvit_*_240' --precision bf16 --results-file out.csv

For every model it builds timm's CrossVit (random weights, or ``--checkpoint``) and, from the same
state_dict, the variants below; checks that their logits agree with timm eager's (within the
tolerance of the precision) before timing anything; then times them with the project's one timer
(:mod:`crossvit_kernels.timing`): interleaved, one step of each variant per round, so that a
noisy machine slows all of them alike (CUDA: events, each step started on an idle device):

    timm           timm eager (the baseline every speedup is measured against)
    timm+compile   torch.compile(timm model)                               (--compile)
    patched        timm model after crossvit_kernels.patch_timm()
    ours           crossvit_kernels.create_model(name) with timm's weights
    ours+compile   torch.compile(ours)                                     (--compile)
    deit_small     timm's deit_small_patch16_224 (224 px), the efficiency yardstick (--yardstick)

Inference steps run under ``torch.no_grad()`` in eval mode (as in timm's benchmark); a training step is forward,
cross-entropy on random labels, backward and an SGD step (as in timm's benchmark). Reported per
variant: images/s, step time (median, 25th/75th percentile, min), speedup against timm eager,
the textbook multiply-add count of the unpatched timm model (``torch.utils.flop_counter`` on one
image; a training step counts three times the forward) and the effective GMAC/s it implies at
the measured speed, plus device, dtype, threads, backend, versions and commit on every row
(:func:`crossvit_kernels.info.environment`). The process CPU time per step (``cpu_ms_median``) is
recorded too: on a machine shared with other jobs it is far steadier than the wall-clock time (it
still counts the worker threads' spin-waiting).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .info import environment
from .timing import Timer

__all__ = ["main", "parse_args", "run"]

PRECISIONS = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}
#: mixed precision: float32 weights and images, every step under torch.autocast to this dtype
AMP = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}
#: max |logits - timm eager logits| allowed, relative to max(1, max |timm logits|)
CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
VARIANTS = ("timm", "timm+compile", "patched", "ours", "ours+compile", "deit_small")
YARDSTICK = "deit_small_patch16_224"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m crossvit_kernels.benchmark",
                                description="Time crossvit_kernels against timm's CrossViT, side by side.")
    p.add_argument("--model", "-m", nargs="+", default=["crossvit_9_240"],
                   help="model name(s) or shell wildcards, e.g. 'crossvit_*_240' (default: crossvit_9_240)")
    p.add_argument("--bench", choices=("inference", "train", "both"), default="inference")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--precision", choices=sorted(PRECISIONS) + sorted(AMP), default="fp32",
                   help="the model and the images are converted to this dtype; amp_bf16 / amp_fp16 keep them in "
                        "float32 and run every step under torch.autocast (mixed precision)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile'd timm and ours (default: on for CUDA, off on the CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead or max-autotune (default: torch's default)")
    p.add_argument("--channels-last", action="store_true", help="channels_last images and model")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--num-warm-iter", type=int, default=3)
    p.add_argument("--num-bench-iter", type=int, default=10)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (timm eager is always timed)")
    p.add_argument("--yardstick", dest="yardstick", action="store_true", default=True,
                   help=f"time timm's {YARDSTICK} too (default)")
    p.add_argument("--no-yardstick", dest="yardstick", action="store_false")
    p.add_argument("--backend", default=None, help="backend of the fused ops (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for a CPU run")
    p.add_argument("--checkpoint", default=None, help="local timm checkpoint to load (default: random weights)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the output check")
    p.add_argument("--results-file", default="", help="write the rows to this .csv or .json file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_bench_iter < 1 or args.num_warm_iter < 0:
        p.error("--batch-size and --num-bench-iter must be >= 1, --num-warm-iter >= 0")
    if args.results_file and not args.results_file.endswith((".csv", ".json")):
        p.error("--results-file must end in .csv or .json")
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    return args


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str, end: str = "\n") -> None:
        if not self.quiet:
            print(msg, end=end, file=sys.stderr, flush=True)


def _expand_models(patterns: List[str]) -> List[str]:
    from .models import list_models
    names: List[str] = []
    for pat in patterns:
        found = list_models(pat)
        if not found:
            raise SystemExit(f"no CrossViT model matches {pat!r}; known: {', '.join(list_models())}")
        names += [n for n in found if n not in names]
    return names


def count_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-adds of one forward on ``example`` (torch.utils.flop_counter, FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() / 2.0


def _max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.detach().abs().max()))
    return float((out.detach().float() - ref.detach().float()).abs().max()) / scale


class _Runner:
    """One variant: a model, its images, and one timed step (inference or training)."""

    def __init__(self, name: str, model: nn.Module, images: torch.Tensor, train: bool, num_classes: int,
                 compiled: bool = False, compile_mode: Optional[str] = None, amp: Optional[torch.dtype] = None):
        self.name, self.images, self.train = name, images, train
        self.amp = amp
        self.model = model.train(train)
        self.fn = torch.compile(model, mode=compile_mode) if compiled else model
        if train:
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
            g = torch.Generator().manual_seed(0)
            self.target = torch.randint(0, num_classes, (images.shape[0],), generator=g).to(images.device)
            self.loss = nn.CrossEntropyLoss()

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.images.device.type, dtype=self.amp)

    def logits(self) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.fn(self.images)

    def step(self) -> None:
        with self._autocast():
            self._step()

    def _step(self) -> None:
        if self.train:
            self.opt.zero_grad(set_to_none=True)
            out = self.fn(self.images)
            self.loss(out.float(), self.target).backward()
            self.opt.step()
        else:
            with torch.no_grad():   # as timm's benchmark does
                self.fn(self.images)


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    import timm

    import crossvit_kernels as ck
    from . import backends as _backends
    from .models import convert_checkpoint

    say = _Progress(args.quiet)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = AMP.get(args.precision)
    dtype = torch.float32 if amp is not None else PRECISIONS[args.precision]
    check_tol = CHECK_TOL[amp if amp is not None else dtype]
    Runner = functools.partial(_Runner, amp=amp)
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    wanted = set(v for v in args.variants.split(",") if v) | {"timm"}
    if not compile_on:
        wanted -= {"timm+compile", "ours+compile"}
    if not args.yardstick:
        wanted.discard("deit_small")
    benches = ["inference", "train"] if args.bench == "both" else [args.bench]
    memfmt = torch.channels_last if args.channels_last else torch.contiguous_format
    try:
        xattn_backend = _backends.resolve_backend("cross_attention", args.backend, device, dtype)
    except RuntimeError as exc:
        xattn_backend = f"unavailable: {exc}"
    env = environment(device)
    common = dict(device=str(device), device_name=env["device"] + (
                      f" ({env['threads']} threads)" if device.type == "cpu" else ""),
                  dtype=str(dtype).replace("torch.", "") + (
                      f"+autocast({str(amp).replace('torch.', '')})" if amp is not None else ""),
                  batch_size=args.batch_size, channels_last=bool(args.channels_last), threads=env["threads"],
                  backend=xattn_backend, torch=torch.__version__, timm=timm.__version__,
                  crossvit_kernels=ck.__version__, python=env["versions"]["python"], commit=env["commit"])
    # whole steps are far larger than the GPU's L2 cache: no flush between them
    timer = Timer(device, warmup=args.num_warm_iter, min_reps=args.num_bench_iter, max_reps=args.num_bench_iter,
                  budget_s=0.0, flush_l2=False)
    rows: List[Dict[str, object]] = []
    g = torch.Generator().manual_seed(args.seed)

    def prepare(m: nn.Module) -> nn.Module:
        return m.to(device=device, dtype=dtype, memory_format=memfmt)

    for name in _expand_models(args.model):
        say(f"[{name}] building models on {device} ({common['dtype']}, batch {args.batch_size})")
        torch.manual_seed(args.seed)
        tm = timm.create_model(name)
        if args.checkpoint:
            tm.load_state_dict(convert_checkpoint(torch.load(args.checkpoint, map_location="cpu",
                                                                       weights_only=True)))
        H, W = tm.img_size
        macs = count_macs(tm.eval(), torch.randn(1, 3, H, W, generator=g)) / 1e9
        images = torch.randn(args.batch_size, 3, H, W, generator=g).to(device=device, dtype=dtype,
                                                                          memory_format=memfmt)
        base_sd = tm.state_dict()
        deit = deit_macs = deit_images = None
        if "deit_small" in wanted:
            torch.manual_seed(args.seed)
            deit = timm.create_model(YARDSTICK)
            deit_macs = count_macs(deit.eval(), torch.randn(1, 3, 224, 224, generator=g)) / 1e9
            deit_images = torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device=device, dtype=dtype,
                                                                                   memory_format=memfmt)

        for bench in benches:
            train = bench == "train"
            say(f"[{name}] {bench}: preparing {', '.join(v for v in VARIANTS if v in wanted)}")
            runners: List[_Runner] = []

            def fresh_timm() -> nn.Module:
                m = timm.create_model(name)
                m.load_state_dict(base_sd)
                return prepare(m)

            runners.append(Runner("timm", fresh_timm(), images, train, tm.num_classes))
            if "timm+compile" in wanted:
                runners.append(Runner("timm+compile", fresh_timm(), images, train, tm.num_classes, True,
                                       args.compile_mode))
            if "patched" in wanted:
                runners.append(Runner("patched", ck.patch_timm(fresh_timm(), backend=args.backend), images, train,
                                       tm.num_classes))
            if "ours" in wanted or "ours+compile" in wanted:
                def fresh_ours() -> nn.Module:
                    m = ck.create_model(name, backend=args.backend)
                    m.load_state_dict(base_sd)
                    return prepare(m)
                if "ours" in wanted:
                    runners.append(Runner("ours", fresh_ours(), images, train, tm.num_classes))
                if "ours+compile" in wanted:
                    runners.append(Runner("ours+compile", fresh_ours(), images, train, tm.num_classes, True,
                                           args.compile_mode))
            if deit is not None:
                d = copy.deepcopy(deit)
                runners.append(Runner("deit_small", prepare(d), deit_images, train, d.num_classes))

            checks: Dict[str, Optional[float]] = {}
            if args.check:
                say(f"[{name}] {bench}: checking outputs against timm eager")
                ref = runners[0].logits()
                for r in runners[1:]:
                    if r.name == "deit_small":
                        continue
                    t0 = time.perf_counter()
                    diff = _max_rel_diff(r.logits(), ref)
                    checks[r.name] = diff
                    ok = diff <= check_tol
                    say(f"    {r.name:13s} max |diff| / scale = {diff:.2e} ({'ok' if ok else 'MISMATCH'})"
                        + (f", first call {time.perf_counter() - t0:.1f} s" if "compile" in r.name else ""))
            for r in runners:   # restore train/eval mode after the checks
                r.model.train(train)

            def progress(stage, i, n, name=name, bench=bench):
                say(f"\r[{name}] {bench}: {stage} {i}/{n}", end="\n" if i == n else "")

            timings = timer.group({r.name: r.step for r in runners}, catch=False, progress=progress)
            base = timings["timm"]["median_ms"] / 1e3
            for r in runners:
                t = timings[r.name]
                s = dict(step_ms_median=t["median_ms"], step_ms_p25=t["q25_ms"], step_ms_p75=t["q75_ms"],
                         step_ms_min=t["min_ms"], step_ms_max=t["max_ms"])
                is_deit = r.name == "deit_small"
                gmac = (deit_macs if is_deit else macs) * (3.0 if train else 1.0)
                med = s["step_ms_median"] / 1e3
                diff = checks.get(r.name)
                rows.append(dict(
                    model=YARDSTICK if is_deit else name, variant=r.name, bench=bench,
                    img_per_s=args.batch_size / med, **s, cpu_ms_median=t["cpu_ms"],
                    speedup_vs_timm=(base / med) if not is_deit else float("nan"),
                    gmac_per_img=gmac, gmac_per_s=gmac * args.batch_size / med,
                    check_max_rel_diff=float("nan") if diff is None else diff,
                    check_ok="" if diff is None else bool(diff <= check_tol),
                    compiled="compile" in r.name, num_bench_iter=args.num_bench_iter, **common))
            _print_table([r for r in rows if r["bench"] == bench and r["model"] in (name, YARDSTICK)][-len(runners):])
    if args.results_file:
        _write(rows, args.results_file)
        say(f"wrote {len(rows)} rows to {args.results_file}")
    return rows


def _print_table(rows: List[Dict[str, object]]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\n{r0['model']}  {r0['bench']}  batch {r0['batch_size']}  {r0['dtype']}  {r0['device_name']}  "
          f"backend {r0['backend']}  torch {r0['torch']}  timm {r0['timm']}")
    head = f"{'variant':14s} {'img/s':>9s} {'step ms (median)':>17s} {'p25-p75':>17s} {'speedup':>8s} " \
           f"{'GMAC/img':>9s} {'GMAC/s':>8s} {'check':>10s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = "" if math.isnan(r["speedup_vs_timm"]) else f"{r['speedup_vs_timm']:.3f}x"
        chk = "" if r["check_ok"] == "" else (f"{r['check_max_rel_diff']:.1e}" + ("" if r["check_ok"] else "!"))
        spread = f"{r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}"
        print(f"{r['variant']:14s} {r['img_per_s']:9.1f} {r['step_ms_median']:17.2f} {spread:>17s} {sp:>8s} "
              f"{r['gmac_per_img']:9.3f} {r['gmac_per_s']:8.1f} {chk:>10s}")
    sys.stdout.flush()


def _write(rows: List[Dict[str, object]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        return
    fields = list(rows[0].keys()) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    bad = [r for r in rows if r["check_ok"] is False]
    if bad:
        print(f"output check failed for: {', '.join(sorted({r['model'] + '/' + r['variant'] for r in bad}))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
