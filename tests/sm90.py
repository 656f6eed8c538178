"""Compile-only checks for a real GPU target, without a GPU: the Triton kernels compiled for
NVIDIA sm_90 (H100) with Triton's bundled compiler and ptxas. Test tooling, imported by the test
files' child processes (which run with TRITON_INTERPRET unset: under the interpreter the kernels
are Python functions and cannot be compiled)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from crossvit_kernels.backends.triton import cross_attention as K
from crossvit_kernels.backends.triton import projections as P

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of ``ptx`` as the ptxas bundled with Triton reports
    them (-v): the numbers the GPU build would have, read without a GPU. Kept in Triton's cache
    (keyed by the PTX and the ptxas binary), as the compiled kernels are."""
    import hashlib
    import json
    import re
    import subprocess
    import tempfile

    from triton.runtime.cache import get_cache_manager

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        ptxas, gpu_name = get_ptxas(arch).path, sm_arch_from_capability(arch)
    except ImportError:  # a Triton without these helpers: its bundled binary, by the usual path
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    stat = os.stat(ptxas)
    key = f"{ptxas}:{stat.st_size}:{stat.st_mtime_ns}:{gpu_name}\n{ptx}"
    cache = get_cache_manager(hashlib.sha256(key.encode()).hexdigest())
    cached = cache.get_file("ptxas_usage.json")
    if cached is not None:
        with open(cached) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if proc.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"cannot read the register usage from {ptxas} -v:\n{log[-2000:]}")
    usage = dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
    cache.put(json.dumps(usage), "ptxas_usage.json", binary=False)
    return usage


def compile_core_kernel(which: str, dtype: str, C: int, H: int, split: bool = False, arch: int = 90,
                           smem_limit: int = 227 * 1024, config: Optional[dict] = None) -> dict:
    """Compile one kernel for NVIDIA sm_``arch`` (no GPU needed: Triton ships ptxas) with the config
    the heuristic planner picks for a GPU with ``smem_limit`` bytes of shared memory per block, or
    with ``config`` (BLOCK_N, HEAD_LOOP, PREFETCH, num_warps and optionally num_stages: an
    autotune config, as ``triton.Config.all_kwargs()`` spells it).

    ``which`` is "fwd", "bwd", "fwd_combine" or "dw_combine"; ``dtype`` the input dtype's name.
    Returns the config, the shared memory the compiled kernel uses, the planner's estimate, the
    cubin size, whether the PTX uses tensor-core (mma) instructions, and the registers per thread
    and spill stores / loads (bytes) that ptxas reports. Must run with TRITON_INTERPRET unset (the
    interpreter replaces the kernels with Python functions).
    """
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    tname = _TRITON_TYPES[dtype]
    acc = "fp64" if tname == "fp64" else "fp32"
    elem = 8 if acc == "fp64" else 4
    num_stages = 1
    if which in ("fwd", "bwd"):
        kernel = K._cross_attention_fwd_kernel if which == "fwd" else K._cross_attention_bwd_kernel
        c_pad, h_pad = K._pad(C), K._pad(H)
        if config is None:
            cfg = K._heuristic_config(which, c_pad, h_pad, elem, smem_limit, None, None, None,
                                      K._input_precision(getattr(torch, dtype)))
        else:
            cfg = dict(BLOCK_N=config["BLOCK_N"], HEAD_LOOP=config["HEAD_LOOP"],
                       PREFETCH=config.get("PREFETCH", False), num_warps=config["num_warps"])
            num_stages = config.get("num_stages", 1)
        consts = dict(BLOCK_N=cfg["BLOCK_N"], HEAD_LOOP=cfg["HEAD_LOOP"], PREFETCH=cfg["PREFETCH"], C_PAD=c_pad,
                      H_PAD=h_pad, SPLIT=split, INPUT_PRECISION=K._input_precision(getattr(torch, dtype)))
        types = {n: "*" + tname for n in ("x_cls_ptr", "x_tok_ptr", "dx_cls_ptr", "dx_tok_ptr")}
        types.update({n: "*" + acc for n in ("w_ptr", "z_ptr", "lse_ptr", "part_l_ptr", "dz_ptr", "dw_ptr")})
        types.update(eps="fp32")
        # Specialised as the JIT specialises a launch in the model, where the tokens are the view
        # branch[:, 1:] of a contiguous activation: an integer argument equal to 1 becomes a
        # constant, and pointers and integers divisible by 16 are marked so. The unit channel
        # stride and aligned rows let the compiler vectorise the token loads and stores, which
        # changes the registers ptxas reports. M stays unmarked (the L branch's 196 patch tokens are
        # not a multiple of 16), and stride_tok_b is that branch's (1 + 196) * C.
        ints = dict(C=C, H=H, S=2 if split else 1, tokens_per_split=K.SPLIT_ALIGN, stride_cls_b=C, stride_cls_c=1,
                    stride_tok_b=C * 197, stride_tok_m=C, stride_tok_c=1)
        consts.update({n: 1 for n, v in ints.items() if v == 1})
        aligned = {n for n, v in ints.items() if v % 16 == 0} | {n for n in types if types[n].startswith("*")}
        if C * torch.empty((), dtype=getattr(torch, dtype)).element_size() % 16:
            aligned.discard("x_tok_ptr")                        # the view starts one row into the branch
        num_warps = cfg["num_warps"]
        estimate = K._smem_bytes(which, cfg["BLOCK_N"], c_pad, h_pad, elem, cfg["HEAD_LOOP"])
    else:
        kernel = (K._cross_attention_fwd_combine_kernel if which == "fwd_combine"
                  else K._cross_attention_dw_combine_kernel)
        cfg, estimate, num_warps = {}, None, 4
        consts = dict(S_PAD=8, BLOCK_C=128) if which == "fwd_combine" else dict(BLOCK=1024)
        types = {n: "*" + acc for n in kernel.arg_names if n.endswith("_ptr")}
        aligned = set()
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    if cfg:
        cfg["num_stages"] = num_stages
    return dict(which=which, dtype=dtype, C=C, H=H, split=split, config=cfg,
                shared=int(compiled.metadata.shared), estimate=estimate, cubin_bytes=len(compiled.asm["cubin"]),
                mma="mma" in compiled.asm["ptx"], **_ptxas_usage(compiled.asm["ptx"], arch))


def compile_projection_kernel(which: str, dtype: str, C: int, H: int, arch: int = 90) -> dict:
    """Compile one projection kernel (``which``: "query", "value" or "output") for NVIDIA
    sm_``arch`` with the launcher's block sizes; ``dtype`` is the input dtype's name. Returns the
    shared memory the compiled kernel uses and the cubin size. Run with TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget

    tname = _TRITON_TYPES[dtype]
    d_pad = max(16, triton.next_power_of_2(C // H))
    kernel, consts = {
        "query": (P._xattn_query_kernel, dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BQ=True, BLOCK_B=P.BLOCK_B,
                                               BLOCK_K=P.BLOCK_K, D_PAD=d_pad)),
        "value": (P._xattn_value_kernel, dict(HAS_GAMMA=True, HAS_BETA=True, HAS_BV=True, BLOCK_B=P.BLOCK_B,
                                               BLOCK_K=P.BLOCK_K, D_PAD=d_pad)),
        "output": (P._xattn_output_kernel, dict(HAS_BO=True, RESIDUAL=True, BLOCK_B=P.BLOCK_B, BLOCK_K=P.BLOCK_K,
                                                BLOCK_C=64)),
    }[which]
    fp32_ptrs = {"q_ptr", "w_ptr", "z_ptr", "o_ptr"}
    types = {n: ("*fp32" if n in fp32_ptrs else "*" + tname) for n in kernel.arg_names if n.endswith("_ptr")}
    types.update(eps="fp32", scale="fp32")
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=1))
    return dict(which=which, dtype=dtype, C=C, H=H, shared=int(compiled.metadata.shared),
                cubin_bytes=len(compiled.asm["cubin"]))
