"""The one timer of the project's measurements.

Used by the end-to-end CLI (``python -m crossvit_kernels.benchmark``) and by the benchmark harness
in ``benchmarks/`` (``make bench``, the pytest-benchmark suite, the GPU kernel sweep), so that every
number the project reports is taken the same way. Standard library and torch only.

:class:`Timer` times several callables side by side ("variants" of one comparison):

* **interleaved**: one call of each variant per round, the order reversed every other round, so
  that load from other processes, clock changes and drift fall on every variant alike;
* **warm-up**: ``warmup`` untimed rounds first (lazy initialisation, autotuning, allocator);
* **repeats**: rounds continue until ``min_reps`` are done and ``budget_s`` per variant has
  passed, at most ``max_reps``;
* **CPU**: ``time.perf_counter`` around each call;
  **CUDA**: CUDA events around each call on the current stream, each call started on an idle
  device (the L2 cache flushed by a write over twice its size, then a synchronisation, both
  outside the timed region), so that an eager call's time is its host launch overhead and its
  kernels together, whatever ran before it. ``graph=True`` captures each variant once in a CUDA
  graph (after warm-up calls on a side stream) and times its replays the same way: the device
  time of its kernels back to back, launch overhead removed;
* **summary** per variant: median, 25th / 75th percentile, min, max (milliseconds), the number
  of repeats, and the median process CPU time per call (``cpu_ms``: all threads of this process;
  on a shared machine far steadier than the wall clock, though it counts spin-waiting threads).

A variant that raises (a backend that cannot run the inputs, an out-of-memory textbook run) is
dropped from the remaining rounds and reported as ``{"error": "..."}``; ``catch=False`` re-raises
instead. :func:`clock` is the same clock for code that reads one itself (it synchronises CUDA
first): the pytest-benchmark suite hands it to pytest-benchmark.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["Timer", "clock", "summarize"]


def clock() -> float:
    """Seconds (``time.perf_counter``), after the work queued on the current CUDA device is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], cpu_ms: Sequence[float] = ()) -> Dict[str, float]:
    """Median, quartiles, extremes and count of ``times_ms``; ``cpu_ms`` the median of ``cpu_ms``."""
    if not times_ms:
        raise ValueError("summarize() needs at least one sample")
    t = sorted(times_ms)
    out = {"median_ms": _quantile(t, 0.5), "q25_ms": _quantile(t, 0.25), "q75_ms": _quantile(t, 0.75),
           "min_ms": t[0], "max_ms": t[-1], "reps": len(t)}
    if cpu_ms:
        out["cpu_ms"] = _quantile(sorted(cpu_ms), 0.5)
    return out


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


class Timer:
    """Times callables on ``device`` (see the module docstring).

    Args:
        device: where the callables run ("cpu", "cuda", a torch.device); CUDA work is timed with
            events, everything else with the host clock.
        warmup: untimed rounds before the timed ones.
        min_reps, max_reps: bounds on the timed rounds.
        budget_s: time per variant after which no new round starts (once ``min_reps`` are done).
        flush_l2: flush the GPU's L2 cache before each timed call (default: on for CUDA); off for
            work far larger than the cache (whole training steps), where it only costs time.
    """

    def __init__(self, device="cpu", *, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
                 budget_s: float = 0.5, flush_l2: Optional[bool] = None):
        self.device = torch.device(device)
        if warmup < 0 or min_reps < 1 or max_reps < min_reps or budget_s < 0:
            raise ValueError(f"Timer needs warmup >= 0, 1 <= min_reps <= max_reps and budget_s >= 0; got "
                             f"warmup={warmup}, min_reps={min_reps}, max_reps={max_reps}, budget_s={budget_s}")
        self.warmup, self.min_reps, self.max_reps, self.budget_s = warmup, min_reps, max_reps, budget_s
        self.cuda = self.device.type == "cuda"
        self.flush_l2 = self.cuda if flush_l2 is None else bool(flush_l2 and self.cuda)
        self._flush_buf: Optional[torch.Tensor] = None

    def settings(self) -> dict:
        return {"warmup": self.warmup, "min_reps": self.min_reps, "max_reps": self.max_reps,
                "budget_s": self.budget_s, "flush_l2": self.flush_l2}

    def __call__(self, fn: Callable[[], object], graph: bool = False, catch: bool = True,
                 keep_samples: bool = False) -> dict:
        """One callable: its summary (see :meth:`group`)."""
        return self.group({"fn": fn}, graph=graph, catch=catch, keep_samples=keep_samples)["fn"]

    def group(self, fns: Dict[str, Callable[[], object]], graph: bool = False, catch: bool = True,
              keep_samples: bool = False, progress: Optional[Callable[[str, int, int], None]] = None
              ) -> Dict[str, dict]:
        """``{name: summary}`` of callables timed side by side; ``keep_samples`` adds the raw
        per-call times as ``samples_ms``. ``graph`` (CUDA only): time CUDA-graph replays.
        ``progress(stage, i, n)`` is called before each round: stage "warm-up" or "round", i from
        1, n the most rounds of that stage."""
        if graph and not self.cuda:
            raise ValueError("graph=True times CUDA-graph replays: it needs a CUDA device")
        out: Dict[str, dict] = {}
        calls: Dict[str, Callable[[], object]] = {}
        for name, fn in fns.items():
            try:
                calls[name] = _capture(fn) if graph else fn
            except Exception as exc:
                if not catch:
                    raise
                out[name] = {"error": _error(exc)}
                self._recover()
        times: Dict[str, List[float]] = {k: [] for k in calls}
        cpu: Dict[str, List[float]] = {k: [] for k in calls}

        def run_round(order, timed):
            pending = []
            for name in order:
                if name not in calls:
                    continue
                try:
                    if self.cuda:
                        if self.flush_l2:
                            self._flush()
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        torch.cuda.synchronize(self.device)
                        c0 = time.process_time()
                        start.record()
                        calls[name]()
                        end.record()
                        if timed:
                            pending.append((name, start, end))
                    else:
                        c0 = time.process_time()
                        t0 = time.perf_counter()
                        calls[name]()
                        if timed:
                            times[name].append((time.perf_counter() - t0) * 1e3)
                    if timed:
                        cpu[name].append((time.process_time() - c0) * 1e3)
                except Exception as exc:
                    if not catch:
                        raise
                    out[name] = {"error": _error(exc)}
                    calls.pop(name)
                    times.pop(name, None)
                    cpu.pop(name, None)
                    self._recover()
            if pending:
                torch.cuda.synchronize(self.device)
                for name, start, end in pending:
                    if name in times:
                        times[name].append(start.elapsed_time(end))

        names = list(calls)
        for r in range(self.warmup):
            if progress:
                progress("warm-up", r + 1, self.warmup)
            run_round(names if r % 2 == 0 else names[::-1], timed=False)
        t_start, rounds = time.perf_counter(), 0
        budget = self.budget_s * max(1, len(calls))
        while calls and rounds < self.max_reps and (rounds < self.min_reps
                                                    or time.perf_counter() - t_start < budget):
            if progress:
                progress("round", rounds + 1, self.max_reps)
            run_round(names if rounds % 2 == 0 else names[::-1], timed=True)
            rounds += 1
        for name in names:
            if name in times and times[name]:
                res = summarize(times[name], cpu[name])
                if keep_samples:
                    res["samples_ms"] = times[name]
                out[name] = res
        return {name: out[name] for name in fns if name in out}

    def _flush(self) -> None:
        if self._flush_buf is None:
            props = torch.cuda.get_device_properties(self.device)
            l2 = getattr(props, "L2_cache_size", 0) or (64 << 20)
            self._flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device=self.device)
        self._flush_buf.zero_()

    def _recover(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def _capture(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph; the returned callable replays it. Three calls on a side
    stream first keep autotuning and lazy initialisation out of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay
