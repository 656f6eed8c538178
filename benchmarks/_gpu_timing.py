"""GPU timing for the kernel benchmark scripts: eager and CUDA-graph replay, side by side.

``eager``  ``triton.testing.do_bench`` on the Python callable: what a training loop that calls the
           op sees, host overhead included (on a machine whose host cannot launch kernels as fast
           as the GPU runs them, small ops measure the host, not the GPU).
``graph``  the callable captured once in a CUDA graph and the graph's replays timed by the same
           do_bench (CUDA events, L2 flushed before every replay): the device time of the op's
           kernels back to back, launch overhead removed. This is the number a roofline fraction
           can be computed from.

Both give the median and the 20 / 80 % quantiles in milliseconds. Capture runs the callable a
few times on a side stream first (autotuning and lazy initialisation stay out of the graph); a
callable that cannot be captured (a host synchronisation inside, say) yields ``graph_error``.
"""
from __future__ import annotations

from typing import Callable, Dict

QUANTILES = [0.5, 0.2, 0.8]


def time_eager(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> Dict[str, float]:
    from triton.testing import do_bench
    q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)
    return {"eager_median_ms": q[0], "eager_q20_ms": q[1], "eager_q80_ms": q[2]}


def time_graph(fn: Callable[[], object], rep_ms: int = 100) -> Dict[str, object]:
    import torch
    from triton.testing import do_bench
    graph = None
    try:
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
        q = do_bench(graph.replay, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=QUANTILES)
        return {"graph_median_ms": q[0], "graph_q20_ms": q[1], "graph_q80_ms": q[2]}
    except Exception as exc:  # say why in the row; the eager number still stands
        return {"graph_error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def time_both(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> Dict[str, object]:
    """Eager and graph timings; ``median_ms`` is the graph's when capture worked, else eager's,
    and ``timing`` says which."""
    row: Dict[str, object] = dict(time_eager(fn, warmup_ms, rep_ms))
    row.update(time_graph(fn, rep_ms))
    key = "graph" if "graph_median_ms" in row else "eager"
    row.update(timing=key, median_ms=row[f"{key}_median_ms"], q20_ms=row[f"{key}_q20_ms"],
               q80_ms=row[f"{key}_q80_ms"])
    return row


def copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written), measured now."""
    import torch
    from triton.testing import do_bench
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    del src, dst
    return 2.0 * nbytes / (ms * 1e-3)
