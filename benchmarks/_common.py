"""Shared helpers of the benchmark suite: environment record, timing, shapes, cost models.

Used by ``benchmarks/run.py`` and the pytest-benchmark suites ``benchmarks/test_bench_*.py``.
Nothing here runs at import time beyond cheap imports.

Conventions (stated once, used everywhere):

* Times are milliseconds. A measurement is a dict ``{median_ms, q25_ms, q75_ms, min_ms, max_ms,
  reps}``: median and inter-quartile range over ``reps`` repeats after warm-up.
* CPU: ``time.perf_counter`` around each call, ``torch.set_num_threads`` fixed by the caller;
  the contenders of one comparison are timed interleaved, round by round (``Timer.group``), so
  that load from other processes falls on all of them alike.
  CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between repeats), and for forward
  calls that take microseconds also ``do_bench_cudagraph`` (launch overhead removed).
* "fwd" is an inference forward under ``torch.no_grad()``; "fwd+bwd" is a forward with autograd
  and ``backward`` of a fixed random output gradient (parameter gradients reset to None between
  repeats, outside the timed region).
* Multiply-adds (MACs) count one multiply and one add as one; backward is counted as twice the
  forward (the usual convention), so fwd+bwd = 3 x fwd.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    from crossvit_kernels.info import cpu_model as _cpu_model
    return _cpu_model()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _version(module_name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module_name)
    except Exception:
        return None


def versions() -> Dict[str, Optional[str]]:
    import crossvit_kernels
    out = {
        "crossvit_kernels": crossvit_kernels.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return out


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device) -> str:
    """Folder name of a machine's results: ``cpu-amd-epyc-2t``, ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return "cuda-" + slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model())}-{torch.get_num_threads()}t"


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------

FUSED_BACKENDS = ("triton", "cuda", "cpp", "torch")


def fused_backends(op: str, device: torch.device, dtype: torch.dtype, allow_interpreter: bool = False
                   ) -> Dict[str, Optional[str]]:
    """{backend: None if it can run ``op`` here, else the reason}, fused backends only.

    Triton on a CPU tensor means the interpreter (TRITON_INTERPRET=1): a correctness tool, not
    something to time, so it is skipped unless ``allow_interpreter``.
    """
    from crossvit_kernels.backends import resolve_backend
    out: Dict[str, Optional[str]] = {}
    for name in FUSED_BACKENDS:
        if name == "triton" and device.type != "cuda" and not allow_interpreter:
            out[name] = "CPU tensors run Triton only in the interpreter (not timed)"
            continue
        try:
            resolve_backend(op, name, device, dtype)
            out[name] = None
        except Exception as exc:  # RuntimeError with the reason; anything else is a broken backend
            out[name] = str(exc).split(": ", 1)[-1][:200]
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _summary(times_ms: Sequence[float]) -> dict:
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)).tolist()
    return {"median_ms": q[0], "q25_ms": q[1], "q75_ms": q[2], "min_ms": float(t.min()),
            "max_ms": float(t.max()), "reps": len(times_ms)}


class Timer:
    """Times a callable on the CPU (perf_counter) or on a GPU (triton.testing.do_bench).

    CPU: ``warmup`` untimed calls, then repeats until ``min_reps`` are done and ``budget_s`` has
    passed, at most ``max_reps``. CUDA: do_bench with ``warmup_ms`` / ``rep_ms``; forward calls
    whose median is under ``graph_below_ms`` are also timed with do_bench_cudagraph.
    """

    def __init__(self, device: torch.device, *, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
                 budget_s: float = 0.5, warmup_ms: int = 25, rep_ms: int = 100, graph_below_ms: float = 0.05):
        self.device = device
        self.warmup, self.min_reps, self.max_reps, self.budget_s = warmup, min_reps, max_reps, budget_s
        self.warmup_ms, self.rep_ms, self.graph_below_ms = warmup_ms, rep_ms, graph_below_ms

    def __call__(self, fn: Callable[[], object], grad_to_none: Optional[Iterable[torch.Tensor]] = None,
                 graphable: bool = False) -> dict:
        leaves = list(grad_to_none or [])
        if self.device.type == "cuda":
            return self._cuda(fn, leaves, graphable)
        return self._cpu(fn, leaves)

    def group(self, fns: Dict[str, Callable[[], object]], grad_to_none: Optional[Dict[str, list]] = None,
              graphable: bool = False) -> Dict[str, dict]:
        """Time several callables side by side: ``{name: measurement}``.

        On the CPU the calls are interleaved (one call of each per round, the order reversed every
        other round) so that load from other processes, frequency changes and drift fall on every
        contender alike; rounds continue until ``min_reps`` are done and ``budget_s`` per callable
        has passed. On a GPU each callable gets its own do_bench (events make that fair already).
        """
        leaves = {k: list((grad_to_none or {}).get(k) or []) for k in fns}
        if self.device.type == "cuda":
            return {k: self._cuda(fn, leaves[k], graphable) for k, fn in fns.items()}
        names = list(fns)
        for _ in range(self.warmup):
            for k in names:
                self._reset(leaves[k])
                fns[k]()
        times: Dict[str, List[float]] = {k: [] for k in names}
        start, rounds = time.perf_counter(), 0
        budget = self.budget_s * len(names)
        while rounds < self.max_reps and (rounds < self.min_reps or time.perf_counter() - start < budget):
            for k in (names if rounds % 2 == 0 else names[::-1]):
                self._reset(leaves[k])
                t0 = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        return {k: dict(_summary(v), interleaved_with=len(names) - 1) for k, v in times.items()}

    @staticmethod
    def _reset(leaves: List[torch.Tensor]) -> None:
        for t in leaves:
            t.grad = None

    def _cpu(self, fn, leaves) -> dict:
        for _ in range(self.warmup):
            self._reset(leaves)
            fn()
        times = []
        start = time.perf_counter()
        while len(times) < self.max_reps and (len(times) < self.min_reps or time.perf_counter() - start < self.budget_s):
            self._reset(leaves)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times)

    def _cuda(self, fn, leaves, graphable) -> dict:
        from triton.testing import do_bench
        quantiles = [0.5, 0.25, 0.75, 0.0, 1.0]
        q = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=leaves or None, quantiles=quantiles)
        res = {"median_ms": q[0], "q25_ms": q[1], "q75_ms": q[2], "min_ms": q[3], "max_ms": q[4],
               "reps": None, "method": "do_bench"}
        if graphable and q[0] < self.graph_below_ms:
            try:
                from triton.testing import do_bench_cudagraph
                g = do_bench_cudagraph(fn, rep=self.rep_ms, quantiles=quantiles)
                res.update({"graph_median_ms": g[0], "graph_q25_ms": g[1], "graph_q75_ms": g[2]})
            except Exception as exc:  # capture can fail for ops that sync; keep the event timing
                res["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return res


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# shapes of the published variants
# ------------------------------------------------------------------------------------------------


def variant_geometry(name: str) -> dict:
    """Widths, heads, token grids and fusion shapes of a variant (read off a meta-device model)."""
    from crossvit_kernels.models import create_model
    m = create_model(name, device="meta")
    C0, C1 = m.embed_dim
    H0 = m.blocks[0].blocks[0][0].attn.num_heads
    H1 = m.blocks[0].blocks[1][0].attn.num_heads
    P0, P1 = (pe.num_patches for pe in m.patch_embed)
    return {
        "model": name, "img_size": m.img_size[0], "branch_sizes": [s[0] for s in m.img_size_scaled],
        "patch_sizes": [pe.patch_size[0] for pe in m.patch_embed], "embed_dim": [C0, C1], "num_heads": [H0, H1],
        "num_patches": [P0, P1], "dagger": bool(m.patch_embed[0].multi_conv),
        # fusion[0]: branch 0's projected CLS attends over branch 1's tokens, width C1, heads H1;
        # fusion[1]: branch 1's projected CLS attends over branch 0's tokens, width C0, heads H0.
        "fusion_shapes": [{"fusion": 0, "N": 1 + P1, "C": C1, "H": H1},
                          {"fusion": 1, "N": 1 + P0, "C": C0, "H": H0}],
    }


# ------------------------------------------------------------------------------------------------
# cost models (analytic)
# ------------------------------------------------------------------------------------------------


def ca_macs_textbook(B: int, N: int, C: int) -> int:
    """Forward MACs of timm's CrossAttentionBlock: q of the CLS, K and V of all N tokens, scores,
    weighted sum of V, output projection (LayerNorm and softmax are not multiply-adds)."""
    return B * (C * C + 2 * N * C * C + 2 * N * C + C * C)


def ca_macs_absorbed(B: int, N: int, C: int, H: int) -> int:
    """Forward MACs of the absorbed form: q, key absorption (H*d*C = C^2), H scores and H weighted
    sums per token, value projection after the sum (C^2), output projection."""
    return B * (4 * C * C + 2 * N * C * H)


def ca_bytes(B: int, N: int, C: int, elt: int, form: str, mode: str) -> int:
    """Bytes moved, modelled: ``fused`` reads the tokens once (fwd) and in backward reads them once
    more and writes their gradient once; ``textbook`` writes and reads back every (B, N, C)
    intermediate (cat, LayerNorm, K, V: ten passes in forward; backward estimated as twice that)."""
    T = B * N * C * elt
    W = 4 * C * C * elt
    small = 3 * B * C * elt
    if form == "fused":
        return T + W + small if mode == "fwd" else 3 * T + 3 * W + 2 * small
    fwd = 10 * T + W + small
    return fwd if mode == "fwd" else 3 * fwd


def pe_macs(B: int, P: int, C: int, K: int) -> int:
    return B * P * C * K


def pe_bytes(B: int, Cin: int, Hpx: int, Wpx: int, P: int, C: int, K: int, elt: int, mode: str) -> int:
    """Fused patch embedding: image read once, token buffer written once, weight + position
    embedding read once. Backward (images need no gradient): grad read once, weight-sized
    gradients written."""
    img = B * Cin * Hpx * Wpx * elt
    out = B * (1 + P) * C * elt
    params = (C * K + (1 + P) * C + 2 * C) * elt
    fwd = img + out + params
    return fwd if mode == "fwd" else fwd + out + img + params


# ------------------------------------------------------------------------------------------------
# output helpers
# ------------------------------------------------------------------------------------------------


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_num(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def table(rows: List[List[str]], header: List[str]) -> str:
    """A GitHub-markdown table, columns padded for reading in a terminal."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in cells[1:]])


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def save_rows(path: str, rows: List[dict]) -> None:
    """Write a benchmark's result rows as JSON (creating the folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, rows)
    print(f"wrote {len(rows)} rows to {path}")
