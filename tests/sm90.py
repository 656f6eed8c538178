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

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
                 "int64": "i64"}


def _triton_ptxas_flags() -> list:
    """The register-allocation flags the installed Triton passes to ptxas when it builds a kernel
    (line info always; Triton 3.8 adds --regAllocOptLevel=2), so the report is the build's."""
    import inspect
    flags = ["-lineinfo"]
    try:
        from triton.backends.nvidia import compiler
        if "regAllocOptLevel=2" in inspect.getsource(compiler):
            flags.append("--regAllocOptLevel=2")
    except (ImportError, OSError, TypeError):  # pragma: no cover - an unusual install
        pass
    return flags


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
    flags = _triton_ptxas_flags()
    stat = os.stat(ptxas)
    key = f"{ptxas}:{stat.st_size}:{stat.st_mtime_ns}:{gpu_name}:{flags}\n{ptx}"
    cache = get_cache_manager(hashlib.sha256(key.encode()).hexdigest())
    cached = cache.get_file("ptxas_usage.json")
    if cached is not None:
        with open(cached) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cubin = os.path.join(tmp, "kernel.cubin")
        proc = subprocess.run([ptxas, *flags, "-v", f"--gpu-name={gpu_name}", src, "-o", cubin],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if proc.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"cannot read the register usage from {ptxas} -v:\n{log[-2000:]}")
    usage = dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
    cache.put(json.dumps(usage), "ptxas_usage.json", binary=False)
    return usage


def _compile(kernel, types: dict, consts: dict, aligned, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile ``kernel`` for NVIDIA sm_``arch`` with the given argument types (pointers "*bf16",
    integers "i32" by default), constexprs and 16-divisible arguments; the compiled kernel's
    shared memory, cubin size, PTX and ptxas's register / spill report."""
    from triton.backends.compiler import GPUTarget

    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    import re
    return dict(shared=int(compiled.metadata.shared), cubin_bytes=len(compiled.asm["cubin"]), num_warps=num_warps,
                num_stages=num_stages, ptx_mma=_mma_kinds(ptx), ptx_tf32_cvt="tf32" in ptx,
                ptx_scalar_16bit_loads=len(re.findall(r"ld\.global(?:\.[a-z]+)*\.b16\b", ptx)),
                ptx_async_copies=len(re.findall(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
                **_ptxas_usage(ptx, arch))


def _mma_kinds(ptx: str) -> list:
    """The distinct tensor-core instruction shapes/types in the PTX (mma.sync / wgmma)."""
    import re
    return sorted(set(re.findall(r"\b(?:mma\.sync\.aligned|wgmma\.mma_async\.sync\.aligned)\.[\w.]+", ptx)))


def occupancy(r: dict, smem_per_sm: int = 228 * 1024, regs_per_sm: int = 65536, max_ctas: int = 32) -> int:
    """CTAs resident per SM on an H100/H200 from the compiled kernel's registers, warps and shared
    memory (registers are allocated per warp in units of 256; each CTA reserves 1 KB of shared
    memory for the system)."""
    regs_per_warp = ((r["registers"] * 32 + 255) // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * r["num_warps"])
    by_smem = smem_per_sm // (r["shared"] + 1024) if r["shared"] else max_ctas
    return min(by_regs, by_smem, max_ctas, 64 // r["num_warps"])


def compile_stream_kernel(which: str, dtype: str, C0: int, H0: int, C1: Optional[int] = None,
                          H1: Optional[int] = None, split: bool = False, arch: int = 90,
                          block_n: Optional[int] = None, fusion: bool = False, num_warps: Optional[int] = None,
                          hilo: Optional[int] = None) -> dict:
    """Compile the streaming kernel ``which`` ("fwd" or "bwd") for sm_``arch`` with the launcher's
    config, for one problem (C0, H0) or two (the fusion stage's problem table, with COPY /
    ADD_DOUT when ``fusion``). Specialised as a launch in the model is: the tokens are the view
    branch[:, 1:] of a contiguous activation (unit channel stride, 16-byte aligned rows when C * elem
    is a multiple of 16). Run with TRITON_INTERPRET unset."""
    _t = torch
    td = getattr(_t, dtype)
    tname = _TRITON_TYPES[dtype]
    acc = "fp64" if tname == "fp64" else "fp32"
    two = C1 is not None
    probs = [(C0, H0), (C1 if two else C0, H1 if two else H0)]
    kernel = K._stream_fwd_kernel if which == "fwd" else K._stream_bwd_kernel
    cfg = K.stream_config(which, max(c for c, _ in probs), td, block_n)
    consts = dict(TWO=two, MMA=K._TL_TYPES[K.mma_dtype(td)], PREC=K._precision(td),
                  HILO=K.hilo(td) if hilo is None else hilo)
    consts["COPY" if which == "fwd" else "ADD_DOUT"] = fusion
    types, ints = {}, {}
    for i, (C, H) in enumerate(probs):
        pcfg = K.stream_config(which, C, td, block_n)
        if which == "bwd":
            consts[f"C_CHUNK{i}"] = pcfg.c_chunk
        consts.update({f"BLOCK_N{i}": pcfg.block_n, f"C_PAD{i}": K._pad(C),
                       f"H_PAD{i}": K._pad_heads(H), f"SPLIT{i}": split})
        q0 = "fp32" if fusion else tname
        if which == "fwd":
            types.update({f"tok{i}": "*" + tname, f"q0{i}": "*" + q0, f"w{i}": "*" + (tname if fusion else acc),
                          f"cp{i}": "*" + tname, f"z{i}": "*" + acc, f"lse{i}": "*" + acc, f"l{i}": "*" + acc})
        else:
            types.update({f"tok{i}": "*" + tname, f"q0{i}": "*" + q0, f"w{i}": "*" + (tname if fusion else acc),
                          f"dz{i}": "*" + (tname if fusion else acc), f"z{i}": "*" + acc, f"lse{i}": "*" + acc,
                          f"do{i}": "*" + tname, f"dx{i}": "*" + tname, f"dq0{i}": "*" + q0,
                          f"dw{i}": "*" + acc})
        types[f"eps{i}"] = "fp32"
        ints.update({f"C{i}": C, f"H{i}": H, f"s_tb{i}": C * 197, f"s_tm{i}": C, f"s_tc{i}": 1,
                     f"s_q0b{i}": C, f"s_q0c{i}": 1, f"s_cb{i}": C * 197, f"s_cm{i}": C, f"s_cc{i}": 1,
                     f"s_ob{i}": C * 197, f"s_om{i}": C, f"s_oc{i}": 1, f"s_xb{i}": C * 197, f"s_xm{i}": C,
                     f"s_xc{i}": 1, f"s_dqb{i}": C, f"tps{i}": 64, f"S{i}": 2 if split else 1})
    # an integer argument equal to 1 is specialised to a constant, as the JIT does at launch
    consts.update({n: 1 for n, v in ints.items() if v == 1 and n in kernel.arg_names})
    aligned = {n for n, v in ints.items() if v % 16 == 0} | {n for n in types if types[n].startswith("*")}
    elem = _t.empty((), dtype=td).element_size()
    for i, (C, _) in enumerate(probs):
        if C * elem % 16:
            aligned -= {f"tok{i}", f"cp{i}", f"do{i}", f"dx{i}"}      # views start one row into the branch
    out = _compile(kernel, types, consts, aligned, num_warps or cfg.num_warps, cfg.num_stages, arch)
    out.update(which=which, dtype=dtype, C=[c for c, _ in probs], H=[h for _, h in probs], split=split,
               fusion=fusion, block_n=[consts["BLOCK_N0"], consts["BLOCK_N1"]])
    out["ctas_per_sm"] = occupancy(out)
    return out


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


# ---------------------------------------------------------------------------------------------
# any launch, compiled as the JIT would compile it, captured from a real launcher call
# ---------------------------------------------------------------------------------------------

class CapturedLaunch:
    def __init__(self, fn, grid, args, kwargs):
        self.fn, self.grid, self.args, self.kwargs = fn, grid, args, kwargs

    @property
    def name(self) -> str:
        return self.fn.__name__


def capture_launches(call, *args, **kwargs):
    """Run ``call(*args, **kwargs)`` with every Triton launch recorded instead of run (the kernels
    never execute: outputs stay uninitialised) -> (call's result, [CapturedLaunch]). Needs
    TRITON_INTERPRET unset; the tensors may live on the CPU."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *a, grid, warmup, **kw):
        launches.append(CapturedLaunch(self, grid, a, kw))

    JITFunction.run = record
    try:
        result = call(*args, **kwargs)
    finally:
        JITFunction.run = original
    return result, launches


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def compile_launch(launch: CapturedLaunch, arch: int = 90) -> dict:
    """Compile a captured launch for NVIDIA sm_``arch`` with the specialisation the JIT applies at
    launch: pointers and integers divisible by 16 marked so, integers equal to 1 made constants,
    ints wider than 32 bits as i64. Returns _compile's report plus the kernel name and grid."""
    fn = launch.fn
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    values = dict(zip(names, launch.args))
    options = {k: launch.kwargs[k] for k in _LAUNCH_OPTIONS if k in launch.kwargs}
    values.update({k: v for k, v in launch.kwargs.items() if k not in _LAUNCH_OPTIONS})
    types, consts, aligned = {}, {}, set()
    for n in names:
        v = values[n]
        if params[n].is_constexpr:
            consts[n] = v
        elif isinstance(v, torch.Tensor):
            types[n] = "*" + _TRITON_TYPES[str(v.dtype).replace("torch.", "")]
            if v.data_ptr() % 16 == 0:
                aligned.add(n)
        elif isinstance(v, bool):
            types[n] = "i1"
        elif isinstance(v, int):
            if v == 1 and not params[n].do_not_specialize:
                consts[n] = 1
            else:
                types[n] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    aligned.add(n)
        elif isinstance(v, float):
            types[n] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {n}={v!r}")
    out = _compile(fn, types, consts, aligned, options.get("num_warps", 4), options.get("num_stages", 3), arch)
    grid = launch.grid(dict(values)) if callable(launch.grid) else launch.grid
    out.update(kernel=fn.__name__, grid=list(grid))
    out["ctas_per_sm"] = occupancy(out)
    return out
