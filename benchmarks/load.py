"""Background CPU load for measuring how the timings hold up on a busy machine.

    python benchmarks/run.py --load busy1 ...               # run.py's option
    python benchmarks/load.py bursty2 -- python -m crossvit_kernels.benchmark ...   # any command

Kinds (N = 1 or 2; more is allowed):

``busyN``    N processes spinning in a busy loop, process i pinned to the i-th CPU this process
             may use (one core taken, or both on a 2-core machine).
``burstyN``  N processes that behave like data-loader workers: each alternately prepares a batch
             (uint8 image decode stand-in -> float, normalise, random crop and flip, numpy) for
             20-60 ms and sleeps 20-60 ms, pinned as above.
``none``     no load.

The workers exit when the measurement ends (the context manager terminates them, also on an
exception or SIGTERM) and on their own when their parent is gone (they check every few
milliseconds), so none outlives the run. Standard library and numpy only.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from typing import Iterator, List

__all__ = ["KINDS_HELP", "parse_kind", "generate"]

KINDS_HELP = "none, busyN or burstyN (N workers, e.g. busy1, busy2, bursty1, bursty2)"


def parse_kind(kind: str):
    """("busy" | "bursty", N) or None for "none"; ValueError for anything else."""
    if kind in ("", "none"):
        return None
    m = re.fullmatch(r"(busy|bursty)(\d+)", kind)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"unknown load {kind!r}: choose {KINDS_HELP}")
    return m.group(1), int(m.group(2))


def _cores() -> List[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (not Linux): leave the workers unpinned
        return []


@contextlib.contextmanager
def generate(kind: str, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Iterator[List[int]]:
    """Run load ``kind`` for the duration of the ``with`` block; yields the workers' PIDs."""
    parsed = parse_kind(kind)
    if parsed is None:
        yield []
        return
    what, n = parsed
    cores = _cores()
    procs = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # turn SIGTERM into an exception so that the workers are ended below
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: rely on the workers' parent check
        previous = None
    try:
        for i in range(n):
            core = cores[i % len(cores)] if cores else -1
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", what,
                                           "--core", str(core), "--seed", str(i), "--parent", str(os.getpid())]))
        log(f"load {kind}: {n} {what} worker(s), pids {[p.pid for p in procs]}"
            + (f", pinned to cores {[cores[i % len(cores)] for i in range(n)]}" if cores else ""))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if procs:
            log(f"load {kind}: workers ended")


# ------------------------------------------------------------------------------------------------
# the workers
# ------------------------------------------------------------------------------------------------


def _busy(parent: int) -> None:
    i = 0
    while True:
        i += 1
        if i % 200_000 == 0 and os.getppid() != parent:
            return


def _bursty(parent: int, seed: int) -> None:
    import numpy as np
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None] * 255
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None] * 255
    while os.getppid() == parent:
        work_end = time.perf_counter() + rng.uniform(0.020, 0.060)
        while time.perf_counter() < work_end:  # one batch of 8 images, 256 px -> 224 px crops
            raw = rng.integers(0, 256, size=(8, 3, 256, 256), dtype=np.uint8)
            x = (raw.astype(np.float32) - mean) / std
            top, left = rng.integers(0, 33, size=2)
            x = x[:, :, top:top + 224, left:left + 224]
            if rng.random() < 0.5:
                x = x[..., ::-1]
            np.ascontiguousarray(x)
        time.sleep(rng.uniform(0.020, 0.060))


def _worker(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("busy", "bursty"), required=True)
    p.add_argument("--core", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us; Ctrl-C goes to it
    if args.core >= 0:
        os.sched_setaffinity(0, {args.core})
    if args.worker == "busy":
        _busy(args.parent)
    else:
        _bursty(args.parent, args.seed)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv)
    p = argparse.ArgumentParser(description="Run a command under background CPU load.",
                                usage="python benchmarks/load.py KIND -- COMMAND [ARGS...]")
    p.add_argument("kind", help=KINDS_HELP)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command given (put it after --)")
    try:
        parse_kind(args.kind)
    except ValueError as exc:
        p.error(str(exc))
    with generate(args.kind):
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
