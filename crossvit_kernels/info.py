"""``python -m crossvit_kernels.info``: versions, devices, and every backend with its status.

Prints, for each backend, whether it is available and, if not, why; then what ``auto`` picks
for each op on each device present. ``--json`` prints the same as a JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Dict, Optional


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # not installed or broken: say so, never crash
        return f"not available ({type(exc).__name__}: {exc})"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def collect() -> Dict[str, object]:
    import torch

    import crossvit_kernels as ck
    from crossvit_kernels import backends
    from crossvit_kernels.backends.base import OPS

    devices = [{"type": "cpu", "name": cpu_model(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"type": "cuda", "index": i, "name": p.name,
                            "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
    avail = ck.available_backends()
    dispatch = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for op in OPS:
            dispatch[f"{op}@{dev}"] = backends.explain_dispatch(op, dev, torch.float32)
    return {
        "crossvit_kernels": ck.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "env": {k: os.environ[k] for k in ("CROSSVIT_KERNELS_BACKEND", "TRITON_INTERPRET", "CROSSVIT_KERNELS_NO_EXT")
                if k in os.environ},
        "devices": devices,
        "backends": {k: (True if v is True else v) for k, v in avail.items()},
        "default_backend": backends.get_default_backend(),
        "dispatch": dispatch,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossvit_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"crossvit_kernels {info['crossvit_kernels']}")
    for key in ("python", "platform", "torch", "torch_cuda", "triton", "timm"):
        print(f"  {key:10s} {info[key]}")
    if info["env"]:
        print("environment:")
        for k, v in info["env"].items():
            print(f"  {k}={v}")
    print("devices:")
    for d in info["devices"]:
        extra = (f" (sm {d['capability']}, {d['memory_gib']} GiB)" if d["type"] == "cuda"
                 else f" ({d['threads']} threads)")
        print(f"  {d['type']}{':' + str(d['index']) if 'index' in d else ''}  {d['name']}{extra}")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:10s} {'available' if status is True else 'unavailable: ' + str(status)}")
    print(f"default backend: {info['default_backend']}")
    print("dispatch (auto, float32):")
    for text in info["dispatch"].values():
        for line in text.splitlines():
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
