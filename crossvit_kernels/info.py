"""``python -m crossvit_kernels.info``: versions, devices, and every backend with its status.

Prints, for each backend, whether it is available and, if not, why; then what ``auto`` picks
for each op on each device present. ``--json`` prints the same as a JSON object.
:func:`environment` is the record of a machine that every benchmark of the project stores with
its numbers.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
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


def _dist_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist`` without importing it; None when absent."""
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def git_commit() -> Optional[str]:
    """The commit of the checkout the package runs from (``+dirty`` with tracked changes), or None
    when it is not a git checkout (an installed wheel) or git is missing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_tag(device) -> str:
    """A folder name for a machine's results: ``cpu-amd-epyc-2t`` (CPU model, torch threads),
    ``gpu-h100-80gb-hbm3`` (GPU name without the vendor)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name(device), flags=re.I)
        return "gpu-" + _slug(name)
    return f"cpu-{_slug(cpu_model())}-{torch.get_num_threads()}t"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device=None) -> Dict[str, object]:
    """What a measurement ran on: device, threads, versions, commit, load; one record shared by every
    benchmark of the project (the caller adds the dtype)."""
    import torch

    import crossvit_kernels as ck
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    env: Dict[str, object] = {
        "device": device_name(device), "device_type": device.type, "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
        "versions": {"crossvit_kernels": ck.__version__, "torch": torch.__version__,
                     "triton": _dist_version("triton"), "timm": _dist_version("timm"),
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "commit": git_commit(),
    }
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        env["load_average"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return env


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
