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
    timm+ort       timm's ONNX export run by onnxruntime                   (float32 CPU inference)
    patched        timm model after crossvit_kernels.patch_timm()
    ours           crossvit_kernels.create_model(name) with timm's weights
    ours+compile   torch.compile(ours)                                     (--compile)
    ours+ort       our model's ONNX export run by onnxruntime              (float32 CPU inference)
    ours+ckpt      ours with set_grad_checkpointing(True)                  (training)
    deit_small     timm's deit_small_patch16_224 (224 px), the efficiency yardstick (--yardstick)

Inference steps run under ``torch.no_grad()`` in eval mode (as in timm's benchmark); a training step is forward,
cross-entropy on random labels, backward and an SGD step (as in timm's benchmark). Reported per
variant: images/s, step time (median, 25th/75th percentile, min), speedup against timm eager,
the textbook multiply-add count of the unpatched timm model (``torch.utils.flop_counter`` on one
image; a training step counts three times the forward) and the effective GMAC/s it implies at
the measured speed, plus device, dtype, threads, backend, versions and commit on every row
(:func:`crossvit_kernels.info.environment`). The process CPU time per step (``cpu_ms_median``) is
recorded too: on a machine shared with other jobs it is far steadier than the wall-clock time (it
still counts the worker threads' spin-waiting). A training step also reports the activation
memory its forward keeps for the backward (``act_mem_mib``: :func:`saved_activation_bytes`).

The onnxruntime variants export the eval-mode model at the benchmark's batch size with
``torch.onnx.export`` (``--onnx-exporter``: ``dynamo``, torch's default, or ``torchscript``) and run
it on onnxruntime's CPU provider with the torch thread count as its intra-op threads, spinning
off (idle worker threads sleep, as suits a shared machine). They need the onnxruntime package
(and onnxscript for the dynamo exporter), which the package itself does not depend on.
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
import warnings
from typing import Dict, List, Optional, Union

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
VARIANTS = ("timm", "timm+compile", "timm+ort", "patched", "ours", "ours+compile", "ours+ort", "ours+ckpt",
            "deit_small")
ORT_VARIANTS = ("timm+ort", "ours+ort")
EXPORTERS = ("dynamo", "torchscript")
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
    p.add_argument("--onnx-exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx.export route of the onnxruntime variants: dynamo (torch.onnx.export(dynamo=True), "
                        "the default) or torchscript (dynamo=False)")
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

    def activation_bytes(self) -> int:
        """:func:`saved_activation_bytes` of one training step's forward."""
        with self._autocast():
            return saved_activation_bytes(self.fn, self.model, self.images,
                                          lambda out: self.loss(out.float(), self.target))

    def _step(self) -> None:
        if self.train:
            self.opt.zero_grad(set_to_none=True)
            out = self.fn(self.images)
            self.loss(out.float(), self.target).backward()
            self.opt.step()
        else:
            with torch.no_grad():   # as timm's benchmark does
                self.fn(self.images)


def saved_activation_bytes(fn, model: nn.Module, images: torch.Tensor, loss) -> int:
    """The activation memory a training step keeps for its backward: bytes of the distinct storages
    of the tensors its forward (``loss(fn(images))``) saves for the backward, as
    ``torch.autograd.graph.saved_tensors_hooks`` sees them (a view counts its whole storage, once;
    the parameters, buffers and images are not activations and are left out). Under
    ``torch.utils.checkpoint`` a checkpointed region's inputs count, its recomputed insides do not."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), images)}
    kept: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(fn(images))
    return sum(kept.values())


def ort_unavailable(exporter: str) -> Optional[str]:
    """None when onnxruntime (and the exporter's own dependency) can be imported, else why not."""
    import importlib.util
    need = ["onnxruntime", "onnx"] + (["onnxscript"] if exporter == "dynamo" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install {' '.join(missing)})" if missing else None


class _OrtRunner:
    """An onnxruntime variant: ``model`` exported to ONNX (eval mode, at the images' batch size)
    and run on onnxruntime's CPU provider with ``threads`` intra-op threads, spinning off."""

    def __init__(self, name: str, model: nn.Module, images: torch.Tensor, threads: int, exporter: str):
        import tempfile

        import onnxruntime as ort
        self.name, self.model, self.images = name, model.eval(), images
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            kw = dict(dynamo=True, verbose=False) if exporter == "dynamo" else dict(dynamo=False)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # the exporters' deprecation and tracer warnings
                    torch.onnx.export(model, (images,), path, input_names=["images"], **kw)
            except Exception as exc:
                raise RuntimeError(f"{name}: torch.onnx.export(dynamo={exporter == 'dynamo'}) failed: {exc}") from exc
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.feed = {self.session.get_inputs()[0].name: images.contiguous().numpy()}

    def logits(self) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feed)[0])

    def step(self) -> None:
        self.session.run(None, self.feed)


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
    ort_wanted = [v for v in ORT_VARIANTS if v in wanted]
    if ort_wanted:
        why = (ort_unavailable(args.onnx_exporter) if device.type == "cpu" and args.precision in ("fp32", "float32")
               else "they run float32 models on the CPU")
        if why is None and "inference" not in benches:
            why = "they time inference"
        if why is not None:
            say(f"skipping {', '.join(ort_wanted)}: {why}")
            wanted -= set(ORT_VARIANTS)
    if "ours+ckpt" in wanted and "train" not in benches:
        say("skipping ours+ckpt: activation checkpointing changes training steps only")
        wanted.discard("ours+ckpt")
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
            here = wanted - ({*ORT_VARIANTS} if train else {"ours+ckpt"})
            say(f"[{name}] {bench}: preparing {', '.join(v for v in VARIANTS if v in here)}")
            runners: List[Union[_Runner, _OrtRunner]] = []

            def fresh_timm() -> nn.Module:
                m = timm.create_model(name)
                m.load_state_dict(base_sd)
                return prepare(m)

            runners.append(Runner("timm", fresh_timm(), images, train, tm.num_classes))
            if "timm+compile" in here:
                runners.append(Runner("timm+compile", fresh_timm(), images, train, tm.num_classes, True,
                                       args.compile_mode))
            if "timm+ort" in here:
                say(f"[{name}] exporting timm's model to ONNX ({args.onnx_exporter})")
                runners.append(_OrtRunner("timm+ort", fresh_timm(), images, torch.get_num_threads(),
                                          args.onnx_exporter))
            if "patched" in here:
                runners.append(Runner("patched", ck.patch_timm(fresh_timm(), backend=args.backend), images, train,
                                       tm.num_classes))
            if here & {"ours", "ours+compile", "ours+ort", "ours+ckpt"}:
                def fresh_ours() -> nn.Module:
                    m = ck.create_model(name, backend=args.backend)
                    m.load_state_dict(base_sd)
                    return prepare(m)
                if "ours" in here:
                    runners.append(Runner("ours", fresh_ours(), images, train, tm.num_classes))
                if "ours+compile" in here:
                    runners.append(Runner("ours+compile", fresh_ours(), images, train, tm.num_classes, True,
                                           args.compile_mode))
                if "ours+ort" in here:
                    say(f"[{name}] exporting our model to ONNX ({args.onnx_exporter})")
                    runners.append(_OrtRunner("ours+ort", fresh_ours(), images, torch.get_num_threads(),
                                              args.onnx_exporter))
                if "ours+ckpt" in here:
                    m = fresh_ours()
                    m.set_grad_checkpointing(True)
                    runners.append(Runner("ours+ckpt", m, images, train, tm.num_classes))
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
            act_mib: Dict[str, float] = {}
            if train:
                say(f"[{name}] train: activation memory kept for the backward")
                for r in runners:
                    act_mib[r.name] = r.activation_bytes() / 2 ** 20
                    say(f"    {r.name:13s} {act_mib[r.name]:.1f} MiB")

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
                    act_mem_mib=act_mib.get(r.name, float("nan")),
                    compiled="compile" in r.name, onnx_exporter=args.onnx_exporter if r.name in ORT_VARIANTS else "",
                    num_bench_iter=args.num_bench_iter, **common))
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
    train = r0["bench"] == "train"
    head = f"{'variant':14s} {'img/s':>9s} {'step ms (median)':>17s} {'p25-p75':>17s} {'speedup':>8s} " \
           f"{'GMAC/img':>9s} {'GMAC/s':>8s} {'check':>10s}" + (f" {'act MiB':>9s}" if train else "")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = "" if math.isnan(r["speedup_vs_timm"]) else f"{r['speedup_vs_timm']:.3f}x"
        chk = "" if r["check_ok"] == "" else (f"{r['check_max_rel_diff']:.1e}" + ("" if r["check_ok"] else "!"))
        spread = f"{r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}"
        print(f"{r['variant']:14s} {r['img_per_s']:9.1f} {r['step_ms_median']:17.2f} {spread:>17s} {sp:>8s} "
              f"{r['gmac_per_img']:9.3f} {r['gmac_per_s']:8.1f} {chk:>10s}"
              + (f" {r['act_mem_mib']:9.1f}" if train else ""))
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
